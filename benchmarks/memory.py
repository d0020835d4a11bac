"""Memory: peak resident memory of a streaming training run (`train.py experiment=demo`) at several dataset sizes.

Each run is a fresh subprocess, watched through /proc every 100 ms. Two readings: the training process's
own peak (VmHWM, the kernel's high-water mark of its RSS since exec; `ru_maxrss` would also count the
benchmark process it was forked from) and the peak of the whole process tree's PSS (the trainer plus its
DataLoader workers, each page shared after fork split between its sharers, so the sum is memory actually
used). Neither may grow with the number of images streamed.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import ROOT, Section, table
from sae_lightning.data.synthetic import write_demo_shards

SHARD_SIZE, REAL_SHARDS, BATCH, FILL_BATCHES = 256, 8, 256, 8  # experiment=demo: batch 256, buffer 2048
FULL, QUICK = (1, 4, 16), (1, 2)  # dataset sizes, in copies of the REAL_SHARDS x SHARD_SIZE generated images


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _status_kib(pid: int, field: str) -> int:
    """A memory field of /proc/<pid>/status or smaps_rollup in KiB (0 once the process is gone)."""
    source = "smaps_rollup" if field == "Pss" else "status"
    try:
        for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_kib(pid: int) -> int:
    """Summed PSS of `pid` and all its descendants."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += _status_kib(current, "Pss")
        stack += _children(current)
    return total


def streaming_run(shards: str, n_images: int, work: Path) -> dict[str, float]:
    """Train the demo config on `shards` for one pass of `n_images`; peak memory and wall time."""
    cmd = [sys.executable, "train.py", "experiment=demo", "backbone=tiny", f"paths.data_dir={work}",
           f"hydra.run.dir={work / f'run-{n_images}'}", f"data.train_shards='{shards}'", "data.val_shards=null",
           f"max_steps={n_images // BATCH}", "trainer.enable_progress_bar=false",
           "schedule.checkpoint_every=1000000000"]  # same checkpoint work at every size
    log_path = work / f"run-{n_images}.log"
    start, peak_main, peak_tree = time.perf_counter(), 0, 0
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            peak_main = max(peak_main, _status_kib(process.pid, "VmHWM"))
            peak_tree = max(peak_tree, tree_pss_kib(process.pid))
            time.sleep(0.1)
    if process.returncode != 0:
        raise RuntimeError(f"streaming run failed; see {log_path}:\n{log_path.read_text()[-3000:]}")
    return {"main_mib": peak_main / 1024, "tree_mib": peak_tree / 1024, "wall_s": time.perf_counter() - start}


def run(quick: bool = False) -> Section:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        real = write_demo_shards(work / "shards", REAL_SHARDS * SHARD_SIZE, image_size=32, shard_size=SHARD_SIZE)
        for copies in QUICK if quick else FULL:
            dataset = work / f"dataset-x{copies}"
            dataset.mkdir()
            for i in range(copies * REAL_SHARDS):
                (dataset / f"train-{i:06d}.tar").symlink_to(real[i % REAL_SHARDS])
            n_images = copies * REAL_SHARDS * SHARD_SIZE
            result = streaming_run(str(dataset / "train-*.tar"), n_images, work)
            streamed = (n_images // BATCH + FILL_BATCHES) * BATCH
            rows.append([f"{n_images:,}", f"{streamed:,}", n_images // BATCH, f"{result['main_mib']:,.0f}",
                         f"{result['tree_mib']:,.0f}", f"{result['wall_s']:.0f}"])
    body = f"""
`python train.py experiment=demo` (tiny backbone, generated 32 px JPEG shards, 2 DataLoader workers, SAE
batch 256, shuffle buffer 2,048, TensorBoard, density histograms, SAE export; periodic checkpoints off so
every size does the same non-streaming work) in a fresh subprocess per dataset size, for one pass over
the dataset ({BATCH} images per step, after {FILL_BATCHES} batches fill the buffer). Every dataset is the
same {REAL_SHARDS * SHARD_SIZE:,} generated images in {REAL_SHARDS} shards, linked under new shard names
until it has the size shown, so only the number of images differs. "trainer peak" is the training
process's VmHWM (its RSS high-water mark, last read before it exits); "tree peak" is the largest summed
PSS of the trainer and its workers seen every 100 ms (shared pages split between sharers). Forked workers
gain private pages for a while as Python touches objects inherited from the trainer (copy-on-write), so
their PSS rises early in a run and then stays flat.

{table(["dataset images", "images streamed", "steps", "trainer peak RSS (MiB)", "tree peak PSS (MiB)",
        "wall (s)"], rows)}
"""
    return Section("Memory: peak RSS of a streaming run", body)
