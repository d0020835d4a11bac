"""Heatmaps over the top images (patch-token runs) and visualise.py's images on the explorer's feature page.

The hand-checkable case: 16 black 32 px images, image i with a white 8 px square on patch i of the tiny ViT's
4x4 grid, and an SAE whose feature 0 reads "a white patch" at layer 0 (its encoder vector is the mean change a
white square makes to its own patch token; separated by about 140 either side of zero). Feature 0 then fires
on exactly one patch of each image: the one under the square. Its heatmap over each top image must peak
there, and nowhere else.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import webdataset as wds
from safetensors.torch import save_file

from sae_lightning.backbone import load_tiny_backbone, select_tokens
from sae_lightning.explorer import heatmap
from sae_lightning.explorer.browser import LOADED_IMAGES, SETTLED
from sae_lightning.explorer.bundle import TopImageHeatmaps, write_explorer_bundle
from sae_lightning.explorer.store import GRID_SIZE, Bundle
from sae_lightning.sae import SparseAutoencoder
from tests.helpers import served_explorer

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "sae_lightning" / "explorer" / "app.py"
N_IMAGES, N_FEATURES, LAYER = 24, 6, 0
TOP_OF_FEATURE_0 = [5, 11, 2]  # images (= square positions) of feature 0's top slots, in slot order
TOP_OF_FEATURE_1 = [7]  # a feature that never fires: its heatmap is all zeros


def square_image(position: int | None) -> PIL.Image.Image:
    """32 px black, with a white 8 px square on grid cell `position` (row-major in the 4x4 grid) or none."""
    pixels = np.zeros((32, 32, 3), np.uint8)
    if position is not None:
        r, c = divmod(position, 4)
        pixels[8 * r : 8 * r + 8, 8 * c : 8 * c + 8] = 255
    return PIL.Image.fromarray(pixels)


def position_of(i: int) -> int | None:
    return i % 16 if i < 20 else None  # images 20.. are blank


@pytest.fixture(scope="module")
def square_world(tmp_path_factory):
    """Shard, backbone and hand-built SAE of the hand-checkable case."""
    root = tmp_path_factory.mktemp("squares")
    backbone = load_tiny_backbone(root / "tiny.pt")
    assert tuple(backbone.visual.grid_size) == (4, 4)
    shard = root / "squares-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(N_IMAGES):
            buffer = io.BytesIO()
            square_image(position_of(i)).save(buffer, format="PNG")
            sink.write({"__key__": f"{i:06d}", "png": buffer.getvalue(), "cls": str(i % 3).encode()})
    with torch.no_grad():
        x = torch.stack([backbone.preprocess(square_image(p)) for p in [*range(16), None]])
        res = backbone.residual(x, LAYER)
        white = torch.stack([res[p, 1 + p] - res[16, 1 + p] for p in range(16)]).mean(0)
        sae = SparseAutoencoder(backbone.width, N_FEATURES)
        sae.W_enc.zero_()
        sae.b_dec.zero_()
        sae.b_enc.fill_(-1.0)  # features 1.. never fire
        sae.W_enc[:, 0] = white
        sae.b_enc[0] = 0.0
        on_square = (res[torch.arange(16), 1 + torch.arange(16)] @ white).min()
        off_square = (res[:, 1:] @ white)[~torch.eye(17, 16, dtype=torch.bool)].max()
    assert on_square > 50 and off_square < -50  # the construction: feature 0 fires only under the square
    return root, backbone, sae, [str(shard)]


def hand_made_evaluation(directory: Path, shard: str) -> Path:
    """features.safetensors/json whose feature 0's top images are TOP_OF_FEATURE_0, feature 1's TOP_OF_FEATURE_1."""
    k = 4
    top = torch.full((N_FEATURES, k), -1, dtype=torch.long)
    top[0, : len(TOP_OF_FEATURE_0)] = torch.tensor(TOP_OF_FEATURE_0)
    top[1, : len(TOP_OF_FEATURE_1)] = torch.tensor(TOP_OF_FEATURE_1)
    values = torch.where(top >= 0, 1.0, -torch.inf)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"density": torch.full((N_FEATURES,), 0.1), "mean_top_activation": torch.ones(N_FEATURES),
               "label_entropy": torch.zeros(N_FEATURES), "top_values": values, "top_indices": top,
               "top_labels": torch.where(top >= 0, 0, -1)}, str(directory / "features.safetensors"))
    name = Path(shard).name
    keys = {str(i): f"{name}/{i:06d}" for i in sorted(set(TOP_OF_FEATURE_0 + TOP_OF_FEATURE_1))}
    (directory / "features.json").write_text(json.dumps({"n_features": N_FEATURES, "classnames": ["a", "b", "c"],
                                                         "image_keys": keys, "tokens": "patches"}))
    return directory


@pytest.fixture(scope="module", params=["patches", "all"])
def square_bundle(request, square_world):
    root, backbone, sae, shards = square_world
    ev = hand_made_evaluation(root / f"eval-{request.param}", shards[0])
    write_explorer_bundle(ev, sae, backbone, layer=LAYER, tokens=request.param, shards=shards, n_game=8,
                          batch_size=2, max_tokens=20)  # 2 images per batch, 1 image per SAE chunk
    return ev, request.param


# ------------------------------------------------------------------------------------------ hand cases


def test_heatmap_collector_puts_each_image_in_its_features_slots():
    # feature 0's top images: 7, 3; feature 1's: 3 (-1: empty); feature 2's: 9, 7
    top = torch.tensor([[7, 3, 12], [3, -1, -1], [9, 7, -1]])
    maps = TopImageHeatmaps(top, n_slots=2, n_patches=4)  # slot 2 (image 12) is beyond the kept slots
    acts = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)  # [B, P, F] for images 3, 7
    maps.update(acts, [3, 7])
    assert torch.equal(maps.maps[0, 0], acts[1, :, 0].half()) and torch.equal(maps.maps[0, 1], acts[0, :, 0].half())
    assert torch.equal(maps.maps[1, 0], acts[0, :, 1].half()) and maps.maps[1, 1].isnan().all()
    assert torch.equal(maps.maps[2, 1], acts[1, :, 2].half()) and maps.maps[2, 0].isnan().all()  # 9 not seen
    maps.update(acts[:1] + 100, [12])  # an image no kept slot refers to changes nothing
    assert torch.equal(maps.maps[0, 0], acts[1, :, 0].half())


def test_overlay_tints_only_the_patch_that_fired():
    grey = io.BytesIO()
    PIL.Image.new("RGB", (128, 128), (100, 100, 100)).save(grey, format="JPEG", quality=95)
    heat = np.zeros((4, 4), np.float32)
    heat[1, 3] = 2.0  # row 1, column 3: pixels 32..63 down, 96..127 across
    out = np.asarray(PIL.Image.open(io.BytesIO(heatmap.overlay(grey.getvalue(), heat, vmax=2.0))), np.float32)
    plain = np.asarray(PIL.Image.open(io.BytesIO(grey.getvalue())).convert("RGB"), np.float32)
    tinted = np.zeros((128, 128), bool)
    tinted[32:64, 96:128] = True
    assert np.abs(out - plain)[~tinted].max() == 0  # untouched elsewhere
    r, g, b = (out[tinted][:, i] - plain[tinted][:, i] for i in range(3))
    assert r.min() > 50 and g.min() > 50 and b.max() < -50  # yellow at the maximum
    half = np.asarray(PIL.Image.open(io.BytesIO(heatmap.overlay(grey.getvalue(), heat, vmax=4.0))), np.float32)
    assert 0 < (half - plain)[tinted][:, 0].mean() < r.mean()  # half the maximum: a lighter tint
    same = heatmap.overlay(grey.getvalue(), np.full((4, 4), np.nan), vmax=2.0)  # no data: the image as it was
    assert np.array_equal(np.asarray(PIL.Image.open(io.BytesIO(same))), plain.astype(np.uint8))


# ---------------------------------------------------------------------------- the bundle of a patch run


@pytest.mark.slow
def test_heatmaps_peak_on_the_patch_under_the_square(square_bundle, square_world):
    ev, tokens = square_bundle
    _, backbone, sae, _ = square_world
    b = Bundle(ev)
    assert b.info["format_version"] == 2 and b.info["heatmap_grid"] == [4, 4]
    assert b.info["heatmap_slots"] == GRID_SIZE and b.has_heatmaps
    heat = b.heatmaps(0)
    assert heat.shape == (GRID_SIZE, 4, 4) and heat.dtype == np.float32
    for slot, image in enumerate(TOP_OF_FEATURE_0):
        r, c = divmod(position_of(image), 4)
        assert np.unravel_index(np.argmax(heat[slot]), (4, 4)) == (r, c)
        assert heat[slot][r, c] > 50
        others = np.ones((4, 4), bool)
        others[r, c] = False
        assert (heat[slot][others] == 0).all()  # nowhere else
        with torch.no_grad():  # the value itself, recomputed: fp16 of the SAE's activation on that patch
            x = backbone.preprocess(square_image(position_of(image)))[None]
            acts = sae.encode(select_tokens(backbone.residual(x, LAYER), tokens))[0]
        patch = acts[1:] if tokens == "all" else acts
        assert heat[slot][r, c] == pytest.approx(float(patch[4 * r + c, 0]), rel=1e-3)
    assert np.isnan(heat[len(TOP_OF_FEATURE_0) :]).all()  # empty slots
    assert (b.heatmaps(1)[0] == 0).all() and np.isnan(b.heatmaps(1)[1:]).all()


@pytest.mark.slow
def test_class_token_bundle_has_no_heatmaps(square_world, tmp_path):
    root, backbone, sae, shards = square_world
    ev = hand_made_evaluation(tmp_path / "eval", shards[0])
    write_explorer_bundle(ev, sae, backbone, layer=LAYER, tokens="cls", shards=shards, n_game=8)
    b = Bundle(ev)
    assert b.info["heatmap_grid"] is None and not b.has_heatmaps and b.heatmaps(0) is None
    assert not (ev / "explorer" / "heatmaps.safetensors").exists()


# ------------------------------------------------------------------------------------------- the app


def _feature_page(ev: Path, monkeypatch, feature: int = 0):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SAE_EXPLORER_EVAL_DIR", str(ev))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["page"] = "feature"
    at.query_params["feature"] = str(feature)
    at.run()
    assert not at.exception, at.exception
    assert at.title[0].value == f"Feature {feature}"
    return at


@pytest.mark.slow
def test_feature_page_heatmap_toggle(square_bundle, monkeypatch):
    ev, _ = square_bundle
    at = _feature_page(ev, monkeypatch)
    assert at.toggle(key="heatmaps").value is True
    captions = " ".join(c.value for c in at.caption)
    assert "4x4 patches" in captions
    at.toggle(key="heatmaps").set_value(False).run()
    assert not at.exception and "4x4 patches" not in " ".join(c.value for c in at.caption)


@pytest.mark.slow
def test_feature_page_shows_visualise_outputs(square_bundle, monkeypatch, tmp_path):
    """visualise.py's feature_<i>_images.png and its summary.json entry appear on the feature page."""
    ev, _ = square_bundle
    folder = ev / "visualisations"
    folder.mkdir(exist_ok=True)
    try:
        PIL.Image.new("RGB", (64, 32), (0, 200, 0)).save(folder / "feature_0_images.png")
        (folder / "summary.json").write_text(json.dumps({"format_version": 1, "features": {"0": {
            "png": "feature_0.png", "images_png": "feature_0_images.png", "activations": [5.25, 4.5],
            "best_activation": 5.25, "top_natural_activation": 3.5, "ratio": 1.5}}}))
        at = _feature_page(ev, monkeypatch)
        assert any(s.value.startswith("Feature visualisation") for s in at.subheader)
        text = " ".join(c.value for c in at.caption)
        assert "activation on each start: 5.25, 4.5" in text and "ratio 1.5" in text
        at = _feature_page(ev, monkeypatch, feature=1)  # no visualisation of feature 1: no section
        assert not any(s.value.startswith("Feature visualisation") for s in at.subheader)
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


