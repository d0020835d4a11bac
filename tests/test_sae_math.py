"""The SAE math of docs/training.md against independent references written here.

Every expected value is computed in this file (per-sample loops, projection matrices, a generic optimiser),
never with the helpers under test, and values *and* autograd gradients are compared in float64.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from sae_lightning.module import SAETrainingModule, lr_schedule
from sae_lightning.sae import SparseAutoencoder
from sae_lightning.sae import functional as F_sae

DT = torch.float64
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
EPS = 1e-6  # docs/training.md: both the ghost-grad scale and the ghost rescale use 1e-6


# --------------------------------------------------------------------------------------------------------------
# Independent reference: a per-sample, per-feature python loop with explicit .detach() where the spec says stopgrad
# --------------------------------------------------------------------------------------------------------------


def reference_losses(x, W_enc, b_enc, W_dec, b_dec, dead_mask, l1_coefficient, normalised=True,
                     decoder_weighted=False):
    """(total, mse, l1, ghost) straight from docs/training.md, one sample and one feature at a time.

    `decoder_weighted`: the L1 of free decoder norms, sum_i |f_i| * ||W_dec[i]||."""
    n, d = x.shape
    n_features = W_enc.shape[1]
    dead_idx = [i for i in range(n_features) if dead_mask is not None and bool(dead_mask[i])]
    mse_sum = x.new_zeros(())
    l1_sum = x.new_zeros(())
    ghost_sum = x.new_zeros(())
    for b in range(n):
        centred = x[b] - b_dec
        h = torch.stack([(centred * W_enc[:, i]).sum() + b_enc[i] for i in range(n_features)])
        f = torch.where(h > 0, h, torch.zeros_like(h))
        x_hat = b_dec.clone()
        for i in range(n_features):
            x_hat = x_hat + f[i] * W_dec[i]
        err2 = (x_hat - x[b]) ** 2
        if normalised:
            err2 = err2 / torch.sqrt((x[b] ** 2).sum())  # the un-squared per-sample norm
        mse_sum = mse_sum + err2.sum()
        if decoder_weighted:
            for i in range(n_features):
                l1_sum = l1_sum + f[i].abs() * torch.sqrt((W_dec[i] ** 2).sum())
        else:
            l1_sum = l1_sum + f.abs().sum()
        if dead_idx:
            r = (x[b] - x_hat).detach()
            r_norm = torch.sqrt((r**2).sum())
            g = torch.zeros_like(r)
            for i in dead_idx:
                g = g + torch.exp(h[i]) * W_dec[i]
            g = g * (r_norm / (2 * torch.sqrt((g**2).sum()) + EPS)).detach()
            # the rescale makes ||g|| = ||r|| / 2 (up to the 1e-6)
            assert torch.isclose(torch.sqrt((g**2).sum()), r_norm / 2, rtol=1e-5)
            L = (g - r) ** 2 / r_norm
            L = (err2 / (L + EPS)).detach() * L
            ghost_sum = ghost_sum + L.sum()
    mse = mse_sum / (n * d)
    l1 = l1_sum / n
    ghost = ghost_sum / (n * d)
    return mse + l1_coefficient * l1 + ghost, mse, l1, ghost


def make_sae(d=6, n_features=10, l1_coefficient=0.3, mse="normalised", seed=0):
    torch.manual_seed(seed)
    sae = SparseAutoencoder(d, n_features, l1_coefficient=l1_coefficient, mse=mse, dtype=DT)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, n_features, dtype=DT) * 0.7)
        sae.W_dec.copy_(torch.randn(n_features, d, dtype=DT))
        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
        sae.b_enc.copy_(torch.randn(n_features, dtype=DT) * 0.5)  # mixed signs: some features fire, some don't
        sae.b_dec.copy_(torch.randn(d, dtype=DT) * 0.3)  # non-zero, so x - b_dec vs x + b_dec differ
    return sae


def dead_mask_for(n_features=10):
    mask = torch.zeros(n_features, dtype=torch.bool)
    mask[[1, 4, 7]] = True
    mask[9] = True
    return mask


def leaf_copies(sae):
    return {k: getattr(sae, k).detach().clone().requires_grad_(True) for k in PARAMS}


def impl_grads(sae, loss):
    sae.zero_grad(set_to_none=True)
    loss.backward()
    return {k: getattr(sae, k).grad.detach().clone() for k in PARAMS}


def ref_grads(leaves, loss):
    grads = torch.autograd.grad(loss, [leaves[k] for k in PARAMS], allow_unused=True, retain_graph=True)
    return {k: (torch.zeros_like(leaves[k]) if g is None else g) for k, g in zip(PARAMS, grads)}


def assert_grads_close(got, want, what):
    for k in PARAMS:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12, msg=lambda m, k=k: f"{what} d/d{k}: {m}")


@pytest.fixture
def batch():
    torch.manual_seed(1)
    return torch.randn(8, 6, dtype=DT) * 2 + 0.5


# --------------------------------------------------------------------------------------------------------------
# 1. Losses and ghost grads
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mse_kind", ["normalised", "plain"])
def test_loss_values_and_gradients_match_reference_with_ghost_grads(batch, mse_kind):
    sae = make_sae(mse=mse_kind)
    dead = dead_mask_for()
    out = sae.loss(batch, dead_mask=dead)
    leaves = leaf_copies(sae)
    total, mse, l1, ghost = reference_losses(batch, *(leaves[k] for k in PARAMS), dead, sae.l1_coefficient,
                                             normalised=mse_kind == "normalised")
    # the example exercises both sides of the ReLU and a non-trivial ghost term
    assert 0 < (out.hidden_pre > 0).double().mean() < 1
    assert ghost.item() > 0
    for name, got, want in (("mse", out.mse, mse), ("l1", out.l1, l1), ("ghost", out.ghost, ghost),
                            ("total", out.total, total)):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-14, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(out.total, out.mse + sae.l1_coefficient * out.l1 + out.ghost, rtol=1e-14, atol=0)
    assert_grads_close(impl_grads(sae, out.total), ref_grads(leaves, total), f"total ({mse_kind})")


def test_forward_outputs_match_reference_formula(batch):
    sae = make_sae()
    out = sae.loss(batch)
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, k).detach() for k in PARAMS)
    for b in range(batch.shape[0]):
        h = torch.stack([((batch[b] - b_dec) * W_enc[:, i]).sum() + b_enc[i] for i in range(W_enc.shape[1])])
        f = h.clamp_min(0)
        x_hat = b_dec + (f[:, None] * W_dec).sum(0)
        torch.testing.assert_close(out.hidden_pre[b].detach(), h, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.feature_acts[b].detach(), f, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.reconstruction[b].detach(), x_hat, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sae.encode(batch[b:b + 1])[0].detach(), f, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sae.decode(f[None])[0].detach(), x_hat, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sae(batch[b:b + 1])[0].detach(), x_hat, rtol=1e-12, atol=1e-12)


def test_ghost_term_alone_matches_reference_and_touches_only_dead_features(batch):
    sae = make_sae()
    dead = dead_mask_for()
    out = sae.loss(batch, dead_mask=dead)
    leaves = leaf_copies(sae)
    _, _, _, ghost = reference_losses(batch, *(leaves[k] for k in PARAMS), dead, sae.l1_coefficient)
    got = impl_grads(sae, out.ghost)
    assert_grads_close(got, ref_grads(leaves, ghost), "ghost")
    alive = ~dead
    assert torch.count_nonzero(got["W_enc"][:, alive]) == 0, "ghost loss leaked into live features' encoder columns"
    assert torch.count_nonzero(got["b_enc"][alive]) == 0, "ghost loss leaked into live features' encoder biases"
    assert torch.count_nonzero(got["W_dec"][alive]) == 0, "ghost loss leaked into live features' decoder rows"
    assert torch.all(got["W_enc"][:, dead].abs().sum(0) > 0), "every dead feature's encoder column gets a gradient"
    assert torch.all(got["W_dec"][dead].abs().sum(1) > 0), "every dead feature's decoder row gets a gradient"
    assert got["b_dec"].abs().sum() > 0, "b_dec gets the ghost gradient through the pre-activations"
    # per element the rescaled L equals mse_elem * L / (L + 1e-6): the ghost loss is the size of the mse
    torch.testing.assert_close(out.ghost, out.mse, rtol=1e-3, atol=0)


def test_ghost_is_zero_without_dead_features(batch):
    sae = make_sae()
    leaves = leaf_copies(sae)
    total_ref, mse, l1, _ = reference_losses(batch, *(leaves[k] for k in PARAMS), None, sae.l1_coefficient)
    for mask in (None, torch.zeros(10, dtype=torch.bool)):
        out = sae.loss(batch, dead_mask=mask)
        assert out.ghost.item() == 0.0
        torch.testing.assert_close(out.total, total_ref.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(out.total, out.mse + sae.l1_coefficient * out.l1, rtol=1e-14, atol=0)
        assert_grads_close(impl_grads(sae, out.total), ref_grads(leaves, total_ref), f"no-ghost total ({mask})")


def test_mse_elementwise_against_hand_formulas():
    torch.manual_seed(2)
    x = torch.randn(5, 4, dtype=DT) * 3
    x_hat = torch.randn(5, 4, dtype=DT)
    got_norm = F_sae.mse_elementwise(x_hat, x, normalised=True)
    got_plain = F_sae.mse_elementwise(x_hat, x, normalised=False)
    for b in range(5):
        norm_b = math.sqrt(sum(float(v) ** 2 for v in x[b]))
        for j in range(4):
            diff2 = (float(x_hat[b, j]) - float(x[b, j])) ** 2
            assert got_plain[b, j].item() == pytest.approx(diff2, rel=1e-12)
            assert got_norm[b, j].item() == pytest.approx(diff2 / norm_b, rel=1e-12), "divide by ||x_b||, not squared"
    # a sample with ||x|| = 2: normalised error is diff^2 / 2 (not / 4, not / 1)
    x2 = torch.tensor([[2.0, 0.0, 0.0]], dtype=DT)
    assert F_sae.mse_elementwise(x2 + 1, x2).tolist() == [[0.5, 0.5, 0.5]]


def test_l1_is_mean_over_batch_of_summed_abs_features(batch):
    sae = make_sae()
    out = sae.loss(batch)
    f = out.feature_acts.detach()
    per_sample = [sum(abs(float(v)) for v in f[b]) for b in range(f.shape[0])]
    assert out.l1.item() == pytest.approx(sum(per_sample) / len(per_sample), rel=1e-12)


def test_free_decoder_norms_weight_the_l1_by_each_rows_norm(batch):
    """decoder_norm="free": l1 = mean_b sum_i |f_bi| ||W_dec[i]||, values and gradients (W_dec's included)."""
    sae = make_sae()
    sae.decoder_norm = "free"
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.2, 3.0, 10, dtype=DT)[:, None])  # norms far from 1
    dead = dead_mask_for()
    out = sae.loss(batch, dead_mask=dead)
    leaves = leaf_copies(sae)
    total, mse, l1, ghost = reference_losses(batch, *(leaves[k] for k in PARAMS), dead, sae.l1_coefficient,
                                             decoder_weighted=True)
    plain_l1 = out.feature_acts.detach().abs().sum(-1).mean()
    assert abs(out.l1.item() - plain_l1.item()) > 0.1 * plain_l1.item(), "control: the weighting changes the l1"
    for name, got, want in (("l1", out.l1, l1), ("total", out.total, total)):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-14, msg=lambda m, n=name: f"{n}: {m}")
    assert_grads_close(impl_grads(sae, out.total), ref_grads(leaves, total), "total (free decoder norms)")


