"""`evaluate.py`'s work, in four steps, each in its own module:

1. `inputs.prepare_inputs`: check the config, the run, the output location, the shards, the SAE (finite
   weights) and the backbone; nothing is written.
2. `stream.stream_pass`: one pass over the held-out shards (feature statistics, reconstruction,
   contrastive loss / zero-shot / KL, and any extra streaming consumer from `analyses.make_consumers`).
3. `analyses.analyse`: every function of `analyses.ANALYSES` adds metrics, per-feature tensors, figures.
4. `outputs.write_evaluation`: every writer of `outputs.WRITERS` into a temporary directory, swapped in whole.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from sae_lightning.data.shards import image_loader
from sae_lightning.evaluation.analyses import analyse, make_consumers
from sae_lightning.evaluation.inputs import EvalInputs, image_resolution_warning, prepare_inputs, select_saes
from sae_lightning.evaluation.outputs import write_evaluation
from sae_lightning.evaluation.stream import count_shard_images, stream_pass

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
        results = {}
        for name, inputs in prepared.items():
            log.info("SAE %s (%d of %d) -> %s", name, len(results) + 1, len(prepared), inputs.out)
            results[name] = _evaluate(cfg, inputs)
        return results
    finally:
        root.removeFilter(quiet)


def _evaluate(cfg: DictConfig, inputs: EvalInputs) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    available = count_shard_images(inputs.urls, int(cfg.n_images))
    expected = min(int(cfg.n_images), available) if available is not None else int(cfg.n_images)
    warning = image_resolution_warning(expected)
    if warning:
        inputs.warn(warning)  # before the pass, so a long run can be stopped early
    log.info("evaluating %s (layer %d, %s tokens) on %s images from %d shard(s) on %s; backbone %s (%s); "
             "contrastive loss in batches of %d images", inputs.run, inputs.layer, inputs.tokens,
             f"{expected:,}" if available is not None else f"up to {expected:,}", len(inputs.urls),
             inputs.device, inputs.backbone.name, inputs.backbone.pretrained, cfg.contrastive_batch_size)
    # uint8 pixels from the workers (a quarter of fp32's bytes); the backbone normalises them on the device
    loader = image_loader(inputs.urls, inputs.backbone.pixel_transform, cfg.batch_size, num_workers=cfg.num_workers,
                          pin_memory=inputs.device.type == "cuda", shuffle=cfg.shuffle, shardshuffle=True,
                          seed=cfg.seed, partial=True)
    stream = stream_pass(inputs.backbone, inputs.sae, loader, layer=inputs.layer, tokens=inputs.tokens,
                         n_images=int(cfg.n_images), k=int(cfg.top_k), classnames=inputs.classnames,
                         contrastive_batch_size=int(cfg.contrastive_batch_size), max_tokens=int(cfg.max_tokens),
                         device=inputs.device, total=available, consumers=make_consumers(inputs))
    ev = analyse(inputs, stream)
    write_evaluation(ev, inputs.out)
    log.info("wrote %s (metrics.json, features.safetensors/json, %d plots, report.md%s)", inputs.out,
             len(ev.figures), ", tensorboard/" if cfg.tensorboard else "")
    return ev.metrics
