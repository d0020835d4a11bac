"""The activation cache: cache.py writes exactly the backbone's activations, resumes to identical bytes, refuses
bad input; data=cache shuffles across shards in bounded memory and resumes to the same SAE."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import PIL.Image
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file

from sae_lightning import SparseAutoencoder
from sae_lightning.data.cache import CacheDataModule, CacheStream
from sae_lightning.data.cache_format import MANIFEST, CacheError, backbone_source, read_manifest, shard_metadata
from sae_lightning.data.cache_write import CacheWriter
from tests.conftest import CONF, ROOT, compose_config


def compose_cache(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="cache", overrides=overrides)


def cache_config(cache_dir: Path, data_dir: Path, shards: tuple[str, str], extra: list[str] = ()):
    """`python cache.py experiment=demo` on the session's tiny shards (8 x 64 images) with the instant tiny ViT."""
    return compose_cache([
        "experiment=demo", "backbone=tiny", f"paths.root_dir={ROOT}", f"paths.data_dir={data_dir}",
        f"data.train_shards='{shards[0]}'", "data.num_workers=0", f"cache.dir={cache_dir}",
        "cache.rows_per_shard=32", "cache.batch_size=16", "cache.device=cpu", "cache.dtype=fp32", *extra])


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.safetensors"))}


def shard_entries(directory: Path) -> list[dict]:
    return json.loads((directory / MANIFEST).read_text())["shards"]


@pytest.fixture(scope="module")
def written_cache(tmp_path_factory, data_dir, tiny_shards) -> Path:
    """The tiny shards' class tokens, fp32, 32 rows per file: 16 files, 512 rows."""
    directory = tmp_path_factory.mktemp("cache") / "cls"
    assert CacheWriter(cache_config(directory, data_dir, tiny_shards)).run() == 0
    return directory


