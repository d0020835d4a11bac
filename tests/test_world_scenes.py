"""The scene generator: records match pixels, captions match records, shards are deterministic and disjoint."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision import transforms

from sae_lightning.data.shards import image_batches, load_classnames
from sae_lightning.data.synthetic import read_attribute_records, write_demo_shards
from sae_lightning.world import scenes
from sae_lightning.world.scenes import COLOURS, PLURALS, SHAPES, make_scene, render, sample_scene
from sae_lightning.world.zeroshot import prompt_sets, true_value, zero_shot_accuracies

SIZE = 64


def read_tar(path: str | Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def saturation(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.int32)
    return image.max(-1) - image.min(-1)


def nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda name: float(np.sum((np.array(COLOURS[name]) - rgb) ** 2)))


def disc(cx: float, cy: float, r0: float, r1: float, size: int = SIZE) -> np.ndarray:
    """Pixels whose centre lies at distance r0..r1 from (cx, cy) (all in pixels)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    d = np.hypot(xx - cx, yy - cy)
    return (d >= r0) & (d <= r1)


def check_pixels(image: np.ndarray, record: dict, colour_tolerance: float) -> None:
    """Each recorded object shows its colour where its shape surely is, and nothing else is saturated."""
    assert record["count"] == len(record["objects"]) and 1 <= record["count"] <= 3
    sat = saturation(image) > 90
    covered = np.zeros((SIZE, SIZE), bool)
    for obj in record["objects"]:
        r, cx, cy = obj["radius"] * SIZE, obj["x"] * SIZE, obj["y"] * SIZE
        # filled shapes all contain the disc of radius 0.2 r around the centre; a ring covers 0.72 r .. 0.95 r
        inside = disc(cx, cy, 0.75 * r, 0.93 * r) if obj["shape"] == "ring" else disc(cx, cy, 0, 0.2 * r)
        mean = np.median(image[inside].reshape(-1, 3), axis=0)
        assert nearest_colour(mean) == obj["colour"], (obj, mean)
        assert np.abs(mean - np.array(obj["rgb"])).max() < colour_tolerance, (obj, mean)
        if obj["shape"] == "ring":  # hollow: the centre shows the background
            assert not sat[disc(cx, cy, 0, 0.3 * r)].any(), obj
        if obj["shape"] == "circle":  # round: full out to near the edge in every direction
            assert sat[disc(cx, cy, 0, 0.85 * r)].all(), obj
        bounds = disc(cx, cy, 0, r + 1.5)
        covered |= bounds
        yy, xx = np.nonzero(sat & bounds)  # the shape reaches out to its recorded radius (its size)
        extent = np.hypot(xx + 0.5 - cx, yy + 0.5 - cy).max()
        assert 0.7 * r <= extent <= r + 1.5, (obj, extent, r)
    assert not (sat & ~covered).any(), "saturated pixels outside every recorded object: an unrecorded object"


def plain_record(seed: int) -> dict:
    record = sample_scene(np.random.default_rng(seed))
    record["effect"], record["background"] = "none", "plain"
    return record


def test_records_match_pixels():
    for seed in range(60):
        record = plain_record(seed)
        check_pixels(np.asarray(render(record, SIZE)), record, colour_tolerance=12)


def test_objects_sorted_main_first_and_label_is_main_object():
    rng = np.random.default_rng(0)
    for _ in range(200):
        record = sample_scene(rng)
        main = record["objects"][0]
        assert record["label"] == list(COLOURS).index(main["colour"]) * len(SHAPES) + SHAPES.index(main["shape"])
        assert scenes.CLASSNAMES[record["label"]] == record["classname"] == f"{main['colour']} {main['shape']}"
        for obj in record["objects"]:
            low, high = scenes._RADIUS[obj["size"]]
            assert low <= obj["radius"] <= high
        assert [o["size"] for o in record["objects"]] == sorted((o["size"] for o in record["objects"]),
                                                                 key=lambda s: s != "large")


