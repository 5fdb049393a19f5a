"""Inertia calibration, soft-threshold selection, compatibility weights, and the MetaNet."""
import math

import pytest
import torch

from metanet import MetaNet, mean_pool
from mind import InertiaCalibrator, Mind, compatibility_weights, select_perspectives

nan = float("nan")
T, F = True, False


def test_calibrator_seeded_rule_by_hand():
    cal = InertiaCalibrator(2, momentum=0.5, rule="seeded")
    # step 1: c is the first observation: c0 = mean(1, 3) = 2, c1 = 2 (only q=a observed)
    # first visits start from c: a = .5·2 + .5·(1, 2) = (1.5, 2);  b0 = .5·2 + .5·3 = 2.5, b1 never seen
    out = cal.update(["a", "b"], torch.tensor([[1.0, 2.0], [3.0, nan]]), torch.tensor([[T, T], [T, F]]))
    assert cal.c.tolist() == [2.0, 2.0]
    assert out[0].tolist() == [1.5, 2.0] and out[1, 0].item() == 2.5 and math.isnan(out[1, 1].item())
    # step 2: c = .5·2 + .5·(3, 4) = (2.5, 3);  a = .5·(1.5, 2) + .5·(3, 4) = (2.25, 3)
    out = cal.update(["a"], torch.tensor([[3.0, 4.0]]), torch.tensor([[T, T]]))
    assert cal.c.tolist() == [2.5, 3.0] and out[0].tolist() == [2.25, 3.0]
    # step 3: c is updated FIRST: c = .5·(2.5, 3) + .5·(0, 6) = (1.25, 4.5)
    # b0 = .5·2.5 + .5·0 = 1.25;  b1 first visit uses the just-updated c1: .5·4.5 + .5·6 = 5.25
    out = cal.update(["b"], torch.tensor([[0.0, 6.0]]), torch.tensor([[T, T]]))
    assert cal.c.tolist() == [1.25, 4.5] and out[0].tolist() == [1.25, 5.25]


def test_calibrator_debiased_rule_by_hand():
    # bias-corrected EMA, μ = .5: w1 = .5, L̃1 = x1 (the first visit is the observation itself);
    # w2 = .5·.5 + .5 = .75, L̃2 = (.5·x1·w1 + .5·x2) / w2 = (x1 + 2 x2) / 3 (Adam's m / (1 − β²))
    cal = InertiaCalibrator(2, momentum=0.5, rule="debiased")
    out = cal.update(["a"], torch.tensor([[1.0, 6.0]]), torch.tensor([[T, T]]))
    assert out.tolist() == [[1.0, 6.0]]
    out = cal.update(["a"], torch.tensor([[4.0, 0.0]]), torch.tensor([[T, T]]))
    assert torch.allclose(out, torch.tensor([[3.0, 2.0]]))


def test_calibrator_offset_rule_by_hand():
    # L̃_qk = c_k + o_qk, o = bias-corrected EMA of ℓ − c_k (c_k after this step's update), μ = .5
    cal = InertiaCalibrator(2, momentum=0.5)
    assert cal.rule == "offset"  # the default
    # step 1: c = mean = (2, 4); offsets a = (−1, −1), b = (1, 1): L̃ = the observations
    out = cal.update(["a", "b"], torch.tensor([[1.0, 3.0], [3.0, 5.0]]), torch.ones(2, 2, dtype=torch.bool))
    assert out.tolist() == [[1.0, 3.0], [3.0, 5.0]]
    # step 2, b alone: c = .5·(2, 4) + .5·(0, 1) = (1, 2.5); x = (−1, −1.5); w = .75;
    # o_b = (.5·1·.5 + .5·x) / .75 = (−1/3, −2/3); L̃_b = (2/3, 11/6)
    out = cal.update(["b"], torch.tensor([[0.0, 1.0]]), torch.tensor([[T, T]]))
    assert torch.allclose(cal.c, torch.tensor([1.0, 2.5]))
    assert torch.allclose(out, torch.tensor([[2 / 3, 11 / 6]]))
    # a was not visited, but its L̃ follows its perspectives' trend: c + (−1, −1)
    assert torch.allclose(cal.filtered(["a", "never"])[0], torch.tensor([0.0, 1.5]))
    assert cal.filtered(["never"]).isnan().all()


