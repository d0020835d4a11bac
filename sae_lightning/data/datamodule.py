"""The DataModule that turns image shards into SAE batches on the training device.

Workers decode, resize and crop, and send uint8 images [B, 3, H, W] (a quarter of fp32's bytes); the
frozen backbone normalises them and runs in `on_after_batch_transfer`, i.e. on the device the batch landed
on, only up to the hooked block; the selected tokens go through the on-device shuffle buffer, and what comes
out is an SAE batch `{"activations": [N, d]}`. While the buffer first fills the batch is empty (the module
skips it). The first full buffer is handed over once as `init_activations`, so the module can initialise
b_dec from it.

Whole images only: workers size their batches with a `TokenPacer` (tokens per image vs `sae_batch_size`),
and the buffer keeps every surplus token for the next batch, so `images_seen` and `activations_seen` are
exact and `training_images` is not overshot, whatever the tokens per image (257 tokens with batches of 128
included).

Bad data cannot loop forever: a pass over the shards that yields no image stops the run with an error
naming the shards, and so does a skip rate above `max_skip_fraction` over `skip_window` samples. The shards
fully consumed in the current pass are part of `state_dict`, and a resumed run skips them
(docs/format-shards.md, "Resuming mid-pass").
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule

from sae_lightning.backbone import Backbone, check_tokens
from sae_lightning.data.buffer import ShuffleBuffer
from sae_lightning.data.shards import RateLimitedWarning, expand_shards, image_loader, load_classnames

log = logging.getLogger(__name__)

MIN_BUFFER_IMAGES = 1024  # below this many images' worth of tokens, the buffer mixes too little
AUTOCAST_DTYPES = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
DATA_POSITION_VERSION = 1
_SHOWN_SHARDS = 5


def _some(names: Sequence[str] | set[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:_SHOWN_SHARDS]) + (f", ... ({len(names)} in all)" if len(names) > _SHOWN_SHARDS else "")

NO_SHARDS_MESSAGE = (
    "No training shards given. Point data.train_shards at webdataset shards, e.g.\n"
    "  python train.py 'data.train_shards=/data/imagenet/train-*.tar'\n"
    "  python train.py 'data.train_shards=\"/data/imagenet/train-{000000..001281}.tar\"'\n"
    "  (brace patterns need the inner quotes)\n"
    "or export SAE_TRAIN_SHARDS='/data/imagenet/train-*.tar'; convert an ImageFolder tree with\n"
    "  python -m sae_lightning.data.make_shards --root /data/imagenet/train --out /data/imagenet-shards\n"
    "or try everything offline first with `make demo` (python train.py experiment=demo)."
)


def require_train_shards(train_shards: str | Sequence[str] | None) -> list[str]:
    """The expanded shard list, or an error that says how to point at shards."""
    if not train_shards:
        raise ValueError(NO_SHARDS_MESSAGE)
    return expand_shards(train_shards)


class ActivationStreamMixin:
    """Shared by every DataModule that serves SAE batches: the buffer and the batch contract."""

    def _init_stream(self, sae_batch_size: int, buffer_size: int, seed: int) -> None:
        self.sae_batch_size = sae_batch_size
        self.buffer = ShuffleBuffer(buffer_size, sae_batch_size, seed=seed)
        self.activations_seen = 0
        self._init_sent = False

    def _serve(self, activations: torch.Tensor) -> dict[str, torch.Tensor]:
        """Push [M, d] activations through the buffer and build the module's batch."""
        self.activations_seen += activations.shape[0]
        out = self.buffer.push(activations)  # [0, d] pushes serve from the surplus kept in the buffer
        if out is None:
            return {"activations": activations.new_empty(0, activations.shape[-1])}
        batch = {"activations": out}
        if not self._init_sent:
            batch["init_activations"] = self.buffer.contents()
            self._init_sent = True
        return batch


class _PassStream:
    """The train loader seen by Lightning: one iteration = one pass; a pass without a single image is an error.

    Counting happens here, in the main process, as batches leave the DataLoader (the shards' own
    `end_of_pass` records arrive even when every sample was bad), so the check cannot be fooled by Lightning
    fetching one batch ahead.
    """

    def __init__(self, datamodule: "ImageActivationDataModule", loader: torch.utils.data.DataLoader):
        self.datamodule, self.loader = datamodule, loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.datamodule._start_pass()
        images, skipped, empty = 0, 0, set()
        for batch in self.loader:
            images += len(batch["labels"])
            skipped += int(batch["n_skipped"])
            empty.update(batch.get("shards_empty", ()))
            yield batch
        if images == 0:
            raise RuntimeError(self.datamodule._empty_pass_message(skipped, empty))