def source_images(url: str) -> dict[str, tuple[PIL.Image.Image, int]]:
    """{key: (image, label)} read straight from a tar shard, without the project's pipeline."""
    out: dict[str, dict] = {}
    with tarfile.open(url) as tar:
        for member in tar:
            key, ext = member.name.rsplit(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {k: (PIL.Image.open(io.BytesIO(v["png"] if "png" in v else v["jpg"])).convert("RGB"), int(v["cls"]))
            for k, v in out.items()}


@pytest.mark.parametrize(("tokens", "dtype"), [("cls", "fp32"), ("all", "bf16")])
def test_rows_are_the_backbones_activations_with_their_keys_and_labels(tmp_path, data_dir, tiny_shards, tokens,
                                                                       dtype):
    per_image = 1 if tokens == "cls" else 17  # all: 16 patches + the class token
    rows = 37 * per_image  # 37 whole images -> 32 per file (a multiple of the forward's 16)
    cfg = cache_config(tmp_path / "c", data_dir, tiny_shards, [f"tokens={tokens}", f"cache.dtype={dtype}",
                                                                f"cache.rows_per_shard={rows}"])
    assert CacheWriter(cfg).run() == 0
    manifest = read_manifest(tmp_path / "c")
    backbone = instantiate(cfg.backbone)
    assert backbone.n_tokens_for(tokens) == per_image
    # 64-image sources make 2 files each
    assert manifest["images_per_shard"] == 32 and manifest["rows_per_shard"] == 32 * per_image
    assert (manifest["d_in"], manifest["tokens_per_image"], manifest["dtype"]) == (64, per_image, dtype)
    assert manifest["images"] == 512 and manifest["total_rows"] == 512 * per_image and manifest["complete"]
    assert len(manifest["shards"]) == 16 and sum(s["rows"] for s in manifest["shards"]) == manifest["total_rows"]
    assert all(s["done"] and s["images"] == 64 for s in manifest["sources"])
    assert manifest["layer"] == backbone.resolve_layer(cfg.layer) and manifest["model"] == backbone.name
    source = backbone_source(tmp_path / "c")  # the backbone back from the cache alone
    assert (source["layer"], source["tokens"]) == (cfg.layer, tokens)
    assert instantiate(source["backbone"]).state_dict().keys() == backbone.state_dict().keys()

    seen = set()
    for entry in manifest["shards"]:
        url = manifest["sources"][entry["source"]]["url"]
        originals = source_images(url)
        tensors = load_file(str(tmp_path / "c" / entry["file"]))
        keys = shard_metadata(tmp_path / "c" / entry["file"])["keys"]
        assert tensors["activations"].dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        assert tensors["activations"].shape == (len(keys) * per_image, 64)
        images = torch.stack([backbone.pixel_transform(originals[k][0]) for k in keys])
        expected = backbone.activations(images, cfg.layer, tokens).reshape(-1, 64)
        tolerance = {"fp32": 1e-5, "bf16": 1e-2}[dtype]
        torch.testing.assert_close(tensors["activations"].float(), expected.to(tensors["activations"].dtype).float(),
                                   atol=tolerance, rtol=tolerance)
        labels = torch.tensor([originals[k][1] for k in keys]).repeat_interleave(per_image)
        assert torch.equal(tensors["labels"], labels)
        assert [keys[i] for i in tensors["image"].tolist()[::per_image]] == keys
        assert torch.equal(tensors["token"], torch.arange(per_image, dtype=torch.int16).repeat(len(keys)))
        seen.update((url, k) for k in keys)
    assert len(seen) == 512  # every image once


def test_an_interrupted_cache_run_resumes_to_the_same_bytes(tmp_path, data_dir, tiny_shards, written_cache, caplog):
    """SIGTERM after the 5th file: the complete files stay, the rerun (with 2 workers) finishes identically."""
    directory = tmp_path / "c"
    written = []

    def stop_after_five(entry):
        written.append(entry["file"])
        if len(written) == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    assert CacheWriter(cache_config(directory, data_dir, tiny_shards), on_shard=stop_after_five).run() == 143
    assert "Stopped by SIGTERM" in caplog.text and "Rerun the same command" in caplog.text
    manifest = read_manifest(directory)
    assert not manifest["complete"] and 5 <= len(manifest["shards"]) < 16
    kept = files(directory)
    assert set(kept) == {s["file"] for s in manifest["shards"]}
    with pytest.raises(CacheError, match="incomplete"):
        CacheDataModule(directory)

    assert CacheWriter(cache_config(directory, data_dir, tiny_shards, ["data.num_workers=2"])).run() == 0
    assert files(directory) == files(written_cache)
    assert all(files(directory)[name] == data for name, data in kept.items())  # kept, not rewritten differently
    by_file = sorted(shard_entries(directory), key=lambda e: e["file"])
    assert by_file == sorted(shard_entries(written_cache), key=lambda e: e["file"])  # sizes, sha256, keys

    caplog.clear()
    caplog.set_level(logging.INFO)
    assert CacheWriter(cache_config(directory, data_dir, tiny_shards)).run() == 0  # complete: nothing to do
    assert "already holds the complete cache" in caplog.text


def test_a_full_disk_keeps_the_manifest_and_complete_files_and_the_rerun_resumes(tmp_path, data_dir, tiny_shards,
                                                                                 written_cache, monkeypatch):
    """ENOSPC while the 6th file is written (half of it reached the disk), then, on a rerun, while the manifest
    listing the 9th file is written: each time the error says what to do, the manifest and every file it lists
    stay valid, nothing partial or unlisted is left, and the rerun after freeing space writes identical bytes."""
    from sae_lightning.data.cache_format import check_shard
    from sae_lightning.data.cache_write import CacheWriteError

    directory = tmp_path / "c"
    write_bytes, write_text = Path.write_bytes, Path.write_text
    shard_writes = []

    def full_disk_at_sixth_file(self, data):
        if self.parent == directory and self.name.endswith(".safetensors.tmp"):
            shard_writes.append(self.name)
            if len(shard_writes) == 6:
                write_bytes(self, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(self, data)

    def full_disk_at_ninth_listing(self, text, *args, **kwargs):
        if self.parent == directory and self.name == MANIFEST + ".tmp" and len(json.loads(text)["shards"]) == 9:
            write_text(self, text[:100], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, text, *args, **kwargs)

    def check_intact(n_files: int) -> None:
        manifest = read_manifest(directory)  # valid JSON, the format's fields
        assert not manifest["complete"] and len(manifest["shards"]) == n_files
        assert all(check_shard(directory, entry, full=True) is None for entry in manifest["shards"])
        assert sorted(p.name for p in directory.iterdir()) == sorted([MANIFEST, *(e["file"] for e in
                                                                                  manifest["shards"])])
        with pytest.raises(CacheError, match="incomplete"):
            CacheDataModule(directory)

    advice = r"Is the disk full\? .* intact and nothing half-written was kept; free space and rerun the same " \
             r"command: the cache resumes where it stopped"
    monkeypatch.setattr(Path, "write_bytes", full_disk_at_sixth_file)
    with pytest.raises(CacheWriteError, match=rf"Could not write cache file .*-0001.safetensors .*{advice}") as err:
        CacheWriter(cache_config(directory, data_dir, tiny_shards)).run()
    assert err.value.errno == errno.ENOSPC and "the 5 complete file(s) it lists" in str(err.value)
    check_intact(5)
    kept = files(directory)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(Path, "write_text", full_disk_at_ninth_listing)
    with pytest.raises(CacheWriteError, match=rf"Could not write the manifest .*manifest.json.*{advice}") as err:
        CacheWriter(cache_config(directory, data_dir, tiny_shards)).run()
    assert "the 8 complete file(s) it lists" in str(err.value)
    check_intact(8)  # the 9th file was complete but unlisted: removed, not left for a later run to trust
    assert all(files(directory)[name] == data for name, data in kept.items())

    monkeypatch.setattr(Path, "write_text", write_text)  # space freed
    assert CacheWriter(cache_config(directory, data_dir, tiny_shards)).run() == 0
    assert files(directory) == files(written_cache)
    by_file = sorted(shard_entries(directory), key=lambda e: e["file"])
    assert by_file == sorted(shard_entries(written_cache), key=lambda e: e["file"])
    assert read_manifest(directory)["complete"]


def test_a_full_disk_is_reported_even_when_a_stop_signal_arrives_at_once(tmp_path, data_dir, tiny_shards,
                                                                         monkeypatch):
    """SIGTERM lands while the disk fills: the user must still hear "Is the disk full?" (the old code swallowed
    the error as if a worker had died of the signal, and exited as a clean stop)."""
    from sae_lightning.data.cache_write import CacheWriteError

    directory = tmp_path / "c"
    writer = CacheWriter(cache_config(directory, data_dir, tiny_shards))
    write_bytes = Path.write_bytes

    def full_disk_and_sigterm(self, data):
        if self.parent == directory and self.name.endswith(".safetensors.tmp"):
            writer.stop.name = "SIGTERM"
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk_and_sigterm)
    with pytest.raises(CacheWriteError, match=r"Is the disk full\? The manifest and the 0 complete file"):
        writer.run()


def test_undecodable_samples_are_counted_once_across_a_resume(tmp_path, data_dir, tiny_shards):
    """One shard with a broken image in its first file: skipped and counted, and a run stopped after that
    file then resumed writes the same bytes and counts it once."""
    source = Path(sorted(Path(tiny_shards[0].split("{")[0]).parent.glob("train-*.tar"))[0])
    broken = tmp_path / "shards" / "train-000000.tar"
    broken.parent.mkdir()
    with tarfile.open(source) as src, tarfile.open(broken, "w") as dst:
        for member in src:
            data = src.extractfile(member).read()
            if member.name.endswith("00000005.jpg"):
                data = b"not an image"
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    shards = (str(broken), tiny_shards[1])

    def run(directory, **kwargs):
        return CacheWriter(cache_config(directory, data_dir, shards), **kwargs).run()

    assert run(tmp_path / "straight") == 0
    manifest = read_manifest(tmp_path / "straight")
    assert (manifest["images"], manifest["samples_skipped"], manifest["total_rows"]) == (63, 1, 63)
    first = shard_entries(tmp_path / "straight")[0]
    assert first["skipped"] == 1 and shard_metadata(tmp_path / "straight" / first["file"])["skipped_keys"] == [
        "train_00000005"]

    def stop(entry):
        os.kill(os.getpid(), signal.SIGTERM)

    assert run(tmp_path / "resumed", on_shard=stop) == 143
    assert len(shard_entries(tmp_path / "resumed")) == 1
    assert run(tmp_path / "resumed") == 0
    assert files(tmp_path / "resumed") == files(tmp_path / "straight")
    assert read_manifest(tmp_path / "resumed")["samples_skipped"] == 1


def test_another_config_refuses_unless_overwrite(tmp_path, written_cache, data_dir, tiny_shards):
    directory = tmp_path / "c"
    shutil.copytree(written_cache, directory)
    before = files(directory)
    with pytest.raises(CacheError, match=r"(?s)different config:\n  layer: -2 in the cache, 1 now.*overwrite=true"):
        CacheWriter(cache_config(directory, data_dir, tiny_shards, ["layer=1"])).run()
    assert files(directory) == before  # nothing touched
    assert CacheWriter(cache_config(directory, data_dir, tiny_shards, ["layer=1", "overwrite=true"])).run() == 0
    after = files(directory)
    assert read_manifest(directory)["layer"] == 1 and after.keys() == before.keys() and after != before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not empty and holds no manifest.json"):
        CacheWriter(cache_config(tmp_path / "other", data_dir, tiny_shards)).run()


def test_bad_cache_configs_fail_before_any_work(tmp_path, data_dir, tiny_shards):
    with pytest.raises(ValueError, match=r"cache.dtype='fp8'.*must be one of fp32, fp16, bf16") as err:
        CacheWriter(cache_config(tmp_path / "c", data_dir, tiny_shards, ["cache.dtype=fp8",
                                                                          "cache.rows_per_shard=0"]))
    assert "cache.rows_per_shard=0" in str(err.value)
    with pytest.raises(ValueError, match="computes activations with a backbone"):
        CacheWriter(cache_config(tmp_path / "c", data_dir, tiny_shards, ["~backbone"]))
    assert not (tmp_path / "c").exists()


def test_unusable_cache_directories_say_what_to_do(tmp_path, written_cache):
    with pytest.raises(CacheError, match="no such directory.*python cache.py"):
        CacheDataModule(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="has no manifest.json"):
        CacheDataModule(tmp_path / "empty")
    with pytest.raises(CacheError, match="data.path is not set"):
        CacheDataModule(None)
    bad = tmp_path / "bad"
    shutil.copytree(written_cache, bad)
    manifest = json.loads((bad / MANIFEST).read_text())
    manifest["dtype"] = "fp8"
    (bad / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="unknown dtype 'fp8'"):
        CacheDataModule(bad)


def test_train_py_names_every_cache_problem_before_any_work(tmp_path, written_cache):
    from sae_lightning.validation import validate_train_config

    cfg = compose_config(["experiment=demo", "data=cache", f"data.path={tmp_path / 'missing'}",
                          f"paths.root_dir={ROOT}", f"paths.output_dir={tmp_path / 'run'}", "data.window_blocks=0"])
    with pytest.raises(ValueError, match=r"(?s)3 problems.*data.window_blocks=0: must be an integer >= 1.*"
                                         r"add '~backbone'.*no such directory.*python cache.py"):
        validate_train_config(cfg)
    validate_train_config(compose_config(["data=cache", f"data.path={written_cache}", f"paths.root_dir={ROOT}"]))
    assert not (tmp_path / "run").exists()


def test_a_corrupt_shard_is_detected_and_rewritten(tmp_path, written_cache, data_dir, tiny_shards, caplog):
    directory = tmp_path / "c"
    shutil.copytree(written_cache, directory)
    victim = directory / shard_entries(directory)[3]["file"]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the rows: same size
    victim.write_bytes(bytes(data))
    CacheDataModule(directory)  # sizes only by default
    with pytest.raises(CacheError, match=rf"(?s){victim.name}'s sha256 differs.*Rerun the `python cache.py"):
        CacheDataModule(directory, verify=True)
    other = directory / shard_entries(directory)[7]["file"]
    other.write_bytes(other.read_bytes()[:100])  # truncated
    with pytest.raises(CacheError, match=rf"(?s)2 shard file\(s\) do not match.*{other.name} has 100 bytes"):
        CacheDataModule(directory, verify=True)
    with pytest.raises(CacheError, match=rf"{other.name} has 100 bytes"):
        CacheDataModule(directory)

    assert CacheWriter(cache_config(directory, data_dir, tiny_shards)).run() == 0  # verifies, redoes both sources
    assert "sha256 differs" in caplog.text and "is redone" in caplog.text
    assert files(directory) == files(written_cache)


# ---- the shuffle: a cache of known rows (row value = its id), no backbone needed --------------------------


def id_cache(directory: Path, sizes: list[int]) -> tuple[list[str], list[int]]:
    """Shard files whose rows are [file, row] (d = 2), as cache.py lays them out."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for f, n in enumerate(sizes):
        path = directory / f"{f:06d}-0000.safetensors"
        rows = torch.stack([torch.full((n,), float(f)), torch.arange(n, dtype=torch.float32)], 1)
        save_file({"activations": rows}, str(path))
        paths.append(str(path))
    return paths, sizes


def ids(batch: torch.Tensor) -> list[tuple[int, int]]:
    return [tuple(r) for r in batch.long().tolist()]


def take(stream: CacheStream, n: int) -> list[torch.Tensor]:
    out = []
    for batch in stream.batches():
        out.append(batch)
        if len(out) == n:
            return out
    return out


def test_shuffle_crosses_shards_in_bounded_memory_and_covers_each_epoch(tmp_path):
    paths, sizes = id_cache(tmp_path, [40, 64, 24, 64, 50, 64, 33, 64])  # 403 rows, uneven files
    stream = CacheStream(paths, sizes, batch_size=32, block_rows=16, window_blocks=3, seed=7)
    batches = take(stream, 40)  # 1280 rows: more than 3 epochs
    assert stream.max_resident <= 3 * 16 + 32 and stream.max_resident < 403
    files_per_batch = [len({f for f, _ in ids(b)}) for b in batches]
    assert min(files_per_batch) >= 2 and max(files_per_batch) >= 3  # never one shard's rows only
    rows = [r for b in batches for r in ids(b)]
    everything = sorted((f, r) for f, n in enumerate(sizes) for r in range(n))
    assert sorted(rows[:403]) == everything and sorted(rows[403:806]) == everything  # each epoch: every row once
    assert rows[:403] != rows[403:806]  # a new order each epoch
    assert rows[:403] != everything  # shuffled, not file order
    again = take(CacheStream(paths, sizes, batch_size=32, block_rows=16, window_blocks=3, seed=7), 40)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))  # deterministic from the seed
    other = take(CacheStream(paths, sizes, batch_size=32, block_rows=16, window_blocks=3, seed=8), 40)
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))
    first = CacheStream(paths, sizes, batch_size=32, block_rows=16, window_blocks=3, seed=7, init_rows=1000)
    assert torch.equal(first.first_rows(1000), torch.cat(batches)[:403])  # b_dec's rows: at most one epoch
    plain = take(CacheStream(paths, sizes, batch_size=32, block_rows=16, window_blocks=3, shuffle=False), 13)
    assert [r for b in plain for r in ids(b)][:403] == everything


def test_any_position_replays_the_same_batches(tmp_path):
    """A stream started at row p serves exactly what the stream from 0 serves from row p (the resume)."""
    paths, sizes = id_cache(tmp_path, [40, 64, 24, 64, 50])
    full = torch.cat(take(CacheStream(paths, sizes, 32, 16, 3, seed=1), 30))
    for start in (32 * 5, 32 * 7 + 5, 242, 32 * 19):  # mid-window, mid-batch, across an epoch (242 rows each)
        resumed = take(CacheStream(paths, sizes, 32, 16, 3, seed=1, start_row=start), 5)
        assert torch.equal(torch.cat(resumed), full[start: start + 160])


def test_ranks_and_workers_split_the_stream(tmp_path):
    paths, sizes = id_cache(tmp_path, [40, 64, 24, 64, 50])
    epoch = {0: [], 1: []}
    for rank in (0, 1):
        stream = CacheStream(paths, sizes, 8, 16, 2, seed=3, rank=rank, world_size=2)
        n = sum(stream.window_rows(w) for w in stream.windows(0))
        epoch[rank] = [r for b in take(stream, 100) for r in ids(b)][:n]
    assert not set(epoch[0]) & set(epoch[1])  # disjoint blocks per rank
    assert sorted(epoch[0] + epoch[1]) == sorted((f, r) for f, n in enumerate(sizes) for r in range(n))
    in_process = take(CacheStream(paths, sizes, 32, 16, 3, seed=1, workers=2), 12)
    served = []
    for batch in torch.utils.data.DataLoader(CacheStream(paths, sizes, 32, 16, 3, seed=1, workers=2),
                                             batch_size=None, num_workers=2):
        served.append(batch["activations"])
        if len(served) == 12:
            break
    assert all(torch.equal(a, b) for a, b in zip(in_process, served))  # the loader's round-robin = the sequence
    with pytest.raises(Exception, match="made for 1 DataLoader worker"):
        next(iter(torch.utils.data.DataLoader(CacheStream(paths, sizes, 32, 16, 3, seed=1), batch_size=None,
                                              num_workers=2)))


def test_workers_read_their_own_part_of_each_epoch_and_any_batch_position_replays(tmp_path):
    """With 2 workers each worker reads only the windows of its half of the epoch (plus the window across the
    boundary), the sequence still serves each row once per epoch, and a start at any whole batch replays it."""
    paths, sizes = id_cache(tmp_path, [40, 64, 24, 64, 50, 64, 33, 45])  # 384 rows = 2 workers x 6 x 32
    everything = sorted((f, r) for f, n in enumerate(sizes) for r in range(n))
    stream = CacheStream(paths, sizes, 32, 16, 3, seed=5, workers=2)
    full = take(stream, 36)  # 3 epochs
    rows = [r for b in full for r in ids(b)]
    for epoch in range(3):
        assert sorted(rows[384 * epoch: 384 * (epoch + 1)]) == everything
    assert rows[:384] != rows[384:768]
    for worker in (0, 1):  # a worker's first epoch: its 192 rows, read from at most one window more
        alone = CacheStream(paths, sizes, 32, 16, 3, seed=5, workers=2)
        batches = alone.worker_batches(worker)
        served = [r for _ in range(6) for r in ids(next(batches))]
        assert served == [r for k, b in enumerate(full[:12]) if k % 2 == worker for r in ids(b)]
        assert alone.rows_loaded <= 192 + 2 * 48  # its half plus the windows across its two ends (48 rows)
    for start in (32 * 3, 32 * 8, 32 * 13):  # odd and even batches, in the 2nd epoch
        resumed = take(CacheStream(paths, sizes, 32, 16, 3, seed=5, workers=2, start_row=start), 6)
        assert torch.equal(torch.cat(resumed), torch.cat(full)[start: start + 192])
    with pytest.raises(CacheError, match="not a whole number of batches of sae_batch_size=32"):
        CacheStream(paths, sizes, 32, 16, 3, seed=5, workers=2, start_row=40)


def test_two_loader_workers_serve_each_row_once_per_epoch_and_read_it_once(written_cache, tmp_path, monkeypatch):
    """data.num_workers=2 on a real cache: one epoch (16 batches of 32 of the 512 rows) serves every image's
    class token exactly once, and the workers read about one epoch of rows between them (before the fix each
    worker read every window: at least 2 x 512 rows)."""
    lookup = {}
    for entry in shard_entries(written_cache):
        tensors = load_file(str(written_cache / entry["file"]))
        keys = shard_metadata(written_cache / entry["file"])["keys"]
        for row, image, token in zip(tensors["activations"], tensors["image"].tolist(), tensors["token"].tolist()):
            lookup[row.numpy().tobytes()] = (entry["file"], keys[image], token)
    assert len(lookup) == 512
    log = tmp_path / "loads.txt"
    load = CacheStream.load

    def logged_load(self, window):
        data = load(self, window)
        with open(log, "a") as handle:  # from the worker processes
            handle.write(f"{os.getpid()} {len(data)}\n")
        return data

    monkeypatch.setattr(CacheStream, "load", logged_load)
    dm = CacheDataModule(written_cache, sae_batch_size=32, buffer_size=0, block_rows=16, window_blocks=3,
                         num_workers=2)
    served = []
    for batch in dm.train_dataloader():
        served += [lookup[row.numpy().tobytes()] for row in batch["activations"]]
        if len(served) == 512:
            break
    assert sorted(served) == sorted(lookup.values())  # every (file, key, token) once
    loads = [line.split() for line in log.read_text().splitlines()]
    assert len({pid for pid, _ in loads}) == 2
    loaded = sum(int(n) for _, n in loads)
    # the epoch, the window across the two halves, and what each worker prefetched beyond it (the loader asks
    # each for 2 batches ahead: 64 rows, within at most 3 windows of 48); every worker reading every window: 1,024+
    assert 512 <= loaded <= 512 + 48 + 2 * 3 * 48, loaded


# ---- training from the cache --------------------------------------------------------------------------------


def train_config(run: Path, cache: Path, extra: list[str] = ()):
    return compose_config([
        "experiment=demo", "~backbone", "data=cache", f"data.path={cache}", f"paths.root_dir={ROOT}",
        f"paths.output_dir={run}", "sae_batch_size=48", "expansion=2", "max_steps=24", "data.buffer_size=96",
        "data.block_rows=16", "data.window_blocks=3", "data.num_workers=1", "schedule.lr_warmup=240",
        "schedule.dead_feature_window=192", "schedule.feature_sampling_window=480", "schedule.checkpoint_every=480",
        "trainer.log_every_n_steps=5", "trainer.enable_progress_bar=false", *extra])


def final_state(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 24
    state = dict(ckpt["state_dict"])
    for i, group in enumerate(ckpt["optimizer_states"]):
        for j, param in group["state"].items():
            state.update({f"adam{i}.{j}.{k}": v for k, v in param.items() if torch.is_tensor(v)})
    return state


@pytest.mark.slow
def test_interrupted_and_resumed_training_gives_the_same_sae(tmp_path, written_cache):
    """24 steps of 48 rows (2.25 epochs of the 512-row cache) straight, vs stopped by SIGTERM at step 9 and
    resumed, vs 10 steps then continued to 24: the same SAE and Adam state to 1e-5."""
    from sae_lightning.training import train

    train(train_config(tmp_path / "straight", written_cache))
    reference = final_state(tmp_path / "straight")

    stopped = tmp_path / "stopped"
    with pytest.raises(SystemExit) as exit_info:
        train(train_config(stopped, written_cache, ["+callbacks.stop._target_=tests.helpers.SignalAtStep",
                                                    "+callbacks.stop.step=9"]))
    assert exit_info.value.code == 143
    position = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)
    assert position["global_step"] == 10 and position["CacheDataModule"]["rows_served"] == 480
    train(train_config(stopped, written_cache, ["ckpt_path=last"]))

    continued = tmp_path / "continued"
    train(train_config(continued, written_cache, ["max_steps=10"]))
    train(train_config(continued, written_cache, ["ckpt_path=last"]))

    for run in (stopped, continued):
        state = final_state(run)
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, atol=1e-5, rtol=0, msg=f"{run.name}: {key}")
    sae = SparseAutoencoder.load(stopped / "sae")
    assert sae.W_enc.shape == (64, 128)  # d_in from the manifest, expansion 2
    assert {k: sae.metadata[k] for k in ("backbone", "layer", "tokens", "dataset")} == {
        "backbone": "sae-tiny-vit", "layer": 2, "tokens": "cls", "dataset": str(written_cache)}


@pytest.mark.slow
def test_with_two_loader_workers_an_interrupted_run_resumes_exactly(tmp_path, written_cache):
    """data.num_workers=2 (each worker its own part of every epoch): stopped by SIGTERM at step 9 and resumed
    equals 24 steps straight to 1e-5; a resume whose position is not a whole number of the new sae_batch_size's
    batches refuses before any work (the workers' sequence is cut in batches)."""
    from sae_lightning.training import train

    workers = ["data.num_workers=2"]
    train(train_config(tmp_path / "straight", written_cache, workers))
    reference = final_state(tmp_path / "straight")
    stopped = tmp_path / "stopped"
    with pytest.raises(SystemExit):
        train(train_config(stopped, written_cache, [*workers, "+callbacks.stop._target_=tests.helpers.SignalAtStep",
                                                    "+callbacks.stop.step=9"]))
    position = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)["CacheDataModule"]
    assert position["rows_served"] == 480 and position["stream"]["workers"] == 2
    train(train_config(stopped, written_cache, [*workers, "ckpt_path=last"]))
    state = final_state(stopped)
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, atol=1e-5, rtol=0, msg=key)
    before = (stopped / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(ValueError, match=r"stopped at row 1152 .* not a whole number of batches of "
                                         r"sae_batch_size=40: with data.num_workers=2"):
        train(train_config(stopped, written_cache, [*workers, "sae_batch_size=40", "max_steps=30", "ckpt_path=last"]))
    # another worker count would repeat some rows of the current epoch and skip others: refused before any work
    for other in ("data.num_workers=0", "data.num_workers=3"):
        with pytest.raises(ValueError, match=r"stopped at row 1152 of the cache stream as read by "
                                             r"data.num_workers=2 .* Resume with data.num_workers=2"):
            train(train_config(stopped, written_cache, [other, "max_steps=30", "ckpt_path=last"]))
    assert (stopped / "checkpoints" / "last.ckpt").read_bytes() == before


@pytest.mark.slow
def test_resuming_on_another_cache_refuses_before_training(tmp_path, written_cache, data_dir, tiny_shards):
    from sae_lightning.training import train

    run = tmp_path / "run"
    train(train_config(run, written_cache, ["max_steps=4"]))
    wider = tmp_path / "all"
    assert CacheWriter(cache_config(wider, data_dir, tiny_shards, ["layer=1"])).run() == 0
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(ValueError, match="another model or layer.*layer: 2 in the checkpoint, 1 now"):
        train(train_config(run, wider, ["ckpt_path=last"]))
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    dm = CacheDataModule(written_cache)
    dm.manifest = dict(dm.manifest, d_in=32)
    with pytest.raises(CacheError, match="trained on d_in=64 activations, but data.path=.* holds d=32"):
        dm.check_resume(run / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_the_commands_cache_then_train(tmp_path, data_dir, tiny_shards):
    """`python cache.py ...` then `python train.py ... data=cache data.path=...`, as the README says."""
    env = {k: v for k, v in os.environ.items() if k not in ("SAE_TRAIN_SHARDS", "SAE_VAL_SHARDS", "SAE_CACHE")}
    env["OMP_NUM_THREADS"] = "1"

    def cli(script, *args):
        return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)

    common = ["experiment=demo", "backbone=tiny", f"paths.data_dir={data_dir}", f"data.train_shards='{tiny_shards[0]}'",
              f"hydra.run.dir={tmp_path / 'hydra'}"]
    result = cli("cache.py", *common, f"cache.dir={tmp_path / 'cache'}", "cache.dtype=bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Cache complete: 512 rows" in result.stderr + result.stdout
    assert f"python train.py experiment=demo '~backbone' data=cache data.path={tmp_path / 'cache'}" in \
        result.stderr + result.stdout  # the hint keeps the experiment, so its SAE settings are not lost
    result = cli("train.py", "experiment=demo", "~backbone", "data=cache", f"data.path={tmp_path / 'cache'}",
                 "max_steps=6", "sae_batch_size=64", "data.buffer_size=128", "trainer.enable_progress_bar=false",
                 f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    sae = SparseAutoencoder.load(tmp_path / "run" / "sae")
    assert sae.d_in == 64 and sae.metadata["tokens"] == "cls"
    # the run has no backbone of its own: evaluate.py takes the one the cache's manifest names
    result = cli("evaluate.py", f"run={tmp_path / 'run'}", f"val_shards='{tiny_shards[1]}'", "top_k=5",
                 "batch_size=32", "contrastive_batch_size=32", "num_workers=0", "device=cpu", "n_grid_features=1")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["explained_variance_uncentred"] > 0.5  # the cache's backbone and layer, not some other
    assert "sae-tiny-vit.pt" in result.stderr + result.stdout  # evaluated through the manifest's weights
    # the explorer's Inspect page runs the manifest's backbone and layer too (it crashed on `backbone: null`)
    from streamlit.testing.v1 import AppTest

    os.environ.update(SAE_EXPLORER_EVAL_DIR=str(tmp_path / "run" / "eval"), SAE_EXPLORER_RUN_DIR=str(tmp_path / "run"),
                      SAE_EXPLORER_SAE_NAME="")
    try:
        app = AppTest.from_file(str(ROOT / "sae_lightning" / "explorer" / "app.py"), default_timeout=60).run()
        app.sidebar.radio(key="page").set_value("Inspect an image").run()
        image = io.BytesIO()
        PIL.Image.new("RGB", (40, 30), (200, 30, 30)).save(image, format="PNG")
        app.file_uploader(key="upload").upload("red.png", image.getvalue(), "image/png").run()
    finally:
        for key in ("SAE_EXPLORER_EVAL_DIR", "SAE_EXPLORER_RUN_DIR", "SAE_EXPLORER_SAE_NAME"):
            os.environ.pop(key, None)
    assert not app.exception and not app.error, (app.exception, app.error)
    from sae_lightning.backbone import select_tokens

    source = backbone_source(tmp_path / "cache")
    backbone = instantiate(source["backbone"], device="cpu")
    with torch.no_grad():
        pixels = backbone.preprocess(PIL.Image.open(io.BytesIO(image.getvalue())).convert("RGB"))[None]
        x = select_tokens(backbone.residual(pixels, backbone.resolve_layer(source["layer"])), source["tokens"])
        fired = int((sae.encode(x) > 0).sum())
    assert f"**{fired} features fire** on red.png" in [m.value for m in app.markdown]
    shutil.rmtree(tmp_path / "cache")  # the manifest is what names the backbone: without it, a clear refusal
    result = cli("evaluate.py", f"run={tmp_path / 'run'}", f"val_shards='{tiny_shards[1]}'", "device=cpu",
                 f"out_dir={tmp_path / 'eval2'}")
    assert result.returncode != 0 and "activation cache" in result.stderr and "no such directory" in result.stderr
    assert not (tmp_path / "eval2").exists()
