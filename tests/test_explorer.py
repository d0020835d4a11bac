"""The SAE Explorer: bundle math on hand cases, the bundle of a real tiny run read back against a recomputation,
the machine player, every page driven with Streamlit's AppTest, and the served app in headless Chromium."""

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
from omegaconf import OmegaConf
from torch.nn.functional import normalize

from sae_lightning.backbone import select_tokens
from sae_lightning.data.shards import expand_shards, image_batches
from sae_lightning.explorer import __main__ as launcher
from sae_lightning.explorer.browser import LOADED_IMAGES, SETTLED
from sae_lightning.explorer.bundle import ActivationHistogram, mlp_cosines, nearest_features, write_explorer_bundle
from sae_lightning.explorer.game import candidate_sets, game_metric, machine_pick, play
from sae_lightning.explorer.store import HIST_BINS, Bundle, ThumbnailStore, hist_edges
from sae_lightning.sae import SparseAutoencoder
from tests.helpers import served_explorer

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "sae_lightning" / "explorer" / "app.py"
N_GAME = 32


# ------------------------------------------------------------------------------------------ hand cases


def test_activation_histogram_bins_by_hand():
    edges = hist_edges()
    assert len(edges) == HIST_BINS + 1
    acts = torch.tensor([[0.0, 1.0, 1e-9], [0.0, 1.0, 5000.0], [2.0, 0.0, 0.0]])  # 3 tokens, 3 features
    hist = ActivationHistogram(3)
    hist.update(acts[:2])
    hist.update(acts[2:])
    counts = hist.compute()
    assert counts.shape == (3, HIST_BINS) and counts.dtype == torch.int32
    assert counts.sum(1).tolist() == [1, 2, 2]  # zeros are not counted
    one = int(np.searchsorted(edges, 0.0, side="right")) - 1  # log10(1) = 0
    two = int(np.searchsorted(edges, np.log10(2.0), side="right")) - 1
    assert counts[1, one] == 2 and counts[0, two] == 1
    assert counts[2, 0] == 1 and counts[2, HIST_BINS - 1] == 1  # below / above the range clamp to the ends


def test_mlp_cosines_and_nearest_features_chunked_match_dense():
    gen = torch.Generator().manual_seed(0)
    enc, neurons = torch.randn(50, 8, generator=gen), torch.randn(12, 8, generator=gen)
    dense = normalize(enc, dim=1) @ normalize(neurons, dim=1).T
    q = mlp_cosines(enc, neurons, chunk=7)
    assert q.dtype == torch.int8 and q.shape == (50, 12)
    assert torch.allclose(q.float() / 127, dense, atol=0.5 / 127 + 1e-6)

    dec = torch.randn(50, 8, generator=gen)
    dec[17] = 3 * dec[4]  # parallel directions: each is the other's nearest, cosine 1
    idx, cos = nearest_features(dec, n=5, chunk=7)
    assert idx[4, 0] == 17 and idx[17, 0] == 4 and cos[4, 0] == pytest.approx(1.0, abs=1e-5)
    full = normalize(dec, dim=1) @ normalize(dec, dim=1).T
    full.fill_diagonal_(-2)
    ref_cos, _ = torch.topk(full, 5, dim=1)
    assert torch.allclose(cos, ref_cos, atol=1e-5)
    assert not (idx == torch.arange(50).unsqueeze(1)).any()  # never itself


def test_candidate_sets_hold_the_target_once_among_distinct_images():
    rows = candidate_sets(20, seed=3)
    assert rows.shape == (20, 8)
    for t, row in enumerate(rows):
        assert (row == t).sum() == 1 and len(set(row.tolist())) == 8 and row.min() >= 0 and row.max() < 20
    assert not all(row[-1] == t for t, row in enumerate(rows))  # the target's position is shuffled
    with pytest.raises(ValueError, match="at least 8"):
        candidate_sets(5)


