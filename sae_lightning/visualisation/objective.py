"""What is maximised: an SAE feature's activation at the hooked token(s), through the backbone up to `layer`.

The backbone's own `Backbone.residual` runs without gradients (it serves training); here the same blocks
run with gradients flowing to the input pixels (the weights stay frozen). Nothing after `layer` runs.
"""

from __future__ import annotations

import torch

from sae_lightning.backbone import Backbone, select_tokens
from sae_lightning.sae import SparseAutoencoder

REDUCTIONS = ("mean", "max")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_mean_std(backbone: Backbone) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The model's pixel mean and std: open_clip's `visual.preprocess_cfg`, else the preprocess's Normalize."""
    cfg = getattr(backbone.visual, "preprocess_cfg", None) or {}
    if "mean" in cfg and "std" in cfg:
        return tuple(cfg["mean"]), tuple(cfg["std"])
    for t in getattr(backbone.preprocess, "transforms", []):
        if hasattr(t, "mean") and hasattr(t, "std"):
            return tuple(t.mean), tuple(t.std)
    return OPENAI_MEAN, OPENAI_STD


def normalise_pixels(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] floats in [0, 1] -> the model's normalised input (differentiable).

    Uses `backbone.normalise_pixels` when the backbone has it (the on-device normalisation), otherwise the
    model's preprocess mean/std.
    """
    own = getattr(backbone, "normalise_pixels", None)
    if callable(own):
        return own(images)
    mean, std = preprocess_mean_std(backbone)
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def residual_with_grad(backbone: Backbone, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    """[B, 3, H, W] normalised pixels -> residual stream [B, T, d] at the output of block `layer`, with
    gradients to `pixels`. Only blocks 0..layer run."""
    layer = backbone.resolve_layer(layer)
    visual = backbone.visual
    x = visual._embeds(pixels.to(visual.conv1.weight.dtype))
    transformer = visual.transformer
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    for block in transformer.resblocks[: layer + 1]:
        x = block(x)
    return x if transformer.batch_first else x.transpose(0, 1)


def feature_pre_activations(sae: SparseAutoencoder, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Pre-ReLU activation of feature features[b] on each hooked token of image b.

    x: [B, d] (cls) or [B, T, d]; features: [B] int -> [B] or [B, T]. Only the B needed encoder columns
    are used (not all F features).
    """
    if hasattr(sae, "r_mag"):  # Gated: the magnitude path (its gate reads the same direction, unscaled)
        weight, bias = sae.W_enc * sae.r_mag.exp(), sae.b_mag
    else:  # standard, TopK, BatchTopK, JumpReLU, Matryoshka: the linear encoder before the sparsifier
        weight, bias = sae.W_enc, sae.b_enc
    w = weight[:, features].T  # [B, d]
    centred = x.float() - sae.b_dec
    if centred.dim() == 3:
        return torch.einsum("btd,bd->bt", centred, w) + bias[features][:, None]
    return (centred * w).sum(-1) + bias[features]


def reduce_tokens(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """[B] or [B, T] -> [B]: mean or max over the hooked tokens (cls has one)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"objective must be one of {REDUCTIONS}, got {reduction!r}")
    if values.dim() == 1:
        return values
    return values.mean(1) if reduction == "mean" else values.amax(1)


def image_activation(sae: SparseAutoencoder, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """[B] the evaluation's per-image activation of features[b]: the SAE's own `encode` (so TopK, JumpReLU
    thresholds and Gated gates apply), max over the image's hooked tokens (docs/format-eval.md), so it compares
    with `top_values`."""
    acts = sae.encode(x.float())  # [B, F] or [B, T, F]
    index = features.view(-1, *([1] * (acts.dim() - 1))).expand(*acts.shape[:-1], 1)
    return reduce_tokens(acts.gather(-1, index).squeeze(-1), "max")


def gram_diversity(x: torch.Tensor, n_starts: int) -> torch.Tensor:
    """[B] mean cosine similarity between image b's token Gram matrix and those of the other starts of the
    same feature (Lucid's diversity objective; 0 when n_starts == 1).

    x: [B, d] or [B, T, d] hooked tokens, B = G * n_starts with the starts of a feature contiguous. The Gram
    inner product <X_i^T X_i, X_j^T X_j> = ||X_i X_j^T||_F^2 is computed in token space ([T, T], not [d, d]).
    """
    if n_starts < 2:
        return x.new_zeros(x.shape[0], dtype=torch.float32)
    x = x.float()
    if x.dim() == 2:
        x = x[:, None, :]
    x = x.reshape(-1, n_starts, *x.shape[1:])  # [G, S, T, d]
    cross = torch.einsum("gitd,gjsd->gijts", x, x).pow(2).sum((-1, -2))  # [G, S, S]
    norms = cross.diagonal(dim1=1, dim2=2).clamp_min(1e-12).sqrt()  # [G, S]
    cosine = cross / (norms[:, :, None] * norms[:, None, :])
    off = ~torch.eye(n_starts, dtype=torch.bool, device=x.device)
    return ((cosine * off).sum(2) / (n_starts - 1)).reshape(-1)


def hooked_tokens(backbone: Backbone, images: torch.Tensor, layer: int, tokens: str) -> torch.Tensor:
    """[B, 3, H, W] RGB in [0, 1] -> the SAE's input at `layer`: [B, d] (cls) or [B, T', d]."""
    return select_tokens(residual_with_grad(backbone, normalise_pixels(backbone, images), layer), tokens)
