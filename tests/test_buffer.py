"""The on-device shuffle buffer: nothing out while filling, exact batch sizes, every activation served once."""

from __future__ import annotations

import pytest
import torch

from sae_lightning.data.buffer import ShuffleBuffer, TokenPacer
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
    out = buffer.push(ids(13, 40))  # 13 >= 10: the 3 surplus stay pending, nothing is dropped
    assert out.shape == (10, 1)
    assert buffer.n_pending == 3 and buffer.pending().squeeze(1).tolist() == [50.0, 51.0, 52.0]
    assert buffer.push(ids(6, 53)) is None  # 9 pending < 10: nothing to serve yet
    out = buffer.push(ids(1, 59))
    assert out.shape == (10, 1) and buffer.n_pending == 0 and buffer.n_held == 40
    held = set(buffer.contents().squeeze(1).tolist())
    assert set(range(50, 60)) <= held  # the surplus entered the buffer in arrival order


def test_tokens_per_image_above_the_batch_size_keep_whole_images():
    """257-like: 7 tokens per image, batches of 4. Every token pushed is served once or still held."""
    tokens, n, capacity = 7, 4, 20
    buffer, pacer = ShuffleBuffer(capacity, n, seed=0), TokenPacer(tokens, n)
    served, next_id, pushes = [], 0, 0
    for _ in range(200):
        images = pacer.next_count()
        assert images in (0, 1)
        out = buffer.push(ids(images * tokens, next_id))
        next_id += images * tokens
        pushes += 1
        if out is not None:
            assert out.shape == (n, 1)
            served.append(out.squeeze(1))
    served = torch.cat(served)
    held = torch.cat([buffer.contents(), buffer.pending()]).squeeze(1)
    everything = torch.cat([served, held])
    assert sorted(everything.tolist()) == list(map(float, range(next_id)))  # none lost, none twice
    assert buffer.n_pending < n + tokens  # paced: the surplus stays bounded
    assert served.numel() == n * (pushes - capacity // n)  # one batch per push once full
    assert next_id == 7 * (-(-(200 * 4) // 7))  # whole images: the smallest count covering 200 batches


def test_token_pacer_known_sequences():
    pacer = TokenPacer(257, 128)
    counts = [pacer.next_count() for _ in range(256)]
    assert counts[:6] == [1, 0, 1, 0, 1, 0]  # 257 >= 128 and 256; 514 >= 384 and 512; 771 ...
    assert sum(counts) == 128  # 128 images = 32,896 tokens >= 256 batches of 128 = 32,768
    assert sum(counts) * 257 - 256 * 128 < 257
    pacer = TokenPacer(1, 1024)  # class tokens: 1,024 images per batch
    assert [pacer.next_count() for _ in range(3)] == [1024] * 3
    pacer = TokenPacer(257, 1024)  # ViT-L/14 all tokens: 4 images (4 tokens over), 3 once the surplus allows
    counts = [pacer.next_count() for _ in range(257)]
    assert counts[:64] == [4] * 64 and counts[64] == 3  # after 64 batches the surplus is 256: 3 images suffice
    assert 0 <= sum(counts) * 257 - 257 * 1024 < 257
    with pytest.raises(ValueError, match="positive"):
        TokenPacer(0, 8)


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


def test_small_and_empty_pushes_into_a_full_buffer_accumulate():
    buffer = ShuffleBuffer(capacity=10, batch_size=5)
    buffer.push(ids(10))
    assert buffer.push(ids(3, 10)) is None and buffer.n_pending == 3
    assert buffer.push(ids(3, 13)) is not None and buffer.n_pending == 1
    buffer.push(ids(9, 16))
    assert buffer.n_pending == 5
    assert buffer.push(torch.empty(0, 1)).shape == (5, 1)  # an image-less push serves from the surplus
    assert buffer.push(torch.empty(0, 1)) is None and buffer.n_held == 10


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