def test_effects_do_what_they_say():
    record = plain_record(3)
    clean = np.asarray(render(record, SIZE)).astype(np.int32)
    shifted = np.asarray(render({**record, "effect": "chromatic_aberration"}, SIZE)).astype(np.int32)
    assert (shifted[..., 1] == clean[..., 1]).all()  # green stays, red and blue move opposite ways
    matches = [(s, axis) for s in (2, 3) for axis in (0, 1)
               if (np.roll(clean[..., 0], s, axis) == shifted[..., 0]).all()
               and (np.roll(clean[..., 2], -s, axis) == shifted[..., 2]).all()]
    assert len(matches) == 1
    pixelated = np.asarray(render({**record, "effect": "pixelated"}, SIZE))
    assert len(np.unique(pixelated.reshape(SIZE, -1), axis=0)) <= SIZE // 3 + 1  # 3 px blocks
    blurred = np.asarray(render({**record, "effect": "blurred"}, SIZE)).astype(np.int32)
    assert np.abs(np.diff(blurred, axis=1)).mean() < 0.7 * np.abs(np.diff(clean, axis=1)).mean()
    old = np.asarray(render({**record, "effect": "old_photo"}, SIZE)).astype(np.int32)
    assert (old[..., 0] - old[..., 2]).mean() > (clean[..., 0] - clean[..., 2]).mean() + 20  # warm sepia tone
    assert old[28:36, 28:36].mean() > old[:4, :4].mean()  # vignette darkens the corners (plain background)


def caption_words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text))


def test_captions_name_exactly_the_records_attributes():
    rng = np.random.default_rng(1)
    singular = {v: k for k, v in PLURALS.items()}
    for _ in range(300):
        _, record = make_scene(rng, 16)
        words = caption_words(record["caption"])
        assert words & set(COLOURS) == {o["colour"] for o in record["objects"]}, record
        assert {singular.get(w, w) for w in words} & set(SHAPES) == {o["shape"] for o in record["objects"]}, record
        counts = words & {"two", "three"}
        groups = {(o["colour"], o["shape"]) for o in record["objects"]}
        if record["count"] == 1:
            assert not counts
        elif len(groups) == 1:
            assert counts == {"two" if record["count"] == 2 else "three"}
        bg_words = {"plain": "plain", "gradient": "gradient", "noise": "noisy", "stripes": "stripe"}
        assert bg_words[record["background"]] in record["caption"]
        effect_words = {"none": None, "pixelated": "pixelated", "blurred": "blur", "old_photo": ("old", "vintage"),
                        "chromatic_aberration": ("chromatic", "fringes")}[record["effect"]]
        for effect, key in {"pixelated": "pixelated", "blurred": "blur", "old_photo": "sepia"}.items():
            if effect != record["effect"]:
                assert key not in record["caption"], record
        if isinstance(effect_words, str):
            assert effect_words in record["caption"]
        elif effect_words:
            assert any(w in record["caption"] for w in effect_words)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[list[str], list[str], Path]:
    out = tmp_path_factory.mktemp("scenes")
    train = write_demo_shards(out, 24, shard_size=10, image_size=SIZE, seed=5, fmt="png")
    val = write_demo_shards(out, 24, split="val", shard_size=10, image_size=SIZE, seed=5, fmt="png")
    return train, val, out


def test_shard_records_match_their_images(shards):
    train, _, _ = shards
    checked = 0
    for shard in train:
        for sample in read_tar(shard).values():
            record = json.loads(sample["json"])
            assert int(sample["cls"]) == record["label"] and sample["txt"].decode() == record["caption"]
            assert record["version"] == scenes.SCENE_VERSION and record["image_size"] == SIZE
            image = np.asarray(PIL.Image.open(io.BytesIO(sample["png"])).convert("RGB"))
            assert (image == np.asarray(render(record, SIZE))).all(), "the record does not redraw its image"
            if record["effect"] == "none":  # every background kind stays unsaturated; JPEG-free (png) pixels
                check_pixels(image, record, colour_tolerance=25)
                checked += 1
    assert checked >= 2


