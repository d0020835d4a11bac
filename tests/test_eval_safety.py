"""Issue 11 item 6 / 10: evaluate.py checks everything before writing, swaps the new evaluation in whole, and
writes nothing into the run when out_dir is elsewhere; NaN weights and bad files are errors naming the file."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from sae_lightning.evaluation import outputs
from sae_lightning.evaluation.run import evaluate_run

ROOT = Path(__file__).resolve().parents[1]
FAST = ["n_images=16", "top_k=3", "batch_size=8", "contrastive_batch_size=8", "num_workers=0", "device=cpu",
        "n_grid_features=1", "shuffle=0"]


def _cfg(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every file and directory under `directory`."""
    return {str(p.relative_to(directory)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


@pytest.fixture()
def run(demo_run, tmp_path) -> Path:
    """A private copy of the session's demo run, with a previous evaluation in <run>/eval."""
    copy = tmp_path / "run"
    shutil.copytree(demo_run, copy, ignore=shutil.ignore_patterns("eval", "checkpoints"))
    previous = copy / "eval"
    (previous / "plots").mkdir(parents=True)
    (previous / "plots" / "density_histogram.png").write_bytes(b"previous plot")
    (previous / "metrics.json").write_text('{"previous": true}\n')
    (previous / "report.md").write_text("previous report\n")
    return copy


def _set_run_config(run: Path, key: str, value) -> None:
    path = run / ".hydra" / "resolved.yaml"
    cfg = OmegaConf.load(path)
    OmegaConf.update(cfg, key, value)
    path.write_text(OmegaConf.to_yaml(cfg))


@pytest.mark.parametrize("case", ["no_val_shards", "missing_shards", "n_images_0", "top_k_0", "bad_feature",
                                  "corrupt_sae", "truncated_cfg", "nan_weights"])
def test_bad_input_fails_before_anything_is_written(run, case):
    overrides = [f"run={run}", *FAST]
    weights = run / "sae" / "sae_weights.safetensors"
    if case == "no_val_shards":
        _set_run_config(run, "data.val_shards", None)
        match = "no held-out shards"
    elif case == "missing_shards":
        overrides.append(f"val_shards={run / 'nowhere-*.tar'}")
        match = "do not exist"
    elif case == "n_images_0":
        overrides.append("n_images=0")
        match = "n_images=0: must be an integer >= 1"
    elif case == "top_k_0":
        overrides.append("top_k=0")
        match = "top_k=0"
    elif case == "bad_feature":
        overrides.append("features=[100000]")
        match = "feature ids must be in"
    elif case == "corrupt_sae":
        weights.write_bytes(weights.read_bytes()[:100])
        match = "sae_weights.safetensors"
    elif case == "truncated_cfg":
        cfg_json = run / "sae" / "cfg.json"
        cfg_json.write_text(cfg_json.read_text()[:20])
        match = "cfg.json"
    else:
        tensors = load_file(str(weights))
        tensors["W_enc"][0, 0] = float("nan")
        save_file(tensors, str(weights))
        match = "sae_weights.safetensors"
    before = _snapshot(run)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        evaluate_run(_cfg(overrides))
    assert info.match(match)
    if case == "nan_weights":
        assert "non-finite" in str(info.value) or "NaN" in str(info.value)
    assert _snapshot(run) == before  # the previous evaluation intact, nothing new (no config.yaml, no tensorboard)
    assert not list(run.glob(".eval.*"))


def test_a_failure_while_writing_leaves_the_previous_evaluation_whole(run, monkeypatch):
    def disk_full(ev, directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "WRITERS", (*outputs.WRITERS[:2], disk_full, *outputs.WRITERS[2:]))
    before = _snapshot(run)
    with pytest.raises(OSError, match="No space left"):
        evaluate_run(_cfg([f"run={run}", *FAST]))
    assert _snapshot(run) == before
    assert not list(run.glob(".eval.*"))  # the temporary directory is gone


@pytest.mark.slow
def test_new_evaluation_replaces_the_old_one_whole(run):
    metrics = evaluate_run(_cfg([f"run={run}", *FAST]))
    ev = run / "eval"
    assert json.loads((ev / "metrics.json").read_text())["n_images"] == metrics["n_images"] == 16
    assert (ev / "plots" / "density_histogram.png").read_bytes().startswith(b"\x89PNG")
    assert "previous" not in (ev / "report.md").read_text()
    assert list((ev / "tensorboard").glob("events.out.tfevents.*"))
    assert not (run / "tensorboard" / "eval").exists()
    assert not list(run.glob(".eval.*"))
    assert oct((ev / "features.safetensors").stat().st_mode & 0o777) == oct(0o644 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_out_dir_elsewhere_writes_nothing_into_the_run(run, tmp_path):
    before = _snapshot(run)
    out = tmp_path / "elsewhere" / "eval"
    evaluate_run(_cfg([f"run={run}", f"out_dir={out}", *FAST]))
    assert _snapshot(run) == before  # old code wrote <run>/tensorboard/eval
    assert (out / "metrics.json").is_file() and (out / "tensorboard").is_dir()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
@pytest.mark.slow
def test_read_only_run_with_out_dir_elsewhere(run, tmp_path):
    shutil.rmtree(run / "eval")
    for p in [run, *run.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        with pytest.raises(PermissionError, match="out_dir"):
            evaluate_run(_cfg([f"run={run}", *FAST]))
        evaluate_run(_cfg([f"run={run}", f"out_dir={tmp_path / 'ev'}", *FAST]))
        assert (tmp_path / "ev" / "report.md").is_file()
    finally:
        for p in [run, *run.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)


def test_missing_labels_make_the_loss_undefined_with_a_reason(tmp_path):
    from sae_lightning.evaluation.contrastive import ContrastiveAccumulator

    acc = ContrastiveAccumulator(torch.eye(3), 10.0, batch_size=4)
    feats = dict.fromkeys(("original", "sae", "ablated"), torch.eye(3)[[0, 1, 2, 0, 1, 2]])
    acc.update(feats, torch.tensor([0, 1, 2, -1, -1, -1]))
    out = acc.compute_all()
    assert out["contrastive_batches"] == 0 and out["contrastive_unlabelled_images"] == 3
    assert torch.tensor(out["contrastive_loss_sae"]).isnan()
    reason = acc.undefined_reason()
    assert "3 labelled image(s)" in reason and "3 more without a label" in reason and "batch of 4" in reason
    assert out["zero_shot_kl_sae"] == 0.0  # the KL needs no labels: all 6 images count


def test_swap_replaces_whole_and_cleans_what_a_killed_evaluation_left(tmp_path, monkeypatch):
    from types import SimpleNamespace

    out = tmp_path / "eval"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "old_grid.png").write_bytes(b"old")
    (tmp_path / ".eval.tmp-killed").mkdir()  # kill -9 during an earlier write
    (tmp_path / ".eval.tmp-killed" / "metrics.json").write_text("{")

    def write_one(ev, directory):
        (directory / "metrics.json").write_text('{"new": true}')

    monkeypatch.setattr(outputs, "WRITERS", (write_one,))
    outputs.write_evaluation(SimpleNamespace(figures={}), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]  # nothing of the old one mixed in
    assert (out.stat().st_mode & 0o777) == 0o755
