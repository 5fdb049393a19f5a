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


# -----------------------------------------------------------------------------
# Memory-lean ℓ and answer logits from hidden states; per-chunk backward of the pairwise answer terms


def assert_rel(got, want, rel=1e-5, what=""):
    """Close relative to the tensor's scale: |got − want| ≤ rel·max|want| elementwise (an elementwise rtol would fail
    on the entries that are ~0 only because of cancellation in a different summation order)."""
    assert got.shape == want.shape
    scale = want.abs().max().clamp(min=1e-30)
    err = (got - want).abs().max()
    assert err <= rel * scale, f"{what} max error {err.item():.3g} > {rel:g} × {scale.item():.3g}"


def _labels(N, T, V, g, prompt=3):
    """Random completion labels; -100 on a prompt of `prompt` tokens and on a random amount of right padding."""
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[:, :prompt] = -100
    for n in range(N):
        pad = int(torch.randint(0, T // 3, (1,), generator=g))
        if pad:
            labels[n, T - pad:] = -100
    return labels


@pytest.mark.parametrize("chunk", [1, 7, 10_000])  # one row at a time, a chunk that does not divide n, one chunk
def test_hidden_ce_equals_sequence_ce_with_bias(chunk):
    g = torch.Generator().manual_seed(1)
    N, T, H, V = 3, 11, 8, 13
    hidden = torch.randn(N, T, H, generator=g, requires_grad=True)
    W = torch.randn(V, H, generator=g, requires_grad=True)
    bias = torch.randn(V, generator=g, requires_grad=True)
    labels = _labels(N, T, V, g)
    labels[2, 3:] = -100  # a sequence without a completion: ℓ = 0, as sequence_ce
    want = L.sequence_ce(torch.nn.functional.linear(hidden, W, bias), labels)
    gw = torch.autograd.grad(want.square().sum(), (hidden, W, bias))  # a non-uniform weighting of the sequences
    got = L.hidden_ce(hidden, W, labels, head_bias=bias, chunk_tokens=chunk)
    gg = torch.autograd.grad(got.square().sum(), (hidden, W, bias))
    assert_rel(got, want)
    assert got[2].item() == 0.0
    for a, b in zip(gg, gw):
        assert_rel(a, b)


def _tiny_qwen2(tie: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    return Qwen2ForCausalLM(cfg).float()


def _param_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk", [16, 37])  # 37 does not divide the number of labelled tokens
def test_hidden_ce_on_qwen2_matches_full_logits_in_every_gradient(tie, chunk):
    model = _tiny_qwen2(tie)
    g = torch.Generator().manual_seed(2)
    N, T, V = 4, 20, model.config.vocab_size
    labels = _labels(N, T, V, g)
    ids = labels.clamp(min=0)
    attn = (labels != -100).long()
    attn[:, :3] = 1  # the prompt is attended to; the padding is not
    assert (labels != -100)[:, 1:].sum() % 37 != 0
    weights = torch.rand(N, generator=g)  # ℓ enters the loss with different weights, as in L_SFT
    want = L.sequence_ce(model(input_ids=ids, attention_mask=attn).logits, labels)
    gw = _param_grads(model, (weights * want).sum())
    head = model.get_output_embeddings().weight
    assert (head is model.model.embed_tokens.weight) == tie
    hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
    got = L.hidden_ce(hidden, head, labels, chunk_tokens=chunk)
    gg = _param_grads(model, (weights * got).sum())
    assert_rel(got, want)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, gg, gw):
        assert a is not None and b is not None, name
        assert_rel(a, b, what=name)


def test_hidden_ce_under_bf16_autocast():
    # the projection in bf16 (as the model's own head under autocast), the log-softmax in fp32
    g = torch.Generator().manual_seed(3)
    N, T, H, V = 2, 9, 16, 50
    hidden = torch.randn(N, T, H, generator=g, requires_grad=True)
    W = torch.randn(V, H, generator=g, requires_grad=True)
    labels = _labels(N, T, V, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(hidden, W)
        assert logits.dtype == torch.bfloat16
        want = L.sequence_ce(logits, labels)
        got = L.hidden_ce(hidden, W, labels, chunk_tokens=5)
    assert got.dtype == torch.float32
    gw = torch.autograd.grad(want.sum(), (hidden, W))
    gg = torch.autograd.grad(got.sum(), (hidden, W))
    assert_rel(got, want, rel=1e-3)
    for a, b in zip(gg, gw):
        assert torch.isfinite(a).all()
        assert_rel(a, b, rel=2e-2)  # bf16 products summed in another order
    fp32 = L.sequence_ce(torch.nn.functional.linear(hidden, W), labels)
    assert not torch.equal(got, fp32)  # the autocast dtype was used


@pytest.mark.parametrize("tie", [False, True])
def test_answer_logits_from_hidden_equal_gathered_full_logits(tie):
    model = _tiny_qwen2(tie)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=g)
    pos = torch.tensor([[5, 6, 7], [8, 9, 0], [2, 3, 4]])  # the second sequence's last slot is padding (position 0)
    full = model(input_ids=ids).logits
    want = full.gather(1, pos.unsqueeze(-1).expand(-1, -1, full.size(-1))).float()
    hidden = model.model(input_ids=ids).last_hidden_state
    got = L.answer_logits_from_hidden(hidden, model.get_output_embeddings().weight, pos)
    assert got.shape == (3, 3, model.config.vocab_size)
    assert_rel(got, want)
    gw = _param_grads(model, want.square().sum())
    gg = _param_grads(model, got.square().sum())
    for a, b in zip(gg, gw):
        assert_rel(a, b)


def _pair_setup(seed=5):
    g = torch.Generator().manual_seed(seed)
    B, K, A, V = 3, 5, 4, 7
    logits = torch.randn(B, K, A, V, generator=g) * 3
    alpha = torch.rand(B, K, generator=g)
    alpha[0, 1] = alpha[1, 0] = alpha[1, 4] = 0.0  # unselected rationales
    alpha[2, 1:] = 0.0  # a question with a single selected rationale: no pair
    alpha = alpha / alpha.sum(1, keepdim=True)
    span = torch.rand(B, K, A, generator=g) > 0.2
    span[:, :, 0] = True
    span[0, 2] = False  # a rationale whose span has no valid position
    return logits, alpha, span


def _chunks(sel, g, sizes):
    """The selected (b,k) in a random order, cut into chunks of the given sizes (mixing questions, as length_chunks)."""
    b, k = sel.nonzero(as_tuple=True)
    order = torch.randperm(b.numel(), generator=g)
    b, k = b[order], k[order]
    out, s = [], 0
    for n in sizes:
        out.append((b[s:s + n], k[s:s + n]))
        s += n
    assert s == b.numel()
    return out


@pytest.mark.parametrize("which", ["cons", "mcc"])
def test_per_chunk_backward_of_pairwise_terms_equals_one_backward(which):
    logits, alpha, span = _pair_setup()
    sel = alpha > 0
    full_fn = (lambda x: L.consistency_loss(x, alpha, span)) if which == "cons" else (lambda x: L.mcc_kl(x, sel, span))
    part_fn = ((lambda live, rows, partners: L.consistency_loss_partial(live, rows, partners, alpha, span))
               if which == "cons" else (lambda live, rows, partners: L.mcc_kl_partial(live, rows, partners, sel, span)))
    x = logits.clone().requires_grad_()
    full = full_fn(x)
    full.backward()
    assert x.grad.abs().sum() > 0
    assert (x.grad[~sel] == 0).all()

    g = torch.Generator().manual_seed(6)
    y = logits.clone().requires_grad_()
    with torch.no_grad():
        partners = y.detach().clone()  # the pre-pass: every rationale's answer logits, no graph
        value = full_fn(partners)  # the term's value for the log comes from the pre-pass
    total = 0.0
    for rows in _chunks(sel, g, [3, 1, 4, sel.sum().item() - 8]):
        part = part_fn(y[rows], rows, partners)  # y[rows]: the chunk's live logits
        part.backward()  # gradients accumulate in y.grad, chunk by chunk
        total += part.item()
    assert value.item() == pytest.approx(full.item(), rel=1e-6)
    assert total == pytest.approx(full.item(), rel=1e-5)  # the chunks' values add up to the term too
    assert_rel(y.grad, x.grad)
    # a single chunk with every rationale is the one-backward case
    z = logits.clone().requires_grad_()
    rows = sel.nonzero(as_tuple=True)
    part_fn(z[rows], rows, partners).backward()
    assert_rel(z.grad, x.grad)


def test_partial_without_pairs_is_zero_with_a_gradient_path():
    logits, alpha, span = _pair_setup()
    x = logits.clone().requires_grad_()
    rows = (torch.tensor([2]), torch.tensor([0]))  # question 2 has one selected rationale: no partner
    out = L.consistency_loss_partial(x[rows], rows, logits, alpha, span)
    assert out.item() == 0.0
    out.backward()
    assert (x.grad == 0).all()


def test_hidden_ce_never_creates_a_tensor_of_all_tokens_by_v():
    # every tensor any op returns, forward and backward (the checkpoint's recomputation included), is recorded
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    g = torch.Generator().manual_seed(7)
    N, T, H, V, chunk = 4, 64, 8, 500, 16
    hidden = torch.randn(N, T, H, generator=g, requires_grad=True)
    W = torch.randn(V, H, generator=g, requires_grad=True)
    labels = _labels(N, T, V, g)
    with Largest() as mode:
        L.hidden_ce(hidden, W, labels, chunk_tokens=chunk).sum().backward()
    assert mode.numel == chunk * V  # a chunk's logits; all tokens' would be N·T·V = 128 000
    assert hidden.grad is not None and W.grad is not None


def test_answer_logits_under_autocast_keep_no_copy_of_the_head_weight():
    # what autograd saves for the backward: the gathered hidden rows and the weight itself, not its [V,H] bf16 cast
    g = torch.Generator().manual_seed(8)
    N, T, H, V = 2, 10, 16, 300
    hidden = torch.randn(N, T, H, generator=g, requires_grad=True)
    W = torch.randn(V, H, generator=g, requires_grad=True)
    pos = torch.tensor([[3, 4], [6, 7]])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            al = L.answer_logits_from_hidden(hidden, W, pos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(hidden, W).gather(1, pos.unsqueeze(-1).expand(-1, -1, V)).float()
    assert al.dtype == torch.float32
    assert torch.equal(al, ref)  # the same bf16 products
    big = [t for t in saved if t.numel() >= V * H]
    assert big and all(t.data_ptr() == W.data_ptr() for t in big)
    assert not any(t.data_ptr() == hidden.data_ptr() for t in saved)  # the [N,T,H] states are not kept either


def test_training_step_three_ways_same_gradients():
    # the step of scripts/bench_memory.py (L_SFT + λ L_cons on a tiny tied Qwen2, chunks of 3 sequences mixing
    # questions): today's full logits with one backward, hidden_ce with one backward, and per-chunk backward
    import argparse
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import bench_memory as BM
    args = argparse.Namespace(vocab=101, hidden=32, layers=2, questions=2, perspectives=4, len=24, rows=3)
    out = {}
    for name, step in BM.STEPS.items():
        model, chunks, alpha, span = BM.build(args)
        assert len(chunks) == 3 and any(len(set(c["rows"][0].tolist())) == 2 for c in chunks)
        loss = step(model, chunks, alpha, span, 30.0, 7)  # λ large: L_cons moves the gradient by ~30%; chunks of 7
        out[name] = loss, {n: p.grad for n, p in model.named_parameters()}
    want, gw = out["full"]
    for name in ("hidden", "chunked"):
        loss, gg = out[name]
        assert loss == pytest.approx(want, rel=1e-5), name
        for n in gw:
            assert_rel(gg[n], gw[n], what=f"{name} {n}")
