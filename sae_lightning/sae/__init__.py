"""Sparse autoencoders: one architecture per file, shared math in `functional`, disk format in `io`."""

from sae_lightning.sae.standard import SAEOutput, SparseAutoencoder

__all__ = ["SAEOutput", "SparseAutoencoder"]
