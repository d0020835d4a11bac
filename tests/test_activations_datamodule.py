"""ActivationsDataModule: files in, the image DataModule's batch contract out, epochs that repeat."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import save_file

from sae_lightning.data.activations import ActivationsDataModule, ChunkSampler, load_activations
from sae_lightning.data.buffer import ShuffleBuffer
from sae_lightning.module import SAETrainingModule
from sae_lightning.sae import SparseAutoencoder
from tests.conftest import compose_config

D = 8


def rows(n: int = 96) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(0))


def served(dm: ActivationsDataModule) -> list[dict[str, torch.Tensor]]:
    """One epoch of batches, through the hooks Lightning calls (transfer to CPU is the identity)."""
    return [dm.on_after_batch_transfer(chunk, 0) for chunk in dm.train_dataloader()]


@pytest.mark.parametrize("suffix", [".safetensors", ".npy", ".pt"])
def test_files_load_the_same_rows(tmp_path, suffix):
    x = rows()
    path = tmp_path / f"acts{suffix}"
    if suffix == ".safetensors":
        save_file({"activations": x}, str(path))
    elif suffix == ".npy":
        np.save(path, x.numpy())
    else:
        torch.save({"activations": x}, path)
    dm = ActivationsDataModule(path, sae_batch_size=16, buffer_size=32, shuffle=False)
    assert dm.d_in == D
    chunks = torch.cat(list(dm.train_dataloader()))
    assert torch.equal(chunks, x)


def test_bad_files_fail_clearly(tmp_path):
    save_file({"other": rows()}, str(tmp_path / "a.safetensors"))
    with pytest.raises(KeyError, match="activations"):
        load_activations(tmp_path / "a.safetensors")
    with pytest.raises(FileNotFoundError):
        load_activations(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="chunk_size"):
        ActivationsDataModule(rows(), sae_batch_size=16, chunk_size=8)
    with pytest.raises(ValueError, match="2-D"):
        ActivationsDataModule(torch.zeros(4, 4, 4), sae_batch_size=2)


def test_batches_follow_the_image_datamodule_contract():
    """Empty while the buffer fills, then [N, d] batches; the first full buffer is handed over once."""
    dm = ActivationsDataModule(rows(), sae_batch_size=16, buffer_size=48, seed=3)
    batches = served(dm)
    assert [b["activations"].shape[0] for b in batches] == [0, 0, 0, 16, 16, 16]
    assert [("init_activations" in b) for b in batches] == [False, False, False, True, False, False]
    assert batches[3]["init_activations"].shape == (48, D)
    assert dm.activations_seen == 96


def test_same_buffer_path_as_a_bare_shuffle_buffer():
    x = rows()
    dm = ActivationsDataModule(x, sae_batch_size=16, buffer_size=32, shuffle=False, seed=5)
    reference = ShuffleBuffer(32, 16, seed=5)
    for batch, chunk in zip(served(dm), x.split(16)):
        expected = reference.push(chunk)
        assert torch.equal(batch["activations"], expected if expected is not None else torch.empty(0, D))


def test_epochs_repeat_in_a_new_order_and_drop_only_a_partial_chunk():
    sampler = ChunkSampler(50, 16, shuffle=True, seed=0)
    first, second = torch.cat(list(sampler)), torch.cat(list(sampler))
    assert len(first) == len(second) == 48 and len(set(first.tolist())) == 48
    assert not torch.equal(first, second)
    assert torch.equal(torch.cat(list(ChunkSampler(50, 16, shuffle=False))), torch.arange(48))


def test_trains_through_lightning_across_epochs():
    torch.manual_seed(0)
    sae = SparseAutoencoder(D, 32, l1_coefficient=1e-3)
    module = SAETrainingModule(sae, lr=1e-3, lr_warmup_steps=2, b_dec_init="mean")
    dm = ActivationsDataModule(rows() + 3.0, sae_batch_size=16, buffer_size=32)
    trainer = L.Trainer(accelerator="cpu", max_steps=10, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=5)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 10 and trainer.current_epoch >= 1  # 6 chunks per epoch, 2 fill the buffer
    assert bool(module.first_buffer_seen)
    assert torch.allclose(sae.b_dec, (rows() + 3.0).mean(0), atol=0.5)
    assert dm.activations_seen == 16 * (10 + 2)


def test_planted_experiment_builds_its_datamodule_without_a_backbone(tmp_path):
    cfg = compose_config(["experiment=planted", f"paths.output_dir={tmp_path}", "data.activations.n=2048",
                          "data.buffer_size=512"])
    assert cfg.get("backbone") is None
    dm = instantiate(cfg.data)
    assert isinstance(dm, ActivationsDataModule) and dm.d_in == 256 and dm.sae_batch_size == cfg.sae_batch_size
    assert (tmp_path / "planted.safetensors").is_file()


def test_a_chunk_larger_than_the_batch_loses_no_row():
    """chunk_size 40 with batches of 16: the surplus is served by row-less items, never dropped."""
    x = torch.arange(80, dtype=torch.float32)[:, None].expand(80, D).contiguous()
    dm = ActivationsDataModule(x, sae_batch_size=16, buffer_size=32, chunk_size=40, shuffle=False)
    loader = dm.train_dataloader()
    batches = []
    for _ in range(5):  # five passes: the surplus carried over a pass boundary is served in the next
        batches += [dm.on_after_batch_transfer(chunk, 0) for chunk in loader]
        assert dm.buffer.n_pending < 16 + 40
    out = torch.cat([b["activations"][:, 0] for b in batches])
    held = torch.cat([dm.buffer.contents(), dm.buffer.pending()])[:, 0]
    assert sorted(torch.cat([out, held]).tolist()) == sorted(list(map(float, range(80))) * 5)  # all, once each
    assert all(b["activations"].shape[0] in (0, 16) for b in batches)
    assert out.numel() == 400 - 32 - dm.buffer.n_pending >= 400 - 32 - 16 - 40  # served all but the bounded rest
    assert dm.activations_seen == 400
