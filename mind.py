"""
The MIND algorithm state: inertia calibration, soft-threshold selection, compatibility weights, and the
MetaNet's meta objective — the one object the training loop calls every step.

Per question q with present perspectives K_q:
    scores      s = MetaNet(e, mask)
    selection   I_q = { k : p_k ≥ β · max_j p_j },  p = π_τ(s)     (the arg-max always survives; ours: τ, a floor)
    weights     α_k = exp(s_k/τ_s) / Σ_{j∈I_q} exp(s_j/τ_s),  0 outside I_q   (detached)
    calibration c_k ← μ c_k + (1-μ) mean_q ℓ_qk                       the per-perspective trend
                L̃_qk  by --inertia-rule (ours; the paper gives the EMA's idea, not how a question is filtered):
                  offset    L̃_qk = c_k + EMA_q(ℓ_qk − c_k)   fast trend + slow per-question offset (default)
                  debiased  L̃_qk = EMA_q(ℓ_qk)               bias-corrected like Adam: the first visit is ℓ itself
                  seeded    L̃_qk ← μ (L̃_qk or c_k) + (1-μ) ℓ_qk   the first visit starts from the trend (the old rule)
    meta loss   KL( π_τ(s) ‖ π_τ(−L̃) )
"""
import torch

from losses import log_pi, meta_loss
from metanet import MetaNet

RULES = ("offset", "debiased", "seeded")


