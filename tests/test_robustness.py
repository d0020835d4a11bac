"""Bad input loses nothing: NaN losses stop before any update, checkpoints are written atomically."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from sae_lightning.checkpoint_io import AtomicCheckpointIO
from sae_lightning.module import SAETrainingModule
from sae_lightning.sae import SparseAutoencoder


def batches(*tensors):
    return [{"activations": t} for t in tensors]


def fit(module, data, steps):
    trainer = L.Trainer(max_steps=steps, max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return trainer


def test_nan_loss_stops_with_advice_and_leaves_the_weights_untouched():
    torch.manual_seed(0)
    module = SAETrainingModule(SparseAutoencoder(8, 16), b_dec_init="mean", lr_warmup_steps=1)
    good, bad = torch.randn(32, 8), torch.full((32, 8), float("nan"))
    fit(module, batches(good), 1)
    before = {k: v.clone() for k, v in module.sae.state_dict().items()}

    with pytest.raises(FloatingPointError, match="ckpt_path"):
        fit(module, batches(bad), 2)
    for k in ("W_enc", "b_enc", "b_dec"):
        assert torch.equal(module.sae.state_dict()[k], before[k]), k
    renormalised = before["W_dec"] / before["W_dec"].norm(dim=-1, keepdim=True)  # the step's first act
    assert torch.allclose(module.sae.W_dec, renormalised, atol=1e-6)


def test_buffer_filling_batches_are_not_steps():
    module = SAETrainingModule(SparseAutoencoder(4, 8), b_dec_init="mean")
    empty = torch.empty(0, 4)
    trainer = fit(module, batches(empty, empty, torch.randn(16, 4), torch.randn(16, 4)), 10)
    assert trainer.global_step == 2


def test_b_dec_initialised_from_the_first_buffer():
    torch.manual_seed(1)
    first = torch.randn(64, 4) + 5.0
    module = SAETrainingModule(SparseAutoencoder(4, 8), b_dec_init="mean", lr=1e-12)
    fit(module, [{"activations": torch.randn(16, 4), "init_activations": first}], 1)
    assert torch.allclose(module.sae.b_dec, first.mean(0), atol=1e-5)
    assert bool(module.first_buffer_seen)


def test_atomic_checkpoint_keeps_the_old_file_when_a_write_fails(tmp_path: Path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    original = path.read_bytes()

    def full_disk(self, checkpoint, filepath, storage_options=None):
        Path(filepath).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("lightning.fabric.plugins.io.torch_io.TorchCheckpointIO.save_checkpoint", full_disk)
    with pytest.raises(OSError, match="Is the disk full"):
        io.save_checkpoint({"step": 2}, path)
    assert path.read_bytes() == original
    assert not (tmp_path / "last.ckpt.tmp").exists()
    assert torch.load(path, weights_only=True) == {"step": 1}
