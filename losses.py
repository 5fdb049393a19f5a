"""
Pure loss functions of MIND (and of the MCC-KD baseline). No state, no model: tensors in, tensors out.

Shapes: B questions, K perspectives (8), T tokens, A answer-span positions, V vocabulary.
`mask[b,k]` is True where perspective k of question b is present (or selected, depending on the caller).
"""
import math

import torch
import torch.nn.functional as F


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
