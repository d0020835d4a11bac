"""End to end: the shrunk demo trains, logs what users watch, exports a loadable SAE, resumes, sweeps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sae_lightning import SparseAutoencoder
from tests.conftest import ROOT, compose_config, demo_overrides

SCALAR_TAGS = [
    "losses/mse", "losses/l1", "losses/ghost", "losses/total",
    "metrics/l0", "metrics/explained_variance", "metrics/explained_variance_uncentred",
    "metrics/mse", "metrics/mse_normalised",
    "features/dead_features", "features/ultra_rare_features", "features/dense_features",
    "features/ghost_grad_features", "lr", "progress/images_seen", "progress/activations_seen",
    "contrastive/loss_original", "contrastive/loss_sae", "contrastive/loss_ablated", "contrastive/score",
]

pytestmark = pytest.mark.slow


def training_events_dir(run_dir: Path) -> Path:
    """<run>/tensorboard/<run name>/: the training run, named after its directory (evaluation adds eval/)."""
    runs = [d for d in (run_dir / "tensorboard").iterdir() if d.is_dir() and d.name != "eval"]
    assert len(runs) == 1, runs
    return runs[0]


def hparams_tags(run_dir: Path) -> set[str]:
    """Tags of the HParams plugin's summaries in the training run's event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    tags = set()
    for path in training_events_dir(run_dir).glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            tags.update(v.tag for v in event.summary.value if v.metadata.plugin_data.plugin_name == "hparams")
    return tags


def read_events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(training_events_dir(run_dir)),
                              size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    return events


def test_demo_run_logs_every_tag(demo_run):
    events = read_events(demo_run)
    tags = events.Tags()
    missing = [t for t in SCALAR_TAGS if t not in tags["scalars"]]
    assert not missing, f"missing TensorBoard scalars: {missing}"
    assert "features/log10_density" in tags["histograms"]
    assert "features/log10_density_plot" in tags["images"]
    steps = [e.step for e in events.Scalars("losses/total")]
    assert steps == sorted(steps) and steps[-1] == 30
    lrs = {e.step: e.value for e in events.Scalars("lr")}
    assert lrs[5] == pytest.approx(1e-3, rel=1e-6) and lrs[30] == pytest.approx(1e-3, rel=1e-6)
    seen = [e.value for e in events.Scalars("progress/images_seen")]
    assert seen == sorted(seen) and seen[-1] >= 30 * 64
    # the run is named after its directory, not "."; the frozen model's contrastive losses are one point each
    assert training_events_dir(demo_run).name == demo_run.name
    assert len(events.Scalars("contrastive/loss_original")) == 1 and len(events.Scalars("contrastive/loss_sae")) >= 3
    assert events.Scalars("contrastive/batch_size")[0].value == 32
    # HParams tab: the whole composed config and the final metrics
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= hparams_tags(demo_run)
    assert events.Scalars("final/step")[0].step == 30


def test_last_checkpoint_is_the_final_state_when_steps_are_not_a_multiple_of_the_interval(tmp_path, data_dir,
                                                                                          tiny_shards):
    from sae_lightning.sae.io import read_sae_step
    from sae_lightning.training import train

    cfg = compose_config(demo_overrides(tmp_path, data_dir, tiny_shards, ["max_steps=25"]))  # interval: 10 steps
    train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 25 and read_sae_step(tmp_path / "sae") == 25
    sae = SparseAutoencoder.load(tmp_path / "sae")
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(sae, name), ckpt["state_dict"][f"sae.{name}"]), name


def test_lr_decay_reaches_zero_at_the_last_step_and_one_that_does_not_fit_is_refused(tmp_path, data_dir,
                                                                                     tiny_shards):
    from sae_lightning.training import train

    # warm-up 5 steps, decay over the last 10 of 25 (640 activations of 64): the scheduler's factor after the
    # last step is (25 - 25) / 10 = 0, and (25 - 20) / 10 at step 20
    cfg = compose_config(demo_overrides(tmp_path / "run", data_dir, tiny_shards,
                                        ["max_steps=25", "schedule.lr_decay=640"]))
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == 0.0
    lrs = {e.step: e.value for e in read_events(tmp_path / "run").Scalars("lr")}
    assert lrs[20] == pytest.approx(cfg.lr * 0.5, rel=1e-5)  # logged after step 20's update: factor of step 20

    bad = compose_config(demo_overrides(tmp_path / "bad", data_dir, tiny_shards,
                                        ["max_steps=25", "schedule.lr_decay=1600"]))  # 5 + 25 steps > 25
    with pytest.raises(ValueError, match="must fit in the run's 25 steps"):
        train(bad)
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_resolved_config_and_exported_sae_match_the_checkpoint(demo_run):
    resolved = OmegaConf.load(demo_run / ".hydra" / "resolved.yaml")
    assert resolved.expansion == 4 and "${" not in OmegaConf.to_yaml(resolved)
    sae = SparseAutoencoder.load(demo_run / "sae")
    assert sae.d_sae == 4 * sae.d_in
    assert sae.metadata["layer"] == 2 and sae.metadata["tokens"] == "cls"
    ckpt = torch.load(demo_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 30
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(sae, name), ckpt["state_dict"][f"sae.{name}"]), name
    norms = sae.W_dec.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-2)
    x = torch.randn(16, sae.d_in)
    again = SparseAutoencoder.load(demo_run / "sae")
    assert torch.equal(sae.encode(x), again.encode(x)) and torch.equal(sae(x), again(x))


