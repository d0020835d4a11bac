"""sae_lightning: sparse autoencoders on a frozen CLIP ViT's residual stream, with Lightning and Hydra."""

from sae_lightning.backbone import load_backbone
from sae_lightning.sae import SparseAutoencoder

__all__ = ["SparseAutoencoder", "load_backbone"]
__version__ = "0.1.0"
