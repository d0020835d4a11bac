"""Everything `evaluate.py` needs, checked before any work is done and before anything is written.

`prepare_inputs(cfg)` validates the evaluation config, the run directory, the output location, the shards,
the class names and the SAE (loadable, finite), then loads the backbone and checks that it matches the SAE.
Any problem is an error that names what to fix; nothing has been written at that point, so a failed
evaluation leaves an earlier one untouched.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from sae_lightning.data.shards import expand_shards, load_classnames
from sae_lightning.sae import SparseAutoencoder
from sae_lightning.sae.io import WEIGHTS_FILENAME

log = logging.getLogger(__name__)

ULTRA_RARE_DENSITY = 1e-5  # docs/metrics.md: ultra-rare = density < 1e-5
SEED_CONTRASTIVE_BATCH = 1024


@dataclass
class EvalInputs:
    """The checked inputs of one evaluation."""

    cfg: DictConfig  # the evaluation config (conf/evaluate.yaml + overrides)
    run: Path  # the training run directory
    run_cfg: DictConfig  # its resolved training config
    out: Path  # where the evaluation goes (swapped in whole at the end)
    device: torch.device
    sae: SparseAutoencoder
    sae_dir: Path
    backbone: Any  # sae_lightning.backbone.Backbone
    layer: int  # resolved to 0..n_layers-1
    tokens: str
    urls: list[str]  # the held-out shards
    classnames: list[str] | None
    classnames_source: str | None
    features: list[int]  # extra feature ids to draw grids for
    warnings: list[str] = field(default_factory=list)  # also shown in the report and metrics.json

    def warn(self, message: str) -> None:
        """Log a warning once and keep it for the report."""
        if message not in self.warnings:
            log.warning(message)
            self.warnings.append(message)


def resolve_device(spec: str) -> torch.device:
    """auto -> cuda when available, else cpu; asking for cuda without one is an error, not a fallback."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exn:
        raise ValueError(f"device={spec!r} is not a device: use auto, cpu, cuda or cuda:<n>") from exn
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but CUDA is not available; use device=cpu or auto")
    return device


def check_config(cfg: DictConfig) -> None:
    """The evaluation's own settings: positive sizes, with what is allowed in the message."""
    positive = ("n_images", "top_k", "batch_size", "contrastive_batch_size", "max_tokens")
    non_negative = ("num_workers", "n_grid_features", "shuffle")
    for key in (*positive, *non_negative):
        value = cfg.get(key)
        lowest = 1 if key in positive else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise ValueError(f"{key}={value!r}: must be an integer >= {lowest}")
    if not isinstance(cfg.get("features"), (list, tuple)) and not OmegaConf.is_list(cfg.get("features")):
        raise ValueError(f"features={cfg.get('features')!r}: must be a list of feature ids, e.g. features=[1,2]")


STOPPED_FILE = "training_stopped.json"  # MultiSAETrainingModule.STOPPED_FILE


def run_sae_names(run: Path, run_cfg: DictConfig | None = None) -> list[str] | None:
    """The SAEs of a multi-SAE run (`saes:` in its config; exports in <run>/sae/<name>/), or None for a run
    of one SAE (<run>/sae/cfg.json)."""
    if (run / "sae" / "cfg.json").is_file():
        return None
    saes = OmegaConf.select(run_cfg, "saes", default=None) if run_cfg is not None else None
    if saes:
        return sorted(str(name) for name in saes)
    folders = run / "sae"
    found = sorted(p.name for p in folders.iterdir() if p.is_dir() and not p.name.endswith((".tmp", ".old"))
                   and ((p / "cfg.json").is_file() or (p / STOPPED_FILE).is_file())) if folders.is_dir() else []
    return found or None


def load_run_config(run_dir: str | Path | None) -> tuple[Path, DictConfig]:
    """The run directory and its composed, resolved training config; clear errors for a wrong `run`."""
    if not run_dir:
        raise ValueError("evaluate.py needs the training run directory: python evaluate.py run=<run dir>")
    run = Path(run_dir).expanduser().resolve()
    if not run.is_dir():
        raise FileNotFoundError(f"run={run_dir!r}: no such directory")
    if not (run / "sae" / "cfg.json").is_file() and not run_sae_names(run):
        raise FileNotFoundError(
            f"run={run_dir!r} has no exported SAE ({run / 'sae'}/cfg.json): is it a training run directory, "
            f"and did training reach its first checkpoint/export?")
    for name in ("resolved.yaml", "config.yaml"):
        path = run / ".hydra" / name
        if path.is_file():
            return run, OmegaConf.load(path)
    raise FileNotFoundError(f"run={run_dir!r} has no .hydra/resolved.yaml: not a train.py run directory")