def test_resume_continues_the_step_count_and_counters(demo_run, tmp_path, data_dir, tiny_shards):
    from sae_lightning.training import train

    last = demo_run / "checkpoints" / "last.ckpt"
    before = torch.load(last, map_location="cpu", weights_only=True)
    cfg = compose_config(demo_overrides(tmp_path, data_dir, tiny_shards, [f"ckpt_path={last}", "max_steps=40"]))
    train(cfg)
    after = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert after["global_step"] == 40
    assert "window_density.fired" in before["state_dict"]  # the density window survives a resume
    dm_before = before["ImageActivationDataModule"]
    dm_after = after["ImageActivationDataModule"]
    assert dm_after["images_seen"] > dm_before["images_seen"]
    events = read_events(tmp_path)
    assert min(e.step for e in events.Scalars("losses/total")) > 30


def run_train_cli(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SAE_TRAIN_SHARDS", "SAE_VAL_SHARDS")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_train_without_shards_says_what_to_do(tmp_path):
    result = run_train_cli([f"hydra.run.dir={tmp_path}"])
    assert result.returncode != 0
    assert "data.train_shards" in result.stderr and "make demo" in result.stderr
    assert "Downloading" not in result.stderr


def test_multirun_gives_one_run_directory_per_job(tmp_path, data_dir, tiny_shards):
    overrides = [o for o in demo_overrides(tmp_path, data_dir, tiny_shards)
                 if not o.startswith(("paths.output_dir", "expansion", "training_images"))]
    result = run_train_cli(["-m", *overrides, "expansion=2,4", "training_images=640",
                            f"hydra.sweep.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    for job, expansion in (("0", 2), ("1", 4)):
        sae = SparseAutoencoder.load(tmp_path / job / "sae")
        assert sae.d_sae == expansion * sae.d_in
        assert (tmp_path / job / "tensorboard").is_dir()


def test_ddp_on_cpu_trains_and_exports(tmp_path, data_dir, tiny_shards):
    """Two CPU processes with gloo: shards split across ranks, b_dec broadcast, fire counts all-reduced."""
    overrides = [o for o in demo_overrides(tmp_path, data_dir, tiny_shards)
                 if not o.startswith(("paths.output_dir", "training_images"))]
    result = run_train_cli([*overrides, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                            "data.resampled=true", "training_images=640", f"hydra.run.dir={tmp_path}",
                            "+callbacks.ranks._target_=tests.helpers.RankStateDump",
                            f"+callbacks.ranks.directory={tmp_path / 'ranks'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 5  # 640 images at 64 per rank and step, 2 ranks: 5 steps, not 10
    assert ckpt["ImageActivationDataModule"]["images_seen"] >= 5 * 64  # rank 0's share
    SparseAutoencoder.load(tmp_path / "sae")
    # every rank ends with the same SAE, b_dec (broadcast in place from rank 0) and dead-feature state
    ranks = [torch.load(tmp_path / "ranks" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert set(ranks[0]) >= {"W_enc", "W_dec", "b_enc", "b_dec", "steps_since_fired", "window_fired"}
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert ranks[0]["b_dec"].abs().sum() > 0


def test_all_tokens_run_serves_exact_sae_batches(tmp_path, data_dir, tiny_shards):
    """tokens=all: 17 tokens per image, ceil(64/17) = 4 images per step, the surplus dropped in the buffer."""
    from sae_lightning.training import train

    cfg = compose_config(demo_overrides(tmp_path, data_dir, tiny_shards, ["tokens=all", "max_steps=8"]))
    train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8
    state = ckpt["ImageActivationDataModule"]
    assert state["activations_seen"] == 17 * state["images_seen"]
    assert SparseAutoencoder.load(tmp_path / "sae").metadata["tokens_per_image"] == 17


def test_wrong_layer_fails_before_any_download(tmp_path, tiny_shards):
    result = run_train_cli([f"hydra.run.dir={tmp_path}", f"data.train_shards='{tiny_shards[0]}'", "layer=24"])
    assert result.returncode != 0
    assert "layer=24 is outside 'ViT-L-14', which has 24 residual blocks" in result.stderr
    assert "Downloading" not in result.stderr and "download" not in result.stderr.lower()


def test_planted_experiment_trains_without_a_backbone(tmp_path):
    """experiment=planted: stored activations through the same module, buffer and Trainer; no backbone."""
    from sae_lightning.training import train

    cfg = compose_config(["experiment=planted", f"paths.root_dir={ROOT}", f"paths.output_dir={tmp_path}",
                          "max_steps=20", "data.activations.n=4096", "trainer.enable_progress_bar=false"])
    train(cfg)
    sae = SparseAutoencoder.load(tmp_path / "sae")
    assert (sae.d_in, sae.d_sae) == (256, 1024)
    assert (tmp_path / "planted.safetensors").is_file()
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20
