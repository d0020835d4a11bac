"""Many SAEs per pass: N SAEs trained together on one activation stream against N separate runs, side by side.

One process, the same generated 32 px shards and the instant tiny ViT (d = 64, layer -2): N SAEs (the seed's
module, expansion `EXPANSION`, l1 coefficients spread over a decade, as a small sweep would) trained for
`steps` steps of `BATCH` activations either together (`MultiSAETrainingModule`: the data path, the backbone
or the cache reader, runs once) or one after the other (N `SAETrainingModule` runs, each with its own data
pass, what N jobs of a Hydra multirun on one machine cost). Two sources: images through the backbone
(`ImageActivationDataModule`, 2 decoding workers) and the activation cache (`CacheDataModule`, fp16 rows,
1 reading worker). Reported: wall time of the whole fits (start-up included) and SAE tokens per wall second
(tokens x SAEs) over the steps after a warm-up, best of `repeats` alternating repeats.
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

from benchmarks.cache import tiny_world, write_cache
from benchmarks.report import Section, table
from benchmarks.timing import Mark, StepClock
from sae_lightning.data.cache import CacheDataModule
from sae_lightning.data.datamodule import ImageActivationDataModule
from sae_lightning.module import MultiSAETrainingModule, SAETrainingModule
from sae_lightning.sae import SparseAutoencoder

BATCH, EXPANSION, LAYER, WARMUP, N_SAES = 256, 8, -2, 5, 4


def member(d_in: int, l1: float) -> SAETrainingModule:
    torch.manual_seed(0)
    return SAETrainingModule(SparseAutoencoder(d_in, EXPANSION * d_in, l1_coefficient=l1), lr=1e-3,
                             lr_warmup_steps=10, dead_feature_window=32, feature_sampling_window=50)


def fit(module, datamodule, steps: int) -> tuple[float, float]:
    """(wall seconds of the whole fit, optimiser steps per wall second after WARMUP steps)."""
    clock = StepClock()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=WARMUP + steps, max_epochs=-1, logger=False,
                        callbacks=[clock], enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
                        log_every_n_steps=10)
    start = Mark.now()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.fit(module, datamodule=datamodule)
    return Mark.now().wall - start.wall, clock.step_rates(WARMUP)[0]


def together_and_apart(make_datamodule, d_in: int, l1s: list[float], steps: int) -> dict[str, tuple[float, float]]:
    """{"together": (wall s, SAE tokens/s), "apart": (wall s, SAE tokens/s)} for len(l1s) SAEs."""
    gc.collect()
    module = MultiSAETrainingModule({f"l1_{i}": member(d_in, l1) for i, l1 in enumerate(l1s)})
    wall, rate = fit(module, make_datamodule(), steps)
    out = {"together": (wall, rate * BATCH * len(l1s))}
    walls, seconds_per_step = 0.0, 0.0
    for l1 in l1s:
        gc.collect()
        wall, rate = fit(member(d_in, l1), make_datamodule(), steps)
        walls, seconds_per_step = walls + wall, seconds_per_step + 1 / rate
    out["apart"] = (walls, len(l1s) * BATCH / seconds_per_step)  # N SAEs' tokens over the N runs' step times
    return out


def run(quick: bool = False, repeats: int = 2) -> Section:
    n_images, steps = (512, 15) if quick else (2048, 60)
    l1s = [float(v) for v in torch.logspace(-3, -2, N_SAES)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny, backbone, shards = tiny_world(work, n_images)
        for tokens in ("cls", "all"):
            directory = work / f"cache-{tokens}"
            write_cache(tiny, shards, tokens, directory)
            per_image = backbone.n_tokens_for(tokens)
            buffer = max(BATCH, 8 * per_image * 16)
            sources = {
                "images (tiny ViT)": lambda tokens=tokens, buffer=buffer: ImageActivationDataModule(
                    backbone, shards, classnames=None, layer=LAYER, tokens=tokens, sae_batch_size=BATCH,
                    buffer_size=buffer, num_workers=2, shuffle=256, pin_memory=False),
                "activation cache": lambda directory=directory, buffer=buffer: CacheDataModule(
                    directory, sae_batch_size=BATCH, buffer_size=buffer, block_rows=1024, window_blocks=16,
                    num_workers=1),
            }
            for source, make in sources.items():
                best: dict[str, tuple[float, float]] = {}
                for _ in range(repeats):
                    for kind, (wall, rate) in together_and_apart(make, backbone.width, l1s, steps).items():
                        old = best.get(kind)
                        best[kind] = (min(wall, old[0]), max(rate, old[1])) if old else (wall, rate)
                (wall_t, rate_t), (wall_a, rate_a) = best["together"], best["apart"]
                rows.append([source, tokens, f"{wall_t:.1f}", f"{wall_a:.1f}", f"{wall_a / wall_t:.1f}x",
                             f"{rate_t:,.0f}", f"{rate_a:,.0f}", f"{rate_t / rate_a:.1f}x"])
    body = f"""
`python -m benchmarks.run --only multi_sae`: {N_SAES} standard SAEs (expansion {EXPANSION}, d = 64, l1 from 1e-3
to 1e-2, the seed's module with ghost grads) for {steps} steps of {BATCH} activations after {WARMUP} warm-up
steps, on {n_images:,} generated 32 px images (8 shards) through the tiny ViT (layer {LAYER}) or from its
activation cache (fp16, 1 reading worker), CPU. "one pass" trains the {N_SAES} SAEs together
(`saes:` / `MultiSAETrainingModule`); "separate" runs them one after the other, each with its own data pass.
Wall time is the whole of the fits (start-up, worker start, warm-up included); SAE tokens/s is activations x
SAEs per wall second over the steps after the warm-up (separate: {N_SAES} x batch over the sum of the runs'
step times). Best of {repeats} repeats in this one process.

{table(["source", "tokens", "one pass: wall (s)", f"{N_SAES} separate: wall (s)", "wall speed-up",
        "one pass: SAE tokens/s", "separate: SAE tokens/s", "throughput ratio"], rows)}

_1-minute load average at the end: {os.getloadavg()[0]:.1f}._
"""
    return Section(f"Many SAEs per pass: {N_SAES} SAEs on one stream vs {N_SAES} separate runs", body)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(run(quick=True, repeats=1).body)
