"""
Pure loss functions of MIND (and of the MCC-KD baseline). No state, no model: tensors in, tensors out.

Shapes: B questions, K perspectives (8), T tokens, A answer-span positions, V vocabulary.
`mask[b,k]` is True where perspective k of question b is present (or selected, depending on the caller).
"""
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def log_pi(x: torch.Tensor, mask: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """log π_τ(x)_k = log( exp(x_k/τ) / Σ_{j∈mask} exp(x_j/τ) ), -inf outside the mask. [B,K] -> [B,K]"""
    return torch.log_softmax((x / tau).masked_fill(~mask, float("-inf")), dim=-1)


def sequence_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ℓ: mean next-token cross-entropy per sequence. logits[B,T,V] at t predict labels[B,T] at t+1;
    label -100 is ignored (prompt, padding). -> [B]"""
    logp = logits[:, :-1].float()
    target = labels[:, 1:]
    tok = F.cross_entropy(logp.transpose(1, 2), target, ignore_index=-100, reduction="none")  # [B,T-1]
    n = (target != -100).sum(1)
    return tok.sum(1) / n.clamp(min=1)


def weighted_sft(seq_losses: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """L_SFT = mean_b Σ_k α_bk · ℓ_bk. Entries with α = 0 are ignored even if their ℓ is not finite
    (a rationale that was never run carries no loss). [B,K],[B,K] -> scalar"""
    terms = torch.where(alpha > 0, alpha * seq_losses, torch.zeros_like(seq_losses))
    return terms.sum(1).mean()


def js_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """JSD(P‖Q) = ½ KL(P‖M) + ½ KL(Q‖M), M = ½(P+Q), in nats, for P = softmax(logits_p), Q = softmax(logits_q)
    over the last dim. Symmetric, 0 iff P = Q, at most ln 2. [...,V],[...,V] -> [...]"""
    lp = torch.log_softmax(logits_p.float(), -1)
    lq = torch.log_softmax(logits_q.float(), -1)
    lm = torch.logaddexp(lp, lq) - math.log(2.0)  # log M, computed in log space for stability
    return (0.5 * (_kl(lp, lm) + _kl(lq, lm))).clamp(min=0.0)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q) = Σ_v P_v (log P_v − log Q_v) over the last dim, with 0·log 0 = 0."""
    p = log_p.exp()
    # where P_v = 0 the term is 0; masking the difference (not the product) keeps gradients finite
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(p))
    return (p * diff).sum(-1)


