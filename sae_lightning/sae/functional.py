"""The seed's SAE math (DESIGN section 5), shared by every architecture and by the tests' references.

Kept as plain functions on tensors so each formula can be read, and checked, in one place.
"""

from __future__ import annotations

import torch

EPS = 1e-6
NORM_FLOOR = 1e-2  # of the batch's mean norm: the smallest ||x_b|| the normalised mse divides by


def safe_norm(x: torch.Tensor) -> torch.Tensor:
    """||x_b||_2 [N, 1] of rows x [N, d], floored at NORM_FLOOR times the batch's mean norm (no gradient).

    Real activations never come near the floor, so the seed's loss is unchanged; an all-zero row (a planted
    sample with no active feature, a zero-padded token) gets a finite weight instead of a division by zero.
    An all-zero batch falls back to an absolute floor of EPS.
    """
    norm = x.norm(dim=-1, keepdim=True)
    floor = (NORM_FLOOR * norm.mean()).clamp_min(EPS).detach()
    return torch.maximum(norm, floor)


def mse_elementwise(x_hat: torch.Tensor, x: torch.Tensor, normalised: bool = True) -> torch.Tensor:
    """Un-reduced squared error [N, d]; the seed's variant divides by the un-squared norm ||x_b||_2 (safe_norm)."""
    err = (x_hat - x).pow(2)
    if normalised:
        err = err / safe_norm(x)
    return err


def ghost_grad_loss(x: torch.Tensor, x_hat: torch.Tensor, hidden_pre: torch.Tensor, W_dec: torch.Tensor,
                    dead_mask: torch.Tensor, mse_elem: torch.Tensor) -> torch.Tensor:
    """Ghost-grads loss for the features in `dead_mask` [F] (seed: SAELens's early implementation).

    x, x_hat [N, d]; hidden_pre [N, F]; W_dec [F, d]; mse_elem [N, d]; returns a scalar.
    g = exp(h_dead) W_dec[dead], rescaled (no gradient through the scale) so ||g|| = ||r|| / 2 with
    r = x - x_hat; per element L = (g - sg(r))^2 / ||sg(r)||, rescaled by sg(mse / (L + 1e-6)) so it is
    the size of the mse; the loss is mean(L). Gradients reach only the dead features' encoder/decoder
    (and b_dec through the pre-activations).

    Computed densely (live features masked to exp(-inf) = 0), so the shapes never depend on how many features
    are dead and the step needs no host-device synchronisation; with no dead feature the loss is exactly 0.
    """
    residual = (x - x_hat).detach()
    residual_norm = safe_norm(residual)
    masked = torch.where(dead_mask, hidden_pre, torch.full_like(hidden_pre, float("-inf")))
    ghost_out = torch.exp(masked) @ W_dec
    scale = residual_norm / (2 * ghost_out.norm(dim=-1, keepdim=True) + EPS)
    ghost_out = ghost_out * scale.detach()
    ghost_elem = (ghost_out - residual).pow(2) / residual_norm
    ghost_elem = (mse_elem / (ghost_elem + EPS)).detach() * ghost_elem
    return ghost_elem.mean() * dead_mask.any()


@torch.no_grad()
def normalise_decoder_rows(W_dec: torch.Tensor) -> None:
    """Rescale each decoder row (one feature's direction) to unit norm, in place."""
    W_dec.div_(W_dec.norm(dim=-1, keepdim=True).clamp_min(EPS))


@torch.no_grad()
def remove_parallel_gradient(W_dec: torch.Tensor) -> None:
    """Project each row's component parallel to that row out of W_dec.grad, in place.

    With unit-norm rows this keeps a step from changing the rows' norms to first order.
    """
    if W_dec.grad is None:
        return
    parallel = (W_dec.grad * W_dec).sum(-1, keepdim=True) / W_dec.pow(2).sum(-1, keepdim=True).clamp_min(EPS)
    W_dec.grad.sub_(parallel * W_dec)


@torch.no_grad()
def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-12) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed Euclidean distance to `points` [N, d].

    Runs on the points' device in float64, stopping when the objective changes by less than `tol`
    (relative) between iterations.
    """
    pts = points.detach().to(torch.float64)
    median = pts.mean(dim=0)
    objective = (pts - median).norm(dim=-1).sum()
    for _ in range(max_iter):
        dist = (pts - median).norm(dim=-1).clamp_min(1e-12)
        weights = 1.0 / dist
        median = (weights[:, None] * pts).sum(0) / weights.sum()
        new_objective = (pts - median).norm(dim=-1).sum()
        converged = (objective - new_objective).abs() <= tol * objective
        objective = new_objective
        if converged:
            break
    return median.to(points.dtype)
