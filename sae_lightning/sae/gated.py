"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders"):
a gate decides which features fire, a magnitude path (the same encoder directions, rescaled per feature by
exp(r_mag)) how strongly, so the L1 penalty on the gate no longer shrinks the magnitudes.

Saved as SAELens's "gated": W_enc, W_dec, b_dec, b_gate, b_mag, r_mag (no b_enc).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sae_lightning.sae import functional as F_sae
from sae_lightning.sae.standard import SAEOutput, SparseAutoencoder


class GatedSAE(SparseAutoencoder):
    """x_c = x - b_dec; pi_gate = x_c W_enc + b_gate; pi_mag = x_c (W_enc * exp(r_mag)) + b_mag;
    f = 1[pi_gate > 0] * ReLU(pi_mag); x_hat = f W_dec + b_dec.

    Loss (paper eq. 6-8): mse(x_hat, x) + l1_coefficient * mean_n sum_i ReLU(pi_gate)_ni ||W_dec[i]||
    + mse(ReLU(pi_gate) sg(W_dec) + sg(b_dec), x) (the auxiliary reconstruction through frozen decoder copies,
    which trains the gate). `hidden_pre` in the output is pi_mag.

    `aux_trains_decoder=True` drops the stop-gradients (SAELens's GatedTrainingSAE: its auxiliary
    reconstruction ReLU(pi_gate) W_dec + b_dec also trains W_dec and b_dec); the default False is the paper's.
    """

    architecture = "gated"

    def __init__(self, d_in: int, d_sae: int, *, l1_coefficient: float = 8e-5, mse: str = "normalised",
                 tied_init: bool = False, aux_trains_decoder: bool = False, metadata: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32):
        """`tied_init`: start W_enc as W_dec^T (SAELens's initialisation), as for the standard SAE.
        `aux_trains_decoder`: let the auxiliary gate reconstruction's gradient reach W_dec and b_dec (SAELens)
        instead of stopping it there (the paper)."""
        if not isinstance(aux_trains_decoder, bool):
            raise ValueError(f"aux_trains_decoder must be true or false, got {aux_trains_decoder!r}")
        super().__init__(d_in, d_sae, l1_coefficient=l1_coefficient, mse=mse, tied_init=tied_init, metadata=metadata,
                         dtype=dtype)
        self.aux_trains_decoder = aux_trains_decoder
        del self.b_enc  # the gated encoder has b_gate and b_mag instead
        self.b_gate = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.b_mag = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.r_mag = nn.Parameter(torch.zeros(d_sae, dtype=dtype))

    def gate_pre(self, x: torch.Tensor) -> torch.Tensor:
        """pi_gate [..., F]."""
        return (x.to(self.W_enc.dtype) - self.b_dec) @ self.W_enc + self.b_gate

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """pi_mag [..., F], the magnitude path's pre-activations."""
        return (x.to(self.W_enc.dtype) - self.b_dec) @ (self.W_enc * self.r_mag.exp()) + self.b_mag

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d] -> [..., F]."""
        return (self.gate_pre(x) > 0).to(self.W_enc.dtype) * torch.relu(self.encode_pre(x))

    def loss(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> SAEOutput:
        """mse + l1 (on the gate, weighted by decoder norms) + auxiliary gate reconstruction (in `ghost`)."""
        x = x.to(self.W_enc.dtype)
        pi_gate = self.gate_pre(x)
        pi_mag = self.encode_pre(x)
        feature_acts = (pi_gate > 0).to(x.dtype) * torch.relu(pi_mag)
        x_hat = self.decode(feature_acts)
        normalised = self.mse_kind == "normalised"
        mse = F_sae.mse_elementwise(x_hat, x, normalised=normalised).mean()
        gate = torch.relu(pi_gate)
        l1 = F_sae.decoder_weighted_l1(gate, self.W_dec)  # gate >= 0: sum_i gate_i ||W_dec[i]||, batch mean
        if self.aux_trains_decoder:
            via_gate = gate @ self.W_dec + self.b_dec
        else:
            via_gate = gate @ self.W_dec.detach() + self.b_dec.detach()
        aux = F_sae.mse_elementwise(via_gate, x, normalised=normalised).mean()
        return SAEOutput(mse + self.l1_coefficient * l1 + aux, mse, l1, aux, feature_acts, x_hat, pi_mag)

    def config_fields(self) -> dict[str, Any]:
        """The base fields, plus `aux_trains_decoder` when true (the paper's default keeps exports as they were)."""
        fields = super().config_fields()
        if self.aux_trains_decoder:
            fields["aux_trains_decoder"] = True
        return fields

    @classmethod
    def from_config(cls, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "GatedSAE":
        """The gated SAE a cfg.json and its tensors describe (`aux_trains_decoder` only matters for training)."""
        sae = cls(int(cfg["d_in"]), int(cfg["d_sae"]), l1_coefficient=float(cfg.get("l1_coefficient", 0.0)),
                  mse=cfg.get("mse", "normalised"), aux_trains_decoder=bool(cfg.get("aux_trains_decoder", False)),
                  metadata=cfg.get("metadata", {}), dtype=tensors["W_enc"].dtype)
        sae.load_state_dict(tensors)
        return sae
