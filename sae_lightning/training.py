"""Build everything from a composed config and train: what `python train.py` runs (docs/training.md)."""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from sae_lightning.backbone import check_layer, config_tokens_per_image
from sae_lightning.callbacks import ExportSAECallback, FinalHParamsCallback, SAECheckpoint, stop_signal_name
from sae_lightning.checkpoint_io import clean_stale_temporaries
from sae_lightning.config import RESOLVED_CONFIG, save_resolved_config
from sae_lightning.data.datamodule import require_train_shards
from sae_lightning.validation import validate_train_config

log = logging.getLogger(__name__)

# Our checkpoints hold the state after each step on purpose; Lightning warns about it for manual optimisation.
warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")  # Lightning vs torch 2.14, harmless

# What an SAE means: a resume that changes any of these would silently train a different SAE, so it refuses.
SEMANTIC_KEYS = ("backbone._target_", "backbone.name", "backbone.pretrained", "backbone.quick_gelu", "layer", "tokens",
                 "expansion", "sae._target_", "sae.mse", "module.normalize_activations", "data._target_")
# Run artefacts: a directory holding any of them holds a run.
RUN_ARTEFACTS = ("checkpoints", "sae", "tensorboard")
SIGNAL_EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130}  # 128 + the signal number, as a shell reports it
# What one entry of `saes:` may set (docs/training.md, "Many SAEs per pass"): the rest is the run's, shared.
VARIANT_KEYS = ("sae", "module", "l1_coefficient", "lr", "expansion", "schedule")
VARIANT_SCHEDULE_KEYS = ("lr_warmup", "lr_decay", "dead_feature_window", "feature_sampling_window")
VARIANT_SEMANTIC_KEYS = ("expansion", "sae._target_", "sae.mse", "module.normalize_activations")
SAE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]{0,99}$")


def sae_variants(cfg: DictConfig) -> dict[str, DictConfig] | None:
    """The SAEs of a multi-SAE run (`saes:`), each as the full config a single run would have; None if none.

    An entry overrides the run's `l1_coefficient`, `lr`, `expansion`, `module.*`, `schedule.lr_warmup`, `lr_decay`,
    `schedule.dead_feature_window`, `schedule.feature_sampling_window` and `sae`: an `sae` node with a
    `_target_` is a whole SAE config (an architecture from conf/sae/, composed into the entry with
    `- /sae@saes.<name>.sae: topk` in an experiment's defaults list), without one it overrides knobs of
    the run's `sae`. Interpolations resolve in the entry's own config (`${l1_coefficient}` is its l1).
    """
    saes = cfg.get("saes")
    if saes is None:
        return None
    problems = []
    if not isinstance(saes, DictConfig) or len(saes) == 0:
        raise ValueError(f"saes={OmegaConf.to_container(saes) if OmegaConf.is_config(saes) else saes!r}: must be "
                         "a mapping of named SAEs, e.g. saes: {{small: {{expansion: 4}}, large: {{expansion: 16}}}}, "
                         "or null for one SAE")
    base = OmegaConf.to_container(cfg, resolve=False)
    base.pop("saes")
    variants = {}
    for name in saes:
        entry = saes[name]
        if not SAE_NAME_PATTERN.match(str(name)):
            problems.append(f"saes.{name}: the name becomes a folder: use letters, digits and _ . = + - "
                            "(starting with a letter or digit)")
            continue
        entry = {} if entry is None else OmegaConf.to_container(entry, resolve=False)
        if not isinstance(entry, dict):
            problems.append(f"saes.{name}={entry!r}: must be a mapping of overrides ({{}} for the run's own SAE)")
            continue
        unknown = sorted(set(entry) - set(VARIANT_KEYS))
        if unknown:
            problems.append(f"saes.{name}: {', '.join(unknown)} cannot differ between the SAEs of one run (they "
                            f"share the data and the backbone); an entry may set {', '.join(VARIANT_KEYS)}")
        bad_schedule = sorted(set(entry.get("schedule") or {}) - set(VARIANT_SCHEDULE_KEYS))
        if bad_schedule:
            problems.append(f"saes.{name}.schedule: {', '.join(bad_schedule)} is run-wide (one checkpoint holds "
                            f"every SAE); an entry may set {', '.join(VARIANT_SCHEDULE_KEYS)}")
        for group in ("module", "sae"):  # knobs the run's own node has (a whole new `sae` brings its own)
            node = entry.get(group)
            if isinstance(node, dict) and "_target_" not in node and isinstance(base.get(group), dict):
                typos = sorted(set(node) - set(base[group]))
                if typos:
                    problems.append(f"saes.{name}.{group}: {', '.join(typos)} is not a knob of the run's {group} "
                                    f"({', '.join(k for k in base[group] if k != '_target_')})")
        variant = OmegaConf.create(base)
        sae_node = entry.pop("sae", None)
        if isinstance(sae_node, dict) and "_target_" in sae_node:
            variant.sae = sae_node
        elif sae_node is not None:
            if not isinstance(sae_node, dict):
                problems.append(f"saes.{name}.sae={sae_node!r}: must be a mapping (SAE knobs, or a whole SAE "
                                "config with _target_: compose one with `- /sae@saes.<name>.sae: topk`)")
                continue
            variant.sae = OmegaConf.merge(variant.sae, sae_node)
        for key in set(entry) & set(VARIANT_KEYS):
            variant[key] = OmegaConf.merge(variant[key], entry[key]) if isinstance(entry[key], dict) else entry[key]
        variants[str(name)] = variant
    if problems:
        raise ValueError("Invalid saes (nothing was run):\n  - " + "\n  - ".join(problems))
    variants = dict(sorted(variants.items()))  # one order whatever the config's: checkpoints list them so
    for name, variant in variants.items():
        try:
            validate_train_config(variant)
        except ValueError as err:
            raise ValueError(f"saes.{name}: {err}") from None
    return variants


