"""Heatmaps over thumbnails: a feature's per-patch activations drawn on the image (numpy and PIL only)."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image

ALPHA = 0.6  # opacity of the overlay where the feature is at its largest


def overlay(jpeg: bytes, heat: np.ndarray, vmax: float) -> bytes:
    """The thumbnail `jpeg` with `heat` [grid_h, grid_w] drawn over it: each patch's square tinted from
    transparent (activation 0) to opaque red-yellow (activation >= vmax). The thumbnail is the same centred
    square the model saw, so patch (r, c) covers rows r*S/grid_h .. (r+1)*S/grid_h, columns likewise.
    Returns PNG bytes; a NaN heatmap (no data for this image) or vmax <= 0 leaves the image as it was."""
    with PIL.Image.open(io.BytesIO(jpeg)) as im:
        image = np.asarray(im.convert("RGB"), dtype=np.float32)
    h = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0)
    if vmax > 0 and np.isfinite(vmax):
        level = np.clip(h / vmax, 0.0, 1.0)
        size = image.shape[1], image.shape[0]
        level = np.asarray(PIL.Image.fromarray(level, mode="F").resize(size, PIL.Image.NEAREST))
        alpha = ALPHA * level[..., None]
        colour = np.stack([np.full_like(level, 255.0), 255.0 * level, np.zeros_like(level)], axis=-1)
        image = image * (1 - alpha) + colour * alpha
    out = io.BytesIO()
    PIL.Image.fromarray(image.round().clip(0, 255).astype(np.uint8)).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def scale(heat: np.ndarray) -> float:
    """The largest activation over a feature's heatmaps [n, grid_h, grid_w] (NaN ignored; 0 if none)."""
    finite = np.asarray(heat, dtype=np.float32)
    finite = finite[np.isfinite(finite)]
    return float(finite.max()) if finite.size else 0.0
