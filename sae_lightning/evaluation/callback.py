"""Training callback: the contrastive-loss delta of the SAE spliced into CLIP, on a fixed held-out batch.

The backbone is frozen, so the residual streams at `layer`, the original and the zero-ablated image
features of the held-out images are computed once at fit start; every `every_n_steps` optimiser steps (train.py
derives it from `schedule.contrastive_every`, in activations) only the SAE branch (SAE + the blocks after
`layer`) runs again. The original and ablated losses are constants: they are logged once, with the batch size
(the loss grows with it: compare runs at the same `batch_size`; evaluate.py uses the seed's 1,024).
Rank 0 only; values go to every logger.
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from sae_lightning.backbone import replace_tokens, select_tokens
from sae_lightning.callbacks import sae_members
from sae_lightning.data.shards import image_batches
from sae_lightning.evaluation.contrastive import (
    ContrastiveAccumulator,
    class_text_features,
    three_way_features,
)

log = logging.getLogger(__name__)


class ContrastiveEvalCallback(Callback):
    """Logs contrastive/loss_{original,sae,ablated}, contrastive/score and contrastive/zero_shot_* ."""

    requires_backbone = True  # train.py leaves it out of runs on stored activations

    def __init__(self, every_n_steps: int = 200, n_images: int = 256, batch_size: int = 64) -> None:
        if every_n_steps < 1 or n_images < 1 or batch_size < 1:
            raise ValueError("every_n_steps, n_images and batch_size must be positive")
        self.every_n_steps, self.n_images, self.batch_size = every_n_steps, n_images, batch_size
        self.enabled = False
        self._last_step = -1
        self._constants_logged = False

    @torch.no_grad()
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.enabled = False
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        if getattr(dm, "val_shards", None) is None:
            log.warning("ContrastiveEvalCallback: no data.val_shards, so no held-out images: contrastive "
                        "loss is not logged during training. Set data.val_shards to enable it.")
            return
        if not getattr(dm, "classnames", None):
            log.warning("ContrastiveEvalCallback: no class names (data.classnames), so no prompts: "
                        "contrastive loss is not logged during training.")
            return
        self.backbone, self.layer, self.tokens = dm.backbone, dm.layer, dm.tokens
        device = pl_module.device
        self.backbone.to(device)
        images, labels = self._held_out_batch(dm.val_shards)
        if images is None:
            log.warning("ContrastiveEvalCallback: the validation shards hold no image; not logging.")
            return
        self.class_features = class_text_features(self.backbone, dm.classnames)
        self.logit_scale = self.backbone.logit_scale()
        self.residuals, self.labels, self.fixed = [], [], []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start : start + self.batch_size].to(device)
            residual = self.backbone.residual(batch, self.layer)
            zero = torch.zeros_like(select_tokens(residual, self.tokens))
            feats = three_way_features(self.backbone, residual, self.layer, self.tokens, zero)
            self.residuals.append(residual)
            self.labels.append(labels[start : start + self.batch_size].to(device))
            self.fixed.append({"original": feats["original"], "ablated": feats["ablated"]})
        self.enabled = True
        log.info("ContrastiveEvalCallback: %d held-out images, logging every %d steps.",
                 images.shape[0], self.every_n_steps)

    def _held_out_batch(self, urls: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The first n_images of the validation shards, in a fixed order (no shuffling): same every run."""
        images, labels, n = [], [], 0
        for batch in image_batches(urls, self.backbone.preprocess, self.batch_size, shuffle=0,
                                   shardshuffle=False, partial=True):
            images.append(batch["images"])
            labels.append(batch["labels"])
            n += len(batch["labels"])
            if n >= self.n_images:
                break
        if not images:
            return None, None
        return torch.cat(images)[: self.n_images], torch.cat(labels)[: self.n_images]

    @torch.no_grad()
    def evaluate(self, sae: torch.nn.Module, scale: float = 1.0) -> dict[str, float]:
        """The three losses/accuracies and the score for the current SAE (eval mode, restored after).

        `scale` is the training-time activation scale: the SAE sees scale * x and its output is unscaled.
        """
        was_training = sae.training
        sae.eval()
        acc = ContrastiveAccumulator(self.class_features, self.logit_scale, self.batch_size)
        try:
            for residual, labels, fixed in zip(self.residuals, self.labels, self.fixed):
                recon = sae(select_tokens(residual, self.tokens).float() * scale) / scale
                spliced = replace_tokens(residual, self.tokens, recon.to(residual.dtype))
                acc.update(dict(fixed, sae=self.backbone.forward_from(spliced, self.layer)), labels)
        finally:
            sae.train(was_training)
        values = acc.compute_all()
        return {k: v for k, v in values.items() if k not in ("contrastive_batches", "contrastive_unlabelled_images")}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
                           ) -> None:
        step = trainer.global_step
        if not self.enabled or step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        stopped = getattr(pl_module, "stopped_info", {})
        for name, module, loggers in sae_members(trainer, pl_module):  # each SAE of a multi-SAE run, to its run
            if name in stopped:
                continue
            values = self.evaluate(module.sae, float(getattr(module, "activation_scale", 1.0)))
            metrics = {f"contrastive/{_short(k)}": v for k, v in values.items()}
            constant = [k for k in metrics if k.endswith(("_original", "_ablated"))]
            if self._constants_logged is True or name in (self._constants_logged or ()):
                metrics = {k: v for k, v in metrics.items() if k not in constant}  # one point each: frozen model
            else:
                metrics["contrastive/batch_size"] = float(self.batch_size)
                metrics["contrastive/n_images"] = float(self.residuals and sum(len(lab) for lab in self.labels))
                self._constants_logged = True if name is None else {*(self._constants_logged or ()), name}
            if hasattr(module, "last_metrics"):
                module.last_metrics.update(metrics)
            for logger in loggers:
                logger.log_metrics(metrics, step=step)


def _short(key: str) -> str:
    """TensorBoard name: contrastive_loss_sae -> loss_sae, zero_shot_accuracy_sae -> zero_shot_sae, ..."""
    return key.replace("contrastive_loss_score", "score").replace("contrastive_", "").replace("accuracy_", "")
