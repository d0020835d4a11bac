"""The DataModule that turns image shards into SAE batches on the training device.

Workers decode and preprocess; the frozen backbone runs in `on_after_batch_transfer`, i.e. on the device
the batch landed on, only up to the hooked block; the selected tokens go through the on-device shuffle
buffer, and what comes out is an SAE batch `{"activations": [N, d]}`. While the buffer first fills the
batch is empty (the module skips it). The first full buffer is handed over once as `init_activations`, so
the module can initialise b_dec from it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Sequence

import torch
from lightning.pytorch import LightningDataModule

from sae_lightning.backbone import Backbone
from sae_lightning.data.buffer import ShuffleBuffer
from sae_lightning.data.shards import expand_shards, image_loader, load_classnames

log = logging.getLogger(__name__)

MIN_BUFFER_IMAGES = 1024  # below this many images' worth of tokens, the buffer mixes too little
AUTOCAST_DTYPES = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}

NO_SHARDS_MESSAGE = (
    "No training shards given. Point data.train_shards at webdataset shards, e.g.\n"
    "  python train.py 'data.train_shards=/data/imagenet/train-*.tar'\n"
    "  python train.py 'data.train_shards=\"/data/imagenet/train-{000000..001281}.tar\"'  (braces need the inner quotes)\n"
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
        out = self.buffer.push(activations)
        if out is None:
            return {"activations": activations.new_empty(0, activations.shape[-1])}
        batch = {"activations": out}
        if not self._init_sent:
            batch["init_activations"] = self.buffer.contents()
            self._init_sent = True
        return batch


class ImageActivationDataModule(ActivationStreamMixin, LightningDataModule):
    """Image shards -> frozen backbone at `layer` -> token selection -> shuffle buffer -> SAE batches."""

    def __init__(self, backbone: Backbone, train_shards: str | Sequence[str] | None,
                 val_shards: str | Sequence[str] | None = None, classnames: str | None = "imagenet",
                 layer: int = 22, tokens: str = "cls", sae_batch_size: int = 1024, buffer_size: int = 15360,
                 num_workers: int = 8, shuffle: int = 5000, shardshuffle: bool = True, resampled: bool = False,
                 autocast: str = "32", pin_memory: bool = True, seed: int = 0):
        super().__init__()
        if autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"data.autocast must be one of {list(AUTOCAST_DTYPES)}, got {autocast!r}")
        self.train_urls = require_train_shards(train_shards)
        self.val_shards = expand_shards(val_shards) if val_shards else None
        self.classnames = load_classnames(classnames, self.train_urls)
        self.backbone = backbone
        self.layer = backbone.resolve_layer(layer)
        self.tokens = tokens
        self.tokens_per_image = backbone.n_tokens_for(tokens)
        self.image_batch_size = math.ceil(sae_batch_size / self.tokens_per_image)
        self.num_workers, self.shuffle, self.shardshuffle = num_workers, shuffle, shardshuffle
        self.resampled, self.autocast, self.pin_memory, self.seed = resampled, autocast, pin_memory, seed
        self._init_stream(sae_batch_size, buffer_size, seed)
        if buffer_size / self.tokens_per_image < MIN_BUFFER_IMAGES:
            log.warning(
                "The shuffle buffer holds %d activations = the tokens of only %d images (tokens=%s): SAE batches "
                "will mix few images. Raise data.buffer_size (e.g. %d; %.1f GiB at d=%d).", buffer_size,
                buffer_size // self.tokens_per_image, tokens, MIN_BUFFER_IMAGES * self.tokens_per_image,
                MIN_BUFFER_IMAGES * self.tokens_per_image * backbone.width * 4 / 2**30, backbone.width)
        self.images_seen = 0
        self.samples_skipped = 0

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        # A new order per epoch and per resume point, still reproducible from `seed`.
        offset = 7919 * self.trainer.current_epoch + self.trainer.global_step if self.trainer is not None else 0
        return image_loader(
            self.train_urls, self.backbone.preprocess, self.image_batch_size, num_workers=self.num_workers,
            pin_memory=self.pin_memory, shuffle=self.shuffle, shardshuffle=self.shardshuffle,
            seed=self.seed + offset, resampled=self.resampled,
        )

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Count on the host (no device sync) and send only tensors to the device."""
        self.images_seen += len(batch["labels"])
        skipped = int(batch["n_skipped"])
        if skipped:
            self.samples_skipped += skipped
            log.warning("Skipped %d undecodable samples (%d in total so far).", skipped, self.samples_skipped)
        return {"images": batch["images"]}

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, torch.Tensor]:
        """Run the backbone where the batch landed and serve an SAE batch from the buffer."""
        images = batch["images"]
        if self.backbone.device != images.device:
            self.backbone.to(images.device)
        dtype = AUTOCAST_DTYPES[self.autocast]
        ctx = torch.autocast(images.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            acts = self.backbone.activations(images, self.layer, self.tokens)
        return self._serve(acts.reshape(-1, acts.shape[-1]).float())

    def state_dict(self) -> dict[str, int]:
        return {"images_seen": self.images_seen, "activations_seen": self.activations_seen,
                "samples_skipped": self.samples_skipped}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.images_seen = state_dict.get("images_seen", 0)
        self.activations_seen = state_dict.get("activations_seen", 0)
        self.samples_skipped = state_dict.get("samples_skipped", 0)