def _pairs(k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    i, j = torch.triu_indices(k, k, offset=1, device=device)
    return i, j


def consistency_loss(answer_logits: torch.Tensor, alpha: torch.Tensor, span_mask: torch.Tensor) -> torch.Tensor:
    """L_cons = mean_b Σ_{i<j} α_i α_j · mean_{a valid} JSD(P_i,a ‖ P_j,a).

    P_i,a is the student's next-token distribution at answer position a when conditioned on rationale i;
    the spans of one question align exactly because every rationale ends in the same final line.
    answer_logits[B,K,A,V], alpha[B,K], span_mask[B,K,A] -> scalar"""
    B, K = alpha.shape
    i, j = _pairs(K, alpha.device)
    w = alpha[:, i] * alpha[:, j]  # α_i α_j   [B,P]
    live = w > 0
    if not live.any():
        return answer_logits.sum() * 0.0
    b_idx, p_idx = live.nonzero(as_tuple=True)  # only the pairs that carry weight are computed
    li, lj = answer_logits[b_idx, i[p_idx]], answer_logits[b_idx, j[p_idx]]  # [n,A,V]
    valid = (span_mask[b_idx, i[p_idx]] & span_mask[b_idx, j[p_idx]]).float()  # [n,A]
    jsd = (js_divergence(li, lj) * valid).sum(-1) / valid.sum(-1).clamp(min=1)  # mean over a
    per_q = torch.zeros(B, device=alpha.device).index_add(0, b_idx, w[b_idx, p_idx] * jsd)
    return per_q.mean()


def meta_loss(scores: torch.Tensor, filtered_losses: torch.Tensor, mask: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """L_meta = mean_b KL( π_τ(s) ‖ π_τ(−L̃) ), both softmaxes over the present perspectives only.

    The direction is the authors': the MetaNet's distribution first, the loss-derived target second.
    L̃ is a target: no gradient flows into it. scores[B,K], filtered_losses[B,K], mask[B,K] -> scalar"""
    mask = mask & torch.isfinite(filtered_losses)
    log_p = log_pi(scores, mask, tau)
    log_q = log_pi(-filtered_losses.detach(), mask, tau)
    return _kl(log_p, log_q).mean()  # absent k: P_k = 0, so they add nothing


def mcc_kl(answer_logits: torch.Tensor, mask: torch.Tensor, span_mask: torch.Tensor) -> torch.Tensor:
    """MCC-KD's answer consistency (Chen et al. 2023): for every pair of present rationales, the
    bidirectional KL ½[KL(P_i‖P_j) + KL(P_j‖P_i)] on the aligned answer span, averaged over positions,
    over pairs, and over questions. answer_logits[B,K,A,V], mask[B,K], span_mask[B,K,A] -> scalar"""
    B, K = mask.shape
    i, j = _pairs(K, mask.device)
    live = mask[:, i] & mask[:, j]  # [B,P]
    if not live.any():
        return answer_logits.sum() * 0.0
    b_idx, p_idx = live.nonzero(as_tuple=True)
    lp = torch.log_softmax(answer_logits[b_idx, i[p_idx]].float(), -1)
    lq = torch.log_softmax(answer_logits[b_idx, j[p_idx]].float(), -1)
    sym = 0.5 * (_kl(lp, lq) + _kl(lq, lp))  # [n,A]
    valid = (span_mask[b_idx, i[p_idx]] & span_mask[b_idx, j[p_idx]]).float()
    per_pair = (sym * valid).sum(-1) / valid.sum(-1).clamp(min=1)
    n_pairs = live.sum(1).clamp(min=1).float()
    per_q = torch.zeros(B, device=mask.device).index_add(0, b_idx, per_pair) / n_pairs
    return per_q.mean()


# -----------------------------------------------------------------------------
# Memory-lean forms of ℓ and of the answer-span logits (issue 13): the loss is computed from the final hidden states
# and the LM head's weight, so no [all tokens, V] tensor ever exists. Same values and gradients as sequence_ce on the
# full logits.


def _token_nll(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """−log softmax(h Wᵀ + b)_y per row. The projection runs in the autocast dtype when autocast is on (as the model's
    own lm_head would), the log-softmax in fp32 (as sequence_ce does). [n,H],[V,H],[V]|None,[n] -> [n] fp32"""
    logits = F.linear(h, weight, bias)  # z = h Wᵀ + b   [n,V]
    return F.cross_entropy(logits.float(), y, reduction="none")  # −log softmax(z)_y


def hidden_ce(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
              head_bias: torch.Tensor | None = None, chunk_tokens: int = 1024) -> torch.Tensor:
    """ℓ: mean next-token cross-entropy per sequence, equal to sequence_ce(hidden @ head_weightᵀ + head_bias, labels)
    in value and gradient, without materialising the logits of all tokens.

    hidden[N,T,H] are the final hidden states (after the final norm); the state at t predicts labels[t+1]; label -100
    is ignored. Only the positions whose next label counts are projected, `chunk_tokens` rows at a time; each chunk
    runs under activation checkpointing, so autograd keeps the chunk's hidden rows and recomputes its [chunk, V]
    logits in the backward. Peak extra memory: a few [chunk_tokens, V] fp32 tensors at a time.
    Call it inside the same autocast region as the model for a bf16 projection. -> [N] fp32"""
    N, T, H = hidden.shape
    target = F.pad(labels[:, 1:], (0, 1), value=-100)  # target[t] = labels[t+1]; the last position predicts nothing
    keep = (target != -100).reshape(-1)
    idx = keep.nonzero().squeeze(1)  # flat positions with a label: prompt and padding get no logits at all
    h = hidden.reshape(N * T, H).index_select(0, idx)  # [n,H]
    y = target.reshape(-1).index_select(0, idx)  # [n]
    tok = [checkpoint(_token_nll, h[s:s + chunk_tokens], head_weight, head_bias, y[s:s + chunk_tokens],
                      use_reentrant=False, preserve_rng_state=False)  # the head draws no random numbers
           for s in range(0, idx.numel(), chunk_tokens)]
    tok = torch.cat(tok) if tok else hidden.new_zeros(0, dtype=torch.float32)
    row = torch.div(idx, T, rounding_mode="floor")  # the sequence of each projected position
    total = torch.zeros(N, dtype=torch.float32, device=hidden.device).index_add(0, row, tok)  # Σ_t −log p(y_t+1)
    n = keep.reshape(N, T).sum(1)
    return total / n.clamp(min=1)  # ℓ = mean over the completion tokens, as sequence_ce


def answer_logits_from_hidden(hidden: torch.Tensor, head_weight: torch.Tensor, answer_pos: torch.Tensor,
                              head_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The logits at the answer-span positions only: equal to full_logits.gather(1, answer_pos) of the model's own
    head, in fp32 (what consistency_loss and mcc_kl read). hidden[N,T,H], answer_pos[N,A] -> [N,A,V]

    The projection is checkpointed: under autocast a plain F.linear would save the bf16 copy of the head weight
    ([V,H], 0.47 GB for Qwen2.5-1.5B) for the backward, once per chunk of the step. The rows are taken with
    index_select, which saves only the index (gather would keep all of `hidden` alive for its backward)."""
    N, T, H = hidden.shape
    flat = answer_pos + T * torch.arange(N, device=answer_pos.device).unsqueeze(1)  # position in hidden[N·T]
    h = hidden.reshape(N * T, H).index_select(0, flat.reshape(-1)).view(*answer_pos.shape, H)  # [N,A,H]
    return checkpoint(_project, h, head_weight, head_bias, use_reentrant=False, preserve_rng_state=False)


def _project(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(h, weight, bias).float()  # z_a = h_a Wᵀ + b, read in fp32


# -----------------------------------------------------------------------------
# Per-chunk backward of the pairwise answer terms.
#
# L = Σ_{i<j} w_ij D(x_i, x_j) with D symmetric (D(x,y) = D(y,x)) and w symmetric. Then
#   ∂L/∂x_i = Σ_{j≠i} w_ij ∂₁D(x_i, x_j),
# which is the gradient w.r.t. x_i of Σ_{j≠i} w_ij D(x_i, sg(x_j)) (sg: stop-gradient). So a chunk of rationales can
# backpropagate its own share as soon as it has run, given the detached answer logits of every rationale of the step
# (a no-grad pre-pass): the chunks' gradients add up to the gradient of L, pair by pair.


def _pairwise_partial(live_logits: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor], partner_logits: torch.Tensor,
                      pair_w: torch.Tensor, span_mask: torch.Tensor, div) -> torch.Tensor:
    """mean_b Σ_{r∈rows} Σ_{j≠k_r} w[b_r,k_r,j] · mean_{a valid} div(live_r,a, sg partner[b_r,j],a), returned with half
    that value and the full gradient (see the callers)."""
    b, k = rows
    B, K = partner_logits.shape[:2]
    w = pair_w[b, k].masked_fill(torch.arange(K, device=k.device) == k.unsqueeze(1), 0.0)  # [n,K], no self-pair
    r_idx, j_idx = (w > 0).nonzero(as_tuple=True)  # only the partners that carry weight are computed
    if r_idx.numel() == 0:
        return live_logits.sum() * 0.0
    bj = b[r_idx]
    li, lj = live_logits[r_idx], partner_logits[bj, j_idx].detach()  # x_i live, sg(x_j)   [m,A,V]
    valid = (span_mask[bj, k[r_idx]] & span_mask[bj, j_idx]).float()  # [m,A]
    d = (div(li, lj) * valid).sum(-1) / valid.sum(-1).clamp(min=1)  # mean over a
    s = (w[r_idx, j_idx] * d).sum() / B  # mean over b (B questions of the step)
    # every pair is visited once from each end over the chunks, so half of s is this chunk's share of L's value,
    # while the gradient must be all of ∂s (each visit carries only its own end's gradient)
    return s - 0.5 * s.detach()


def consistency_loss_partial(live_logits: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor],
                             partner_logits: torch.Tensor, alpha: torch.Tensor, span_mask: torch.Tensor) -> torch.Tensor:
    """One chunk's share of L_cons = mean_b Σ_{i<j} α_i α_j · mean_a JSD(P_i,a ‖ P_j,a), for a per-chunk backward.

    live_logits[n,A,V]: answer-span logits, with gradient, of the chunk's rationales (b,k) = rows (two [n] index
    tensors, as from mask.nonzero(as_tuple=True)); partner_logits[B,K,A,V]: the same logits of every rationale of the
    step, detached (a no-grad pre-pass); alpha[B,K] (a constant here), span_mask[B,K,A].
    Gradient w.r.t. live_logits: exactly that of consistency_loss(all logits) w.r.t. those rows. Value: half of the
    chunk's pairs, so the values of a partition of the rationales into chunks add up to consistency_loss (computed with
    the partners' pre-pass values). -> scalar"""
    a = alpha.detach()
    w = a.unsqueeze(2) * a.unsqueeze(1)  # w_ij = α_i α_j   [B,K,K]
    return _pairwise_partial(live_logits, rows, partner_logits, w, span_mask, js_divergence)


def _sym_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """½[KL(P‖Q) + KL(Q‖P)] over the last dim, as in mcc_kl. [...,V],[...,V] -> [...]"""
    lp = torch.log_softmax(logits_p.float(), -1)
    lq = torch.log_softmax(logits_q.float(), -1)
    return 0.5 * (_kl(lp, lq) + _kl(lq, lp))


def mcc_kl_partial(live_logits: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor], partner_logits: torch.Tensor,
                   mask: torch.Tensor, span_mask: torch.Tensor) -> torch.Tensor:
    """One chunk's share of mcc_kl (uniform weight 1/#pairs over the present pairs of a question), as
    consistency_loss_partial is of consistency_loss. mask[B,K]: the present rationales. -> scalar"""
    m = mask.float()
    n_pairs = (m.sum(1) * (m.sum(1) - 1) / 2).clamp(min=1)  # present pairs i<j of each question
    w = m.unsqueeze(2) * m.unsqueeze(1) / n_pairs.view(-1, 1, 1)  # w_ij = 1/#pairs for present i, j   [B,K,K]
    return _pairwise_partial(live_logits, rows, partner_logits, w, span_mask, _sym_kl)
