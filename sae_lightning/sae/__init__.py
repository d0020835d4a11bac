"""Sparse autoencoders: one architecture per file, shared math in `functional`, disk format in `io`.

`ARCHITECTURES` maps cfg.json's `architecture` (SAELens's names) to the class that loads it;
`SparseAutoencoder.load(dir)` dispatches on it. BatchTopK and Matryoshka BatchTopK SAEs are saved as
"jumprelu" (their inference form, as SAELens saves them), so they load back as JumpReLUSAE.
"""

from sae_lightning.sae.batchtopk import BatchTopKSAE
from sae_lightning.sae.gated import GatedSAE
from sae_lightning.sae.jumprelu import JumpReLUSAE
from sae_lightning.sae.matryoshka import MatryoshkaBatchTopKSAE
from sae_lightning.sae.standard import SAEOutput, SparseAutoencoder
from sae_lightning.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    "standard": SparseAutoencoder,
    "topk": TopKSAE,
    "jumprelu": JumpReLUSAE,
    "gated": GatedSAE,
}

# `sae=<name>` (conf/sae/<name>.yaml): what trains, by name
TRAINING_ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    "standard": SparseAutoencoder,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
    "gated": GatedSAE,
    "matryoshka_batchtopk": MatryoshkaBatchTopKSAE,
}

__all__ = ["ARCHITECTURES", "TRAINING_ARCHITECTURES", "BatchTopKSAE", "GatedSAE", "JumpReLUSAE",
           "MatryoshkaBatchTopKSAE", "SAEOutput", "SparseAutoencoder", "TopKSAE"]
