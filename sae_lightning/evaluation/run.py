"""`evaluate.py`'s work, in four steps, each in its own module:

1. `inputs.prepare_inputs`: check the config, the run, the output location, the shards, the SAE (finite
   weights) and the backbone; nothing is written.
2. `stream.stream_pass`: one pass over the held-out shards (feature statistics, reconstruction,
   contrastive loss / zero-shot / KL, and any extra streaming consumer from `analyses.make_consumers`).
3. `analyses.analyse`: every function of `analyses.ANALYSES` adds metrics, per-feature tensors, figures.
4. `outputs.write_evaluation`: every writer of `outputs.WRITERS` into a temporary directory, swapped in whole.

A multi-SAE run (`saes:`) checks every SAE first, then streams once for all of them (`stream.stream_pass_many`: one
backbone forward per batch) and runs steps 3-4 per SAE into <out>/<name>/ (docs/format-eval.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from sae_lightning.data.shards import image_loader
from sae_lightning.evaluation.analyses import analyse, make_consumers
from sae_lightning.evaluation.inputs import EvalInputs, image_resolution_warning, prepare_inputs, select_saes
from sae_lightning.evaluation.outputs import write_evaluation
from sae_lightning.evaluation.stream import StreamResult, count_shard_images, stream_pass, stream_pass_many

log = logging.getLogger(__name__)


class _QuietOpenClip(logging.Filter):
    """Drops open_clip's INFO chatter (model config, tokenizer, preprocessing dicts); keeps its warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "open_clip" not in record.pathname


def evaluate_run(cfg: DictConfig) -> dict[str, Any]:
    """Everything `python evaluate.py run=...` does; returns the metrics written to metrics.json.

    A multi-SAE run (`saes:`): every SAE (or `sae_name`) into <out>/<name>/; returns {name: metrics}."""
    quiet = _QuietOpenClip()
    root = logging.getLogger()
    root.addFilter(quiet)  # open_clip logs on the root logger
    try:
        names = select_saes(cfg)
        if names == [None]:
            return _evaluate(cfg, prepare_inputs(cfg))
        # every SAE checked (loadable, finite, matching the backbone) before the first is evaluated
        backbone, prepared = None, {}
        for name in names:
            prepared[name] = prepare_inputs(cfg, sae_name=name, backbone=backbone)
            backbone = prepared[name].backbone
        results = _evaluate_many(cfg, prepared)
        write_comparison(next(iter(prepared.values())).out.parent)
        return results
    finally:
        root.removeFilter(quiet)


def _announce(cfg: DictConfig, inputs: EvalInputs, what: str) -> int | None:
    """Log what the pass will read and warn (before it) when too few images resolve ultra-rare features."""
    available = count_shard_images(inputs.urls, int(cfg.n_images))
    expected = min(int(cfg.n_images), available) if available is not None else int(cfg.n_images)
    warning = image_resolution_warning(expected)
    if warning:
        inputs.warn(warning)  # before the pass, so a long run can be stopped early
    log.info("evaluating %s (layer %d, %s tokens) on %s images from %d shard(s) on %s; backbone %s (%s); "
             "contrastive loss in batches of %d images", what, inputs.layer, inputs.tokens,
             f"{expected:,}" if available is not None else f"up to {expected:,}", len(inputs.urls),
             inputs.device, inputs.backbone.name, inputs.backbone.pretrained, cfg.contrastive_batch_size)
    return available


def _loader(cfg: DictConfig, inputs: EvalInputs):
    # uint8 pixels from the workers (a quarter of fp32's bytes); the backbone normalises them on the device
    return image_loader(inputs.urls, inputs.backbone.pixel_transform, cfg.batch_size, num_workers=cfg.num_workers,
                        pin_memory=inputs.device.type == "cuda", shuffle=cfg.shuffle, shardshuffle=True,
                        seed=cfg.seed, partial=True)


def _finish(cfg: DictConfig, inputs: EvalInputs, stream: StreamResult) -> dict[str, Any]:
    ev = analyse(inputs, stream)
    write_evaluation(ev, inputs.out)
    log.info("wrote %s (metrics.json, features.safetensors/json, %d plots, report.md%s)", inputs.out,
             len(ev.figures), ", tensorboard/" if cfg.tensorboard else "")
    return ev.metrics


