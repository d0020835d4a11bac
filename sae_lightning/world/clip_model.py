"""The tiny CLIP's training: an open_clip model, open_clip's ClipLoss, a Lightning module and in-memory scenes."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import open_clip
import PIL.Image
import torch
from open_clip.loss import ClipLoss, SigLipLoss
from torch.utils.data import Dataset, Sampler

from sae_lightning.world.scenes import (
    _RADIUS,
    COLOURS,
    COUNTS,
    EFFECTS,
    SHAPES,
    SIZES,
    _place,
    class_index,
    make_scene,
    render,
    sample_scene,
)
from sae_lightning.world.scenes import caption as compose_caption

log = logging.getLogger(__name__)


def render_scenes(rng: np.random.Generator, n: int, image_size: int) -> tuple[list[PIL.Image.Image], list[dict]]:
    """n (image, record) scenes from one random stream."""
    images, records = [], []
    for _ in range(n):
        image, record = make_scene(rng, image_size)
        images.append(image)
        records.append(record)
    return images, records


# The attribute each member of a hard-negative group changes, after the base scene (member 0).
PERTURBED = ("shape", "count", "effect", "colour")


def _derangement(values: Sequence[str], rng: np.random.Generator) -> dict[str, str]:
    """A random mapping of `values` onto themselves with no fixed point (distinct values stay distinct)."""
    while True:
        order = rng.permutation(len(values))
        if all(int(order[i]) != i for i in range(len(values))):
            return {v: values[int(order[i])] for i, v in enumerate(values)}


def _new_object(rng: np.random.Generator, colour: str, shape: str) -> dict[str, Any]:
    size = SIZES[rng.integers(len(SIZES))]
    rgb = np.clip(np.array(COLOURS[colour]) + rng.integers(-15, 16, size=3), 0, 255)
    return {"colour": colour, "shape": shape, "size": size, "radius": round(float(rng.uniform(*_RADIUS[size])), 4),
            "angle": round(float(rng.uniform(0, 360)), 2), "rgb": [int(c) for c in rgb]}


def perturb(record: dict[str, Any], attribute: str, rng: np.random.Generator) -> dict[str, Any]:
    """A copy of a scene record (no caption) that differs from it in exactly one attribute.

    "shape" / "colour": every object's shape (colour) moves to another one through a derangement, so
    "two red stars" becomes e.g. "two red rings" at the same positions on the same background; "count":
    objects are dropped, or copies of the main object's colour and shape are added (all re-placed);
    "effect": another image effect. The render seed is kept, so the background's pixels stay the same.
    """
    out = {**record, "objects": [dict(o) for o in record["objects"]]}
    out.pop("caption", None)
    objects = out["objects"]
    if attribute == "shape":
        mapping = _derangement(SHAPES, rng)
        for obj in objects:
            obj["shape"] = mapping[obj["shape"]]
    elif attribute == "colour":
        mapping = _derangement(list(COLOURS), rng)
        for obj in objects:
            jitter = np.array(obj["rgb"]) - np.array(COLOURS[obj["colour"]])
            obj["colour"] = mapping[obj["colour"]]
            obj["rgb"] = [int(c) for c in np.clip(np.array(COLOURS[obj["colour"]]) + jitter, 0, 255)]
    elif attribute == "count":
        count = int(rng.choice([c for c in COUNTS if c != record["count"]]))
        if count < len(objects):
            del objects[count:]
        else:
            main = objects[0]
            objects.extend(_new_object(rng, main["colour"], main["shape"]) for _ in range(count - len(objects)))
            objects.sort(key=lambda o: o["size"] != "large")
            for obj, (x, y) in zip(objects, _place(rng, [o["radius"] for o in objects]), strict=True):
                obj["x"], obj["y"] = round(x, 4), round(y, 4)
        out["count"] = count
    elif attribute == "effect":
        out["effect"] = str(rng.choice([e for e in EFFECTS if e != record["effect"]]))
    else:
        raise ValueError(f"attribute must be one of {PERTURBED}, got {attribute!r}")
    main = objects[0]
    out["label"], out["classname"] = class_index(main["colour"], main["shape"]), f"{main['colour']} {main['shape']}"
    return out


def simplify(record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """An easy version of a scene record (no caption): its main object alone, large, re-placed, no image effect."""
    main = dict(record["objects"][0], size="large", radius=round(float(rng.uniform(*_RADIUS["large"])), 4))
    (main["x"], main["y"]), = _place(rng, [main["radius"]])
    main["x"], main["y"] = round(main["x"], 4), round(main["y"], 4)
    out = {k: v for k, v in record.items() if k != "caption"}
    out.update(objects=[main], count=1, effect="none")
    return out


def render_hard_negative_scenes(rng: np.random.Generator, n: int, image_size: int, group_size: int,
                                easy_fraction: float = 0.0) -> tuple[list[PIL.Image.Image], list[dict]]:
    """n scenes in consecutive groups of `group_size`: a base scene, then variants that each change one
    attribute of it (PERTURBED, in order, cycling), so one group's captions differ only in shape, count,
    effect or colour. `group_size` 1: independent scenes. n must be a multiple of `group_size`.
    A fraction `easy_fraction` of the base scenes is simplified first (`simplify`: one large object, no effect).
    """
    if group_size < 1 or n % group_size:
        raise ValueError(f"n ({n}) must be a positive multiple of group_size ({group_size})")
    if not 0 <= easy_fraction <= 1:
        raise ValueError(f"easy_fraction must be in [0, 1], got {easy_fraction}")
    images, records = [], []
    for _ in range(n // group_size):
        base = sample_scene(rng)
        if easy_fraction and rng.random() < easy_fraction:
            base = simplify(base, rng)
        group = [base] + [perturb(base, PERTURBED[(k - 1) % len(PERTURBED)], rng) for k in range(1, group_size)]
        for record in group:
            record["caption"] = compose_caption(record, rng)
            record["image_size"] = image_size
            images.append(render(record, image_size))
            records.append(record)
    return images, records


class GroupBatchSampler(Sampler[list[int]]):
    """Batches of whole groups: indices [g * group_size, (g + 1) * group_size) stay in one batch.

    Groups are shuffled each epoch; batch_size must be a multiple of group_size; the last partial batch is dropped.
    """

    def __init__(self, n: int, group_size: int, batch_size: int, generator: torch.Generator) -> None:
        if batch_size % group_size or n % group_size or n < batch_size:
            raise ValueError(f"batch_size ({batch_size}) and n ({n}) must be multiples of group_size "
                             f"({group_size}), with n >= batch_size")
        self.n_groups, self.group_size, self.batch_size = n // group_size, group_size, batch_size
        self.generator = generator

    def __len__(self) -> int:
        return self.n_groups * self.group_size // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        groups_per_batch = self.batch_size // self.group_size
        order = torch.randperm(self.n_groups, generator=self.generator)
        for b in range(len(self)):
            chosen = order[b * groups_per_batch:(b + 1) * groups_per_batch]
            yield (chosen[:, None] * self.group_size + torch.arange(self.group_size)).flatten().tolist()


class CaptionedScenes(Dataset):
    """Scenes held in memory: uint8 images [N, 3, H, W] and `n_captions` tokenised captions per image.

    Each record gets its own caption plus `n_captions - 1` re-phrasings (other templates, same facts), so
    the text tower sees varied wording for the same attributes. Items: (image [3, H, W] uint8,
    tokens [n_captions, context_length] long).
    """

    def __init__(self, images: Sequence[PIL.Image.Image], records: Sequence[dict], tokenizer: Callable,
                 n_captions: int, seed: int) -> None:
        if len(images) != len(records) or not records:
            raise ValueError(f"need as many images as records (>0), got {len(images)} and {len(records)}")
        rng = np.random.default_rng(seed)
        self.images = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
        texts = [[r["caption"]] + [compose_caption(r, rng) for _ in range(n_captions - 1)] for r in records]
        flat = tokenizer([t for group in texts for t in group])
        self.tokens = flat.reshape(len(records), n_captions, -1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.tokens[index]


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [B, 3, H, W], scaled to 0..1 and normalised per channel."""
    mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean_t) / std_t