def test_decoder_norm_is_checked_and_kept_by_save_and_load(tmp_path):
    with pytest.raises(ValueError, match="decoder_norm must be one of"):
        SparseAutoencoder(4, 8, decoder_norm="learned")
    unit = SparseAutoencoder(4, 8)
    assert unit.unit_decoder_rows and "decoder_norm" not in unit.config()  # the seed's export is unchanged
    free = SparseAutoencoder(4, 8, decoder_norm="free")
    with torch.no_grad():
        free.W_dec.mul_(2.5)
    free.save(tmp_path / "sae")
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.decoder_norm == "free" and not loaded.unit_decoder_rows
    torch.testing.assert_close(loaded.W_dec.norm(dim=-1), torch.full((8,), 2.5), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------------------------
# 2. Decoder rows
# --------------------------------------------------------------------------------------------------------------


def test_normalise_decoder_rows_gives_unit_rows_same_directions():
    torch.manual_seed(3)
    W = torch.randn(12, 5, dtype=DT) * torch.logspace(-2, 2, 12, dtype=DT)[:, None]
    before = W.clone()
    F_sae.normalise_decoder_rows(W)
    for i in range(12):
        assert math.sqrt(sum(float(v) ** 2 for v in W[i])) == pytest.approx(1.0, abs=1e-12)
        cos = float((W[i] * before[i]).sum() / (before[i].norm() * W[i].norm()))
        assert cos == pytest.approx(1.0, abs=1e-12)


def test_remove_parallel_gradient_projects_each_row():
    torch.manual_seed(4)
    W = torch.nn.Parameter(torch.randn(7, 5, dtype=DT) * 3)  # rows deliberately not unit norm
    G = torch.randn(7, 5, dtype=DT)
    W.grad = G.clone()
    F_sae.remove_parallel_gradient(W)
    for i in range(7):
        w = W.detach()[i]
        projector = torch.eye(5, dtype=DT) - torch.outer(w, w) / (w @ w)  # onto the row's orthogonal complement
        torch.testing.assert_close(W.grad[i], projector @ G[i], rtol=1e-12, atol=1e-12)
        assert abs(float(W.grad[i] @ w)) < 1e-12
    # no gradient: a no-op, not an error
    W2 = torch.nn.Parameter(torch.randn(3, 2))
    F_sae.remove_parallel_gradient(W2)
    assert W2.grad is None


def test_projected_sgd_step_keeps_norms_to_second_order():
    torch.manual_seed(5)
    W = torch.randn(16, 8, dtype=DT)
    W /= W.norm(dim=-1, keepdim=True)
    G = torch.randn(16, 8, dtype=DT)
    lr = 1e-2
    W_param = torch.nn.Parameter(W.clone())
    W_param.grad = G.clone()
    F_sae.remove_parallel_gradient(W_param)
    projected = (W - lr * W_param.grad).norm(dim=-1)
    bound = lr**2 * W_param.grad.norm(dim=-1) ** 2 / 2 + 1e-12  # ||w - lr g_perp||^2 = 1 + lr^2 ||g_perp||^2
    assert torch.all((projected - 1).abs() <= bound)
    unprojected = (W - lr * G).norm(dim=-1)
    assert (unprojected - 1).abs().max() > 10 * bound.max(), "control: without the projection norms move first-order"


def test_one_adam_step_with_projection_keeps_rows_near_unit_norm():
    sae = make_sae(d=8, n_features=32, l1_coefficient=8e-5)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 32, dtype=DT)[:, None])
    opt = torch.optim.Adam(sae.parameters(), lr=4e-4)
    torch.manual_seed(6)
    x = torch.randn(64, 8, dtype=DT)
    F_sae.normalise_decoder_rows(sae.W_dec)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(32, dtype=DT), rtol=0, atol=1e-12)
    sae.loss(x, dead_mask=torch.arange(32) % 5 == 0).total.backward()
    F_sae.remove_parallel_gradient(sae.W_dec)
    opt.step()
    # Adam rescales coordinates, so the step is orthogonal only up to lr * ||w||_1 <= lr * sqrt(d) ~ 1.1e-3
    assert (sae.W_dec.norm(dim=-1) - 1).abs().max() < 1.2e-3


