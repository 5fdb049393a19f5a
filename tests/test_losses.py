"""Every loss of losses.py against a hand computation."""
import math

import pytest
import torch

import losses as L

LN2, LN3 = math.log(2), math.log(3)


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def test_sequence_ce_shifts_and_ignores_prompt():
    # logits at t predict labels at t+1; position 0's label is -100 (prompt)
    logits = torch.tensor([[[0.0, 0.0], [LN3, 0.0], [99.0, -99.0]]])  # last position predicts nothing
    labels = torch.tensor([[-100, 0, 1]])
    # t=0 -> label 0 under softmax([0,0]): ln 2;  t=1 -> label 1 under softmax([ln3,0]) = [3/4,1/4]: ln 4
    assert L.sequence_ce(logits, labels).item() == pytest.approx((LN2 + math.log(4)) / 2, abs=1e-6)


def test_sequence_ce_per_sequence_means():
    logits = torch.zeros(2, 4, 5)  # uniform: every token costs ln 5
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, -100, 4]])
    out = L.sequence_ce(logits, labels)
    assert out.shape == (2,)
    assert torch.allclose(out, torch.full((2,), math.log(5)))


def test_weighted_sft_ignores_zero_weight_and_nan():
    seq = torch.tensor([[1.0, 2.0, float("nan")], [3.0, 4.0, 5.0]])
    alpha = torch.tensor([[0.25, 0.75, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    # q0: 0.25·1 + 0.75·2 = 1.75;  q1: (3+4+5)/3 = 4;  mean 2.875
    assert L.weighted_sft(seq, alpha).item() == pytest.approx(2.875)


def test_js_divergence_hand_value_symmetry_and_bound():
    p, q = [0.5, 0.5], [0.75, 0.25]  # softmax([0,0]) and softmax([ln3, 0])
    m = [0.625, 0.375]
    want = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    a, b = torch.tensor([0.0, 0.0]), torch.tensor([LN3, 0.0])
    assert L.js_divergence(a, b).item() == pytest.approx(want, abs=1e-6)
    assert L.js_divergence(b, a).item() == pytest.approx(want, abs=1e-6)
    # disjoint supports reach exactly ln 2; identical distributions give 0
    inf = float("inf")
    assert L.js_divergence(torch.tensor([0.0, -inf]), torch.tensor([-inf, 0.0])).item() == pytest.approx(LN2, abs=1e-6)
    assert L.js_divergence(b, b + 7.0).item() == pytest.approx(0.0, abs=1e-7)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 50, generator=g) * 5, torch.randn(100, 50, generator=g) * 5
    j = L.js_divergence(x, y)
    assert j.shape == (100,)
    assert torch.allclose(j, L.js_divergence(y, x), atol=1e-6)
    assert (j >= 0).all() and (j <= LN2 + 1e-6).all()


def test_js_divergence_gradient_is_finite_with_zero_probabilities():
    x = torch.tensor([0.0, -float("inf"), 1.0], requires_grad=True)
    L.js_divergence(x, torch.tensor([1.0, 0.0, 0.0])).backward()
    assert torch.isfinite(x.grad).all()


def _answer_logits():
    # B=1, K=3, A=2, V=2. k0: uniform at both positions; k1: [3/4,1/4] then uniform; k2: garbage
    al = torch.zeros(1, 3, 2, 2)
    al[0, 1, 0] = torch.tensor([LN3, 0.0])
    al[0, 2] = torch.tensor([[50.0, -50.0], [-50.0, 50.0]])
    return al


def test_consistency_loss_hand_value():
    j = 0.5 * kl([0.5, 0.5], [0.625, 0.375]) + 0.5 * kl([0.75, 0.25], [0.625, 0.375])
    al, span = _answer_logits(), torch.ones(1, 3, 2, dtype=torch.bool)
    alpha = torch.tensor([[0.5, 0.5, 0.0]])  # k2 not selected: its garbage must not count
    # one live pair (0,1): α0 α1 = 0.25, JSD averaged over the 2 positions = (j + 0)/2
    assert L.consistency_loss(al, alpha, span).item() == pytest.approx(0.25 * j / 2, abs=1e-6)
    # only the first position valid -> the mean is over that position alone
    span[:, :, 1] = False
    assert L.consistency_loss(al, alpha, span).item() == pytest.approx(0.25 * j, abs=1e-6)
    # a second question with a single selected rationale adds 0 but halves the mean over b
    al2, alpha2 = torch.cat([al, al]), torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    assert L.consistency_loss(al2, alpha2, torch.cat([span, span])).item() == pytest.approx(0.25 * j / 2, abs=1e-6)


def test_consistency_loss_all_pairs_weighted():
    # three uniform-but-one: pairs (0,1),(0,2),(1,2) with α = (0.2, 0.3, 0.5)
    al = torch.zeros(1, 3, 1, 2)
    al[0, 2, 0] = torch.tensor([LN3, 0.0])
    j = 0.5 * kl([0.5, 0.5], [0.625, 0.375]) + 0.5 * kl([0.75, 0.25], [0.625, 0.375])
    want = 0.2 * 0.3 * 0 + 0.2 * 0.5 * j + 0.3 * 0.5 * j
    got = L.consistency_loss(al, torch.tensor([[0.2, 0.3, 0.5]]), torch.ones(1, 3, 1, dtype=torch.bool))
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_meta_loss_direction_and_mask():
    # present {0,1}; π(s) = [1/2, 1/2];  −L̃ = [−1, −1−ln3] -> π(−L̃) = [3/4, 1/4]; k2 absent (NaN loss)
    s = torch.tensor([[0.0, 0.0, 10.0]], requires_grad=True)
    lt = torch.tensor([[1.0, 1.0 + LN3, float("nan")]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    got = L.meta_loss(s, lt, mask, tau=1.0)
    want = kl([0.5, 0.5], [0.75, 0.25])  # KL(π(s) ‖ π(−L̃)) = ½ ln(4/3) ≈ 0.1438
    reverse = kl([0.75, 0.25], [0.5, 0.5])  # ≈ 0.1308: the other direction is a different number
    assert got.item() == pytest.approx(want, abs=1e-6)
    assert abs(want - reverse) > 0.01
    got.backward()
    assert lt.grad is None  # L̃ is a target
    assert s.grad[0, 2] == 0 and torch.isfinite(s.grad).all()


def test_meta_loss_temperature():
    # τ = 2: π(−L̃/τ) = [√3, 1]/(1+√3)
    r3 = math.sqrt(3)
    q = [r3 / (1 + r3), 1 / (1 + r3)]
    s, lt = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0 + LN3]])
    got = L.meta_loss(s, lt, torch.ones(1, 2, dtype=torch.bool), tau=2.0)
    assert got.item() == pytest.approx(kl([0.5, 0.5], q), abs=1e-6)


def test_mcc_kl_bidirectional_hand_value():
    al = torch.zeros(1, 2, 1, 2)
    al[0, 1, 0] = torch.tensor([LN3, 0.0])
    want = 0.5 * (kl([0.5, 0.5], [0.75, 0.25]) + kl([0.75, 0.25], [0.5, 0.5]))
    got = L.mcc_kl(al, torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2, 1, dtype=torch.bool))
    assert got.item() == pytest.approx(want, abs=1e-6)
    # a third, absent perspective changes nothing (mean over present pairs only)
    al3 = torch.cat([al, torch.full((1, 1, 1, 2), 9.0)], 1)
    got3 = L.mcc_kl(al3, torch.tensor([[True, True, False]]), torch.ones(1, 3, 1, dtype=torch.bool))
    assert got3.item() == pytest.approx(want, abs=1e-6)
