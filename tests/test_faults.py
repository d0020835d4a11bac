"""Faults a cluster and a new user meet: pre-emption, resumes, runaway training, bad inputs. Nothing is lost."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sae_lightning.callbacks import ExportSAECallback, SAECheckpoint
from sae_lightning.module import SAETrainingModule, TrainingDiverged
from sae_lightning.sae import SparseAutoencoder
from sae_lightning.sae import functional as F_sae
from tests.conftest import ROOT, compose_config, demo_overrides
from tests.test_training import run_train_cli, training_events_dir


def fit(module, batches, steps, tmp_path=None, every=None, log_every=50):
    callbacks = []
    if tmp_path is not None:
        checkpoint = SAECheckpoint(dirpath=tmp_path / "checkpoints", filename="step_{step:06d}",
                                   auto_insert_metric_name=False, save_last=True, save_top_k=1)
        checkpoint.set_interval(every or steps)
        callbacks = [checkpoint, ExportSAECallback(tmp_path / "sae")]
    trainer = L.Trainer(max_steps=steps, max_epochs=1, accelerator="cpu", logger=False,
                        enable_checkpointing=tmp_path is not None, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, log_every_n_steps=log_every)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


def test_a_zero_activation_row_gives_a_finite_loss_equal_to_the_hand_computation():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    x_hat = torch.tensor([[3.0, 5.0], [1.0, 0.0]])
    # norms 5 and 0; the floor is 1e-2 x mean norm 2.5 = 0.025: row 2 divides by 0.025
    expected = torch.tensor([[0.0, 1 / 5], [1 / 0.025, 0.0]])
    torch.testing.assert_close(F_sae.mse_elementwise(x_hat, x), expected)
    sae = SparseAutoencoder(2, 4)
    assert torch.isfinite(sae.loss(x, dead_mask=torch.ones(4, dtype=torch.bool)).total)


def test_dense_ghost_grads_match_the_indexed_formula_and_vanish_without_dead_features():
    torch.manual_seed(0)
    x, x_hat = torch.randn(6, 3), torch.randn(6, 3)
    hidden_pre, W_dec = torch.randn(6, 5) * 3, torch.randn(5, 3)
    mse_elem = F_sae.mse_elementwise(x_hat, x)
    dead = torch.tensor([True, False, True, False, False])
    residual = x - x_hat
    rn = residual.norm(dim=-1, keepdim=True)
    g = torch.exp(hidden_pre[:, dead]) @ W_dec[dead]  # the seed's boolean-indexed form
    g = g * rn / (2 * g.norm(dim=-1, keepdim=True) + F_sae.EPS)
    elem = (g - residual).pow(2) / rn
    expected = ((mse_elem / (elem + F_sae.EPS)) * elem).mean()
    torch.testing.assert_close(F_sae.ghost_grad_loss(x, x_hat, hidden_pre, W_dec, dead, mse_elem), expected)
    none = torch.zeros(5, dtype=torch.bool)
    assert F_sae.ghost_grad_loss(x, x_hat, hidden_pre, W_dec, none, mse_elem) == 0.0


def test_non_finite_input_is_named_as_the_cause():
    torch.manual_seed(0)
    module = SAETrainingModule(SparseAutoencoder(8, 16), b_dec_init="mean", lr_warmup_steps=1)
    bad = torch.randn(32, 8)
    bad[3, 2] = float("inf")
    with pytest.raises(TrainingDiverged, match="input activations of step 1"):
        fit(module, [{"activations": torch.randn(32, 8)}, {"activations": bad}], 2)


def test_runaway_training_is_stopped_and_never_checkpointed(tmp_path):
    """lr=1e6: the loss stays finite but the SAE explodes; the last checkpoint and export stay good."""
    torch.manual_seed(0)
    data = torch.randn(2048, 16) + 3.0
    batches = [{"activations": data[i: i + 64]} for i in range(0, 2048, 64)]
    module = SAETrainingModule(SparseAutoencoder(16, 64), lr=1e6, lr_warmup_steps=0, b_dec_init="mean")
    with pytest.raises(TrainingDiverged, match="diverged|non-finite"):
        fit(module, batches, 30, tmp_path, every=1, log_every=5)
    if (tmp_path / "sae").exists():  # whatever was exported reconstructs the data
        sae = SparseAutoencoder.load(tmp_path / "sae")
        with torch.no_grad():
            x = data[:256]
            ev = 1 - (sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        assert ev > -1000
        ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
        assert torch.isfinite(ckpt["state_dict"]["sae.W_enc"]).all()


@pytest.mark.slow
def test_sigterm_saves_the_step_and_resume_continues_in_the_same_run(tmp_path, data_dir, tiny_shards):
    run = tmp_path / "run"
    overrides = [o for o in demo_overrides(run, data_dir, tiny_shards) if not o.startswith("paths.output_dir")]
    result = run_train_cli([*overrides, f"hydra.run.dir={run}", "max_steps=30",
                            "+callbacks.stop._target_=tests.helpers.SignalAtStep", "+callbacks.stop.step=7",
                            f"+callbacks.stop.signum={int(signal.SIGTERM)}"])
    assert result.returncode == 143, result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert "Stopped by SIGTERM after step 8" in console and "ckpt_path=" in console
    from sae_lightning.sae.io import read_sae_step

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8  # the step under way when the signal came was finished, then saved
    assert read_sae_step(run / "sae") == 8

    # the README's resume command: continues in the checkpoint's own run directory
    result = run_train_cli([*overrides, "max_steps=30", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 30
    assert read_sae_step(run / "sae") == 30
    events = EventAccumulator(str(training_events_dir(run)), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("losses/total")]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # one TensorBoard line, no duplicated points
    assert (run / ".hydra" / "config.yaml").is_file() and list((run / ".hydra").glob("resume-*"))


@pytest.fixture()
def finished_run(demo_run, tmp_path) -> Path:
    """A private copy of the session's demo run (30 steps)."""
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    return run


