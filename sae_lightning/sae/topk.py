"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): f = ReLU(TopK_k(pre-activations)).

Sparsity comes from k alone (no L1 penalty); dead features are revived by the AuxK loss
(`functional.auxk_loss`) when the module passes a dead-feature mask. Saved as SAELens's "topk" (cfg.json `k`).
"""

from __future__ import annotations

from typing import Any

import torch

from sae_lightning.sae import functional as F_sae
from sae_lightning.sae.standard import SAEOutput, SparseAutoencoder

AUX_COEFFICIENT = 1 / 32  # Gao et al. 2024, appendix B.1


class TopKSAE(SparseAutoencoder):
    """f = ReLU(TopK_k((x - b_dec) W_enc + b_enc)), x_hat = f W_dec + b_dec; exactly k or fewer non-zeros per row.

    `k`: features kept per row; `aux_k`: the dead features AuxK uses per row (default d_in // 2, Gao et al.);
    `aux_coefficient`: AuxK's weight (1/32, Gao et al.); `mse`: "plain" (Gao et al.) or "normalised" (the seed's).
    """

    architecture = "topk"

    def __init__(self, d_in: int, d_sae: int, *, k: int = 32, aux_k: int | None = None,
                 aux_coefficient: float = AUX_COEFFICIENT, mse: str = "plain", metadata: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(d_in, d_sae, l1_coefficient=0.0, mse=mse, metadata=metadata, dtype=dtype)
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be between 1 and d_sae={d_sae}, got {k}")
        self.k = k
        self.aux_k = int(aux_k) if aux_k is not None else max(1, d_in // 2)
        self.aux_coefficient = float(aux_coefficient)
        with torch.no_grad():  # Gao et al.: the encoder starts as the decoder's transpose (unit-norm columns)
            self.W_enc.copy_(self.W_dec.T)

    def activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """Pre-activations [..., F] -> feature activations [..., F] (the architecture's sparsifier)."""
        return F_sae.topk_activation(hidden_pre, self.k)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d] -> [..., F]."""
        return self.activation(self.encode_pre(x))

    def loss(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> SAEOutput:
        """mse + aux_coefficient * AuxK(dead features); x [N, d]."""
        x = x.to(self.W_enc.dtype)
        hidden_pre = self.encode_pre(x)
        feature_acts = self.activation(hidden_pre)
        x_hat = self.decode(feature_acts)
        mse = F_sae.mse_elementwise(x_hat, x, normalised=self.mse_kind == "normalised").mean()
        l1 = feature_acts.abs().sum(-1).mean().detach()  # logged only
        if dead_mask is not None:
            aux = self.aux_coefficient * F_sae.auxk_loss(x, x_hat, hidden_pre, self.W_dec, dead_mask, self.aux_k,
                                                               self.mse_kind == "normalised")
        else:
            aux = mse.new_zeros(())
        return SAEOutput(mse + aux, mse, l1, aux, feature_acts, x_hat, hidden_pre)

    def config_fields(self) -> dict[str, Any]:
        return {"k": self.k, "activation_fn_kwargs": {"k": self.k}, "aux_k": self.aux_k,
                "aux_coefficient": self.aux_coefficient, "mse": self.mse_kind}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "TopKSAE":
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if k is None:
            raise ValueError("a topk SAE's cfg.json needs `k` (or activation_fn_kwargs.k)")
        sae = cls(int(cfg["d_in"]), int(cfg["d_sae"]), k=int(k), aux_k=cfg.get("aux_k"),
                  aux_coefficient=float(cfg.get("aux_coefficient", AUX_COEFFICIENT)), mse=cfg.get("mse", "plain"),
                  metadata=cfg.get("metadata", {}), dtype=tensors["W_enc"].dtype)
        sae.load_state_dict(tensors)
        return sae
