"""The LightningModule: the seed's SAE training step (DESIGN section 5) with manual optimisation.

Manual optimisation keeps the step's order explicit and cheap: renormalise the decoder rows, forward with
ghost grads for the features dead for more than `dead_feature_window` steps, backward, remove the
gradient parallel to each decoder row, Adam step, warm-up schedule step, dead-feature counters.
Metrics and logging run only every `log_every_n_steps`, so a step costs what the bare math costs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch import LightningModule

from sae_lightning.metrics import L0, ExplainedVariance, ExplainedVarianceUncentred, FeatureDensity, density_counts
from sae_lightning.sae import SparseAutoencoder
from sae_lightning.sae import functional as F_sae

log = logging.getLogger(__name__)

B_DEC_INITS = ("geometric_median", "mean", "none")
NORMALISATIONS = ("none", "expected_average_only_in")


def linear_warmup(warmup_steps: int):
    """LambdaLR factor: linear from 1/warmup to 1 over `warmup_steps` steps, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class SAETrainingModule(LightningModule):
    """Trains one SparseAutoencoder on `{"activations": [N, d]}` batches."""

    def __init__(self, sae: SparseAutoencoder, lr: float = 4e-4, lr_warmup_steps: int = 500,
                 adam_betas: tuple[float, float] = (0.9, 0.999), ghost_grads: bool = True,
                 dead_feature_window: int = 64, feature_sampling_window: int = 500,
                 b_dec_init: str = "geometric_median", normalize_activations: str = "none"):
        super().__init__()
        if b_dec_init not in B_DEC_INITS:
            raise ValueError(f"b_dec_init must be one of {B_DEC_INITS}, got {b_dec_init!r}")
        if normalize_activations not in NORMALISATIONS:
            raise ValueError(f"normalize_activations must be one of {NORMALISATIONS}, got {normalize_activations!r}")
        self.save_hyperparameters(ignore=["sae"])
        self.automatic_optimization = False
        self.sae = sae
        self.register_buffer("steps_since_fired", torch.zeros(sae.d_sae, dtype=torch.long))
        self.register_buffer("first_buffer_seen", torch.tensor(False))
        self.register_buffer("activation_scale", torch.ones(()))
        self.explained_variance = ExplainedVariance(sae.d_in)
        self.explained_variance_uncentred = ExplainedVarianceUncentred()
        self.l0 = L0()
        self.window_density = FeatureDensity(sae.d_sae)
        self.density_ready: torch.Tensor | None = None
        self._first_buffer_seen_host = False  # a host copy, so the hot path never reads the device flag

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(self.sae.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.adam_betas))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup(self.hparams.lr_warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _from_rank_zero(self, tensor: torch.Tensor) -> torch.Tensor:
        """Under DDP every rank must start from the same statistics: rank 0's."""
        if self._trainer is not None and self.trainer.world_size > 1:
            return self.trainer.strategy.broadcast(tensor, src=0)
        return tensor

    @torch.no_grad()
    def on_first_buffer(self, activations: torch.Tensor) -> None:
        """Statistics of the first shuffle buffer: the activation scale, then b_dec (in the scaled space)."""
        activations = activations.float()
        if self.hparams.normalize_activations == "expected_average_only_in":
            scale = activations.shape[-1] ** 0.5 / activations.norm(dim=-1).mean()
            self.activation_scale.copy_(self._from_rank_zero(scale))
            log.info("Scaling activations by %.4g so their mean norm is sqrt(d).", float(self.activation_scale))
            activations = activations * self.activation_scale
        if self.hparams.b_dec_init != "none":
            self.initialise_b_dec(activations)
        self.first_buffer_seen.fill_(True)

    @torch.no_grad()
    def initialise_b_dec(self, activations: torch.Tensor) -> None:
        """b_dec <- geometric median (or mean) of the first buffer of activations."""
        if self.hparams.b_dec_init == "geometric_median":
            centre = F_sae.geometric_median(activations.float())
        else:
            centre = activations.float().mean(0)
        self.sae.b_dec.copy_(self._from_rank_zero(centre).to(self.sae.b_dec.dtype))
        log.info("Initialised b_dec (%s) from %d activations.", self.hparams.b_dec_init, activations.shape[0])

    def dead_mask(self) -> torch.Tensor | None:
        """Features that have not fired for more than `dead_feature_window` steps (ghost grads' targets)."""
        if not self.hparams.ghost_grads:
            return None
        return self.steps_since_fired > self.hparams.dead_feature_window

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        x = batch["activations"]
        if x.shape[0] == 0:
            return None  # the shuffle buffer is still filling
        if not self._first_buffer_seen_host:
            if not self.first_buffer_seen:  # one device read per run (and after loading a checkpoint)
                self.on_first_buffer(batch.get("init_activations", x))
            self._first_buffer_seen_host = True
        if self.hparams.normalize_activations != "none":
            x = x * self.activation_scale
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()

        F_sae.normalise_decoder_rows(self.sae.W_dec)
        out = self.sae.loss(x, dead_mask=self.dead_mask())
        non_finite = (~torch.isfinite(out.total)).float()
        if self.trainer.world_size > 1:  # every rank stops together, none waits forever in a collective
            non_finite = self.trainer.strategy.reduce(non_finite, reduce_op="sum")
        if non_finite:
            raise FloatingPointError(
                f"The SAE loss became {out.total.item()} at step {self.global_step} (mse={out.mse.item():.4g}, "
                f"l1={out.l1.item():.4g}, ghost={out.ghost.item():.4g}). Nothing was updated; the last "
                f"checkpoint is intact. Lower lr or l1_coefficient and resume with ckpt_path=<run>/checkpoints/"
                f"last.ckpt, or check the activations (data.autocast=32)."
            )
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(out.total)
        F_sae.remove_parallel_gradient(self.sae.W_dec)
        optimizer.step()
        scheduler.step()

        with torch.no_grad():
            n_inputs = x.shape[0]
            fire_counts = (out.feature_acts > 0).sum(0)
            if self.trainer.world_size > 1:  # the same dead features (ghost grads) on every rank
                fire_counts = self.trainer.strategy.reduce(fire_counts, reduce_op="sum")
                n_inputs = x.shape[0] * self.trainer.world_size
            self.steps_since_fired.add_(1).masked_fill_(fire_counts > 0, 0)
            self.window_density.update(fire_counts, n_inputs)
        if self.global_step % self.hparams.feature_sampling_window == 0:
            self.close_density_window()
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.log_step(x, out)
        return out.total.detach()

    def export_sae(self, directory) -> None:
        """Save the SAE for raw (unscaled) activations: a training-time scale s is folded into the weights.

        The SAE trained on s*x computes f = ReLU((s x - b) W_enc + b_enc) and x_hat = (f W_dec + b)/s, which is
        exactly the standard SAE with W_enc' = s W_enc, W_dec' = W_dec / s, b_dec' = b / s on x.
        """
        scale = float(self.activation_scale)
        if scale == 1.0:
            self.sae.save(directory)
            return
        folded = SparseAutoencoder(self.sae.d_in, self.sae.d_sae, l1_coefficient=self.sae.l1_coefficient,
                                   mse=self.sae.mse_kind, metadata={**self.sae.metadata, "activation_scale": scale,
                                   "normalize_activations_during_training": self.hparams.normalize_activations})
        with torch.no_grad():
            folded.W_enc.copy_(self.sae.W_enc * scale)
            folded.W_dec.copy_(self.sae.W_dec / scale)
            folded.b_enc.copy_(self.sae.b_enc)
            folded.b_dec.copy_(self.sae.b_dec / scale)
        folded.save(directory)

    def close_density_window(self) -> None:
        """Log dead/ultra-rare/dense counts over the window; the histogram callback draws `density_ready`."""
        density = self.window_density.compute()
        self.window_density.reset()
        self.density_ready = density
        self.log_scalars({f"features/{k}": v for k, v in density_counts(density).items()})

    @torch.no_grad()
    def log_step(self, x: torch.Tensor, out: Any) -> None:
        """Losses, metrics and counters for this step (only every `log_every_n_steps`)."""
        x_hat, f = out.reconstruction, out.feature_acts
        plain_mse = (x_hat - x).pow(2).mean()
        normalised_mse = F_sae.mse_elementwise(x_hat, x, normalised=True).mean()
        for metric, args in ((self.explained_variance, (x_hat, x)),
                             (self.explained_variance_uncentred, (x_hat, x)), (self.l0, (f,))):
            metric.update(*args)
        values = {
            "losses/mse": out.mse, "losses/l1": out.l1, "losses/ghost": out.ghost, "losses/total": out.total,
            "metrics/mse": plain_mse, "metrics/mse_normalised": normalised_mse,
            "metrics/l0": self.l0.compute(), "metrics/explained_variance": self.explained_variance.compute(),
            "metrics/explained_variance_uncentred": self.explained_variance_uncentred.compute(),
            "features/ghost_grad_features": (self.dead_mask().sum() if self.hparams.ghost_grads else 0.0),
            "features/dead_in_window": (self.steps_since_fired > self.hparams.dead_feature_window).sum(),
            "lr": self.lr_schedulers().get_last_lr()[0],
        }
        for metric in (self.explained_variance, self.explained_variance_uncentred, self.l0):
            metric.reset()
        datamodule = getattr(self.trainer, "datamodule", None)
        for name in ("images_seen", "activations_seen", "samples_skipped"):
            if hasattr(datamodule, name):
                values[f"progress/{name}"] = float(getattr(datamodule, name))
        self.log_scalars(values)
        self.log_dict({"loss": out.total.detach(), "l0": values["metrics/l0"],
                       "ev": values["metrics/explained_variance_uncentred"]}, prog_bar=True, logger=False)

    def log_scalars(self, values: dict[str, Any]) -> None:
        """Write scalars to every logger at x = optimiser steps (buffer-filling batches are not steps)."""
        scalars = {k: float(v) for k, v in values.items()}
        for logger in self.loggers:
            logger.log_metrics(scalars, step=self.global_step)
