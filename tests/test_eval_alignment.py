"""Neuron alignment uses true cosines: known maxima on constructed vectors, whatever their scale."""

import pytest
import torch

from sae_lightning.evaluation.alignment import max_cosine, neuron_alignment


def test_max_cosine_known_values_and_scale_invariance():
    neurons = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    neurons = neurons * torch.tensor([[5.0], [0.1], [3.0], [2.0]])
    vectors = torch.tensor([[2.0, 0, 0], [0, 0, -0.01], [1.0, 1.0, 1.0]])
    best, counts = max_cosine(vectors, neurons, threshold=0.6, chunk=2)
    assert best.tolist() == pytest.approx([1.0, 0.0, (2 / (3**0.5 * 2**0.5))], abs=1e-6)
    assert counts.tolist() == [2, 0, 1]  # 1 and 1/sqrt(2); none; only 0.816 (the three 0.577 < 0.6)
    # scaling either side changes nothing (the seed normalised the wrong axis)
    scaled, _ = max_cosine(vectors * torch.tensor([[100.0], [3.0], [0.001]]), neurons * 1e3)
    assert torch.allclose(scaled, best, atol=1e-6)


def test_baseline_threshold_and_aligned_counts():
    d, h = 64, 256
    gen = torch.Generator().manual_seed(3)
    neurons = torch.randn(h, d, generator=gen)
    aligned = neurons[:5] * torch.tensor([[0.01], [10.0], [1.0], [3.0], [100.0]])  # exactly on a neuron
    random = torch.randn(20, d, generator=gen)
    result = neuron_alignment(torch.cat([aligned, random]), neurons, seed=0)
    assert result.baseline_max_cosine.shape == (25,)
    assert result.threshold == pytest.approx(result.baseline_max_cosine.max().item())
    assert result.threshold < 0.9
    assert torch.allclose(result.max_cosine[:5], torch.ones(5), atol=1e-5)
    assert (result.aligned_counts[:5] >= 1).all()