@pytest.mark.slow
def test_served_feature_page_heatmaps_in_headless_chromium(square_bundle):
    """The real browser: the feature page of a patch run draws its grid with heatmaps, and the toggle swaps the
    images for the plain thumbnails. Screenshots in outputs/explorer_screenshots/."""
    ev, tokens = square_bundle
    if tokens != "patches":
        pytest.skip("the browser part needs one patch-token bundle; both are checked by the tests above")
    shots = ROOT / "outputs" / "explorer_screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with served_explorer([f"eval_dir={ev}"]) as (url, browser):
        browser.goto(f"{url}/?page=feature&feature=0")
        browser.wait_for("[...document.querySelectorAll('h1')].some(h => h.innerText.trim() === 'Feature 0')")
        browser.wait_for("document.body.innerText.includes('4x4 patches')")
        n = len(TOP_OF_FEATURE_0)
        grid = "[...document.querySelectorAll('[data-testid=stImage] img')]"
        browser.wait_for(f"{grid}.filter(i => i.complete && i.naturalWidth > 0).length >= {n}")
        browser.wait_for(SETTLED)
        with_heat = browser.js(f"JSON.stringify({grid}.slice(0, {n}).map(i => i.src))")
        browser.screenshot(shots / f"feature_heatmaps_{tokens}.png")
        browser.click_at("[data-testid=stCheckbox] label, [data-testid=stToggle] label")  # the toggle
        browser.wait_for("!document.body.innerText.includes('4x4 patches')")
        browser.wait_for(f"{LOADED_IMAGES} >= {n} && ({SETTLED})")
        browser.wait_for(f"JSON.stringify({grid}.slice(0, {n}).map(i => i.src)) !== {json.dumps(with_heat)}")
        browser.screenshot(shots / f"feature_heatmaps_off_{tokens}.png")


