"""Training callbacks: checkpoints on the data schedule, the SAE export, graceful stops, the progress bar,
density histograms and the final hyper-parameters for TensorBoard's HParams tab."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from sae_lightning.metrics import log10_density  # noqa: E402

log = logging.getLogger(__name__)


def density_figure(density: torch.Tensor, title: str) -> plt.Figure:
    """Histogram of log10(p + 1e-10) [F]: dead features pile up at -10, healthy ones around -3..-1."""
    values = log10_density(density.detach().float().cpu()).numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=60, range=(-10.5, 0.5), color="tab:blue")
    ax.set_xlabel("log10(feature density + 1e-10)")
    ax.set_ylabel("features")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def sae_members(trainer: Trainer, pl_module: LightningModule) -> list[tuple[str | None, LightningModule, list]]:
    """(name, module, loggers) of every SAE trained: one (None, module, trainer.loggers) for a single-SAE run,
    one per member with its own loggers (its own TensorBoard run) for MultiSAETrainingModule."""
    if hasattr(pl_module, "members"):
        return [(name, m, m.sae_loggers if m.sae_loggers is not None else trainer.loggers)
                for name, m in pl_module.members()]
    return [(None, pl_module, trainer.loggers)]


class DensityHistogramCallback(Callback):
    """Every feature-sampling window: the feature-density histogram, as a histogram and a figure."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for _, module, loggers in sae_members(trainer, pl_module):
            density = getattr(module, "density_ready", None)
            if density is None:
                continue
            module.density_ready = None
            step = trainer.global_step
            for logger in loggers:
                if isinstance(logger, TensorBoardLogger):
                    writer = logger.experiment
                    writer.add_histogram("features/log10_density", log10_density(density.float().cpu()), step)
                    fig = density_figure(density, f"Feature density over the window ending at step {step}")
                    writer.add_figure("features/log10_density_plot", fig, step)
                    plt.close(fig)


def stop_signal_name(trainer: Trainer) -> str:
    """The signal that stopped the run (SIGINT when our handler saw Ctrl-C, else Lightning's SIGTERM)."""
    return getattr(trainer, "_sae_stop_signal", "SIGTERM")


class SAECheckpoint(ModelCheckpoint):
    """ModelCheckpoint with the guarantees a long run needs (docs/training.md):

    - the interval comes from the data schedule (`set_interval`, resolved by train.py);
    - nothing is written until a new step is taken (a resume does not rewrite step_N.ckpt / last.ckpt);
    - the run always ends with a checkpoint of its final step, which agrees with the export;
    - SIGTERM / SIGINT finish the current step, then save (Lightning raises SIGTERMException between steps);
    - an SAE that failed the module's health check (non-finite or diverged) is never saved.
    """

    def set_interval(self, steps: int) -> None:
        """Checkpoint every `steps` optimiser steps (ModelCheckpoint keeps it in a private field)."""
        self._every_n_train_steps = max(1, int(steps))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_global_step_saved = trainer.global_step  # the loaded state is already on disk
        self._start_step = trainer.global_step
        self._install_sigint(trainer)

    def _install_sigint(self, trainer: Trainer) -> None:
        """Ctrl-C (SIGINT) stops like SIGTERM: after the current step, with a checkpoint (main thread only)."""
        def handler(signum, frame):
            trainer._sae_stop_signal = "SIGINT"
            trainer._signal_connector.received_sigterm = True
            log.warning("SIGINT received: finishing the current step, then saving a checkpoint "
                        "(press Ctrl-C again to abort without saving).")
            signal.signal(signal.SIGINT, self._previous_sigint)

        try:
            self._previous_sigint = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread (e.g. a notebook's worker thread): keep the default
            self._previous_sigint = None

    def _restore_sigint(self) -> None:
        if getattr(self, "_previous_sigint", None) is not None:
            try:
                signal.signal(signal.SIGINT, self._previous_sigint)
            except ValueError:
                pass
            self._previous_sigint = None

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        check = getattr(trainer.lightning_module, "check_health", None)
        if check is not None:
            check()  # raises before anything is written
        super()._save_checkpoint(trainer, filepath)

    def _save_now(self, trainer: Trainer) -> None:
        if trainer.global_step == self._last_global_step_saved:
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_sigint()
        self._save_now(trainer)  # the final state, whatever the interval

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException):
            return  # a crash mid-step leaves no consistent state to save; the last checkpoint stands
        name = stop_signal_name(trainer)
        if trainer.global_step == self._last_global_step_saved:
            log.warning("%s received at step %d: nothing new since the last checkpoint, so nothing was written.",
                        name, trainer.global_step)
            return
        self._save_now(trainer)
        log.warning("%s received: saved the state after step %d to %s.", name, trainer.global_step,
                    self.last_model_path or self.dirpath)


