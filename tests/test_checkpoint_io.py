"""Checkpoint writes are durable (file and directory fsynced) and a killed run's leftovers are cleaned at start."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from sae_lightning.checkpoint_io import AtomicCheckpointIO, clean_stale_temporaries
from sae_lightning.sae import SparseAutoencoder
from sae_lightning.sae.io import read_sae, save_sae


def test_checkpoint_write_fsyncs_the_file_then_the_directory_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    assert events == ["file", "replace", "dir"]
    assert torch.load(path, weights_only=True) == {"step": 3}
    assert os.listdir(path.parent) == ["last.ckpt"]


def test_a_failed_checkpoint_write_keeps_the_old_one_and_gives_advice(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)

    def full_disk(self, checkpoint, filepath, storage_options=None):
        Path(filepath).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lightning.fabric.plugins.io.torch_io.TorchCheckpointIO.save_checkpoint", full_disk)
    with pytest.raises(OSError, match=r"Is the disk full\? The previous checkpoint is intact; free space and resume "
                                      r"with ckpt_path=<run>/checkpoints/last.ckpt"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.ckpt"]


def make_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"good")
    (run / "checkpoints" / "step_000100.ckpt.tmp").write_bytes(b"half-written by a killed run")
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out").write_bytes(b"keep")
    return run


def test_clean_stale_temporaries_removes_half_written_checkpoints_and_superseded_exports(tmp_path):
    run = make_run(tmp_path)
    sae = SparseAutoencoder(3, 6)
    save_sae(sae, run / "sae", step=100)
    save_sae(SparseAutoencoder(3, 6), run / "sae.tmp", step=90)  # a complete one next to a complete sae/
    (run / "sae.old").mkdir()  # an incomplete one
    (run / "sae" / "sae_weights.safetensors.tmp").write_bytes(b"partial")  # a per-file replace killed mid-write
    removed = clean_stale_temporaries(run)
    assert sorted(p.relative_to(run).as_posix() for p in removed) == [
        "checkpoints/step_000100.ckpt.tmp", "sae.old", "sae.tmp", "sae/sae_weights.safetensors.tmp"]
    assert sorted(os.listdir(run)) == ["checkpoints", "sae", "tensorboard"]
    assert os.listdir(run / "checkpoints") == ["last.ckpt"]
    assert torch.equal(read_sae(run / "sae")[1]["W_enc"], sae.W_enc.detach())
    assert clean_stale_temporaries(run) == []


def test_clean_stale_temporaries_keeps_the_only_complete_export(tmp_path):
    """sae/ missing (killed between the old code's two renames): sae.tmp/ may be the only copy, so it stays."""
    run = make_run(tmp_path)
    save_sae(SparseAutoencoder(3, 6), run / "sae.tmp", step=100)
    removed = clean_stale_temporaries(run)
    assert [p.name for p in removed] == ["step_000100.ckpt.tmp"]
    assert (run / "sae.tmp" / "cfg.json").is_file()
    with pytest.raises(FileNotFoundError, match="Recover it with: mv"):
        read_sae(run / "sae")


def test_clean_stale_temporaries_on_a_new_run_directory(tmp_path):
    assert clean_stale_temporaries(tmp_path / "does-not-exist") == []
    assert clean_stale_temporaries(tmp_path) == []