# --------------------------------------------------------------------------------------------------------------
# 3. Geometric median
# --------------------------------------------------------------------------------------------------------------


def _summed_distance(points, p):
    return sum(math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(pt, p))) for pt in points)


def reference_geometric_median(points):
    """Direct minimisation of sum_i ||p - x_i|| with L-BFGS (float64, many iterations) from the mean."""
    pts = points.to(DT)
    z = pts.mean(0).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=2000, tolerance_grad=1e-14, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (pts - z).norm(dim=-1).sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return z.detach()


@pytest.fixture
def outlier_points():
    torch.manual_seed(0)
    pts = torch.randn(50, 3, dtype=DT)  # inliers: unit spread around 0
    pts[:8] += 40 * torch.randn(8, 3, dtype=DT)  # 8 far outliers
    return pts


def test_geometric_median_minimises_summed_distance(outlier_points):
    ref = reference_geometric_median(outlier_points)
    got = F_sae.geometric_median(outlier_points)
    obj_got, obj_ref = _summed_distance(outlier_points, got), _summed_distance(outlier_points, ref)
    assert obj_got <= obj_ref * (1 + 1e-6), (obj_got, obj_ref)
    # robust: far from the mean (dragged by the outliers), close to the inlier cloud
    mean = outlier_points.mean(0)
    assert (mean - ref).norm() > 1.0
    assert (got - ref).norm() < 0.05 * (mean - ref).norm()