def resolve_out_dir(cfg: DictConfig, run: Path) -> Path:
    """<run>/eval by default, else `out_dir`; its parent must exist or be creatable, and be writable."""
    out = Path(cfg.out_dir).expanduser().resolve() if cfg.get("out_dir") else run / "eval"
    if out == run or out in run.parents or out in ((run / "sae"), (run / "checkpoints"), (run / ".hydra")):
        raise ValueError(f"out_dir={str(out)!r} would replace the run's own files; choose a new directory")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir={str(out)!r} exists and is not a directory")
    existing = out.parent
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        hint = " (the run directory is read-only: pass out_dir=<a writable directory>)" \
            if out == run / "eval" else ""
        raise PermissionError(f"cannot write the evaluation to {out}: {existing} is not writable{hint}")
    return out


def load_sae_checked(sae_dir: Path, device: torch.device) -> SparseAutoencoder:
    """The exported SAE, or an error naming the file: unreadable, or with NaN / inf weights."""
    weights = sae_dir / WEIGHTS_FILENAME
    try:
        sae = SparseAutoencoder.load(sae_dir, device=device).eval()
    except (FileNotFoundError, KeyError, ValueError) as exn:
        raise ValueError(f"cannot load the SAE in {sae_dir}: {exn}") from exn
    except Exception as exn:  # safetensors / json raise their own types for truncated or foreign files
        raise ValueError(
            f"cannot load the SAE in {sae_dir}: {type(exn).__name__}: {exn}. Is {weights.name} a complete "
            f"safetensors file and cfg.json complete JSON? Re-export it from a checkpoint or retrain.") from exn
    bad = {name: int((~torch.isfinite(p)).sum()) for name, p in sae.named_parameters()}
    bad = {name: n for name, n in bad.items() if n}
    if bad:
        listed = ", ".join(f"{name}: {n} of {sae.get_parameter(name).numel()}" for name, n in bad.items())
        raise ValueError(f"{weights} holds non-finite (NaN/inf) weights ({listed}): training diverged. "
                         f"Evaluate an earlier export or retrain with a lower lr.")
    return sae


def image_resolution_warning(n_images: int) -> str | None:
    """A warning when 1/n_images > 1e-5: a density below 1/n_images reads as 0, so ultra-rare is unresolved."""
    if n_images <= 0 or 1 / n_images <= ULTRA_RARE_DENSITY:
        return None
    return (f"{n_images:,} images cannot resolve the ultra-rare threshold: the smallest non-zero density is "
            f"1/{n_images:,} = {1 / n_images:.2g} > 1e-5, so ultra-rare features may read as dead. Evaluate "
            f"at least {math.ceil(1 / ULTRA_RARE_DENSITY):,} images (the seed: 524,288 held-out).")


def select_saes(cfg: DictConfig) -> list[str | None]:
    """Which SAEs of `cfg.run` to evaluate: [None] for a run of one SAE; for a multi-SAE run `sae_name`, or
    every SAE that has an export (one stopped before its first export is left out, with a warning)."""
    run, run_cfg = load_run_config(cfg.run)
    names = run_sae_names(run, run_cfg)
    wanted = cfg.get("sae_name")
    if names is None:
        if wanted:
            raise ValueError(f"sae_name={wanted!r}: {run} holds one SAE (in sae/); leave sae_name out")
        return [None]
    if wanted:
        if str(wanted) not in names:
            raise ValueError(f"sae_name={wanted!r}: {run} holds the SAEs {', '.join(names)}")
        if not (run / "sae" / str(wanted) / "cfg.json").is_file():
            raise FileNotFoundError(f"sae_name={wanted!r}: {run / 'sae' / str(wanted)} has no export "
                                    f"({_stopped_note(run, str(wanted)) or 'training never reached its first export'})")
        return [str(wanted)]
    chosen = []
    for name in names:
        if (run / "sae" / name / "cfg.json").is_file():
            chosen.append(name)
        else:
            log.warning("SAE %r has no export (%s): not evaluated.", name,
                        _stopped_note(run, name) or "training never reached its first export")
    if not chosen:
        raise FileNotFoundError(f"run={cfg.run!r}: none of its SAEs ({', '.join(names)}) has an export")
    return chosen


