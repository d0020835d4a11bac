"""The exported SAE on disk: crash-safe at every moment, readable modes, the step, clear errors for bad files."""

from __future__ import annotations

import errno
import json
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_lightning.sae import SparseAutoencoder
from sae_lightning.sae import io as sae_io
from sae_lightning.sae.io import check_finite, read_sae, read_sae_step, save_sae


def make_sae(d_in: int = 4, d_sae: int = 8, seed: int = 0, l1: float = 1e-3) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(d_in, d_sae, l1_coefficient=l1, metadata={"layer": 3, "tokens": "cls"})
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae))
        sae.b_dec.copy_(torch.randn(d_in))
    return sae


def same_weights(tensors: dict[str, torch.Tensor], sae: SparseAutoencoder) -> bool:
    return all(torch.equal(tensors[k], getattr(sae, k).detach()) for k in sae_io.WEIGHT_KEYS)


class EveryMoment:
    """Wraps the filesystem mutations a save makes and checks, before and after each, that `directory` loads
    and holds one of the allowed SAEs completely (a kill -9 can land between any two of them)."""

    def __init__(self, monkeypatch, directory: Path, allowed: list[SparseAutoencoder]):
        self.directory, self.allowed, self.checks, self.calls = directory, allowed, 0, []
        for target, name in ((os, "replace"), (os, "rename"), (sae_io, "save_file"), (sae_io, "exchange_paths")):
            monkeypatch.setattr(target, name, self.wrap(getattr(target, name), name))

    def wrap(self, fn, name):
        def wrapped(*args, **kwargs):
            self.calls.append(name)
            self.check()
            result = fn(*args, **kwargs)
            self.check()
            return result
        return wrapped

    def check(self):
        cfg, tensors = read_sae(self.directory)
        matches = [sae for sae in self.allowed if same_weights(tensors, sae)]
        assert matches, f"{self.directory} holds weights of no allowed SAE after {self.calls}"
        assert (cfg["d_in"], cfg["d_sae"]) == (matches[0].d_in, matches[0].d_sae)
        self.checks += 1


def test_reexport_holds_a_complete_sae_at_every_moment(tmp_path, monkeypatch):
    directory = tmp_path / "sae"
    old, new = make_sae(seed=0, l1=1e-3), make_sae(seed=1, l1=2e-3)
    save_sae(old, directory, step=10)
    watch = EveryMoment(monkeypatch, directory, [old, new])
    save_sae(new, directory, step=20)
    assert watch.checks >= 4
    cfg, tensors = read_sae(directory)
    assert same_weights(tensors, new) and cfg["l1_coefficient"] == 2e-3
    assert read_sae_step(directory) == 20
    assert sorted(os.listdir(tmp_path)) == ["sae"] and sorted(os.listdir(directory)) == [
        "cfg.json", "sae_weights.safetensors"]


def test_reexport_of_other_shapes_holds_a_complete_sae_at_every_moment(tmp_path, monkeypatch):
    directory = tmp_path / "sae"
    old, new = make_sae(4, 8, seed=0), make_sae(4, 16, seed=1)
    save_sae(old, directory, step=1)
    watch = EveryMoment(monkeypatch, directory, [old, new])
    save_sae(new, directory, step=2)
    assert "exchange_paths" in watch.calls
    cfg, tensors = read_sae(directory)
    assert cfg["d_sae"] == 16 and same_weights(tensors, new)
    assert sorted(os.listdir(tmp_path)) == ["sae"]


