"""Test-only callbacks that train.py's subprocesses load through Hydra (`+callbacks.x._target_=tests.helpers.X`)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from lightning.pytorch import Callback


class RankStateDump(Callback):
    """At the end of training every rank writes its SAE parameters and counters to <directory>/rank<r>.pt."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_train_end(self, trainer, pl_module):
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.sae.state_dict().items()}
        state["steps_since_fired"] = pl_module.steps_since_fired.cpu().clone()
        state["window_fired"] = pl_module.window_density.fired.cpu().clone()
        torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")


class SignalAtStep(Callback):
    """Sends `signum` to this very process once global_step reaches `step` (a pre-emption mid-run)."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)):
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.sent and trainer.global_step >= self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)
