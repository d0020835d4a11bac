"""`visualise.py`'s work: check the request, load the run's backbone and SAE, optimise, write the outputs.

Outputs (docs/visualisation.md): <out>/visualisations/feature_<i>.png and summary.json, out = <run>/eval.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import statistics
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import sae_lightning
from sae_lightning.data.datamodule import AUTOCAST_DTYPES
from sae_lightning.evaluation.inputs import load_run_config, resolve_device
from sae_lightning.sae import SparseAutoencoder
from sae_lightning.visualisation.figure import (
    NaturalTopImages,
    close_figure,
    feature_figure,
    natural_top_images,
    read_feature_table,
    save_figure_atomic,
    save_image_strip,
)
from sae_lightning.visualisation.objective import REDUCTIONS
from sae_lightning.visualisation.optimise import VisualisationResult, visualise_features
from sae_lightning.visualisation.transforms import TransformConfig

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
SUBDIR = "visualisations"


def _check_request(cfg: DictConfig) -> None:
    """Everything that can be checked from the config alone, before anything is loaded."""
    if cfg.objective not in REDUCTIONS:
        raise ValueError(f"objective={cfg.objective!r}: use one of {list(REDUCTIONS)} (over the hooked tokens)")
    if int(cfg.n_starts) < 1 or int(cfg.steps) < 1 or int(cfg.batch_features) < 1:
        raise ValueError(f"n_starts, steps and batch_features must be >= 1 (got {cfg.n_starts}, {cfg.steps}, "
                         f"{cfg.batch_features})")
    if float(cfg.lr) <= 0 or float(cfg.diversity) < 0:
        raise ValueError(f"lr must be > 0 and diversity >= 0 (got lr={cfg.lr}, diversity={cfg.diversity})")
    if cfg.autocast is not None and str(cfg.autocast) not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast={cfg.autocast!r}: use one of {list(AUTOCAST_DTYPES)} or null (the run's)")
    named = requested_features(cfg.features)
    if not named and int(cfg.random_features) <= 0:
        raise ValueError("nothing to visualise: name features, e.g. python visualise.py run=<run> "
                         "features=[3,17], and/or draw some at random with random_features=16")
    TransformConfig(**_transform_kwargs(cfg))


def requested_features(spec: Any) -> list[int]:
    """`features=3` or `features=[3,17]` -> [3, 17]; anything but integers is an error."""
    items = list(spec) if OmegaConf.is_list(spec) or isinstance(spec, (list, tuple)) else [spec]
    items = [] if items == [None] else items
    if any(not isinstance(f, int) or isinstance(f, bool) for f in items):
        raise ValueError(f"features={spec}: feature ids must be integers, e.g. features=[3,17]")
    return [int(f) for f in items]


def _transform_kwargs(cfg: DictConfig) -> dict[str, Any]:
    t = cfg.transforms
    return {"pad": float(t.pad), "jitter": float(t.jitter), "scale": (float(t.scale[0]), float(t.scale[1])),
            "rotate": float(t.rotate)}


def choose_features(named: list[int], n_random: int, d_sae: int, live: torch.Tensor | None, seed: int) -> list[int]:
    """`named`, then `n_random` more drawn (seeded) from the live features (all, without an evaluation)."""
    chosen = list(dict.fromkeys(int(f) for f in named))
    if n_random <= 0:
        return chosen
    pool = torch.nonzero(live).squeeze(1) if live is not None else torch.arange(d_sae)
    pool = pool[~torch.isin(pool, torch.tensor(chosen, dtype=torch.long))]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    return chosen + pool[order[:n_random]].tolist()


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def _no_images_note(natural: NaturalTopImages, feature: int) -> str:
    if natural.source is None:
        return "no evaluation table:\nrun evaluate.py for\nthe top natural images"
    if natural.top_activation.get(feature) is None:
        return "the feature never fired\nin the evaluation"
    return "top images not found\nin the evaluation's shards"


def summarise(results: list[VisualisationResult], natural_top: dict[int, float | None]) -> dict[str, Any]:
    """Per feature: activations per start, the best, the top natural activation and their ratio; and the
    ratio's statistics over the features that have a (positive) natural top activation."""
    per_feature, ratios = {}, []
    for result in results:
        for i, f in enumerate(result.features):
            acts = result.activations[i]
            best = acts.max().item()
            top = natural_top.get(f)
            ratio = best / top if top is not None and top > 0 else None
            if ratio is not None:
                ratios.append(ratio)
            per_feature[str(f)] = {
                "png": f"feature_{f}.png",
                "images_png": f"feature_{f}_images.png",
                "activations": acts.tolist(),
                "best_activation": best,
                "objective": result.objective[i].tolist(),
                "objective_first_step": result.history[0, i].tolist(),
                "top_natural_activation": top,
                "ratio": ratio,
            }
    return {
        "features": per_feature,
        "n_features": len(per_feature),
        "n_with_natural": len(ratios),
        "ratio_mean": statistics.fmean(ratios) if ratios else None,
        "ratio_median": statistics.median(ratios) if ratios else None,
        "ratio_min": min(ratios) if ratios else None,
        "ratio_max": max(ratios) if ratios else None,
        "fraction_above_1": sum(r > 1 for r in ratios) / len(ratios) if ratios else None,
    }


