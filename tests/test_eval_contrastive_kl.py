"""Issue 7 item 8: the contrastive loss in batches of contrastive_batch_size images whatever the stream's batch,
and a batch-independent KL divergence of the zero-shot class distributions."""

import math

import pytest
import torch

from sae_lightning.evaluation.contrastive import ContrastiveAccumulator, clip_contrastive_loss

WAYS = ("original", "sae", "ablated")


def _features(n: int, e: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, e, generator=gen)
    return {"original": base, "sae": base + 0.3 * torch.randn(n, e, generator=gen),
            "ablated": torch.randn(n, e, generator=gen)}


def _feed(acc, feats, labels, step):
    for start in range(0, labels.shape[0], step):
        acc.update({w: f[start : start + step] for w, f in feats.items()}, labels[start : start + step])
    return acc.compute_all()


def test_kl_matches_a_hand_computation():
    text = torch.eye(3)
    scale = 2.0
    feats = {"original": torch.tensor([[1.0, 0.0, 0.0]]), "sae": torch.tensor([[0.0, 1.0, 0.0]]),
             "ablated": torch.tensor([[1.0, 0.0, 0.0]])}
    out = _feed(ContrastiveAccumulator(text, scale, batch_size=1), feats, torch.tensor([0]), 1)
    p = torch.softmax(torch.tensor([2.0, 0.0, 0.0]), 0)  # original zero-shot distribution
    q = torch.softmax(torch.tensor([0.0, 2.0, 0.0]), 0)  # spliced
    assert out["zero_shot_kl_sae"] == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-6)
    assert out["zero_shot_kl_ablated"] == pytest.approx(0.0, abs=1e-7)


def test_kl_does_not_depend_on_the_batch_size_but_the_loss_does():
    gen = torch.Generator().manual_seed(1)
    text = torch.nn.functional.normalize(torch.randn(4, 5, generator=gen), dim=1)
    feats, labels = _features(48), torch.randint(0, 4, (48,), generator=gen)
    small = _feed(ContrastiveAccumulator(text, 10.0, batch_size=4), feats, labels, 16)
    large = _feed(ContrastiveAccumulator(text, 10.0, batch_size=48), feats, labels, 16)
    for way in ("sae", "ablated"):
        assert small[f"zero_shot_kl_{way}"] == pytest.approx(large[f"zero_shot_kl_{way}"], rel=1e-6)
        assert small[f"zero_shot_kl_{way}"] > 0
    assert small["contrastive_loss_original"] < large["contrastive_loss_original"]  # grows with the batch


def test_loss_batches_are_independent_of_the_stream_batches():
    """Contrastive batches of 6 from stream batches of 4 (or 5, or 6): the same losses, remainder left out."""
    gen = torch.Generator().manual_seed(2)
    text = torch.nn.functional.normalize(torch.randn(3, 5, generator=gen), dim=1)
    feats, labels = _features(14, seed=3), torch.randint(0, 3, (14,), generator=gen)
    results = [_feed(ContrastiveAccumulator(text, 7.0, batch_size=6), feats, labels, step) for step in (4, 5, 6)]
    expected = {}
    for way in WAYS:
        img = torch.nn.functional.normalize(feats[way], dim=1)
        losses = [clip_contrastive_loss(img[s : s + 6], text[labels[s : s + 6]], 7.0).item() for s in (0, 6)]
        expected[way] = sum(losses) / 2  # images 12, 13 are a partial batch: left out
    for out in results:
        assert out["contrastive_batches"] == 2
        for way in WAYS:
            assert out[f"contrastive_loss_{way}"] == pytest.approx(expected[way], rel=1e-6)


def test_fewer_images_than_one_batch_is_undefined_with_a_reason():
    acc = ContrastiveAccumulator(torch.eye(3), 10.0, batch_size=1024)
    acc.update(dict.fromkeys(WAYS, torch.eye(3)), torch.tensor([0, 1, 2]))
    assert math.isnan(acc.compute()["contrastive_loss_score"])
    assert "no full batch of 1024 labelled images: 3 labelled image(s)" in acc.undefined_reason()
