"""The LightningModule: the seed's SAE training step with manual optimisation (docs/training.md).

Manual optimisation keeps the step's order explicit and cheap: renormalise the decoder rows, forward with
ghost grads for the features dead for more than `dead_feature_window` steps, backward, remove the
gradient parallel to each decoder row, Adam step, warm-up schedule step, dead-feature counters.

The step never waits for the device. A non-finite loss or gradient is caught on the device: fused Adam
skips the update (its `found_inf` input, the mechanism of torch's GradScaler), the dead-feature counters
keep their values, and the host learns of it at the next health check (every `log_every_n_steps`, before
every checkpoint and export, at the end), which stops the run with the step and the cause. Nothing is ever
updated by a non-finite step, and a diverged SAE (non-finite parameters, or a reconstruction error far
above the data's variance) is never checkpointed or exported.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule

from sae_lightning.metrics import L0, ExplainedVariance, ExplainedVarianceUncentred, FeatureDensity, density_counts
from sae_lightning.sae import SparseAutoencoder
from sae_lightning.sae import functional as F_sae

log = logging.getLogger(__name__)

B_DEC_INITS = ("geometric_median", "mean", "none")
NORMALISATIONS = ("none", "expected_average_only_in")
RESAMPLE_RNG_KEY = "sae_lightning_resample_rng"  # checkpoint entry: the resampling generator's state
RESAMPLE_RNG_VERSION = 1
RESAMPLE_SEED_TAG = 0x5E5A  # mixed with the run seed: resampling's stream is not the run's global one
RESUME_ADVICE = ("The last checkpoint holds the state before this happened: lower lr (or l1_coefficient) and "
                 "resume with ckpt_path=<run>/checkpoints/last.ckpt.")


def lr_schedule(warmup_steps: int, decay_steps: int = 0, total_steps: int = 0):
    """LambdaLR factor of step s (0-based): linear from 1/warmup to 1 over `warmup_steps` steps, constant, and
    with `decay_steps` > 0 linear down to 0 over the last `decay_steps` of `total_steps` steps: the final step
    runs at 1/decay_steps of the lr (SAELens's `lr_decay_steps` with lr_end = lr; Anthropic's SAE update of
    April 2024 decays over the last 20%). Hand-written because it is one line of arithmetic that checkpoints
    restore through LambdaLR's step count, where chaining torch's LinearLR schedulers needs the milestones.
    """
    if decay_steps > 0 and warmup_steps + decay_steps > total_steps:
        raise ValueError(f"the lr warm-up ({warmup_steps} steps) and decay ({decay_steps} steps) must fit in the "
                         f"run's {total_steps} steps: lower schedule.lr_warmup or schedule.lr_decay")

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        return warm * min(1.0, max(total_steps - step, 0) / decay_steps) if decay_steps > 0 else warm
    return factor


class TrainingDiverged(FloatingPointError):
    """The SAE's loss, gradients or parameters left the finite range, or its reconstructions exploded."""


