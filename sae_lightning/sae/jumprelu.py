"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU
Sparse Autoencoders"): f = z H(z - theta) with a learned per-feature threshold theta, trained with an L0
penalty through straight-through estimators (`functional.JumpReLUFunction`, `functional.StepFunction`).

Trained as log(theta) (theta stays positive); saved as SAELens's "jumprelu" with `threshold` = theta [d_sae].
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sae_lightning.sae import functional as F_sae
from sae_lightning.sae.standard import SAEOutput, SparseAutoencoder


class JumpReLUSAE(SparseAutoencoder):
    """f = ReLU(z) * (z > theta), z = (x - b_dec) W_enc + b_enc; x_hat = f W_dec + b_dec.

    Loss: mse + l0_coefficient * mean_n sum_i H(z_ni - theta_i). `bandwidth`: the rectangle kernel's width eps
    in the pseudo-derivatives (paper: 0.001 with inputs of mean squared norm 1); `init_threshold`: theta at
    the start. theta is `log_threshold.exp()` [F].
    """

    architecture = "jumprelu"

    def __init__(self, d_in: int, d_sae: int, *, l0_coefficient: float = 1e-3, bandwidth: float = 1e-3,
                 init_threshold: float = 1e-3, mse: str = "plain", tied_init: bool = False,
                 metadata: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32):
        """`tied_init`: start W_enc as W_dec^T (SAELens's initialisation), as for the standard SAE."""
        super().__init__(d_in, d_sae, l1_coefficient=0.0, mse=mse, tied_init=tied_init, metadata=metadata, dtype=dtype)
        if bandwidth <= 0 or init_threshold <= 0:
            raise ValueError(f"bandwidth and init_threshold must be positive, got {bandwidth} and {init_threshold}")
        self.l0_coefficient, self.bandwidth = float(l0_coefficient), float(bandwidth)
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(init_threshold), dtype=dtype))

    @property
    def threshold(self) -> torch.Tensor:
        """theta [F] (> 0)."""
        return self.log_threshold.exp()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d] -> [..., F] (SAELens's inference JumpReLU)."""
        return F_sae.jumprelu_inference(self.encode_pre(x), self.threshold)

    def loss(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> SAEOutput:
        """mse + l0_coefficient * L0 (the `l1` field holds the L0); no dead-feature loss (`ghost` is 0)."""
        x = x.to(self.W_enc.dtype)
        hidden_pre = self.encode_pre(x)
        theta = self.threshold
        feature_acts = F_sae.jumprelu(hidden_pre, theta, self.bandwidth)
        x_hat = self.decode(feature_acts)
        mse = F_sae.mse_elementwise(x_hat, x, normalised=self.mse_kind == "normalised").mean()
        l0 = F_sae.step(hidden_pre, theta, self.bandwidth).sum(-1).mean()
        return SAEOutput(mse + self.l0_coefficient * l0, mse, l0, mse.new_zeros(()), feature_acts, x_hat, hidden_pre)

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"W_enc": self.W_enc.detach(), "W_dec": self.W_dec.detach(), "b_enc": self.b_enc.detach(),
                "b_dec": self.b_dec.detach(), "threshold": self.threshold.detach()}

    def config_fields(self) -> dict[str, Any]:
        return {"l0_coefficient": self.l0_coefficient, "jumprelu_bandwidth": self.bandwidth, "mse": self.mse_kind}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "JumpReLUSAE":
        threshold = tensors["threshold"]
        if not bool((threshold > 0).all()):  # SAELens's exports may hold zero thresholds (a plain ReLU)
            threshold = threshold.clamp_min(torch.finfo(threshold.dtype).tiny)
        sae = cls(int(cfg["d_in"]), int(cfg["d_sae"]), l0_coefficient=float(cfg.get("l0_coefficient", 1e-3)),
                  bandwidth=float(cfg.get("jumprelu_bandwidth", 1e-3)), mse=cfg.get("mse", "plain"),
                  metadata=cfg.get("metadata", {}), dtype=tensors["W_enc"].dtype)
        state = {k: v for k, v in tensors.items() if k != "threshold"}
        sae.load_state_dict({**state, "log_threshold": threshold.log()})
        return sae
