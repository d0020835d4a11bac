"""The output figure: a feature's optimised images beside its top-9 natural images (from `evaluate.py`'s
per-feature table, docs/format-eval.md), with the activation each reaches."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sae_lightning.evaluation.fetch import fetch_images  # noqa: E402

log = logging.getLogger(__name__)
N_NATURAL = 9
THUMB_SIZE = 160


@dataclass
class NaturalTopImages:
    """What evaluate.py found for some features: per feature its top activation and top-9 thumbnails."""

    top_activation: dict[int, float | None] = field(default_factory=dict)  # None: never fired
    thumbnails: dict[int, list[np.ndarray | None]] = field(default_factory=dict)  # [H, W, 3] uint8
    captions: dict[int, list[str]] = field(default_factory=dict)
    source: str | None = None  # the features.safetensors read, if any
    live: torch.Tensor | None = None  # [F] bool, features that fired in the evaluation


def read_feature_table(eval_dir: Path, d_sae: int) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, sidecar) of <eval_dir>/features.safetensors + features.json, or None when absent or when it
    describes another SAE (a different feature count): then it is ignored with a warning."""
    st_path, json_path = eval_dir / "features.safetensors", eval_dir / "features.json"
    if not (st_path.is_file() and json_path.is_file()):
        log.warning("no %s: optimised images are drawn without top natural images (run evaluate.py first)",
                    st_path)
        return None
    meta = json.loads(json_path.read_text())
    tensors = load_file(str(st_path))
    if meta.get("n_features") != d_sae or tensors["top_values"].shape[0] != d_sae:
        log.warning("%s describes %s features but the SAE has %d: ignored (re-run evaluate.py)", st_path,
                    meta.get("n_features"), d_sae)
        return None
    return tensors, meta


def natural_top_images(table: tuple[dict[str, torch.Tensor], dict] | None, features: list[int],
                       eval_dir: Path) -> NaturalTopImages:
    """Top activations and top-9 thumbnails for `features` (fetched by key from the evaluation's shards)."""
    result = NaturalTopImages()
    if table is None:
        return result
    tensors, meta = table
    result.source = str(eval_dir / "features.safetensors")
    values, indices = tensors["top_values"], tensors["top_indices"]
    labels = tensors.get("top_labels", torch.full_like(indices, -1))
    result.live = torch.isfinite(values[:, 0]) & (indices[:, 0] >= 0)
    keys_by_index = meta.get("image_keys", {})
    classnames = meta.get("classnames") or []
    wanted: dict[int, list[tuple[str | None, str]]] = {}
    for f in features:
        top = values[f, 0].item()
        result.top_activation[f] = top if math.isfinite(top) else None
        rows = []
        for value, index, label in zip(values[f, :N_NATURAL].tolist(), indices[f, :N_NATURAL].tolist(),
                                       labels[f, :N_NATURAL].tolist()):
            if index < 0:
                break
            name = classnames[label] if 0 <= label < len(classnames) else f"label {label}"
            rows.append((keys_by_index.get(str(index)), f"{name}\n{value:.3g}"))
        wanted[f] = rows
    shards = [s for s in meta.get("shards", []) if "://" in s or Path(s).is_file()]
    if len(shards) < len(meta.get("shards", [])):
        log.warning("%d of the evaluation's shards are gone: their top images are left blank",
                    len(meta.get("shards", [])) - len(shards))
    keys = {key for rows in wanted.values() for key, _ in rows if key is not None}
    thumbs = fetch_images(shards, keys, size=THUMB_SIZE) if shards and keys else {}
    for f, rows in wanted.items():
        result.thumbnails[f] = [thumbs.get(key) if key is not None else None for key, _ in rows]
        result.captions[f] = [caption for _, caption in rows]
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def feature_figure(feature: int, images: torch.Tensor, activations: torch.Tensor,
                   natural: list[np.ndarray | None], captions: list[str], top_natural: float | None,
                   subtitle: str = "", note: str = "") -> Figure:
    """images [S, 3, H, W] in [0, 1] with activations [S]; natural: up to 9 thumbnails [h, w, 3] uint8.

    Left: the S optimised images (3 rows); right: the 3x3 top natural images, or `note` where there are none.
    """
    n_starts, rows = images.shape[0], 3
    opt_cols = math.ceil(n_starts / rows)
    ratios = [1.0] * opt_cols + [0.15] + [1.0] * 3
    fig = plt.figure(figsize=(2.1 * (opt_cols + 3) + 0.3, 2.3 * rows + 0.9))
    grid = fig.add_gridspec(rows, len(ratios), width_ratios=ratios)
    best = int(torch.argmax(activations))
    for s in range(n_starts):
        ax = fig.add_subplot(grid[s % rows, s // rows])
        ax.imshow(images[s].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="bilinear")
        ax.set_title(f"optimised, start {s}{' (best)' if s == best else ''}\nactivation {activations[s].item():.3g}",
                     fontsize=8)
        ax.axis("off")
    for i in range(len(natural)):
        ax = fig.add_subplot(grid[i // 3, opt_cols + 1 + i % 3])
        ax.axis("off")
        if natural[i] is not None:
            ax.imshow(natural[i])
        ax.set_title(captions[i], fontsize=7)
    if not natural:
        ax = fig.add_subplot(grid[:, opt_cols + 1 :])
        ax.axis("off")
        ax.text(0.5, 0.5, note or "no top natural images", ha="center", va="center", fontsize=9, wrap=True)
    reached = activations[best].item()
    ratio = f" = {reached / top_natural:.2f} x" if top_natural else " vs"
    fig.suptitle(f"feature {feature}: visualisation {reached:.3g}{ratio} top natural image {_fmt(top_natural)}"
                 + (f"\n{subtitle}" if subtitle else ""), fontsize=9)
    fig.tight_layout()
    return fig


def save_figure_atomic(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Write a PNG to a temporary sibling and rename it over `path` (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=dpi)
    os.replace(tmp, path)
    return path


def close_figure(fig: Figure) -> None:
    plt.close(fig)


def save_image_strip(images: torch.Tensor, path: Path) -> Path:
    """The optimised images [S, 3, H, W] in [0, 1] side by side at their own resolution, lossless 8-bit PNG
    ([H, S*W, 3]), written atomically."""
    strip = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(2, 0, 3, 1).reshape(
        images.shape[2], -1, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    PIL.Image.fromarray(strip.numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
