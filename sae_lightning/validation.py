"""Config validation up front, in one place: every problem at once, each with what is allowed.

`validate_train_config` (train.py) and `validate_eval_config` (evaluate.py) run on the composed config before
anything is built, downloaded, written or deleted, and raise one ValueError listing every problem.
Only the values they check are resolved (the data shards' resolver, which writes the demo shards, is not run).
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

SCHEDULE_KEYS = ("lr_warmup", "lr_decay", "dead_feature_window", "feature_sampling_window", "checkpoint_every",
                 "contrastive_every")
MSE_KINDS = ("normalised", "plain")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: Any) -> str:
    return f"{value!r} (a {type(value).__name__})" if isinstance(value, str) else repr(value)


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    """`cfg.<dotted key>` resolved, or `default` when a part is absent or null."""
    value = OmegaConf.select(cfg, key, default=default, throw_on_missing=False)
    return default if value is None else value


class Problems:
    """Collects `name=value: what is allowed` lines; `raise_if_any` turns them into one ValueError."""

    def __init__(self, what: str):
        self.what, self.lines = what, []

    def add(self, key: str, value: Any, allowed: str) -> None:
        self.lines.append(f"{key}={_show(value)}: {allowed}")

    def int_at_least(self, key: str, value: Any, low: int, meaning: str = "") -> bool:
        if _is_int(value) and value >= low:
            return True
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        self.add(key, value, f"must be {kind}{meaning}")
        return False

    def raise_if_any(self) -> None:
        if self.lines:
            n = len(self.lines)
            raise ValueError(f"Invalid {self.what} ({n} problem{'s' if n > 1 else ''}), nothing was run:\n  - "
                             + "\n  - ".join(self.lines))


def _devices_count(devices: Any) -> int | None:
    """How many devices `trainer.devices` names; None for 'all'/'auto' (-1, "auto")."""
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        if text.lstrip("-").isdigit():
            devices = int(text)
        else:
            return None
    if _is_int(devices):
        return None if devices == -1 else devices
    return None


def is_multi_process(trainer: DictConfig | None) -> bool:
    """Does this trainer config start several processes (DDP on GPUs or CPUs, several nodes)?"""
    if trainer is None:
        return False
    strategy = trainer.get("strategy")
    strategy = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    if "ddp" in strategy.lower():
        return True
    num_nodes = trainer.get("num_nodes") or 1
    if _is_int(num_nodes) and num_nodes > 1:
        return True
    count = _devices_count(trainer.get("devices", 1))
    if count is None:  # every device: several only where several GPUs are visible
        if str(trainer.get("accelerator", "auto")) == "cpu":
            return False
        import torch

        return torch.cuda.device_count() > 1
    return count > 1


def _check_number(problems: Problems, key: str, value: Any, *, positive: bool) -> None:
    bound = "> 0" if positive else ">= 0"
    if not _is_number(value) or not math.isfinite(value) or (value <= 0 if positive else value < 0):
        problems.add(key, value, f"must be a finite number {bound}")


def validate_train_config(cfg: DictConfig) -> None:
    """ValueError listing every problem of a composed train.py config (conf/config.yaml), before any work.

    Works on image-shard runs (a `backbone`) and on stored/planted activations (`backbone: null`, where the
    `layer`/`tokens`/`data.resampled` rules do not apply).
    """
    p = Problems("training config")
    has_backbone = cfg.get("backbone") is not None

    if has_backbone:
        tokens = cfg.get("tokens")
        if tokens not in ("cls", "patches", "all"):
            p.add("tokens", tokens, "must be one of cls (the class token), patches (every patch token) or all "
                                    "(class + patches)")
        layer = cfg.get("layer")
        if not _is_int(layer):
            p.add("layer", layer, "must be an integer block index (negative counts from the end)")
        elif _get(cfg, "backbone.name"):
            from sae_lightning.backbone import check_layer

            try:
                check_layer(str(cfg.backbone.name), layer)
            except ValueError as err:
                p.lines.append(str(err))

    p.int_at_least("expansion", cfg.get("expansion"), 1, " (d_sae = expansion x d_model; e.g. 64)")
    _check_number(p, "l1_coefficient", cfg.get("l1_coefficient"), positive=False)
    _check_number(p, "lr", cfg.get("lr"), positive=True)
    batch_ok = p.int_at_least("sae_batch_size", cfg.get("sae_batch_size"), 1, " (activations per SAE step)")

    training_images, max_steps = cfg.get("training_images"), cfg.get("max_steps")
    if training_images is not None:
        p.int_at_least("training_images", training_images, 1, " (or null with max_steps set)")
    if max_steps is not None:
        p.int_at_least("max_steps", max_steps, 1, " (or null: the steps follow from training_images)")
    if training_images is None and max_steps is None:
        p.add("training_images", None, "set training_images (images to train on) or max_steps")

    buffer_size = _get(cfg, "data.buffer_size")
    if buffer_size is not None and p.int_at_least("data.buffer_size", buffer_size, 1, " (activations)") \
            and batch_ok and buffer_size < cfg.sae_batch_size:
        p.add("data.buffer_size", buffer_size, f"must be at least sae_batch_size={cfg.sae_batch_size}: the shuffle "
                                               f"buffer hands out whole SAE batches")

    schedule = cfg.get("schedule")
    if schedule is not None:
        for key in SCHEDULE_KEYS:
            if key in schedule:
                low = 0 if key in ("lr_warmup", "lr_decay") else 1
                p.int_at_least(f"schedule.{key}", schedule[key], low, " (counted in activations seen)")

    module = cfg.get("module")
    if module is not None:
        b_dec_init = module.get("b_dec_init", "geometric_median")
        if b_dec_init not in ("geometric_median", "mean", "none"):
            p.add("module.b_dec_init", b_dec_init, "must be one of geometric_median, mean, none")
        normalize = module.get("normalize_activations", "none")
        if normalize not in ("none", "expected_average_only_in"):
            p.add("module.normalize_activations", normalize, "must be none or expected_average_only_in")
    mse = _get(cfg, "sae.mse", "normalised")
    if mse not in MSE_KINDS:
        p.add("sae.mse", mse, f"must be one of {', '.join(MSE_KINDS)}")

    if has_backbone and is_multi_process(cfg.get("trainer")) and not _get(cfg, "data.resampled", False):
        p.add("data.resampled", _get(cfg, "data.resampled", False),
              "must be true with several processes (trainer=ddp, devices or num_nodes > 1): every rank then draws "
              "shards with replacement; without it ranks run out of shards at different times and the job aborts. "
              "Add data.resampled=true")
    chunk = _get(cfg, "data.chunk_size", None)
    if (not has_backbone and is_multi_process(cfg.get("trainer")) and chunk is not None
            and _is_int(chunk) and _is_int(cfg.get("sae_batch_size")) and chunk > cfg.get("sae_batch_size")):
        p.add("data.chunk_size", chunk, "must be at most sae_batch_size with several processes: larger chunks "
              "reach the ranks unevenly. Leave it null (= sae_batch_size)")
    if str(_get(cfg, "data._target_", "")).endswith(".CacheDataModule"):  # data=cache: the cache and the resume
        from sae_lightning.data.cache import cache_problems

        p.lines.extend(cache_problems(cfg))
    p.raise_if_any()


def validate_eval_config(cfg: DictConfig) -> None:
    """ValueError listing every problem of a composed evaluate.py config (conf/evaluate.yaml), before any work."""
    p = Problems("evaluation config")
    p.int_at_least("n_images", cfg.get("n_images"), 1, " (held-out images to stream)")
    p.int_at_least("batch_size", cfg.get("batch_size"), 1, " (images per batch)")
    p.int_at_least("top_k", cfg.get("top_k"), 1, " (top images kept per feature)")
    for key, low in (("max_tokens", 1), ("n_grid_features", 0), ("num_workers", 0)):
        if key in cfg and cfg.get(key) is not None:
            p.int_at_least(key, cfg.get(key), low)
    if cfg.get("explorer", False):
        p.int_at_least("n_game", cfg.get("n_game"), 8, " (the guessing game shows 8 candidates)")
    features = cfg.get("features")
    if features is not None and (not isinstance(features, (list, ListConfig))
                                 or not all(_is_int(f) and f >= 0 for f in features)):
        p.add("features", OmegaConf.to_container(features) if isinstance(features, ListConfig) else features,
              "must be a list of feature ids (integers >= 0), e.g. features=[12,345]")
    p.raise_if_any()