def _snapshot(run: Path) -> dict[str, bytes]:
    paths = [run / "sae" / "cfg.json", run / "sae" / "sae_weights.safetensors", run / ".hydra" / "resolved.yaml",
             *sorted((run / "checkpoints").glob("*.ckpt"))]
    return {str(p.relative_to(run)): p.read_bytes() for p in paths}


@pytest.mark.slow
def test_a_failed_resume_writes_nothing(finished_run, data_dir, tiny_shards):
    from sae_lightning.training import train

    before = _snapshot(finished_run)
    cfg = compose_config(demo_overrides(finished_run, data_dir, tiny_shards, [
        f"ckpt_path={finished_run / 'checkpoints' / 'last.ckpt'}", "max_steps=60", "l1_coefficient=1e38"]))
    with pytest.raises(TrainingDiverged):
        train(cfg)
    assert _snapshot(finished_run) == before


def test_a_resume_that_changes_what_the_sae_means_refuses(finished_run, data_dir, tiny_shards):
    from sae_lightning.training import train

    before = _snapshot(finished_run)
    cfg = compose_config(demo_overrides(finished_run, data_dir, tiny_shards, [
        f"ckpt_path={finished_run / 'checkpoints' / 'last.ckpt'}", "expansion=8", "tokens=all"]))
    expected = "(?s)tokens: .cls. in the checkpoint, .all. now.*expansion: 4 in the checkpoint, 8 now"
    with pytest.raises(ValueError, match=expected):
        train(cfg)
    assert _snapshot(finished_run) == before


def test_training_into_a_directory_that_holds_a_run_refuses(finished_run, data_dir, tiny_shards):
    from sae_lightning.training import train

    before = _snapshot(finished_run)
    with pytest.raises(FileExistsError, match="ckpt_path=.*overwrite=true"):
        train(compose_config(demo_overrides(finished_run, data_dir, tiny_shards)))
    assert _snapshot(finished_run) == before


def test_stale_temporaries_are_removed_at_start(finished_run, data_dir, tiny_shards, caplog):
    from sae_lightning.training import train

    stale = finished_run / "checkpoints" / "last.ckpt.tmp"
    stale.write_bytes(b"x" * 1000)
    cfg = compose_config(demo_overrides(finished_run, data_dir, tiny_shards, [
        f"ckpt_path={finished_run / 'checkpoints' / 'last.ckpt'}", "max_steps=31"]))
    train(cfg)
    assert not stale.exists()
    assert torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 31


def test_runs_on_stored_activations_have_no_contrastive_callback(tmp_path, caplog):
    from sae_lightning.training import train

    cfg = compose_config(["experiment=planted", f"paths.root_dir={ROOT}", f"paths.output_dir={tmp_path}", "max_steps=3",
                          "data.activations.n=2048", "trainer.enable_progress_bar=false"])
    with caplog.at_level("WARNING"):
        train(cfg)
    assert "ContrastiveEvalCallback" not in caplog.text