class SAETrainingModule(LightningModule):
    """Trains one SparseAutoencoder (any architecture in `sae_lightning.sae`) on `{"activations": [N, d]}` batches.

    `ghost_grads`: pass the dead-feature mask to the SAE's loss, which applies its own dead-feature method:
    ghost grads for the standard SAE, AuxK for TopK, BatchTopK and Matryoshka (JumpReLU and Gated ignore it).

    The schedule arguments are in optimiser steps; `train.py` derives them from the config's `schedule`
    (in activations seen) for the run's batch size and number of devices. `lr_decay_steps` > 0: the lr falls
    linearly to 0 over the last `lr_decay_steps` of `total_steps` (None: the trainer's `max_steps`), see
    `lr_schedule`; 0 (the seed's schedule): constant after the warm-up.
    `divergence_explained_variance`: a logged step whose centred explained variance is below this value
    (a reconstruction error more than 1 - value times the variance of the inputs) stops the run.
    `compile`: run the SAE's loss through torch.compile.
    `resample_dead`: at the end of every density window, re-initialise the features that never fired in it
    (Anthropic-style resampling, `functional.resample_dead_features`, on the latest batch), resetting their
    per-feature biases and Adam moments. An option beside ghost grads / AuxK, off by default.
    `grad_clip_norm`: clip the SAE's total gradient norm to this before each Adam step (SAELens clips at 1);
    None (the default): no clipping. An SAE with free decoder norms (`decoder_norm="free"`) is neither
    renormalised nor projected.
    `resample_seed`: the seed of this SAE's own resampling generator; None (the default) derives it from the
    run's `seed` (train.py's `run_config["seed"]`; 0 without one), so an SAE of a multi-SAE run
    resamples exactly as its single run does. The generator's state is saved in checkpoints
    (`sae_lightning_resample_rng`), so a resumed run draws what the uninterrupted one would.
    """

    def __init__(self, sae: SparseAutoencoder, lr: float = 4e-4, lr_warmup_steps: int = 500,
                 lr_decay_steps: int = 0, total_steps: int | None = None,
                 adam_betas: tuple[float, float] = (0.9, 0.999), ghost_grads: bool = True,
                 dead_feature_window: int = 64, feature_sampling_window: int = 500,
                 b_dec_init: str = "geometric_median", normalize_activations: str = "none",
                 divergence_explained_variance: float = -1000.0, compile: bool = False,
                 resample_dead: bool = False, resample_seed: int | None = None,
                 grad_clip_norm: float | None = None):
        super().__init__()
        if b_dec_init not in B_DEC_INITS:
            raise ValueError(f"b_dec_init must be one of {B_DEC_INITS}, got {b_dec_init!r}")
        if normalize_activations not in NORMALISATIONS:
            raise ValueError(f"normalize_activations must be one of {NORMALISATIONS}, got {normalize_activations!r}")
        if lr_decay_steps > 0 and total_steps is not None:
            lr_schedule(lr_warmup_steps, lr_decay_steps, total_steps)  # refuses a decay that does not fit
        self.save_hyperparameters(ignore=["sae"], logger=False)  # train.py logs the whole config instead
        self.automatic_optimization = False
        self.sae = sae
        self.register_buffer("steps_since_fired", torch.zeros(sae.d_sae, dtype=torch.long))
        self.register_buffer("first_buffer_seen", torch.tensor(False))
        self.register_buffer("activation_scale", torch.ones(()))
        # device-side health record, read only at health checks: steps skipped as non-finite, the first one,
        # and whether its input activations were themselves non-finite
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("first_skipped_step", torch.full((), -1, dtype=torch.long), persistent=False)
        self.register_buffer("first_skipped_input_bad", torch.zeros((), dtype=torch.bool), persistent=False)
        self.explained_variance = ExplainedVariance(sae.d_in)
        self.explained_variance_uncentred = ExplainedVarianceUncentred()
        self.l0 = L0()
        self.window_density = FeatureDensity(sae.d_sae)
        self.density_ready: torch.Tensor | None = None
        self.last_metrics: dict[str, float] = {}  # the last logged values (final hparams metrics, progress bar)
        self.run_config: dict | None = None  # the composed config, stored in checkpoints by train.py's runs
        self._first_buffer_seen_host = False  # a host copy, so the hot path never reads the device flag
        self._last_batch: torch.Tensor | None = None  # the latest step's inputs [N, d], for health checks
        self._compiled_loss = torch.compile(sae.loss) if compile else None
        # set by MultiSAETrainingModule for its members: their own optimiser and schedule (stepped without
        # Lightning's step counting), loggers (their own TensorBoard run) and a sink for callback metrics
        self.bound_optimizer: tuple[Any, Any] | None = None
        self.sae_loggers: list | None = None
        self.metric_sink: Any = None
        # resampling's own random stream (never the global one, which other SAEs of the run also draw from):
        # created on first use on the SAE's device, seeded by `resampling_seed()` or restored from a checkpoint
        self._resample_generator: torch.Generator | None = None
        self._resample_rng_loaded: dict[str, Any] | None = None
        self.run_seed: int | None = None  # a member of a multi-SAE run: the run's seed (its own run_config is None)

    def configure_optimizers(self) -> dict[str, Any]:
        # fused: one kernel per step, and it honours `found_inf` on the device (a skipped step changes nothing)
        optimizer = torch.optim.Adam(self.sae.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.adam_betas),
                                     fused=True)
        total = self.hparams.total_steps
        if total is None and self.hparams.lr_decay_steps > 0:
            total = self.trainer.max_steps  # a module built by hand: the trainer's step count ends the decay
            if total is None or total <= 0:
                raise ValueError("lr_decay_steps needs the run's length: pass total_steps, or give the Trainer "
                                 "max_steps")
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_schedule(self.hparams.lr_warmup_steps, self.hparams.lr_decay_steps, total or 0))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1 and dist.is_available() \
            and dist.is_initialized()

    def _from_rank_zero(self, tensor: torch.Tensor) -> torch.Tensor:
        """Under DDP every rank must start from the same statistics: rank 0's, broadcast in place on the device."""
        if self._distributed():
            tensor = tensor.detach().clone().contiguous()
            dist.broadcast(tensor, src=0)
        return tensor

    @torch.no_grad()
    def on_first_buffer(self, activations: torch.Tensor) -> None:
        """Statistics of the first shuffle buffer: the activation scale, then b_dec (in the scaled space)."""
        activations = activations.float()
        if self.hparams.normalize_activations == "expected_average_only_in":
            norms = activations.norm(dim=-1)
            scale = activations.shape[-1] ** 0.5 / norms.mean()
            if not math.isfinite(float(scale)):  # once per run: the read is free
                raise ValueError(f"The first buffer's mean activation norm is {float(norms.mean())}: activations "
                                 "are all zero or non-finite, so they cannot be normalised. Check the data.")
            self.activation_scale.copy_(self._from_rank_zero(scale))
            log.info("Scaling activations by %.4g so their mean norm is sqrt(d).", float(self.activation_scale))
            activations = activations * self.activation_scale
        if self.hparams.b_dec_init != "none":
            self.initialise_b_dec(activations)
        self.first_buffer_seen.fill_(True)

    @torch.no_grad()
    def initialise_b_dec(self, activations: torch.Tensor) -> None:
        """b_dec <- geometric median (or mean) of the first buffer of activations [M, d]."""
        if self.hparams.b_dec_init == "geometric_median":
            centre = F_sae.geometric_median(activations.float())
        else:
            centre = activations.float().mean(0)
        self.sae.b_dec.copy_(self._from_rank_zero(centre.to(self.sae.b_dec.dtype)))
        log.info("Initialised b_dec (%s) from %d activations.", self.hparams.b_dec_init, activations.shape[0])

    def dead_mask(self) -> torch.Tensor | None:
        """Features [F] that have not fired for more than `dead_feature_window` steps (ghost grads' targets).

        None while no feature can be dead yet (the host knows from the step count, without asking the device).
        """
        if not self.hparams.ghost_grads or self.global_step <= self.hparams.dead_feature_window:
            return None
        return self.steps_since_fired > self.hparams.dead_feature_window

    def _non_finite(self, total: torch.Tensor) -> torch.Tensor:
        """1.0 (float, on the device) when the loss or any gradient is non-finite, else 0.0; agreed across ranks."""
        grads = [p.grad for p in self.sae.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else total.new_zeros(())
        flag = (~(torch.isfinite(total) & torch.isfinite(grad_norm))).float()
        if self._distributed():  # every rank skips the same steps
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag

    def _optimizer(self) -> Any:
        return self.bound_optimizer[0] if self.bound_optimizer is not None else self.optimizers()

    def _scheduler(self) -> Any:
        return self.bound_optimizer[1] if self.bound_optimizer is not None else self.lr_schedulers()

    def _loggers(self) -> list:
        return self.sae_loggers if self.sae_loggers is not None else self.loggers

    def prepare_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The SAE's inputs [N, d] (scaled), after the first-buffer statistics; None while the buffer fills."""
        x = batch["activations"]
        if x.shape[0] == 0:
            return None  # the shuffle buffer is still filling
        if not self._first_buffer_seen_host:
            if not self.first_buffer_seen:  # one device read per run (and after loading a checkpoint)
                self.on_first_buffer(batch.get("init_activations", x))
            self._first_buffer_seen_host = True
        if self.hparams.normalize_activations != "none":
            x = x * self.activation_scale
        return x

    def forward_loss(self, x: torch.Tensor) -> Any:
        """Renormalise the decoder rows, then the SAE's loss on x [N, d] (with the dead-feature mask)."""
        if self.sae.unit_decoder_rows:
            F_sae.normalise_decoder_rows(self.sae.W_dec)
        return (self._compiled_loss or self.sae.loss)(x, dead_mask=self.dead_mask())

    def apply_step(self, x: torch.Tensor, out: Any, step: int, force_skip: bool = False) -> None:
        """After backward: project the decoder gradient, Adam (skipped on the device when non-finite), warm-up
        schedule, dead-feature counters. `force_skip`: change nothing (a stopped member of a multi-SAE run)."""
        optimizer, scheduler = self._optimizer(), self._scheduler()
        if self.sae.unit_decoder_rows:
            F_sae.remove_parallel_gradient(self.sae.W_dec)
        skip = self._non_finite(out.total.detach())
        if self.hparams.get("grad_clip_norm") is not None:  # after the check: a non-finite step is skipped anyway
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.hparams.grad_clip_norm)
        if force_skip:
            skip = torch.ones_like(skip)
        getattr(optimizer, "optimizer", optimizer).found_inf = skip  # fused Adam changes nothing when 1
        optimizer.step()
        scheduler.step()

        with torch.no_grad():
            if not force_skip:
                self._record_skip(skip, x, step)
            n_inputs = x.shape[0]
            fire_counts = (out.feature_acts > 0).sum(0)
            if self.trainer.world_size > 1:  # the same dead features (ghost grads) on every rank
                fire_counts = self.trainer.strategy.reduce(fire_counts, reduce_op="sum")
                n_inputs = x.shape[0] * self.trainer.world_size
            keep = skip.bool()  # a skipped step leaves the counters alone
            advanced = self.steps_since_fired.add(1).masked_fill_(fire_counts > 0, 0)
            self.steps_since_fired.copy_(torch.where(keep, self.steps_since_fired, advanced))
            self.window_density.update(fire_counts * (1 - skip).to(fire_counts.dtype), n_inputs)
        self._last_batch = x.detach()

    def after_step(self, x: torch.Tensor, out: Any) -> None:
        """Once the step is counted: the density window, and every `log_every_n_steps` the health check
        (raises TrainingDiverged) and the logged scalars."""
        if self.global_step % self.hparams.feature_sampling_window == 0:
            self.close_density_window()
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.check_health()
            self.log_step(x, out)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        x = self.prepare_batch(batch)
        if x is None:
            return None
        step = self.global_step  # this step's index (global_step counts it once the optimiser has stepped)
        out = self.forward_loss(x)
        self._optimizer().zero_grad(set_to_none=True)
        self.manual_backward(out.total)
        self.apply_step(x, out, step)
        self.after_step(x, out)
        return out.total.detach()

    @torch.no_grad()
    def _record_skip(self, skip: torch.Tensor, x: torch.Tensor, step: int) -> None:
        """Device-side bookkeeping of skipped steps (no host read)."""
        first = (self.first_skipped_step < 0) & skip.bool()
        self.first_skipped_step.copy_(torch.where(first, torch.full_like(self.first_skipped_step, step),
                                                  self.first_skipped_step))
        input_bad = ~torch.isfinite(x).all()
        self.first_skipped_input_bad.copy_(torch.where(first, input_bad, self.first_skipped_input_bad))
        self.skipped_steps.add_(skip.long())

    @torch.no_grad()
    def check_health(self) -> None:
        """Raise TrainingDiverged if a step was non-finite or the SAE diverged (one device read)."""
        if int(self.skipped_steps):
            step = int(self.first_skipped_step)
            if bool(self.first_skipped_input_bad):
                cause = (f"the input activations of step {step} contained NaN or inf: the data or the backbone "
                         "produced them, not the SAE (try data.autocast=32; check the shards or stored "
                         "activations).")
            else:
                cause = (f"the loss or its gradients became non-finite at step {step} with finite inputs: "
                         "lr or l1_coefficient is too high for these activations.")
            raise TrainingDiverged(f"Training stopped: {cause} That step and {int(self.skipped_steps) - 1} later "
                                   f"one(s) were skipped, so nothing was updated by them. {RESUME_ADVICE}")
        norm = float(torch.nn.utils.get_total_norm([p.detach() for p in self.sae.parameters()]))
        if not math.isfinite(norm):
            raise TrainingDiverged(f"Training stopped at step {self.global_step}: the SAE's parameters are "
                                   f"non-finite (norm {norm}). {RESUME_ADVICE}")
        if self._last_batch is not None:  # the latest batch, reconstructed by the parameters as they are now
            x = self._last_batch
            x_hat = self.sae(x).double()
            x = x.double()
            variance = (x - x.mean(0)).pow(2).sum()
            ev = float(1 - (x - x_hat).pow(2).sum() / variance) if float(variance) > 0 else 0.0
            if not math.isfinite(ev) or ev < self.hparams.divergence_explained_variance:
                raise TrainingDiverged(
                    f"Training stopped at step {self.global_step}: the SAE diverged (explained variance {ev:.3g} "
                    f"on this step's batch, below module.divergence_explained_variance="
                    f"{self.hparams.divergence_explained_variance:g}; parameter norm {norm:.3g}). {RESUME_ADVICE}")

    def on_train_end(self) -> None:
        self.check_health()  # a run never ends "successfully" with skipped or diverged steps

    def on_train_start(self) -> None:
        self.follow_config_lr()

    def follow_config_lr(self) -> None:
        """Make the optimiser follow this run's `lr`, `adam_betas` and schedule after a checkpoint restore.

        Lightning restores Adam's param groups (lr, initial_lr, betas) and the scheduler's base lrs from the
        checkpoint, so without this a resume with another `lr` would keep the old one, and one with another
        run length would take its first step at the old schedule's lr. A fresh run changes nothing here.
        """
        optimizer, scheduler = self._optimizer(), self._scheduler()
        optimizer = getattr(optimizer, "optimizer", optimizer)
        lr = float(self.hparams.lr)
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        before = optimizer.param_groups[0]["lr"]
        scheduler.base_lrs = [lr] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["initial_lr"], group["lr"], group["betas"] = lr, lr * factor, tuple(self.hparams.adam_betas)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
        if not math.isclose(before, lr * factor, rel_tol=1e-6, abs_tol=1e-12):
            log.info("lr at step %d: %.3g (the checkpoint's optimiser had %.3g): this run's lr and schedule apply",
                     scheduler.last_epoch, lr * factor, before)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["sae_lightning_config"] = self.run_config
        if self.hparams.resample_dead:
            checkpoint[RESAMPLE_RNG_KEY] = self.resample_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.load_resample_rng_state(checkpoint.get(RESAMPLE_RNG_KEY))

    def resampling_seed(self) -> int:
        """The seed of this SAE's resampling generator: `resample_seed`, else one derived from the run's seed."""
        if self.hparams.get("resample_seed") is not None:
            return int(self.hparams.resample_seed)
        run_seed = self.run_seed if self.run_seed is not None else (self.run_config or {}).get("seed")
        # a fixed tag: the run seed's own stream (initialisation, data order) is not reused for resampling
        return int(np.random.SeedSequence([int(run_seed or 0), RESAMPLE_SEED_TAG]).generate_state(1)[0])

    def resample_generator(self) -> torch.Generator:
        """This SAE's resampling generator, on the SAE's device (restored from a checkpoint where it was saved)."""
        device = self.sae.W_dec.device
        if self._resample_generator is None or self._resample_generator.device != device:
            generator = torch.Generator(device=device)
            loaded = self._resample_rng_loaded
            if loaded is not None and loaded.get("device") == device.type:
                generator.set_state(loaded["state"])
            else:
                if loaded is not None:
                    log.warning("The checkpoint's resampling generator state is for %s, this run trains on %s: "
                                "resampling restarts from its seed (not an exact resume).", loaded.get("device"),
                                device.type)
                generator.manual_seed(self.resampling_seed())
            self._resample_generator, self._resample_rng_loaded = generator, None
        return self._resample_generator

    def resample_rng_state(self) -> dict[str, Any]:
        """What a checkpoint stores of the resampling generator (docs/training.md, "Checkpoints")."""
        generator = self.resample_generator()
        return {"version": RESAMPLE_RNG_VERSION, "device": generator.device.type, "state": generator.get_state()}

    def load_resample_rng_state(self, state: dict[str, Any] | None) -> None:
        """Restore the generator on first use; None (a checkpoint from before it was saved): from its seed."""
        self._resample_generator = None
        if state is not None and state.get("version") != RESAMPLE_RNG_VERSION:
            raise ValueError(f"checkpoint resampling generator version {state.get('version')!r} is not "
                             f"{RESAMPLE_RNG_VERSION}: written by another version of sae_lightning.")
        self._resample_rng_loaded = state

    def export_sae(self, directory, step: int | None = None) -> None:
        """Save the SAE for raw (unscaled) activations: a training-time scale s is folded into the weights.

        The SAE trained on s*x computes its pre-activations from (s x - b) W_enc and x_hat = (f W_dec + b)/s,
        which is exactly the same SAE with W_enc' = s W_enc, W_dec' = W_dec / s, b_dec' = b / s on x
        (`SparseAutoencoder.rescaled`; thresholds and gates of every architecture are unchanged).
        """
        scale = float(self.activation_scale)
        sae = self.sae
        if scale != 1.0:
            sae = self.sae.rescaled(scale, {"activation_scale": scale, "normalize_activations_during_training":
                                            self.hparams.normalize_activations})
        sae.save(directory, step=step)

    def close_density_window(self) -> None:
        """Log dead/ultra-rare/dense counts over the window; the histogram callback draws `density_ready`."""
        density = self.window_density.compute()
        self.window_density.reset()
        self.density_ready = density
        # not on the final step: the export would hold fresh features that never trained
        final = self._trainer is not None and 0 < self.trainer.max_steps <= self.global_step
        if self.hparams.resample_dead and self._last_batch is not None and not final:
            self.resample(density == 0)
        self.log_scalars({f"features/{k}": v for k, v in density_counts(density).items()})

    # per-feature parameters re-initialised with a resampled feature: encoder biases and gates to 0
    RESAMPLED_BIASES = ("b_enc", "b_gate", "b_mag", "r_mag")

    @torch.no_grad()
    def resample(self, dead: torch.Tensor) -> None:
        """Re-initialise the features in `dead` [F] from the latest batch; zero their biases and Adam moments."""
        sae, x = self.sae, self._last_batch
        dead = self._from_rank_zero(dead.to(torch.uint8)).bool()
        F_sae.resample_dead_features(x, sae(x), sae.b_dec, sae.W_enc, sae.W_dec, dead,
                                     generator=self.resample_generator())
        self._from_rank_zero_params(("W_enc", "W_dec"))
        for name in self.RESAMPLED_BIASES:
            if isinstance(getattr(sae, name, None), torch.Tensor):
                getattr(sae, name).masked_fill_(dead, 0.0)
        optimizer = self._optimizer()
        optimizer = getattr(optimizer, "optimizer", optimizer)
        for name, param in sae.named_parameters():
            mask = {"W_enc": dead[None, :], "W_dec": dead[:, None]}.get(name, dead if param.shape == dead.shape
                                                                          else None)
            state = optimizer.state.get(param, {})
            if mask is None:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key].masked_fill_(mask, 0.0)

    def _from_rank_zero_params(self, names: tuple[str, ...]) -> None:
        """Under DDP, the resampled weights of rank 0 on every rank (resampling drew from each rank's batch)."""
        if self._distributed():
            for name in names:
                dist.broadcast(getattr(self.sae, name).data, src=0)

    @torch.no_grad()
    def log_step(self, x: torch.Tensor, out: Any) -> None:
        """Losses, metrics and counters for this step (only every `log_every_n_steps`)."""
        x_hat, f = out.reconstruction, out.feature_acts
        plain_mse = (x_hat - x).pow(2).mean()
        normalised_mse = F_sae.mse_elementwise(x_hat, x, normalised=True).mean()
        for metric, args in ((self.explained_variance, (x_hat, x)),
                             (self.explained_variance_uncentred, (x_hat, x)), (self.l0, (f,))):
            metric.update(*args)
        dead = self.dead_mask()
        values = {
            "losses/mse": out.mse, "losses/l1": out.l1, "losses/ghost": out.ghost, "losses/total": out.total,
            "metrics/mse": plain_mse, "metrics/mse_normalised": normalised_mse,
            "metrics/l0": self.l0.compute(), "metrics/explained_variance": self.explained_variance.compute(),
            "metrics/explained_variance_uncentred": self.explained_variance_uncentred.compute(),
            "features/ghost_grad_features": dead.sum() if dead is not None else 0.0,
            "features/dead_in_window": (self.steps_since_fired > self.hparams.dead_feature_window).sum(),
            "lr": self._scheduler().get_last_lr()[0],
        }
        for metric in (self.explained_variance, self.explained_variance_uncentred, self.l0):
            metric.reset()
        if hasattr(self.sae, "topk_threshold"):  # BatchTopK's inference threshold, as it will be exported
            values["features/topk_threshold"] = self.sae.topk_threshold
        datamodule = getattr(self.trainer, "datamodule", None)
        for name in ("images_seen", "activations_seen", "samples_skipped"):
            if hasattr(datamodule, name):
                values[f"progress/{name}"] = float(getattr(datamodule, name))
        self.log_scalars(values)

    def log_scalars(self, values: dict[str, Any]) -> None:
        """Write scalars to every logger at x = optimiser steps (buffer-filling batches are not steps).

        The same values go to `callback_metrics` (self.log with logger=False), so ModelCheckpoint and
        EarlyStopping can monitor any of them by name, e.g. monitor="metrics/explained_variance_uncentred".
        """
        scalars = {k: float(v) for k, v in values.items()}
        self.last_metrics.update(scalars)
        for logger in self._loggers():
            logger.log_metrics(scalars, step=self.global_step)
        if self.metric_sink is not None:  # a member of a multi-SAE run: the run logs them under <name>/
            self.metric_sink(scalars)
        else:
            self.log_dict(scalars, logger=False, on_step=True, on_epoch=False, batch_size=1)