class ExportSAECallback(Callback):
    """Export the SAE (SAELens layout) to `directory` with every checkpoint, i.e. after new steps only.

    `pending_files` ({path: text}) are written atomically with the first export of this run: a resume's
    resolved config replaces the run's only once the resumed run has taken a step.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._exported_step: int | None = None
        self.pending_files: dict[Path, str] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._exported_step = trainer.global_step  # the loaded state is already exported

    def _export(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Once per step (a step can save several checkpoints, e.g. step_*.ckpt and last.ckpt)."""
        if not trainer.is_global_zero or self._exported_step == trainer.global_step:
            return
        try:
            pl_module.export_sae(self.directory, step=trainer.global_step)
        except OSError as err:
            raise OSError(f"Could not export the SAE to {self.directory} ({err}). Is the disk full? The previous "
                          f"export and the checkpoints are intact; free space and resume with "
                          f"ckpt_path=<run>/checkpoints/last.ckpt.") from err
        self._exported_step = trainer.global_step
        for path, text in self.pending_files.items():
            tmp = path.with_name(path.name + ".tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, path)
        self.pending_files = {}
        log.debug("Exported the SAE at step %d to %s", trainer.global_step, self.directory)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._export(trainer, pl_module)


class RunProgressBar(ProgressBar):
    """One bar over the run's optimiser steps, with images/s, ETA and the latest loss, l0 and explained variance
    (a multi-SAE run: how many of its SAEs still train).

    Lightning's own bar restarts every "epoch" of the stream and counts buffer-filling batches; this one
    counts SAE steps from start to `max_steps`, across a resume.
    """

    def __init__(self, refresh_seconds: float = 0.5):
        super().__init__()
        self._enabled = True
        self.refresh_seconds = refresh_seconds
        self.bar: tqdm | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc="Training", unit="step",
                        dynamic_ncols=True, mininterval=self.refresh_seconds, smoothing=0.05)
        self._t0, self._images0 = time.monotonic(), self._images(trainer)

    @staticmethod
    def _images(trainer: Trainer) -> float:
        return float(getattr(trainer.datamodule, "images_seen", 0) or 0)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.bar is None:
            return
        advanced = trainer.global_step - self.bar.n
        if advanced <= 0:
            return
        self.bar.update(advanced)
        metrics = getattr(pl_module, "last_metrics", {})
        postfix = {}
        elapsed = time.monotonic() - self._t0
        images = self._images(trainer) - self._images0
        if images > 0 and elapsed > 0:
            postfix["img/s"] = f"{images / elapsed:.0f}"
        for key, short in (("losses/total", "loss"), ("metrics/l0", "l0"),
                           ("metrics/explained_variance_uncentred", "ev")):
            if key in metrics and math.isfinite(metrics[key]):
                postfix[short] = f"{metrics[key]:.3g}"
        if hasattr(pl_module, "running"):  # a multi-SAE run: how many SAEs still train
            postfix["saes"] = f"{len(pl_module.running())}/{len(pl_module.names)}"
        self.bar.set_postfix(postfix, refresh=False)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close()


class FinalHParamsCallback(Callback):
    """At the end of training: the whole composed config and the final metrics in TensorBoard's HParams tab,
    so the jobs of a sweep compare side by side (hparams: flattened config; metrics: `final/*`)."""

    METRICS = ("losses/total", "metrics/mse_normalised", "metrics/l0", "metrics/explained_variance",
               "metrics/explained_variance_uncentred", "features/dead_features", "features/ultra_rare_features",
               "features/dense_features", "contrastive/score", "contrastive/loss_sae")

    def __init__(self, hparams: dict[str, Any], per_sae: dict[str, dict[str, Any]] | None = None):
        self.hparams = hparams
        self.per_sae = per_sae or {}  # a multi-SAE run: each member's own flattened config

    def _write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for name, module, loggers in sae_members(trainer, pl_module):
            metrics = getattr(module, "last_metrics", {})
            final = {f"final/{k.split('/')[-1]}": v for k, v in metrics.items() if k in self.METRICS}
            final["final/step"] = float(trainer.global_step)
            stopped = getattr(pl_module, "stopped_info", {}).get(name) if name is not None else None
            if name is not None:
                final["final/stopped_step"] = float(stopped["step"]) if stopped else -1.0
            hparams = self.per_sae.get(name, self.hparams) if name is not None else self.hparams
            for logger in loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.log_hyperparams(hparams, metrics=final, step=trainer.global_step)
                    logger.experiment.flush()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            self._write(trainer, pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero and isinstance(exception, SIGTERMException):
            self._write(trainer, pl_module)
