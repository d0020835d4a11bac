"""Cluster detection on constructed data, and exact encoder-cosine statistics."""

import itertools
import math

import pytest
import torch

from sae_lightning.evaluation.clusters import (
    detect_cluster,
    encoder_cosine_stats,
    mean_pairwise_cosine,
    otsu_threshold,
)


def test_two_clusters_are_found_with_the_low_band_as_cluster():
    gen = torch.Generator().manual_seed(0)
    low = -2.0 + 0.15 * torch.randn(900, generator=gen)  # the big low-activation band
    high = 0.5 + 0.25 * torch.randn(100, generator=gen)
    x = torch.cat([high[:50], low, high[50:]])  # interleaved positions
    truth = torch.zeros(1000, dtype=torch.bool)
    truth[50:950] = True
    live = torch.ones(1000, dtype=torch.bool)
    live[0] = False  # dead features are never members
    x[1] = math.nan  # nor are features without a defined value
    result = detect_cluster(x, live)
    assert result.found and result.separation > 2
    expected = truth & live & ~torch.isnan(x)
    assert torch.equal(result.in_cluster, expected)
    assert result.means[0] == pytest.approx(-2.0, abs=0.05)
    assert result.weights[0] == pytest.approx(0.9, abs=0.01)
    assert -2.0 < otsu_threshold(x[live & ~torch.isnan(x)]) < 0.5


def test_unimodal_data_has_no_cluster():
    x = torch.randn(2000, generator=torch.Generator().manual_seed(1))
    result = detect_cluster(x, torch.ones(2000, dtype=torch.bool))
    assert not result.found and not result.in_cluster.any()


def test_mean_pairwise_cosine_is_exact_and_scale_free():
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(9, 5, generator=gen) * torch.rand(9, 1, generator=gen) * 10
    u = torch.nn.functional.normalize(v, dim=1)
    brute = sum((u[i] @ u[j]).item() for i, j in itertools.combinations(range(9), 2)) / 36
    assert mean_pairwise_cosine(v) == pytest.approx(brute, abs=1e-6)
    assert math.isnan(mean_pairwise_cosine(v[:1]))


def test_encoder_cosine_inside_vs_outside():
    d = 4
    same, e = torch.tensor([1.0, 0, 0, 0]), torch.eye(d)
    w_enc = torch.stack([same * 2, same * 0.5, same * 7, e[1], e[2], -e[1]], 1)  # [d, F] columns
    in_cluster = torch.tensor([True, True, True, False, False, False])
    live = torch.tensor([True, True, True, True, True, False])  # feature 5 is dead: excluded
    stats = encoder_cosine_stats(w_enc, in_cluster, live)
    assert stats["cluster_encoder_cosine_inside"] == pytest.approx(1.0)
    assert stats["cluster_encoder_cosine_outside"] == pytest.approx(0.0)
    assert stats["cluster_encoder_cosine_between"] == pytest.approx(0.0)
