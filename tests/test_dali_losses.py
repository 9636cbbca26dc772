"""DALI alignment losses: MMD and EMD against hand computations and POT on numpy arrays,
gradients against the analytic OT gradient, attentive OT invariants, and a tiny fit."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from overheard.dali.losses import (
    ALIGNMENT_LOSSES,
    AttentiveWeights,
    attentive_ot,
    emd,
    entropy,
    lambda_schedule,
    mmd_rbf,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------- MMD


def test_mmd_identical_sets_is_zero_and_different_sets_positive():
    x = torch.randn(20, 6, generator=_gen(0))
    assert abs(mmd_rbf(x, x.clone()).item()) < 1e-6
    y = torch.randn(15, 6, generator=_gen(1)) + 1.0
    assert mmd_rbf(x, y).item() > 1e-3
    # All points identical: the bandwidth is 0 and must be guarded (no nan).
    same = torch.ones(4, 3)
    v = mmd_rbf(same, same.clone())
    assert torch.isfinite(v) and abs(v.item()) < 1e-6


def test_mmd_matches_hand_computation_with_loops():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    y = np.array([[1.0, 1.0], [3.0, -1.0]])
    z = np.concatenate([x, y])
    p = len(z)
    d2 = np.zeros((p, p))
    for i in range(p):
        for j in range(p):
            d2[i, j] = sum((z[i, k] - z[j, k]) ** 2 for k in range(2))
    total = 0.0
    for i in range(p):
        for j in range(p):
            if i != j:
                total += d2[i, j]
    s0 = total / (p * p - p)
    bandwidths = [s0 * 2.0 ** e for e in (-2, -1, 0, 1, 2)]

    def k(i, j):
        return sum(math.exp(-d2[i, j] / s) for s in bandwidths) / len(bandwidths)

    xi, yi = range(0, 3), range(3, 5)
    kxx = sum(k(i, j) for i in xi for j in xi) / 9
    kyy = sum(k(i, j) for i in yi for j in yi) / 4
    kxy = sum(k(i, j) for i in xi for j in yi) / 6
    want = kxx + kyy - 2 * kxy

    got = mmd_rbf(torch.tensor(x), torch.tensor(y), kernel_mul=2.0, kernel_num=5)
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_mmd_falls_monotonically_as_y_moves_onto_x():
    x = torch.randn(30, 4, generator=_gen(2))
    y0 = torch.randn(30, 4, generator=_gen(3)) * 0.5 + 2.0
    vals = [mmd_rbf(x, y0 + t * (x - y0)).item() for t in np.linspace(0.0, 1.0, 11)]
    assert all(b < a for a, b in zip(vals, vals[1:])), vals
    assert vals[-1] < 1e-6


def test_mmd_batched_is_mean_of_pairs_and_differentiable():
    x = torch.randn(3, 10, 5, generator=_gen(4), requires_grad=True)
    y = torch.randn(3, 7, 5, generator=_gen(5), requires_grad=True)
    batched = mmd_rbf(x, y)
    per_pair = torch.stack([mmd_rbf(x[i], y[i]) for i in range(3)])
    assert batched.item() == pytest.approx(per_pair.mean().item(), rel=1e-5)
    # Not the MMD of the pooled sets: the pairs really are separate.
    assert batched.item() != pytest.approx(mmd_rbf(x.reshape(-1, 5), y.reshape(-1, 5)).item(),
                                           rel=1e-3)
    batched.backward()
    for g in (x.grad, y.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


# ------------------------------------------------------------------------------------- EMD


def test_emd_permutation_hand_value_and_identical_sets():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # Best matching: (0,0)->(0,1) and (1,0)->(1,1), squared cost 1 each, mass 1/2 each.
    assert emd(x, y).item() == pytest.approx(1.0, abs=1e-12)
    assert emd(x, y).dtype == torch.float32
    z = torch.randn(9, 4, generator=_gen(6))
    assert abs(emd(z, z.clone()).item()) < 1e-9


def test_emd_matches_pot_on_numpy_with_nonuniform_weights():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3)) + 0.5
    a, b = rng.uniform(0.1, 1.0, 7), rng.uniform(0.1, 1.0, 5)
    a, b = a / a.sum(), b / b.sum()
    m = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    want = ot.emd2(a, b, m)
    got = emd(torch.tensor(x), torch.tensor(y), torch.tensor(a), torch.tensor(b))
    assert got.item() == pytest.approx(want, rel=1e-10)
    # Uniform default differs from these weights (the weights are really used).
    assert emd(torch.tensor(x), torch.tensor(y)).item() != pytest.approx(want, rel=1e-6)


def test_emd_gradient_is_analytic_for_a_permutation():
    n = 6
    x = torch.randn(n, 3, generator=_gen(8)) * 10.0
    sigma = torch.randperm(n, generator=_gen(9))  # x_i is matched to y_sigma(i)
    y = torch.empty_like(x)
    y[sigma] = x + 0.1 * torch.randn(n, 3, generator=_gen(10))
    x.requires_grad_(True)
    emd(x, y).backward()
    want = 2.0 * (x.detach() - y[sigma]) / n
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-6)


def test_emd_batched_is_mean_of_pairs():
    x = torch.randn(3, 8, 4, generator=_gen(11))
    y = torch.randn(3, 5, 4, generator=_gen(12))
    per_pair = torch.stack([emd(x[i], y[i]) for i in range(3)])
    assert emd(x, y).item() == pytest.approx(per_pair.mean().item(), rel=1e-6)


# ------------------------------------------------------------------------------ Attentive OT


def _tokens(seed, b=2, na=6, nv=9, d=16):
    g = _gen(seed)
    return torch.randn(b, na, d, generator=g), torch.randn(b, nv, d, generator=g)


def test_attentive_ot_uniform_equals_emd():
    xa, xv = _tokens(13)
    torch.manual_seed(0)
    mod = AttentiveWeights(16, heads=4)
    loss, a, b = attentive_ot(xa, xv, mod, lam=500.0, uniform=True)
    assert loss.item() == pytest.approx(emd(xa, xv).item(), rel=1e-6)
    torch.testing.assert_close(a, torch.full((2, 6), 1 / 6))
    torch.testing.assert_close(b, torch.full((2, 9), 1 / 9))


def test_attentive_weights_are_distributions_and_regulariser_is_nonnegative():
    xa, xv = _tokens(14)
    torch.manual_seed(1)
    mod = AttentiveWeights(16, heads=1, temperature=0.05)
    loss, a, b = attentive_ot(xa, xv, mod, lam=10.0)
    assert a.shape == (2, 6) and b.shape == (2, 9)
    assert (a > 0).all() and (b > 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(2))
    torch.testing.assert_close(b.sum(-1), torch.ones(2))
    assert a.std() > 1e-4  # learned, not uniform
    ot_only, _, _ = attentive_ot(xa, xv, mod, lam=0.0)
    reg = (loss - ot_only).item() / 10.0
    hand = ((math.log(6) - entropy(a)) + (math.log(9) - entropy(b))).mean().item()
    assert reg == pytest.approx(hand, rel=1e-4) and reg > 0
    assert ot_only.item() == pytest.approx(emd(xa, xv, a, b).item(), rel=1e-6)


def test_regulariser_is_zero_at_uniform_weights():
    xa, xv = _tokens(15)
    mod = AttentiveWeights(16, heads=4)
    with torch.no_grad():  # constant scores -> softmax gives exactly uniform weights
        for att in (mod.audio_to_image, mod.image_to_audio):
            att.out_proj.weight.zero_()
            att.out_proj.bias.zero_()
    loss, a, b = attentive_ot(xa, xv, mod, lam=500.0)
    torch.testing.assert_close(a, torch.full((2, 6), 1 / 6))
    assert loss.item() == pytest.approx(emd(xa, xv).item(), abs=1e-5)
    p = torch.tensor([0.5, 0.5, 0.0])
    assert entropy(p).item() == pytest.approx(math.log(2))  # 0 log 0 = 0


def test_attentive_ot_gradients_reach_module_parameters():
    xa, xv = _tokens(16)
    xa.requires_grad_(True)
    torch.manual_seed(2)
    mod = AttentiveWeights(16, heads=8)
    loss, _, _ = attentive_ot(xa, xv, mod, lam=1.0)
    loss.backward()
    for att in (mod.audio_to_image, mod.image_to_audio):
        for p in (att.in_proj_weight, att.out_proj.weight):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert torch.isfinite(xa.grad).all() and xa.grad.abs().sum() > 0


def test_attentive_weights_rejects_bad_heads():
    with pytest.raises(ValueError):
        AttentiveWeights(10, heads=3)


def test_lambda_schedule_endpoints():
    assert lambda_schedule(0)[0] is True
    assert lambda_schedule(0.99)[0] is True
    u1, l1 = lambda_schedule(1)
    assert u1 is False and l1 == pytest.approx(500.0)
    lams = [lambda_schedule(e)[1] for e in range(1, 6)]
    assert all(b < a for a, b in zip(lams, lams[1:]))
    assert lams[-1] == pytest.approx(100.0)
    assert lambda_schedule(9) == (False, pytest.approx(100.0))
    assert lambda_schedule(0, first_uniform=False) == (False, pytest.approx(500.0))
    assert ALIGNMENT_LOSSES == ("mmd", "emd", "attentive_ot")


# --------------------------------------------------------------------------- tiny training


@pytest.mark.parametrize("loss_fn", [mmd_rbf, emd], ids=["mmd", "emd"])
def test_linear_map_learns_to_imitate_image_tokens(loss_fn):
    torch.manual_seed(0)
    audio = torch.randn(4, 24, 8)
    true_map = torch.randn(8, 8)
    # Image tokens: a different draw through a fixed map, so only distributions can match.
    image = torch.randn(4, 24, 8) @ true_map + 1.0
    proj = torch.nn.Linear(8, 8)
    opt = torch.optim.Adam(proj.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        loss = loss_fn(proj(audio), image)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = loss_fn(proj(audio), image).item()
    assert final < 0.5 * first, (first, final)
