"""
How uneven is a student across perspectives before training? Read the probe of one or more train.py runs.

    python scripts/probe_spread.py out/default out/smollm2          # each OUT/probe.pt (ℓ⁰ of the initial student)
    python scripts/probe_spread.py out/default --beta 0.5 --tau 0.25 1

Per run: the mean ℓ⁰ per perspective, the spread of ℓ⁰ across a question's perspectives (max − min, nats: 10th,
50th and 90th percentile over questions), and how many perspectives selection would keep if the scores were exactly
s = −ℓ⁰ (the meta loss's optimum), for each τ of p = π_τ(s) and the given β: k is kept when ℓ⁰_k − min_j ℓ⁰_j ≤
τ·ln(1/β). This is what tells whether a threshold bites for that student (README, "The Teaching Assistant acts").
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import perspectives as P  # noqa: E402


def spread(l0: torch.Tensor, beta: float, taus: list[float]) -> dict:
    """l0[Q,K] (NaN where absent) -> per-perspective means, spread percentiles, mean kept per τ."""
    present = ~torch.isnan(l0)
    hi = torch.where(present, l0, -math.inf).max(1).values
    lo = torch.where(present, l0, math.inf).min(1).values
    q = torch.quantile(hi - lo, torch.tensor([0.1, 0.5, 0.9])).tolist()
    kept = {tau: ((l0 - lo[:, None] <= tau * math.log(1 / beta)) & present).sum(1).float().mean().item()
            for tau in taus}
    return {"mean": {k: l0[:, i][present[:, i]].mean().item() for i, k in enumerate(P.KEYS) if present[:, i].any()},
            "spread_p10_p50_p90": q, "kept": kept, "questions": len(l0)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="train.py output directories (each with probe.pt)")
    ap.add_argument("--beta", type=float, default=0.5, help="β of the selection threshold")
    ap.add_argument("--tau", type=float, nargs="+", default=[0.25, 1.0], help="τ of p = π_τ(s) in selection")
    a = ap.parse_args(argv)
    out = {}
    for run in a.runs:
        path = os.path.join(run, "probe.pt")
        if not os.path.exists(path):
            raise SystemExit(f"error: {path}: no such file (a --method mind or --no-metanet run writes it)")
        r = out[run] = spread(torch.load(path)["l0"].float(), a.beta, a.tau)
        print(f"{run}: {r['questions']} questions; mean ℓ⁰ " +
              ", ".join(f"{k} {v:.2f}" for k, v in r["mean"].items()))
        p10, p50, p90 = r["spread_p10_p50_p90"]
        print(f"  spread max−min across a question's perspectives: p10 {p10:.2f}, median {p50:.2f}, p90 {p90:.2f} "
              f"nats; kept at β = {a.beta} if s = −ℓ⁰: " +
              ", ".join(f"τ = {t:g}: {k:.2f}" for t, k in r["kept"].items()))
    return out


if __name__ == "__main__":
    main()