def test_geometric_median_point_agrees_with_direct_minimiser(outlier_points):
    ref = reference_geometric_median(outlier_points)
    got = F_sae.geometric_median(outlier_points)
    err = float((got - ref).norm())
    assert err < 1e-3, (
        f"geometric_median is {err:.2e} away from the true minimiser (inlier spread 1.0). Its stop rule "
        f"(relative objective change <= tol=1e-5) only gives ~sqrt(tol) point accuracy when outliers inflate the "
        f"objective; SAELens/ViT-Prisma's compute_geometric_median uses ftol=1e-20 (i.e. all 100 iterations). "
        f"With max_iter=100 and a tighter tol the error is "
        f"{float((F_sae.geometric_median(outlier_points, tol=1e-20) - ref).norm()):.1e}."
    )


def test_geometric_median_small_cases():
    line = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
    got = F_sae.geometric_median(line)
    assert got.dtype == torch.float32, "returns the input's dtype"
    torch.testing.assert_close(got, line[1], rtol=0, atol=1e-5)
    line64 = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [5.0, 5.0, 5.0]], dtype=DT)
    torch.testing.assert_close(F_sae.geometric_median(line64), line64[1], rtol=0, atol=1e-9)
    same = torch.full((6, 4), 3.5)
    torch.testing.assert_close(F_sae.geometric_median(same), same[0], rtol=0, atol=0)  # no NaN at a data point
    square = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0], [1.0, 1.0]])
    before = square.clone()
    torch.testing.assert_close(F_sae.geometric_median(square), torch.tensor([1.0, 1.0]), rtol=0, atol=1e-6)
    assert torch.equal(square, before), "the input is not modified"


