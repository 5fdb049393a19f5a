"""
Plots of MIND's training dynamics from train.py's outputs.

    python scripts/plots.py out/default                   # one train.py output directory -> out/default/plots/
    python scripts/plots.py out/default --out figs        # elsewhere
    (scripts/reproduce.py calls make_all on results/runs/ after its runs)

From OUT/log.jsonl:
  ck_trends.png     the per-perspective loss trend c_k over training (the EMA the MetaNet's target is built from)
  selection.png     mean selected-set size |I_q| and entropy of the weights α over training
From OUT/probe.pt (features, ℓ⁰) and the MetaNet's state:
  metanet_scores.png  the distribution over training questions of each perspective's selection probability
                      p_k = π(s)_k at the start of the joint stage and at the end, and the meta target π(−L̃)
                      at the end.
                      Start: OUT/metanet_start.pt (the MetaNet right after warm-up) when train.py saved it; otherwise
                      the warm-up target π(−ℓ⁰), which the warm-up fits to a KL of ~1e-4 (train.log prints it).
                      End: OUT/final_state.pt (written by reproduce.py) or OUT/ckpt/trainer.pt.
"""
import argparse
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import perspectives as P  # noqa: E402

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def plt():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as pyplot
    return pyplot


def read_log(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a half-written last line
    return rows


def smooth(x: np.ndarray, w: int) -> np.ndarray:
    """Trailing running mean over w steps (shorter at the start), so early steps are not hidden."""
    c = np.cumsum(np.insert(np.asarray(x, float), 0, 0.0))
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(0, i - w)
    return (c[i] - c[lo]) / (i - lo)


def series(logs: list[list[dict]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """-> steps [T], values [runs, T, ...] over the steps every log has."""
    T = min(len(r) for r in logs)
    steps = np.array([r["step"] for r in logs[0][:T]])
    return steps, np.array([[row[key] for row in r[:T]] for r in logs], dtype=float)


def plot_ck(logs: list[list[dict]], path: str, title: str) -> str:
    steps, c = series(logs, "c")  # [runs, T, K]
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 4.2))
    mean = c.mean(0)
    for k, key in enumerate(P.KEYS):
        ax.plot(steps, mean[:, k], color=COLORS[k], label=key, lw=1.6)
        if len(logs) > 1:
            ax.fill_between(steps, c[:, :, k].min(0), c[:, :, k].max(0), color=COLORS[k], alpha=0.15, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("c_k (EMA of the mean token CE, log scale)")
    ax.set_title(title + (f" (mean of {len(logs)} seeds, band: min–max)" if len(logs) > 1 else ""), fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot.close(fig)
    return path


def plot_selection(runs: dict[str, list[list[dict]]], path: str, window: int = 25) -> str:
    """runs: {label: logs of its seeds}. Two panels: |I_q| and α entropy, smoothed, mean over seeds."""
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(10, 3.8))
    for i, (lab, logs) in enumerate(runs.items()):
        for ax, key in zip(axes, ("sel", "alpha_entropy")):
            steps, v = series(logs, key)
            ax.plot(steps, smooth(v.mean(0), window), label=lab, color=COLORS[i % len(COLORS)], lw=1.5)
    axes[0].axhline(P.K, color="k", ls=":", lw=1)
    axes[1].axhline(np.log(P.K), color="k", ls=":", lw=1)
    axes[0].set_ylabel("mean |I_q| (selected perspectives)")
    axes[1].set_ylabel("entropy of α (nats; dotted: ln 8, uniform)")
    for ax in axes:
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"selected-set size (running mean over {window} steps)", fontsize=10)
    axes[1].set_title("how peaked the compatibility weights are", fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot.close(fig)
    return path


def plot_run(rows: list[dict], path: str, window: int = 10) -> str:
    """One MIND run from its log rows: how often each perspective is selected (and mean |I_q|), its mean α, and
    its loss trend c_k, over training. train.py draws it into OUT/mind.png."""
    pyplot = plt()
    steps = np.array([r["step"] for r in rows])
    fig, axes = pyplot.subplots(1, 3, figsize=(15, 4))
    for key, ax in zip(("sel_k", "alpha", "c"), axes):
        v = np.array([r[key] for r in rows], dtype=float)  # [T, K]
        for k, name in enumerate(P.KEYS):
            y = v[:, k] if key == "c" else smooth(v[:, k], window)
            ax.plot(steps, y, color=COLORS[k], label=name, lw=1.4)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    sel = axes[0].twinx()
    sel.plot(steps, smooth(np.array([r["sel"] for r in rows]), window), color="k", ls="--", lw=1.2)
    sel.set_ylabel("mean |I_q| (dashed)")
    sel.set_ylim(0, P.K + 0.2)
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("fraction of questions with k ∈ I_q")
    axes[0].set_title(f"selection (running mean over {window} steps)", fontsize=10)
    axes[1].axhline(1 / P.K, color="k", ls=":", lw=1)
    axes[1].set_ylabel("mean α_k (0 when not selected; dotted: 1/8)")
    axes[1].set_title("compatibility weights", fontsize=10)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("c_k (nats, log scale)")
    axes[2].set_title("per-perspective loss trend", fontsize=10)
    axes[2].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)
    return path


def metanet_probs(run_dir: str) -> dict:
    """p = π(s) per training question and perspective at the start and the end of the joint stage, and the meta
    target π(−L̃) at the end. -> {name: array [Q, K]} (NaN where a perspective is absent), 'start_source'."""
    import torch

    import losses as L
    from metanet import MetaNet
    probe = torch.load(os.path.join(run_dir, "probe.pt"))
    features, l0 = probe["features"].float(), probe["l0"].float()
    mask = ~torch.isnan(l0)
    cfg = json.load(open(os.path.join(run_dir, "metrics.json")))["config"]

    def probs(state: dict) -> torch.Tensor:
        net = MetaNet(features.size(-1), P.K, cfg["meta_hidden"], cfg["meta_attn_heads"], cfg["meta_score_heads"],
                      attention=not cfg["no_attention"], dropout=cfg["meta_dropout"])
        net.load_state_dict(state)
        net.eval()  # no dropout: the scores the MetaNet stands for
        with torch.no_grad():
            return L.log_pi(net(features, mask), mask).exp()

    out = {}
    start = os.path.join(run_dir, "metanet_start.pt")
    if os.path.exists(start):
        st = torch.load(start, map_location="cpu")
        out["start"], out["start_source"] = probs(st.get("metanet", st)), "MetaNet after warm-up"  # bare or wrapped
    else:
        out["start"], out["start_source"] = L.log_pi(-l0.nan_to_num(0.0), mask).exp(), "warm-up target π(−ℓ⁰)"
    for name in ("final_state.pt", os.path.join("ckpt", "trainer.pt")):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            state = torch.load(path, weights_only=False, map_location="cpu")
            out["end"] = probs(state["metanet"])
            cal = state["calibrator"]
            ids = {q: i for i, q in enumerate(cal["ids"])}
            # the calibrator keys questions by id; probe.pt rows follow the training order, as do the ids train.py
            # gives the synthetic world (synth-train-SEED-i)
            seed = cfg["seed"]
            rows = [ids.get(f"synth-train-{seed}-{i}") for i in range(len(l0))]
            if all(r is not None for r in rows):
                mem = cal["memory"][rows].float()
                m = mask & torch.isfinite(mem)
                out["target_end"] = L.log_pi(-mem.nan_to_num(0.0), m).exp()
            break
    return {k: (v.masked_fill(~mask, float("nan")).numpy() if hasattr(v, "numpy") else v) for k, v in out.items()}


def plot_scores(pr: dict, path: str, title: str, beta: float | None = None) -> str:
    pyplot = plt()
    panels = [("start", f"start of the joint stage: {pr['start_source']}"), ("end", "end: MetaNet p = π(s)"),
              ("target_end", "end: meta target π(−L̃)")]
    panels = [(k, t) for k, t in panels if k in pr]
    fig, ax = pyplot.subplots(figsize=(10, 4.8))
    width = 0.8 / len(panels)
    shades = ["#9ecae1", "#3182bd", "#fdae6b"]
    for j, (key, lab) in enumerate(panels):
        data = [v[~np.isnan(v)] for v in pr[key].T]
        pos = np.arange(P.K) + (j - (len(panels) - 1) / 2) * width
        bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=False,
                        whis=(5, 95), medianprops={"color": "k"})
        for box in bp["boxes"]:
            box.set_facecolor(shades[j])
        ax.plot([], [], color=shades[j], lw=8, label=lab)
    ax.axhline(1 / P.K, color="k", ls=":", lw=1, label="1/8 (uniform)")
    ax.set_xticks(np.arange(P.K))
    ax.set_xticklabels(P.KEYS, rotation=20, fontsize=8)
    ax.set_ylabel("probability over the 8 perspectives")
    note = f"; selection keeps k with p_k ≥ {beta:g}·max p" if beta else ""
    ax.set_title(f"{title}: per-question distribution over training questions (box 25–75%, whiskers 5–95%){note}",
                 fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, frameon=False)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot.close(fig)
    return path