def test_machine_player_on_a_hand_built_game():
    # 8 game images with orthogonal embeddings; feature f's top images all embed like image f
    emb = np.eye(8)
    feature_emb = {f: emb[f] for f in range(8)}
    # image t's top features: t (strong) and (t + 1) % 8 (weak): the weighted query points at t
    top = [([t, (t + 1) % 8], [2.0, 0.5]) for t in range(8)]
    cand = candidate_sets(8, seed=0)
    assert machine_pick([3, 4], [2.0, 0.5], feature_emb, emb[cand[3]]) == int(np.where(cand[3] == 3)[0][0])
    assert machine_pick([99], [1.0], feature_emb, emb) is None  # no feature with top images: no round
    result = play(top, feature_emb, emb, cand, baseline_pool=list(range(8)), seed=0)
    assert result["accuracy"] == 1.0 and result["n_rounds"] == 8
    assert result["baseline_accuracy"] < 1.0


def test_random_feature_baseline_is_at_chance_and_real_features_beat_it():
    """2,000 images in 40 classes; feature c's top images are class c's: the image's own features find it far
    above chance, random features land at 1/8 (binomial sd 0.0074 at 2,000 rounds)."""
    rng = np.random.default_rng(0)
    n, d, classes = 2000, 16, 40
    centres = rng.normal(size=(classes, d))
    label = rng.integers(0, classes, n)
    emb = centres[label] + 0.8 * rng.normal(size=(n, d))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    feature_emb = {c: emb[label == c].mean(0) for c in range(classes)}
    top = [([int(label[t])], [1.0]) for t in range(n)]
    result = play(top, feature_emb, emb, candidate_sets(n, seed=1), baseline_pool=list(range(classes)), seed=1)
    assert result["n_rounds"] == n
    assert abs(result["baseline_accuracy"] - 1 / 8) < 0.03
    assert result["accuracy"] > 0.5


def test_thumbnail_store_round_trip(tmp_path):
    store = ThumbnailStore(tmp_path / "t.sqlite", write=True)
    store.put_many([("a.tar/1", b"\xff\xd8one"), ("a.tar/2", b"two")])
    store.close()
    read = ThumbnailStore(tmp_path / "t.sqlite")
    assert len(read) == 2 and read.get_many(["a.tar/2", "missing"]) == {"a.tar/2": b"two"}
    with pytest.raises(FileNotFoundError):
        ThumbnailStore(tmp_path / "none.sqlite")


def test_launcher_rejects_bad_arguments_before_starting(tmp_path):
    with pytest.raises(SystemExit, match="which run"):
        launcher.main([])
    with pytest.raises(SystemExit, match="unknown argument"):
        launcher.main(["runn=x"])
    with pytest.raises(SystemExit, match="evaluate the run first"):
        launcher.main([f"run={tmp_path}"])


