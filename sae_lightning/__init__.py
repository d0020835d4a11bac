"""sae_lightning: sparse autoencoders on a frozen CLIP ViT's residual stream, with Lightning and Hydra."""

from __future__ import annotations

__all__ = ["SparseAutoencoder", "load_backbone"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """Imported on first use, so `python -m sae_lightning.<tool>` does not pay for open_clip up front."""
    if name == "load_backbone":
        from sae_lightning.backbone import load_backbone

        return load_backbone
    if name == "SparseAutoencoder":
        from sae_lightning.sae import SparseAutoencoder

        return SparseAutoencoder
    raise AttributeError(f"module 'sae_lightning' has no attribute {name!r}")