def _evaluate(cfg: DictConfig, inputs: EvalInputs) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    available = _announce(cfg, inputs, str(inputs.run))
    stream = stream_pass(inputs.backbone, inputs.sae, _loader(cfg, inputs), layer=inputs.layer, tokens=inputs.tokens,
                         n_images=int(cfg.n_images), k=int(cfg.top_k), classnames=inputs.classnames,
                         contrastive_batch_size=int(cfg.contrastive_batch_size), max_tokens=int(cfg.max_tokens),
                         device=inputs.device, total=available, consumers=make_consumers(inputs))
    return _finish(cfg, inputs, stream)


def _evaluate_many(cfg: DictConfig, prepared: dict[str, EvalInputs]) -> dict[str, dict[str, Any]]:
    """The SAEs of a multi-SAE run in one pass over the held-out images (one backbone forward per batch);
    then each SAE's analyses and outputs, exactly as `_evaluate` would give them one by one."""
    torch.manual_seed(cfg.seed)
    first = next(iter(prepared.values()))
    available = _announce(cfg, first, f"{len(prepared)} SAEs of {first.run} ({', '.join(prepared)})")
    for inputs in list(prepared.values())[1:]:
        inputs.warnings.extend(w for w in first.warnings if w not in inputs.warnings)
    streams = stream_pass_many(first.backbone, {name: i.sae for name, i in prepared.items()}, _loader(cfg, first),
                               layer=first.layer, tokens=first.tokens, n_images=int(cfg.n_images), k=int(cfg.top_k),
                               classnames=first.classnames, contrastive_batch_size=int(cfg.contrastive_batch_size),
                               max_tokens=int(cfg.max_tokens), device=first.device, total=available,
                               consumers={name: make_consumers(i) for name, i in prepared.items()})
    results = {}
    for name, inputs in prepared.items():
        torch.manual_seed(cfg.seed)  # each SAE's analyses draw what they would in an evaluation of their own
        log.info("SAE %s (%d of %d) -> %s", name, len(results) + 1, len(prepared), inputs.out)
        results[name] = _finish(cfg, inputs, streams[name])
    return results


COMPARISON_METRICS = ("n_features", "l0", "explained_variance", "explained_variance_uncentred", "mse_normalised",
                      "dead_features", "ultra_rare_features", "dense_features", "contrastive_loss_score",
                      "zero_shot_kl_sae", "zero_shot_accuracy_sae", "interpretability_sae_monosemantic")


def write_comparison(out_root: Path) -> Path:
    """<out>/comparison.md and comparison.json: the headline metrics of every SAE evaluated under <out_root>
    (each <out_root>/<name>/metrics.json there, also those of earlier `sae_name=` evaluations), side by side."""
    rows = {}
    for metrics_path in sorted(out_root.glob("*/metrics.json")):
        metrics = json.loads(metrics_path.read_text())
        rows[metrics_path.parent.name] = {k: metrics.get(k) for k in ("sae_path", "n_images", *COMPARISON_METRICS)}
    def cell(value: Any) -> str:
        if value is None:
            return "n/a"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = [f"# {len(rows)} SAEs of one run, side by side", "",
             "Each SAE's full evaluation is in its own folder (report.md, metrics.json); n/a: undefined or not "
             "measured.", "", "| SAE | images | " + " | ".join(COMPARISON_METRICS) + " |",
             "|---|---|" + "---|" * len(COMPARISON_METRICS)]
    lines += [f"| {name} | {cell(row['n_images'])} | " + " | ".join(cell(row[k]) for k in COMPARISON_METRICS) + " |"
              for name, row in rows.items()]
    for name, text in (("comparison.json", json.dumps({"format_version": 1, "saes": rows}, indent=2) + "\n"),
                       ("comparison.md", "\n".join(lines) + "\n")):
        tmp = out_root / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out_root / name)
    log.info("wrote %s (the SAEs side by side)", out_root / "comparison.md")
    return out_root / "comparison.md"
