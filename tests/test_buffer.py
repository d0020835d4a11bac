"""The on-device shuffle buffer: nothing out while filling, exact batch sizes, every activation served once."""

from __future__ import annotations

import pytest
import torch

from sae_lightning.data.buffer import ShuffleBuffer
from sae_lightning.data.datamodule import ActivationStreamMixin


def ids(n: int, start: int = 0) -> torch.Tensor:
    """Activations whose single coordinate is their identity, so we can track where each one goes."""
    return torch.arange(start, start + n, dtype=torch.float32)[:, None]


def test_fills_then_serves_batches_of_exactly_n():
    buffer = ShuffleBuffer(capacity=40, batch_size=10, seed=0)
    assert buffer.push(ids(10)) is None and buffer.push(ids(10, 10)) is None
    assert buffer.push(ids(10, 20)) is None
    assert buffer.push(ids(10, 30)) is None  # exactly full now, nothing left over to serve
    assert buffer.full and buffer.contents().shape == (40, 1)
    out = buffer.push(ids(13, 40))  # 13 >= 10: 3 surplus dropped
    assert out.shape == (10, 1)


def test_every_activation_is_served_at_most_once_and_mixed():
    buffer = ShuffleBuffer(capacity=100, batch_size=20, seed=1)
    served = []
    for step in range(60):
        out = buffer.push(ids(20, 20 * step))
        if out is not None:
            served.append(out.squeeze(1))
    served = torch.cat(served)
    assert served.unique().numel() == served.numel()  # no duplicates
    held = buffer.contents().squeeze(1)
    assert set(served.tolist()).isdisjoint(held.tolist())
    assert served.numel() + held.numel() == 60 * 20  # nothing lost (no surplus here)
    first = served[:20]
    assert first.max() - first.min() > 40  # a batch mixes several pushes, not one image batch


def test_mean_residence_time_is_capacity_over_batch():
    buffer = ShuffleBuffer(capacity=200, batch_size=10, seed=2)
    pushed_at, waits = {}, []
    for step in range(2000):
        new = ids(10, 10 * step)
        for v in new.squeeze(1).tolist():
            pushed_at[v] = step
        out = buffer.push(new)
        if out is not None and step > 400:
            waits += [step - pushed_at[v] for v in out.squeeze(1).tolist()]
    assert sum(waits) / len(waits) == pytest.approx(200 / 10, rel=0.1)


def test_underfull_push_into_full_buffer_is_an_error():
    buffer = ShuffleBuffer(capacity=10, batch_size=5)
    buffer.push(ids(10))
    with pytest.raises(ValueError, match="at least one SAE batch"):
        buffer.push(ids(3))


def test_capacity_below_batch_size_is_rejected():
    with pytest.raises(ValueError, match="capacity"):
        ShuffleBuffer(capacity=4, batch_size=8)


def test_stream_hands_over_the_first_full_buffer_once():
    stream = ActivationStreamMixin()
    stream._init_stream(sae_batch_size=4, buffer_size=8, seed=0)
    assert stream._serve(ids(4))["activations"].shape == (0, 1)
    assert stream._serve(ids(4, 4))["activations"].shape == (0, 1)
    batch = stream._serve(ids(4, 8))
    assert batch["activations"].shape == (4, 1)
    assert sorted(batch["init_activations"].squeeze(1).tolist())[:4] != []
    assert "init_activations" not in stream._serve(ids(4, 12))
    assert stream.activations_seen == 16