def plot_accuracy(report: dict, path: str, order: list[str], labels: dict[str, str]) -> str:
    """Bar chart of the miniature table: ID and OOD accuracy, mean ± std over seeds."""
    rows = report["rows"]
    names = [n for n in order if n in rows]
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(10, 4))
    x = np.arange(len(names))
    for j, (key, col) in enumerate((("id", "#3182bd"), ("ood", "#e6550d"))):
        m = [100 * rows[n][key]["mean"] for n in names]
        s = [100 * rows[n][key]["std"] for n in names]
        ax.bar(x + (j - 0.5) * 0.38, m, 0.38, yerr=s, capsize=3, color=col, alpha=0.85, label=key.upper())
        for i, n in enumerate(names):  # every seed, so three points are not read as a distribution
            v = 100 * np.asarray(rows[n][key]["values"])
            ax.plot(np.full(len(v), x[i] + (j - 0.5) * 0.38), v, "k.", ms=4, zorder=3)
    ax.set_xticks(x)
    ax.set_xticklabels([labels.get(n, n) for n in names], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%), mean ± std over seeds")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a train.py output directory (with log.jsonl; probe.pt and a MetaNet state for "
                                "metanet_scores.png)")
    ap.add_argument("--out", default=None, help="where the PNGs go (default: RUN/plots)")
    ap.add_argument("--window", type=int, default=25, help="running-mean window of selection.png, in steps")
    a = ap.parse_args(argv)
    log = os.path.join(a.run, "log.jsonl")
    if not os.path.exists(log):
        raise SystemExit(f"error: {a.run}: no log.jsonl (is it a train.py output directory?)")
    out = a.out or os.path.join(a.run, "plots")
    os.makedirs(out, exist_ok=True)
    logs = [read_log(log)]
    if not logs[0]:
        raise SystemExit(f"error: {log}: no complete line")
    cfg = (json.load(open(os.path.join(a.run, "metrics.json"))) if os.path.exists(os.path.join(a.run, "metrics.json"))
           else {}).get("config", {})
    title = cfg.get("method", "run")
    paths = [plot_ck(logs, os.path.join(out, "ck_trends.png"), f"{title}: per-perspective loss trend c_k"),
             plot_selection({title: logs}, os.path.join(out, "selection.png"), a.window)]
    has_state = any(os.path.exists(os.path.join(a.run, p)) for p in ("final_state.pt", "ckpt/trainer.pt"))
    if os.path.exists(os.path.join(a.run, "probe.pt")) and has_state and cfg:
        paths.append(plot_scores(metanet_probs(a.run), os.path.join(out, "metanet_scores.png"), title,
                                 cfg.get("select_beta")))
    else:
        print("note: no probe.pt + MetaNet state (a run without the MetaNet, or unfinished): no metanet_scores.png")
    for p in paths:
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