# --------------------------------------------------------------------------------------------------------------
# 4. Save / load
# --------------------------------------------------------------------------------------------------------------

METADATA = {"backbone": "ViT-L-14", "pretrained": "openai", "layer": 22, "tokens": "cls", "image_size": 224}


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(7)
    sae = SparseAutoencoder(6, 24, l1_coefficient=3e-4, mse="plain", metadata=METADATA)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(24))
        sae.b_dec.copy_(torch.randn(6))
    directory = tmp_path / "run" / "sae"
    sae.save(directory)
    sae.save(directory)  # overwriting an existing export works
    assert sorted(os.listdir(directory)) == ["cfg.json", "sae_weights.safetensors"]
    assert sorted(os.listdir(directory.parent)) == ["sae"], "no temporary siblings left behind"

    tensors = load_file(str(directory / "sae_weights.safetensors"))
    assert set(tensors) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    expected_shapes = {"W_enc": (6, 24), "W_dec": (24, 6), "b_enc": (24,), "b_dec": (6,)}
    for key, shape in expected_shapes.items():
        assert tuple(tensors[key].shape) == shape, key
        assert torch.equal(tensors[key], getattr(sae, key).detach()), key

    cfg = json.loads((directory / "cfg.json").read_text())
    assert cfg["d_in"] == 6 and cfg["d_sae"] == 24
    assert cfg["architecture"] == "standard"
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none"
    assert cfg["dtype"] == "float32"
    assert cfg["device"] == "cpu"
    assert isinstance(cfg["metadata"], dict)
    for key, value in METADATA.items():
        assert cfg["metadata"][key] == value, key

    loaded = SparseAutoencoder.load(directory)
    for key in expected_shapes:
        assert torch.equal(getattr(loaded, key), getattr(sae, key)), key
    assert loaded.l1_coefficient == sae.l1_coefficient and loaded.mse_kind == "plain"
    for key, value in METADATA.items():
        assert loaded.metadata[key] == value, key
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), sae.encode(x))
        f = sae.encode(x)
        assert torch.equal(loaded.decode(f), sae.decode(f))


