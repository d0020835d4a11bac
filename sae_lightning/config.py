"""Hydra/OmegaConf glue: custom resolvers and the resolved copy of a run's config."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

RESOLVED_CONFIG = ".hydra/resolved.yaml"


def _demo_shards(root: str, split: str, n_train: int, n_val: int, image_size: int = 64) -> str:
    """`${demo_shards:root,split,n_train,n_val,size}`: generate the demo shards on first use, return a pattern."""
    from sae_lightning.data.synthetic import ensure_demo_shards

    train, val = ensure_demo_shards(root, int(n_train), int(n_val), image_size=int(image_size))
    return {"train": train, "val": val}[split]


def _tiny_clip(path: str) -> str:
    """`${tiny_clip:path}`: train the demo's tiny CLIP into `path` on first use (cached by config hash)."""
    from sae_lightning.world.train_clip import ensure_tiny_clip

    return ensure_tiny_clip(path)


def register_resolvers() -> None:
    """Register this project's resolvers once (train.py, evaluate.py and tests call it)."""
    if not OmegaConf.has_resolver("demo_shards"):
        OmegaConf.register_new_resolver("demo_shards", _demo_shards, use_cache=True)
    if not OmegaConf.has_resolver("tiny_clip"):
        OmegaConf.register_new_resolver("tiny_clip", _tiny_clip, use_cache=True)


def save_resolved_config(cfg: DictConfig, output_dir: str | Path) -> Path:
    """Write the fully resolved config next to Hydra's, so evaluation can read concrete paths later."""
    path = Path(output_dir) / RESOLVED_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path
