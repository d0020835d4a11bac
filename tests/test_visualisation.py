"""Feature visualisation on the tiny model: the parametrisation, the transformations, the objective, the
optimisation, a hand-built colour feature, and visualise.py's outputs on a run directory built here."""

from __future__ import annotations

import colorsys
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import save_file

from sae_lightning.backbone import load_tiny_backbone
from sae_lightning.sae import SparseAutoencoder
from sae_lightning.visualisation.objective import (
    feature_pre_activations,
    gram_diversity,
    hooked_tokens,
    image_activation,
    normalise_pixels,
    reduce_tokens,
    residual_with_grad,
)
from sae_lightning.visualisation.optimise import visualise_features
from sae_lightning.visualisation.parametrisation import (
    FourierImage,
    decorrelated_to_rgb,
    rgb_to_decorrelated,
    spectrum_scale,
)
from sae_lightning.visualisation.run import visualise_run
from sae_lightning.visualisation.transforms import TransformConfig, affine_warp, random_transform, resize

ROOT = Path(__file__).resolve().parents[1]
LAYER = 2  # the demo's layer=-2 of the 4-block tiny model
PALETTE = {"red": (215, 35, 35), "green": (35, 165, 55), "blue": (35, 75, 215), "yellow": (235, 210, 35),
           "purple": (135, 55, 185), "orange": (240, 135, 25)}
COLOURS = list(PALETTE)
RED_FEATURE = 0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The machine is shared: one intra-op thread keeps these small problems fast and the results exact."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return load_tiny_backbone(tmp_path_factory.mktemp("vis_model") / "tiny.pt")