def record_saes(cfg: DictConfig, variants: dict[str, DictConfig]) -> dict:
    """The run's config as a plain dict, with each `saes` entry resolved in its own config (so that
    `sae_variants` of the stored config gives the same SAEs: resolved.yaml and checkpoints store this)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["saes"] = {}
    for name, variant in variants.items():
        entry = OmegaConf.to_container(cfg.saes[name], resolve=False) or {}
        resolved = OmegaConf.to_container(variant, resolve=True)
        plain["saes"][name] = {key: resolved[key] for key in VARIANT_KEYS if key in entry or key == "sae"}
        if "schedule" in entry:  # only the entry's own windows: the run-wide ones are no entry's to set
            plain["saes"][name]["schedule"] = {key: resolved["schedule"][key] for key in entry["schedule"] or {}}
    return plain


def sae_metadata(cfg: DictConfig, backbone, datamodule) -> dict:
    """What an exported SAE must know about where its inputs came from (cfg.json `metadata`)."""
    if backbone is None:  # stored or planted activations: no image size; a cache knows its model and layer
        source = getattr(datamodule, "sae_metadata", None)
        origin = source() if source else {"dataset": str(OmegaConf.to_container(cfg.data, resolve=True).get(
            "activations"))}
        return {**origin, "expansion": cfg.expansion, "l1_coefficient": cfg.l1_coefficient, "lr": cfg.lr}
    return {
        "backbone": backbone.name,
        "pretrained": backbone.pretrained,
        "layer": datamodule.layer,
        "tokens": datamodule.tokens,
        "tokens_per_image": datamodule.tokens_per_image,
        "image_size": backbone.image_size,
        "dataset": str(cfg.data.train_shards),
        "expansion": cfg.expansion,
        "l1_coefficient": cfg.l1_coefficient,
        "lr": cfg.lr,
    }


def total_steps(cfg: DictConfig, tokens_per_image: int, world_size: int = 1) -> int:
    """`max_steps` if set, else enough SAE steps to see `training_images` images once each.

    `sae_batch_size` is per device: with DDP every rank takes its own batch, so a step sees world_size
    batches and the same number of images takes world_size times fewer steps.
    """
    if cfg.max_steps:
        return int(cfg.max_steps)
    return math.ceil(cfg.training_images * tokens_per_image / (cfg.sae_batch_size * world_size))


def schedule_steps(schedule: DictConfig | dict, activations_per_step: int) -> dict[str, int]:
    """The config's `schedule` (in activations seen) in optimiser steps of `activations_per_step` activations.

    Rounded to the nearest step; every interval is at least one step (a warm-up or decay of 0 stays 0), so 1 or 8
    devices, or another sae_batch_size, follow the same schedule per activation.
    """
    steps = {}
    for name, activations in dict(schedule).items():
        n = round(int(activations) / activations_per_step)
        if name == "lr_decay" and int(activations) > 0 and n < 2:  # 0 steps is no decay, 1 step ends at full lr
            raise ValueError(f"schedule.lr_decay={activations} is {n} step(s) of {activations_per_step} activations: "
                             f"a decay needs at least 2 steps (schedule.lr_decay >= {2 * activations_per_step}, in "
                             f"activations, not steps), or 0 for none")
        steps[name] = n if name in ("lr_warmup", "lr_decay") else max(1, n)
    return steps


def planned_steps(cfg: DictConfig) -> tuple[int, int] | None:
    """(steps, activations per step) from the config alone, before any data is built or weights loaded; None
    where only the built data or trainer can tell (an hf-hub model's token count, `trainer.devices=-1`, a cache's
    tokens per image)."""
    trainer = cfg.get("trainer") or {}
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (devices, nodes)):
        return None
    world = devices * nodes
    if cfg.get("max_steps"):
        return int(cfg.max_steps), cfg.sae_batch_size * world
    backbone = cfg.get("backbone")
    if backbone is None:  # stored activations: one row each; a cache's manifest says how many rows an image has
        is_cache = "ActivationsDataModule" not in str((cfg.get("data") or {}).get("_target_", ""))
        per_image = None if is_cache else 1
    else:
        per_image = config_tokens_per_image(str(backbone.get("name", "")), cfg.tokens)
    return None if per_image is None else (total_steps(cfg, per_image, world), cfg.sae_batch_size * world)


def check_lr_schedule(schedule: dict[str, int], steps: int, activations_per_step: int, where: str = "") -> None:
    """Refuse a warm-up plus decay longer than the run, naming the limit in activations (the config's unit)."""
    from sae_lightning.module import lr_schedule

    try:
        lr_schedule(schedule["lr_warmup"], schedule.get("lr_decay", 0), steps)
    except ValueError as error:
        limit = (steps - schedule["lr_warmup"]) * activations_per_step
        raise ValueError(f"{where}{error} (the run has {steps} steps of {activations_per_step} activations: "
                         f"schedule.lr_decay at most {max(limit, 0)})") from None


def check_lr_schedules_early(cfg: DictConfig, variants: dict[str, DictConfig] | None) -> None:
    """`check_lr_schedule` for the run and each SAE, where the config alone gives the step count."""
    planned = planned_steps(cfg)
    if planned is None:
        return  # checked once the data is built, before training
    steps, per_step = planned
    for name, config in (variants or {None: cfg}).items():
        check_lr_schedule(schedule_steps(config.schedule, per_step), steps, per_step,
                          f"saes.{name}: " if name else "")


def build_data(cfg: DictConfig):
    """(backbone, datamodule, d_in): image shards through a backbone, or stored activations (backbone null)."""
    if cfg.get("backbone") is None:
        datamodule = instantiate(cfg.data)
        return None, datamodule, datamodule.d_in
    backbone = instantiate(cfg.backbone)
    return backbone, instantiate(cfg.data, backbone=backbone), backbone.width


def holds_a_run(directory: Path) -> bool:
    return any((directory / name).exists() for name in RUN_ARTEFACTS)


def resolve_checkpoint(cfg: DictConfig, output_dir: Path) -> Path | None:
    """The checkpoint to resume from: `ckpt_path` as given, or for `ckpt_path=last` the run's own last.ckpt
    if there is one (so a requeued job's command never changes); None for a fresh run."""
    spec = cfg.get("ckpt_path")
    if not spec:
        return None
    if str(spec) == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        return last if last.is_file() else None
    path = Path(str(spec)).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={spec!r}: no such checkpoint file. Resume with "
                                f"ckpt_path=<run>/checkpoints/last.ckpt, or ckpt_path=last inside the run directory.")
    return path


