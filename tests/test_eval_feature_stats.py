"""Streaming feature statistics against full-data references, and the label entropy."""

import math

import pytest
import torch

from sae_lightning.evaluation.feature_stats import FeatureStatsAccumulator, KeyTable, label_entropy


def _stream(acts: torch.Tensor, labels: torch.Tensor, k: int, batch: int) -> FeatureStatsAccumulator:
    acc = FeatureStatsAccumulator(acts.shape[-1], k)
    for start in range(0, acts.shape[0], batch):
        idx = torch.arange(start, min(start + batch, acts.shape[0]))
        acc.update(acts[idx], labels[idx], idx)
    return acc


def test_streaming_topk_matches_full_sort_with_padding():
    gen = torch.Generator().manual_seed(0)
    n, f, k = 203, 40, 7
    acts = torch.relu(torch.randn(n, f, generator=gen) - 0.5)  # continuous: no ties among positives
    acts[:, 3] = 0.0  # never fires
    acts[:, 5] = 0.0
    acts[[10, 150], 5] = torch.tensor([0.3, 0.9])  # fires on 2 < k images
    labels = torch.randint(0, 5, (n,), generator=gen)
    stats = _stream(acts, labels, k, batch=32).compute()

    ref_v, ref_i = torch.sort(acts.T, dim=1, descending=True)
    for j in range(f):
        n_fire = int((acts[:, j] > 0).sum())
        m = min(k, n_fire)
        assert torch.equal(stats.top_indices[j, :m], ref_i[j, :m])
        assert torch.allclose(stats.top_values[j, :m], ref_v[j, :m])
        assert torch.equal(stats.top_labels[j, :m], labels[ref_i[j, :m]])
        assert torch.all(stats.top_values[j, m:] == -math.inf)
        assert torch.all(stats.top_indices[j, m:] == -1) and torch.all(stats.top_labels[j, m:] == -1)
    assert torch.all(stats.top_indices[3] == -1)
    assert stats.top_indices[5, :2].tolist() == [150, 10]
    assert math.isnan(stats.mean_activation[3]) and math.isnan(stats.mean_top_activation[3])
    assert stats.mean_top_activation[5].item() == pytest.approx(0.6)


def test_density_and_mean_activation_over_tokens():
    acts = torch.zeros(4, 3, 2)  # 4 images x 3 tokens x 2 features
    acts[0, 0, 0] = 1.0
    acts[0, 2, 0] = 3.0
    acts[2, 1, 0] = 2.0
    acts[1, 1, 1] = 5.0
    labels = torch.tensor([0, 1, 2, 3])
    stats = _stream(acts, labels, k=2, batch=3).compute()
    assert stats.n_tokens == 12 and stats.n_images == 4
    assert stats.density.tolist() == pytest.approx([3 / 12, 1 / 12])
    assert stats.image_density.tolist() == pytest.approx([2 / 4, 1 / 4])
    assert stats.mean_activation.tolist() == pytest.approx([2.0, 5.0])
    # per-image activation is the max over the image's tokens
    assert stats.top_values[0].tolist() == [3.0, 2.0] and stats.top_indices[0].tolist() == [0, 2]
    assert stats.entropy_defined.tolist() == [True, True]  # the seed's entropy: defined once a feature fired
    assert stats.label_entropy_images.tolist() == [2, 1]
    assert stats.label_entropy_top_k.isnan().tolist() == [False, True]  # strict: fewer than k=2 images fired


def test_label_entropy_known_distribution_and_undefined():
    values = torch.tensor([[3.0, 1.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([[7, 7, 1, 2], [4, 4, 4, 4], [1, -1, -1, -1]])
    h = label_entropy(values, labels)
    p = torch.tensor([4 / 8, 2 / 8, 2 / 8])
    assert h[0].item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-6)
    assert h[1].item() == pytest.approx(0.0, abs=1e-7)
    assert label_entropy(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long)).isnan().all()

    acts = torch.tensor([[3.0, 1.0], [1.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    stats = _stream(acts, torch.tensor([7, 7, 1, 2]), k=4, batch=2).compute()
    assert stats.label_entropy[0].item() == pytest.approx(h[0].item(), abs=1e-6)
    assert math.isnan(stats.label_entropy_top_k[1])  # strict top-k: 1 < k images fire


def test_key_table_keeps_only_referenced_images():
    acc = FeatureStatsAccumulator(2, k=1)
    table = KeyTable()
    for start in range(0, 6, 2):
        idx = torch.arange(start, start + 2)
        acts = torch.tensor([[1.0, 0.0], [0.0, 2.0]]) * (start + 1)
        acc.update(acts, torch.zeros(2, dtype=torch.long), idx)
        table.add(start, [f"k{i}" for i in idx.tolist()], acc)
    table.prune(acc)
    assert table.keys == {4: "k4", 5: "k5"}


def test_topk_merge_scales_to_65536_features():
    acc = FeatureStatsAccumulator(65536, k=20)
    acts = torch.relu(torch.randn(16, 65536))
    acc.update(acts, torch.zeros(16, dtype=torch.long), torch.arange(16))
    stats = acc.compute()
    assert stats.top_values.shape == (65536, 20)
    assert torch.equal(stats.top_values[:, 0], acts.max(0).values.where(acts.max(0).values > 0, -math.inf))


def test_label_entropy_the_seeds_way_falls_back_to_all_images_that_fired():
    """Issue 7 item 7: fewer than k images fired -> entropy over all of them, with the count; never fired -> NaN."""
    k = 20
    acts = torch.zeros(30, 3)
    acts[:3, 0] = torch.tensor([4.0, 1.0, 3.0])  # feature 0 fires on 3 < 20 images, labels 0, 1, 0
    acts[:, 1] = torch.arange(1, 31, dtype=torch.float32)  # feature 1 fires on all 30
    labels = torch.tensor([0, 1, 0] + [5] * 27)
    stats = _stream(acts, labels, k=k, batch=8).compute()
    p = torch.tensor([7 / 8, 1 / 8])  # label 0: 4 + 3, label 1: 1
    assert stats.label_entropy[0].item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-6)
    assert stats.label_entropy_images.tolist() == [3, 20, 0]
    assert math.isnan(stats.label_entropy_top_k[0])  # the strict value beside it
    # feature 1: its top 20 are images 10..29, all label 5 -> 0, strict and seed's alike
    assert stats.label_entropy[1].item() == pytest.approx(0.0, abs=1e-7)
    assert stats.label_entropy_top_k[1].item() == pytest.approx(0.0, abs=1e-7)
    assert math.isnan(stats.label_entropy[2]) and not stats.entropy_defined[2]  # never fired