class MultiSAETrainingModule(LightningModule):
    """Trains several SAEs on the same activation stream: every member sees exactly the same batches.

    Each member is a full `SAETrainingModule` (its own SAE, fused-Adam optimiser, warm-up schedule,
    dead-feature counters, density window, health check, loggers); this module only runs them side by side.
    One backward pass goes through the sum of the members' losses: the members share no parameter, so every
    member gets exactly the gradient its own loss gives (a non-finite loss in one member reaches no other).
    Each member's optimiser skips its own non-finite steps on the device, so the step stays free of host
    reads. A member whose health check fails (non-finite step, non-finite parameters, divergence) is
    *stopped*: it takes no further step, is no longer exported (its folder keeps its last healthy export)
    and `training_stopped.json` in its folder says when and why; the others train on. Only when every
    member has stopped does the run stop (TrainingDiverged).

    Checkpoints hold every member (state dict `saes.<name>.*`, one optimiser and scheduler state per member
    in `names` order), which members stopped and, with resampling, each member's own resampling generator
    (`sae_lightning_resample_rng`: name -> state); `export_sae(directory)` writes `<directory>/<name>/`.
    """

    STOPPED_FILE = "training_stopped.json"

    def __init__(self, members: dict[str, SAETrainingModule], resolved_configs: dict[str, str] | None = None):
        super().__init__()
        if not members:
            raise ValueError("MultiSAETrainingModule needs at least one SAE")
        self.automatic_optimization = False
        self.names = list(members)
        self.saes = torch.nn.ModuleDict(members)
        self.resolved_configs = dict(resolved_configs or {})  # name -> the member's resolved config (YAML text)
        self.register_buffer("stopped", torch.zeros(len(members), dtype=torch.bool))
        self.stopped_info: dict[str, dict[str, Any]] = {}  # name -> {"step", "reason"}
        self._stopped_host: list[bool] | None = None  # a host copy, read from `stopped` once per fit
        self.export_directory: Any = None  # train.py: where the members' folders are (for training_stopped.json)
        self.run_config: dict | None = None
        self.last_metrics: dict[str, float] = {}
        for name, member in members.items():
            member.metric_sink = self._sink(name)

    def members(self) -> list[tuple[str, SAETrainingModule]]:
        return [(name, self.saes[name]) for name in self.names]

    def running(self) -> list[tuple[str, SAETrainingModule]]:
        stopped = self._stopped()
        return [(name, m) for i, (name, m) in enumerate(self.members()) if not stopped[i]]

    def _stopped(self) -> list[bool]:
        if self._stopped_host is None:
            self._stopped_host = [bool(s) for s in self.stopped.tolist()]
        return self._stopped_host

    def _sink(self, name: str):
        def sink(scalars: dict[str, float]) -> None:
            prefixed = {f"{name}/{k}": v for k, v in scalars.items()}
            self.last_metrics.update(prefixed)
            self.log_dict(prefixed, logger=False, on_step=True, on_epoch=False, batch_size=1)
        return sink

    def setup(self, stage: str) -> None:
        for _, member in self.members():  # Lightning hands the trainer to direct children only
            member.trainer = self.trainer
            if self.run_config is not None:  # the run seed that its resampling generator derives from
                member.run_seed = self.run_config.get("seed")

    def configure_optimizers(self) -> tuple[list, list]:
        optimizers, schedulers = [], []
        for _, member in self.members():
            config = member.configure_optimizers()
            optimizers.append(config["optimizer"])
            schedulers.append(config["lr_scheduler"])
        return optimizers, schedulers

    def _bind_optimizers(self) -> None:
        """Each member steps its own torch optimiser directly: Lightning counts one step per batch (below)."""
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        for (_, member), optimizer, scheduler in zip(self.members(), optimizers, schedulers):
            member.bound_optimizer = (getattr(optimizer, "optimizer", optimizer), scheduler)

    def _count_step(self) -> None:
        """One global step for the batch (N optimisers stepped directly would not be counted by Lightning)."""
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def _distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1 and dist.is_available() \
            and dist.is_initialized()

    def on_fit_start(self) -> None:
        self._stopped_host = None
        self._bind_optimizers()

    def on_train_start(self) -> None:
        self._bind_optimizers()  # the restored optimisers: each member then follows its own lr and schedule
        for _, member in self.members():
            member.follow_config_lr()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if batch["activations"].shape[0] == 0:
            return None  # the shuffle buffer is still filling
        # under DDP every member takes part in the backward (DDP expects every parameter's gradient);
        # a stopped one is then forced to skip its step, else it is left out
        stopped = self._stopped()
        active = [(i, name, m) for i, (name, m) in enumerate(self.members())
                  if not stopped[i] or self._distributed()]
        if self.saes[self.names[0]].bound_optimizer is None:
            self._bind_optimizers()
        step = self.global_step
        xs, outs = {}, {}
        for _, name, member in active:
            xs[name] = member.prepare_batch(batch)
            outs[name] = member.forward_loss(xs[name])
            member._optimizer().zero_grad(set_to_none=True)
        total = torch.stack([outs[name].total for _, name, _ in active]).sum()
        self.manual_backward(total)
        for i, name, member in active:
            member.apply_step(xs[name], outs[name], step, force_skip=stopped[i])
        self._count_step()
        # each member's `after_step`, with the health checks agreed across ranks before any member logs (a
        # check on a rank's own batch may fail on one rank only; logging syncs metrics across ranks)
        for i, _, member in active:
            if not stopped[i] and self.global_step % member.hparams.feature_sampling_window == 0:
                member.close_density_window()
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.check_health()  # stops the failing members on every rank; raises once all have stopped
            for name, member in self.running():
                member.log_step(xs[name], outs[name])
        return total.detach()

    def _stop(self, name: str, err: Exception) -> None:
        """Stop one member: no further step or export; the reason goes to the log and its folder."""
        index = self.names.index(name)
        self.stopped[index] = True
        self._stopped()[index] = True
        reason = str(err)
        self.stopped_info[name] = {"step": int(self.global_step), "reason": reason}
        log.error("SAE %r stopped at step %d, the others train on: %s", name, self.global_step, reason)
        self._write_stopped(name)

    def _write_stopped(self, name: str) -> None:
        if self.export_directory is None or (self._trainer is not None and not self.trainer.is_global_zero):
            return
        import json
        from pathlib import Path

        from sae_lightning.sae.io import read_sae_step

        folder = Path(self.export_directory) / name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            exported = read_sae_step(folder) if (folder / "cfg.json").is_file() else None
        except Exception:  # noqa: BLE001 - an unreadable export is reported as none
            exported = None
        record = {**self.stopped_info[name], "format_version": 1, "name": name, "exported_step": exported}
        tmp = folder / (self.STOPPED_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(folder / self.STOPPED_FILE)

    def _all_stopped_check(self) -> None:
        if all(self._stopped()):
            lines = "\n".join(f"  {n}: {info['reason']}" for n, info in self.stopped_info.items())
            raise TrainingDiverged(f"Training stopped: every SAE of the run stopped.\n{lines}")

    @torch.no_grad()
    def check_health(self) -> None:
        """Each running member's health check; a failing one is stopped (raises only when all have stopped).

        Under DDP the ranks agree (a member stops everywhere when it fails on any rank)."""
        failed: dict[str, Exception] = {}
        for name, member in self.running():
            try:
                member.check_health()
            except TrainingDiverged as err:
                failed[name] = err
        for name, err in self._agree_on_failures(failed).items():
            self._stop(name, err)
        self._all_stopped_check()

    def _agree_on_failures(self, failed: dict[str, Exception]) -> dict[str, Exception]:
        """Under DDP, the members whose health check failed on any rank (a check on a rank's own batch, such
        as the explained variance, may fail on one rank only): every rank then stops the same members."""
        if not self._distributed():
            return failed
        flags = torch.tensor([name in failed for name in self.names], device=self.device, dtype=torch.uint8)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        running = dict(self.running())
        agreed = dict(failed)
        for name, flag in zip(self.names, flags.tolist()):
            if flag and name not in agreed and name in running:
                agreed[name] = TrainingDiverged("another rank's health check failed for this SAE")
        return agreed

    def on_train_end(self) -> None:
        self.check_health()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["sae_lightning_config"] = self.run_config
        checkpoint["sae_lightning_stopped"] = dict(self.stopped_info)
        generators = {name: m.resample_rng_state() for name, m in self.members() if m.hparams.resample_dead}
        if generators:  # each member's own resampling generator, by name
            checkpoint[RESAMPLE_RNG_KEY] = generators

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.stopped_info = dict(checkpoint.get("sae_lightning_stopped") or {})
        self._stopped_host = None
        generators = checkpoint.get(RESAMPLE_RNG_KEY) or {}
        for name, member in self.members():
            member.load_resample_rng_state(generators.get(name))

    def export_sae(self, directory, step: int | None = None) -> None:
        """Every running member to `<directory>/<name>/` (SAELens layout) with its `resolved.yaml`."""
        from pathlib import Path

        for name, member in self.running():
            folder = Path(directory) / name
            member.export_sae(folder, step=step)
            if name in self.resolved_configs:
                tmp = folder / "resolved.yaml.tmp"
                tmp.write_text(self.resolved_configs[name])
                tmp.replace(folder / "resolved.yaml")
