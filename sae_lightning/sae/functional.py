"""The seed's SAE math (docs/training.md), shared by every architecture and by the tests' references.

Kept as plain functions on tensors so each formula can be read, and checked, in one place.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

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


def decoder_weighted_l1(feature_acts: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """mean_n sum_i |f_ni| ||W_dec[i]||: the L1 penalty with free decoder norms (Anthropic, April 2024; SAELens's
    standard SAE). feature_acts [N, F], W_dec [F, d]; a scalar. Equals the plain L1 when every row has unit norm.
    """
    return (feature_acts.abs() * W_dec.norm(dim=-1)).sum(-1).mean()


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


# ----------------------------------------------------------------------------------------------------------------
# Activation functions of the modern architectures (all keep the step free of host-device synchronisation)
# ----------------------------------------------------------------------------------------------------------------


def topk_activation(hidden_pre: torch.Tensor, k: int) -> torch.Tensor:
    """TopK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): keep each row's k largest
    pre-activations, ReLU them, zero the rest. hidden_pre [..., F] -> [..., F] with at most k non-zeros per row.
    """
    top = hidden_pre.topk(k, dim=-1)
    return torch.zeros_like(hidden_pre).scatter(-1, top.indices, torch.relu(top.values))


def batchtopk_activation(hidden_pre: torch.Tensor, k: float) -> torch.Tensor:
    """BatchTopK (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders"): keep the int(k * N) largest
    ReLU'd pre-activations of the whole batch hidden_pre [N, F] (k per row on average, any number in one row).
    """
    acts = torch.relu(hidden_pre)
    flat = acts.flatten()
    top = flat.topk(min(int(k * hidden_pre.shape[0]), flat.numel()))
    return torch.zeros_like(flat).scatter(-1, top.indices, top.values).reshape(acts.shape)


def jumprelu_inference(hidden_pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """JumpReLU as SAELens computes it at inference: ReLU(z) * (z > threshold). [..., F], threshold [F] -> [..., F]."""
    return torch.relu(hidden_pre) * (hidden_pre > threshold).to(hidden_pre.dtype)


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel K(u) = 1 for -1/2 < u < 1/2, else 0 (Rajamanoharan et al. 2024, JumpReLU eq. 11)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """JumpReLU(z; theta) = z H(z - theta) with straight-through threshold gradients (Rajamanoharan et al. 2024,
    "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU Sparse Autoencoders", eq. 11).

    Forward: z [N, F], theta [F] -> z * (z > theta). Backward: dz = H(z - theta) * g (the exact derivative away
    from the jump); dtheta_i = sum_n -(theta_i / eps) K((z_ni - theta_i) / eps) g_ni, with K the rectangle
    kernel of bandwidth eps (a pseudo-derivative: the true one is a Dirac delta).
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        dz = (z > theta).to(grad.dtype) * grad
        dtheta = (-(theta / eps) * rectangle((z - theta) / eps) * grad).reshape(-1, theta.shape[-1]).sum(0)
        return dz, dtheta, None


class StepFunction(torch.autograd.Function):
    """H(z - theta) (the L0 of JumpReLU) with the straight-through threshold gradient of Rajamanoharan et al. 2024
    (eq. 12): dtheta_i = sum_n -(1 / eps) K((z_ni - theta_i) / eps) g_ni; no gradient to z.
    z [N, F], theta [F] -> [N, F] of 0/1."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        dtheta = (-(1.0 / eps) * rectangle((z - theta) / eps) * grad).reshape(-1, theta.shape[-1]).sum(0)
        return None, dtheta, None


def jumprelu(z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """JumpReLUFunction.apply: z [N, F], theta [F] -> [N, F]."""
    return JumpReLUFunction.apply(z, theta, bandwidth)


def step(z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """StepFunction.apply: z [N, F], theta [F] -> [N, F] of 0/1 (sum over F is the L0)."""
    return StepFunction.apply(z, theta, bandwidth)


# ----------------------------------------------------------------------------------------------------------------
# Dead-feature losses: one signature, (x, x_hat, hidden_pre, W_dec, dead_mask, ...) -> scalar
# ----------------------------------------------------------------------------------------------------------------


def auxk_loss(x: torch.Tensor, x_hat: torch.Tensor, hidden_pre: torch.Tensor, W_dec: torch.Tensor,
              dead_mask: torch.Tensor, k_aux: int, normalised: bool = False) -> torch.Tensor:
    """AuxK (Gao et al. 2024, section A.2 / appendix B.1): the k_aux largest pre-activations among the dead
    features model the main reconstruction's residual.

    x, x_hat [N, d]; hidden_pre [N, F]; W_dec [F, d]; dead_mask [F] bool; returns a scalar.
    e = sg(x - x_hat); z_aux = TopK_{k_aux}(hidden_pre restricted to dead features) (raw pre-activations, as
    SAELens does, so a dead feature with negative pre-activations still gets a gradient); e_hat = z_aux W_dec
    (no b_dec: e has none); loss = min(n_dead / k_aux, 1) * mse(e_hat, e), the mse reduced exactly as the
    main loss's (`mse_elementwise(..., normalised)` averaged over rows and dimensions; a normalised one
    divides by ||x||), so the AuxK coefficient weighs it against the main mse as Gao et al.'s alpha does,
    whatever d is. The scale min(n_dead / k_aux, 1) is SAELens's: it keeps a handful of dead features from
    dominating. Dense and fixed-shape: with fewer than k_aux dead features the extra picks are live features
    masked to -inf and contribute 0; with none the loss is 0; no host-device synchronisation.
    """
    k_aux = min(int(k_aux), hidden_pre.shape[-1])
    residual = (x - x_hat).detach()
    masked = torch.where(dead_mask, hidden_pre, torch.full_like(hidden_pre, float("-inf")))
    top = masked.topk(k_aux, dim=-1)
    values = torch.where(torch.isfinite(top.values), top.values, torch.zeros_like(top.values))
    z_aux = torch.zeros_like(hidden_pre).scatter(-1, top.indices, values)
    e_hat = z_aux @ W_dec
    err = (e_hat - residual).pow(2)
    if normalised:
        err = err / safe_norm(x)
    n_dead = dead_mask.sum().to(hidden_pre.dtype)
    scale = (n_dead / k_aux).clamp(max=1.0)
    return scale * err.mean()


@torch.no_grad()
def update_threshold_ema(threshold: torch.Tensor, feature_acts: torch.Tensor, lr: float) -> None:
    """BatchTopK's inference threshold, in place: threshold <- (1 - lr) threshold + lr min_{f > 0} f over the batch
    (SAELens's running estimate of the smallest kept activation). threshold [] ; feature_acts [N, F].

    On the device with no host read: a batch with no positive activation, or a non-finite one, leaves it as is.
    Under torch.distributed (DDP) the batch statistic is the mean over the ranks' batches (all-reduced), so
    every rank holds the same threshold.
    """
    acts = feature_acts.detach().to(threshold.dtype)
    positive = acts > 0
    smallest = torch.where(positive, acts, torch.full_like(acts, float("inf"))).min()
    ok = positive.any() & torch.isfinite(smallest)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # DDP: every rank's batch gives an estimate; all ranks take their mean (the ranks that had one), so the
        # threshold, exported from rank 0, is the same on every rank and uses every rank's data
        summed = torch.stack([torch.where(ok, smallest, torch.zeros_like(smallest)), ok.to(smallest.dtype)])
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        ok = summed[1] > 0
        smallest = summed[0] / summed[1].clamp_min(1)
    updated = (1 - lr) * threshold + lr * torch.where(ok, smallest, threshold)
    threshold.copy_(torch.where(ok, updated, threshold))


@torch.no_grad()
def resample_dead_features(x: torch.Tensor, x_hat: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor,
                           W_dec: torch.Tensor, dead: torch.Tensor, generator: torch.Generator | None = None,
                           encoder_scale: float = 0.2) -> torch.Tensor:
    """Anthropic-style resampling ("Towards Monosemanticity", 2023, and its April 2023 update), in place.

    x, x_hat [N, d]; b_dec [d]; W_enc [d, F]; W_dec [F, d]; dead [F] bool. Each dead feature gets an input
    drawn with probability proportional to its squared reconstruction error ||x_n - x_hat_n||^2; its decoder
    row becomes that input (minus b_dec) at unit norm, its encoder column the same direction times
    `encoder_scale` times the mean norm of the live features' encoder columns. Returns the indices [F] of the
    inputs drawn (one per feature, used only where `dead`). Dense and on the device: no host read.
    """
    loss = (x - x_hat).pow(2).sum(-1)
    weights = torch.where(loss.sum() > 0, loss, torch.ones_like(loss))
    drawn = torch.multinomial(weights, dead.shape[0], replacement=True, generator=generator)
    directions = x[drawn] - b_dec
    directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(EPS)
    live = ~dead
    enc_norms = W_enc.norm(dim=0)
    live_norm = torch.where(live.any(), (enc_norms * live).sum() / live.sum().clamp_min(1), torch.ones_like(
        enc_norms[0]))
    W_dec.copy_(torch.where(dead[:, None], directions, W_dec))
    W_enc.copy_(torch.where(dead[None, :], directions.T * encoder_scale * live_norm, W_enc))
    return drawn