@pytest.mark.parametrize("fail_at", range(3))
def test_a_fault_at_any_write_leaves_a_loadable_export(tmp_path, monkeypatch, fail_at):
    """A fault in the n-th filesystem write of a re-export (save_file, os.replace weights, os.replace cfg.json):
    a whole SAE is still there, the old one until the new weights are in place, and no temporaries."""
    directory = tmp_path / "sae"
    old, new = make_sae(seed=0), make_sae(seed=1)
    save_sae(old, directory, step=5)
    calls = []

    def faulty(fn):
        def wrapped(*args, **kwargs):
            calls.append(fn)
            if len(calls) - 1 == fail_at:
                raise OSError(errno.EIO, "injected I/O error")
            return fn(*args, **kwargs)
        return wrapped

    for target, name in ((os, "replace"), (os, "rename"), (sae_io, "save_file")):
        monkeypatch.setattr(target, name, faulty(getattr(target, name)))
    with pytest.raises(OSError, match="Is the disk full"):
        save_sae(new, directory, step=6)
    monkeypatch.undo()
    cfg, tensors = read_sae(directory)
    assert same_weights(tensors, old) == (fail_at < 2) and same_weights(tensors, new) == (fail_at == 2)
    assert sorted(os.listdir(directory)) == ["cfg.json", "sae_weights.safetensors"], "temporaries are removed"
    assert sorted(os.listdir(tmp_path)) == ["sae"]


def test_full_disk_during_export_gives_the_checkpoint_advice_and_keeps_the_old_export(tmp_path, monkeypatch):
    directory = tmp_path / "sae"
    old = make_sae(seed=0)
    save_sae(old, directory, step=3)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sae_io, "save_file", full_disk)
    with pytest.raises(OSError, match="Is the disk full") as info:
        save_sae(make_sae(seed=1), directory, step=4)
    assert info.value.errno == errno.ENOSPC
    assert "ckpt_path=<run>/checkpoints/last.ckpt" in str(info.value) and str(directory) in str(info.value)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["sae"]
    assert read_sae_step(directory) == 3


def test_full_disk_on_the_first_export_leaves_no_partial_directory(tmp_path, monkeypatch):
    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sae_io, "save_file", full_disk)
    with pytest.raises(OSError, match="Is the disk full"):
        save_sae(make_sae(), tmp_path / "sae")
    assert os.listdir(tmp_path) == []


def test_without_atomic_exchange_a_kill_between_the_two_renames_is_named_with_its_recovery(tmp_path, monkeypatch):
    directory = tmp_path / "sae"
    old, new = make_sae(4, 8, seed=0), make_sae(4, 12, seed=1)
    save_sae(old, directory, step=7)
    monkeypatch.setattr(sae_io, "exchange_paths", lambda a, b: False)
    real_rename, dead = os.rename, []

    def kill_at_second_rename(src, dst):
        if dead or Path(src).name == "sae.tmp":  # kill -9 here: nothing after it runs, no clean-up
            dead.append(True)
            raise KeyboardInterrupt
        return real_rename(src, dst)

    def no_cleanup_when_dead(*args, **kwargs):
        if dead:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", kill_at_second_rename)
    monkeypatch.setattr(sae_io.shutil, "rmtree", no_cleanup_when_dead)
    with pytest.raises(KeyboardInterrupt):
        save_sae(new, directory, step=8)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["sae.old", "sae.tmp"]
    with pytest.raises(FileNotFoundError) as info:
        read_sae(directory)
    message = str(info.value)
    assert "sae.old (step 7)" in message and "sae.tmp (step 8)" in message, message
    assert f"Recover it with: mv {tmp_path / 'sae.tmp'} {directory}" in message, "the newer one is advised"
    os.rename(tmp_path / "sae.tmp", directory)  # following the advice works
    cfg, tensors = read_sae(directory)
    assert same_weights(tensors, new) and read_sae_step(directory) == 8


def test_without_atomic_exchange_a_failed_second_rename_puts_the_old_export_back(tmp_path, monkeypatch):
    directory = tmp_path / "sae"
    old = make_sae(4, 8, seed=0)
    save_sae(old, directory, step=7)
    monkeypatch.setattr(sae_io, "exchange_paths", lambda a, b: False)
    real_rename = os.rename

    def fail_second(src, dst):
        if Path(src).name == "sae.tmp":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_second)
    with pytest.raises(OSError, match="Is the disk full"):
        save_sae(make_sae(4, 12, seed=1), directory, step=8)
    monkeypatch.undo()
    assert same_weights(read_sae(directory)[1], old) and sorted(os.listdir(tmp_path)) == ["sae"]