class ImageActivationDataModule(ActivationStreamMixin, LightningDataModule):
    """Image shards -> frozen backbone at `layer` -> token selection -> shuffle buffer -> SAE batches.

    `max_skip_fraction` / `skip_window`: the run stops when more than that fraction of `skip_window`
    consecutive samples were undecodable (a stream of bad data, not an occasional bad file).
    """

    def __init__(self, backbone: Backbone, train_shards: str | Sequence[str] | None,
                 val_shards: str | Sequence[str] | None = None, classnames: str | None = "imagenet",
                 layer: int = 22, tokens: str = "cls", sae_batch_size: int = 1024, buffer_size: int = 15360,
                 num_workers: int = 8, shuffle: int = 5000, shardshuffle: bool = True, resampled: bool = False,
                 autocast: str = "32", pin_memory: bool = True, seed: int = 0, max_skip_fraction: float = 0.5,
                 skip_window: int = 5000):
        super().__init__()
        check_tokens(tokens)
        if autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"data.autocast must be one of {list(AUTOCAST_DTYPES)}, got {autocast!r}")
        if not 0.0 < max_skip_fraction <= 1.0 or skip_window <= 0:
            raise ValueError(f"max_skip_fraction ({max_skip_fraction}) must be in (0, 1] and skip_window "
                             f"({skip_window}) positive.")
        self.train_urls = require_train_shards(train_shards)
        self.val_shards = expand_shards(val_shards) if val_shards else None
        self.classnames = load_classnames(classnames, self.train_urls)
        self.backbone = backbone
        self.layer = backbone.resolve_layer(layer)
        self.tokens = tokens
        self.tokens_per_image = backbone.n_tokens_for(tokens)
        self.image_batch_size = math.ceil(sae_batch_size / self.tokens_per_image)  # on average; whole images
        self.num_workers, self.shuffle, self.shardshuffle = num_workers, shuffle, shardshuffle
        self.resampled, self.autocast, self.pin_memory, self.seed = resampled, autocast, pin_memory, seed
        self.max_skip_fraction, self.skip_window = max_skip_fraction, skip_window
        self._init_stream(sae_batch_size, buffer_size, seed)
        if buffer_size / self.tokens_per_image < MIN_BUFFER_IMAGES:
            log.warning(
                "The shuffle buffer holds %d activations = the tokens of only %d images (tokens=%s): SAE batches "
                "will mix few images. Raise data.buffer_size (e.g. %d; %.1f GiB at d=%d).", buffer_size,
                buffer_size // self.tokens_per_image, tokens, MIN_BUFFER_IMAGES * self.tokens_per_image,
                MIN_BUFFER_IMAGES * self.tokens_per_image * backbone.width * 4 / 2**30, backbone.width)
        self.images_seen = 0
        self.samples_skipped = 0
        self._skip_warnings = RateLimitedWarning(log, "undecodable-sample")
        self._window_samples, self._window_skipped, self._window_shards = 0, 0, set()
        self._consumed: dict[str, list[str]] = {}  # "rank{r}/worker{w}" -> shards fully consumed this pass
        self._in_flight: dict[str, set[str]] = {}  # shard url -> keys delivered from it, while it is not done
        self._resume_consumed: dict[str, list[str]] | None = None  # loaded from a checkpoint, for the next pass
        self._resume_in_flight: dict[str, set[str]] = {}

    def shards_to_skip(self) -> set[str]:
        """Shards consumed in the current pass before the checkpoint this run resumed from (empty: none)."""
        if self.resampled or not self._resume_consumed:
            return set()
        skip = {s for shards in self._resume_consumed.values() for s in shards} & set(self.train_urls)
        return skip if len(skip) < len(self.train_urls) else set()  # all consumed: the pass was over

    def train_dataloader(self) -> _PassStream:
        # A new order per epoch and per resume point, still reproducible from `seed`.
        offset = 7919 * self.trainer.current_epoch + self.trainer.global_step if self.trainer is not None else 0
        skip = self.shards_to_skip()
        skip_samples = self.samples_to_skip()
        if skip or skip_samples:
            log.info("Resuming mid-pass: skipping %d of %d training shards consumed before the checkpoint, and "
                     "%d samples already delivered from %d shards then in flight.", len(skip), len(self.train_urls),
                     sum(map(len, skip_samples.values())), len(skip_samples))
        loader = image_loader(
            self.train_urls, self.backbone.pixel_transform, self.image_batch_size, num_workers=self.num_workers,
            pin_memory=self.pin_memory, shuffle=self.shuffle, shardshuffle=self.shardshuffle,
            seed=self.seed + offset, resampled=self.resampled, track=True,
            pace=(self.tokens_per_image, self.sae_batch_size), skip_shards=skip, skip_samples=skip_samples,
            # each worker's last, smaller batch of a pass is kept: the buffer serves SAE batches whatever the
            # image batch sizes, and dropping it lost up to a batch per worker per pass (every image, when a
            # worker's share of the shards is under one batch: e.g. 2,048 images over 8 workers at batch 1,024)
            partial=True,
        )
        return _PassStream(self, loader)

    def samples_to_skip(self) -> dict[str, set[str]]:
        """{shard url: keys} delivered before the checkpoint from shards not finished then (empty: none)."""
        if self.resampled:
            return {}
        urls = set(self.train_urls) - self.shards_to_skip()
        return {url: set(keys) for url, keys in self._resume_in_flight.items() if url in urls and keys}

    def _start_pass(self) -> None:
        resumed = bool(self.shards_to_skip() or self.samples_to_skip())
        self._consumed = {k: list(v) for k, v in (self._resume_consumed or {}).items()} if resumed else {}
        self._in_flight = self.samples_to_skip() if resumed else {}
        self._resume_consumed, self._resume_in_flight = None, {}

    def _empty_pass_message(self, skipped: int, empty: set[str]) -> str:
        problems = [f"{skipped} sample(s) could not be decoded"] if skipped else []
        if empty:
            problems.append(f"{len(empty)} shard(s) were empty or unreadable ({_some(empty)})")
        detail = "; ".join(problems) or "the shards held no samples"
        return (
            f"A full pass over the {len(self.train_urls)} training shard(s) ({_some(self.train_urls)}) yielded no "
            f"image: {detail}. Training would loop over empty epochs forever. Check data.train_shards: shards "
            f"must be tar files of <key>.jpg/.png/.webp samples (docs/format-shards.md)."
        )

    def _check_skip_rate(self, n_images: int, skipped: int, shards: list[str]) -> None:
        self._window_samples += n_images + skipped
        self._window_skipped += skipped
        self._window_shards.update(shards)
        if self._window_samples < self.skip_window:
            return
        fraction = self._window_skipped / self._window_samples
        if fraction > self.max_skip_fraction:
            raise RuntimeError(
                f"{self._window_skipped} of the last {self._window_samples} samples ({fraction:.0%}) could not be "
                f"decoded, above data.max_skip_fraction={self.max_skip_fraction}. The bad samples came from "
                f"{_some(self._window_shards)}. Fix or remove those shards (or raise data.max_skip_fraction)."
            )
        self._window_samples, self._window_skipped, self._window_shards = 0, 0, set()

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Count on the host (no device sync), record finished shards, send only the images to the device."""
        n_images = len(batch["labels"])
        self.images_seen += n_images
        skipped = int(batch["n_skipped"])
        if skipped:
            self.samples_skipped += skipped
            self._skip_warnings.warn("Skipped %d undecodable samples (%d in total so far).", skipped,
                                     self.samples_skipped)
        self._check_skip_rate(n_images, skipped, batch.get("skipped_shards", []))
        for url, key in batch.get("delivered", ()):
            self._in_flight.setdefault(url, set()).add(key)
        if batch.get("shards_done"):
            rank, worker = batch.get("worker", (0, 0))
            self._consumed.setdefault(f"rank{rank}/worker{worker}", []).extend(batch["shards_done"])
            for url in batch["shards_done"]:
                self._in_flight.pop(url, None)
        return {"images": batch["images"]}

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, torch.Tensor]:
        """Run the backbone where the batch landed and serve an SAE batch from the buffer."""
        images = batch["images"]
        if images.shape[0] == 0:  # a paced batch without images: serve from the buffer's surplus
            return self._serve(torch.empty(0, self.backbone.width, device=images.device))
        if self.backbone.device != images.device:
            self.backbone.to(images.device)
        dtype = AUTOCAST_DTYPES[self.autocast]
        ctx = torch.autocast(images.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            acts = self.backbone.activations(images, self.layer, self.tokens)
        return self._serve(acts.reshape(-1, acts.shape[-1]).float())

    def _gathered_position(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """Every rank's (consumed shards, in-flight delivered keys): an all-gather under DDP (every rank calls
        state_dict when a checkpoint is saved)."""
        consumed = {k: sorted(set(v)) for k, v in self._consumed.items()}
        in_flight = {url: sorted(keys) for url, keys in self._in_flight.items() if keys}
        if (self.trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_available()
                and torch.distributed.is_initialized()):
            gathered: list[tuple | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (consumed, in_flight))
            consumed = {k: v for part in gathered for k, v in (part[0] if part else {}).items()}
            in_flight = {k: v for part in gathered for k, v in (part[1] if part else {}).items()}
        return consumed, in_flight

    def state_dict(self) -> dict[str, Any]:
        consumed, in_flight = ({}, {}) if self.resampled else self._gathered_position()
        return {"images_seen": self.images_seen, "activations_seen": self.activations_seen,
                "samples_skipped": self.samples_skipped,
                "data_position": {"version": DATA_POSITION_VERSION, "resampled": self.resampled,
                                  "consumed": consumed, "in_flight": in_flight}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.images_seen = state_dict.get("images_seen", 0)
        self.activations_seen = state_dict.get("activations_seen", 0)
        self.samples_skipped = state_dict.get("samples_skipped", 0)
        position = state_dict.get("data_position") or {}
        if position and position.get("version") != DATA_POSITION_VERSION:
            raise ValueError(f"checkpoint data_position version {position.get('version')} is not "
                             f"{DATA_POSITION_VERSION}: written by another version of sae_lightning.")
        self._resume_consumed = {k: list(v) for k, v in (position.get("consumed") or {}).items()}
        self._resume_in_flight = {k: set(v) for k, v in (position.get("in_flight") or {}).items()}
