"""Atomic checkpoint writes: a killed run or a full disk never leaves a half-written .ckpt behind."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to `<path>.tmp`, fsync, then rename over `<path>`; the previous checkpoint survives any failure."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise OSError(
                f"Could not write checkpoint {path} ({err}). Is the disk full? The previous checkpoint is "
                f"intact; free space and resume with ckpt_path=<run>/checkpoints/last.ckpt."
            ) from err
