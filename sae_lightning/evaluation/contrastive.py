"""CLIP's contrastive loss and zero-shot accuracy, three ways: original, SAE spliced in, zero-ablated.

The blocks up to `layer` run once per batch (`Backbone.residual`); only the remaining blocks run three
times (`Backbone.forward_from`). Class text embeddings are computed once and reused.

Loss per batch (the seed's): B images and the B prompts "A photo of a {label}." of their own labels,
logits = logit_scale * img @ txt.T on L2-normalised features, loss = (CE(logits, arange) +
CE(logits.T, arange)) / 2. With duplicate labels in a batch two prompt rows are identical; we keep the
seed's choice (the target is the image's own prompt row) so the loss has a floor above zero that is the
same for all three ways, and the score (a ratio of differences) is comparable across runs with the same
batch size. The loss depends on the batch size, so aggregates use full batches only (mean of per-batch
losses; the seed's batch is 1,024); zero-shot top-1 is over all classes and counts every labelled image.
The batch-free measure beside it: the mean over images of KL(p_original || p_sae) (and p_ablated), p the
zero-shot class distribution softmax(logit_scale * img @ class_text.T).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_lightning.backbone import replace_tokens, select_tokens

WAYS = ("original", "sae", "ablated")
PROMPT_TEMPLATE = "A photo of a {}."


def clip_contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float
                          ) -> Tensor:
    """Symmetric cross-entropy between B images and their B texts (row i matches row i)."""
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    logits = float(logit_scale) * img @ txt.T
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@torch.no_grad()
def class_text_features(backbone, classnames: list[str], batch_size: int = 256) -> Tensor:
    """Normalised text embeddings [C, e] of "A photo of a {name}." for every class, in label order."""
    prompts = [PROMPT_TEMPLATE.format(name) for name in classnames]
    chunks = [backbone.encode_text(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    return F.normalize(torch.cat(chunks).float(), dim=-1)


@torch.no_grad()
def three_way_features(backbone, residual: Tensor, layer: int, tokens: str, reconstruction: Tensor
                       ) -> dict[str, Tensor]:
    """Image features [B, e] from the residual at `layer`: as is, with the hooked tokens replaced by the
    SAE `reconstruction` (shape of `select_tokens`), and with them zeroed."""
    spliced = replace_tokens(residual, tokens, reconstruction.to(residual.dtype))
    ablated = replace_tokens(residual, tokens, torch.zeros_like(select_tokens(residual, tokens)))
    return {
        "original": backbone.forward_from(residual, layer),
        "sae": backbone.forward_from(spliced, layer),
        "ablated": backbone.forward_from(ablated, layer),
    }


class ContrastiveAccumulator:
    """Mean per-batch contrastive loss, zero-shot top-1 and the batch-free KL, fed any number of images.

    Labelled images are buffered and scored in batches of exactly `batch_size` (the loss depends on the
    batch size, so a remainder smaller than a batch is left out of the loss). Zero-shot accuracy counts
    every labelled image. The KL divergences need no label: every image counts. Unlabelled images (label
    -1) are counted, and `compute` says why the loss is undefined when it is.
    """

    def __init__(self, class_features: Tensor, logit_scale: Tensor | float, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"contrastive batch size must be positive, got {batch_size}")
        self.class_features = class_features
        self.logit_scale = float(logit_scale)
        self.batch_size = batch_size
        self.loss_sum = dict.fromkeys(WAYS, 0.0)
        self.correct = dict.fromkeys(WAYS, 0)
        self.kl_sum = dict.fromkeys(WAYS[1:], 0.0)
        self.n_batches = 0
        self.n_images = 0  # labelled images (zero-shot accuracy)
        self.n_kl_images = 0  # all images (KL)
        self.n_unlabelled = 0
        self._buffer: dict[str, list[Tensor]] = {way: [] for way in (*WAYS, "labels")}
        self._buffered = 0

    def _log_probs(self, img: Tensor) -> Tensor:
        """[B, C] log softmax of the zero-shot logits (CLIP's logit scale) of normalised image features."""
        return torch.log_softmax(self.logit_scale * img @ self.class_features.T, dim=-1)

    @torch.no_grad()
    def update(self, features: dict[str, Tensor], labels: Tensor) -> None:
        """features: way -> [B, e] image features; labels: [B] (-1 = unlabelled)."""
        labels = labels.to(self.class_features.device)
        known = labels >= 0
        img = {way: F.normalize(features[way].float(), dim=-1) for way in WAYS}
        log_p = {way: self._log_probs(img[way]) for way in WAYS}
        for way in WAYS:
            pred = log_p[way][known].argmax(-1)
            self.correct[way] += int((pred == labels[known]).sum())
        for way in WAYS[1:]:  # KL(p_original || p_way) per image, summed
            kl = F.kl_div(log_p[way], log_p["original"], log_target=True, reduction="none").sum(-1)
            self.kl_sum[way] += kl.double().sum().item()
        self.n_kl_images += labels.shape[0]
        self.n_images += int(known.sum())
        self.n_unlabelled += int((~known).sum())
        for way in WAYS:
            self._buffer[way].append(img[way][known])
        self._buffer["labels"].append(labels[known])
        self._buffered += int(known.sum())
        if self._buffered >= self.batch_size:
            self._score_full_batches()

    def _score_full_batches(self) -> None:
        buffered = {key: torch.cat(parts) for key, parts in self._buffer.items()}
        n_full = self._buffered // self.batch_size
        for i in range(n_full):
            rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
            txt = self.class_features[buffered["labels"][rows]]
            for way in WAYS:
                self.loss_sum[way] += clip_contrastive_loss(buffered[way][rows], txt, self.logit_scale).item()
        self.n_batches += n_full
        rest = slice(n_full * self.batch_size, None)
        self._buffer = {key: [value[rest]] for key, value in buffered.items()}
        self._buffered -= n_full * self.batch_size

    @staticmethod
    def undefined() -> dict[str, Any]:
        """The same keys as `compute_all`, all NaN (e.g. no class names, so no prompts)."""
        keys = [f"contrastive_loss_{w}" for w in WAYS] + [f"zero_shot_accuracy_{w}" for w in WAYS]
        keys += [f"zero_shot_kl_{w}" for w in WAYS[1:]]
        out: dict[str, Any] = dict.fromkeys([*keys, "contrastive_loss_score"], math.nan)
        return out | {"contrastive_batches": 0, "contrastive_unlabelled_images": 0}

    def undefined_reason(self) -> str | None:
        """Why the contrastive loss is undefined (None when it is defined)."""
        if self.n_batches:
            return None
        have = f"{self.n_images} labelled image(s)"
        if self.n_unlabelled:
            have += f" ({self.n_unlabelled} more without a label: their shards have no .cls)"
        return (f"no full batch of {self.batch_size} labelled images: {have}. Evaluate more labelled "
                f"images or lower the contrastive batch size (the loss is then not comparable with the "
                f"seed's, at 1,024).")

    def compute(self) -> dict[str, float]:
        """The three losses, accuracies and the score."""
        nb, ni = self.n_batches or math.nan, self.n_images or math.nan
        out = {f"contrastive_loss_{way}": self.loss_sum[way] / nb for way in WAYS}
        out |= {f"zero_shot_accuracy_{way}": self.correct[way] / ni for way in WAYS}
        out["contrastive_loss_score"] = contrastive_loss_score(
            out["contrastive_loss_original"], out["contrastive_loss_sae"], out["contrastive_loss_ablated"])
        return out

    def compute_all(self) -> dict[str, Any]:
        """`compute` plus the batch-free KL divergences and the counts (numbers only, fit for a logger)."""
        nk = self.n_kl_images or math.nan
        out: dict[str, Any] = self.compute()
        out |= {f"zero_shot_kl_{way}": self.kl_sum[way] / nk for way in WAYS[1:]}
        out["contrastive_batches"] = self.n_batches
        out["contrastive_unlabelled_images"] = self.n_unlabelled
        return out


def contrastive_loss_score(original: float, sae: float, ablated: float) -> float:
    """(L_sae - L_orig) / (L_ablated - L_orig): 0 = as good as the original, 1 = as bad as ablation."""
    denom = ablated - original
    return (sae - original) / denom if denom != 0 and math.isfinite(denom) else math.nan


@torch.no_grad()
def evaluate_batch(backbone, sae, images: Tensor, labels: Tensor, layer: int, tokens: str,
                   class_features: Tensor, logit_scale: Tensor | float) -> dict[str, float]:
    """The three losses, accuracies and score on one batch of images (used by the training callback)."""
    residual = backbone.residual(images, layer)
    recon = sae(select_tokens(residual, tokens))
    acc = ContrastiveAccumulator(class_features, logit_scale, images.shape[0])
    acc.update(three_way_features(backbone, residual, layer, tokens, recon), labels)
    return acc.compute_all()