@pytest.mark.parametrize("rule", ["offset", "debiased", "seeded"])
def test_calibrator_unobserved_keeps_memory(rule):
    cal = InertiaCalibrator(2, momentum=0.9, rule=rule)
    cal.update(["a"], torch.tensor([[1.0, 1.0]]), torch.tensor([[T, T]]))
    before = cal.filtered(["a"])
    c_before = cal.c.clone()
    out = cal.update(["a"], torch.tensor([[100.0, 100.0]]), torch.tensor([[F, F]]))
    assert torch.equal(out, before) and torch.equal(cal.c, c_before)


@pytest.mark.parametrize("rule", ["offset", "debiased", "seeded"])
def test_calibrator_mu_zero_is_instantaneous(rule):
    cal = InertiaCalibrator(3, momentum=0.0, rule=rule)
    for losses in ([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]], [[7.0, 0.5, 2.0], [1.0, 1.5, 4.0]]):
        x = torch.tensor(losses)
        out = cal.update(["a", "b"], x, torch.ones(2, 3, dtype=torch.bool))
        assert torch.allclose(out, x, atol=1e-6)
        assert torch.allclose(cal.c, x.mean(0))


@pytest.mark.parametrize("rule", ["offset", "debiased", "seeded"])
def test_calibrator_detaches_and_round_trips(rule):
    cal = InertiaCalibrator(2, momentum=0.5, rule=rule)
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    out = cal.update(["q"], x * 2, torch.tensor([[T, T]]))
    assert not out.requires_grad
    other = InertiaCalibrator(2, momentum=0.0)
    other.load_state_dict(cal.state_dict())
    y = torch.tensor([[5.0, 1.0]])
    m = torch.tensor([[T, T]])
    assert torch.equal(cal.update(["q"], y, m), other.update(["q"], y, m))
    with pytest.raises(ValueError):
        InertiaCalibrator(2, momentum=1.0)
    with pytest.raises(ValueError):
        InertiaCalibrator(2, momentum=0.5, rule="median")


def test_select_soft_threshold_by_hand():
    # p over present {0,1,3} = [1, 2, -, 1]/4 = [.25, .5, 0, .25]
    s = torch.tensor([[0.0, math.log(2), 10.0, 0.0]])
    mask = torch.tensor([[T, T, F, T]])
    assert select_perspectives(s, mask, 0.5).tolist() == [[T, T, F, T]]  # .25 ≥ .5·.5
    assert select_perspectives(s, mask, 0.6).tolist() == [[F, T, F, F]]  # .25 < .3
    assert select_perspectives(s, mask, 0.0).tolist() == [[T, T, F, T]]  # β = 0 keeps all present
    assert select_perspectives(s, mask, 5.0).tolist() == [[F, T, F, F]]  # the arg-max always survives


def test_select_temperature_and_floor_by_hand():
    # τ = .5: p ∝ exp(2s) over present {0,1,3} = [1, 4, -, 1]/6; β = .5: 1/6 < .5·4/6, only the arg-max survives
    s = torch.tensor([[0.0, math.log(2), 10.0, 0.0]])
    mask = torch.tensor([[T, T, F, T]])
    assert select_perspectives(s, mask, 0.5, tau=0.5).tolist() == [[F, T, F, F]]
    assert select_perspectives(s, mask, 0.24, tau=0.5).tolist() == [[T, T, F, T]]  # 1/6 ≥ .24·4/6
    # a floor of 2 adds the next best (ties broken by the first index); a floor above |K_q| keeps what is present
    assert select_perspectives(s, mask, 0.5, tau=0.5, min_keep=2).tolist() == [[T, T, F, F]]
    assert select_perspectives(s, mask, 0.5, tau=0.5, min_keep=4).tolist() == [[T, T, F, T]]


def test_select_never_keeps_absent_and_handles_ties():
    s = torch.zeros(2, 4)
    mask = torch.tensor([[F, F, T, F], [T, T, T, T]])
    sel = select_perspectives(s, mask, 1.0)
    assert sel.tolist() == [[F, F, T, F], [T, T, T, T]]


