"""Issue 7 item 6: cluster membership is a threshold, monotone in the activation, never a posterior."""

import math

import pytest
import torch

from sae_lightning.evaluation.clusters import decision_boundary, detect_cluster


def _wide_low_band_with_high_tail() -> torch.Tensor:
    """The reproduced case: low band N(-1, 0.5) x 9,000, high band N(0.8, 0.12) x 980, 20 tail features."""
    gen = torch.Generator().manual_seed(0)
    low = -1.0 + 0.5 * torch.randn(9000, generator=gen)
    high = 0.8 + 0.12 * torch.randn(980, generator=gen)
    tail = torch.linspace(1.5, 2.0, 20)
    return torch.cat([low, high, tail])


def test_strongest_features_never_land_in_the_wide_low_cluster():
    x = _wide_low_band_with_high_tail()
    result = detect_cluster(x, torch.ones_like(x, dtype=torch.bool))
    assert result.found
    assert not result.in_cluster[-20:].any()  # the posterior rule put all 20 tail features in the cluster
    members, others = x[result.in_cluster], x[~result.in_cluster]
    assert members.max() < result.threshold <= others.min()  # monotone: one threshold splits the axis
    assert result.means[0] < result.threshold < result.means[1]
    # the boundary sits where the two weighted densities meet
    w, m, s = result.weights, result.means, result.stds
    dens = [w[i] * math.exp(-((result.threshold - m[i]) ** 2) / (2 * s[i] ** 2)) / s[i] for i in (0, 1)]
    assert dens[0] == pytest.approx(dens[1], rel=1e-6)
    # nearly all of the low band and none of the high band
    assert result.in_cluster[:9000].float().mean() > 0.99 and result.in_cluster[9000:].float().mean() < 0.01


def test_decision_boundary_known_values():
    # equal widths and weights: the midpoint
    assert decision_boundary(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.5])) \
        == pytest.approx(1.0)
    # equal widths, low weight 0.9: shifted towards the high mean by s^2 ln(9) / (mu1 - mu0)
    b = decision_boundary(torch.tensor([0.0, 4.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.9, 0.1]))
    assert b == pytest.approx(2.0 + math.log(9) / 4)
    # the low component dominates the whole interval: everything up to the high mean is in the cluster
    assert decision_boundary(torch.tensor([0.0, 0.1]), torch.tensor([1.0, 1.0]), torch.tensor([0.99, 0.01])) \
        == pytest.approx(0.1)
