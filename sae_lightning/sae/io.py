"""The SAE on disk, in SAELens's layout: `cfg.json` + `sae_weights.safetensors` (docs/format-sae.md).

Weights: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in] (safetensors, never pickle);
the safetensors header metadata holds `format_version` and the training `step` of the export.
cfg.json carries SAELens's fields (v5 top-level ones and v6's `metadata`) so SAELens's
`SAE.load_from_disk` reads it, plus this project's own (`metadata.backbone`, `pretrained`, `layer`,
`tokens`, `image_size`, training hyper-parameters, `format_version`).

Crash safety: at every moment the export directory holds a complete, loadable SAE. A re-export of the same
shapes replaces each file atomically (weights first, then cfg.json); a first export, or one of other shapes,
is written whole into `<dir>.tmp/` and swapped in with one atomic exchange. Files and directories are fsynced.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_lightning.atomic import (
    exchange_paths,
    fsync_dir,
    fsync_file,
    make_readable,
    replace_file,
    write_failed_message,
)

if TYPE_CHECKING:
    from sae_lightning.sae.standard import SparseAutoencoder

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
WEIGHT_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")  # the standard (and topk) architecture's tensors
LEFTOVER_SUFFIXES = (".tmp", ".old")  # siblings an interrupted save may leave: <dir>.tmp (ours), <dir>.old (older)
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


def tensor_shapes(architecture: str, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
    """The tensors SAELens's `architecture` saves, with their shapes; ValueError naming the known ones otherwise.

    standard, topk: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in];
    jumprelu: those and threshold [d_sae] (BatchTopK and Matryoshka BatchTopK are exported as jumprelu);
    gated: W_enc, W_dec, b_dec, b_gate [d_sae], b_mag [d_sae], r_mag [d_sae] (no b_enc).
    """
    base = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    if architecture in ("standard", "topk"):
        return base
    if architecture == "jumprelu":
        return {**base, "threshold": (d_sae,)}
    if architecture == "gated":
        return {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,), "b_gate": (d_sae,),
                "b_mag": (d_sae,), "r_mag": (d_sae,)}
    raise ValueError(f"architecture {architecture!r} is not supported; known: standard, topk, jumprelu, gated "
                     f"(batchtopk and matryoshka_batchtopk SAEs are saved as jumprelu).")


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
        "activation_fn_str": "topk" if sae.architecture == "topk" else "relu",
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
        **sae.config_fields(),
        "metadata": {"model_name": meta.get("backbone", "unknown"), "hook_name": hook_name, **meta,
                     "format_version": FORMAT_VERSION},
    }


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking files without trusting them
# ----------------------------------------------------------------------------------------------------------------


def describe_bytes(head: bytes) -> str:
    """What a file that is not safetensors looks like, from its first bytes (magic numbers)."""
    if head.startswith(b"PK\x03\x04"):
        return ("a zip archive: it looks like a PyTorch pickle checkpoint (torch.save). It was not loaded: "
                "unpickling can run arbitrary code. If you trust it, convert it with torch.load(path, "
                "weights_only=True) and safetensors.torch.save_file")
    if head[:1] == b"\x80":
        return ("a pickle stream: it looks like a PyTorch pickle (legacy torch.save) or pickle.dump. It was not "
                "loaded: unpickling can run arbitrary code. If you trust it, convert it with torch.load(path, "
                "weights_only=True) and safetensors.torch.save_file")
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array, not safetensors"
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON text, not safetensors weights"
    return f"unrecognised bytes (it starts with {head[:8].hex(' ') or 'nothing'}), not safetensors"


def inspect_safetensors(path: str | Path) -> dict[str, Any]:
    """The safetensors JSON header of `path` ({name: {dtype, shape, data_offsets}}, "__metadata__"), checked.

    Reads only the header, never unpickles. ValueError naming the file and what it looks like for anything
    that is not a complete safetensors file: a pickle, a zip, a truncated copy, random bytes, an empty file.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes): not a safetensors file (an interrupted write or copy?).")
    with open(path, "rb") as handle:
        head = handle.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > MAX_HEADER_BYTES or n > size - 8:
            raise ValueError(f"{path} is not a safetensors file: {describe_bytes(head)}.")
        raw = handle.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise ValueError(f"{path} is not a safetensors file: its header is not valid ({err}); "
                         f"{describe_bytes(head)}.") from err
    if 8 + n + end > size:
        raise ValueError(f"{path} is truncated: its header describes {8 + n + end} bytes but the file has {size} "
                         f"(an interrupted write or copy?).")
    return header