def coloured_images(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[n, size, size, 3] uint8: a disc of one palette colour on a muted, noisy background; labels [n]."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(COLOURS)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        background = rng.uniform(40, 215) + rng.uniform(-20, 20, size=3)
        image = background + rng.normal(0, 8, size=(size, size, 3))
        r = rng.uniform(0.2, 0.35) * size
        cx, cy = rng.uniform(r, size - r, size=2)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
        image[disc] = np.array(PALETTE[COLOURS[label]]) + rng.integers(-15, 16, size=3)
        images[i] = np.clip(image, 0, 255)
    return images, labels


def to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float() / 255


def colour_sae(backbone, images: np.ndarray, labels: np.ndarray, colour: str = "red", n_features: int = 4
               ) -> SparseAutoencoder:
    """Feature 0's encoder column = the unit direction separating `colour` images from the others at LAYER
    (difference of class means), b_dec = the midpoint of the two means; the others are random directions."""
    with torch.no_grad():
        x = hooked_tokens(backbone, to_float(images), LAYER, "cls")
    target = torch.from_numpy(labels == COLOURS.index(colour))
    mean_in, mean_out = x[target].mean(0), x[~target].mean(0)
    direction = (mean_in - mean_out) / (mean_in - mean_out).norm()
    sae = SparseAutoencoder(backbone.width, n_features, metadata={"layer": LAYER, "tokens": "cls"})
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        w = torch.randn(backbone.width, n_features, generator=generator)
        sae.W_enc.copy_(w / w.norm(dim=0))
        sae.W_enc[:, RED_FEATURE] = direction
        sae.b_enc.zero_()
        sae.b_dec.copy_((mean_in + mean_out) / 2)
    return sae


def dominant_hue(image: torch.Tensor) -> tuple[float, float]:
    """(circular mean hue in degrees, fraction of pixels used) over the saturated, not-dark pixels of [3, H, W]."""
    hues, used = [], 0
    pixels = image.permute(1, 2, 0).reshape(-1, 3).tolist()
    for r, g, b in pixels:
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        if s > 0.3 and v > 0.2:
            hues.append(h)
            used += 1
    if not hues:
        return math.nan, 0.0
    angle = np.angle(np.exp(2j * np.pi * np.array(hues)).mean())
    return float(np.degrees(angle) % 360), used / len(pixels)


def hue_distance(a: float, b: float) -> float:
    return abs((a - b + 180) % 360 - 180)


# ---------------------------------------------------------------------------------------------------------------
# parametrisation


def test_fourier_parametrisation_round_trips_an_image():
    images = torch.rand(2, 3, 20, 17, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    param = FourierImage.from_images(images)
    assert param.spectrum.shape == (2, 3, 20, 17 // 2 + 1, 2)
    assert torch.allclose(param(), images, atol=1e-5)


def test_colour_decorrelation_inverts_and_spectrum_scale_is_lucids():
    t = torch.randn(2, 3, 4, 4)
    assert torch.allclose(rgb_to_decorrelated(decorrelated_to_rgb(t)), t, atol=1e-5)
    scale = spectrum_scale(8, 8)
    # DC: 1 / (1/8) * sqrt(64) = 64; frequency (0, 1/8): 8 * 8 = 64; (1/8, 1/8): 8 / sqrt(2/64) = 45.25...
    assert scale[0, 0].item() == pytest.approx(64.0)
    assert scale[0, 1].item() == pytest.approx(64.0)
    assert scale[1, 1].item() == pytest.approx(8 / math.sqrt(2 / 64))
    assert scale[0, 4].item() == pytest.approx(8 / 0.5)  # Nyquist


def test_fourier_init_is_seeded_per_image_and_near_grey():
    a = FourierImage(3, 16, seeds=[5, 6, 7])
    b = FourierImage(2, 16, seeds=[6, 9])
    assert torch.equal(a.spectrum[1], b.spectrum[0])  # same seed, same start, whatever the batch
    assert not torch.equal(a.spectrum[0], a.spectrum[1])
    assert torch.allclose(FourierImage(1, 16, init_std=0.0)(), torch.full((1, 3, 16, 16), 0.5))
    assert (a() - 0.5).abs().max() < 0.25


# ---------------------------------------------------------------------------------------------------------------
# transformations


def test_transformations_keep_shapes_and_are_seeded():
    images = torch.rand(4, 3, 24, 24)
    generators = [torch.Generator().manual_seed(i) for i in (0, 1, 2, 0)]
    out = random_transform(images[[0, 1, 2, 0]], generators, TransformConfig(), out_size=24)
    assert out.shape == (4, 3, 24, 24)
    assert torch.allclose(out[0], out[3])  # same image, same generator seed
    assert random_transform(images, [torch.Generator() for _ in range(4)], TransformConfig(), 32).shape == (
        4, 3, 32, 32)
    assert resize(images, 32).shape == (4, 3, 32, 32) and resize(images, 24) is images
    with pytest.raises(ValueError, match="generators"):
        random_transform(images, generators[:2], TransformConfig(), 24)
    with pytest.raises(ValueError, match="scale"):
        TransformConfig(scale=(1.2, 1.0))


def test_affine_warp_identity_rotation_and_grey_padding():
    images = torch.rand(1, 3, 16, 16)
    identity = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(affine_warp(images, identity, 16), images, atol=1e-6)
    quarter = torch.tensor([[1.0, math.pi / 2, 0.0, 0.0]])
    assert torch.allclose(affine_warp(images, quarter, 16), torch.rot90(images, 1, dims=(2, 3)), atol=1e-5)
    padded = affine_warp(images, identity, 16, pad=0.25)  # the window sees 1.5x the image: grey border
    assert torch.equal(padded[..., 0, 0], torch.full((1, 3), 0.5))
    assert torch.equal(padded[..., -1, -1], torch.full((1, 3), 0.5))
    shifted = affine_warp(images, torch.tensor([[1.0, 0.0, 2 / 16 * 2, 0.0]]), 16)  # 2 pixels to the left
    assert torch.allclose(shifted[..., :, :14], images[..., :, 2:], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# objective


def test_normalisation_prefers_the_backbones_own(backbone, monkeypatch):
    images = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    monkeypatch.delattr(type(backbone), "normalise_pixels", raising=False)
    assert torch.allclose(normalise_pixels(backbone, images), (images - mean) / std, atol=1e-6)
    monkeypatch.setattr(backbone, "normalise_pixels", lambda x: x * 7, raising=False)
    assert torch.equal(normalise_pixels(backbone, images), images * 7)


def test_residual_with_grad_matches_the_backbone_and_has_gradients(backbone):
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    pixels = normalise_pixels(backbone, images)
    ours = residual_with_grad(backbone, pixels, -2)
    with torch.no_grad():
        theirs = backbone.residual(pixels, -2)
    assert ours.shape == (2, backbone.n_tokens, backbone.width)
    assert torch.allclose(ours, theirs, atol=1e-5)
    ours[:, 0].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())


def test_feature_activation_matches_the_sae_and_reduces_over_tokens():
    torch.manual_seed(0)
    sae = SparseAutoencoder(8, 5)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(3, 4, 8)
    feats = torch.tensor([4, 0, 4])
    pre = feature_pre_activations(sae, x, feats)
    full = sae.encode_pre(x)
    expected = torch.stack([full[b, :, f] for b, f in enumerate(feats.tolist())])
    assert torch.allclose(pre, expected, atol=1e-5)
    assert torch.allclose(reduce_tokens(pre, "mean"), expected.mean(1))
    assert torch.allclose(reduce_tokens(pre, "max"), expected.amax(1))
    assert torch.allclose(image_activation(sae, x, feats), torch.relu(expected).amax(1))
    assert torch.allclose(feature_pre_activations(sae, x[:, 0], feats), expected[:, 0], atol=1e-5)
    with pytest.raises(ValueError, match="objective"):
        reduce_tokens(pre, "median")


def test_gram_diversity_known_values():
    e = torch.eye(4)
    same = torch.stack([e[0], e[0], e[1], e[2]])  # feature A: two identical starts; feature B: orthogonal
    assert torch.allclose(gram_diversity(same, 2), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    tokens = torch.stack([torch.stack([e[0], e[1]]), torch.stack([e[1], e[0]])])  # same Gram, tokens permuted
    assert torch.allclose(gram_diversity(tokens, 2), torch.ones(2))
    assert torch.equal(gram_diversity(same, 1), torch.zeros(4))


# ---------------------------------------------------------------------------------------------------------------
# optimisation


@pytest.mark.parametrize("tokens,objective", [("cls", "mean"), ("patches", "max")])
def test_optimisation_raises_the_target_activation(backbone, tokens, objective):
    torch.manual_seed(0)
    sae = SparseAutoencoder(backbone.width, 16)
    kwargs = dict(layer=LAYER, tokens=tokens, n_starts=2, steps=25, objective=objective, seed=3)
    result = visualise_features(backbone, sae, [3, 11], **kwargs)
    assert result.images.shape == (2, 2, 3, 32, 32) and result.history.shape == (25, 2, 2)
    assert (result.images >= 0).all() and (result.images <= 1).all()
    # every image ends well above where it started, and above the untrained SAE's natural level
    assert (result.objective > result.history[0] + 1.0).all(), (result.history[0], result.objective)
    assert (result.activations > 0).all()
    # deterministic from the seed, and a feature's images do not depend on its batch-mates
    again = visualise_features(backbone, sae, [11], **kwargs)
    assert torch.allclose(again.images[0], result.images[1], atol=2e-3)
    other = visualise_features(backbone, sae, [11], **{**kwargs, "seed": 4})
    assert not torch.allclose(other.images[0], result.images[1], atol=2e-3)


def test_diversity_term_makes_starts_differ(backbone):
    torch.manual_seed(0)
    sae = SparseAutoencoder(backbone.width, 8)
    kwargs = dict(layer=LAYER, tokens="patches", n_starts=3, steps=25, seed=0)
    plain = visualise_features(backbone, sae, [2], **kwargs)
    diverse = visualise_features(backbone, sae, [2], diversity=2.0, **kwargs)

    def mean_pair_distance(images):
        flat = images[0].reshape(3, -1)
        return torch.cdist(flat, flat).sum() / 6

    assert mean_pair_distance(diverse.images) > mean_pair_distance(plain.images)


def test_autocast_runs_the_backbone_in_bf16_and_reports_in_fp32(backbone):
    torch.manual_seed(0)
    sae = SparseAutoencoder(backbone.width, 8)
    kwargs = dict(layer=LAYER, tokens="cls", n_starts=1, steps=15, seed=0)
    half = visualise_features(backbone, sae, [1], autocast=torch.bfloat16, **kwargs)
    assert torch.isfinite(half.images).all() and (half.objective > half.history[0]).all()
    with torch.no_grad():  # the reported activation is an fp32 measurement of the final image
        x = hooked_tokens(backbone, half.images[0], LAYER, "cls")
    assert torch.allclose(image_activation(sae, x, torch.tensor([1])), half.activations[0], atol=1e-5)


def test_bad_requests_fail_before_optimising(backbone):
    sae = SparseAutoencoder(backbone.width, 8)
    with pytest.raises(ValueError, match="out of range"):
        visualise_features(backbone, sae, [8], layer=LAYER, tokens="cls")
    with pytest.raises(ValueError, match="objective"):
        visualise_features(backbone, sae, [0], layer=LAYER, tokens="cls", objective="sum")


@pytest.mark.parametrize("colour", ["red", "blue"])
def test_hand_built_colour_feature_gives_an_image_of_that_colour(backbone, colour):
    images, labels = coloured_images(240, seed=1)
    sae = colour_sae(backbone, images, labels, colour)
    with torch.no_grad():
        natural = image_activation(sae, hooked_tokens(backbone, to_float(images), LAYER, "cls"),
                                   torch.zeros(len(images), dtype=torch.long))
    result = visualise_features(backbone, sae, [RED_FEATURE], layer=LAYER, tokens="cls", n_starts=2, steps=120)
    assert result.activations.min() > natural.max(), (result.activations, natural.max())
    target = colorsys.rgb_to_hsv(*(c / 255 for c in PALETTE[colour]))[0] * 360
    for image in result.images[0]:
        hue, coverage = dominant_hue(image)
        assert coverage > 0.3 and hue_distance(hue, target) < 30, (colour, hue, coverage)


# ---------------------------------------------------------------------------------------------------------------
# visualise.py on a run directory


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray) -> str:
    with wds.TarWriter(str(path)) as sink:
        for i, (image, label) in enumerate(zip(images, labels)):
            sink.write({"__key__": f"{i:06d}", "png": PIL.Image.fromarray(image), "cls": int(label)})
    return str(path)


def write_feature_table(eval_dir: Path, acts: torch.Tensor, labels: np.ndarray, shard: str, k: int = 12) -> None:
    """The evaluate.py table fields visualise.py reads (docs/format-eval.md), from per-image activations
    acts [N, F]: top-k values (-inf padded), indices (-1), labels, and the keys of the shard's samples."""
    n, n_features = acts.shape
    values = torch.full((n_features, k), -math.inf)
    indices = torch.full((n_features, k), -1, dtype=torch.long)
    top_labels = torch.full((n_features, k), -1, dtype=torch.long)
    for f in range(n_features):
        fired = torch.nonzero(acts[:, f] > 0).squeeze(1)
        order = fired[torch.argsort(-acts[fired, f])][:k]
        values[f, : len(order)] = acts[order, f]
        indices[f, : len(order)] = order
        top_labels[f, : len(order)] = torch.from_numpy(labels)[order]
    eval_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"top_values": values, "top_indices": indices, "top_labels": top_labels,
               "density": (acts > 0).float().mean(0)}
    save_file(tensors, str(eval_dir / "features.safetensors"), metadata={"format_version": "1"})
    used = sorted({i for i in indices.flatten().tolist() if i >= 0})
    meta = {"format_version": 1, "n_features": n_features, "k": k, "n_images": n, "n_tokens": n, "tokens": "cls",
            "layer": LAYER, "backbone": "sae-tiny-vit", "shards": [shard], "classnames": COLOURS,
            "tensors": {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                        for name, t in tensors.items()},
            "image_keys": {str(i): f"{Path(shard).name}/{i:06d}" for i in used}}
    (eval_dir / "features.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, backbone):
    """A run directory as train.py + evaluate.py leave it: resolved config, exported SAE (feature 0 = red,
    feature 3 never fires), and the evaluation's per-feature table over a shard of 96 coloured images."""
    root = tmp_path_factory.mktemp("vis_run")
    images, labels = coloured_images(96, seed=2)
    shard = write_shard(root / "val-000000.tar", images, labels)
    sae = colour_sae(backbone, images, labels, "red")
    with torch.no_grad():
        sae.b_enc[3] = -1e3  # a dead feature: no top images
        acts = sae.encode(hooked_tokens(backbone, to_float(images), LAYER, "cls"))
    run = root / "run"
    sae.save(run / "sae")
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({
        "backbone": {"_target_": "sae_lightning.backbone.load_tiny_backbone",
                     "pretrained": str(Path(backbone.pretrained))},
        "layer": -2, "tokens": "cls", "data": {"autocast": "32", "val_shards": shard},
    }), run / ".hydra" / "resolved.yaml")
    write_feature_table(run / "eval", acts, labels, shard)
    return run, acts


def vis_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="visualise", overrides=overrides)


@pytest.mark.slow
def test_visualise_run_writes_pngs_and_summary(tiny_run):
    run, acts = tiny_run
    summary = visualise_run(vis_cfg([f"run={run}", "features=[0,3]", "random_features=1", "n_starts=2",
                                     "steps=100", "lr=0.1", "batch_features=2", "device=cpu", "seed=0"]))
    out = run / "eval" / "visualisations"
    assert summary["n_features"] == 3 and set(summary["features"]) >= {"0", "3"}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["format_version"] == 1 and on_disk["features"] == json.loads(json.dumps(summary["features"]))
    random_pick = next(f for f in summary["features"] if f not in ("0", "3"))
    assert int(random_pick) in (1, 2)  # drawn from the live features, not the dead one
    for f, entry in summary["features"].items():
        with PIL.Image.open(out / entry["png"]) as figure:
            assert figure.format == "PNG" and figure.width > 300
        with PIL.Image.open(out / entry["images_png"]) as strip:
            assert strip.size == (2 * 32, 32)
        assert len(entry["activations"]) == 2 and entry["best_activation"] == max(entry["activations"])
        top = acts[:, int(f)].max().item()
        if int(f) == 3:
            assert entry["top_natural_activation"] is None and entry["ratio"] is None
        else:
            assert entry["top_natural_activation"] == pytest.approx(top, rel=1e-5)
            assert entry["ratio"] == pytest.approx(entry["best_activation"] / top, rel=1e-6)
    assert not list(out.glob("*.tmp"))
    # the hand-built red feature: beyond every natural image, and red in the written PNG itself
    assert summary["features"]["0"]["ratio"] > 1
    strip = torch.from_numpy(np.asarray(PIL.Image.open(out / "feature_0_images.png")).copy())
    for image in strip.permute(2, 0, 1).float().div(255).split(32, dim=2):
        hue, coverage = dominant_hue(image)
        assert coverage > 0.3 and hue_distance(hue, 0.0) < 30, (hue, coverage)
    # the activation recorded is the activation of the image as written (8-bit)
    backbone = load_tiny_backbone(Path(OmegaConf.load(run / ".hydra" / "resolved.yaml").backbone.pretrained))
    sae = SparseAutoencoder.load(run / "sae")
    with torch.no_grad():
        images = strip.permute(2, 0, 1).float().div(255).split(32, dim=2)
        reached = image_activation(sae, hooked_tokens(backbone, torch.stack(images), LAYER, "cls"),
                                   torch.zeros(2, dtype=torch.long))
    assert reached.tolist() == pytest.approx(summary["features"]["0"]["activations"], abs=1e-4)
    assert summary["n_with_natural"] == 2 and summary["ratio_min"] <= summary["ratio_median"] <= summary["ratio_max"]


def test_top_natural_images_are_fetched_from_the_shards(tiny_run):
    from sae_lightning.visualisation.figure import natural_top_images, read_feature_table

    run, acts = tiny_run
    natural = natural_top_images(read_feature_table(run / "eval", 4), [0, 3], run / "eval")
    assert len(natural.thumbnails[0]) == 9 and all(t is not None and t.shape == (160, 160, 3)
                                                   for t in natural.thumbnails[0])
    assert natural.captions[0][0].startswith("red")  # the red feature's best image is a red disc
    assert natural.thumbnails[3] == [] and natural.top_activation[3] is None
    assert natural.live.tolist() == [True, True, True, False]
    assert read_feature_table(run / "eval", 5) is None  # a table of another SAE is ignored


def test_clear_errors_before_any_work(tiny_run, tmp_path):
    run, _ = tiny_run
    with pytest.raises(ValueError, match="run=<run dir>"):
        visualise_run(vis_cfg(["features=[0]"]))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        visualise_run(vis_cfg([f"run={tmp_path / 'nope'}", "features=[0]"]))
    with pytest.raises(FileNotFoundError, match="no exported SAE"):
        visualise_run(vis_cfg([f"run={tmp_path}", "features=[0]"]))
    out = tmp_path / "out"
    for overrides, match in [(["features=[4]"], "out of range"), (["features=[-1]"], "out of range"),
                             ([], "nothing to visualise"), (["features=[0]", "objective=sum"], "objective"),
                             (["features=[0]", "steps=0"], "steps"), (["features=[0]", "autocast=8"], "autocast"),
                             (["features=[0]", "transforms.scale=[2,1]"], "scale"),
                             (["features=[a]"], "integers"), (["features=9"], "out of range")]:
        with pytest.raises(ValueError, match=match):
            visualise_run(vis_cfg([f"run={run}", f"out_dir={out}", *overrides]))
    assert not out.exists()  # nothing written for a bad request


@pytest.mark.slow
def test_visualise_py_command_line(tiny_run, tmp_path):
    run, _ = tiny_run
    cmd = [sys.executable, "visualise.py", f"run={run}", "features=[1]", "n_starts=1", "steps=5",
           f"out_dir={tmp_path}", "device=cpu"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "visualisations" / "feature_1.png").is_file()
    summary = json.loads((tmp_path / "visualisations" / "summary.json").read_text())
    assert list(summary["features"]) == ["1"] and summary["top_images_from"] is None  # no table in out_dir


def test_reported_activation_is_the_architectures_own_encoding():
    """TopK zeroes a feature outside the top k and Gated closes its gate: the reported activation must too,
    and the optimised objective must rise with the feature's (gated) magnitude pre-activation."""
    from sae_lightning.sae import GatedSAE, TopKSAE
    from sae_lightning.visualisation.objective import feature_pre_activations, image_activation

    torch.manual_seed(0)
    x = torch.randn(4, 3, 8)  # 4 images, 3 tokens
    features = torch.tensor([0, 5, 9, 15])
    for sae in (TopKSAE(8, 16, k=2), GatedSAE(8, 16)):
        with torch.no_grad():
            expected = sae.encode(x)[torch.arange(4), :, features].amax(1)
        torch.testing.assert_close(image_activation(sae, x, features), expected)
        pre = feature_pre_activations(sae, x, features)
        direct = sae.encode_pre(x)[torch.arange(4), :, features]
        torch.testing.assert_close(pre, direct)
