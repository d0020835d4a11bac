"""Shared fixtures: the real Hydra config, composed and shrunk, and one tiny demo run for the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from sae_lightning.config import register_resolvers
from sae_lightning.data.synthetic import ensure_demo_shards

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

register_resolvers()


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The project's real config, composed the way train.py composes it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def tiny_shards(data_dir) -> tuple[str, str]:
    """Small demo shards (32 px) for every end-to-end test of the session."""
    return ensure_demo_shards(data_dir / "demo", n_train=512, n_val=128, image_size=32)


def demo_overrides(output_dir: Path, data_dir: Path, shards: tuple[str, str], extra: list[str] = ()) -> list[str]:
    """`experiment=demo`, shrunk to seconds: fewer images, smaller batches, one worker."""
    train, val = shards
    return [
        "experiment=demo",
        "backbone=tiny",  # the untrained tiny ViT: the demo's trained tiny CLIP (backbone=tiny_clip) takes minutes
        f"paths.root_dir={ROOT}",
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={output_dir}",
        f"data.train_shards='{train}'",  # quoted: Hydra reads unquoted braces as a dict
        f"data.val_shards='{val}'",
        "sae_batch_size=64",
        "training_images=1920",  # 30 steps
        "expansion=4",
        "data.buffer_size=256",
        "data.num_workers=1",
        "data.shuffle=64",
        "schedule.lr_warmup=320",  # in activations: 5 steps of 64
        "schedule.dead_feature_window=256",  # 4 steps
        "schedule.feature_sampling_window=640",  # 10 steps
        "schedule.checkpoint_every=640",
        "schedule.contrastive_every=640",
        "trainer.log_every_n_steps=5",
        "trainer.enable_progress_bar=false",
        "callbacks.contrastive.n_images=64",
        "callbacks.contrastive.batch_size=32",
        *extra,
    ]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, data_dir, tiny_shards) -> Path:
    """One shrunk demo training run (30 steps); returns its run directory."""
    from sae_lightning.training import train

    run_dir = tmp_path_factory.mktemp("demo_run")
    cfg = compose_config(demo_overrides(run_dir, data_dir, tiny_shards))
    os.environ.pop("SAE_TRAIN_SHARDS", None)
    return train(cfg)
