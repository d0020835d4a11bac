"""Build everything from a composed config and train: what `python train.py` runs."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sae_lightning.backbone import check_layer
from sae_lightning.config import save_resolved_config
from sae_lightning.data.datamodule import require_train_shards

log = logging.getLogger(__name__)

# Our checkpoints hold the state after each step on purpose; Lightning warns about it for manual optimisation.
warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")


def sae_metadata(cfg: DictConfig, backbone, datamodule) -> dict:
    """What an exported SAE must know about where its inputs came from (cfg.json `metadata`)."""
    if backbone is None:  # stored or planted activations: no model, layer or image size
        return {"dataset": str(OmegaConf.to_container(cfg.data, resolve=True).get("activations")),
                "expansion": cfg.expansion, "l1_coefficient": cfg.l1_coefficient, "lr": cfg.lr}
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


def build_data(cfg: DictConfig):
    """(backbone, datamodule, d_in): image shards through a backbone, or stored activations (backbone null)."""
    if cfg.get("backbone") is None:
        datamodule = instantiate(cfg.data)
        return None, datamodule, datamodule.d_in
    backbone = instantiate(cfg.backbone)
    return backbone, instantiate(cfg.data, backbone=backbone), backbone.width


def train(cfg: DictConfig) -> Path:
    """Train one SAE as `cfg` says; returns the run directory."""
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("backbone") is not None:  # fail on shards and layer before any weights are downloaded
        require_train_shards(cfg.data.train_shards)
        if "name" in cfg.backbone:
            check_layer(cfg.backbone.name, cfg.layer)
    save_resolved_config(cfg, output_dir)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.matmul_precision)

    backbone, datamodule, d_in = build_data(cfg)
    sae = instantiate(cfg.sae, d_in=d_in, d_sae=cfg.expansion * d_in,
                      metadata=sae_metadata(cfg, backbone, datamodule))
    module = instantiate(cfg.module, sae=sae, _convert_="all")  # plain types in checkpoints
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    steps = total_steps(cfg, getattr(datamodule, "tokens_per_image", 1), trainer.world_size)
    trainer.fit_loop.epoch_loop.max_steps = steps
    source = f"{backbone.name} layer {datamodule.layer} ({datamodule.tokens} tokens)" if backbone else "activations"
    log.info("Training a %d x %d SAE on %s for %d steps; outputs in %s", d_in, sae.d_sae, source, steps, output_dir)
    log.debug("Config:\n%s", OmegaConf.to_yaml(cfg))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    return output_dir
