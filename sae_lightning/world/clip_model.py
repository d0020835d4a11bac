"""The tiny CLIP's training: an open_clip model, open_clip's ClipLoss, a Lightning module and in-memory scenes."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import lightning as L
import numpy as np
import open_clip
import PIL.Image
import torch
from open_clip.loss import ClipLoss
from torch.utils.data import Dataset

from sae_lightning.world.scenes import caption as compose_caption
from sae_lightning.world.scenes import make_scene

log = logging.getLogger(__name__)


def render_scenes(rng: np.random.Generator, n: int, image_size: int) -> tuple[list[PIL.Image.Image], list[dict]]:
    """n (image, record) scenes from one random stream."""
    images, records = [], []
    for _ in range(n):
        image, record = make_scene(rng, image_size)
        images.append(image)
        records.append(record)
    return images, records


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
    """Trains an open_clip CLIP (built from a registered model config) with open_clip's ClipLoss.

    AdamW (no weight decay on gains, biases, embeddings and the temperature), linear warmup then cosine
    decay to zero over `max_steps`. Each step pairs every image with one of its captions at random.
    """

    def __init__(self, model_name: str, lr: float = 2e-3, weight_decay: float = 0.1, warmup_steps: int = 50,
                 max_steps: int = 1000, log_every_n_steps: int = 50) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._started = time.perf_counter()
        self.model = open_clip.create_model(model_name, pretrained=None)
        self.loss = ClipLoss()
        cfg = self.model.visual.preprocess_cfg
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])

    def clip_loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE of uint8 images [B, 3, H, W] against token ids [B, context_length]."""
        image_features = self.model.encode_image(normalise(images, self.mean, self.std), normalize=True)
        text_features = self.model.encode_text(tokens, normalize=True)
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
