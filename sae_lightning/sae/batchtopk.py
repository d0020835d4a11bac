"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders"): during training the k * N
largest activations of the whole batch [N, F] are kept (k per row on average); at inference a single
threshold replaces the batch (SAELens: a running estimate of the smallest kept activation), so the SAE is
saved, as SAELens saves it, as a "jumprelu" SAE whose `threshold` [d_sae] is that value for every feature.
Dead features: AuxK, as for TopK.
"""

from __future__ import annotations

from typing import Any

import torch

from sae_lightning.sae import functional as F_sae
from sae_lightning.sae.topk import AUX_COEFFICIENT, TopKSAE


class BatchTopKSAE(TopKSAE):
    """Training: f = BatchTopK_{k N}(ReLU(z)); inference (`encode`): f = ReLU(z) * (z > threshold), the
    threshold an exponential moving average (rate `threshold_lr`) of each training batch's smallest kept
    activation. `k` may be fractional (k * N is rounded down)."""

    architecture = "jumprelu"  # the inference SAE it is saved as (SAELens's convention)
    training_architecture = "batchtopk"

    def __init__(self, d_in: int, d_sae: int, *, k: float = 32, aux_k: int | None = None,
                 aux_coefficient: float = AUX_COEFFICIENT, threshold_lr: float = 0.01, mse: str = "plain",
                 metadata: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32):
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in (0, d_sae={d_sae}], got {k}")
        super().__init__(d_in, d_sae, k=1, aux_k=aux_k, aux_coefficient=aux_coefficient, mse=mse, metadata=metadata,
                         dtype=dtype)
        self.k = float(k)
        self.threshold_lr = float(threshold_lr)
        self.register_buffer("topk_threshold", torch.zeros((), dtype=dtype))

    def activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """Training activations: hidden_pre [N, F] -> [N, F] with int(k N) non-zeros in all."""
        return F_sae.batchtopk_activation(hidden_pre.reshape(-1, hidden_pre.shape[-1]), self.k).reshape(
            hidden_pre.shape)

    @property
    def threshold(self) -> torch.Tensor:
        """The inference threshold for every feature [F]."""
        return self.topk_threshold.expand(self.d_sae)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Inference activations [..., d] -> [..., F]: independent of the other rows."""
        return F_sae.jumprelu_inference(self.encode_pre(x), self.threshold)

    def loss(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None):
        out = super().loss(x, dead_mask)
        F_sae.update_threshold_ema(self.topk_threshold, out.feature_acts, self.threshold_lr)
        return out

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"W_enc": self.W_enc.detach(), "W_dec": self.W_dec.detach(), "b_enc": self.b_enc.detach(),
                "b_dec": self.b_dec.detach(), "threshold": self.threshold.detach().clone()}

    def config_fields(self) -> dict[str, Any]:
        return {"k": self.k, "aux_k": self.aux_k, "aux_coefficient": self.aux_coefficient,
                "topk_threshold_lr": self.threshold_lr, "mse": self.mse_kind,
                "training_architecture": self.training_architecture}
