"""evaluate.py on a shrunk demo run: every metrics.json key, valid PNGs, the per-feature files read back."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import PIL.Image
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from sae_lightning.backbone import load_tiny_backbone
from sae_lightning.data.shards import expand_shards, image_batches
from sae_lightning.data.synthetic import DEMO_CLASSNAMES
from sae_lightning.evaluation.outputs import HEADLINE_METRICS as HEADLINE
from sae_lightning.evaluation.run import evaluate_run
from sae_lightning.evaluation.stream import count_shard_images, stream_pass
from sae_lightning.sae import SparseAutoencoder

ROOT = Path(__file__).resolve().parents[1]

DESIGN_KEYS = {
    "l0", "explained_variance", "explained_variance_uncentred", "mse", "mse_normalised",
    "dead_features", "ultra_rare_features", "dense_features",
    "contrastive_loss_original", "contrastive_loss_sae", "contrastive_loss_ablated", "contrastive_loss_score",
    "zero_shot_accuracy_original", "zero_shot_accuracy_sae", "zero_shot_accuracy_ablated",
    "cluster_found", "cluster_size", "cluster_encoder_cosine_inside", "cluster_encoder_cosine_outside",
    "alignment_n_features", "alignment_threshold", "alignment_aligned_features", "alignment_mean_max_cosine",
    "n_images", "run_dir", "sae_path", "backbone", "layer", "tokens", "shards", "date",
}


def _eval_cfg(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)


@pytest.fixture(scope="module")
def evaluation(demo_run) -> tuple[Path, str]:
    """evaluate.py with the default n_images (524,288) on 128 held-out images: (eval dir, console output)."""
    cmd = [sys.executable, "evaluate.py", f"run={demo_run}", "features=[0,3]", "top_k=5", "batch_size=32",
           "contrastive_batch_size=32", "num_workers=0", "device=cpu", "n_grid_features=1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return demo_run / "eval", done.stdout + done.stderr


@pytest.fixture(scope="module")
def evaluated(evaluation) -> Path:
    return evaluation[0]


@pytest.mark.slow
def test_console_progress_totals_what_is_read_and_stays_quiet(evaluation):
    _, console = evaluation
    assert "128/128" in console and "524288" not in console  # old: "64/524288, ETA ..." on a few images
    assert "contrastive loss in batches of 32 images" in console
    assert "Loaded built-in" not in console and "Final image preprocessing" not in console  # open_clip INFO
    assert "cannot resolve the ultra-rare threshold" in console  # 1/128 > 1e-5


@pytest.mark.slow
def test_metrics_json_has_every_key(evaluated):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert DESIGN_KEYS <= set(metrics)
    assert metrics["n_images"] == 128 and metrics["top_k"] == 5 and metrics["format_version"] == 2
    assert metrics["contrastive_loss_original"] > 0 and 0 <= metrics["zero_shot_accuracy_sae"] <= 1
    assert metrics["contrastive_batch_size"] == 32 and metrics["contrastive_batches"] == 4
    assert metrics["zero_shot_kl_ablated"] > 0 and metrics["contrastive_undefined_reason"] is None
    assert metrics["dead_features"] + (metrics["n_features"] - metrics["live_features"]) >= 0
    assert any("ultra-rare" in w for w in metrics["warnings"])
    assert "(plots/cluster_scatter.png)" in (evaluated / "report.md").read_text()


PROVENANCE = {"format_version", "run_dir", "sae_path", "backbone", "pretrained", "layer", "tokens", "shards",
              "classnames", "device", "seed", "date", "sae_lightning_version"}


@pytest.mark.slow
def test_every_metric_is_defined_in_the_docs_and_shown_in_the_report(evaluated):
    from sae_lightning.evaluation.report import METRIC_GROUPS

    metrics = json.loads((evaluated / "metrics.json").read_text())
    docs = (ROOT / "docs" / "metrics.md").read_text()
    in_report = {key for rows in METRIC_GROUPS.values() for key, _, _ in rows}
    report = (evaluated / "report.md").read_text()
    for key in set(metrics) - PROVENANCE:
        assert f"`{key}`" in docs or f"`{key.rsplit('_', 1)[0]}_" in docs, key
        if key not in {"warnings", "contrastive_undefined_reason", "cluster_component_means_log10",
                       "cluster_component_stds_log10", "cluster_component_weights"}:
            assert key in in_report and f"| `{key}` |" in report, key
    assert "## density_histogram" not in report and "## Feature density" in report


@pytest.mark.slow
def test_plots_are_valid_pngs_and_tensorboard_has_one_card(evaluated, demo_run):
    names = {p.name for p in (evaluated / "plots").glob("*.png")}
    assert {"density_histogram.png", "cluster_scatter.png", "alignment_max_cosine.png",
            "alignment_counts.png", "top_images_feature_0.png", "top_images_feature_3.png"} <= names
    assert len(names) >= 7  # + the most/least entropic grids
    for png in (evaluated / "plots").glob("*.png"):
        with PIL.Image.open(png) as image:
            image.verify()
            assert image.format == "PNG"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(evaluated / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    text = [t for t in tags["tensors"] if t.startswith("evaluation")]
    assert len(text) == 1  # one text card (old code: 37 single-point scalar charts and the figures)
    assert not tags["images"]
    assert set(tags["scalars"]) <= {f"eval/{k}" for k in HEADLINE} and len(tags["scalars"]) <= len(HEADLINE)
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")  # the HParams tab entry
    assert not (demo_run / "tensorboard" / "eval").exists()


@pytest.mark.slow
def test_per_feature_files_read_back_as_documented(evaluated):
    tensors = load_file(str(evaluated / "features.safetensors"))
    meta = json.loads((evaluated / "features.json").read_text())
    n, k = meta["n_features"], meta["k"]
    assert k == 5 and meta["n_images"] == 128 and meta["format_version"] == 2
    for name, spec in meta["tensors"].items():
        assert list(tensors[name].shape) == spec["shape"]
    assert tensors["top_indices"].shape == (n, k) and tensors["top_values"].dtype == torch.float32
    assert tensors["label_entropy_images"].dtype == torch.int64
    never_fired = tensors["label_entropy_images"] == 0
    assert torch.equal(torch.isnan(tensors["label_entropy"]), never_fired)
    assert torch.equal(tensors["label_entropy_images"], (tensors["top_indices"] >= 0).sum(1))
    strict = tensors["label_entropy_images"] == k
    assert torch.equal(torch.isnan(tensors["label_entropy_top_k"]), ~strict)
    padded = tensors["top_indices"] == -1
    assert torch.isinf(tensors["top_values"][padded]).all() and (tensors["top_labels"][padded] == -1).all()

    # every recorded image key resolves to a sample whose label in the shard is the recorded label
    shards = {Path(s).name: s for s in meta["shards"]}
    labels_by_key = {}
    for name, path in shards.items():
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".cls"):
                    key = f"{name}/{member.name[:-4]}"
                    labels_by_key[key] = int(tar.extractfile(member).read())
    checked = 0
    for f in range(n):
        for idx, label in zip(tensors["top_indices"][f].tolist(), tensors["top_labels"][f].tolist()):
            if idx >= 0:
                assert labels_by_key[meta["image_keys"][str(idx)]] == label
                checked += 1
    assert checked > 0
    assert all(0 <= int(i) < 128 for i in meta["image_keys"])


def test_clear_errors_for_a_wrong_run(tmp_path):
    with pytest.raises(ValueError, match="run=<run dir>"):
        evaluate_run(_eval_cfg([]))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        evaluate_run(_eval_cfg([f"run={tmp_path / 'nope'}"]))
    with pytest.raises(FileNotFoundError, match="no exported SAE"):
        evaluate_run(_eval_cfg([f"run={tmp_path}"]))


@pytest.mark.parametrize("tokens", ["patches", "all"])
def test_stream_pass_chunking_does_not_change_results(tmp_path, tiny_shards, tokens):
    backbone = load_tiny_backbone(tmp_path / "tiny.pt")
    torch.manual_seed(0)
    sae = SparseAutoencoder(backbone.width, 96)
    results = []
    for max_tokens in (40, 10_000):  # 2 images per chunk vs the whole batch at once
        loader = image_batches(tiny_shards[1], backbone.preprocess, 8, shuffle=0, shardshuffle=False,
                               partial=True)
        results.append(stream_pass(backbone, sae, loader, layer=1, tokens=tokens, n_images=20, k=4,
                                    classnames=DEMO_CLASSNAMES, contrastive_batch_size=8, max_tokens=max_tokens,
                                    device=torch.device("cpu")))
    a, b = results
    assert a.stats.n_images == 20 and a.stats.n_tokens == 20 * backbone.n_tokens_for(tokens)
    assert torch.equal(a.stats.top_indices, b.stats.top_indices)
    assert torch.allclose(a.stats.density, b.stats.density)
    assert a.reconstruction == pytest.approx(b.reconstruction)
    assert a.contrastive == pytest.approx(b.contrastive, nan_ok=True)
    assert a.keys == b.keys and set(a.keys) == set(a.stats.top_indices[a.stats.top_indices >= 0].tolist())


def test_count_shard_images_reads_headers_and_stops_at_the_limit(tiny_shards):
    urls = expand_shards(tiny_shards[1])
    assert count_shard_images(urls, 10**9) == 128
    assert count_shard_images(urls, 20) == 20
    assert count_shard_images(["pipe:cat x.tar"], 10) is None


def test_uint8_images_from_the_workers_give_the_same_evaluation(tmp_path, tiny_shards):
    """evaluate.py streams uint8 pixels (normalised by the backbone on the device): same numbers as fp32."""
    backbone = load_tiny_backbone(tmp_path / "tiny.pt")
    torch.manual_seed(0)
    sae = SparseAutoencoder(backbone.width, 96)
    results = []
    for transform in (backbone.preprocess, backbone.pixel_transform):
        loader = image_batches(tiny_shards[1], transform, 8, shuffle=0, shardshuffle=False, partial=True)
        results.append(stream_pass(backbone, sae, loader, layer=1, tokens="cls", n_images=16, k=4,
                                   classnames=DEMO_CLASSNAMES, contrastive_batch_size=8, max_tokens=4096,
                                   device=torch.device("cpu")))
    fp32, uint8 = results
    assert next(iter(image_batches(tiny_shards[1], backbone.pixel_transform, 2, shuffle=0)))["images"].dtype \
        == torch.uint8
    assert uint8.reconstruction == pytest.approx(fp32.reconstruction, rel=1e-4)
    assert uint8.contrastive == pytest.approx(fp32.contrastive, rel=1e-4, abs=1e-6)
    assert torch.allclose(uint8.stats.density, fp32.stats.density)
