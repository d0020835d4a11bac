"""Training callbacks: density histograms for TensorBoard and the SAE export next to each checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from sae_lightning.metrics import log10_density  # noqa: E402

log = logging.getLogger(__name__)


def density_figure(density: torch.Tensor, title: str) -> plt.Figure:
    """Histogram of log10(p + 1e-10): dead features pile up at -10, healthy ones around -3..-1."""
    values = log10_density(density.detach().float().cpu()).numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=60, range=(-10.5, 0.5), color="tab:blue")
    ax.set_xlabel("log10(feature density + 1e-10)")
    ax.set_ylabel("features")
    ax.set_title(title)
    fig.tight_layout()
    return fig


class DensityHistogramCallback(Callback):
    """Every `feature_sampling_window` steps: the feature-density histogram, as a histogram and a figure."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        density = getattr(pl_module, "density_ready", None)
        if density is None:
            return
        pl_module.density_ready = None
        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                writer.add_histogram("features/log10_density", log10_density(density.float().cpu()), step)
                fig = density_figure(density, f"feature density, window ending at step {step}")
                writer.add_figure("features/log10_density_plot", fig, step)
                plt.close(fig)


class ExportSAECallback(Callback):
    """Export the SAE (SAELens layout) to `directory` at every checkpoint and when training ends."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._exported_step: int | None = None

    def _export(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Once per step (a step can save several checkpoints, e.g. step_*.ckpt and last.ckpt)."""
        if trainer.is_global_zero and self._exported_step != trainer.global_step:
            pl_module.export_sae(self.directory)
            self._exported_step = trainer.global_step
            log.info("Exported the SAE at step %d to %s", trainer.global_step, self.directory)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._export(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._export(trainer, pl_module)
