"""The SAE on disk, in SAELens's layout: `cfg.json` + `sae_weights.safetensors`.

Weights: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in] (safetensors, never pickle).
cfg.json carries SAELens's fields (v5 top-level ones and v6's `metadata`) so SAELens's
`SAE.load_from_disk` reads it, plus this project's own (`metadata.backbone`, `pretrained`, `layer`,
`tokens`, `image_size`, training hyper-parameters). A save goes to a temporary sibling directory that is
renamed over the old one, so a reader never sees half an SAE.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from sae_lightning.sae.standard import SparseAutoencoder

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
WEIGHT_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")


def saelens_config(sae: "SparseAutoencoder") -> dict[str, Any]:
    """cfg.json for `sae`: SAELens's fields first, then ours under `metadata` (and a few top-level)."""
    meta = dict(sae.metadata)
    layer = meta.get("layer")
    hook_name = f"visual.transformer.resblocks.{layer}" if layer is not None else "unknown"
    return {
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "activation_fn_str": "relu",
        "finetuning_scaling_factor": False,
        "model_name": meta.get("backbone", "unknown"),
        "hook_name": hook_name,
        "hook_layer": layer if layer is not None else -1,
        "hook_head_index": None,
        "context_size": meta.get("tokens_per_image", 1),
        "prepend_bos": False,
        "dataset_path": meta.get("dataset", ""),
        "dataset_trust_remote_code": False,
        "sae_lens_training_version": None,
        "model_from_pretrained_kwargs": {},
        "l1_coefficient": sae.l1_coefficient,
        "mse": sae.mse_kind,
        "metadata": {"model_name": meta.get("backbone", "unknown"), "hook_name": hook_name, **meta},
    }


def save_sae(sae: "SparseAutoencoder", directory: str | Path) -> Path:
    """Write the SAE to `directory` atomically (temporary sibling, then rename)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: getattr(sae, k).detach().to("cpu").contiguous() for k in WEIGHT_KEYS}
    save_file(tensors, str(tmp / WEIGHTS_FILENAME))
    (tmp / CFG_FILENAME).write_text(json.dumps(saelens_config(sae), indent=2, default=str))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def read_sae(directory: str | Path, device: str | torch.device | None = None
             ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(cfg, tensors) from an SAE directory; clear errors for what is missing or mis-shaped."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CFG_FILENAME, directory / WEIGHTS_FILENAME
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: an SAE directory holds {CFG_FILENAME} and {WEIGHTS_FILENAME} "
                f"(a training run exports it to <run>/sae/)."
            )
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("architecture", "standard") != "standard":
        raise ValueError(f"{directory}: architecture {cfg['architecture']!r} is not supported (only 'standard').")
    tensors = load_file(str(weights_path), device=str(device) if device is not None else "cpu")
    missing = [k for k in WEIGHT_KEYS if k not in tensors]
    if missing:
        raise KeyError(f"{weights_path} lacks {missing}; found {sorted(tensors)}.")
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{weights_path}: {key} has shape {tuple(tensors[key].shape)}, cfg says {shape}.")
    return cfg, {k: tensors[k] for k in WEIGHT_KEYS}
