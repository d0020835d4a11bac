"""Train the tiny CLIP on scene captions once, cache it as a local checkpoint, and reuse it while its config matches.

`ensure_tiny_clip(path)` is what the demo calls (through the `${tiny_clip:...}` resolver): it returns `path`
after checking that `path.json` (written last, next to the checkpoint) records the same config hash, and
trains otherwise. The checkpoint is a plain open_clip state dict, loaded like real weights with
`load_backbone(TINY_CLIP_NAME, pretrained=path)`. Format: docs/format-scenes.md.

    python -m sae_lightning.world.train_clip --out data/demo/tiny-clip.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import open_clip
import torch
from torch.utils.data import DataLoader

from sae_lightning.data.synthetic import _exclusive, _split_rng, _write_text
from sae_lightning.world.clip_model import (
    CaptionedScenes,
    GroupBatchSampler,
    TinyClipModule,
    render_hard_negative_scenes,
    render_scenes,
)
from sae_lightning.world.scenes import SCENE_VERSION
from sae_lightning.world.zeroshot import zero_shot_accuracies

log = logging.getLogger(__name__)

TINY_CLIP_NAME = "sae-tiny-clip"
CHECKPOINT_VERSION = 1
_MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "model_configs"
open_clip.add_model_config(_MODEL_CONFIG_DIR)


@dataclasses.dataclass(frozen=True)
class TinyClipConfig:
    """Everything that decides the trained weights; its hash names the cached checkpoint's identity."""

    model_name: str = TINY_CLIP_NAME
    image_size: int = 64
    n_train: int = 12288
    n_captions: int = 3
    group_size: int = 1  # >1: hard-negative groups (a base scene, variants changing shape, count, effect, colour)
    easy_fraction: float = 0.0  # share of base scenes simplified to one large object without effect
    loss: str = "clip"  # open_clip's ClipLoss, or "siglip" (SigLipLoss; the model config needs init_logit_bias)
    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    seed: int = 0
    n_eval: int = 1000

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model_config"] = open_clip.get_model_config(self.model_name)
        out["scene_version"] = SCENE_VERSION
        # settings at their "off" value add nothing: the same data and training as before the fields existed
        for name, off in (("group_size", 1), ("easy_fraction", 0.0), ("loss", "clip")):
            if out[name] == off:
                del out[name]
        return out

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]


def metadata_path(checkpoint: str | Path) -> Path:
    """`<checkpoint>.json`: config hash, config, zero-shot accuracies and training time."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".json")


def read_metadata(checkpoint: str | Path) -> dict | None:
    try:
        return json.loads(metadata_path(checkpoint).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_cached(checkpoint: str | Path, config: TinyClipConfig) -> bool:
    meta = read_metadata(checkpoint)
    return (Path(checkpoint).is_file() and meta is not None and meta.get("version") == CHECKPOINT_VERSION
            and meta.get("config_hash") == config.digest())


def train_tiny_clip(config: TinyClipConfig, log_every_n_steps: int = 50, accelerator: str = "cpu",
                    callbacks: list | None = None, deterministic: bool | str = True) -> TinyClipModule:
    """Render `n_train` scenes, train for `steps` with ClipLoss through Lightning; return the module.

    `accelerator`, `callbacks` and `deterministic` go to the Lightning Trainer (not part of the config: the
    demo trains on CPU, deterministically).
    """
    L.seed_everything(config.seed, workers=True, verbose=False)
    started = time.perf_counter()
    images, records = render_hard_negative_scenes(_split_rng(config.seed, "clip-train"), config.n_train,
                                                  config.image_size, config.group_size, config.easy_fraction)
    tokenizer = open_clip.get_tokenizer(config.model_name)
    dataset = CaptionedScenes(images, records, tokenizer, config.n_captions, seed=config.seed)
    log.info("rendered %d training scenes in %.0f s", len(dataset), time.perf_counter() - started)
    generator = torch.Generator().manual_seed(config.seed)
    if config.group_size == 1:
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True, num_workers=0,
                            generator=generator)
    else:
        sampler = GroupBatchSampler(len(dataset), config.group_size, config.batch_size, generator)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=0)
    module = TinyClipModule(config.model_name, lr=config.lr, weight_decay=config.weight_decay,
                            warmup_steps=config.warmup_steps, max_steps=config.steps,
                            log_every_n_steps=log_every_n_steps, loss=config.loss)
    trainer = L.Trainer(accelerator=accelerator, devices=1, callbacks=callbacks, max_steps=config.steps, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=log_every_n_steps, deterministic=deterministic)
    trainer.fit(module, loader)
    return module


def save_checkpoint(module: TinyClipModule, path: str | Path) -> Path:
    """Write the open_clip state dict via a temporary file and rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(module.model.state_dict(), tmp)
    os.replace(tmp, path)
    return path


def evaluate_checkpoint(path: str | Path, config: TinyClipConfig) -> dict[str, dict[str, float]]:
    """Zero-shot accuracies of the saved checkpoint, loaded through the backbone loader, on held-out scenes."""
    from sae_lightning.backbone import load_backbone

    backbone = load_backbone(config.model_name, pretrained=str(path))
    images, records = render_scenes(_split_rng(config.seed, "clip-heldout"), config.n_eval, config.image_size)
    return zero_shot_accuracies(backbone, images, records)


def ensure_tiny_clip(path: str | Path, config: TinyClipConfig | None = None) -> str:
    """Return `path` holding the tiny CLIP trained with `config`: reuse it if its hash matches, else train.

    A lock keeps parallel jobs from training it twice; the metadata file is written last, so an
    interrupted run is retrained.
    """
    config = config or TinyClipConfig()
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path.with_name(f".{path.name}.lock")):
        if is_cached(path, config):
            log.info("using the cached tiny CLIP %s (config %s)", path, config.digest())
            return str(path)
        log.info("training the tiny CLIP (config %s) into %s; a few minutes on CPU, once", config.digest(), path)
        metadata_path(path).unlink(missing_ok=True)
        started = time.perf_counter()
        module = train_tiny_clip(config)
        train_seconds = time.perf_counter() - started
        save_checkpoint(module, path)
        accuracies = evaluate_checkpoint(path, config)
        log.info("tiny CLIP zero-shot accuracy on %d held-out scenes: %s", config.n_eval,
                 ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in accuracies.items()))
        meta = {"version": CHECKPOINT_VERSION, "config_hash": config.digest(), "config": config.as_dict(),
                "train_seconds": round(train_seconds, 1), "torch_threads": torch.get_num_threads(),
                "zero_shot": accuracies}
        _write_text(metadata_path(path), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return str(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train (or reuse) the tiny CLIP on scene captions.")
    parser.add_argument("--out", default="data/demo/tiny-clip.pt", help="checkpoint path")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 is faster on a CPU that other jobs share; not part of the config)")
    defaults = TinyClipConfig()
    for field in dataclasses.fields(TinyClipConfig):
        if field.name != "model_name":
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)),
                                default=getattr(defaults, field.name))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = TinyClipConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TinyClipConfig)
                               if f.name != "model_name"})
    path = ensure_tiny_clip(args.out, config)
    print(json.dumps(read_metadata(path), indent=2))


if __name__ == "__main__":
    main()