def read_cfg(path: str | Path) -> dict[str, Any]:
    """cfg.json as a dict with integer d_in and d_sae; ValueError naming the file and the JSON error otherwise."""
    path = Path(path)
    text = path.read_text(errors="replace")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}; {len(text)} characters): truncated or corrupted?") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(cfg).__name__}.")
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise ValueError(f"{path}: {key} must be a positive integer, found {cfg.get(key)!r}.")
    return cfg


def expected_shapes(d_in: int, d_sae: int, architecture: str = "standard") -> dict[str, tuple[int, ...]]:
    return tensor_shapes(architecture, d_in, d_sae)


def export_problem(directory: str | Path) -> str | None:
    """None when `directory` holds a complete export (both files, valid, shapes agreeing), else what is wrong.

    Reads cfg.json and the weights' header only (cheap).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory} does not exist"
    for name in (CFG_FILENAME, WEIGHTS_FILENAME):
        if not (directory / name).is_file():
            return f"{directory / name} is missing"
    try:
        cfg = read_cfg(directory / CFG_FILENAME)
        header = inspect_safetensors(directory / WEIGHTS_FILENAME)
        shapes = expected_shapes(cfg["d_in"], cfg["d_sae"], cfg.get("architecture", "standard"))
    except (OSError, ValueError) as err:
        return str(err)
    for key, shape in shapes.items():
        found = tuple(header.get(key, {}).get("shape", ()))
        if found != shape:
            return f"{directory / WEIGHTS_FILENAME}: {key} has shape {found or 'nothing'}, cfg.json says {shape}"
    return None


def read_sae_step(directory: str | Path) -> int | None:
    """The training step an export was written at (safetensors header metadata), or None when not recorded."""
    header = inspect_safetensors(Path(directory) / WEIGHTS_FILENAME)
    step = (header.get("__metadata__") or {}).get("step")
    return int(step) if step is not None else None


def leftover_exports(directory: str | Path) -> list[Path]:
    """Complete exports an interrupted save left next to `directory` (`<dir>.tmp`, `<dir>.old`), newest first."""
    directory = Path(directory)
    found = [directory.with_name(directory.name + suffix) for suffix in LEFTOVER_SUFFIXES]
    found = [p for p in found if export_problem(p) is None]

    def step(path: Path) -> int:
        try:
            value = read_sae_step(path)
        except (OSError, ValueError):
            value = None
        return -1 if value is None else value

    return sorted(found, key=step, reverse=True)  # stable: .tmp (the newer in a two-rename save) wins ties


def recovery_advice(directory: str | Path) -> str:
    """' <leftover> holds a complete export ...: recover it with `mv ...`' or '' when there is none."""
    directory = Path(directory)
    leftovers = leftover_exports(directory)
    if not leftovers:
        return ""
    best = leftovers[0]
    steps = []
    for p in leftovers:
        step = read_sae_step(p)
        steps.append(f"{p} (step {step})" if step is not None else str(p))
    move = f"mv {best} {directory}"
    if directory.exists():
        move = f"mv {directory} {directory}.broken && {move}"
    return (f" A complete SAE export was left by an interrupted save: {', '.join(steps)}. Recover it with: {move}")


def check_finite(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """ValueError naming `path` and every tensor that holds NaN or infinite values (with counts)."""
    problems = []
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        if nan or inf:
            problems.append(f"{key} has {nan} NaN and {inf} infinite of {tensor.numel()} values")
    if problems:
        raise ValueError(f"{path}: non-finite SAE weights ({'; '.join(problems)}). The SAE diverged before it was "
                         f"saved: use an export or checkpoint from before the divergence, or retrain with a lower lr.")


def read_sae(directory: str | Path, device: str | torch.device | None = None, *, allow_non_finite: bool = False
             ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(cfg, tensors) from an SAE directory; clear errors for what is missing, corrupt, mis-shaped or non-finite.

    Tensors: those of cfg.json's `architecture` (`tensor_shapes`), e.g. W_enc [d_in, d_sae], W_dec [d_sae, d_in],
    b_enc [d_sae], b_dec [d_in] for the standard SAE. When the directory is
    missing or incomplete and an interrupted save left a complete export beside it, the error names it and
    says how to recover it.
    """
    directory = Path(directory)
    cfg_path, weights_path = directory / CFG_FILENAME, directory / WEIGHTS_FILENAME
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: an SAE directory holds {CFG_FILENAME} and {WEIGHTS_FILENAME} "
                f"(a training run exports it to <run>/sae/).{recovery_advice(directory)}"
            )
    try:
        cfg = read_cfg(cfg_path)
        try:
            shapes = expected_shapes(cfg["d_in"], cfg["d_sae"], cfg.get("architecture", "standard"))
        except ValueError as err:
            raise ValueError(f"{directory}: {err}") from err
        inspect_safetensors(weights_path)
        try:
            tensors = load_file(str(weights_path), device=str(device) if device is not None else "cpu")
        except SafetensorError as err:
            raise ValueError(f"{weights_path} could not be read as safetensors: {err}") from err
    except ValueError as err:
        advice = recovery_advice(directory)
        if advice:
            raise ValueError(f"{err}{advice}") from err
        raise
    missing = [k for k in shapes if k not in tensors]
    if missing:
        raise KeyError(f"{weights_path} lacks {missing} (architecture {cfg.get('architecture', 'standard')!r}); "
                       f"found {sorted(tensors)}.")
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{weights_path}: {key} has shape {tuple(tensors[key].shape)}, cfg says {shape}.")
    tensors = {k: tensors[k] for k in shapes}
    if not allow_non_finite:
        check_finite(tensors, weights_path)
    return cfg, tensors


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def _recover_leftover(directory: Path) -> None:
    """Before writing: if `directory` is not a complete export but an interrupted save left one, put it back."""
    if export_problem(directory) is None:
        return
    leftovers = leftover_exports(directory)
    if not leftovers:
        return
    if directory.exists():
        shutil.rmtree(directory)  # incomplete: nothing in it can be loaded
    os.rename(leftovers[0], directory)
    fsync_dir(directory.parent)
    log.warning("Recovered the complete SAE export %s left by an interrupted save as %s.", leftovers[0], directory)


