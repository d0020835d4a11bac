"""Transformation robustness (Lucid's `standard_transforms`): a random pad / jitter / scale / rotation of
every image at every step, so the optimum is a pattern the model sees from many viewpoints, not an
adversarial pixel arrangement.

All four are one affine warp per image, sampled with `grid_sample` (bilinear, differentiable):
the model's `out_size` x `out_size` input window looks at the image padded by `pad` (a fraction of its
side, filled with grey 0.5), scaled by s ~ U(scale), rotated by θ ~ U(-rotate, rotate) degrees and shifted
by up to `jitter` (a fraction of the side) in x and y. Lucid's values for 224 px (pad 12 px, jitter 8 + 4 px,
scale 0.9..1.1, rotation ±10°) are the defaults expressed as fractions. With pad = jitter = rotate = 0 and
scale = (1, 1) the warp is the identity (a resize when out_size differs from the image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAD_VALUE = 0.5


@dataclass(frozen=True)
class TransformConfig:
    """Ranges of the random transformation (fractions of the image side, degrees)."""

    pad: float = 0.05
    jitter: float = 0.05
    scale: tuple[float, float] = (0.9, 1.1)
    rotate: float = 10.0

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not (self.pad >= 0 and self.jitter >= 0 and self.rotate >= 0 and 0 < lo <= hi):
            raise ValueError(f"transforms need pad, jitter, rotate >= 0 and 0 < scale[0] <= scale[1]; got {self}")


def sample_params(generators: list[torch.Generator], config: TransformConfig) -> torch.Tensor:
    """[N, 4] (scale, angle in radians, shift x, shift y in normalised coordinates), image i from
    generators[i] (so an image's transformations do not depend on the rest of the batch)."""
    u = torch.stack([torch.rand(4, generator=g, dtype=torch.float64) for g in generators])
    lo, hi = config.scale
    scale = lo + (hi - lo) * u[:, 0]
    angle = math.radians(config.rotate) * (2 * u[:, 1] - 1)
    shift = 2 * config.jitter * (2 * u[:, 2:] - 1)  # the image spans 2 in normalised coordinates
    return torch.cat([scale[:, None], angle[:, None], shift], dim=1).float()


def affine_warp(images: torch.Tensor, params: torch.Tensor, out_size: int, pad: float = 0.0) -> torch.Tensor:
    """[N, 3, H, W] images, [N, 4] params from `sample_params` -> [N, 3, out_size, out_size].

    Output coordinate u (normalised, -1..1) reads the image at R(θ) u (1 + 2 pad) / s + shift; outside
    the image it reads grey.
    """
    n = images.shape[0]
    scale, angle, shift = params[:, 0], params[:, 1], params[:, 2:]
    zoom = (1 + 2 * pad) / scale
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    theta = theta.to(images)
    grid = F.affine_grid(theta, [n, images.shape[1], out_size, out_size], align_corners=False)
    warped = F.grid_sample(images - PAD_VALUE, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped + PAD_VALUE


def random_transform(images: torch.Tensor, generators: list[torch.Generator], config: TransformConfig,
                     out_size: int) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 3, out_size, out_size]: one random pad/jitter/scale/rotation per image."""
    if len(generators) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(generators)} generators")
    return affine_warp(images, sample_params(generators, config), out_size, config.pad)


def resize(images: torch.Tensor, out_size: int) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 3, out_size, out_size] with no random transformation (antialiased bilinear)."""
    if images.shape[-2:] == (out_size, out_size):
        return images
    return F.interpolate(images, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=True)
