"""Issue 7 item 9: `make_shards --holdout N` writes N held-out train images, disjoint from the train shards."""

import io
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from sae_lightning.data.make_shards import imagefolder_to_shards
from sae_lightning.data.make_shards import main as make_shards_main


def _images(tar_paths) -> dict[bytes, int]:
    """image bytes -> label of every sample in the shards, read with tarfile."""
    found: dict[bytes, int] = {}
    for path in tar_paths:
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for sample in samples.values():
            (ext,) = set(sample) - {"cls"}
            found[sample[ext]] = int(sample["cls"])
    return found


@pytest.fixture()
def folder(tmp_path) -> tuple[Path, dict[bytes, int]]:
    rng = np.random.default_rng(0)
    source = {}
    for label, name in enumerate(["ant", "bee", "cat"]):
        (tmp_path / "folder" / name).mkdir(parents=True)
        for i in range(5):
            buffer = io.BytesIO()
            PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
            (tmp_path / "folder" / name / f"{i}.png").write_bytes(buffer.getvalue())
            source[buffer.getvalue()] = label
    return tmp_path / "folder", source


def test_holdout_is_disjoint_from_train_and_together_they_are_everything(folder, tmp_path):
    root, source = folder
    out = tmp_path / "shards"
    make_shards_main(["--root", str(root), "--out", str(out), "--holdout", "4", "--shard-size", "3"])
    held = _images(sorted(out.glob("holdout-*.tar")))
    train = _images(sorted(out.glob("train-*.tar")))
    assert len(held) == 4 and len(train) == 11
    assert not set(held) & set(train)
    assert held | train == source  # original bytes and labels, nothing lost
    assert (out / "classnames.txt").read_text().splitlines() == ["ant", "bee", "cat"]


def test_holdout_with_max_images_and_bad_values(folder, tmp_path):
    root, source = folder
    train = imagefolder_to_shards(root, tmp_path / "a", holdout=5, max_images=6)
    assert len(_images(train)) == 6 and len(_images(sorted((tmp_path / "a").glob("holdout-*.tar")))) == 5
    # the same seed holds out the same images whatever max_images is
    imagefolder_to_shards(root, tmp_path / "b", holdout=5)
    assert _images(sorted((tmp_path / "b").glob("holdout-*.tar"))) == \
        _images(sorted((tmp_path / "a").glob("holdout-*.tar")))
    with pytest.raises(ValueError, match="leaves no training image"):
        imagefolder_to_shards(root, tmp_path / "c", holdout=15)
    with pytest.raises(ValueError, match="must differ"):
        imagefolder_to_shards(root, tmp_path / "d", holdout=2, holdout_prefix="train")
    with pytest.raises(ValueError, match=">= 0"):
        imagefolder_to_shards(root, tmp_path / "e", holdout=-1)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