def test_a_crash_between_the_old_two_renames_is_named_and_the_next_export_recovers_it(tmp_path):
    """The state the old save_sae left after a kill between its renames: only sae.old/ and sae.tmp/."""
    old, new = make_sae(seed=0), make_sae(seed=1)
    save_sae(old, tmp_path / "sae.old")
    save_sae(new, tmp_path / "sae.tmp")
    directory = tmp_path / "sae"
    with pytest.raises(FileNotFoundError, match="Recover it with: mv .*sae.tmp .*sae"):
        read_sae(directory)
    newest = make_sae(seed=2)
    save_sae(newest, directory, step=1)
    assert same_weights(read_sae(directory)[1], newest)


def test_an_incomplete_directory_names_the_complete_leftover(tmp_path):
    directory = tmp_path / "sae"
    save_sae(make_sae(), tmp_path / "sae.tmp", step=12)
    directory.mkdir()
    (directory / "sae_weights.safetensors").write_bytes((tmp_path / "sae.tmp" / "sae_weights.safetensors").read_bytes())
    (directory / "cfg.json").write_text('{"d_in": 4, "d_s')  # truncated
    with pytest.raises(ValueError) as info:
        read_sae(directory)
    message = str(info.value)
    assert str(directory / "cfg.json") in message and "not valid JSON" in message
    assert "step 12" in message and f"mv {directory} {directory}.broken && mv {tmp_path / 'sae.tmp'}" in message


def test_step_is_in_the_safetensors_metadata_not_cfg_json(tmp_path):
    directory = save_sae(make_sae(), tmp_path / "sae", step=1234)
    assert read_sae_step(directory) == 1234
    assert "step" not in json.loads((directory / "cfg.json").read_text())
    assert json.loads((directory / "cfg.json").read_text())["metadata"]["format_version"] == sae_io.FORMAT_VERSION
    save_sae(make_sae(), directory)
    assert read_sae_step(directory) is None


def test_files_are_written_readable_like_cfg_json(tmp_path):
    previous = os.umask(0o022)
    try:
        directory = save_sae(make_sae(), tmp_path / "sae")
        save_sae(make_sae(seed=3), directory)  # the per-file replace path too
        save_sae(make_sae(4, 4), tmp_path / "other")
    finally:
        os.umask(previous)
    for path in [*directory.iterdir(), *(tmp_path / "other").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_exports_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real(fd)))
    directory = save_sae(make_sae(), tmp_path / "sae")
    assert synced.count(False) >= 2 and synced.count(True) >= 2  # both files; the staging and the parent dirs
    synced.clear()
    save_sae(make_sae(seed=1), directory)
    assert synced.count(False) >= 2 and synced.count(True) >= 2


# ------------------------------------------------------------------------------------------------------------
# Bad files: named, described, never unpickled
# ------------------------------------------------------------------------------------------------------------


class Trap:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("zipped", [True, False])
def test_a_pickled_weights_file_is_named_and_never_unpickled(tmp_path, zipped):
    directory = save_sae(make_sae(), tmp_path / "sae")
    marker = tmp_path / "pwned"
    weights = directory / "sae_weights.safetensors"
    if zipped:
        torch.save({"W_enc": Trap(marker)}, weights)
    else:
        weights.write_bytes(pickle.dumps({"W_enc": Trap(marker)}, protocol=2))
    with pytest.raises(ValueError) as info:
        SparseAutoencoder.load(directory)
    message = str(info.value)
    assert str(weights) in message and "looks like a PyTorch pickle" in message
    assert ("zip archive" in message) == zipped
    assert not marker.exists()


def test_a_truncated_weights_file_says_so(tmp_path):
    directory = save_sae(make_sae(), tmp_path / "sae")
    weights = directory / "sae_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-20])
    with pytest.raises(ValueError, match=f"{weights} is truncated: its header describes {len(data)} bytes "
                                         f"but the file has {len(data) - 20}"):
        read_sae(directory)
    weights.write_bytes(data[:5])
    with pytest.raises(ValueError, match="is not a safetensors file"):
        read_sae(directory)
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        read_sae(directory)