def test_float64_round_trip_keeps_dtype(tmp_path):
    sae = SparseAutoencoder(3, 5, dtype=DT)
    sae.save(tmp_path / "sae")
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["dtype"] == "float64"
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.W_enc.dtype == DT and torch.equal(loaded.W_dec, sae.W_dec)


@pytest.mark.parametrize("missing", ["cfg.json", "sae_weights.safetensors"])
def test_load_missing_file_names_the_path(tmp_path, missing):
    directory = tmp_path / "sae"
    SparseAutoencoder(3, 5).save(directory)
    (directory / missing).unlink()
    with pytest.raises(FileNotFoundError) as info:
        SparseAutoencoder.load(directory)
    assert str(directory / missing) in str(info.value)


# --------------------------------------------------------------------------------------------------------------
# 5. Warm-up schedule and the training step through a real Trainer
# --------------------------------------------------------------------------------------------------------------


def test_linear_warmup_factors():
    f = lr_schedule(500)
    assert f(0) == pytest.approx(1 / 500)
    assert f(1) == pytest.approx(2 / 500)
    assert f(249) == pytest.approx(0.5)
    assert f(499) == pytest.approx(1.0)
    assert f(500) == 1.0 and f(10_000) == 1.0
    assert lr_schedule(0)(0) == 1.0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=4e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    lrs = []
    for _ in range(502):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(4e-4 / 500)
    assert lrs[499] == pytest.approx(4e-4) and lrs[501] == pytest.approx(4e-4)
    assert all(a < b for a, b in zip(lrs[:499], lrs[1:500]))


def test_lr_decay_falls_linearly_to_zero_over_the_last_steps():
    # warm-up 2 and decay 4 of 10 steps, by hand: SAELens's lr_decay_steps (LinearLR from 1 to 0 over the last 4
    # steps, starting at step 10 - 4) gives the same factors
    f = lr_schedule(2, 4, 10)
    assert [f(s) for s in range(10)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25])
    assert lr_schedule(0, 3, 3)(0) == 1.0 and lr_schedule(0, 3, 3)(2) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="schedule.lr_warmup or schedule.lr_decay"):
        lr_schedule(5, 6, 10)
    with pytest.raises(ValueError, match="must fit in the run's 10 steps"):
        SAETrainingModule(SparseAutoencoder(4, 8), lr_warmup_steps=5, lr_decay_steps=6, total_steps=10)


def test_lr_decay_through_the_trainer_ends_at_its_max_steps():
    """Without total_steps the decay ends at the Trainer's max_steps: lr x [1/2, 1, 1, 1, 2/3, 1/3] over 6 steps."""
    torch.manual_seed(3)
    lr = 1e-3
    module = SAETrainingModule(SparseAutoencoder(4, 8), lr=lr, lr_warmup_steps=2, lr_decay_steps=3, b_dec_init="mean")
    recorder = _StepRecorder()
    trainer = Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])
    trainer.fit(module, DataLoader([{"activations": torch.randn(16, 4)} for _ in range(6)], batch_size=None))
    assert recorder.lrs == pytest.approx([lr * f for f in (0.5, 1, 1, 1, 2 / 3, 1 / 3)])