def checkpoint_run_dir(ckpt: Path) -> Path:
    """The run directory a checkpoint belongs to (<run>/checkpoints/x.ckpt -> <run>)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _select(cfg: dict | DictConfig, key: str) -> Any:
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    value = OmegaConf.select(node, key, default=None)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def compare_resume_config(old: dict, new: DictConfig) -> dict[str, tuple[Any, Any]]:
    """Refuse a resume that changes what the SAE means; return the training knobs that changed."""
    semantic = [(k, _select(old, k), _select(new, k)) for k in SEMANTIC_KEYS]
    semantic = [(k, a, b) for k, a, b in semantic if a != b]
    old_acts, new_acts = _select(old, "data.activations"), _select(new, "data.activations")
    if isinstance(old_acts, dict) and isinstance(new_acts, dict):  # a generator spec: its output path may differ
        old_acts, new_acts = ({k: v for k, v in a.items() if k != "save_to"} for a in (old_acts, new_acts))
    if old_acts != new_acts:
        semantic.append(("data.activations", old_acts, new_acts))
    old_saes, new_saes = _select(old, "saes"), _select(new, "saes")
    if (old_saes is None) != (new_saes is None) or (old_saes and sorted(old_saes) != sorted(new_saes)):
        semantic.append(("saes (the SAEs' names)", sorted(old_saes or []) or None, sorted(new_saes or []) or None))
    elif old_saes:
        old_variants = sae_variants(OmegaConf.create(old))
        new_variants = sae_variants(new) or {}
        for name in new_variants:
            for key in VARIANT_SEMANTIC_KEYS:
                a, b = _select(old_variants[name], key), _select(new_variants[name], key)
                if a != b:
                    semantic.append((f"saes.{name}: {key}", a, b))
    if semantic:
        lines = "\n".join(f"  {k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in semantic)
        raise ValueError(f"This resume would change what the SAE means:\n{lines}\nResume with the checkpoint's "
                         "values, or start a new run (without ckpt_path) to train a different SAE.")
    flat_old = _flatten(OmegaConf.to_container(OmegaConf.create(old), resolve=False))
    new_saes_variants = sae_variants(new)
    flat_new = _flatten(record_saes(new, new_saes_variants) if new_saes_variants is not None
                        else OmegaConf.to_container(new, resolve=True))
    ignore = ("paths.", "ckpt_path", "overwrite", "hydra")
    return {k: (flat_old.get(k), v) for k, v in flat_new.items()
            if not k.startswith(ignore) and flat_old.get(k) != v and k in flat_old}


def load_checkpoint_config(ckpt: Path) -> tuple[dict | None, int]:
    """(the composed config stored in a checkpoint, or its run's resolved.yaml; the checkpoint's global step)."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types on a bad file; all mean "not a checkpoint"
        raise ValueError(f"ckpt_path={str(ckpt)!r} is not a readable checkpoint ({type(err).__name__}: {err}). "
                         f"Use another one from {ckpt.parent}/ (they are written atomically).") from err
    config = state.get("sae_lightning_config")
    if config is None:
        resolved = checkpoint_run_dir(ckpt) / RESOLVED_CONFIG
        config = OmegaConf.to_container(OmegaConf.load(resolved)) if resolved.is_file() else None
    return config, int(state.get("global_step", 0))


