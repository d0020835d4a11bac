"""Writers for <run>/eval/: metrics.json, the per-feature table (docs/format-eval.md) and report.md."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sae_lightning.evaluation.feature_stats import FeatureStats

FORMAT_VERSION = 1
PROVENANCE = {"run_dir", "sae_path", "backbone", "pretrained", "layer", "tokens", "shards", "classnames",
              "device", "seed", "date", "sae_lightning_version"}


def json_safe(value: Any) -> Any:
    """NaN/inf -> None (JSON null: 'undefined'), tensors/numpy scalars -> Python numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def write_features(directory: Path, stats: FeatureStats, extra: dict[str, torch.Tensor],
                   image_keys: dict[int, str], meta: dict[str, Any]) -> tuple[Path, Path]:
    """features.safetensors (per-feature tensors, row i = feature i) + features.json (keys, provenance)."""
    tensors = {
        "density": stats.density,
        "image_density": stats.image_density,
        "mean_activation": stats.mean_activation,
        "mean_top_activation": stats.mean_top_activation,
        "label_entropy": stats.label_entropy,
        "entropy_defined": stats.entropy_defined,
        "top_values": stats.top_values,
        "top_indices": stats.top_indices,
        "top_labels": stats.top_labels,
        **extra,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    directory.mkdir(parents=True, exist_ok=True)
    st_path, json_path = directory / "features.safetensors", directory / "features.json"
    save_file(tensors, str(st_path), metadata={"format_version": str(FORMAT_VERSION)})
    sidecar = {
        "format_version": FORMAT_VERSION,
        "n_features": stats.n_features,
        "k": stats.k,
        "n_images": stats.n_images,
        "n_tokens": stats.n_tokens,
        **meta,
        "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                    for k, v in tensors.items()},
        "image_keys": {str(i): key for i, key in sorted(image_keys.items())},
    }
    write_json(json_path, sidecar)
    return st_path, json_path


def _fmt(value: Any) -> str:
    if value is None:
        return "undefined"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(path: Path, metrics: dict[str, Any], plots: dict[str, Path]) -> Path:
    """A short markdown report: the headline numbers, then every plot (relative links)."""
    m = json_safe(metrics)
    lines = [
        "# SAE evaluation",
        "",
        f"Run `{m.get('run_dir')}`; SAE `{m.get('sae_path')}`; backbone {m.get('backbone')} "
        f"({m.get('pretrained')}), layer {m.get('layer')}, tokens {m.get('tokens')}; "
        f"{m.get('n_images')} images from {len(m.get('shards') or [])} shard(s); {m.get('date')}.",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for key, value in m.items():
        if key not in PROVENANCE and (isinstance(value, (int, float)) or value is None):
            lines.append(f"| `{key}` | {_fmt(value)} |")
    lines += ["", "Undefined values (no full batch, no cluster, ...) are `null` in metrics.json.", ""]
    for name, plot in plots.items():
        lines += [f"## {name}", "", f"![{name}]({plot.relative_to(path.parent).as_posix()})", ""]
    path.write_text("\n".join(lines))
    return path