def test_random_bytes_are_named_with_what_they_start_with(tmp_path):
    directory = save_sae(make_sae(), tmp_path / "sae")
    weights = directory / "sae_weights.safetensors"
    weights.write_bytes(bytes(range(7, 250)) * 10)
    with pytest.raises(ValueError, match=rf"{weights} is not a safetensors file: unrecognised bytes "
                                         rf"\(it starts with 07 08 09 0a 0b 0c 0d 0e\)"):
        read_sae(directory)


def test_a_truncated_cfg_json_names_the_file_and_the_json_error(tmp_path):
    directory = save_sae(make_sae(), tmp_path / "sae")
    cfg = directory / "cfg.json"
    cfg.write_text(cfg.read_text()[:50])
    with pytest.raises(ValueError, match=rf"{cfg} is not valid JSON \(.*line \d+ column \d+"):
        SparseAutoencoder.load(directory)


def test_check_finite_names_the_file_and_the_bad_tensors(tmp_path):
    tensors = {"W_enc": torch.ones(2, 3), "b_enc": torch.tensor([1.0, float("nan"), float("inf")]),
               "b_dec": torch.tensor([float("-inf"), 0.0])}
    with pytest.raises(ValueError) as info:
        check_finite(tensors, tmp_path / "w.safetensors")
    message = str(info.value)
    assert str(tmp_path / "w.safetensors") in message
    assert "b_enc has 1 NaN and 1 infinite of 3 values" in message
    assert "b_dec has 0 NaN and 1 infinite of 2 values" in message and "W_enc" not in message
    check_finite({"W_enc": torch.ones(2)}, "fine")  # no error


def test_loading_an_sae_with_nan_weights_is_an_error(tmp_path):
    sae = make_sae()
    with torch.no_grad():
        sae.W_dec[2, 1] = float("nan")
    directory = save_sae(sae, tmp_path / "sae")
    with pytest.raises(ValueError, match="W_dec has 1 NaN"):
        SparseAutoencoder.load(directory)
    cfg, tensors = read_sae(directory, allow_non_finite=True)
    assert torch.isnan(tensors["W_dec"][2, 1])


def test_saved_file_is_plain_safetensors_with_the_documented_metadata(tmp_path):
    directory = save_sae(make_sae(4, 8), tmp_path / "sae", step=9)
    tensors = load_file(str(directory / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"W_enc": (4, 8), "W_dec": (8, 4), "b_enc": (8,),
                                                               "b_dec": (4,)}
    header = sae_io.inspect_safetensors(directory / "sae_weights.safetensors")
    assert header["__metadata__"] == {"format_version": "1", "step": "9"}
    other = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, str(other))
    assert sae_io.inspect_safetensors(other)["x"]["shape"] == [3]



@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kill_9_at_random_moments_of_exports_always_leaves_a_loadable_sae(tmp_path):
    """Real kills: a forked process exporting in a loop (same shapes, then shape changes) is SIGKILLed at
    random moments; after each kill the directory loads as a complete SAE of consistent shapes."""
    import random
    import signal
    import time

    rng = random.Random(0)
    directory = tmp_path / "sae"
    saes = [make_sae(64, 256, seed=0), make_sae(64, 512, seed=1)]  # built before the fork: the child only writes
    steps = []
    for _ in range(12):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: export forever, three of one shape then three of the other
            try:
                os.close(read_end)
                step = 0
                while True:
                    save_sae(saes[step // 3 % 2], directory, step=step)
                    if step == 0:
                        os.write(write_end, b"r")
                    step += 1
            finally:
                os._exit(1)
        os.close(write_end)
        assert os.read(read_end, 1) == b"r"
        os.close(read_end)
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        cfg, tensors = read_sae(directory)  # never raises
        assert cfg["d_sae"] in (256, 512) and tensors["W_enc"].shape == (64, cfg["d_sae"])
        steps.append(read_sae_step(directory))
    assert len(set(steps)) > 1, steps  # the kills did land at different points of the loop
