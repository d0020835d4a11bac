"""Test-only callbacks that train.py's subprocesses load through Hydra (`+callbacks.x._target_=tests.helpers.X`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parent.parent


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


@contextlib.contextmanager
def served_explorer(args: list[str]):
    """`python -m sae_lightning.explorer <args>` on a free localhost port, and headless Chromium on it:
    yields (url, browser) once the server answers; both are stopped afterwards. Skips without Chromium."""
    import pytest

    from sae_lightning.explorer.browser import Chromium, find_chromium

    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "sae_lightning.explorer", *args, f"port={port}"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ),
                              start_new_session=True)
    browser = None
    try:
        url = f"http://localhost:{port}"
        end = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/_stcore/health", timeout=2)
                break
            except OSError:
                if time.time() > end or server.poll() is not None:
                    raise AssertionError("the app did not start") from None
                time.sleep(0.3)
        browser = Chromium(binary)
        yield url, browser
    finally:
        if browser is not None:
            browser.close()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)
