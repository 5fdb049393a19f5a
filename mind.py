"""
The MIND algorithm state: inertia calibration, soft-threshold selection, compatibility weights, and the
MetaNet's meta objective — the one object the training loop calls every step.

Per question q with present perspectives K_q:
    scores      s = MetaNet(e, mask)
    selection   I_q = { k : p_k ≥ β · max_j p_j },  p = π(s)           (the arg-max always survives)
    weights     α_k = exp(s_k/τ_s) / Σ_{j∈I_q} exp(s_j/τ_s),  0 outside I_q   (detached)
    calibration c_k ← μ c_k + (1-μ) mean_q ℓ_qk;   L̃_qk ← μ (L̃_qk or c_k) + (1-μ) ℓ_qk
    meta loss   KL( π_τ(s) ‖ π_τ(−L̃_q) )
"""
import torch

from losses import log_pi, meta_loss
from metanet import MetaNet


class InertiaCalibrator:
    """Explicit EMA of the student's per-rationale losses: a per-perspective trend c_k and a
    per-question memory L̃_qk. The trend seeds a question's memory on its first visit, so a rationale
    seen for the first time is judged against how its perspective is doing, not by one noisy loss."""

    def __init__(self, num_perspectives: int, momentum: float):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"inertia μ must be in [0, 1), got {momentum}")
        self.K, self.mu = num_perspectives, momentum
        self.c = torch.zeros(num_perspectives)  # c_k
        self.c_seen = torch.zeros(num_perspectives, dtype=torch.bool)
        self.memory: dict[str, torch.Tensor] = {}  # q -> L̃_q·  [K], NaN where never observed

    @torch.no_grad()
    def update(self, question_ids: list[str], losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """losses[B,K] observed where mask[B,K]; returns L̃[B,K] after the update (the previous memory
        where not observed this time, NaN where never observed)."""
        mu = self.mu
        losses, mask = losses.detach().float().cpu(), mask.cpu()
        # c_k ← μ c_k + (1−μ) mean_{q in batch} ℓ_qk; on its first observation c_k is that mean
        count = mask.sum(0)
        batch_mean = torch.where(mask, losses, 0.0).sum(0) / count.clamp(min=1)
        new_c = torch.where(self.c_seen, mu * self.c + (1 - mu) * batch_mean, batch_mean)
        observed = count > 0
        self.c = torch.where(observed, new_c, self.c)
        self.c_seen |= observed
        # L̃_qk ← μ · (L̃_qk if q was seen before else c_k) + (1−μ) · ℓ_qk
        out = torch.empty_like(losses)
        for b, q in enumerate(question_ids):
            prev = self.memory.get(q, torch.full((self.K,), float("nan")))
            base = torch.where(torch.isnan(prev), self.c, prev)
            cur = torch.where(mask[b], mu * base + (1 - mu) * losses[b], prev)
            self.memory[q] = cur
            out[b] = cur
        return out

    def state_dict(self) -> dict:
        ids = sorted(self.memory)
        mem = torch.stack([self.memory[q] for q in ids]) if ids else torch.zeros(0, self.K)
        return {"K": self.K, "mu": self.mu, "c": self.c.clone(), "c_seen": self.c_seen.clone(), "ids": ids,
                "memory": mem}

    def load_state_dict(self, state: dict) -> None:
        self.K, self.mu = state["K"], state["mu"]
        self.c, self.c_seen = state["c"].clone(), state["c_seen"].clone()
        self.memory = {q: state["memory"][i].clone() for i, q in enumerate(state["ids"])}


def select_perspectives(scores: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """I_q = { k ∈ K_q : p_k ≥ β · max_j p_j }, p = softmax over the present perspectives.
    The arg-max is always kept (even for β > 1); absent perspectives never are. -> bool[B,K]"""
    p = log_pi(scores.detach(), mask).exp()
    keep = (p >= beta * p.max(-1, keepdim=True).values) & mask
    best = torch.zeros_like(mask).scatter(-1, p.argmax(-1, keepdim=True), True) & mask.any(-1, keepdim=True)
    return keep | best


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
                 meta_tau: float = 1.0, student_tau: float = 1.0):
        self.metanet, self.calibrator = metanet, calibrator
        self.beta, self.meta_tau, self.student_tau = beta, meta_tau, student_tau

    def plan(self, features: torch.Tensor, mask: torch.Tensor):
        """-> (scores with grad for the meta loss, or None; selected[B,K]; alpha[B,K])"""
        if self.metanet is None:
            alpha = mask.float() / mask.sum(-1, keepdim=True).clamp(min=1)
            return None, mask.clone(), alpha
        scores = self.metanet(features, mask)  # in train mode: dropout regularises the meta loss
        # selection and α come from the network itself, not from one draw of its dropout noise
        was_training = self.metanet.training
        with torch.no_grad():
            s = self.metanet.eval()(features, mask)
        self.metanet.train(was_training)
        selected = select_perspectives(s, mask, self.beta)
        return scores, selected, compatibility_weights(s, selected, self.student_tau)

    def observe(self, question_ids: list[str], losses: torch.Tensor, observed: torch.Tensor,
                scores: torch.Tensor | None, mask: torch.Tensor):
        """Update the EMA with this step's losses; -> (L̃[B,K], meta loss or None)."""
        filtered = self.calibrator.update(question_ids, losses, observed).to(losses.device)
        if scores is None:
            return filtered, None
        return filtered, meta_loss(scores, filtered, mask, self.meta_tau)
