"""ImageActivationDataModule on shards this file writes: whole images, bad data that must stop, resume position."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import PIL.Image
import pytest
import torch

from sae_lightning.backbone import load_tiny_backbone
from sae_lightning.data.datamodule import ImageActivationDataModule
from sae_lightning.module import SAETrainingModule
from sae_lightning.sae import SparseAutoencoder

REPO = Path(__file__).resolve().parents[1]


def jpeg(rng: np.random.Generator, size: int = 40) -> bytes:
    out = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path, n_shards: int, per_shard: int, bad_every: int = 0, seed: int = 0) -> list[str]:
    """Shards s-000000.tar ... of `per_shard` JPEG samples; with bad_every=k every k-th image is garbage bytes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = root / f"s-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"s{s}_{i:04d}"
                bad = bad_every and i % bad_every != 0
                add(tar, f"{key}.jpg", rng.bytes(300) if bad else jpeg(rng))
                add(tar, f"{key}.cls", str(i % 3).encode())
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return load_tiny_backbone(tmp_path_factory.mktemp("tiny") / "tiny.pt")  # 32 px, 16 patches + cls = 17 tokens


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n_shards=4, per_shard=4)


def datamodule(backbone, shards, **kwargs) -> ImageActivationDataModule:
    args = dict(classnames=None, layer=1, tokens="all", sae_batch_size=8, buffer_size=40, num_workers=0,
                shuffle=0, pin_memory=False, seed=0)
    return ImageActivationDataModule(backbone, shards, **{**args, **kwargs})


def run_pass(dm, loader=None, stop_after_done: int | None = None) -> tuple[list[dict], list[str]]:
    """Drive one pass through the hooks Lightning calls; returns the SAE batches and the image keys read."""
    out, keys = [], []
    for batch in loader if loader is not None else dm.train_dataloader():
        keys += batch["keys"]
        out.append(dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0))
        done = sum(len(v) for v in dm._consumed.values())
        if stop_after_done is not None and done >= stop_after_done:
            break
    return out, keys


def test_tokens_outside_the_choices_fail_in_the_constructor(backbone, shards):
    with pytest.raises(ValueError, match=r"tokens='foo'.*\['cls', 'patches', 'all'\]"):
        datamodule(backbone, shards, tokens="foo")
    with pytest.raises(ValueError, match="tokens="):
        backbone.n_tokens_for("foo")