def prepare_run_directory(cfg: DictConfig, output_dir: Path, ckpt: Path | None) -> None:
    """Refuse to train into another run's directory unless resuming it or asked to overwrite it."""
    resuming_here = ckpt is not None and checkpoint_run_dir(ckpt).resolve() == output_dir.resolve()
    if resuming_here or not holds_a_run(output_dir):
        return
    if cfg.get("overwrite"):
        for name in (*RUN_ARTEFACTS, "eval"):
            shutil.rmtree(output_dir / name, ignore_errors=True)
        log.warning("overwrite=true: removed the previous run's checkpoints, export, TensorBoard logs and "
                    "evaluation from %s.", output_dir)
        return
    raise FileExistsError(
        f"{output_dir} already holds a run (checkpoints/, sae/ or tensorboard/). To continue it: "
        f"ckpt_path={output_dir / 'checkpoints' / 'last.ckpt'} (or ckpt_path=last); to replace it: overwrite=true; "
        f"otherwise choose another hydra.run.dir.")


def run_name(output_dir: Path) -> str:
    """The TensorBoard run name: the run directory's name, or for a sweep job its number and overrides."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            overrides = [o for o in hydra_cfg.overrides.task
                         if not any(s in o.split("=")[0] for s in ("path", "shards", "dir", "hydra"))]
            name = f"{hydra_cfg.job.num}" + (f"_{','.join(overrides)}" if overrides else "")
            return name.replace("/", "_")[:120]
    except (ImportError, ValueError):
        pass
    return output_dir.resolve().name


def build_callbacks(cfg: DictConfig, has_backbone: bool) -> list:
    callbacks = []
    for node in (cfg.get("callbacks") or {}).values():
        if node is None:
            continue
        callback = instantiate(node)
        if getattr(callback, "requires_backbone", False) and not has_backbone:
            continue  # e.g. the contrastive loss: there is no model to splice into
        if isinstance(callback, ProgressBar) and not cfg.trainer.get("enable_progress_bar", True):
            continue
        callbacks.append(callback)
    return callbacks


def build_loggers(cfg: DictConfig, output_dir: Path, resume_step: int | None, sae_name: str | None = None) -> list:
    """The configured loggers; with `sae_name` (one SAE of a multi-SAE run) its own TensorBoard run,
    <run>/tensorboard/<run name>/<sae_name>/, and no other logger."""
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if node is None:
            continue
        kwargs = {}
        target = str(node.get("_target_", ""))
        if target.endswith("TensorBoardLogger"):
            if node.get("name") is None:
                kwargs["name"] = run_name(output_dir)
            if sae_name is not None:
                kwargs["name"] = f"{kwargs.get('name') or node.get('name')}/{sae_name}"
            if resume_step is not None:  # hide the points logged after the checkpoint by the interrupted run
                kwargs["purge_step"] = resume_step + 1
        elif sae_name is not None:
            continue
        loggers.append(instantiate(node, **kwargs))
    return loggers


class _QuietOpenClip(logging.Filter):
    """open_clip logs on the root logger: drop its INFO chatter (model config, tokenizer, preprocessing), and
    its "No pretrained weights loaded" warning, which is wrong for local files (our loader loads them after
    open_clip builds the model, and fails loudly if it cannot)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "open_clip" not in record.pathname:
            return True
        return record.levelno >= logging.WARNING and "No pretrained weights loaded" not in record.getMessage()