def test_initialise_b_dec_mean_and_median():
    torch.manual_seed(8)
    acts = torch.randn(40, 4) + 3
    acts[:4] += 50
    for kind in ("mean", "geometric_median"):
        module = SAETrainingModule(SparseAutoencoder(4, 8), b_dec_init=kind)
        module.initialise_b_dec(acts)
        if kind == "mean":
            expected = torch.tensor([sum(acts[:, j].tolist()) / 40 for j in range(4)])
            torch.testing.assert_close(module.sae.b_dec.detach(), expected, rtol=1e-5, atol=1e-5)
        else:
            ref = reference_geometric_median(acts).float()
            assert (module.sae.b_dec.detach() - ref).norm() < 1e-2
            assert (acts.mean(0) - ref).norm() > 1.0


class _StepRecorder(Callback):
    """The lr at each batch, and W_dec with its gradient as the optimiser is about to step."""

    def __init__(self):
        self.lrs = []
        self.pre_step = []

    def on_train_start(self, trainer, pl_module):
        W_dec = pl_module.sae.W_dec

        def hook(optimizer, args, kwargs):
            self.pre_step.append((W_dec.detach().clone(), W_dec.grad.detach().clone()))

        trainer.optimizers[0].register_step_pre_hook(hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_training_steps_through_trainer():
    d, n_features, lr, warmup = 8, 32, 4e-4, 4
    torch.manual_seed(9)
    sae = SparseAutoencoder(d, n_features, l1_coefficient=1e-3)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, n_features)[:, None])  # rows off unit norm before step 0
        sae.b_enc[:4] = -100.0  # features 0..3 never fire, so they go dead
    module = SAETrainingModule(sae, lr=lr, lr_warmup_steps=warmup, dead_feature_window=1,
                               b_dec_init="geometric_median")

    records = []
    original_loss = sae.loss

    def spy(x, dead_mask=None):
        out = original_loss(x, dead_mask=dead_mask)
        records.append({"norms": sae.W_dec.detach().norm(dim=-1).clone(), "b_dec": sae.b_dec.detach().clone(),
                        "dead": None if dead_mask is None else dead_mask.clone(),
                        "fired": (out.feature_acts.detach() > 0).any(0), "ghost": out.ghost.item()})
        return out

    sae.loss = spy
    centre = torch.full((d,), 2.0)
    init = centre + torch.randn(200, d)
    init[:20] += 60 * torch.randn(20, d)  # outliers pull the mean, not the median
    batches = [{"activations": torch.randn(64, d) + 1.0, "init_activations": init},
               {"activations": torch.randn(64, d) + 1.0, "init_activations": init + 100.0},  # must be ignored
               {"activations": torch.randn(64, d) + 1.0}]
    recorder = _StepRecorder()
    trainer = Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                      callbacks=[recorder])
    trainer.fit(module, DataLoader(batches, batch_size=None))

    assert len(records) == 3
    for step, rec in enumerate(records):
        torch.testing.assert_close(rec["norms"], torch.ones(n_features), rtol=0, atol=1e-5,
                                   msg=lambda m, s=step: f"decoder rows not renormalised before step {s}: {m}")
    assert (sae.W_dec.detach().norm(dim=-1) - 1).abs().max() < 2e-3

    # b_dec: the geometric median of the first batch's init_activations, set before the first forward
    b0 = records[0]["b_dec"]
    torch.testing.assert_close(b0, F_sae.geometric_median(init), rtol=0, atol=1e-6)
    ref = reference_geometric_median(init).float()
    assert (b0 - ref).norm() < 2e-2 * init[20:].std(0).norm()
    assert (b0 - init.mean(0)).norm() > 1.0
    # then only Adam moves it: the first update is at most lr_0 = lr / warmup per coordinate
    assert (records[1]["b_dec"] - b0).abs().max() <= lr / warmup + 1e-6, "b_dec re-initialised on step 2?"

    # the optimiser only ever sees decoder gradients orthogonal to each (unit) row
    assert len(recorder.pre_step) == 3
    for W, grad in recorder.pre_step:
        assert grad.norm() > 0
        dots = (W * grad).sum(-1).abs()
        assert torch.all(dots <= 1e-6 * grad.norm(dim=-1) + 1e-12), f"parallel gradient left in: {dots.max()}"

    # warm-up: lr * (k + 1) / warmup at step k, lr after warm-up
    assert recorder.lrs == pytest.approx([lr * (k + 1) / warmup for k in range(3)])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(lr)

    # dead features: steps_since_fired > window, counted independently from what fired at each step
    counts = torch.zeros(n_features, dtype=torch.long)
    for rec in records:
        if rec["dead"] is None:  # no feature can be dead yet (global_step <= window): no mask, no ghost grads
            assert not (counts > 1).any()
        else:
            assert torch.equal(rec["dead"], counts > 1)
        counts = torch.where(rec["fired"], torch.zeros_like(counts), counts + 1)
    assert torch.equal(module.steps_since_fired, counts)
    assert records[2]["dead"][:4].all() and records[2]["ghost"] > 0
    assert records[0]["ghost"] == 0.0