def test_more_tokens_per_image_than_the_batch_keeps_whole_images(backbone, shards):
    """17 tokens per image, SAE batches of 8: nothing is dropped, counters are exact, batches are 0 or 8."""
    dm = datamodule(backbone, shards)
    batches, keys = run_pass(dm)
    assert dm.images_seen == len(keys) == 16  # every image of the 4 x 4, none left in a partial batch
    assert dm.activations_seen == 17 * 16
    sizes = [b["activations"].shape[0] for b in batches]
    assert set(sizes) <= {0, 8}
    served = sum(sizes)
    assert served + dm.buffer.n_held == dm.activations_seen  # the surplus is held, not dropped
    assert dm.buffer.n_pending < 8 + 17
    assert served == 8 * ((17 * 16 - 40) // 8) - 8 * (dm.buffer.n_pending // 8)


@pytest.mark.slow
def test_training_images_are_not_overshot_through_lightning(backbone, shards):
    dm = datamodule(backbone, shards)
    sae = SparseAutoencoder(backbone.width, 2 * backbone.width, l1_coefficient=1e-3)
    module = SAETrainingModule(sae, lr=1e-3, lr_warmup_steps=1, b_dec_init="mean")
    trainer = L.Trainer(accelerator="cpu", max_steps=12, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=50)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 12
    # 40 to fill the buffer + 12 batches of 8 = 136 tokens = 8 images of 17; the old code read 1 image per step
    assert dm.activations_seen == 17 * dm.images_seen
    assert 40 + 12 * 8 <= dm.activations_seen < 40 + 12 * 8 + 17 + 8
    assert dm.images_seen == 8


def test_workers_send_uint8_images(backbone, shards):
    batch = next(iter(datamodule(backbone, shards).train_dataloader()))
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (1, 3, 32, 32)


def test_a_stream_that_keeps_skipping_stops_with_the_shards_named(backbone, tmp_path):
    bad = write_shards(tmp_path / "bad", n_shards=2, per_shard=20, bad_every=5)  # 80 % garbage
    dm = datamodule(backbone, bad, tokens="cls", sae_batch_size=4, skip_window=20)
    with pytest.raises(RuntimeError, match=r"could not be decoded.*max_skip_fraction=0.5.*s-00000[01]\.tar"):
        run_pass(dm)
    ok = datamodule(backbone, bad, tokens="cls", sae_batch_size=4, skip_window=20, max_skip_fraction=0.9)
    run_pass(ok)
    assert ok.samples_skipped == 32 and ok.images_seen == 8


def test_repeated_skip_warnings_are_rate_limited(backbone, tmp_path, caplog):
    bad = write_shards(tmp_path / "bad", n_shards=1, per_shard=200, bad_every=100)  # 198 garbage, 2 good
    dm = datamodule(backbone, bad, tokens="cls", sae_batch_size=1, max_skip_fraction=1.0)
    with caplog.at_level("WARNING"):
        run_pass(dm)
    assert dm.samples_skipped == 198
    assert len(caplog.records) <= 12  # was one line per bad sample (198) plus one per batch


# --------------------------------------------------------------------------------------------------------------
# Data that yields nothing: an error naming the shards, not an endless loop of empty epochs
# --------------------------------------------------------------------------------------------------------------

EMPTY_PASS_SCRIPT = textwrap.dedent("""
    import sys, lightning as L
    from sae_lightning.backbone import load_tiny_backbone
    from sae_lightning.data.datamodule import ImageActivationDataModule
    from sae_lightning.module import SAETrainingModule
    from sae_lightning.sae import SparseAutoencoder
    backbone = load_tiny_backbone(sys.argv[1])
    for shards in sys.argv[2:]:
        dm = ImageActivationDataModule(backbone, shards, classnames=None, layer=1, tokens="cls", sae_batch_size=4,
                                       buffer_size=8, num_workers=0, shuffle=0, pin_memory=False)
        module = SAETrainingModule(SparseAutoencoder(64, 128), b_dec_init="mean")
        trainer = L.Trainer(accelerator="cpu", max_steps=5, max_epochs=-1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        try:
            trainer.fit(module, datamodule=dm)
            print("CASE", shards, "NO ERROR", flush=True)
        except RuntimeError as exn:
            print("CASE", shards, "ERROR", str(exn).replace("\\n", " "), flush=True)
""")


@pytest.mark.slow
def test_data_that_yields_no_image_stops_the_run(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "random").mkdir()
    for i in range(2):
        (tmp_path / "random" / f"r-{i}.tar").write_bytes(rng.bytes(5000))  # random bytes
    good = write_shards(tmp_path / "trunc", n_shards=2, per_shard=4)
    for path in good:  # truncated inside the first member
        Path(path).write_bytes(Path(path).read_bytes()[:700])
    write_shards(tmp_path / "undecodable", n_shards=2, per_shard=6, bad_every=1000)  # all but the first bad ...
    for path in sorted((tmp_path / "undecodable").glob("*.tar")):  # ... and the first one too
        with tarfile.open(path, "w") as tar:
            for i in range(6):
                add(tar, f"k{i}.jpg", rng.bytes(200))
    cases = [str(tmp_path / d / "*.tar") for d in ("random", "trunc", "undecodable")]
    proc = subprocess.run([sys.executable, "-c", EMPTY_PASS_SCRIPT, str(tmp_path / "tiny.pt"), *cases], cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("CASE")]
    assert len(lines) == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    for line, name in zip(lines, ("r-0.tar", "s-000000.tar", "s-000000.tar")):
        assert "ERROR" in line and "yielded no image" in line and name in line, line
    assert "12 sample(s) could not be decoded" in lines[2]
    assert len(proc.stderr) < 200_000  # no flood of repeated warnings


# --------------------------------------------------------------------------------------------------------------
# Data position on resume
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resumed_pass_reads_exactly_the_remaining_images(backbone, tmp_path, num_workers):
    """Consume part of a pass, save the state, rebuild: the resumed pass reads every other image exactly once."""
    shards = write_shards(tmp_path / "s", n_shards=8, per_shard=3)
    every_key = {f"s-{s:06d}.tar/s{s}_{i:04d}" for s in range(8) for i in range(3)}
    args = dict(tokens="cls", sae_batch_size=1, buffer_size=2, num_workers=num_workers, shuffle=4)
    first = datamodule(backbone, shards, **args)
    _, keys_before = run_pass(first, stop_after_done=3)
    state = first.state_dict()
    position = state["data_position"]
    consumed = {s for v in position["consumed"].values() for s in v}
    assert len(consumed) >= 3 and position["version"] == 1
    assert all(k.startswith("rank0/worker") for k in position["consumed"])
    assert {Path(s).name for s in consumed} <= {k.split("/")[0] for k in keys_before}
    in_flight = {f"{Path(url).name}/{key}" for url, keys in position["in_flight"].items() for key in keys}
    assert in_flight == {k for k in keys_before if k.split("/")[0] not in {Path(s).name for s in consumed}}
    assert in_flight  # shards half read at the checkpoint: their delivered samples are recorded one by one

    resumed = datamodule(backbone, shards, **args)
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    _, keys_after = run_pass(resumed, loader)
    assert not set(keys_before) & set(keys_after)  # no image seen twice
    assert set(keys_before) | set(keys_after) == every_key and len(keys_after) == len(set(keys_after))  # none lost
    read_after = {k.split("/")[0] for k in keys_after}
    assert not read_after & {Path(s).name for s in consumed}  # finished shards are not even opened
    # the resumed pass still counts the shards consumed before the checkpoint: all 8 at its end
    assert {s for v in resumed.state_dict()["data_position"]["consumed"].values() for s in v} == set(shards)
    assert resumed.state_dict()["data_position"]["in_flight"] == {}
    _, keys_next = run_pass(resumed, loader)  # the next pass reads everything again
    assert sorted(keys_next) == sorted(every_key)


class RecordingDataModule(ImageActivationDataModule):
    """Records the keys of the images that reach the backbone."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.__dict__.setdefault("keys_read", []).extend(batch["keys"])
        return super().on_before_batch_transfer(batch, dataloader_idx)


@pytest.mark.slow
def test_resume_through_a_lightning_checkpoint_continues_the_pass(backbone, tmp_path):
    shards = write_shards(tmp_path / "s", n_shards=6, per_shard=4)
    every_key = {f"s-{s:06d}.tar/s{s}_{i:04d}" for s in range(6) for i in range(4)}

    def fit(max_steps: int, ckpt_path=None) -> RecordingDataModule:
        dm = RecordingDataModule(backbone, shards, classnames=None, layer=1, tokens="cls", sae_batch_size=1,
                                 buffer_size=2, num_workers=0, shuffle=4, pin_memory=False)
        module = SAETrainingModule(SparseAutoencoder(backbone.width, 128), b_dec_init="mean")
        checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=9,
                                                          save_last=True)
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=-1, logger=False,
                            callbacks=[checkpoints], enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return dm

    first = fit(9)  # 2 images fill the buffer, 9 steps: 11 images of 24 reached the backbone
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["RecordingDataModule"]
    assert saved["images_seen"] == len(first.keys_read) == 11 and saved["data_position"]["version"] == 1
    resumed = fit(9 + 11, tmp_path / "ckpt" / "last.ckpt")  # 2 to refill + 11 steps: the 13 images left
    assert not set(first.keys_read) & set(resumed.keys_read)
    assert set(first.keys_read) | set(resumed.keys_read) == every_key


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_pass_delivers_every_image_when_a_worker_holds_less_than_a_batch(backbone, shards, num_workers):
    """4 shards x 4 images, image batches of 12: one reader ends its pass with 4 left over; two readers hold 8
    each, under one batch. Every image must reach the buffer (the old code dropped each worker's last partial
    batch: 4 images lost, or all 16 and a "yielded no image" error with two workers)."""
    dm = datamodule(backbone, shards, tokens="cls", sae_batch_size=12, buffer_size=12, num_workers=num_workers)
    _, keys = run_pass(dm)
    assert sorted(keys) == sorted(f"s-{s:06d}.tar/s{s}_{i:04d}" for s in range(4) for i in range(4))
    assert dm.images_seen == dm.activations_seen == 16