def test_launcher_picks_the_evaluation_of_one_sae_of_a_run_with_several(tmp_path):
    """A run that trained several SAEs has <run>/eval/<name>/ per SAE: sae_name= picks one, the only one is
    taken, several without sae_name (or an unknown name) are an error that names them."""
    for name in ("small", "large"):
        (tmp_path / "eval" / name / "explorer").mkdir(parents=True)
        (tmp_path / "eval" / name / "explorer" / "bundle.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"2 SAEs \(large, small\): pick one with sae_name"):
        launcher.resolve({"run": str(tmp_path)})
    assert launcher.resolve({"run": str(tmp_path), "sae_name": "small"}) == (
        tmp_path.resolve() / "eval" / "small", tmp_path.resolve(), "small")
    with pytest.raises(SystemExit, match="evaluated SAEs: large, small"):
        launcher.resolve({"run": str(tmp_path), "sae_name": "medium"})
    (tmp_path / "eval" / "large" / "explorer" / "bundle.json").unlink()
    assert launcher.resolve({"run": str(tmp_path)})[0] == tmp_path.resolve() / "eval" / "small"
    assert launcher.parse([f"run={tmp_path}", "sae_name=small"])["sae_name"] == "small"
    # eval_dir=<run>/eval/<name> alone: the run is <run> (not <run>/eval) and the SAE <name>, so the Inspect page
    # loads <run>/sae/<name>/
    (tmp_path / "sae" / "small").mkdir(parents=True)
    (tmp_path / "sae" / "small" / "cfg.json").write_text("{}")
    assert launcher.resolve({"eval_dir": str(tmp_path / "eval" / "small")}) == (
        tmp_path.resolve() / "eval" / "small", tmp_path.resolve(), "small")
    # a single-SAE run evaluated into <run>/solo: the run is its parent
    (tmp_path / "solo" / "explorer").mkdir(parents=True)
    (tmp_path / "solo" / "explorer" / "bundle.json").write_text("{}")
    assert launcher.resolve({"eval_dir": str(tmp_path / "solo")}) == (tmp_path.resolve() / "solo", tmp_path.resolve(),
                                                                      None)


# ------------------------------------------------------------------------------ a real tiny run, bundled


@pytest.fixture(scope="module")
def explored(demo_run) -> Path:
    """The demo run evaluated on 64 images (evaluate.py), then its explorer bundle with a 32-image game set."""
    cmd = [sys.executable, "evaluate.py", f"run={demo_run}", "n_images=64", "top_k=5", "batch_size=32",
           "num_workers=0", "device=cpu", "n_grid_features=1", "tensorboard=false",
           f"out_dir={demo_run / 'explorer_eval'}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    backbone, sae, layer, tokens, shards = _models(demo_run)
    write_explorer_bundle(demo_run / "explorer_eval", sae, backbone, layer=layer, tokens=tokens, shards=shards,
                          n_game=N_GAME, batch_size=32, auto_labels={1: "a test label"})
    return demo_run / "explorer_eval"


def _models(run: Path):
    import hydra

    cfg = OmegaConf.load(run / ".hydra" / "resolved.yaml")
    backbone = hydra.utils.instantiate(cfg.backbone, device="cpu")
    sae = SparseAutoencoder.load(run / "sae").eval()
    return backbone, sae, backbone.resolve_layer(int(cfg.layer)), str(cfg.tokens), expand_shards(cfg.data.val_shards)


@pytest.mark.slow
@torch.no_grad()
def test_bundle_matches_a_recomputation(explored, demo_run):
    b = Bundle(explored)
    backbone, sae, layer, tokens, shards = _models(demo_run)
    # independent pass over the held-out shards in order: keys and per-image SAE activations
    keys, acts = [], []
    for batch in image_batches(shards, backbone.preprocess, 32, shuffle=0, shardshuffle=False, partial=True):
        a = sae.encode(select_tokens(backbone.residual(batch["images"], layer), tokens).float())
        keys += batch["keys"]
        acts.append(a.amax(1) if a.dim() == 3 else a)
    acts = torch.cat(acts)
    top_keys = set(b.meta["image_keys"].values())
    # the game set: the first N_GAME images in shard order that are no feature's top image
    expected = [k for k in keys if k not in top_keys][:N_GAME]
    assert b.game_keys == expected and not top_keys & set(b.game_keys)
    for i, key in enumerate(b.game_keys):
        feats, vals = b.game_activations(i)
        row = acts[keys.index(key)]
        assert set(feats.tolist()) == set(torch.nonzero(row > 0).squeeze(1).tolist())
        assert np.allclose(vals, row[feats].numpy(), rtol=1e-5, atol=1e-6)
        assert list(vals) == sorted(vals, reverse=True)
    assert b.arrays["game_labels"].shape == (N_GAME,)
    # histograms over every held-out image (fewer than n_hist_images): counts of f > 0 per feature
    assert np.array_equal(b.arrays["hist_counts"].sum(1), (acts > 0).sum(0).numpy())
    # every top image and every game image has a JPEG thumbnail
    thumbs = b.thumbs.get_many(sorted(top_keys) + b.game_keys)
    assert len(thumbs) == len(top_keys) + N_GAME == b.info["n_thumbnails"]
    with PIL.Image.open(io.BytesIO(thumbs[b.game_keys[0]])) as im:
        assert im.format == "JPEG" and im.size == (b.info["thumb_size"],) * 2
    # MLP cosines and neighbours against a direct computation
    f = 7
    direct = normalize(sae.W_enc.T[f : f + 1], dim=1) @ normalize(backbone.mlp_out_vectors(layer), dim=1).T
    assert np.allclose(b.mlp_cosine(f), direct[0].numpy(), atol=0.5 / 127 + 1e-6)
    dec = normalize(sae.W_dec, dim=1)
    j = int(b.arrays["neighbour_indices"][f, 0])
    assert float(dec[f] @ dec[j]) == pytest.approx(float(b.arrays["neighbour_cosines"][f, 0]), abs=1e-5)
    assert b.auto_label(1) == "a test label" and b.auto_label(2) is None
    # the grid's keys come from thumbnails.sqlite's image_index, which must agree with features.json
    for g in range(b.n_features):
        expected = [b.meta["image_keys"][str(i)] for i in b.features["top_indices"][g, :16].tolist() if i >= 0]
        assert [key for key, _, _ in b.top_images(g)] == expected
    assert b.classnames == b.meta["classnames"] and b.info["heatmap_grid"] is None


@pytest.mark.slow
def test_a_format_1_bundle_still_reads(explored, tmp_path):
    """Format 1 had no image_index table, no class names in bundle.json and no heatmaps: the app falls back to
    features.json."""
    import shutil
    import sqlite3

    old = tmp_path / "eval"
    shutil.copytree(explored, old)
    info = json.loads((old / "explorer" / "bundle.json").read_text())
    for key in ("classnames", "heatmap_grid", "heatmap_slots"):
        info.pop(key)
    (old / "explorer" / "bundle.json").write_text(json.dumps(info | {"format_version": 1}))
    with sqlite3.connect(old / "explorer" / "thumbnails.sqlite") as db:
        db.execute("DROP TABLE image_index")
    b, new = Bundle(old), Bundle(explored)
    assert b.classnames == new.classnames and not b.has_heatmaps
    assert all(b.top_images(f) == new.top_images(f) for f in range(b.n_features))
    (old / "explorer" / "bundle.json").write_text(json.dumps(info | {"format_version": 3}))
    with pytest.raises(ValueError, match="bundle format 3, this app reads 1, 2"):
        Bundle(old)


@pytest.mark.slow
def test_game_metric_from_the_bundle(explored):
    result = game_metric(explored)
    assert set(result) >= {"accuracy", "baseline_accuracy", "n_rounds"}
    assert 0 < result["n_rounds"] <= N_GAME and 0 <= result["accuracy"] <= 1
    info = json.loads((explored / "explorer" / "bundle.json").read_text())
    assert info["game_accuracy"] == result["accuracy"] and info["format_version"] == 2
    assert game_metric(explored) == result  # seeded: recomputing gives the same numbers


def test_bundle_refuses_a_mismatched_sae(tmp_path):
    (tmp_path / "features.safetensors").write_bytes(b"")
    (tmp_path / "features.json").write_text(json.dumps({"n_features": 10}))
    from safetensors.torch import save_file

    save_file({"density": torch.zeros(10)}, str(tmp_path / "features.safetensors"))
    with pytest.raises(ValueError, match="the SAE has 12 features"):
        write_explorer_bundle(tmp_path, SparseAutoencoder(4, 12), None, layer=0, tokens="cls", shards=[])
    with pytest.raises(FileNotFoundError, match="run evaluate.py first"):
        write_explorer_bundle(tmp_path / "x", SparseAutoencoder(4, 10), None, layer=0, tokens="cls", shards=[])


# -------------------------------------------------------------------------------------------- AppTest


@pytest.fixture
def app(explored, demo_run, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SAE_EXPLORER_EVAL_DIR", str(explored))
    monkeypatch.setenv("SAE_EXPLORER_RUN_DIR", str(demo_run))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception, at.exception
    return at


def _go(at, page: str):
    at.sidebar.radio(key="page").set_value(page).run()
    assert not at.exception, at.exception
    return at


def _texts(at) -> str:
    return "\n".join([m.value for m in at.markdown] + [t.value for t in at.title] + [c.value for c in at.caption])


@pytest.mark.slow
def test_app_overview_and_navigator_filter(app, explored):
    assert app.title[0].value == "SAE Explorer: overview"
    assert any("explained variance" in str(t.value) for t in app.table)
    _go(app, "Feature navigator")
    n = Bundle(explored).n_features
    assert f"**{n:,} features match**" in _texts(app)
    app.selectbox(key="f_aligned").set_value("aligned").run()
    aligned = int((Bundle(explored).features["aligned_neurons"] > 0).sum())
    assert f"**{aligned:,} features match**" in _texts(app)
    app.selectbox(key="f_aligned").set_value("any").run()
    app.text_input(key="f_search").set_value("a test label").run()  # the auto label of feature 1
    assert "**1 features match**" in _texts(app)
    assert app.dataframe[0].value["feature"].tolist() == [1]


@pytest.mark.slow
def test_app_opens_features_and_steps_through_them(app, explored):
    _go(app, "Feature navigator")
    app.number_input(key="goto").set_value(5).run()
    app.button(key="goto_open").click().run()
    assert app.sidebar.radio(key="page").value == "Feature page" and app.title[0].value == "Feature 5"
    assert app.query_params["feature"] == ["5"] or app.query_params["feature"] == "5"
    app.button(key="feat_next").click().run()
    assert app.title[0].value == "Feature 6"
    b = Bundle(explored)
    j = int(b.arrays["neighbour_indices"][6, 0])
    app.button(key=f"nn_{j}").click().run()
    assert app.title[0].value == f"Feature {j}"


@pytest.mark.slow
def test_app_game_round_changes_score_and_streak(app, explored):
    _go(app, "Guess the image")
    r = app.session_state["round"]
    right = r["candidates"].index(r["target"])
    app.button(key=f"pick_{right}").click().run()
    assert app.session_state["score"] == 1 and app.session_state["streak"] == 1
    assert any("Correct" in s.value for s in app.success)
    assert any(m.label == "score" and m.value == "1 / 1" for m in app.metric)
    app.button(key="next_round").click().run()
    r = app.session_state["round"]
    wrong = next(i for i, c in enumerate(r["candidates"]) if c != r["target"])
    app.button(key=f"pick_{wrong}").click().run()
    assert app.session_state["score"] == 1 and app.session_state["streak"] == 0
    assert any(m.label == "score" and m.value == "1 / 2" for m in app.metric)
    assert any("Wrong" in e.value for e in app.error)
    app.button(key="next_round").click().run()
    app.button(key="reveal").click().run()
    assert app.session_state["played"] == 3 and app.session_state["score"] == 1


@pytest.mark.slow
def test_app_inspects_an_uploaded_image(app, explored, demo_run):
    _go(app, "Inspect an image")
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (40, 30), (200, 30, 30)).save(buffer, format="PNG")
    app.file_uploader(key="upload").upload("red.png", buffer.getvalue(), "image/png").run()
    assert not app.exception, app.exception
    backbone, sae, layer, tokens, _ = _models(demo_run)
    image = PIL.Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    with torch.no_grad():
        acts = sae.encode(select_tokens(backbone.residual(backbone.preprocess(image)[None], layer), tokens))
    acts = (acts.amax(1) if acts.dim() == 3 else acts)[0]
    assert f"**{int((acts > 0).sum())} features fire** on red.png" in _texts(app)
    best = int(acts.argmax())
    assert f"**Feature {best}** (activation {float(acts[best]):.3g})" in _texts(app)
    app.button(key=f"inspect_open_{best}").click().run()
    assert app.title[0].value == f"Feature {best}"
    _go(app, "Inspect an image")
    app.file_uploader(key="upload").upload("bad.png", b"not an image", "image/png").run()
    assert any("not a readable image" in e.value for e in app.error)


@pytest.mark.slow
def test_inspect_page_loads_the_named_sae_of_a_run_with_several(explored, demo_run, tmp_path, monkeypatch):
    """A run with several SAEs keeps them in sae/<name>/: the launcher's sae_name reaches the Inspect page."""
    import shutil

    from streamlit.testing.v1 import AppTest

    run = tmp_path / "run"
    shutil.copytree(demo_run / ".hydra", run / ".hydra")
    shutil.copytree(demo_run / "sae", run / "sae" / "small")
    monkeypatch.setenv("SAE_EXPLORER_EVAL_DIR", str(explored))
    monkeypatch.setenv("SAE_EXPLORER_RUN_DIR", str(run))
    monkeypatch.setenv("SAE_EXPLORER_SAE_NAME", "small")
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    _go(at, "Inspect an image")
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (40, 30), (200, 30, 30)).save(buffer, format="PNG")
    at.file_uploader(key="upload").upload("red.png", buffer.getvalue(), "image/png").run()
    assert not at.exception and not at.error and "features fire** on red.png" in _texts(at)
    monkeypatch.setenv("SAE_EXPLORER_SAE_NAME", "large")  # no such SAE: a clear error, not a crash
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    _go(at, "Inspect an image")
    at.file_uploader(key="upload").upload("red.png", buffer.getvalue(), "image/png").run()
    assert any("sae/large/cfg.json" in e.value for e in at.error)


# ------------------------------------------------------------------------------------ headless Chromium




@pytest.mark.slow
def test_served_app_in_headless_chromium(explored, demo_run):
    shots = ROOT / "outputs" / "explorer_screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with served_explorer([f"run={demo_run}", f"eval_dir={explored}"]) as (url, browser):
        b = Bundle(explored)

        browser.goto(f"{url}/?page=overview")
        browser.wait_for("document.body.innerText.includes('SAE Explorer: overview')")
        browser.wait_for("document.querySelectorAll('canvas, svg.marks').length >= 2")  # the vega charts
        browser.wait_for(SETTLED)
        browser.screenshot(shots / "overview.png")
        first_live = int(np.nonzero(b.features["density"] > 0)[0][0])  # the scatter's first point
        browser.click_at("g.mark-symbol path")
        browser.wait_for(f"[...document.querySelectorAll('h1')].some(h => h.innerText.trim() === "
                         f"'Feature {first_live}')")  # clicking a point opened its feature

        browser.goto(f"{url}/?page=navigator")
        browser.wait_for(f"document.body.innerText.includes('{b.n_features:,} features match')")
        browser.wait_for("document.querySelector('[data-testid=stDataFrame] [data-testid=data-grid-canvas]')")
        browser.wait_for(SETTLED)
        browser.screenshot(shots / "navigator.png")

        f = int(np.nanargmax(b.features["mean_top_activation"]))
        n_top = len(b.top_images(f))
        browser.goto(f"{url}/?page=feature&feature={f}")
        browser.wait_for(f"[...document.querySelectorAll('h1')].some(h => h.innerText.trim() === 'Feature {f}')")
        assert browser.wait_for(f"{LOADED_IMAGES} >= {n_top} ? {LOADED_IMAGES} : 0") >= n_top  # the grid loaded
        browser.wait_for(SETTLED)
        browser.screenshot(shots / "feature.png")

        browser.goto(f"{url}/?page=game")
        browser.wait_for("document.body.innerText.includes('Which image is it?')")
        buttons = "[...document.querySelectorAll('button')].filter(b => /^Pick [1-8]$/.test(b.innerText.trim()))"
        browser.wait_for(f"{buttons}.length === 8")  # the 8 candidates
        browser.wait_for(f"{LOADED_IMAGES} >= 8")
        browser.click("Pick 1")
        browser.wait_for("/Correct|Wrong/.test(document.body.innerText)")
        text = browser.js("document.body.innerText")
        assert ("1 / 1" if "Correct" in text else "0 / 1") in text  # one round played and scored
        browser.wait_for(SETTLED)
        browser.screenshot(shots / "game.png")

        browser.goto(f"{url}/?page=inspect")
        browser.wait_for("document.body.innerText.includes('Upload an image')")
        browser.wait_for("document.querySelector('input[type=file]') !== null")
        upload = shots / "upload.png"
        PIL.Image.new("RGB", (48, 40), (30, 160, 40)).save(upload)
        browser.upload(upload)
        browser.wait_for("document.body.innerText.includes('features fire on upload.png')")
        browser.wait_for(f"{LOADED_IMAGES} >= 2")  # the upload and the top images of its features
        browser.wait_for(SETTLED)
        browser.screenshot(shots / "inspect.png")
    for name in ("overview", "navigator", "feature", "game", "inspect"):
        with PIL.Image.open(shots / f"{name}.png") as im:
            assert im.format == "PNG" and im.size[0] > 600


def _hand_made_evaluation(tmp_path, shards, backbone, n_top_images: int, n_f: int = 24):
    """features.safetensors/json of a made-up evaluation whose top images are the first n_top_images images
    of the held-out shards (2 per feature); returns (eval dir, the shards' keys in order, their images)."""
    from safetensors.torch import save_file

    batch = next(iter(image_batches(shards, backbone.preprocess, 128, shuffle=0, shardshuffle=False,
                                    partial=True)))
    keys = batch["keys"]
    half = n_top_images // 2
    top = torch.stack([torch.arange(n_f) % half, torch.arange(n_f) % (n_top_images - half) + half], 1)
    ev = tmp_path / "eval"
    ev.mkdir()
    save_file({"density": torch.full((n_f,), 0.5), "mean_top_activation": torch.ones(n_f),
               "label_entropy": torch.zeros(n_f), "top_values": torch.ones(n_f, 2), "top_indices": top,
               "top_labels": torch.zeros(n_f, 2, dtype=torch.long)}, str(ev / "features.safetensors"))
    (ev / "features.json").write_text(json.dumps({"n_features": n_f, "classnames": None,
                                                  "image_keys": {str(i): keys[i] for i in range(n_top_images)}}))
    return ev, keys, batch["images"]


@pytest.mark.slow
@torch.no_grad()
def test_bundle_for_a_patch_run_uses_the_max_over_tokens(tmp_path, tiny_shards):
    """A hand-made evaluation (2 top images per feature) of a random SAE on patch tokens: the game set's
    sparse activations are the max over each image's patches, the histograms count every patch."""
    from sae_lightning.backbone import load_tiny_backbone

    backbone = load_tiny_backbone(tmp_path / "tiny.pt")
    torch.manual_seed(0)
    sae = SparseAutoencoder(backbone.width, 24)
    shards = expand_shards(tiny_shards[1])
    ev, keys, images = _hand_made_evaluation(tmp_path, shards, backbone, 20)
    layer = 1
    write_explorer_bundle(ev, sae, backbone, layer=layer, tokens="patches", shards=shards, n_game=10,
                          n_hist_images=30, batch_size=16)
    b = Bundle(ev)
    assert b.game_keys == keys[20:30]  # the first 10 images that are no top image
    acts = sae.encode(select_tokens(backbone.residual(images[:30], layer), "patches"))  # [30, T-1, F]
    for i in range(10):
        feats, vals = b.game_activations(i)
        ref = acts[20 + i].amax(0)
        assert set(feats.tolist()) == set(torch.nonzero(ref > 0).squeeze(1).tolist())
        assert np.allclose(vals, ref[feats].numpy(), rtol=1e-5, atol=1e-6)
    assert np.array_equal(b.arrays["hist_counts"].sum(1), (acts > 0).sum((0, 1)).numpy())
    assert b.info["hist_n_tokens"] == 30 * (backbone.n_tokens - 1)
    assert len(b.thumbs.get_many(keys[:30])) == 30


@pytest.mark.slow
def test_too_few_game_images_leave_the_game_undefined_not_a_crash(tmp_path, tiny_shards, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from sae_lightning.backbone import load_tiny_backbone

    backbone = load_tiny_backbone(tmp_path / "tiny.pt")
    sae = SparseAutoencoder(backbone.width, 24)
    shards = expand_shards(tiny_shards[1])
    ev, keys, _ = _hand_made_evaluation(tmp_path, shards, backbone, 123)  # of 128 images: 5 are left
    result = write_explorer_bundle(ev, sae, backbone, layer=1, tokens="cls", shards=shards, n_game=1000)
    assert Bundle(ev).game_keys == keys[123:] and len(keys) == 128
    assert result["accuracy"] is None and result["n_rounds"] == 0
    monkeypatch.setenv("SAE_EXPLORER_EVAL_DIR", str(ev))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    at.sidebar.radio(key="page").set_value("Guess the image").run()
    assert not at.exception and "a round needs 8" in at.warning[0].value