def test_compatibility_weights_by_hand():
    s = torch.tensor([[0.0, math.log(3), 5.0]], requires_grad=True)
    sel = torch.tensor([[T, T, F]])
    a = compatibility_weights(s, sel, tau=1.0)
    assert a[0].tolist() == pytest.approx([0.25, 0.75, 0.0])
    r3 = math.sqrt(3)
    assert compatibility_weights(s, sel, tau=2.0)[0].tolist() == pytest.approx([1 / (1 + r3), r3 / (1 + r3), 0.0])
    assert not a.requires_grad  # detached: the student's loss never trains the MetaNet
    g = torch.Generator().manual_seed(1)
    s2 = torch.randn(5, 8, generator=g)
    sel2 = torch.rand(5, 8, generator=g) > 0.4
    sel2[:, 0] = True
    a2 = compatibility_weights(s2, sel2, 0.7)
    assert torch.allclose(a2.sum(1), torch.ones(5)) and (a2[~sel2] == 0).all()


def test_mind_plan_without_metanet_is_uniform():
    mind = Mind(None, InertiaCalibrator(4, 0.9))
    mask = torch.tensor([[T, T, F, T]])
    scores, sel, alpha = mind.plan(None, mask)
    assert scores is None and torch.equal(sel, mask)
    assert alpha[0].tolist() == pytest.approx([1 / 3, 1 / 3, 0, 1 / 3])


def test_metanet_shapes_and_masking():
    torch.manual_seed(0)
    net = MetaNet(feature_dim=6, num_perspectives=4, hidden=16, heads=2, score_heads=3).eval()
    e = torch.randn(2, 4, 6)
    mask = torch.tensor([[T, T, F, T], [T, T, T, T]])
    s = net(e, mask)
    assert s.shape == (2, 4) and s[0, 2] == 0
    # what an absent perspective carries cannot change the others' scores
    e2 = e.clone()
    e2[0, 2] = 100.0
    assert torch.allclose(net(e2, mask)[0], s[0], atol=1e-6)
    # with the synergy layer, a present perspective's feature changes the others' scores ...
    e3 = e.clone()
    e3[1, 0] = torch.randn(6)
    assert not torch.allclose(net(e3, mask)[1, 1:], s[1, 1:], atol=1e-4)
    # ... without it (--no-attention) it does not
    plain = MetaNet(6, 4, hidden=16, heads=2, score_heads=3, attention=False).eval()
    assert torch.allclose(plain(e3, mask)[1, 1:], plain(e, mask)[1, 1:], atol=1e-6)


def test_metanet_score_is_mean_of_heads():
    torch.manual_seed(0)
    net = MetaNet(4, 2, hidden=8, heads=2, score_heads=3, attention=False, dropout=0.0).eval()
    e, mask = torch.randn(1, 2, 4), torch.ones(1, 2, dtype=torch.bool)
    h = net.align(e) + net.perspective.weight
    want = torch.stack([head(h).squeeze(-1) for head in net.heads]).mean(0)
    assert torch.allclose(net(e, mask), want, atol=1e-6)


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [4.0], [6.0]]])
    m = torch.tensor([[T, T, F], [F, T, T]])
    assert mean_pool(h, m).squeeze(-1).tolist() == [2.0, 5.0]


def test_plan_selects_without_dropout_noise():
    torch.manual_seed(0)
    net = MetaNet(6, 4, hidden=16, heads=2, score_heads=2, dropout=0.5).train()
    mind = Mind(net, InertiaCalibrator(4, 0.9), beta=0.5)
    e, mask = torch.randn(3, 4, 6), torch.ones(3, 4, dtype=torch.bool)
    plans = [mind.plan(e, mask) for _ in range(3)]
    assert all(torch.equal(p[2], plans[0][2]) for p in plans)  # α is the same on every call
    assert not torch.equal(plans[0][0], plans[1][0])  # while the meta-loss scores carry dropout
    assert plans[0][0].requires_grad and net.training
    net.eval()
    assert torch.allclose(plans[0][2], compatibility_weights(net(e, mask), plans[0][1], 1.0))