def quiet_console() -> None:
    """Keep Lightning's start-up chatter (accelerator lines, tips, "max_steps reached") and open_clip's INFO
    lines out of the console; warnings that matter still show."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed", "lightning.pytorch.callbacks.model_summary"):
        logging.getLogger(name).setLevel(logging.WARNING)
    root = logging.getLogger()
    if not any(isinstance(f, _QuietOpenClip) for f in root.filters):
        root.addFilter(_QuietOpenClip())


def train(cfg: DictConfig) -> Path:
    """Train one SAE as `cfg` says (or several on the same stream: `saes:`); returns the run directory."""
    quiet_console()
    validate_train_config(cfg)
    variants = sae_variants(cfg)
    check_lr_schedules_early(cfg, variants)  # before the run directory is touched or any weights are loaded
    output_dir = Path(cfg.paths.output_dir)
    ckpt = resolve_checkpoint(cfg, output_dir)
    resume_step = None
    knob_changes: dict = {}
    if ckpt is not None:
        old_config, resume_step = load_checkpoint_config(ckpt)
        if old_config is not None:
            knob_changes = compare_resume_config(old_config, cfg)
    launched_rank = os.environ.get("LOCAL_RANK", "0") != "0"  # a DDP process started by rank 0's launcher
    if not launched_rank:
        prepare_run_directory(cfg, output_dir, ckpt)
    if cfg.get("backbone") is not None:  # fail on shards and layer before any weights are downloaded
        require_train_shards(cfg.data.train_shards)
        if "name" in cfg.backbone:
            check_layer(cfg.backbone.name, cfg.layer)
    output_dir.mkdir(parents=True, exist_ok=True)
    for path in [] if launched_rank else clean_stale_temporaries(output_dir):
        log.warning("Removed %s, left by an interrupted write.", path)
    if variants is not None:
        for path in [] if launched_rank else clean_stale_temporaries(output_dir / "sae"):
            log.warning("Removed %s, left by an interrupted write.", path)
        return _train_many(cfg, variants, output_dir, ckpt, resume_step, knob_changes)
    resolved_text = OmegaConf.to_yaml(cfg, resolve=True)
    if ckpt is None:
        save_resolved_config(cfg, output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(cfg.matmul_precision)

    backbone, datamodule, d_in = build_data(cfg)
    sae = instantiate(cfg.sae, d_in=d_in, d_sae=cfg.expansion * d_in,
                      metadata=sae_metadata(cfg, backbone, datamodule))
    callbacks = build_callbacks(cfg, backbone is not None)
    plain_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks.append(FinalHParamsCallback(_flatten({k: v for k, v in plain_config.items() if k != "paths"})))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=build_loggers(cfg, output_dir, resume_step))

    activations_per_step = cfg.sae_batch_size * trainer.world_size
    schedule = schedule_steps(cfg.schedule, activations_per_step)
    steps = total_steps(cfg, getattr(datamodule, "tokens_per_image", 1), trainer.world_size)
    check_lr_schedule(schedule, steps, activations_per_step)  # where the config alone could not tell
    module = instantiate(cfg.module, sae=sae, lr_warmup_steps=schedule["lr_warmup"],
                         lr_decay_steps=schedule.get("lr_decay", 0), total_steps=steps,
                         dead_feature_window=schedule["dead_feature_window"],
                         feature_sampling_window=schedule["feature_sampling_window"], _convert_="all")
    module.run_config = plain_config
    for callback in trainer.callbacks:
        if isinstance(callback, SAECheckpoint):
            callback.set_interval(schedule["checkpoint_every"])
        if hasattr(callback, "every_n_steps"):
            callback.every_n_steps = schedule["contrastive_every"]
        if isinstance(callback, ExportSAECallback) and ckpt is not None:
            callback.pending_files[output_dir / RESOLVED_CONFIG] = resolved_text  # with the first new step
    trainer.fit_loop.epoch_loop.max_steps = steps

    source = f"{backbone.name} layer {datamodule.layer} ({datamodule.tokens} tokens)" if backbone else "activations"
    log.info("Training a %d x %d SAE on %s for %d steps of %d activations; outputs in %s", d_in, sae.d_sae, source,
             steps, activations_per_step, output_dir)
    log.info("Schedule in steps (from activations seen): warm-up %d, lr decay over the last %d, dead-feature "
             "window %d, density window %d, checkpoint every %d, contrastive loss every %d.", schedule["lr_warmup"],
             schedule.get("lr_decay", 0), schedule["dead_feature_window"], schedule["feature_sampling_window"],
             schedule["checkpoint_every"], schedule["contrastive_every"])
    if ckpt is not None:
        log.info("Resuming %s from step %d%s", output_dir, resume_step,
                 "".join(f"\n  changed: {k}: {a!r} -> {b!r}" for k, (a, b) in knob_changes.items()))
    _fit(trainer, module, datamodule, ckpt, output_dir)
    if trainer.is_global_zero:
        log.info("Done: %d steps. SAE in %s, checkpoints in %s. Next: python evaluate.py run=%s",
                 trainer.global_step, output_dir / "sae", output_dir / "checkpoints", output_dir)
    return output_dir


def _fit(trainer, module, datamodule, ckpt: Path | None, output_dir: Path) -> None:
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    except SIGTERMException:
        name = stop_signal_name(trainer)
        log.warning("Stopped by %s after step %d. Resume with the same command plus ckpt_path=%s "
                    "(exit code %d).", name, trainer.global_step, output_dir / "checkpoints" / "last.ckpt",
                    SIGNAL_EXIT_CODES[name])
        raise SystemExit(SIGNAL_EXIT_CODES[name]) from None


def _train_many(cfg: DictConfig, variants: dict[str, DictConfig], output_dir: Path, ckpt: Path | None,
                resume_step: int | None, knob_changes: dict) -> Path:
    """Several SAEs on one activation stream (MultiSAETrainingModule): `train` for a config with `saes:`.

    Each SAE is initialised from the same random state a single run of its config would use (so each
    equals that single run), then gets its own module, schedule, TensorBoard run and export folder.
    """
    from sae_lightning.module import MultiSAETrainingModule

    record = record_saes(cfg, variants)
    resolved_text = OmegaConf.to_yaml(OmegaConf.create(record))
    if ckpt is None:
        path = output_dir / RESOLVED_CONFIG
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(resolved_text)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(cfg.matmul_precision)

    backbone, datamodule, d_in = build_data(cfg)
    rng = torch.get_rng_state()
    saes = {}
    for name, variant in variants.items():
        torch.set_rng_state(rng)  # the state a single run of this variant initialises its SAE from
        saes[name] = instantiate(variant.sae, d_in=d_in, d_sae=variant.expansion * d_in,
                                 metadata=sae_metadata(variant, backbone, datamodule))
    callbacks = build_callbacks(cfg, backbone is not None)
    plain = {name: OmegaConf.to_container(v, resolve=True) for name, v in variants.items()}
    callbacks.append(FinalHParamsCallback(
        _flatten({k: v for k, v in record.items() if k != "paths"}),
        per_sae={name: _flatten({k: v for k, v in p.items() if k != "paths"}) for name, p in plain.items()}))
    per_sae_loggers = {name: build_loggers(cfg, output_dir, resume_step, sae_name=name) for name in variants}
    run_loggers = [lg for lg in build_loggers(cfg, output_dir, resume_step)
                   if not type(lg).__name__.endswith("TensorBoardLogger")]  # e.g. a CSV logger: <name>/ metrics
    trainer = instantiate(cfg.trainer, callbacks=callbacks,
                          logger=[lg for group in per_sae_loggers.values() for lg in group] + run_loggers)

    activations_per_step = cfg.sae_batch_size * trainer.world_size
    members, schedules = {}, {}
    steps = total_steps(cfg, getattr(datamodule, "tokens_per_image", 1), trainer.world_size)
    for name, variant in variants.items():
        schedules[name] = schedule = schedule_steps(variant.schedule, activations_per_step)
        check_lr_schedule(schedule, steps, activations_per_step, f"saes.{name}: ")
        members[name] = instantiate(variant.module, sae=saes[name], lr_warmup_steps=schedule["lr_warmup"],
                                    lr_decay_steps=schedule.get("lr_decay", 0), total_steps=steps,
                                    dead_feature_window=schedule["dead_feature_window"],
                                    feature_sampling_window=schedule["feature_sampling_window"], _convert_="all")
        members[name].sae_loggers = per_sae_loggers[name]
    module = MultiSAETrainingModule(
        members, resolved_configs={name: OmegaConf.to_yaml(OmegaConf.create(p)) for name, p in plain.items()})
    module.run_config = record
    schedule = schedule_steps(cfg.schedule, activations_per_step)  # run-wide: checkpoints, contrastive loss
    for callback in trainer.callbacks:
        if isinstance(callback, SAECheckpoint):
            callback.set_interval(schedule["checkpoint_every"])
        if hasattr(callback, "every_n_steps"):
            callback.every_n_steps = schedule["contrastive_every"]
        if isinstance(callback, ExportSAECallback):
            module.export_directory = callback.directory
            if ckpt is not None:
                callback.pending_files[output_dir / RESOLVED_CONFIG] = resolved_text
    trainer.fit_loop.epoch_loop.max_steps = steps

    source = f"{backbone.name} layer {datamodule.layer} ({datamodule.tokens} tokens)" if backbone else "activations"
    log.info("Training %d SAEs on %s for %d steps of %d activations (every SAE sees the same batches); "
             "outputs in %s", len(variants), source, steps, activations_per_step, output_dir)
    for name, variant in variants.items():
        s = schedules[name]
        log.info("  %s: %s %d x %d, lr %g; warm-up %d, decay %d, dead-feature window %d, density window %d steps",
                 name, str(variant.sae._target_).rsplit(".", 1)[-1], d_in, saes[name].d_sae, variant.lr,
                 s["lr_warmup"], s.get("lr_decay", 0), s["dead_feature_window"], s["feature_sampling_window"])
    log.info("Checkpoint every %d steps, contrastive loss every %d.", schedule["checkpoint_every"],
             schedule["contrastive_every"])
    if ckpt is not None:
        log.info("Resuming %s from step %d%s", output_dir, resume_step,
                 "".join(f"\n  changed: {k}: {a!r} -> {b!r}" for k, (a, b) in knob_changes.items()))
    _fit(trainer, module, datamodule, ckpt, output_dir)
    if trainer.is_global_zero:
        stopped = module.stopped_info
        log.info("Done: %d steps. SAEs in %s/<name>/ (%s)%s, checkpoints in %s. Next: python evaluate.py run=%s",
                 trainer.global_step, output_dir / "sae", ", ".join(variants),
                 f"; stopped early: {', '.join(stopped)}" if stopped else "", output_dir / "checkpoints", output_dir)
    return output_dir
