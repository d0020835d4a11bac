"""The optimisation: several features x several random starts in one batch, a few hundred Adam steps.

Image b = (feature g, start s) lives at b = g * n_starts + s. Each step renders the Fourier images, applies
one random transformation per image, runs the backbone up to `layer` (under autocast when asked, as in
training), reads the feature's pre-ReLU activation on the hooked token(s), reduces over tokens (mean or max
for patches/all) and ascends it; the optional diversity term penalises Gram similarity between the starts of
a feature. Pre-ReLU, so a feature that is off at the start still has a gradient. Every image's start and
transformations come from its own generator seeded by (seed, feature, start): the result for a feature does
not depend on which other features share its batch.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from sae_lightning.backbone import Backbone
from sae_lightning.sae import SparseAutoencoder
from sae_lightning.visualisation.objective import (
    REDUCTIONS,
    feature_pre_activations,
    gram_diversity,
    hooked_tokens,
    image_activation,
    reduce_tokens,
)
from sae_lightning.visualisation.parametrisation import FourierImage
from sae_lightning.visualisation.transforms import TransformConfig, random_transform, resize


@dataclass
class VisualisationResult:
    """Optimised images and what they reach (F features, S starts)."""

    features: list[int]
    images: torch.Tensor  # [F, S, 3, H, W] float in [0, 1], quantised to 8 bits (what the PNG holds), CPU
    activations: torch.Tensor  # [F, S] per-image activation of the final 8-bit image (ReLU, max over tokens)
    objective: torch.Tensor  # [F, S] the optimised quantity (pre-ReLU, mean/max over tokens) of the final image
    history: torch.Tensor  # [steps, F, S] the objective under that step's random transformation
    seconds: float  # wall time of the whole optimisation


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def visualise_features(backbone: Backbone, sae: SparseAutoencoder, features: list[int], *, layer: int,
                       tokens: str, n_starts: int = 4, steps: int = 256, lr: float = 0.05, objective: str = "mean",
                       diversity: float = 0.0, transforms: TransformConfig | None = None,
                       image_size: int | None = None, decay_power: float = 1.0, init_std: float = 0.01,
                       seed: int = 0, autocast: torch.dtype | None = None) -> VisualisationResult:
    """Optimise n_starts images per feature of `features` (all in one batch) on the backbone's device.

    The parametrised image is image_size^2 (default: the model's input size); the transformed view fed to
    the model is always the model's input size. autocast: None (fp32) or a dtype for the backbone blocks;
    the SAE objective is always fp32. The final activations are measured in fp32 on the untransformed image.
    """
    if objective not in REDUCTIONS:
        raise ValueError(f"objective must be one of {REDUCTIONS}, got {objective!r}")
    if n_starts < 1 or steps < 0:
        raise ValueError(f"need n_starts >= 1 and steps >= 0, got n_starts={n_starts}, steps={steps}")
    bad = [f for f in features if not 0 <= int(f) < sae.d_sae]
    if bad:
        raise ValueError(f"features {bad} are out of range: the SAE has features 0..{sae.d_sae - 1}")
    transforms = transforms or TransformConfig()
    device = backbone.device
    sae = sae.to(device)
    out_size = backbone.image_size
    size = int(image_size or out_size)
    pairs = [(int(f), s) for f in features for s in range(n_starts)]
    feats = torch.tensor([f for f, _ in pairs], device=device)
    param = FourierImage(len(pairs), size, decay_power=decay_power, init_std=init_std,
                         seeds=[_seed(seed, f, s, 0) for f, s in pairs], device=device)
    generators = [torch.Generator().manual_seed(_seed(seed, f, s, 1)) for f, s in pairs]
    optimiser = torch.optim.Adam(param.parameters(), lr=lr)
    ctx = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast is not None else contextlib.nullcontext
    history = torch.zeros(steps, len(pairs))
    start = time.perf_counter()
    for step in range(steps):
        views = random_transform(param(), generators, transforms, out_size)
        with ctx():
            x = hooked_tokens(backbone, views, layer, tokens)
        value = reduce_tokens(feature_pre_activations(sae, x, feats), objective)  # [B] fp32
        loss = -value.sum()
        if diversity > 0 and n_starts > 1:
            size_of = value.detach().abs().reshape(-1, n_starts).mean(1).repeat_interleave(n_starts)
            loss = loss + diversity * (size_of.clamp_min(1e-6) * gram_diversity(x, n_starts)).sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the objective became {loss.item()} at step {step}; try a smaller lr "
                                     f"or autocast=32")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        history[step] = value.detach().float().cpu()
    with torch.no_grad():
        images = (param().clamp(0, 1) * 255).round() / 255
        x = hooked_tokens(backbone, resize(images, out_size), layer, tokens)
        acts = image_activation(sae, x, feats)
        final = reduce_tokens(feature_pre_activations(sae, x, feats), objective)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    n_f = len(features)
    return VisualisationResult(
        features=[int(f) for f in features],
        images=images.float().cpu().reshape(n_f, n_starts, 3, size, size),
        activations=acts.float().cpu().reshape(n_f, n_starts),
        objective=final.float().cpu().reshape(n_f, n_starts),
        history=history.reshape(steps, n_f, n_starts),
        seconds=time.perf_counter() - start,
    )
