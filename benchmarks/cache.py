"""SAE training throughput from the activation cache against images through the tiny backbone, side by side.

One process, the same generated 32 px shards, the instant tiny ViT (d = 64) and the same SAE (expansion 8,
the seed's module): `cache.py`'s writer makes the cache once (timed: images/s of the one backbone pass), then
training runs alternate between `ImageActivationDataModule` (decode in 2 DataLoader workers, backbone to the
layer, shuffle buffer) and `CacheDataModule` (fp16 rows, 1 reading worker, cross-file window shuffle), best
of `repeats` each, for the class token and for all 17 tokens per image. Rates are SAE tokens (activations)
per wall second over the steps after a warm-up; the ratio is what skipping the backbone buys at this size.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import tempfile
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from benchmarks.report import Section, table
from benchmarks.timing import Mark, StepClock
from sae_lightning.backbone import load_tiny_backbone
from sae_lightning.data.cache import CacheDataModule
from sae_lightning.data.cache_write import CacheWriter
from sae_lightning.data.datamodule import ImageActivationDataModule
from sae_lightning.data.synthetic import write_demo_shards
from sae_lightning.module import SAETrainingModule
from sae_lightning.sae import SparseAutoencoder

BATCH, EXPANSION, LAYER, WARMUP = 256, 8, -2, 5


def tiny_world(work: Path, n_images: int) -> tuple[Path, object, list[str]]:
    """The tiny ViT (written to work/, loaded like real weights), and n_images generated 32 px images in 8 shards."""
    tiny = work / "sae-tiny-vit.pt"
    backbone = load_tiny_backbone(tiny)
    return tiny, backbone, write_demo_shards(work / "shards", n_images, image_size=32, shard_size=n_images // 8)


def write_cache(tiny: Path, shards: list[str], tokens: str, directory: Path) -> float:
    """Write the cache with cache.py's writer; returns images per second of that one pass."""
    cfg = OmegaConf.create({
        "backbone": {"_target_": "sae_lightning.backbone.load_tiny_backbone", "pretrained": str(tiny)},
        "layer": LAYER, "tokens": tokens, "overwrite": True,
        "data": {"train_shards": shards, "num_workers": 2, "autocast": "32", "pin_memory": False},
        "cache": {"dir": str(directory), "dtype": "fp16", "rows_per_shard": 65536, "batch_size": 64,
                  "device": "cpu", "verify": False},
    })
    start = Mark.now()
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
        assert CacheWriter(cfg).run() == 0
    return start.rates(CacheDataModule(directory).manifest["images"])[0]


def train_rate(datamodule, d_in: int, steps: int) -> float:
    """SAE tokens per wall second of a Lightning run on `datamodule`, after WARMUP steps."""
    torch.manual_seed(0)
    module = SAETrainingModule(SparseAutoencoder(d_in, EXPANSION * d_in), lr=1e-3, lr_warmup_steps=10,
                               dead_feature_window=32, feature_sampling_window=50)
    clock = StepClock()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=WARMUP + steps, max_epochs=-1, logger=False,
                        callbacks=[clock], enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
                        log_every_n_steps=10)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.fit(module, datamodule=datamodule)
    return clock.step_rates(WARMUP)[0] * BATCH


def run(quick: bool = False, repeats: int = 2) -> Section:
    n_images, steps = (512, 15) if quick else (2048, 60)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny, backbone, shards = tiny_world(work, n_images)
        for tokens in ("cls", "all"):
            directory = work / f"cache-{tokens}"
            cache_images = write_cache(tiny, shards, tokens, directory)
            per_image = backbone.n_tokens_for(tokens)
            buffer = max(BATCH, 8 * per_image * 16)
            rates: dict[str, list[float]] = {"images": [], "cache": []}
            for repeat in range(repeats):
                for kind in ("images", "cache") if repeat % 2 == 0 else ("cache", "images"):
                    gc.collect()
                    if kind == "images":
                        dm = ImageActivationDataModule(backbone, shards, classnames=None, layer=LAYER, tokens=tokens,
                                                       sae_batch_size=BATCH, buffer_size=buffer, num_workers=2,
                                                       shuffle=256, pin_memory=False)
                    else:
                        dm = CacheDataModule(directory, sae_batch_size=BATCH, buffer_size=buffer, block_rows=1024,
                                             window_blocks=16, num_workers=1)
                    rates[kind].append(train_rate(dm, backbone.width, steps))
            best_images, best_cache = max(rates["images"]), max(rates["cache"])
            rows.append([tokens, per_image, f"{cache_images:,.0f}", f"{best_images:,.0f}", f"{best_cache:,.0f}",
                         f"{best_cache / best_images:.1f}x"])
    body = f"""
`python -m benchmarks.run --only cache`: the tiny ViT (d = 64, 32 px, layer {LAYER}) on {n_images:,} generated
images in 8 shards; SAE expansion {EXPANSION}, batch {BATCH}, the seed's module (ghost grads on), CPU. "cache
write" is `cache.py`'s one backbone pass (2 decoding workers, fp16 rows). The two training columns are SAE
tokens per wall second over {steps} steps after {WARMUP} warm-up steps, best of {repeats} alternating runs in
this one process: images through the backbone (`ImageActivationDataModule`, 2 decoding workers) against the
cache (`data=cache`: 1 reading worker, windows of 16 blocks x 1,024 rows). On a real ViT the backbone is far
more expensive than this tiny one, so the cache's advantage grows; on this 2-core machine the image path's
workers also compete with the training process for the cores.

{table(["tokens", "rows per image", "cache write (images/s)", "train from images (tokens/s)",
        "train from cache (tokens/s)", "cache / images"], rows)}

_1-minute load average at the end: {os.getloadavg()[0]:.1f}._
"""
    return Section("Activation cache: training from disk vs through the backbone", body)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(run(quick=True).body)