def _same_shapes(directory: Path, d_in: int, d_sae: int, architecture: str) -> bool:
    if export_problem(directory) is not None:
        return False
    cfg = read_cfg(directory / CFG_FILENAME)
    return (cfg["d_in"], cfg["d_sae"], cfg.get("architecture", "standard")) == (d_in, d_sae, architecture)


def _write_weights(tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    return lambda path: save_file(tensors, str(path), metadata=metadata)


def _write_text(text: str):
    return lambda path: path.write_text(text)


def _save_whole(directory: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], cfg_text: str) -> None:
    """Write a complete export into `<dir>.tmp/`, then swap it in atomically (or rename it, the first time)."""
    staging = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)  # incomplete (a complete one was recovered by _recover_leftover)
    swapped = False
    try:
        staging.mkdir()
        writers = {WEIGHTS_FILENAME: _write_weights(tensors, metadata), CFG_FILENAME: _write_text(cfg_text)}
        for name, write in writers.items():
            write(staging / name)
            make_readable(staging / name)
            fsync_file(staging / name)
        fsync_dir(staging)
        if not directory.exists():
            os.rename(staging, directory)
            swapped = True
        elif exchange_paths(staging, directory):  # one atomic step: <dir> new, <dir>.tmp the previous export
            swapped = True
        else:  # no atomic exchange here: two renames, a moment with only <dir>.old and <dir>.tmp (read_sae names them)
            old = directory.with_name(directory.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(directory, old)
            try:
                os.rename(staging, directory)
            except BaseException:
                os.rename(old, directory)
                raise
            swapped, staging = True, old
        fsync_dir(directory.parent)
    except BaseException:
        if not swapped:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)  # the previous export, now replaced


def save_sae(sae: "SparseAutoencoder", directory: str | Path, step: int | None = None) -> Path:
    """Write the SAE to `directory` so that a complete, loadable SAE is there at every moment.

    `step` (the training step) goes into the weights' safetensors metadata (`read_sae_step`). A failed write
    (full disk, ...) raises OSError with the checkpoint's advice and leaves the previous export as it was.
    """
    directory = Path(directory)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sae.export_tensors().items()}
    metadata = {"format_version": str(FORMAT_VERSION)}
    if step is not None:
        metadata["step"] = str(int(step))
    cfg_text = json.dumps(saelens_config(sae), indent=2, default=str)
    existed = directory.exists()
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        _recover_leftover(directory)
        # same shapes: weights first (new weights + old cfg still load)
        if _same_shapes(directory, sae.d_in, sae.d_sae, sae.architecture):
            replace_file(directory / WEIGHTS_FILENAME, _write_weights(tensors, metadata))
            replace_file(directory / CFG_FILENAME, _write_text(cfg_text))
        else:
            _save_whole(directory, tensors, metadata, cfg_text)
    except OSError as err:
        kept = "The previous export is intact" if existed else "Nothing half-written was left behind"
        message = write_failed_message("the SAE export", directory, err, kept)
        raise (OSError(err.errno, message) if err.errno is not None else OSError(message)) from err
    return directory
