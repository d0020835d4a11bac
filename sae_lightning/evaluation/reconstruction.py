"""Streaming reconstruction metrics of docs/metrics.md over hooked tokens (rows of [N, d]).

Reuses the training metrics (sae_lightning.metrics) and the loss's own mse so evaluation and training can
never define them differently; mse sums are float64 like the metrics' states.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_lightning.metrics import L0, ExplainedVariance, ExplainedVarianceUncentred
from sae_lightning.sae.functional import mse_elementwise


class ReconstructionAccumulator:
    """l0, explained_variance (centred), explained_variance_uncentred, mse, mse_normalised."""

    def __init__(self, d_in: int, device: torch.device | str = "cpu") -> None:
        self.ev = ExplainedVariance(d_in).to(device)
        self.ev_uncentred = ExplainedVarianceUncentred().to(device)
        self.l0 = L0().to(device)
        self.mse_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.mse_norm_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.n_elements = 0

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, acts: Tensor) -> None:
        """x, x_hat: [..., d]; acts: [..., F] with the same leading shape."""
        x, x_hat = x.reshape(-1, x.shape[-1]).float(), x_hat.reshape(-1, x.shape[-1]).float()
        self.ev.update(x_hat, x)
        self.ev_uncentred.update(x_hat, x)
        self.l0.update(acts.reshape(-1, acts.shape[-1]))
        self.mse_sum += mse_elementwise(x_hat, x, normalised=False).sum(dtype=torch.float64)
        self.mse_norm_sum += mse_elementwise(x_hat, x, normalised=True).sum(dtype=torch.float64)
        self.n_elements += x.numel()

    def compute(self) -> dict[str, float]:
        n = max(self.n_elements, 1)
        return {
            "l0": self.l0.compute().item(),
            "explained_variance": self.ev.compute().item(),
            "explained_variance_uncentred": self.ev_uncentred.compute().item(),
            "mse": self.mse_sum.item() / n,
            "mse_normalised": self.mse_norm_sum.item() / n,
        }
