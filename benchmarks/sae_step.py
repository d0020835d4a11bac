"""SAE-step overhead: the project's full training step against a bare PyTorch loop doing the same math.

Project: SAETrainingModule under Lightning's Trainer, fed by ActivationsDataModule (DataLoader + shuffle
buffer), TensorBoard logger, progress bar and the density-histogram callback, logging at the default
interval (every 10 steps). Bare: the same SparseAutoencoder, Adam + warm-up, decoder renormalisation,
parallel-gradient removal and the dead-feature counters / ghost-grad mask, on contiguous slices of an
in-memory tensor. Same device, same data, same initial weights, one after the other in one process.
"""

from __future__ import annotations

import contextlib
import gc
import io
import tempfile
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from benchmarks.report import Section, table
from benchmarks.timing import Mark, StepClock
from sae_lightning.callbacks import DensityHistogramCallback
from sae_lightning.data.activations import ActivationsDataModule
from sae_lightning.module import SAETrainingModule, lr_schedule
from sae_lightning.sae import SparseAutoencoder
from sae_lightning.sae import functional as F_sae

LR, LR_WARMUP, DEAD_WINDOW, SAMPLING_WINDOW, LOG_EVERY = 4e-4, 500, 64, 500, 10


@dataclass
class StepCase:
    """One SAE size and the batch / step counts it is timed with on this machine."""

    d: int
    expansion: int
    batch: int
    steps: int
    warmup: int = 2

    @property
    def d_sae(self) -> int:
        return self.d * self.expansion

    def mflop_per_token(self) -> float:
        """Dense forward + backward per token: 4 d F forward, 8 d F backward (201 / 805 MFLOP at d=1024, 16x / 64x)."""
        return 12 * self.d * self.d_sae / 1e6


# The timed window always holds a logging step (global_step 10): 64x cases time 6 steps, where it weighs more.
FULL = [StepCase(256, 4, 128, 100), StepCase(768, 16, 128, 10), StepCase(768, 64, 32, 6, warmup=4),
        StepCase(1024, 16, 128, 10), StepCase(1024, 64, 32, 6, warmup=4)]
QUICK = [StepCase(256, 4, 128, 20), StepCase(768, 16, 32, 10), StepCase(1024, 64, 8, 6, warmup=4)]
REPEATS, QUICK_REPEATS = 3, 1  # alternating order, the best of each: drifts and others' load hurt both alike


def new_sae(case: StepCase) -> SparseAutoencoder:
    torch.manual_seed(0)
    return SparseAutoencoder(case.d, case.d_sae, l1_coefficient=8e-5)


def bare_loop(case: StepCase, data: torch.Tensor) -> tuple[float, float]:
    """(tokens per wall second, per CPU second) of the hand-written loop, after `warmup` steps."""
    sae = new_sae(case)
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(LR_WARMUP))
    steps_since_fired = torch.zeros(case.d_sae, dtype=torch.long)
    sae.b_dec.data.copy_(F_sae.geometric_median(data[: 4 * case.batch]))
    start = Mark.now()
    for step in range(case.warmup + case.steps):
        if step == case.warmup:
            start = Mark.now()
        x = data[step * case.batch:(step + 1) * case.batch]
        F_sae.normalise_decoder_rows(sae.W_dec)
        out = sae.loss(x, dead_mask=steps_since_fired > DEAD_WINDOW)
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        F_sae.remove_parallel_gradient(sae.W_dec)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            steps_since_fired.add_(1).masked_fill_((out.feature_acts > 0).sum(0) > 0, 0)
    return start.rates(case.steps * case.batch)


def project_step(case: StepCase, data: torch.Tensor, log_dir: str, compile: bool = False
                 ) -> tuple[float, float, float]:
    """(tokens per wall second, per CPU second, density-histogram ms) of the Lightning run."""
    module = SAETrainingModule(new_sae(case), lr=LR, lr_warmup_steps=LR_WARMUP, dead_feature_window=DEAD_WINDOW,
                               feature_sampling_window=SAMPLING_WINDOW, compile=compile)
    datamodule = ActivationsDataModule(data, sae_batch_size=case.batch, buffer_size=4 * case.batch)
    clock, histogram = StepClock(), DensityHistogramCallback()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=case.warmup + case.steps, max_epochs=-1,
                        logger=TensorBoardLogger(log_dir, name="sae_step"), log_every_n_steps=LOG_EVERY,
                        callbacks=[histogram, TQDMProgressBar(), clock], enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    sink = io.StringIO()  # the progress bar still renders, into a buffer
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        trainer.fit(module, datamodule=datamodule)
        steps_wall, steps_cpu = clock.step_rates(case.warmup)
        # The histogram fires once per feature_sampling_window (500) steps: time one firing on its own.
        module.density_ready = torch.rand(case.d_sae)
        start = Mark.now()
        histogram.on_train_batch_end(trainer, module, None, None, 0)
        histogram_ms = 1000 / start.rates(1)[0]
    return steps_wall * case.batch, steps_cpu * case.batch, histogram_ms


