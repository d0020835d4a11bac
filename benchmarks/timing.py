"""Timing helpers shared by the benchmarks: wall and CPU clocks, and a step clock for Lightning runs.

The machine may be shared, so next to wall-clock rates the benchmarks report rates per CPU-second of this
process (`time.process_time`, all threads): other processes' load barely moves those.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


@dataclass
class Mark:
    """A reading of both clocks."""

    wall: float
    cpu: float

    @classmethod
    def now(cls) -> "Mark":
        return cls(time.perf_counter(), time.process_time())

    def rates(self, count: float, end: "Mark | None" = None) -> tuple[float, float]:
        """(`count` per wall second, per CPU second) from this mark to `end` (default: now)."""
        end = end or Mark.now()
        return count / (end.wall - self.wall), count / max(end.cpu - self.cpu, 1e-9)


class StepClock(Callback):
    """Marks the end of every batch that made an optimiser step, so rates can skip warm-up steps.

    On a GPU each mark waits for the step's kernels to finish (one synchronisation per step, a few microseconds
    next to steps of milliseconds), so the marks time finished work rather than queued launches.
    """

    def __init__(self) -> None:
        self.marks: list[tuple[int, Mark]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.marks or trainer.global_step != self.marks[-1][0]:
            if pl_module.device.type == "cuda":  # kernels run asynchronously: mark when the step has finished
                torch.cuda.synchronize(pl_module.device)
            self.marks.append((trainer.global_step, Mark.now()))

    def step_rates(self, warmup: int) -> tuple[float, float]:
        """(steps per wall second, per CPU second) from the end of step `warmup` to the last step."""
        s0, m0 = next((s, m) for s, m in self.marks if s >= warmup)
        s1, m1 = self.marks[-1]
        return m0.rates(s1 - s0, m1)