class TinyClipModule(L.LightningModule):
    """Trains an open_clip CLIP (built from a registered model config) with open_clip's ClipLoss (or SigLipLoss).

    AdamW (no weight decay on gains, biases, embeddings and the temperature), linear warmup then cosine
    decay to zero over `max_steps`. Each step pairs every image with one of its captions at random.
    """

    def __init__(self, model_name: str, lr: float = 2e-3, weight_decay: float = 0.1, warmup_steps: int = 50,
                 max_steps: int = 1000, log_every_n_steps: int = 50, loss: str = "clip") -> None:
        super().__init__()
        self.save_hyperparameters()
        self._started = time.perf_counter()
        self.model = open_clip.create_model(model_name, pretrained=None)
        if loss not in ("clip", "siglip"):
            raise ValueError(f"loss must be 'clip' or 'siglip', got {loss!r}")
        if loss == "siglip" and getattr(self.model, "logit_bias", None) is None:
            raise ValueError(f"loss 'siglip' needs a logit bias: add \"init_logit_bias\" to {model_name}'s config")
        self.loss = SigLipLoss() if loss == "siglip" else ClipLoss()
        cfg = self.model.visual.preprocess_cfg
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])

    def clip_loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE of uint8 images [B, 3, H, W] against token ids [B, context_length]."""
        image_features = self.model.encode_image(normalise(images, self.mean, self.std), normalize=True)
        text_features = self.model.encode_text(tokens, normalize=True)
        if isinstance(self.loss, SigLipLoss):
            return self.loss(image_features, text_features, self.model.logit_scale.exp(), self.model.logit_bias)
        return self.loss(image_features, text_features, self.model.logit_scale.exp())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, tokens = batch
        pick = torch.randint(tokens.shape[1], (tokens.shape[0],), device=tokens.device)
        loss = self.clip_loss(images, tokens[torch.arange(tokens.shape[0], device=tokens.device), pick])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", self.model.logit_scale.exp())
        step = self.global_step + 1
        if step % self.hparams.log_every_n_steps == 0 or step == self.hparams.max_steps:
            log.info("tiny CLIP step %d/%d: loss %.3f, %.0f s", step, self.hparams.max_steps, loss.item(),
                     time.perf_counter() - self._started)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():  # as in CLIP: the temperature never exceeds 100
            self.model.logit_scale.clamp_(0, math.log(100))

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            skip = param.ndim < 2 or "embedding" in name or "logit_scale" in name or "ln" in name
            (no_decay if skip else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=(0.9, 0.98), eps=1e-6,
        )
        warmup, total = self.hparams.warmup_steps, max(self.hparams.max_steps, 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