class _GradRecorder(Callback):
    """Every parameter and its gradient as the optimiser is about to step."""

    def __init__(self):
        self.pre_step = []

    def on_train_start(self, trainer, pl_module):
        params = dict(pl_module.sae.named_parameters())

        def hook(optimizer, args, kwargs):
            self.pre_step.append({k: (p.detach().clone(), p.grad.detach().clone()) for k, p in params.items()})

        trainer.optimizers[0].register_step_pre_hook(hook)


def test_free_decoder_rows_are_left_alone_and_gradients_clipped_through_trainer():
    """decoder_norm="free" + grad_clip_norm: no renormalisation, no projection, and the optimiser sees the
    loss's own gradient scaled by clip / ||g|| (computed here on a copy of the SAE)."""
    import copy

    d, n_features, clip = 8, 32, 0.05
    torch.manual_seed(3)
    sae = SparseAutoencoder(d, n_features, l1_coefficient=1e-3, decoder_norm="free")
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, n_features)[:, None])  # rows far from unit norm
    start_norms = sae.W_dec.detach().norm(dim=-1).clone()
    module = SAETrainingModule(sae, lr=1e-3, lr_warmup_steps=1, ghost_grads=False, b_dec_init="mean",
                               grad_clip_norm=clip)
    batches = [{"activations": 3 * torch.randn(64, d) + 1.0} for _ in range(3)]
    reference = copy.deepcopy(sae)
    with torch.no_grad():
        reference.b_dec.copy_(batches[0]["activations"].mean(0))  # b_dec_init="mean" on the first batch
    reference.loss(batches[0]["activations"]).total.backward()
    ref_grads = {k: p.grad for k, p in reference.named_parameters()}
    ref_norm = torch.sqrt(sum(g.pow(2).sum() for g in ref_grads.values()))
    assert ref_norm > 10 * clip, "control: the example's gradient is well above the clip"

    recorder = _GradRecorder()
    trainer = Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])
    trainer.fit(module, DataLoader(batches, batch_size=None))

    assert len(recorder.pre_step) == 3
    first = recorder.pre_step[0]
    torch.testing.assert_close(first["W_dec"][0].norm(dim=-1), start_norms, rtol=0, atol=0)  # not renormalised
    for k, g in ref_grads.items():  # the whole gradient, W_dec's parallel part included, scaled to the clip
        torch.testing.assert_close(first[k][1], g * clip / ref_norm, rtol=1e-4, atol=1e-8,
                                   msg=lambda m, k=k: f"{k}: {m}")
    for step in recorder.pre_step:
        total = torch.sqrt(sum(g.pow(2).sum() for _, g in step.values()))
        assert total == pytest.approx(clip, rel=1e-4)
    norms = sae.W_dec.detach().norm(dim=-1)
    assert (norms - start_norms).abs().max() < 0.01 and (norms - 1).abs().max() > 0.4  # trained, never reset to 1
