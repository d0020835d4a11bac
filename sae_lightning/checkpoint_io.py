"""Atomic checkpoint writes: a killed run or a full disk never leaves a half-written .ckpt behind.

`clean_stale_temporaries` removes what a killed run left (a `*.ckpt.tmp`, a superseded `sae.tmp/`) at start.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from sae_lightning.atomic import fsync_dir, fsync_file, write_failed_message
from sae_lightning.sae.io import LEFTOVER_SUFFIXES, export_problem

CKPT_TMP_GLOBS = ("*.ckpt.tmp", "*/*.ckpt.tmp")  # <run>/ and <run>/checkpoints/ (ModelCheckpoint's dirpath)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to `<path>.tmp`, fsync, rename over `<path>`, fsync the directory; the previous checkpoint survives."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            fsync_file(tmp)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise OSError(write_failed_message("checkpoint", path, err, "The previous checkpoint is intact")) from err


def clean_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Remove what an interrupted run left in `run_dir`; returns the removed paths (for the log).

    - `*.ckpt.tmp` in the run directory and its direct subdirectories (`checkpoints/`): half-written
      checkpoints, never loaded (a full one was renamed to its final name before the kill).
    - `<export>.tmp/` and `<export>.old/` next to a *complete* SAE export `<export>/` (a save interrupted after
      the export was already replaced), and `<export>/*.tmp` files (a per-file replace interrupted mid-write).
      When the export itself is missing or incomplete its leftovers are kept: they may be the only complete
      copy (`read_sae` names them, and the next export recovers them).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed: list[Path] = []
    for pattern in CKPT_TMP_GLOBS:
        for path in sorted(run_dir.glob(pattern)):
            if path.is_file():
                path.unlink()
                removed.append(path)
    for leftover in sorted(run_dir.iterdir()):
        suffix = next((s for s in LEFTOVER_SUFFIXES if leftover.name.endswith(s)), None)
        if suffix is None or not leftover.is_dir():
            continue
        export = leftover.with_name(leftover.name.removesuffix(suffix))
        if export.is_dir() and export_problem(export) is None:
            shutil.rmtree(leftover)
            removed.append(leftover)
    for export in sorted(p for p in run_dir.iterdir() if p.is_dir() and export_problem(p) is None):
        for path in sorted(export.glob("*.tmp")):
            if path.is_file():
                path.unlink()
                removed.append(path)
    return removed