class InertiaCalibrator:
    """Explicit EMA of the student's per-rationale losses: a per-perspective trend c_k, updated every step from the
    step's batch, and a per-question memory, updated when the question is visited (about once per epoch).

    Why the default is `offset` (README, "A filtered loss that tracks the student"): a question is revisited once per
    epoch, so any memory of its raw losses is an epoch stale, while the student's losses fall by an order of magnitude
    within one. The trend c_k is fresh every step; the memory keeps only what is particular to the question (how far
    it sits from its perspective's trend), which changes slowly. Every rule's per-question EMA is bias-corrected
    (value = m / w with w ← μ w + (1−μ)), so nothing of an initial value survives: the first visit is the observation."""

    def __init__(self, num_perspectives: int, momentum: float, rule: str = "offset"):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"inertia μ must be in [0, 1), got {momentum}")
        if rule not in RULES:
            raise ValueError(f"inertia rule must be one of {RULES}, got {rule!r}")
        self.K, self.mu, self.rule = num_perspectives, momentum, rule
        self.c = torch.zeros(num_perspectives)  # c_k
        self.c_seen = torch.zeros(num_perspectives, dtype=torch.bool)
        # q -> (v[K], w[K]): the memory's value (the offset o_qk for `offset`, L̃_qk otherwise) and its EMA weight
        # Σ_j (1−μ) μ^j over the visits so far (0: never observed; `seeded` only uses w > 0 as "seen")
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def update(self, question_ids: list[str], losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """losses[B,K] observed where mask[B,K]; returns L̃[B,K] after the update (read from the memory where not
        observed this time, NaN where never observed)."""
        mu = self.mu
        losses, mask = losses.detach().float().cpu(), mask.cpu()
        # c_k ← μ c_k + (1−μ) mean_{q in batch} ℓ_qk; on its first observation c_k is that mean
        count = mask.sum(0)
        batch_mean = torch.where(mask, losses, 0.0).sum(0) / count.clamp(min=1)
        new_c = torch.where(self.c_seen, mu * self.c + (1 - mu) * batch_mean, batch_mean)
        observed = count > 0
        self.c = torch.where(observed, new_c, self.c)
        self.c_seen |= observed
        zeros = torch.zeros(self.K)
        for b, q in enumerate(question_ids):
            v, w = self.memory.get(q, (zeros, zeros))
            if self.rule == "seeded":  # L̃_qk ← μ · (L̃_qk if q was seen before else c_k) + (1−μ) · ℓ_qk
                new_v, new_w = mu * torch.where(w > 0, v, self.c) + (1 - mu) * losses[b], torch.ones(self.K)
            else:  # m ← μ m + (1−μ) x, w ← μ w + (1−μ), value m / w; x = ℓ_qk − c_k (offset) or ℓ_qk (debiased)
                x = losses[b] - self.c if self.rule == "offset" else losses[b]
                new_w = mu * w + (1 - mu)
                new_v = (mu * v * w + (1 - mu) * x) / new_w
            self.memory[q] = (torch.where(mask[b], new_v, v), torch.where(mask[b], new_w, w))
        return self.filtered(question_ids)

    def filtered(self, question_ids: list[str]) -> torch.Tensor:
        """L̃[B,K] as it stands now (for `offset`, with today's trend c_k); NaN where never observed."""
        out = torch.full((len(question_ids), self.K), float("nan"))
        for b, q in enumerate(question_ids):
            if q in self.memory:
                v, w = self.memory[q]
                out[b] = torch.where(w > 0, v + self.c if self.rule == "offset" else v, float("nan"))
        return out

    def state_dict(self) -> dict:
        ids = sorted(self.memory)
        v, w = (torch.stack([self.memory[q][i] for q in ids]) if ids else torch.zeros(0, self.K) for i in (0, 1))
        return {"K": self.K, "mu": self.mu, "rule": self.rule, "c": self.c.clone(), "c_seen": self.c_seen.clone(),
                "ids": ids, "memory": v, "weight": w}

    def load_state_dict(self, state: dict) -> None:
        self.K, self.mu, self.rule = state["K"], state["mu"], state["rule"]
        self.c, self.c_seen = state["c"].clone(), state["c_seen"].clone()
        self.memory = {q: (state["memory"][i].clone(), state["weight"][i].clone()) for i, q in enumerate(state["ids"])}


def select_perspectives(scores: torch.Tensor, mask: torch.Tensor, beta: float, tau: float = 1.0,
                        min_keep: int = 1) -> torch.Tensor:
    """I_q = { k ∈ K_q : p_k ≥ β · max_j p_j }, p = π_τ(s) over the present perspectives, plus the min_keep best
    (the arg-max always: min_keep ≥ 1; absent perspectives never). With s ≈ −L̃ (what the meta loss drives s to),
    k is dropped when L̃_k trails the best by more than τ·ln(1/β) nats: τ sets the threshold's scale (ours; the
    paper's p = π(s) is τ = 1). -> bool[B,K]"""
    p = log_pi(scores.detach(), mask, tau).exp()
    keep = (p >= beta * p.max(-1, keepdim=True).values) & mask
    rank = p.masked_fill(~mask, -1.0).argsort(dim=-1, descending=True, stable=True).argsort(-1)  # 0: the best
    return keep | ((rank < max(1, min_keep)) & mask)


def compatibility_weights(scores: torch.Tensor, selected: torch.Tensor, tau: float) -> torch.Tensor:
    """α_k = exp(s_k/τ_s) / Σ_{j∈I_q} exp(s_j/τ_s) for k ∈ I_q, 0 elsewhere. Detached: the student's loss
    must never train the MetaNet (it would learn to favour whatever is easiest to shrink). -> [B,K]"""
    alpha = log_pi(scores.detach(), selected, tau).exp()
    return torch.where(selected, alpha, torch.zeros_like(alpha))


class Mind:
    """Plan a step (who is trained, with what weight), then observe its losses (EMA + meta loss).

    With metanet=None (the --no-metanet ablation) every present rationale is selected with uniform α;
    the calibrator still runs so that c_k can be logged and compared."""

    def __init__(self, metanet: MetaNet | None, calibrator: InertiaCalibrator, beta: float = 0.5,
                 meta_tau: float = 1.0, student_tau: float = 1.0, min_selected: int = 1, trend_weight: float = 1.0,
                 select_tau: float = 1.0):
        self.metanet, self.calibrator = metanet, calibrator
        self.beta, self.meta_tau, self.student_tau, self.min_selected = beta, meta_tau, student_tau, min_selected
        self.trend_weight, self.select_tau = trend_weight, select_tau

    def target(self, filtered: torch.Tensor) -> torch.Tensor:
        """What the MetaNet learns to prefer: π_τ(−(L̃ − (1−γ) c_k)). γ = 1 is the paper's π_τ(−L̃); γ = 0 (ours) keeps
        only how far q sits from its perspective's trend, so no perspective can win every question: selecting the
        easiest perspective everywhere makes it easier still, and the rest are forgotten (README)."""
        return filtered - (1 - self.trend_weight) * self.calibrator.c.to(filtered.device)

    def plan(self, features: torch.Tensor, mask: torch.Tensor, beta: float | None = None):
        """-> (scores with grad for the meta loss, or None; selected[B,K]; alpha[B,K]). beta: this step's β when a
        curriculum schedules it, else the fixed one."""
        if self.metanet is None:
            alpha = mask.float() / mask.sum(-1, keepdim=True).clamp(min=1)
            return None, mask.clone(), alpha
        scores = self.metanet(features, mask)  # in train mode: dropout regularises the meta loss
        # selection and α come from the network itself, not from one draw of its dropout noise
        was_training = self.metanet.training
        with torch.no_grad():
            s = self.metanet.eval()(features, mask)
        self.metanet.train(was_training)
        selected = select_perspectives(s, mask, self.beta if beta is None else beta, self.select_tau, self.min_selected)
        return scores, selected, compatibility_weights(s, selected, self.student_tau)

    def observe(self, question_ids: list[str], losses: torch.Tensor, observed: torch.Tensor,
                scores: torch.Tensor | None, mask: torch.Tensor):
        """Update the EMA with this step's losses; -> (L̃[B,K], meta loss or None)."""
        filtered = self.calibrator.update(question_ids, losses, observed).to(losses.device)
        if scores is None:
            return filtered, None
        return filtered, meta_loss(scores, self.target(filtered), mask, self.meta_tau)