def visualise_run(cfg: DictConfig) -> dict[str, Any]:
    """Everything `python visualise.py run=... features=[...]` does; returns the summary written."""
    if not cfg.run:
        raise ValueError("visualise.py needs the training run directory: python visualise.py run=<run dir> "
                         "features=[3,17]")
    run, run_cfg = load_run_config(cfg.run)
    _check_request(cfg)
    device = resolve_device(str(cfg.device))
    out = (Path(cfg.out_dir).expanduser() if cfg.get("out_dir") else run / "eval") / SUBDIR
    sae = SparseAutoencoder.load(run / "sae").eval().requires_grad_(False)
    named = requested_features(cfg.features)
    bad = [f for f in named if not 0 <= f < sae.d_sae]
    if bad:
        raise ValueError(f"features {bad} are out of range: the SAE in {run / 'sae'} has features 0..{sae.d_sae - 1}")
    eval_dir = out.parent
    table = read_feature_table(eval_dir, sae.d_sae)
    live = torch.isfinite(table[0]["top_values"][:, 0]) if table is not None else None
    features = choose_features(named, int(cfg.random_features), sae.d_sae, live, int(cfg.seed))
    autocast_name = str(cfg.autocast if cfg.autocast is not None else OmegaConf.select(run_cfg, "data.autocast",
                                                                                       default="32"))
    if autocast_name not in AUTOCAST_DTYPES:
        raise ValueError(f"the run's data.autocast={autocast_name!r} is not one of {list(AUTOCAST_DTYPES)}")
    out.mkdir(parents=True, exist_ok=True)

    backbone = hydra.utils.instantiate(run_cfg.backbone, device=str(device))
    if backbone.width != sae.d_in:
        raise ValueError(f"the SAE's d_in {sae.d_in} != the backbone's width {backbone.width}")
    layer = backbone.resolve_layer(int(run_cfg.layer))
    tokens = str(run_cfg.tokens)
    if sae.metadata.get("layer") not in (None, layer) or sae.metadata.get("tokens") not in (None, tokens):
        log.warning("the SAE's metadata (layer %s, tokens %s) disagrees with the run config (layer %s, tokens %s)",
                    sae.metadata.get("layer"), sae.metadata.get("tokens"), layer, tokens)
    sae = sae.to(device)
    natural = natural_top_images(table, features, eval_dir)
    options = {
        "n_starts": int(cfg.n_starts), "steps": int(cfg.steps), "lr": float(cfg.lr), "objective": str(cfg.objective),
        "diversity": float(cfg.diversity), "image_size": int(cfg.image_size) if cfg.image_size else None,
        "decay_power": float(cfg.decay_power), "init_std": float(cfg.init_std), "seed": int(cfg.seed),
    }
    transforms = TransformConfig(**_transform_kwargs(cfg))
    log.info("visualising %d feature(s) of %s (layer %d, tokens=%s) on %s, autocast %s: %d starts x %d steps",
             len(features), run, layer, tokens, device, autocast_name, options["n_starts"], options["steps"])
    results = []
    batch = int(cfg.batch_features)
    for start in range(0, len(features), batch):
        chunk = features[start : start + batch]
        result = visualise_features(backbone, sae, chunk, layer=layer, tokens=tokens, transforms=transforms,
                                    autocast=AUTOCAST_DTYPES[autocast_name], **options)
        results.append(result)
        for i, f in enumerate(chunk):
            fig = feature_figure(f, result.images[i], result.activations[i], natural.thumbnails.get(f, []),
                                 natural.captions.get(f, []), natural.top_activation.get(f),
                                 f"{backbone.name} layer {layer}, tokens={tokens}, objective={options['objective']}, "
                                 f"{options['steps']} steps",
                                 note=_no_images_note(natural, f))
            save_figure_atomic(fig, out / f"feature_{f}.png")
            save_image_strip(result.images[i], out / f"feature_{f}_images.png")
            close_figure(fig)
        log.info("features %s: activations %s (%.1f s)", chunk,
                 [round(a, 3) for a in result.activations.amax(1).tolist()], result.seconds)

    seconds = sum(r.seconds for r in results)
    summary = {
        "format_version": FORMAT_VERSION,
        **summarise(results, natural.top_activation),
        "run_dir": str(run),
        "sae_path": str(run / "sae"),
        "top_images_from": natural.source,
        "backbone": backbone.name,
        "pretrained": backbone.pretrained,
        "layer": layer,
        "tokens": tokens,
        "image_size": options["image_size"] or backbone.image_size,
        "config": {**options, "batch_features": batch, "transforms": {**_transform_kwargs(cfg)}},
        "device": str(device),
        "autocast": autocast_name,
        "seconds": seconds,
        "seconds_per_feature": seconds / max(len(features), 1),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "sae_lightning_version": sae_lightning.__version__,
    }
    summary["config"]["transforms"]["scale"] = list(summary["config"]["transforms"]["scale"])
    if summary["ratio_mean"] is not None:
        log.info("activation ratio (visualisation / top natural) over %d features: mean %.3f, median %.3f, "
                 "min %.3f; above 1 for %.0f%%", summary["n_with_natural"], summary["ratio_mean"],
                 summary["ratio_median"], summary["ratio_min"], 100 * summary["fraction_above_1"])
    _write_json(out / "summary.json", summary)
    log.info("wrote %d PNG(s) and summary.json to %s", len(features), out)
    return summary
