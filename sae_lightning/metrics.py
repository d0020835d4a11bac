"""torchmetrics metrics for SAE reconstructions (definitions: docs/metrics.md).

States are float64 sums so the centred variance of a residual stream with a large mean stays exact, and
they reduce correctly across DDP ranks.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class ExplainedVariance(Metric):
    """1 - sum_b ||x_b - x_hat_b||^2 / sum_b ||x_b - mean(x)||^2 (centred on the mean of all inputs seen)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, d_in: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("residual_ss", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(d_in, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_x2", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x_hat: torch.Tensor, x: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.residual_ss += (x - x_hat).pow(2).sum()
        self.sum_x += x.sum(0)
        self.sum_x2 += x.pow(2).sum()
        self.n += x.shape[0]

    def compute(self) -> torch.Tensor:
        total_ss = self.sum_x2 - self.sum_x.pow(2).sum() / self.n
        return 1 - self.residual_ss / total_ss


class ExplainedVarianceUncentred(Metric):
    """mean_b (1 - ||x_b - x_hat_b||^2 / ||x_b||^2): the seed's 86%.

    Rows with x_b = 0 (a zero-padded token, an empty planted sample) have no defined ratio and are left out of
    the mean (docs/metrics.md).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x_hat: torch.Tensor, x: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        norm2 = x.pow(2).sum(-1)
        defined = norm2 > 0
        ratio = (x - x_hat).pow(2).sum(-1) / torch.where(defined, norm2, torch.ones_like(norm2))
        self.total += torch.where(defined, 1 - ratio, torch.zeros_like(ratio)).sum()
        self.n += defined.sum()

    def compute(self) -> torch.Tensor:
        return self.total / self.n


class L0(Metric):
    """Mean number of features with f > 0 per input."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("active", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, feature_acts: torch.Tensor) -> None:
        self.active += (feature_acts > 0).sum()
        self.n += feature_acts.shape[0]

    def compute(self) -> torch.Tensor:
        return self.active / self.n


class FeatureDensity(Metric):
    """Per-feature firing fraction p_i over everything seen since the last reset."""

    full_state_update = False

    def __init__(self, d_sae: int, **kwargs):
        super().__init__(**kwargs)
        # persistent: a resumed run continues its density window instead of starting a partial one
        self.add_state("fired", torch.zeros(d_sae, dtype=torch.float64), dist_reduce_fx="sum", persistent=True)
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum", persistent=True)

    def update(self, fire_counts: torch.Tensor, n_inputs: int) -> None:
        """`fire_counts[i]`: how many of the `n_inputs` inputs fired feature i (the step computes it once)."""
        self.fired += fire_counts
        self.n += n_inputs

    def compute(self) -> torch.Tensor:
        return self.fired / self.n.clamp_min(1)


def density_counts(density: torch.Tensor) -> dict[str, int]:
    """Dead (p = 0), ultra-rare (p < 1e-5) and dense (p > 0.1) feature counts."""
    return {
        "dead_features": int((density == 0).sum()),
        "ultra_rare_features": int((density < 1e-5).sum()),
        "dense_features": int((density > 0.1).sum()),
    }


def log10_density(density: torch.Tensor) -> torch.Tensor:
    """log10(p + 1e-10): the x-axis of every density histogram."""
    return torch.log10(density + 1e-10)
