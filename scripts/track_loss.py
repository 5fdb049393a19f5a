"""
Does the filtered loss L̃ track the student? One train.py run, every rule of L̃ fed the same observations.

    python scripts/track_loss.py                                  # the default run, about 6 minutes on this machine
    python scripts/track_loss.py --out results/tracking -- --steps 200   # flags after -- go to train.py

The run trains with train.py's own default rule; a shadow calibrator of every other rule (and μ = 0, the paper's
instantaneous loss) receives exactly the same update calls: the same questions, losses and observed masks. Every
--every steps, the student runs without gradients over a fixed subset of training questions (all their
perspectives), and each rule is scored on it:

  tracking error   mean |L̃_qk − ℓ_qk(student now)|: how wrong the filtered loss is about the student as it is now
  gain             mean |ΔL̃_qk| / mean |ℓ_qk − L̃_qk| at an update, over the observed (q, k): the fraction of an
                   innovation that L̃ takes in (1: no smoothing, the raw loss; μ-EMA on revisits: 1 − μ)
  step change      mean |ΔL̃_qk| per update (nats): how much L̃ moves from one observation to the next

Writes OUT/tracking.json, OUT/tracking.md and OUT/tracking.png (tracking error over training, one line per rule),
next to the run's own outputs (OUT/run/).
"""
import argparse
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402
from eval import write_json, write_text  # noqa: E402
from mind import RULES, InertiaCalibrator  # noqa: E402
from student import run_student  # noqa: E402

SHADOWS = [(rule, 0.9) for rule in RULES] + [("debiased", 0.0)]  # μ = 0: L̃ is the last observed loss


def label(rule: str, mu: float) -> str:
    return "instantaneous (μ = 0)" if mu == 0 else f"{rule} (μ = {mu:g})"


class Tee(InertiaCalibrator):
    """train.py's calibrator, plus shadows of every rule that see the same updates; it records their gains."""

    def __init__(self, num_perspectives: int, momentum: float, rule: str = "offset"):
        super().__init__(num_perspectives, momentum, rule)
        self.shadows = {label(r, mu): InertiaCalibrator(num_perspectives, mu, r) for r, mu in SHADOWS}
        self.moves = {name: [0.0, 0.0, 0] for name in self.shadows}  # Σ|ΔL̃|, Σ|ℓ − L̃ before|, n

    def update(self, question_ids, losses, mask):
        losses, mask = losses.detach().float().cpu(), mask.cpu()
        for name, cal in self.shadows.items():
            before = cal.filtered(question_ids)
            after = cal.update(question_ids, losses, mask)
            seen = mask & ~torch.isnan(before)  # a first visit has nothing to move from
            m = self.moves[name]
            m[0] += (after - before)[seen].abs().sum().item()
            m[1] += (losses - before)[seen].abs().sum().item()
            m[2] += int(seen.sum())
        return super().update(question_ids, losses, mask)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/tracking", help="output directory (the run itself goes to OUT/run)")
    ap.add_argument("--every", type=int, default=25, help="score the rules every N optimiser steps")
    ap.add_argument("--subset", type=int, default=64, help="training questions of the fixed scoring subset")
    ap.add_argument("train_args", nargs="*", help="flags for train.py, after --")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    train.InertiaCalibrator = Tee  # the only change to the run: its calibrator also feeds the shadows
    rows, held = [], {}

    def on_step(loop, step):
        if step % a.every:
            return
        gen = torch.Generator().manual_seed(0)
        qs = sorted(torch.randperm(len(loop.qids), generator=gen)[:a.subset].tolist())
        pairs = [(q, k) for q in qs for k in range(train.K) if loop.mask[q, k]]
        was = loop.model.training
        loop.model.eval()
        with torch.no_grad():
            now = run_student(loop.model, loop.tokenizer, [loop.seqs[q][k] for q, k in pairs], loop.compute,
                              answers=False).losses.float().cpu()
        loop.model.train(was)
        cal = held["calibrator"] = loop.mind.calibrator
        row = {"step": step, "loss_now": now.mean().item(), "error": {}}
        for name, shadow in cal.shadows.items():
            filt = shadow.filtered([loop.qids[q] for q in qs])
            est = torch.stack([filt[qs.index(q), k] for q, k in pairs])
            row["error"][name] = (est - now).abs().nanmean().item()
        rows.append(row)
        print(f"step {step}: ℓ now {row['loss_now']:.3f}; tracking error " +
              ", ".join(f"{n} {e:.3f}" for n, e in row["error"].items()))

    metrics = train.main(["--out", os.path.join(a.out, "run"), *a.train_args], on_step=on_step)
    moves = held["calibrator"].moves
    half = len(rows) // 2
    table = []
    for r, mu in SHADOWS:
        n = label(r, mu)
        err = [row["error"][n] for row in rows]
        moved, innovation, count = moves[n]
        table.append({"rule": n, "error": sum(err) / len(err), "error_first_half": sum(err[:half]) / max(1, half),
                      "error_second_half": sum(err[half:]) / max(1, len(err) - half),
                      "gain": moved / max(innovation, 1e-12), "step_change": moved / max(count, 1)})
    default = label(metrics["config"]["inertia_rule"], metrics["config"]["inertia"])
    report = {"train_args": a.train_args, "default": default, "table": table, "rows": rows,
              "id_accuracy": metrics["eval"]["id"]["accuracy"]}
    write_json(os.path.join(a.out, "tracking.json"), report)
    lines = [f"`python scripts/track_loss.py {' '.join(sys.argv[1:] if argv is None else argv)}`; the run trains with "
             f"{default}. Mean over {len(rows)} checkpoints (every {a.every} steps, {a.subset} questions x their "
             f"perspectives); the student's mean loss there went from {rows[0]['loss_now']:.3f} to "
             f"{rows[-1]['loss_now']:.3f} nats.", "",
             "| rule of L̃ | tracking error (nats) | first half | second half | gain | step change (nats) |",
             "|---|---:|---:|---:|---:|---:|"]
    for t in table:
        lines.append(f"| {t['rule']} | {t['error']:.3f} | {t['error_first_half']:.3f} | {t['error_second_half']:.3f} "
                     f"| {t['gain']:.3f} | {t['step_change']:.3f} |")
    write_text(os.path.join(a.out, "tracking.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, [t["rule"] for t in table], os.path.join(a.out, "tracking.png"))
    return report


def plot(rows: list[dict], names: list[str], path: str) -> None:
    from plots import plt  # noqa: E402  (scripts/plots.py: matplotlib, files only)
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for n in names:
        ax.plot(steps, [r["error"][n] for r in rows], marker="o", ms=3, label=n)
    ax.plot(steps, [r["loss_now"] for r in rows], color="k", ls=":", label="ℓ now (the student's mean loss)")
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("mean |L̃ − ℓ now| (nats, log scale)")
    ax.set_title("how far the filtered loss is from the student as it is now", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot.close(fig)


if __name__ == "__main__":
    main()
