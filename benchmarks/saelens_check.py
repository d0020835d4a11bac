"""Check that every architecture's export loads in SAELens with identical encode/decode (optional: needs
sae-lens, which the project does not depend on; run it from a separate environment that has both, e.g.
`python -m venv /tmp/sl && echo $PWD/.venv/lib/python3.11/site-packages > /tmp/sl/lib/python3.11/site-packages/p.pth
&& /tmp/sl/bin/pip install sae-lens && /tmp/sl/bin/python -m benchmarks.saelens_check`).

For each architecture an SAE with random, perturbed weights (BatchTopK: a threshold estimated on a few
batches) is exported here, loaded with `sae_lens.SAE.load_from_disk`, and both encode and decode the same
inputs; the maximum absolute differences are printed (0 means bit-identical).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from sae_lightning.sae import (
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    MatryoshkaBatchTopKSAE,
    SparseAutoencoder,
    TopKSAE,
)

CASES = {
    "standard": lambda: SparseAutoencoder(32, 128),
    "standard, decoder_norm=free": lambda: SparseAutoencoder(32, 128, decoder_norm="free"),
    "topk": lambda: TopKSAE(32, 128, k=8),
    "batchtopk": lambda: BatchTopKSAE(32, 128, k=8),
    "matryoshka_batchtopk": lambda: MatryoshkaBatchTopKSAE(32, 128, k=8),
    "jumprelu": lambda: JumpReLUSAE(32, 128, init_threshold=0.3),
    "gated": lambda: GatedSAE(32, 128),
    "gated, aux_trains_decoder (conf's default)": lambda: GatedSAE(32, 128, tied_init=True, aux_trains_decoder=True),
}


def main() -> None:
    import sae_lens
    from sae_lens import SAE

    print(f"sae-lens {sae_lens.__version__}, torch {torch.__version__}")
    print("architecture | saved as | SAELens class | max |encode diff| | max |decode diff| | l0 (ours)")
    torch.manual_seed(0)
    for name, make in CASES.items():
        sae = make()
        x = torch.randn(256, 32) + 0.5
        with torch.no_grad():
            for p in sae.parameters():
                p.add_(0.05 * torch.randn_like(p))
            if getattr(sae, "decoder_norm", "unit") == "free":
                sae.W_dec.mul_(torch.rand(sae.d_sae, 1) * 2)  # rows of any norm
        if isinstance(sae, BatchTopKSAE):
            for _ in range(5):
                sae.loss(x)
        with tempfile.TemporaryDirectory() as tmp:
            sae.save(Path(tmp) / "sae")
            theirs = SAE.load_from_disk(str(Path(tmp) / "sae"), device="cpu")
        with torch.no_grad():
            f_ours, f_theirs = sae.encode(x), theirs.encode(x)
            enc = (f_ours - f_theirs).abs().max().item()
            dec = (sae.decode(f_ours) - theirs.decode(f_ours)).abs().max().item()
        print(f"{name} | {sae.architecture} | {type(theirs).__name__} | {enc:.3g} | {dec:.3g} | "
              f"{(f_ours > 0).sum(-1).float().mean():.1f}")


if __name__ == "__main__":
    main()
