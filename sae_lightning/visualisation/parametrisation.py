"""Fourier-space image parametrisation with decorrelated colour (Olah et al. 2017; Lucid's `fft_image`).

An image is not optimised pixel by pixel: its parameters are the real and imaginary parts of its 2-D
spectrum, in a decorrelated colour space, each frequency scaled by 1 / |frequency|^decay_power so that
gradient steps move all frequencies about equally (a natural image's spectrum falls like 1/f; pixel-space
gradients are dominated by high frequencies and give noise). The image is

    t = irfft2(spectrum * scale) / 4                      [N, 3, H, W]  (decorrelated colour)
    z = C t   (per pixel, C = Lucid's ImageNet colour-correlation square root, column-normalised)
    x = sigmoid(z) in (0, 1)                               [N, 3, H, W]  (RGB)

`FourierImage.from_images` inverts all three steps, so an image in (0, 1) round-trips exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Lucid's square root of ImageNet's RGB colour covariance (its SVD), rows = R, G, B.
COLOR_CORRELATION_SVD_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOR_MATRIX = COLOR_CORRELATION_SVD_SQRT / COLOR_CORRELATION_SVD_SQRT.norm(dim=0).max()
LUCID_SPECTRUM_DIVISOR = 4.0  # Lucid's empirical constant: keeps the initial image in sigmoid's linear range


def spectrum_scale(height: int, width: int, decay_power: float = 1.0) -> torch.Tensor:
    """Per-frequency scale [H, W//2+1]: sqrt(H*W) / max(|f|, 1/max(H, W))^decay_power (Lucid's)."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(width, dtype=torch.float64)[None, :]
    freqs = torch.sqrt(fy**2 + fx**2)
    scale = 1.0 / freqs.clamp_min(1.0 / max(height, width)) ** decay_power
    return (scale * math.sqrt(height * width)).float()


def decorrelated_to_rgb(t: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] decorrelated colour -> [N, 3, H, W] RGB logits (before the sigmoid)."""
    return torch.einsum("ij,njhw->nihw", COLOR_MATRIX.to(t), t)


def rgb_to_decorrelated(z: torch.Tensor) -> torch.Tensor:
    """Inverse of `decorrelated_to_rgb`."""
    inverse = torch.linalg.inv(COLOR_MATRIX.double()).to(z)
    return torch.einsum("ij,njhw->nihw", inverse, z)


class FourierImage(nn.Module):
    """N images [N, 3, H, W] in (0, 1) parametrised by their scaled spectra (one parameter tensor).

    `spectrum` is [N, 3, H, W//2+1, 2] (real, imaginary); initialised N(0, init_std^2) like Lucid, image i
    from its own `torch.Generator().manual_seed(seeds[i])` (so a start does not depend on the rest of the
    batch; default seeds 0..N-1), or from images with `from_images`. `forward()` returns the RGB images.
    """

    def __init__(self, n: int, size: int | tuple[int, int], *, decay_power: float = 1.0, init_std: float = 0.01,
                 seeds: list[int] | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        self.height, self.width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.decay_power = decay_power
        self.register_buffer("scale", spectrum_scale(self.height, self.width, decay_power).to(device))
        seeds = list(range(n)) if seeds is None else list(seeds)
        if len(seeds) != n:
            raise ValueError(f"{n} images but {len(seeds)} seeds")
        shape = (3, self.height, self.width // 2 + 1, 2)
        init = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) * init_std for s in seeds]
        self.spectrum = nn.Parameter(torch.stack(init).to(device))

    def decorrelated(self) -> torch.Tensor:
        """[N, 3, H, W] the image in decorrelated colour space, before the sigmoid."""
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        return torch.fft.irfft2(spectrum, s=(self.height, self.width)) / LUCID_SPECTRUM_DIVISOR

    def forward(self) -> torch.Tensor:
        """[N, 3, H, W] RGB images in (0, 1)."""
        return torch.sigmoid(decorrelated_to_rgb(self.decorrelated()))

    @classmethod
    def from_images(cls, images: torch.Tensor, *, decay_power: float = 1.0, eps: float = 1e-4) -> "FourierImage":
        """The parametrisation whose `forward()` is `images` [N, 3, H, W] in [0, 1] (clamped to [eps, 1-eps])."""
        n, c, h, w = images.shape
        if c != 3:
            raise ValueError(f"expected RGB images [N, 3, H, W], got {tuple(images.shape)}")
        param = cls(n, (h, w), decay_power=decay_power, init_std=0.0, device=images.device)
        z = torch.logit(images.double().clamp(eps, 1 - eps))
        t = rgb_to_decorrelated(z) * LUCID_SPECTRUM_DIVISOR
        spectrum = torch.fft.rfft2(t) / param.scale.double()
        with torch.no_grad():
            param.spectrum.copy_(torch.view_as_real(spectrum).float())
        return param