@pytest.mark.slow
def test_evaluate_py_writes_heatmaps_that_agree_with_the_top_activations(tmp_path, data_dir, tiny_shards,
                                                                         monkeypatch):
    """A tiny patch-token run trained and evaluated end to end (evaluate.py): the heatmaps are recomputed in the
    bundle's fetch pass, the top activations in the evaluation's stream; for a patches run the largest value
    of each heatmap is that image's top activation (the max over its patch tokens). Then visualise.py on one
    feature: its images appear on that feature's page."""
    from sae_lightning.training import train
    from tests.conftest import compose_config, demo_overrides

    run = tmp_path / "run"
    train(compose_config(demo_overrides(run, data_dir, tiny_shards, ["tokens=patches", "max_steps=8"])))
    cmd = [sys.executable, "evaluate.py", f"run={run}", "n_images=48", "top_k=4", "batch_size=16", "num_workers=0",
           "device=cpu", "n_grid_features=0", "tensorboard=false", "n_game=8", "max_tokens=40", "ground_truth=false"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    b = Bundle(run / "eval")
    assert b.info["tokens"] == "patches" and b.info["heatmap_grid"] == [4, 4] and b.has_heatmaps
    checked = 0
    for f in range(b.n_features):
        heat = b.heatmaps(f)
        values = b.features["top_values"][f]
        for s in range(len(values)):
            if not np.isfinite(values[s]):
                assert np.isnan(heat[s]).all()  # an empty slot
                continue
            assert np.nanmax(heat[s]) == pytest.approx(float(values[s]), rel=2e-3, abs=2e-3)
            checked += 1
    assert checked > 100

    # visualise.py's real outputs for one live feature land on its feature page
    f = int(np.nanargmax(b.features["mean_top_activation"]))
    cmd = [sys.executable, "visualise.py", f"run={run}", f"features=[{f}]", "n_starts=2", "steps=4", "device=cpu"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "eval" / "visualisations" / "summary.json").read_text())["features"][str(f)]
    at = _feature_page(run / "eval", monkeypatch, feature=f)
    assert any(h.value.startswith("Feature visualisation") for h in at.subheader)
    best = f"best {summary['best_activation']:.3g}"
    assert any(best in c.value for c in at.caption)
