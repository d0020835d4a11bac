"""GPU: ViT-L/14 images/s to layer 22 (fp32, bf16), the seed configuration's steps/s, the SAE step alone.

The floor is the time the matrix multiplies alone would take at the matrix rate measured on the same GPU:
148.5 GFLOP per image for ViT-L/14's first 22 blocks at 224 px, plus 805 MFLOP per token for the 64x SAE
step (the usual SAE FLOP count). The SAE step alone (activations already computed, as when training from
`python cache.py`'s cache) is timed at matmul precision "highest" (fp32) and "high" (TF32), eager and
compiled. Models are built without pretrained weights (same shapes and cost, no download). Runs
only with `--gpu` on a machine where CUDA is available; otherwise the section says what it would measure.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import PIL.Image
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from benchmarks.report import Section, table
from benchmarks.timing import StepClock
from sae_lightning.backbone import Backbone, load_backbone
from sae_lightning.callbacks import DensityHistogramCallback
from sae_lightning.data.activations import ActivationsDataModule
from sae_lightning.data.datamodule import ImageActivationDataModule
from sae_lightning.module import SAETrainingModule
from sae_lightning.sae import SparseAutoencoder

GFLOP_PER_IMAGE = 148.5  # ViT-L/14, 224 px, blocks 0..21
SAE_MFLOP_PER_TOKEN = 805.0  # d=1024, 64x, forward + backward
COMMAND = "python -m benchmarks.run --gpu --only gpu --out BENCHMARKS-gpu.md"
DEVICE = "cuda"  # what `--gpu` measures; the code runs on "cpu" too (with a tiny GpuPlan) for checking it


@dataclass
class GpuPlan:
    """What is measured and how long: the model, hook point, batches and step counts."""

    model: str = "ViT-L-14"
    layer: int = 22
    forward_batch: int = 256
    forward_repeats: int = 10
    sae_batch: int = 1024  # the seed's
    buffer_size: int = 15360  # the seed's
    expansion: int = 64  # the seed's
    shard_images: int = 8192  # generated ImageNet-sized JPEGs, repeated epoch after epoch: a full batch per worker
    steps: int = 10
    warmup: int = 2
    matmul_size: int = 8192
    sae_alone_steps: int = 30
    sae_alone_warmup: int = 5  # compiled runs compile during the first step


FULL = GpuPlan()
QUICK = GpuPlan(forward_batch=64, forward_repeats=3, shard_images=512, buffer_size=4096, steps=3, warmup=1,
                sae_alone_steps=6, sae_alone_warmup=3)
SAE_ALONE_CASES = [("highest", False), ("high", False), ("high", True)]  # (matmul precision, torch.compile)


def benchmark_shards(root: Path, n_images: int, n_shards: int = 16, distinct: int = 256) -> list[str]:
    """`n_shards` tar shards holding `n_images` JPEG samples of ImageNet's mean size (500 x 375, smooth noise at
    quality 90, about 60 KB), so workers decode and resize what they would on ImageNet. `distinct` images are
    encoded once and repeated under new keys: rendering scenes at this size would take longer than the benchmark.
    """
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(distinct):
        coarse = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        image = PIL.Image.fromarray(coarse).resize((500, 375), PIL.Image.BICUBIC)
        noisy = np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (375, 500, 3)), 0, 255)
        out = io.BytesIO()
        PIL.Image.fromarray(noisy.astype(np.uint8)).save(out, format="JPEG", quality=90)
        encoded.append(out.getvalue())
    paths = []
    for s in range(n_shards):
        path = root / f"bench-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, n_images, n_shards):
                for suffix, data in ((".jpg", encoded[i % distinct]), (".cls", str(i % 1000).encode())):
                    info = tarfile.TarInfo(f"{i:08d}{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def timed(fn, repeats: int) -> float:
    """Seconds per call of `fn` on DEVICE, after one warm-up call (synchronised around the timed calls)."""
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(dtype: torch.dtype, n: int, tf32: bool = False) -> float:
    """Dense [n, n] @ [n, n] rate in TFLOP/s; fp32 without TF32 unless asked."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a, b = (torch.randn(n, n, device=DEVICE, dtype=dtype) for _ in range(2))
    seconds = timed(lambda: a @ b, 20)
    torch.backends.cuda.matmul.allow_tf32 = False
    return 2 * n**3 / seconds / 1e12


def forward_images_per_second(backbone: Backbone, plan: GpuPlan, dtype: torch.dtype | None, full: bool) -> float:
    """Images/s of the forward to `layer` (or the whole model) on random 224 px images."""
    images = torch.randn(plan.forward_batch, 3, backbone.image_size, backbone.image_size, device=DEVICE)
    ctx = (lambda: torch.autocast(DEVICE, dtype=dtype)) if dtype else contextlib.nullcontext

    def forward() -> None:
        with ctx():
            backbone.encode_image(images) if full else backbone.activations(images, plan.layer, "cls")

    return plan.forward_batch / timed(forward, plan.forward_repeats)


