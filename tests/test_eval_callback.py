"""ContrastiveEvalCallback inside a real (tiny) Lightning fit."""

import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from sae_lightning.backbone import load_tiny_backbone
from sae_lightning.data.shards import expand_shards
from sae_lightning.data.synthetic import DEMO_CLASSNAMES
from sae_lightning.evaluation import ContrastiveEvalCallback, evaluate_batch
from sae_lightning.evaluation.contrastive import class_text_features
from sae_lightning.sae import SparseAutoencoder


class ListLogger(Logger):
    def __init__(self):
        super().__init__()
        self.records: list[tuple[int, dict]] = []

    name, version = "list", 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))


class TinyModule(L.LightningModule):
    def __init__(self, d_in: int):
        super().__init__()
        self.sae = SparseAutoencoder(d_in, 2 * d_in)

    def training_step(self, batch, batch_idx):
        return self.sae.loss(batch).total

    def configure_optimizers(self):
        return torch.optim.Adam(self.sae.parameters(), lr=1e-2)


class TinyData(L.LightningDataModule):
    def __init__(self, backbone, val_shards, classnames):
        super().__init__()
        self.backbone, self.layer, self.tokens = backbone, 2, "cls"
        self.val_shards, self.classnames, self.image_batch_size = val_shards, classnames, 4

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, self.backbone.width), batch_size=8)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return load_tiny_backbone(tmp_path_factory.mktemp("tiny") / "tiny.pt")


def _fit(backbone, val_shards, classnames, callback):
    logger = ListLogger()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=logger, callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1)
    module = TinyModule(backbone.width)
    trainer.fit(module, datamodule=TinyData(backbone, val_shards, classnames))
    return module, logger


def test_logs_the_three_losses_every_n_steps(backbone, tiny_shards):
    val = expand_shards(tiny_shards[1])
    callback = ContrastiveEvalCallback(every_n_steps=2, n_images=8, batch_size=4)
    module, logger = _fit(backbone, val, DEMO_CLASSNAMES, callback)
    records = [(s, m) for s, m in logger.records if any(k.startswith("contrastive/") for k in m)]
    assert [s for s, _ in records] == [2, 4]
    first, last = records[0][1], dict(records[-1][1])
    # the frozen model's losses are constants: logged once, with the batch size they depend on
    assert set(first) == {"contrastive/loss_original", "contrastive/loss_sae", "contrastive/loss_ablated",
                          "contrastive/score", "contrastive/zero_shot_original", "contrastive/zero_shot_sae",
                          "contrastive/zero_shot_ablated", "contrastive/zero_shot_kl_sae",
                          "contrastive/zero_shot_kl_ablated", "contrastive/batch_size", "contrastive/n_images"}
    assert first["contrastive/batch_size"] == 4 and first["contrastive/n_images"] == 8
    assert set(last) == {"contrastive/loss_sae", "contrastive/score", "contrastive/zero_shot_sae",
                         "contrastive/zero_shot_kl_sae"}
    last |= {k: v for k, v in first.items() if k.endswith(("_original", "_ablated"))}
    # the cached original/ablated branches equal a from-scratch evaluation of the final SAE
    images, labels = callback._held_out_batch(val)
    text = class_text_features(backbone, DEMO_CLASSNAMES)
    scale = backbone.logit_scale()
    parts = [evaluate_batch(backbone, module.sae, images[i : i + 4], labels[i : i + 4], 2, "cls", text, scale)
             for i in (0, 4)]
    for way in ("original", "sae", "ablated"):
        expected = sum(p[f"contrastive_loss_{way}"] for p in parts) / 2
        assert last[f"contrastive/loss_{way}"] == pytest.approx(expected, rel=1e-5)
    assert module.sae.training  # eval mode was restored


def test_skips_with_a_warning_without_val_shards(backbone, caplog):
    callback = ContrastiveEvalCallback(every_n_steps=1)
    with caplog.at_level(logging.WARNING):
        _, logger = _fit(backbone, None, DEMO_CLASSNAMES, callback)
    assert "no data.val_shards" in caplog.text
    assert not any(k.startswith("contrastive/") for _, m in logger.records for k in m)