def best_rates(case: StepCase, data: torch.Tensor, log_dir: str, repeats: int
               ) -> tuple[float, float, float, float, float]:
    """Best (bare wall, bare CPU, project wall, project CPU) tokens/s over `repeats`, and histogram ms."""
    bare, project = [], []
    for repeat in range(repeats):
        for kind in ("bare", "project") if repeat % 2 == 0 else ("project", "bare"):
            gc.collect()  # Lightning's reference cycles would keep the previous run's SAE and Adam state alive
            if kind == "bare":
                bare.append(bare_loop(case, data))
            else:
                project.append(project_step(case, data, log_dir))
    return (max(r[0] for r in bare), max(r[1] for r in bare), max(r[0] for r in project),
            max(r[1] for r in project), min(r[2] for r in project))


COMPILE_CASES = [StepCase(768, 16, 128, 10, warmup=4), StepCase(1024, 16, 128, 10, warmup=4)]
QUICK_COMPILE_CASES = [StepCase(256, 4, 128, 10, warmup=4)]


def compile_rows(quick: bool, log_dir: str) -> list[list]:
    """Eager vs `module.compile=true` (torch.compile of the SAE loss), the same run side by side."""
    rows = []
    for case in QUICK_COMPILE_CASES if quick else COMPILE_CASES:
        n_rows = (4 + case.warmup + case.steps + 2) * case.batch
        data = torch.randn(n_rows, case.d, generator=torch.Generator().manual_seed(0)) + 1.0
        eager, compiled = [], []
        for repeat in range(1 if quick else 2):
            for compile in (False, True) if repeat % 2 == 0 else (True, False):
                gc.collect()
                try:
                    rate = project_step(case, data, log_dir, compile=compile)[0]
                except Exception as err:  # noqa: BLE001 - a missing compiler must not sink the whole report
                    rate = float("nan")
                    print(f"[bench] torch.compile failed: {type(err).__name__}: {err}", flush=True)
                (compiled if compile else eager).append(rate)
        best_eager, best_compiled = max(eager), max(compiled)
        rows.append([case.d, case.expansion, case.batch, f"{best_eager:,.0f}", f"{best_compiled:,.0f}",
                     f"{best_compiled / best_eager:.2f}"])
    return rows


def run(quick: bool = False) -> Section:
    rows, repeats = [], QUICK_REPEATS if quick else REPEATS
    with tempfile.TemporaryDirectory() as log_dir:
        for case in QUICK if quick else FULL:
            n_rows = (4 + case.warmup + case.steps + 2) * case.batch
            data = torch.randn(n_rows, case.d, generator=torch.Generator().manual_seed(0)) + 1.0
            bare_wall, bare_cpu, proj_wall, proj_cpu, histogram_ms = best_rates(case, data, log_dir, repeats)
            step_ms = 1000 * case.batch / proj_wall
            overhead_ms = step_ms - 1000 * case.batch / bare_wall
            rows.append([case.d, case.expansion, f"{case.d_sae:,}", case.batch, case.steps,
                         f"{bare_wall:,.0f}", f"{proj_wall:,.0f}", f"{proj_wall / bare_wall:.2f}",
                         f"{proj_cpu / bare_cpu:.2f}", f"{step_ms:,.1f}", f"{overhead_ms:+.1f}",
                         f"{bare_wall * case.mflop_per_token() / 1e3:.1f}",
                         f"{histogram_ms:.0f} ms ({100 * histogram_ms / SAMPLING_WINDOW / step_ms:.2f}%)"])
        compiled = compile_rows(quick, log_dir)
    body = f"""
Tokens per second of one SAE training step (forward, loss with ghost grads, backward, Adam), CPU, fp32.
"project" is the full training step: `SAETrainingModule` under `lightning.Trainer` fed by
`ActivationsDataModule` (DataLoader + shuffle buffer of 4 batches), TensorBoard logger, progress bar and
`DensityHistogramCallback`, logging every {LOG_EVERY} steps. "bare" is a hand-written loop doing the same
math (same `SparseAutoencoder`, Adam + warm-up, decoder renorm + gradient projection, dead-feature counters
and ghost-grad mask) on slices of an in-memory tensor. Same data, same initial weights, same process; each
is run {repeats} time(s), alternating which goes first, and the best of each is shown. Warm-up
steps are skipped (the first initialises b_dec) and the timed window always contains one logging step
(2 warm-up + 10 timed steps; for 64x, 4 + 6, which over-weights logging). Batches are small so the largest
SAE (1024 x 65,536) fits the time budget; small batches are the hardest case for a fixed per-step cost.
The first row (the planted-feature SAE, 4 ms steps) shows that fixed cost on its own. "ratio (CPU)"
compares tokens per CPU-second of this process, which other load on a shared machine barely moves. The
density histogram (a matplotlib figure + TensorBoard histogram) fires once per `feature_sampling_window`
= {SAMPLING_WINDOW} steps; it is timed once and shown amortised over the window, as a share of a step.

{table(["d", "expansion", "F", "batch", "timed steps", "bare tokens/s", "project tokens/s",
        "project / bare (wall)", "ratio (CPU)", "project ms/step", "overhead ms/step", "bare GFLOP/s",
        "histogram (per step)"], rows)}

The step needs no host-device synchronisation: ghost grads are computed densely with a mask, and a
non-finite step is skipped on the device by fused Adam (`found_inf`) and reported at the next logging step.
`module.compile=true` runs the SAE's loss through `torch.compile` (inductor; on CPU it needs a C++ compiler).
Eager vs compiled, the full project step, best of the runs, compile time excluded (warm-up steps):

{table(["d", "expansion", "batch", "eager tokens/s", "compiled tokens/s", "compiled / eager"], compiled)}
"""
    return Section("SAE-step overhead: project vs bare PyTorch", body)