def fitted_steps_per_second(module: SAETrainingModule, datamodule, steps: int, warmup: int, work: Path,
                            name: str) -> float:
    """SAE steps/s of a quiet Lightning fit of `module` on `datamodule`, the first `warmup` steps not timed."""
    clock = StepClock()
    trainer = L.Trainer(accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1,
                        max_steps=warmup + steps, max_epochs=-1,
                        logger=TensorBoardLogger(work, name=name), log_every_n_steps=10,
                        callbacks=[DensityHistogramCallback(), clock], enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        trainer.fit(module, datamodule=datamodule)
    return clock.step_rates(warmup)[0]


def seed_sae(width: int, plan: GpuPlan) -> SparseAutoencoder:
    torch.manual_seed(0)
    return SparseAutoencoder(width, plan.expansion * width, l1_coefficient=8e-5)


def seed_steps_per_second(backbone: Backbone, plan: GpuPlan, autocast: str, shards: list[str],
                          work: Path) -> float:
    """End-to-end SAE steps/s of the seed configuration: shards -> workers -> backbone -> buffer -> SAE."""
    datamodule = ImageActivationDataModule(backbone, shards, classnames=None, layer=plan.layer, tokens="cls",
                                           sae_batch_size=plan.sae_batch, buffer_size=plan.buffer_size,
                                           num_workers=min(8, os.cpu_count() or 1), shuffle=1000,
                                           autocast=autocast, pin_memory=DEVICE == "cuda")
    module = SAETrainingModule(seed_sae(backbone.width, plan))
    return fitted_steps_per_second(module, datamodule, plan.steps, plan.warmup, work, "seed")


def sae_alone_steps_per_second(width: int, plan: GpuPlan, compile: bool, work: Path) -> float:
    """SAE steps/s from activations in memory (no backbone): Lightning, the shuffle buffer, ghost grads, Adam."""
    n_rows = (4 + plan.sae_alone_warmup + plan.sae_alone_steps + 2) * plan.sae_batch
    rows = torch.randn(n_rows, width, generator=torch.Generator().manual_seed(0)) + 1.0
    datamodule = ActivationsDataModule(rows, sae_batch_size=plan.sae_batch, buffer_size=4 * plan.sae_batch)
    module = SAETrainingModule(seed_sae(width, plan), compile=compile)
    return fitted_steps_per_second(module, datamodule, plan.sae_alone_steps, plan.sae_alone_warmup, work,
                                   "sae_alone")


def sae_alone_rows(width: int, plan: GpuPlan, rates: dict[str, float], work: Path) -> list[list]:
    rows = []
    for precision, compile in SAE_ALONE_CASES:
        torch.set_float32_matmul_precision(precision)
        try:
            steps = sae_alone_steps_per_second(width, plan, compile, work)
        except Exception as err:  # noqa: BLE001 - a failed compile must not sink the measured rest
            print(f"[bench] SAE step ({precision}, compile={compile}) failed: {type(err).__name__}: {err}", flush=True)
            steps = float("nan")
        finally:
            torch.set_float32_matmul_precision("highest")
        mflop_per_token = 12 * width * plan.expansion * width / 1e6  # 805 at d=1024, 64x
        floor_s = plan.sae_batch * mflop_per_token * 1e6 / (rates["tf32" if precision == "high" else "fp32"] * 1e12)
        rows.append([precision, "yes" if compile else "no", plan.sae_batch, plan.expansion, f"{steps:.2f}",
                     f"{steps * plan.sae_batch:,.0f}", f"{1e3 / steps:.2f}", f"{1e3 * floor_s:.2f}",
                     f"{100 * steps * floor_s:.0f}%"])
    return rows


def measured(plan: GpuPlan) -> str:
    torch.set_float32_matmul_precision("highest")
    rates = {"fp32": matmul_tflops(torch.float32, plan.matmul_size),
             "tf32": matmul_tflops(torch.float32, plan.matmul_size, tf32=True),
             "bf16": matmul_tflops(torch.bfloat16, plan.matmul_size)}
    backbone = load_backbone(plan.model, pretrained=None, quick_gelu=True, device=DEVICE)
    forward_rows = []
    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        to_layer = forward_images_per_second(backbone, plan, dtype, full=False)
        full = forward_images_per_second(backbone, plan, dtype, full=True)
        floor_ms = GFLOP_PER_IMAGE * 1e9 / (rates[label] * 1e12) * 1e3
        forward_rows.append([label, plan.forward_batch, f"{to_layer:,.0f}", f"{full:,.0f}", f"{1e3 / to_layer:.3f}",
                             f"{floor_ms:.3f}", f"{100 * floor_ms * to_layer / 1e3:.0f}%"])
    step_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = benchmark_shards(Path(tmp), plan.shard_images)
        for autocast, label in (("32", "fp32"), ("bf16", "bf16")):
            steps = seed_steps_per_second(backbone, plan, autocast, shards, Path(tmp))
            floor_s = plan.sae_batch * (GFLOP_PER_IMAGE * 1e9 / (rates[label] * 1e12)
                                        + SAE_MFLOP_PER_TOKEN * 1e6 / (rates["fp32"] * 1e12))
            step_rows.append([label, plan.sae_batch, plan.expansion, f"{steps:.3f}", f"{steps * plan.sae_batch:,.0f}",
                              f"{1 / steps:.3f}", f"{floor_s:.3f}", f"{100 * steps * floor_s:.0f}%"])
        alone_rows = sae_alone_rows(backbone.width, plan, rates, Path(tmp))
    size = backbone.image_size
    return f"""
Matrix rate ([{plan.matmul_size}]^2 matmuls): fp32 {rates['fp32']:.1f}, TF32 {rates['tf32']:.1f}, bf16
{rates['bf16']:.1f} TFLOP/s. Floors use fp32 (TF32 off, the default `matmul_precision: highest`) or bf16:
the time the matrix multiplies alone would take at that rate; "floor / measured" is the share of it reached.

**{plan.model} forward, random {size} px images** (to layer {plan.layer} vs the whole model; floor =
{GFLOP_PER_IMAGE} GFLOP per image / rate):

{table(["precision", "batch", "to layer images/s", "full images/s", "measured ms/image", "floor ms/image",
        "floor / measured"], forward_rows)}

**Seed configuration end to end** (generated 500 x 375 JPEG shards, resized to {size} px,
{min(8, os.cpu_count() or 1)} workers, class token, buffer {plan.buffer_size}, SAE {plan.expansion}x fp32, Adam,
ghost grads, logging every 10 steps;
{plan.steps} steps timed after {plan.warmup}; backbone precision = `data.autocast`; floor = {plan.sae_batch} x
({GFLOP_PER_IMAGE} GFLOP / backbone rate + {SAE_MFLOP_PER_TOKEN:g} MFLOP / fp32 rate)):

{table(["backbone", "batch", "expansion", "steps/s", "images/s", "measured s/step", "floor s/step",
        "floor / measured"], step_rows)}

**The SAE step alone** (d = {backbone.width}, {plan.expansion}x, batch {plan.sae_batch}; activations from memory
through `ActivationsDataModule` as when training from the cache; the same Lightning step, ghost grads,
Adam and logging; {plan.sae_alone_steps} steps timed after {plan.sae_alone_warmup}; `matmul_precision`
"highest" is fp32, "high" allows TF32; compiled = `module.compile=true`; floor = 12 d F FLOP per token
({12 * backbone.width ** 2 * plan.expansion / 1e6:g} MFLOP) / the matching matrix rate):

{table(["matmul precision", "compiled", "batch", "expansion", "steps/s", "tokens/s", "measured ms/step",
        "floor ms/step", "floor / measured"], alone_rows)}
"""


def not_measured() -> str:
    return f"""
No GPU was available to this run, so nothing here was measured. On a CUDA machine,

    {COMMAND}

measures, with ViT-L/14 built without pretrained weights (same cost as the OpenAI weights, no download):

- the matrix rate of this GPU: [8192]^2 matmuls in fp32 (TF32 off), TF32 and bf16, TFLOP/s;
- ViT-L/14 images/s to layer 22 (class token) in fp32 and bf16 autocast at batch 256, and a full forward
  for comparison, each against the floor = 148.5 GFLOP per image (22 blocks at 224 px) / matrix rate;
- the seed configuration's end-to-end steps/s (generated 500 x 375 JPEG shards like ImageNet's, 8 DataLoader
  workers, `ImageActivationDataModule` with buffer 15,360, SAE 1024 x 65,536 at batch 1,024 under Lightning with
  the density-histogram callback and TensorBoard logging), with the backbone in fp32 and in bf16, against the
  floor = 1,024 x (148.5 GFLOP / backbone rate + 805 MFLOP / fp32 rate) per step;
- the SAE step alone (1024 x 65,536 at batch 1,024 from activations in memory, as from the cache) at
  matmul precision "highest" (fp32) and "high" (TF32), eager and with `module.compile=true`.

`--quick` shrinks the batches and step counts. Measured on an NVIDIA H200 on 2026-11-26: see "GPU: NVIDIA H200"
under "Measured separately" below.
"""


def run(quick: bool = False, measure: bool = False) -> Section:
    if measure and torch.cuda.is_available():
        return Section(f"GPU ({torch.cuda.get_device_name(0)})", measured(QUICK if quick else FULL))
    if measure:
        print("[bench] --gpu: CUDA is not available here; the GPU section says what it would measure.", flush=True)
    return Section("GPU (not measured)", not_measured())