def test_same_seed_same_bytes_and_splits_disjoint(shards, tmp_path):
    train, val, _ = shards
    again = write_demo_shards(tmp_path, 24, shard_size=10, image_size=SIZE, seed=5, fmt="png")
    for a, b in zip(train, again, strict=True):
        assert read_tar(a) == read_tar(b)
    other_seed = write_demo_shards(tmp_path / "other", 24, shard_size=10, image_size=SIZE, seed=6, fmt="png")
    assert read_tar(other_seed[0]) != read_tar(train[0])
    train_samples = [s for shard in train for s in read_tar(shard).values()]
    val_samples = [s for shard in val for s in read_tar(shard).values()]
    assert not {s["png"] for s in train_samples} & {s["png"] for s in val_samples}
    assert not {json.loads(s["json"])["seed"] for s in train_samples} & {json.loads(s["json"])["seed"]
                                                                         for s in val_samples}


def test_attribute_records_keyed_like_the_shard_reader(shards):
    _, val, out = shards
    records = read_attribute_records(str(out / "val-{000000..000002}.tar"))
    to_tensor = transforms.ToTensor()
    batches = list(image_batches(val, to_tensor, 5, shuffle=0, partial=True))
    keys = [k for b in batches for k in b["keys"]]
    labels = [int(x) for b in batches for x in b["labels"]]
    assert sorted(keys) == sorted(records) and len(keys) == 24
    assert labels == [records[k]["label"] for k in keys]
    first = batches[0]["images"][0]
    expected = torch.from_numpy(np.array(render(records[keys[0]], SIZE))).permute(2, 0, 1).float() / 255
    assert torch.allclose(first, expected)
    assert load_classnames(None, val) == scenes.CLASSNAMES


def test_attribute_records_reject_shards_without_records(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "plain-000000.tar")) as sink:
        sink.write({"__key__": "a", "png": b"not read", "cls": 0})
    with pytest.raises(ValueError, match="no attribute record"):
        read_attribute_records(str(tmp_path / "plain-000000.tar"))


class OracleColour:
    """A hand-built 'CLIP' that embeds an image by its true colour and a prompt by the colour it names."""

    device = torch.device("cpu")

    def __init__(self, records: list[dict], rotate: int = 0) -> None:
        self.records, self.rotate, self.names = records, rotate, list(COLOURS)

    def preprocess(self, index: int) -> torch.Tensor:
        return torch.tensor(index)

    def encode_image(self, indices: torch.Tensor) -> torch.Tensor:
        rows = [self.names.index(self.records[int(i)]["objects"][0]["colour"]) for i in indices]
        return torch.nn.functional.one_hot(torch.tensor(rows), len(self.names)).float() + 1e-3

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            named = [i for i, c in enumerate(self.names) if f" {c} " in text]
            rows.append((named[0] + self.rotate) % len(self.names) if named else 0)
        return torch.nn.functional.one_hot(torch.tensor(rows), len(self.names)).float()


def test_zero_shot_accuracy_scores_a_known_classifier():
    rng = np.random.default_rng(2)
    records = [sample_scene(rng) for _ in range(100)]
    images = list(range(len(records)))  # the oracle's preprocess reads an index
    result = zero_shot_accuracies(OracleColour(records), images, records)
    single = [r for r in records if true_value(r, "colour") is not None]
    assert result["colour"] == {"accuracy": 1.0, "n": len(single)}
    assert 0 < len(single) < len(records)  # mixed-colour scenes are not scored on colour
    assert result["count"]["n"] == len(records)
    assert zero_shot_accuracies(OracleColour(records, rotate=1), images, records)["colour"]["accuracy"] == 0.0
    assert set(prompt_sets()["colour"]) == set(COLOURS) and len(prompt_sets()["effect"]) == 5
