"""
The paper's claims in miniature: MIND against its baselines and its ablations on the synthetic world.

    python scripts/reproduce.py                 # every run (10 configurations x 5 seeds + 8 selection runs), the table, the plots
    python scripts/reproduce.py --dry-list      # the planned runs and a time estimate; nothing is run
    python scripts/reproduce.py --aggregate-only  # rebuild results/miniature.{md,json} and the plots from finished runs

Every configuration is a flag set of train.py, trained for the same number of optimiser steps with the same
questions per step, on the synthetic world (in-distribution: 1-2 events; out-of-distribution: 1-2 events worded with
opening and question sentences training never uses), from the same stage-0 student of its seed (train.py's stage 0,
cached in OUT/stage0/ and shared by every configuration of a seed), then evaluated by greedy generation on both
test splits:

    sft-best            one perspective: the best of the 8 single-perspective students on a validation world (seed
                        --val-seed, whose ID split is never a reported test split), then run on every seed
    sft-all             all 8 rationales as independent examples, uniform weights
    mcc                 MCC-KD: uniform weights + bidirectional KL between the answers of every pair
    mind                MIND with every component, at train.py's defaults
    mind-no-metanet, mind-no-attention, mind-inertia0, mind-beta0, mind-cons0   its ablations
    mind-absolute       the paper's target π_τ(−L̃) (--trend-weight 1) instead of ours, relative to each trend

Resumable: each run writes results/runs/<configuration>/<seed>/ (train.py's metrics.json and log.jsonl, its
stdout in train.log, the exact command in cmd.json). A run whose metrics.json exists is skipped; a run killed
midway continues from its last checkpoint (train.py --resume); a run made with other flags is reported as stale
and left alone unless --redo-stale. After a run its checkpoint is deleted (--keep-ckpt keeps it); the MetaNet
and the calibrator are kept in final_state.pt for the plots.

Seeds: --seed drives the synthetic world, the initialisation and the data order, so seed s is the same world
and the same initial student for every configuration; differences within a seed are paired.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import perspectives as P  # noqa: E402  (the perspective keys; cheap, no model)
import plots  # noqa: E402
from eval import write_text  # noqa: E402  (atomic: temp file + rename)  (scripts/plots.py: matplotlib is imported only when a plot is drawn)

TRAIN = os.path.join(REPO, "train.py")

# configuration name -> (train.py flags, label in the table)
CONFIGS = {f"sft-{k}": (["--method", "sft", "--perspective", k], f"sft ({k})") for k in P.KEYS}  # on --val-seed
CONFIGS.update({
    "sft-all": (["--method", "sft-all"], "sft-all (8 perspectives, uniform)"),
    "mcc": (["--method", "mcc"], "MCC-KD"),
    "mind": ([], "MIND"),
    "mind-no-metanet": (["--no-metanet"], "MIND w/o MetaNet (uniform α, all selected)"),
    "mind-no-attention": (["--no-attention"], "MIND w/o synergy attention"),
    "mind-inertia0": (["--inertia", "0"], "MIND w/o inertia (μ = 0)"),
    "mind-beta0": (["--select-beta", "0"], "MIND w/o selection (β = 0)"),
    "mind-cons0": (["--cons-weight", "0"], "MIND w/o consistency (λ = 0)"),
    "mind-absolute": (["--trend-weight", "1"], "MIND with the paper's absolute target π_τ(−L̃) (γ = 1)"),
})
SFT = [f"sft-{k}" for k in P.KEYS]
MAIN_ROWS = ["sft-best", "sft-all", "mcc", "mind"]
ABLATIONS = ["mind-no-metanet", "mind-no-attention", "mind-inertia0", "mind-beta0", "mind-cons0", "mind-absolute"]
USES_METANET = {"mind", "mind-no-attention", "mind-inertia0", "mind-beta0", "mind-cons0", "mind-absolute"}
# Student's t quantiles t_{0.975, df}: 95% confidence intervals of a mean of paired differences over few seeds
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}

# Cost model of --dry-list, measured on the 2-core development machine, one thread per run, machine otherwise idle.
# A step of a multi-perspective method (4 questions x 8 rationales of ~90 tokens, one chunk) took 0.195 / 0.30 / 0.37 /
# 0.46 s for a student of width x layers 64x4 / 96x4 / 128x3 / 128x4: linear in the proxy 12·L·h² + h·V (the layers
# and the tied LM head, V = 1024) as step_base + step_per_flop · proxy, per 4 questions; chunks of 1024 padded tokens
# (--max-batch-tokens) made it 0.82x of that (scripts/bench.py --data synthetic --hidden 96). An sft step (one
# rationale per question) costs ~1/9.5 of a one-chunk step. The probe pass (MetaNet configurations) ran 8000
# rationales in 37 s, and the final greedy evaluation of a trained 128x4 student took ~10 ms per question; both
# scale like a step. A loaded machine (another job per core) can be 2x slower.
COST = {"step_base": 0.089, "step_per_flop": 0.405e-6, "chunked": 0.82, "sft_step_frac": 0.105,
        "probe_per_rationale": 0.0046, "eval_per_question": 0.010, "startup_s": 15.0, "stage0_steps_equiv": 95}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=type(
        "F", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))
    g = ap.add_argument_group("what to run")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="seeds (each: world, init, stage 0, data order)")
    g.add_argument("--val-seed", type=int, default=100,
                   help="the world on which the 8 single-perspective students are compared to pick sft-best")
    g.add_argument("--only", default=None,
                   help="comma list of configurations to run (default: all): " + ", ".join(CONFIGS))
    g.add_argument("--dry-list", action="store_true", help="print the planned runs and a time estimate, run nothing")
    g.add_argument("--aggregate-only", action="store_true", help="run nothing; rebuild the table and plots")
    g.add_argument("--no-plots", action="store_true", help="skip the plots")
    g = ap.add_argument_group("budget (the same for every configuration)")
    g.add_argument("--steps", type=int, default=300,
                   help="optimiser steps of every run (train.py's default is 480: 5 seeds x 10 configurations must fit "
                        "in under an hour on this 2-core machine)")
    g.add_argument("--batch-size", type=int, default=4,
                   help="questions per step (all their rationales, or one for sft)")
    g.add_argument("--synthetic-n", type=int, default=600, help="training questions of the synthetic world")
    g.add_argument("--synthetic-n-test", type=int, default=200, help="questions in each test split (ID, OOD)")
    g.add_argument("--tiny-hidden", type=int, default=96, help="width of the tiny student (train.py: 128)")
    g.add_argument("--tiny-layers", type=int, default=4, help="layers of the tiny student")
    g.add_argument("--max-batch-tokens", type=int, default=1024,
                   help="train.py's chunk size (padded tokens per forward): an efficiency setting only; for these "
                        "~90-token sequences 1024 pads 7%% and ran 18%% faster than one chunk of 8192 (scripts/bench.py)")
    g = ap.add_argument_group("execution")
    g.add_argument("--jobs", type=int, default=2, help="runs in parallel (one process each)")
    g.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    g.add_argument("--out", default=os.path.join(REPO, "results"), help="results directory (runs go to OUT/runs/)")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps, so a killed run resumes")
    g.add_argument("--keep-ckpt", action="store_true", help="keep each finished run's checkpoint (~20 MB each)")
    g.add_argument("--redo-stale", action="store_true",
                   help="delete and redo runs whose recorded command differs from the planned one")
    g.add_argument("--plot-seed", type=int, default=None,
                   help="seed of the MIND run in metanet_scores.png (default: the first of --seeds)")
    ap.add_argument("train_args", nargs="*", metavar="-- TRAIN_FLAGS",
                    help="extra train.py flags for every run, after --, e.g. -- --lr 2e-3")
    return ap


# -----------------------------------------------------------------------------
# Planning


def planned_runs(a, best: str | None) -> list[dict]:
    """Every (configuration, seed) with its train.py argv (without --out, which is where it goes): the 8 selection
    runs on --val-seed, every other configuration on --seeds, and sft-<best> on --seeds once `best` is known."""
    names = [n for n in CONFIGS if n not in SFT] + ["sft-best"]
    if a.only:
        names = [n.strip() for n in a.only.split(",") if n.strip()]
        bad = [n for n in names if n not in CONFIGS and n != "sft-best"]
        if bad:
            raise SystemExit(f"error: --only {','.join(bad)}: unknown configuration; known: "
                             f"{', '.join(n for n in CONFIGS if n not in SFT)}, sft-best")
    common = ["--steps", a.steps, "--batch-size", a.batch_size, "--synthetic-n", a.synthetic_n,
              "--synthetic-n-test", a.synthetic_n_test, "--tiny-hidden", a.tiny_hidden, "--tiny-layers", a.tiny_layers,
              "--max-batch-tokens", a.max_batch_tokens, "--eval-every", 0, "--save-every", a.save_every, "--no-progress",
              "--pretrain-cache", os.path.join(a.out, "stage0")]
    plan = [(k, a.val_seed) for k in SFT] if "sft-best" in names else []  # the selection runs
    # seed-major within a configuration, so that two parallel jobs are seldom the same seed's first stage 0
    plan += [(n, s) for n in names if n != "sft-best" for s in a.seeds]
    if best is not None and "sft-best" in names:
        plan += [(f"sft-{best}", s) for s in a.seeds]
    runs = []
    for name, seed in plan:
        argv = [str(x) for x in CONFIGS[name][0] + common + ["--seed", seed]] + list(a.train_args)
        runs.append({"name": name, "seed": seed, "argv": argv,
                     "dir": os.path.join(a.out, "runs", name, str(seed)), "est_s": estimate_s(name, a)})
    return runs


def best_single(a) -> tuple[str | None, dict]:
    """The perspective whose single-perspective student has the best ID accuracy on the validation world (--val-seed;
    ties: the first in perspective order) -> (key or None until all 8 are done, {key: accuracy})."""
    acc = {}
    for k in P.KEYS:
        m = read_json(os.path.join(a.out, "runs", f"sft-{k}", str(a.val_seed), "metrics.json"))
        if m is not None:
            acc[k] = m["eval"]["id"]["accuracy"]
    if len(acc) < len(P.KEYS):
        return None, acc
    return max(P.KEYS, key=lambda k: (acc[k], -P.KEYS.index(k))), acc


def majority_rates(a) -> dict:
    """Per seed, the accuracy of always answering the most frequent answer of each test split: the floor a method
    must beat to have learned anything there."""
    from collections import Counter
    out = {}
    for seed in a.seeds:
        splits = P.synthetic_splits(a.synthetic_n, a.synthetic_n_test, seed)
        out[seed] = {name: Counter(e.answer for e in splits[f"test_{name}"]).most_common(1)[0][1] /
                     len(splits[f"test_{name}"]) for name in ("id", "ood")}
    return out


def estimate_s(name: str, a) -> float:
    """Seconds of one run at one thread on an idle core, from COST (see above)."""
    proxy = 12 * a.tiny_layers * a.tiny_hidden ** 2 + a.tiny_hidden * 1024
    step4 = COST["step_base"] + COST["step_per_flop"] * proxy  # a multi-perspective step of 4 questions
    scale = step4 / (COST["step_base"] + COST["step_per_flop"] * (12 * 4 * 128 ** 2 + 128 * 1024))  # vs 128x4
    if name in SFT:
        step = step4 * a.batch_size / 4 * COST["sft_step_frac"]  # a few sequences: one chunk whatever the size
    else:
        step = step4 * a.batch_size / 4 * (COST["chunked"] if a.max_batch_tokens <= 2048 else 1.0)
    t = COST["startup_s"] + a.steps * step + 2 * a.synthetic_n_test * COST["eval_per_question"] * scale
    t += COST["stage0_steps_equiv"] * step4 / len(a.seeds)  # stage 0 (150 steps of 20 rationales), once per seed
    if name in USES_METANET:
        t += P.K * a.synthetic_n * COST["probe_per_rationale"] * scale
    return t


def status(run: dict) -> str:
    """done | stale | resume | new"""
    d = run["dir"]
    rec = read_json(os.path.join(d, "cmd.json"))
    if rec is not None and rec.get("argv") != run["argv"]:
        return "stale"
    if os.path.exists(os.path.join(d, "metrics.json")):
        return "done" if rec is not None else "stale"
    if rec is not None and os.path.exists(os.path.join(d, "ckpt", "trainer.pt")):
        return "resume"
    return "new"


def makespan(times: list[float], jobs: int) -> float:
    """Wall time of longest-first list scheduling on `jobs` workers (what run_all does)."""
    load = [0.0] * max(1, jobs)
    for t in sorted(times, reverse=True):
        load[load.index(min(load))] += t
    return max(load)


def fmt_s(s: float) -> str:
    return f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


# -----------------------------------------------------------------------------
# Running


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def launch(run: dict, a) -> subprocess.Popen:
    d = run["dir"]
    if status(run) == "resume":
        cmd = [sys.executable, TRAIN, "--resume", d]
    else:
        shutil.rmtree(d, ignore_errors=True)  # a run killed before its first checkpoint starts over
        os.makedirs(d)
        write_text(os.path.join(d, "cmd.json"), json.dumps({"argv": run["argv"]}, indent=1))
        cmd = [sys.executable, TRAIN, *run["argv"], "--out", d]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    # its own session: a Ctrl-C in the terminal reaches this script only, which then stops the children (run_all)
    with open(os.path.join(d, "train.log"), "a") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finalize(run: dict, keep_ckpt: bool) -> None:
    """Keep what the plots need (MetaNet and calibrator state) and drop the checkpoint."""
    d = run["dir"]
    ckpt = os.path.join(d, "ckpt")
    state_path = os.path.join(ckpt, "trainer.pt")
    if os.path.exists(state_path):
        import torch
        s = torch.load(state_path, weights_only=False, map_location="cpu")
        tmp = os.path.join(d, "final_state.pt.tmp")
        torch.save({"metanet": s.get("metanet"), "calibrator": s.get("calibrator"), "step": s.get("step")}, tmp)
        os.replace(tmp, os.path.join(d, "final_state.pt"))
    if not keep_ckpt:
        shutil.rmtree(ckpt, ignore_errors=True)


def run_all(runs: list[dict], a) -> list[dict]:
    """Longest first, a.jobs at a time; each finished run is finalised at once. -> the runs that failed."""
    from tqdm import tqdm
    todo = sorted(runs, key=lambda r: -r["est_s"])
    running, failed = [], []

    def on_term(signum, frame):  # `kill PID` stops the children too, as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    for r in todo:
        r["est_int"] = max(1, round(r["est_s"]))  # whole seconds: the bar's total is their exact sum
    bar = tqdm(total=sum(r["est_int"] for r in todo), unit="s", desc="runs (estimated seconds of compute)",
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
    try:
        while todo or running:
            while todo and len(running) < a.jobs:
                r = todo.pop(0)
                resuming = status(r) == "resume"
                r["proc"], r["t0"] = launch(r, a), time.time()
                running.append(r)
                bar.write(f"start {r['name']} seed {r['seed']}" + (" (resuming)" if resuming else ""))
            time.sleep(0.5)
            for r in [r for r in running if r["proc"].poll() is not None]:
                running.remove(r)
                bar.update(r["est_int"])
                m = read_json(os.path.join(r["dir"], "metrics.json"))
                if r["proc"].returncode == 0 and m is not None:
                    finalize(r, a.keep_ckpt)
                    acc = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in m["eval"].items())
                    bar.write(f"done  {r['name']} seed {r['seed']} in {fmt_s(time.time() - r['t0'])}: {acc}")
                else:
                    failed.append(r)
                    bar.write(f"FAIL  {r['name']} seed {r['seed']} (exit {r['proc'].returncode}): "
                              f"see {os.path.join(r['dir'], 'train.log')}")
    except KeyboardInterrupt:
        for r in running:  # the children run in their own sessions: stop them explicitly
            r["proc"].send_signal(signal.SIGTERM)
        for r in running:
            r["proc"].wait()
        bar.close()
        raise SystemExit("interrupted: finished runs and checkpoints are kept; the same command continues")
    bar.close()
    return failed


# -----------------------------------------------------------------------------
# Aggregation


def mean_std(xs: list[float]) -> dict:
    """Mean, sample standard deviation (ddof 1; 0 for a single value) and the half-width of the mean's 95% confidence
    interval (Student's t, n − 1 degrees of freedom; NaN for one value) of per-seed values."""
    x = np.asarray(xs, dtype=float)
    std = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    df = len(x) - 1
    t = T975[max(d for d in T975 if d <= df)] if df >= 1 else float("nan")
    return {"mean": float(x.mean()) if len(x) else float("nan"), "std": std,
            "ci95": t * std / np.sqrt(len(x)) if df >= 1 else float("nan"), "n": int(len(x)),
            "values": [float(v) for v in x]}


def log_summary(path: str, tail: float = 0.1) -> dict:
    """From a log.jsonl: means over the last `tail` fraction of steps of sel (|I_q|) and alpha_entropy, the first
    and last c_k, and the last α_k."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    if not rows:
        return {}
    last = rows[-max(1, int(len(rows) * tail)):]
    return {"sel": float(np.mean([r["sel"] for r in last])),
            # over the whole run: the curriculum selects most at the start and everything at the end
            "sel_all": float(np.mean([r["sel"] for r in rows])),
            "acting": float(np.mean([r["sel"] <= 7 for r in rows])),
            "alpha_entropy": float(np.mean([r["alpha_entropy"] for r in last])),
            "c_first": rows[0]["c"], "c_last": rows[-1]["c"], "alpha_last": rows[-1].get("alpha")}


def collect(out: str, pairs: list[tuple[str, int]]) -> dict:
    """{configuration: {seed: run summary}} for the given finished (configuration, seed) runs under out/runs/."""
    res = {}
    for name, seed in pairs:
        d = os.path.join(out, "runs", name, str(seed))
        m = read_json(os.path.join(d, "metrics.json"))
        if m is None:
            continue
        res.setdefault(name, {})[seed] = {
            "id": m["eval"]["id"]["accuracy"], "ood": m["eval"]["ood"]["accuracy"],
            "id_strict": m["eval"]["id"]["strict_accuracy"], "ood_strict": m["eval"]["ood"]["strict_accuracy"],
            "n_id": m["eval"]["id"]["n"], "n_ood": m["eval"]["ood"]["n"], "tokens": m["tokens"],
            "steps": m["steps"], "train_time_s": m["train_time_s"], "parameters": m.get("parameters"),
            **log_summary(os.path.join(d, "log.jsonl"))}
    return res


METRICS = ("id", "ood", "id_strict", "ood_strict", "tokens", "sel", "sel_all", "acting", "alpha_entropy", "n_id",
           "n_ood")


def aggregate(res: dict, best: str | None) -> dict:
    """Per configuration: mean ± std over seeds of every metric; "sft-best", the single-perspective run chosen on the
    validation world (best_single); MIND minus each other row, paired by seed, with 95% confidence intervals."""
    rows = {}
    for name, by_seed in res.items():
        seeds = sorted(by_seed)
        rows[name] = {"seeds": seeds, **{k: mean_std([by_seed[s][k] for s in seeds])
                                         for k in METRICS if all(k in by_seed[s] for s in seeds)}}
        if name in USES_METANET or name == "mind-no-metanet":
            c = np.mean([by_seed[s]["c_last"] for s in seeds if "c_last" in by_seed[s]], axis=0)
            rows[name]["c_last"] = dict(zip(P.KEYS, map(float, c)))
    out = {"rows": rows, "best_sft": best, "paired": {}}
    if best is not None and f"sft-{best}" in rows:
        rows["sft-best"] = {**rows[f"sft-{best}"], "from": f"sft-{best}"}
    if "mind" in res:
        for other in ["sft-best", "sft-all", "mcc", *ABLATIONS]:
            src = rows.get(other, {}).get("from", other)
            if src not in res:
                continue
            common = sorted(set(res["mind"]) & set(res[src]))
            if common:
                out["paired"][other] = {k: mean_std([res["mind"][s][k] - res[src][s][k] for s in common])
                                        for k in ("id", "ood")}
                d = [res["mind"][s]["id"] - res[src][s]["id"] for s in common]
                out["paired"][other]["id_higher_tied_lower"] = [sum(x > 0 for x in d), sum(x == 0 for x in d),
                                                                sum(x < 0 for x in d)]
    return out


def pm(m: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    """'mean ± std' in percent (n shown when fewer seeds than planned are in)."""
    if not m:
        return "—"
    return f"{m['mean'] * scale:.{digits}f} ± {m['std'] * scale:.{digits}f}"


def ci(m: dict) -> str:
    """'mean [lo, hi]' in percentage points."""
    return f"{100 * m['mean']:+.1f} [{100 * (m['mean'] - m['ci95']):+.1f}, {100 * (m['mean'] + m['ci95']):+.1f}]"


def label(name: str, agg: dict) -> str:
    if name == "sft-best":
        return f"sft, best single perspective ({agg['best_sft']})"
    return CONFIGS[name][1]


def markdown(agg: dict, a, n_seeds: int, command: str) -> str:
    rows = agg["rows"]
    any_run = next(iter(rows.values()), None)
    L = ["# MIND in miniature: the synthetic world", "",
         f"Command: `{command}`", "",
         f"Budget, identical for every configuration: {a.steps} optimiser steps × {a.batch_size} questions per step "
         f"(all 8 rationales of each question, or its one rationale for sft), a {a.tiny_layers}-layer width-"
         f"{a.tiny_hidden} Qwen2 student pre-trained by train.py's stage 0 (the same for every configuration of a "
         f"seed), {a.synthetic_n} training questions, {a.synthetic_n_test} in-distribution (ID: 1–2 events) and "
         f"{a.synthetic_n_test} out-of-distribution (OOD: 1–2 events, opening and question sentences never seen in "
         f"training) test questions per seed, seeds {', '.join(map(str, a.seeds))}"
         + (f" (extra train.py flags: `{' '.join(a.train_args)}`)" if a.train_args else "") + ".", ""]
    n_id = sorted({int(v) for r in rows.values() if "n_id" in r for v in r["n_id"]["values"]})
    n_ood = sorted({int(v) for r in rows.values() if "n_ood" in r for v in r["n_ood"]["values"]})
    if n_id:
        span = lambda v: f"{v[0]}" if v[0] == v[-1] else f"{v[0]}–{v[-1]}"  # noqa: E731
        L += [f"Test questions scored per seed: ID {span(n_id)} (test questions that are also training questions "
              f"are removed), OOD {span(n_ood)}.", ""]
    L += ["Accuracy (%) by greedy generation with flexible answer extraction (strict: only the canonical "
          "`The answer is X.` line), mean ± sample std over seeds. Mean |I_q| over all steps, the fraction of steps "
          "with mean |I_q| ≤ 7 (acting), and α entropy over the last 10% of steps (8 and ln 8 = 2.08 mean every "
          "perspective selected with uniform weight); tokens run: real tokens "
          "forwarded per run, with gradient or (MIND's unselected rationales) without. A seed fixes the world and "
          "the initial student, so the paired differences below compare runs on the same data.", ""]

    def table(names: list[str]) -> list[str]:
        t = ["| method | ID acc | OOD acc | ID strict | OOD strict | seeds | tokens run | mean \\|I_q\\| | acting "
             "| α entropy (end) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
        for n in names:
            if n not in rows:
                t.append(f"| {label(n, agg) if n != 'sft-best' else 'sft, best single perspective'} | not run |"
                         " | | | | | | | |")
                continue
            r = rows[n]
            sel = f"{r['sel_all']['mean']:.2f}" if "sel_all" in r and n != "sft-best" else "—"
            act = f"{100 * r['acting']['mean']:.0f}%" if "acting" in r and n != "sft-best" else "—"
            ent = f"{r['alpha_entropy']['mean']:.3f}" if "alpha_entropy" in r and n != "sft-best" else "—"
            seeds = f"{len(r['seeds'])}/{n_seeds}"
            t.append(f"| {label(n, agg)} | {pm(r.get('id'))} | {pm(r.get('ood'))} | {pm(r.get('id_strict'))} | "
                     f"{pm(r.get('ood_strict'))} | {seeds} | {r['tokens']['mean'] / 1e6:.2f}M | {sel} | {act} | {ent} |")
        return t

    maj = agg.get("majority")
    if maj:
        L += [f"Majority-answer rate (always answering a split's most frequent answer), mean over seeds: ID "
              f"{100 * np.mean([m['id'] for m in maj.values()]):.1f}%, OOD {100 * np.mean([m['ood'] for m in maj.values()]):.1f}%.",
              ""]
    L += ["## Main comparison", ""] + table(MAIN_ROWS) + [""]
    if agg["best_sft"]:
        sel = ", ".join(f"{k} {100 * v:.1f}" for k, v in agg.get("selection", {}).items())
        L += [f"The single perspective ({agg['best_sft']}) was chosen by ID accuracy on the validation world (seed "
              f"{a.val_seed}; never a reported test split): {sel}. sft trains on one rationale per question, so at the "
              f"same step budget it sees about 1/8 of the tokens.", ""]
    L += ["## Ablations of MIND", ""] + table(["mind", *ABLATIONS]) + [""]
    if agg["paired"]:
        L += ["## MIND minus each other configuration, paired by seed (percentage points)", "",
              "Mean paired difference [95% confidence interval, Student's t over seeds]. An interval that contains 0 "
              "is a difference this design cannot resolve; its half-width is about the smallest effect it could.", "",
              "| vs | Δ ID [95% CI] | Δ OOD [95% CI] | seeds where MIND's ID is higher / tied / lower |",
              "|---|---|---|---|"]
        for other, d in agg["paired"].items():
            L.append(f"| {label(other, agg)} | {ci(d['id'])} | {ci(d['ood'])} | "
                     + " / ".join(map(str, d["id_higher_tied_lower"])) + " |")
        L.append("")
    if "mind" in rows and "c_last" in rows["mind"]:
        c = rows["mind"]["c_last"]
        L += ["## MIND's per-perspective loss trend c_k at the end (mean over seeds)", "",
              "| " + " | ".join(P.KEYS) + " |", "|" + "---|" * len(P.KEYS),
              "| " + " | ".join(f"{c[k]:.3f}" for k in P.KEYS) + " |", ""]
    if any_run is None:
        L += ["No finished run yet.", ""]
    return "\n".join(L)


# -----------------------------------------------------------------------------


def make_plots(out: str, seed: int, seeds: dict[str, list[int]], report: dict | None = None) -> list[str]:
    """The reproduction's plots, from out/runs/<configuration>/<seed>/ for the seeds given per configuration, into
    out/. -> paths written."""
    runs = os.path.join(out, "runs")
    done = []

    def logs_of(name: str) -> list[list[dict]]:
        paths = [os.path.join(runs, name, str(s), "log.jsonl") for s in seeds.get(name, [])]
        return [r for r in (plots.read_log(p) for p in paths if os.path.exists(p)) if r]

    mind = logs_of("mind")
    if mind:
        done.append(plots.plot_ck(mind, os.path.join(out, "ck_trends.png"), "MIND: per-perspective loss trend c_k"))
    sel = {lab: lg for lab, lg in (("MIND", mind), ("w/o attention", logs_of("mind-no-attention")),
                                   ("μ = 0", logs_of("mind-inertia0")), ("λ = 0", logs_of("mind-cons0")),
                                   ("β = 0", logs_of("mind-beta0")),
                                   ("γ = 1 (absolute target)", logs_of("mind-absolute"))) if lg}
    if sel:
        done.append(plots.plot_selection(sel, os.path.join(out, "selection.png")))
    d = os.path.join(runs, "mind", str(seed))
    if seed in seeds.get("mind", []):  # one MIND run: selection per perspective, α and c_k over training
        done.append(plots.plot_run(plots.read_log(os.path.join(d, "log.jsonl")), os.path.join(out, "mind_run.png")))
    if seed in seeds.get("mind", []) and os.path.exists(os.path.join(d, "probe.pt")):
        beta = json.load(open(os.path.join(d, "metrics.json")))["config"]["select_beta"]
        done.append(plots.plot_scores(plots.metanet_probs(d), os.path.join(out, "metanet_scores.png"),
                                      f"MIND, seed {seed}", beta))
    if report and report.get("rows"):
        labels = {n: label(n, report) for n in report["rows"]}
        order = ["sft-best", "sft-all", "mcc", "mind", *ABLATIONS]
        done.append(plots.plot_accuracy(report, os.path.join(out, "miniature.png"), order, labels))
    return done


def main(argv=None):
    ap = build_parser()
    a = ap.parse_args(argv)
    for name in ("steps", "batch_size", "synthetic_n", "synthetic_n_test", "jobs", "threads", "save_every",
                 "max_batch_tokens", "tiny_hidden", "tiny_layers"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(a, name)}: must be >= 1")
    if len(set(a.seeds)) != len(a.seeds):
        ap.error(f"--seeds {a.seeds}: repeated seed")
    if a.val_seed in a.seeds:
        ap.error(f"--val-seed {a.val_seed} is also in --seeds: the validation world must not be a reported one")
    a.out = os.path.abspath(a.out)
    failed = []
    best, selection = best_single(a)
    if best is None and not (a.dry_list or a.aggregate_only):
        # first the 8 selection runs: sft-best's perspective must be known before its runs are planned
        todo = [r for r in planned_runs(a, None) if r["seed"] == a.val_seed and status(r) in ("new", "resume")]
        if todo:
            print(f"{len(todo)} single-perspective runs on the validation world (seed {a.val_seed}) first")
            failed = run_all(todo, a)
        best, selection = best_single(a)
        if best is not None:
            print("validation ID accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in selection.items()) +
                  f" -> sft-best is {best}")
    runs = planned_runs(a, best)
    states = {id(r): status(r) for r in runs}
    stale = [r for r in runs if states[id(r)] == "stale"]
    todo = [r for r in runs if states[id(r)] in ("new", "resume") or (a.redo_stale and r in stale)]

    if a.dry_list:
        print(f"{'configuration':<28} {'seed':>4}  {'status':<7} {'est.':>8}  train.py flags")
        for r in runs:
            print(f"{r['name']:<28} {r['seed']:>4}  {states[id(r)]:<7} {fmt_s(r['est_s']):>8}  {' '.join(r['argv'])}")
        t = [r["est_s"] for r in todo]
        print(f"\n{len(runs)} runs: {sum(s == 'done' for s in states.values())} done, {len(stale)} stale, "
              f"{len(todo)} to run")
        print(f"estimated: {fmt_s(sum(t))} of single-thread compute, about {fmt_s(makespan(t, a.jobs))} wall time with "
              f"--jobs {a.jobs} on an otherwise idle machine (a busy one: up to twice that)")
        if best is None and (not a.only or "sft-best" in a.only):
            print(f"plus sft-best on {len(a.seeds)} seeds, once the selection runs have picked its perspective")
        return runs

    if stale and not a.redo_stale:
        print(f"warning: {len(stale)} runs under {a.out}/runs were made with other flags and are left as they are "
              f"(not in the table); --redo-stale redoes them, or choose another --out:", file=sys.stderr)
        for r in stale[:5]:
            print(f"  {r['dir']}", file=sys.stderr)
    if not a.aggregate_only and todo:
        print(f"{len(todo)} runs to do ({len(runs) - len(todo) - len(stale)} already done), about "
              f"{fmt_s(makespan([r['est_s'] for r in todo], a.jobs))} with --jobs {a.jobs}")
        failed += run_all(todo, a)

    # the table: only runs made with the planned flags count
    ok = [r for r in runs if status(r) == "done"]
    for r in ok:  # finished while this script was being stopped: not finalised yet
        if os.path.exists(os.path.join(r["dir"], "ckpt")) and not (a.keep_ckpt or a.aggregate_only):
            finalize(r, a.keep_ckpt)
    res = collect(a.out, [(r["name"], r["seed"]) for r in ok if r["seed"] in a.seeds])
    agg = {**aggregate(res, best), "selection": selection, "majority": majority_rates(a)}
    command = "python scripts/reproduce.py" + "".join(f" {x}" for x in (argv if argv is not None else sys.argv[1:])
                                                       if x not in ("--aggregate-only",))
    report = {"budget": {k: getattr(a, k) for k in ("steps", "batch_size", "synthetic_n", "synthetic_n_test",
                                                   "tiny_hidden", "tiny_layers", "max_batch_tokens", "seeds",
                                                   "val_seed", "train_args")},
              "command": command, "runs": {n: {str(s): v for s, v in d.items()} for n, d in res.items()}, **agg}
    os.makedirs(a.out, exist_ok=True)
    write_text(os.path.join(a.out, "miniature.json"), json.dumps(report, indent=1))
    write_text(os.path.join(a.out, "miniature.md"), markdown(agg, a, len(a.seeds), command))
    print(f"wrote {os.path.join(a.out, 'miniature.md')} and miniature.json ({len(ok)}/{len(runs)} runs in)")
    if not a.no_plots and res:
        seeds = {n: sorted(d) for n, d in res.items()}  # finished runs with the planned flags only
        for path in make_plots(a.out, seed=a.plot_seed if a.plot_seed is not None else a.seeds[0],
                                   seeds=seeds, report=report):
            print(f"wrote {path}")
    if failed:
        raise SystemExit(f"{len(failed)} runs failed: " + ", ".join(f"{r['name']}/{r['seed']}" for r in failed))
    return report


if __name__ == "__main__":
    main()
