"""Metric definitions (docs/metrics.md) against hand computations, including accumulation over batches."""

from __future__ import annotations

import torch

from sae_lightning.metrics import L0, ExplainedVariance, ExplainedVarianceUncentred, FeatureDensity, density_counts


def test_explained_variance_centred_and_uncentred_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 5.0], [4.0, 0.0]])
    residual_ss = 1 + 1 + 1
    mean = x.mean(0)
    total_ss = ((x - mean) ** 2).sum().item()  # 8 + 8 = 16
    ev = ExplainedVariance(2)
    ev.update(x_hat[:2], x[:2])
    ev.update(x_hat[2:], x[2:])  # accumulation over batches uses the mean of everything seen
    assert torch.isclose(ev.compute(), torch.tensor(1 - residual_ss / total_ss, dtype=torch.float64))
    per_sample = [1 - 1 / 5, 1 - 1 / 25, 1 - 1 / 25]
    evu = ExplainedVarianceUncentred()
    evu.update(x_hat, x)
    assert torch.isclose(evu.compute(), torch.tensor(sum(per_sample) / 3, dtype=torch.float64))


def test_centred_differs_from_uncentred_with_a_large_mean():
    torch.manual_seed(0)
    x = torch.randn(256, 8) + 100.0
    x_hat = x.mean(0, keepdim=True).expand_as(x)  # predicts only the mean
    ev, evu = ExplainedVariance(8), ExplainedVarianceUncentred()
    ev.update(x_hat, x)
    evu.update(x_hat, x)
    assert abs(ev.compute().item()) < 1e-6  # explains none of the variance
    assert evu.compute().item() > 0.99  # but almost all of the norm


def test_l0_density_and_counts():
    f = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    l0 = L0()
    l0.update(f)
    assert l0.compute().item() == 1.5
    density = FeatureDensity(4)
    density.update((f > 0).sum(0), 2)
    density.update(torch.tensor([0, 0, 1, 0]), 2)
    assert density.compute().tolist() == [0.0, 0.25, 0.75, 0.0]
    counts = density_counts(torch.tensor([0.0, 5e-6, 0.05, 0.5]))
    assert counts == {"dead_features": 1, "ultra_rare_features": 2, "dense_features": 1}


def test_zero_rows_are_left_out_of_the_uncentred_explained_variance():
    """An all-zero row has no ratio ||x - x_hat||^2 / ||x||^2: it must not turn the mean into NaN or -inf."""
    from sae_lightning.metrics import ExplainedVarianceUncentred

    metric = ExplainedVarianceUncentred()
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    x_hat = torch.tensor([[3.0, 3.0], [1.0, 0.0]])
    metric.update(x_hat, x)
    assert float(metric.compute()) == 1 - 1 / 25
