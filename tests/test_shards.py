"""Shard pipeline, demo shards and the ImageFolder converter, on tiny generated data."""

from __future__ import annotations

import io
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import webdataset as wds
from torchvision import transforms

from sae_lightning.data import synthetic
from sae_lightning.data.make_shards import imagefolder_to_shards
from sae_lightning.data.make_shards import main as make_shards_main
from sae_lightning.data.shards import RateLimitedWarning, expand_shards, image_batches, image_loader, load_classnames
from sae_lightning.data.synthetic import DEMO_CLASSNAMES, ensure_demo_shards, write_demo_shards

TRANSFORM = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor()])


def read_tar(path: str | Path) -> dict[str, dict[str, bytes]]:
    """Samples of a tar as {key: {ext: bytes}}, read with tarfile (independently of the code under test)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def collect(batches) -> tuple[list[dict], list[str], list[int], int]:
    batches = list(batches)
    keys = [k for b in batches for k in b["keys"]]
    labels = [int(x) for b in batches for x in b["labels"]]
    return batches, keys, labels, sum(int(b["n_skipped"]) for b in batches)


def image_bytes(rng: np.random.Generator, fmt: str = "JPEG", size: int = 24) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[list[str], dict[str, int]]:
    out = tmp_path_factory.mktemp("demo")
    shards = write_demo_shards(out, 40, shard_size=16, image_size=48, seed=3)
    written = {f"{Path(s).name}/{k}": int(sample["cls"]) for s in shards for k, sample in read_tar(s).items()}
    return shards, written


def test_demo_shards_round_trip(demo):
    shards, written = demo
    assert [Path(s).name for s in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert len(written) == 40
    batches, keys, labels, skipped = collect(image_batches(shards, TRANSFORM, 8, shuffle=50, partial=True))
    assert skipped == 0
    assert sorted(keys) == sorted(written)
    assert keys != sorted(keys), "shuffle on, yet the stream came out in written order"
    assert labels == [written[k] for k in keys]
    assert all(0 <= label < len(DEMO_CLASSNAMES) for label in labels)
    for b in batches:
        assert b["images"].dtype == torch.float32 and b["images"].shape[1:] == (3, 32, 32)
        assert b["labels"].dtype == torch.long and len(b["keys"]) == b["images"].shape[0] <= 8
    assert [b["images"].shape[0] for b in batches] == [8] * 5
    assert load_classnames(None, shards) == DEMO_CLASSNAMES


def test_partial_false_drops_the_incomplete_batch(demo):
    shards, _ = demo
    batches, keys, _, _ = collect(image_batches(shards, TRANSFORM, 16, shuffle=0, shardshuffle=False))
    assert [b["images"].shape[0] for b in batches] == [16, 16]
    assert keys[:2] == ["train-000000.tar/train_00000000", "train-000000.tar/train_00000001"]


def test_demo_is_deterministic_and_splits_differ(tmp_path):
    a = write_demo_shards(tmp_path / "a", 6, seed=1)
    b = write_demo_shards(tmp_path / "b", 6, seed=1)
    val = write_demo_shards(tmp_path / "a", 6, split="val", seed=1)
    assert read_tar(a[0]) == read_tar(b[0])  # same samples (tar headers carry the write time)
    train_images = [s["jpg"] for s in read_tar(a[0]).values()]
    assert not set(train_images) & {s["jpg"] for s in read_tar(val[0]).values()}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["classnames.txt", "train-000000.tar",
                                                                   "val-000000.tar"]


def write_shard_with_bad_samples(path: Path, tag: str, rng: np.random.Generator) -> tuple[set[str], int]:
    """Good jpg/png/webp samples plus a truncated jpeg, garbage bytes and a sample without an image last."""
    good = set()
    with wds.TarWriter(str(path)) as sink:
        for i, fmt in enumerate(["JPEG", "PNG", "WEBP", "JPEG", "JPEG"]):
            key = f"{tag}_good{i}"
            ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
            sink.write({"__key__": key, ext: image_bytes(rng, fmt), "cls": i})
            good.add(f"{path.name}/{key}")
        full = image_bytes(rng, size=64)
        sink.write({"__key__": f"{tag}_truncated", "jpg": full[: len(full) // 2], "cls": 0})
        sink.write({"__key__": f"{tag}_garbage", "jpg": rng.bytes(500), "cls": 0})
        sink.write({"__key__": f"{tag}_noimage", "cls": 0})
    return good, 3


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory) -> tuple[list[str], set[str], int]:
    out = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    shards, good, n_bad = [], set(), 0
    for tag in ("a", "b"):
        g, b = write_shard_with_bad_samples(out / f"bad-{tag}.tar", tag, rng)
        shards.append(str(out / f"bad-{tag}.tar"))
        good |= g
        n_bad += b
    return shards, good, n_bad


@pytest.mark.parametrize("shuffle", [0, 100])
def test_corrupt_samples_are_skipped_and_counted(bad_shards, shuffle, caplog):
    shards, good, n_bad = bad_shards
    with caplog.at_level(logging.WARNING, logger="sae_lightning.data.shards"):
        _, keys, labels, skipped = collect(image_batches(shards, TRANSFORM, 4, shuffle=shuffle, partial=True))
    assert skipped == n_bad
    assert sorted(keys) == sorted(good)
    assert labels == [int(k[-1]) for k in keys]
    assert "'a_truncated'" in caplog.text and "bad-a.tar" in caplog.text


def test_trailing_skips_are_counted_with_partial_false(bad_shards):
    shards, good, n_bad = bad_shards
    # 10 good samples, batch 5: the last batch completes before the 3 trailing bad samples of shard b.
    _, keys, _, skipped = collect(image_batches(shards, TRANSFORM, 5, shuffle=0, shardshuffle=False))
    assert skipped == n_bad and sorted(keys) == sorted(good)


def test_unreadable_tar_does_not_stop_the_stream(bad_shards, tmp_path):
    shards, good, n_bad = bad_shards
    (tmp_path / "garbage.tar").write_bytes(np.random.default_rng(3).bytes(3000))
    urls = [str(tmp_path / "garbage.tar"), *shards]
    _, keys, _, skipped = collect(image_batches(urls, TRANSFORM, 4, partial=True, shardshuffle=False))
    assert skipped == n_bad and sorted(keys) == sorted(good)


def test_loader_with_workers_counts_exactly(bad_shards, caplog):
    shards, good, n_bad = bad_shards
    loader = image_loader(shards, TRANSFORM, 3, num_workers=2, partial=True, shuffle=10)
    _, keys, _, skipped = collect(loader)
    assert skipped == n_bad and sorted(keys) == sorted(good)
    with caplog.at_level(logging.WARNING, logger="sae_lightning.data.shards"):
        loader = image_loader(shards[:1], TRANSFORM, 3, num_workers=2, partial=True)
    assert "some workers get no shard" in caplog.text
    _, keys, _, skipped = collect(loader)  # the worker without a shard yields nothing instead of raising
    assert skipped == n_bad // 2 and len(keys) == len(good) // 2


def test_resampled_stream_is_endless_and_seeded(demo):
    shards, written = demo

    def first_keys(seed: int) -> list[str]:
        stream = iter(image_batches(shards, TRANSFORM, 8, resampled=True, shuffle=20, seed=seed))
        return [k for _ in range(8) for k in next(stream)["keys"]]  # 64 samples > 40 written

    keys = first_keys(0)
    assert len(keys) == 64 and set(keys) <= set(written)
    assert keys == first_keys(0) and keys != first_keys(1)


def test_unlabelled_samples_get_minus_one(tmp_path):
    rng = np.random.default_rng(1)
    with wds.TarWriter(str(tmp_path / "nolabel.tar")) as sink:
        sink.write({"__key__": "x", "png": image_bytes(rng, "PNG")})
    (batch,) = image_batches([str(tmp_path / "nolabel.tar")], TRANSFORM, 4, partial=True)
    assert batch["labels"].tolist() == [-1] and batch["keys"] == ["nolabel.tar/x"]


def test_expand_shards(tmp_path):
    for i in range(3):
        (tmp_path / f"s-{i:06d}.tar").touch()
    expected = [str(tmp_path / f"s-{i:06d}.tar") for i in range(3)]
    assert expand_shards(str(tmp_path / "s-{000000..000002}.tar")) == expected
    assert expand_shards([str(tmp_path / "s-000000.tar"), str(tmp_path / "s-00000[12].tar")]) == expected
    assert expand_shards(str(tmp_path / "s-*.tar")) == expected
    assert expand_shards(f"{expected[0]}::{expected[2]}") == [expected[0], expected[2]]
    urls = ["https://host/x-{000..001}.tar", "pipe:curl -s s3://b/y.tar", "gs://b/z.tar"]
    assert expand_shards(urls) == ["https://host/x-000.tar", "https://host/x-001.tar", urls[1], urls[2]]

    missing = str(tmp_path / "s-{000001..000004}.tar")
    with pytest.raises(FileNotFoundError, match=r"2 of 4") as info:
        expand_shards(missing)
    assert missing in str(info.value) and "data.train_shards" in str(info.value)
    with pytest.raises(FileNotFoundError, match="nothing-"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError):
        expand_shards([])


def test_a_directory_is_not_a_shard(tmp_path):
    (tmp_path / "s-000000.tar").touch()
    for pattern in (str(tmp_path), str(tmp_path) + "/", [str(tmp_path / "s-000000.tar"), str(tmp_path)]):
        with pytest.raises(ValueError, match=r"is a directory, not a shard.*" + str(tmp_path) + r"/\*\.tar"):
            expand_shards(pattern)
    assert expand_shards(str(tmp_path / "*.tar")) == [str(tmp_path / "s-000000.tar")]  # what it suggests works


def test_rate_limited_warning_summarises_repeats(caplog):
    now = [0.0]
    limiter = RateLimitedWarning(logging.getLogger("t"), "bad-thing", first=3, interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t"):
        for i in range(1000):
            limiter.warn("bad sample %d", i)
            now[0] += 0.001  # 1,000 warnings in one second
        assert [r.getMessage() for r in caplog.records] == [
            "bad sample 0", "bad sample 1", "bad sample 2", "further bad-thing warnings are summarised every 10 s"]
        now[0] += 10.0
        limiter.warn("bad sample %d", 1000)
    assert len(caplog.records) == 5
    assert caplog.records[-1].getMessage().startswith("998 more bad-thing warning(s) in the last 11 s (1001 in total)")
    assert caplog.records[-1].getMessage().endswith("latest: bad sample 1000")


def test_load_classnames(tmp_path):
    imagenet = load_classnames("imagenet")
    assert len(imagenet) == 1000 and imagenet[0] == "tench"
    (tmp_path / "names.txt").write_text("cat\ndog\n\n")
    assert load_classnames(str(tmp_path / "names.txt")) == ["cat", "dog"]
    with pytest.raises(FileNotFoundError):
        load_classnames(str(tmp_path / "absent.txt"))
    shard = tmp_path / "s-000000.tar"
    shard.touch()
    assert load_classnames(None, ["https://host/a.tar"]) is None
    assert load_classnames(None, [str(shard)]) is None
    (tmp_path / "classnames.txt").write_text("a\nb\nc\n")
    assert load_classnames(None, ["https://host/a.tar", str(shard)]) == ["a", "b", "c"]
    assert load_classnames(None, None) is None


def test_imagefolder_to_shards(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "folder"
    source: dict[bytes, int] = {}
    for label, name in enumerate(["ant", "bee", "cat"]):  # created out of order: labels follow sorted names
        (root / name).mkdir(parents=True)
        for i in range(4):
            fmt, ext = [("JPEG", "JPEG"), ("PNG", "png")][i % 2]
            data = image_bytes(rng, fmt)
            (root / name / f"img{i}.{ext}").write_bytes(data)
            source[data] = label
    (root / "bee" / "broken.jpg").write_bytes(b"not an image at all")
    (root / "cat" / "notes.txt").write_text("ignored")
    out = tmp_path / "shards"
    make_shards_main(["--root", str(root), "--out", str(out), "--prefix", "val", "--shard-size", "5"])

    shards = sorted(out.glob("val-*.tar"))
    assert [p.name for p in shards] == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    written = [sample for shard in shards for sample in read_tar(shard).values()]
    assert len(written) == 12
    seen = {}
    for sample in written:
        (ext,) = set(sample) - {"cls"}
        assert ext in ("jpg", "png")
        seen[sample[ext]] = int(sample["cls"])
    assert seen == source  # original bytes, right labels
    assert [s["cls"] for s in written] != sorted(s["cls"] for s in written), "file order not shuffled"
    assert (out / "classnames.txt").read_text().splitlines() == ["ant", "bee", "cat"]
    _, _, labels, skipped = collect(image_batches([str(p) for p in shards], TRANSFORM, 4, partial=True))
    assert sorted(labels) == sorted(source.values()) and skipped == 0

    with pytest.raises(FileExistsError):
        imagefolder_to_shards(root, out, prefix="val")
    with pytest.raises(ValueError, match="1000"):
        imagefolder_to_shards(root, tmp_path / "other", imagenet_names=True)
    subset = imagefolder_to_shards(root, tmp_path / "subset", max_images=3, shuffle=False)
    assert [int(s["cls"]) for s in read_tar(subset[0]).values()] == [0, 0, 0]


def test_ensure_demo_shards_generates_once(tmp_path, monkeypatch):
    train, val = ensure_demo_shards(tmp_path, 20, 8, image_size=32, seed=0)
    assert train == str(tmp_path / "train-{000000..000006}.tar")
    assert val == str(tmp_path / "val-{000000..000007}.tar")
    assert len(expand_shards(train)) == 7 and len(expand_shards(val)) == 8
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}

    calls = []
    real_writer = synthetic.write_demo_shards

    def counting_writer(*args, **kwargs):
        calls.append(args)
        return real_writer(*args, **kwargs)

    monkeypatch.setattr(synthetic, "write_demo_shards", counting_writer)
    assert ensure_demo_shards(tmp_path, 20, 8, image_size=32, seed=0) == (train, val)
    assert calls == [] and {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")} == mtimes

    os.remove(tmp_path / synthetic.MARKER_FILE)  # an interrupted run: no marker, so regenerate
    ensure_demo_shards(tmp_path, 20, 8, image_size=32, seed=0)
    assert len(calls) == 2
    train, _ = ensure_demo_shards(tmp_path, 4, 8, image_size=32, seed=0)  # new parameters: regenerate
    assert len(calls) == 4 and sorted(p.name for p in tmp_path.glob("train-*.tar")) == [
        f"train-00000{i}.tar" for i in range(4)
    ]
    assert not list(tmp_path.glob(".train-*")), "temporary directory left behind"
