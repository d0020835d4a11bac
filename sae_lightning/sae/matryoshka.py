"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders"; Nabeshima 2024, "Matryoshka Sparse Autoencoders"): the BatchTopK
activations of the nested prefixes f[:, :m_1] within f[:, :m_2] within ... within f (all d_sae features) must
each reconstruct x on their own, so the first features learn general directions and later ones refine them.
Saved, like BatchTopK (and as SAELens does), as a "jumprelu" SAE with its inference threshold.
"""

from __future__ import annotations

from typing import Any

import torch

from sae_lightning.sae import functional as F_sae
from sae_lightning.sae.batchtopk import BatchTopKSAE
from sae_lightning.sae.standard import SAEOutput
from sae_lightning.sae.topk import AUX_COEFFICIENT


def prefix_widths(d_sae: int, prefixes: list[float]) -> list[int]:
    """Prefix widths from `prefixes`: fractions of d_sae (<= 1) or feature counts (> 1); d_sae is always last.

    E.g. d_sae=1024, [0.0625, 0.25] -> [64, 256, 1024]. ValueError unless strictly increasing within (0, d_sae].
    """
    widths = [int(round(p * d_sae)) if p <= 1 else int(p) for p in prefixes]
    if not widths or widths[-1] != d_sae:
        widths.append(d_sae)
    if widths[0] < 1 or any(b <= a for a, b in zip(widths, widths[1:])) or widths[-1] > d_sae:
        raise ValueError(f"matryoshka prefixes {list(prefixes)} give widths {widths}: they must increase strictly "
                         f"within 1..d_sae={d_sae} (fractions of d_sae, or feature counts)")
    return widths


def matryoshka_mse(feature_acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, x: torch.Tensor,
                   widths: list[int], normalised: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over prefixes of each prefix's mse, the full reconstruction [N, d]).

    feature_acts [N, F], W_dec [F, d], b_dec [d], x [N, d]. Reconstructions are built incrementally:
    x_hat_j = b_dec + sum over features < widths[j] of f_i W_dec[i] (one matmul per prefix block).
    """
    x_hat = b_dec.expand_as(x)
    losses = []
    start = 0
    for width in widths:
        x_hat = x_hat + feature_acts[:, start:width] @ W_dec[start:width]
        losses.append(F_sae.mse_elementwise(x_hat, x, normalised=normalised).mean())
        start = width
    return torch.stack(losses).mean(), x_hat


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK with nested-prefix reconstruction losses. `prefixes`: the inner prefix widths, as fractions of
    d_sae or feature counts (default [1/16, 1/4]: widths d_sae/16, d_sae/4, d_sae). The `mse` field of the loss
    is the full reconstruction's; the total is the mean over prefixes (Bussmann et al.) plus AuxK."""

    training_architecture = "matryoshka_batchtopk"

    def __init__(self, d_in: int, d_sae: int, *, k: float = 32, prefixes: list[float] = (0.0625, 0.25),
                 aux_k: int | None = None, aux_coefficient: float = AUX_COEFFICIENT, threshold_lr: float = 0.01,
                 mse: str = "plain", metadata: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32):
        super().__init__(d_in, d_sae, k=k, aux_k=aux_k, aux_coefficient=aux_coefficient, threshold_lr=threshold_lr,
                         mse=mse, metadata=metadata, dtype=dtype)
        self.widths = prefix_widths(d_sae, list(prefixes))

    def loss(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> SAEOutput:
        x = x.to(self.W_enc.dtype)
        hidden_pre = self.encode_pre(x)
        feature_acts = self.activation(hidden_pre)
        normalised = self.mse_kind == "normalised"
        nested, x_hat = matryoshka_mse(feature_acts, self.W_dec, self.b_dec, x, self.widths, normalised)
        mse = F_sae.mse_elementwise(x_hat, x, normalised=normalised).mean()
        l1 = feature_acts.abs().sum(-1).mean().detach()
        if dead_mask is not None:
            aux = self.aux_coefficient * F_sae.auxk_loss(x, x_hat, hidden_pre, self.W_dec, dead_mask, self.aux_k,
                                                               self.mse_kind == "normalised")
        else:
            aux = mse.new_zeros(())
        F_sae.update_threshold_ema(self.topk_threshold, feature_acts, self.threshold_lr)
        return SAEOutput(nested + aux, mse, l1, aux, feature_acts, x_hat, hidden_pre)

    def config_fields(self) -> dict[str, Any]:
        return {**super().config_fields(), "matryoshka_widths": self.widths}
