"""Data: webdataset shards, the image->activation DataModule, the shuffle buffer, demo shard tools."""

from sae_lightning.data.buffer import ShuffleBuffer
from sae_lightning.data.datamodule import ImageActivationDataModule

__all__ = ["ImageActivationDataModule", "ShuffleBuffer"]
