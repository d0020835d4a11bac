"""CLIP's contrastive loss and zero-shot accuracy, three ways: original, SAE spliced in, zero-ablated.

The blocks up to `layer` run once per batch (`Backbone.residual`); only the remaining blocks run three
times (`Backbone.forward_from`). Class text embeddings are computed once and reused.

Loss per batch (the seed's): B images and the B prompts "A photo of a {label}." of their own labels,
logits = logit_scale * img @ txt.T on L2-normalised features, loss = (CE(logits, arange) +
CE(logits.T, arange)) / 2. With duplicate labels in a batch two prompt rows are identical; we keep the
seed's choice (the target is the image's own prompt row) so the loss has a floor above zero that is the
same for all three ways, and the score (a ratio of differences) is comparable across runs with the same
batch size. The loss depends on the batch size, so aggregates use full batches only (mean of per-batch
losses); zero-shot top-1 is over all classes and counts every image.
"""

from __future__ import annotations

import math

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
    """Mean per-batch contrastive loss (full batches only) and zero-shot top-1 over all classes."""

    def __init__(self, class_features: Tensor, logit_scale: Tensor | float, batch_size: int) -> None:
        self.class_features = class_features
        self.logit_scale = float(logit_scale)
        self.batch_size = batch_size
        self.loss_sum = dict.fromkeys(WAYS, 0.0)
        self.correct = dict.fromkeys(WAYS, 0)
        self.n_batches = 0
        self.n_images = 0

    @torch.no_grad()
    def update(self, features: dict[str, Tensor], labels: Tensor) -> None:
        labels = labels.to(self.class_features.device)
        known = labels >= 0
        full = labels.shape[0] == self.batch_size and bool(known.all())
        for way in WAYS:
            img = F.normalize(features[way].float(), dim=-1)
            pred = (img[known] @ self.class_features.T).argmax(-1)
            self.correct[way] += int((pred == labels[known]).sum())
            if full:
                txt = self.class_features[labels]
                self.loss_sum[way] += clip_contrastive_loss(img, txt, self.logit_scale).item()
        self.n_batches += int(full)
        self.n_images += int(known.sum())

    @staticmethod
    def undefined() -> dict[str, float]:
        """The same keys, all NaN (no class names, so no prompts)."""
        keys = [f"contrastive_loss_{w}" for w in WAYS] + [f"zero_shot_accuracy_{w}" for w in WAYS]
        return dict.fromkeys([*keys, "contrastive_loss_score"], math.nan)

    def compute(self) -> dict[str, float]:
        nb, ni = self.n_batches or math.nan, self.n_images or math.nan
        out = {f"contrastive_loss_{way}": self.loss_sum[way] / nb for way in WAYS}
        out |= {f"zero_shot_accuracy_{way}": self.correct[way] / ni for way in WAYS}
        out["contrastive_loss_score"] = contrastive_loss_score(
            out["contrastive_loss_original"], out["contrastive_loss_sae"], out["contrastive_loss_ablated"])
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
    return acc.compute()
