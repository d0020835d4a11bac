"""The seed's SAE: untied ReLU encoder/decoder, L1 penalty, unit-norm decoder rows, ghost grads.

Every other architecture (topk.py, batchtopk.py, jumprelu.py, gated.py, matryoshka.py) subclasses it and
overrides only what differs: `encode_pre`/`encode`, `loss`, and for other tensors `export_tensors`,
`config_fields` and `from_config`. All keep the interface evaluation code uses: `encode(x)`, `decode(f)`,
`sae(x)`, `W_enc` [d_in, d_sae], `W_dec` [d_sae, d_in], `d_in`, `d_sae`, `metadata`, `save`, `load`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sae_lightning.sae import functional as F_sae
from sae_lightning.sae import io


@dataclass
class SAEOutput:
    """Everything one forward of the loss produces (all losses are scalars).

    `l1`: the sparsity term as logged (the L1 of the activations; JumpReLU's L0, Gated's gate L1), whether or
    not it is in `total`; `ghost`: the dead-feature (ghost grads, AuxK) or auxiliary (Gated) loss.
    `hidden_pre` [N, F]: the pre-activations the dead-feature loss reads.
    """

    total: torch.Tensor
    mse: torch.Tensor
    l1: torch.Tensor
    ghost: torch.Tensor
    feature_acts: torch.Tensor
    reconstruction: torch.Tensor
    hidden_pre: torch.Tensor


DECODER_NORMS = ("unit", "free")


class SparseAutoencoder(nn.Module):
    """f = ReLU((x - b_dec) W_enc + b_enc), x_hat = f W_dec + b_dec (SAELens's "standard" layout)."""

    architecture = "standard"  # the name cfg.json's `architecture` gets (SAELens's)

    def __init__(self, d_in: int, d_sae: int, *, l1_coefficient: float = 8e-5, mse: str = "normalised",
                 tied_init: bool = False, decoder_norm: str = "unit", metadata: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32):
        """`tied_init`: start the encoder as the decoder's transpose, W_enc = W_dec^T (unit-norm columns;
        Anthropic's April 2024 update, SAELens's default) instead of the seed's independent Kaiming-uniform
        encoder. Only the start differs; nothing is tied during training.

        `decoder_norm`: "unit" (the seed's: the training module renormalises every decoder row to norm 1
        before each step and removes the gradient parallel to it; the L1 is sum_i |f_i|) or "free"
        (Anthropic's April 2024 update, SAELens's standard SAE: the rows' norms are trained and the L1 is
        sum_i |f_i| ||W_dec[i]||, so shrinking f while growing the row buys nothing). Only the standard SAE
        takes it; the other architectures keep unit rows."""
        super().__init__()
        if mse not in ("normalised", "plain"):
            raise ValueError(f"mse must be 'normalised' or 'plain', got {mse!r}")
        if decoder_norm not in DECODER_NORMS:
            raise ValueError(f"decoder_norm must be one of {DECODER_NORMS}, got {decoder_norm!r}")
        self.d_in, self.d_sae = d_in, d_sae
        self.l1_coefficient = l1_coefficient
        self.mse_kind = mse
        self.decoder_norm = decoder_norm
        self.metadata = dict(metadata or {})
        self.W_enc = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(d_in, d_sae, dtype=dtype)))
        self.W_dec = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(d_sae, d_in, dtype=dtype)))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype))
        F_sae.normalise_decoder_rows(self.W_dec)
        if tied_init:
            with torch.no_grad():
                self.W_enc.copy_(self.W_dec.T)

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations (before ReLU) [..., F]; ghost grads need them."""
        return (x.to(self.W_enc.dtype) - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d] -> [..., F]."""
        return torch.relu(self.encode_pre(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction [..., F] -> [..., d]."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @property
    def unit_decoder_rows(self) -> bool:
        """Whether training keeps every decoder row at unit norm (the module renormalises and projects)."""
        return self.decoder_norm == "unit"

    def loss(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> SAEOutput:
        """mse + l1_coefficient * mean_b sum_i |f_bi| (times ||W_dec[i]|| with free decoder norms) + ghost (ghost
        only for dead features, else 0)."""
        x = x.to(self.W_enc.dtype)
        hidden_pre = self.encode_pre(x)
        feature_acts = torch.relu(hidden_pre)
        x_hat = self.decode(feature_acts)
        mse_elem = F_sae.mse_elementwise(x_hat, x, normalised=self.mse_kind == "normalised")
        mse = mse_elem.mean()
        if self.unit_decoder_rows:
            l1 = feature_acts.abs().sum(-1).mean()
        else:
            l1 = F_sae.decoder_weighted_l1(feature_acts, self.W_dec)
        if dead_mask is not None:  # dense: no host read of how many features are dead
            ghost = F_sae.ghost_grad_loss(x, x_hat, hidden_pre, self.W_dec, dead_mask, mse_elem)
        else:
            ghost = mse.new_zeros(())
        total = mse + self.l1_coefficient * l1 + ghost
        return SAEOutput(total, mse, l1, ghost, feature_acts, x_hat, hidden_pre)

    def config_fields(self) -> dict[str, Any]:
        """The architecture's own top-level cfg.json fields (its knobs)."""
        fields = {"l1_coefficient": self.l1_coefficient, "mse": self.mse_kind}
        if not self.unit_decoder_rows:  # written only when free: the seed's exports stay as they were
            fields["decoder_norm"] = self.decoder_norm
        return fields

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors written to sae_weights.safetensors, by SAELens name (io.TENSOR_SHAPES[architecture])."""
        return {k: getattr(self, k).detach() for k in io.tensor_shapes(self.architecture, 1, 1)}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "SparseAutoencoder":
        """The SAE a cfg.json and its tensors (io.read_sae) describe."""
        free = {"decoder_norm": cfg["decoder_norm"]} if "decoder_norm" in cfg else {}  # only the standard SAE's
        sae = cls(int(cfg["d_in"]), int(cfg["d_sae"]), l1_coefficient=float(cfg.get("l1_coefficient", 0.0)),
                  mse=cfg.get("mse", "normalised"), metadata=cfg.get("metadata", {}), dtype=tensors["W_enc"].dtype,
                  **free)
        sae.load_state_dict(tensors)
        return sae

    @torch.no_grad()
    def rescaled(self, scale: float, metadata: dict[str, Any] | None = None) -> "SparseAutoencoder":
        """A copy for raw activations x of this SAE trained on s*x: W_enc' = s W_enc, W_dec' = W_dec / s,
        b_dec' = b_dec / s. Then (x - b_dec') W_enc' = (s x - b_dec) W_enc, so every pre-activation (and with it
        every architecture's activations, thresholds, gates) is unchanged and x_hat' = x_hat / s.
        """
        sae = copy.deepcopy(self)
        sae.metadata.update(metadata or {})
        sae.W_enc.mul_(scale)
        sae.W_dec.div_(scale)
        sae.b_dec.div_(scale)
        return sae

    def config(self) -> dict[str, Any]:
        """The cfg.json contents (SAELens fields plus this project's metadata)."""
        return io.saelens_config(self)

    def save(self, directory: str | Path, step: int | None = None) -> Path:
        """Write `directory/cfg.json` and `sae_weights.safetensors` crash-safely (docs/format-sae.md).

        `step`: the training step, recorded in the weights file's header.
        """
        return io.save_sae(self, directory, step=step)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None) -> "SparseAutoencoder":
        """Load an SAE saved here or by SAELens, of any architecture listed in `sae_lightning.sae.ARCHITECTURES`
        (the class is chosen by cfg.json's `architecture`, whichever class this is called on)."""
        from sae_lightning.sae import ARCHITECTURES

        cfg, tensors = io.read_sae(directory, device=device)
        sae = ARCHITECTURES[cfg.get("architecture", "standard")].from_config(cfg, tensors)
        return sae.to(device) if device is not None else sae