def _stopped_note(run: Path, name: str) -> str | None:
    """A sentence from <run>/sae/<name>/training_stopped.json, if the SAE was stopped during training."""
    path = run / "sae" / name / STOPPED_FILE
    if not path.is_file():
        return None
    import json

    record = json.loads(path.read_text())
    exported = record.get("exported_step")
    return (f"training stopped it at step {record.get('step')} ("
            f"{'its export is from step ' + str(exported) if exported is not None else 'before its first export'}"
            f"): {record.get('reason')}")


def run_backbone(run_cfg: DictConfig) -> tuple[DictConfig, int, str]:
    """(backbone config, layer as configured, tokens) that made the run's activations.

    A run trained from an activation cache (`data=cache`) has no backbone of its own: the cache's manifest
    names the one that wrote it (docs/format-activations.md). Other runs without a backbone (planted or
    stored activations) cannot be evaluated on images."""
    if run_cfg.get("backbone") is not None:
        return run_cfg.backbone, int(run_cfg.layer), str(run_cfg.tokens)
    cache_dir = OmegaConf.select(run_cfg, "data.path") if str(
        OmegaConf.select(run_cfg, "data._target_", default="")).endswith("CacheDataModule") else None
    if cache_dir:
        from sae_lightning.data.cache_format import backbone_source

        try:
            source = backbone_source(cache_dir)
        except Exception as exn:  # CacheError / OSError: say which cache and why
            raise ValueError(f"the run trained from the activation cache {cache_dir}, whose manifest names the "
                             f"backbone to evaluate with, but it cannot be read: {exn}") from exn
        return OmegaConf.create(source["backbone"]), int(source["layer"]), str(source["tokens"])
    raise ValueError("the run trained on stored activations with no backbone (data=activations or planted "
                     "features), so there are no images to evaluate it on; score planted runs with "
                     "`python -m sae_lightning.planted <run>`")


def prepare_inputs(cfg: DictConfig, sae_name: str | None = None, backbone: Any = None) -> EvalInputs:
    """Check everything, load the SAE and the backbone (unless given); writes nothing.

    `sae_name`: one SAE of a multi-SAE run (<run>/sae/<name>/, evaluated into <out>/<name>/)."""
    check_config(cfg)
    run, run_cfg = load_run_config(cfg.run)
    out = resolve_out_dir(cfg, run)
    if sae_name is not None:
        out = out / sae_name
    device = resolve_device(str(cfg.device))

    shard_spec = cfg.val_shards or OmegaConf.select(run_cfg, "data.val_shards")
    if not shard_spec:
        raise ValueError("no held-out shards: the run has no data.val_shards; pass val_shards=<pattern>")
    urls = expand_shards(OmegaConf.to_container(shard_spec) if OmegaConf.is_list(shard_spec) else shard_spec)
    names_spec = cfg.classnames or OmegaConf.select(run_cfg, "data.classnames")
    classnames = load_classnames(names_spec, urls)
    source = names_spec or ("classnames.txt beside the shards" if classnames else None)

    sae_dir = run / "sae" if sae_name is None else run / "sae" / sae_name
    sae = load_sae_checked(sae_dir, device)
    features = [int(f) for f in cfg.features]
    if any(not 0 <= f < sae.d_sae for f in features):
        raise ValueError(f"features={features}: feature ids must be in 0..{sae.d_sae - 1}")

    backbone_cfg, layer_spec, tokens = run_backbone(run_cfg)
    if backbone is None:
        backbone = hydra.utils.instantiate(backbone_cfg, device=str(device))
    if backbone.width != sae.d_in:
        raise ValueError(f"the SAE's d_in {sae.d_in} != the backbone's width {backbone.width}")
    layer = backbone.resolve_layer(layer_spec)
    inputs = EvalInputs(cfg=cfg, run=run, run_cfg=run_cfg, out=out, device=device, sae=sae, sae_dir=sae_dir,
                        backbone=backbone, layer=layer, tokens=tokens, urls=urls, classnames=classnames,
                        classnames_source=source, features=features)
    if sae.metadata.get("layer") not in (None, layer) or sae.metadata.get("tokens") not in (None, tokens):
        inputs.warn(
            f"the SAE's metadata (layer {sae.metadata.get('layer')}, tokens {sae.metadata.get('tokens')}) "
            f"disagrees with the run config (layer {layer}, tokens {tokens})")
    stopped = _stopped_note(run, sae_name) if sae_name is not None else None
    if stopped:
        inputs.warn(f"SAE {sae_name!r}: {stopped}")
    if not classnames:
        inputs.warn("no class names (classnames=... or classnames.txt beside the shards): the "
                               "contrastive loss, zero-shot accuracy and KL are undefined")
    return inputs
