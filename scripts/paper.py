"""
The paper's main table on a real student: MIND and the baselines this project implements, each trained by
train.py on the shipped data with the same budget and seed, each evaluated on the paper's benchmarks, one table.

    python scripts/paper.py --student Qwen2.5-1.5B                  # train and evaluate every method, then the table
    python scripts/paper.py --student Qwen2.5-1.5B --dry-list       # what would run, with train.py's memory plan
    python scripts/paper.py --student Qwen2.5-1.5B --gpqa-csv gpqa_diamond.csv -- --lora-r 16
                                                                    # flags after -- go to every train.py run

Rows (after the base model), one train.py run each, into OUTROOT/<row>/:

    sft-<perspective>   one perspective (--sft-perspective, default formal_symbolic): Step-by-Step-style SFT, which
                        is also MIND "w/o fusion"
    sft-all             all 8 rationales as independent examples, uniform weights
    mcc                 MCC-KD: uniform weights + bidirectional KL between the answers of every pair
    mind                MIND

The same budget: every run gets the same --student, --data, --seed, --steps (train.py's default when not given:
the same for all, as it depends on the data only) and --max-new-tokens, which is pinned here because train.py's
default follows the longest training completion, which differs between one perspective and eight.

Resumes: a run whose OUTROOT/<row>/results.json exists is finished and not trained again; a run with a checkpoint
(OUTROOT/<row>/ckpt/trainer.pt) continues with `train.py --resume OUTROOT/<row>`; any other is trained from the
start. Rerunning the same command after an interruption therefore picks up where it stopped.

The base model's evaluation is the same for every run: train.py evaluates the base model into OUT/eval_base/ and
eval.py reuses cached generations there (same model, prompt and --max-new-tokens). So once a run has finished, its
eval_base/ is copied into the OUT/eval_base/ of every later run before that run starts (unless it has one already),
and the base model is generated for once, not once per method.

The table: each run's results.json holds its metrics rows "base" and "trained"; OUTROOT/paper.md and paper.json get
the first finished run's "base" row and every run's "trained" row under the run's name, in eval.py's layout
(MATH500, GSM8K, SVAMP | CSQA, StrategyQA, GPQA-D, ID avg, OOD avg, and each row's gain over the base model).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import eval as ev  # noqa: E402  (the results table and its atomic writers)
import perspectives as P  # noqa: E402  (the perspective keys)

TRAIN = os.path.join(REPO, "train.py")
METHODS = ("sft", "sft-all", "mcc", "mind")  # the table's row order after the base model


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=ev.HelpFormatter)
    ap.add_argument("--student", required=True, help="the student for every run: a Hugging Face name or a directory")
    ap.add_argument("--out", default=os.path.join("out", "paper"),
                    help="OUTROOT: one directory per run, and paper.md / paper.json")
    ap.add_argument("--data", default=os.path.join(REPO, "data", "mind_gsm8k_train.jsonl"),
                    help="training data of every run (train.py --data)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every run (train.py --seed)")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimiser steps of every run (default: train.py's, the same for every method)")
    ap.add_argument("--max-new-tokens", type=int, default=512,
                    help="generation budget of every evaluation, base model included (train.py --max-new-tokens)")
    ap.add_argument("--eval-tasks-limit", type=int, default=None,
                    help="questions per benchmark (train.py --eval-tasks-limit; default all)")
    ap.add_argument("--gpqa-csv", default=None,
                    help="the official gpqa_diamond.csv (train.py --gpqa-csv); without it GPQA-D is not evaluated")
    ap.add_argument("--sft-perspective", default="formal_symbolic", choices=P.KEYS,
                    help="the one perspective of the sft row")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated subset of {', '.join(METHODS)} to run and tabulate")
    ap.add_argument("--dry-list", action="store_true",
                    help="print the runs (finished / to resume / to train) with train.py --dry-run's peak memory "
                         "and tokens per step; run nothing")
    ap.add_argument("train_args", nargs="*", metavar="-- TRAIN_FLAGS",
                    help="extra train.py flags for every run (and its --dry-run), after --, e.g. -- --lora-r 16")
    return ap


def method_args(method: str, a) -> list[str]:
    if method == "sft":
        return ["--method", "sft", "--perspective", a.sft_perspective]
    return ["--method", method]


def run_name(method: str, a) -> str:
    # the perspective is in the name, so a run of another --sft-perspective is never taken for a finished one
    return f"sft-{a.sft_perspective}" if method == "sft" else method


def status(run_dir: str) -> str:
    if os.path.exists(os.path.join(run_dir, "results.json")):
        return "finished"
    if os.path.exists(os.path.join(run_dir, "ckpt", "trainer.pt")):
        return "resume"
    return "train"


def train_command(method: str, run_dir: str, a) -> list[str]:
    if status(run_dir) == "resume":
        return [sys.executable, TRAIN, "--resume", run_dir]  # train.py restores the run's own saved flags
    cmd = [sys.executable, TRAIN, "--student", a.student, *method_args(method, a), "--out", run_dir,
           "--seed", str(a.seed), "--data", a.data, "--max-new-tokens", str(a.max_new_tokens)]
    if a.steps is not None:
        cmd += ["--steps", str(a.steps)]
    if a.eval_tasks_limit is not None:
        cmd += ["--eval-tasks-limit", str(a.eval_tasks_limit)]
    if a.gpqa_csv:
        cmd += ["--gpqa-csv", a.gpqa_csv]
    return cmd + a.train_args


def run_train(cmd: list[str]) -> int:
    """One train.py process with its output on this terminal -> its exit status. (Tests replace it.)"""
    return subprocess.run(cmd, cwd=REPO).returncode


def plan_memory(cmd: list[str]) -> dict:
    """train.py --dry-run's plan (the JSON it prints); {"error": its last stderr line} when it fails."""
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0 or "{" not in p.stdout:
        return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(p.stdout[p.stdout.index("{"):])


def copy_base_cache(src_run: str, dst_run: str) -> bool:
    """src_run/eval_base/ -> dst_run/eval_base/ when dst_run has none; -> whether it was copied."""
    src, dst = os.path.join(src_run, "eval_base"), os.path.join(dst_run, "eval_base")
    if not os.path.isdir(src) or os.path.exists(dst):
        return False
    os.makedirs(dst_run, exist_ok=True)
    shutil.copytree(src, dst + ".tmp", dirs_exist_ok=True)
    os.replace(dst + ".tmp", dst)  # a copy cut short is not taken for a cache
    return True


def read_metrics(run_dir: str) -> tuple[dict[str, dict], dict[str, str]]:
    """The metrics rows ("base", "trained") and the skipped benchmarks of a finished run's results.json
    (eval.write_results)."""
    path = os.path.join(run_dir, "results.json")
    with open(path, encoding="utf-8") as f:
        res = json.load(f)
    if not isinstance(res.get("metrics"), dict) or "trained" not in res["metrics"]:
        raise SystemExit(f"error: {path}: no metrics row 'trained' (expected eval.write_results' results.json)")
    return res["metrics"], res.get("skipped", {})


def dry_list(runs: list[tuple[str, str, str]], a) -> None:
    print(f"{'run':<22} {'status':<9} {'peak GiB':>9} {'tokens/step':>12}  command")
    for method, name, d in runs:
        plan = plan_memory([sys.executable, TRAIN, "--student", a.student, "--dry-run", *method_args(method, a),
                            *a.train_args])
        peak = plan["gib"]["peak"] if "gib" in plan else "?"
        tokens = plan.get("tokens_per_step", "?")
        print(f"{name:<22} {status(d):<9} {peak:>9} {tokens:>12}  {' '.join(train_command(method, d, a)[1:])}")
        if "error" in plan:
            print(f"  memory plan failed: {plan['error']}")


def main(argv=None):
    ap = build_parser()
    a = ap.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    for name in ("steps", "max_new_tokens", "eval_tasks_limit"):
        v = getattr(a, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} {v}: must be >= 1")
    if not os.path.isfile(a.data):
        ap.error(f"--data {a.data}: no such file")
    if a.gpqa_csv:
        ev.task_path("gpqa_diamond", gpqa_csv=a.gpqa_csv)  # a wrong file fails now, not after the first training
    a.out, a.data = os.path.abspath(a.out), os.path.abspath(a.data)
    runs = [(m, run_name(m, a), os.path.join(a.out, run_name(m, a))) for m in methods]

    if a.dry_list:
        dry_list(runs, a)
        return runs

    failed = []
    for method, name, d in runs:
        if status(d) == "finished":
            print(f"{name}: finished, not trained again")
            continue
        first = next((r for _, _, r in runs if status(r) == "finished" and os.path.isdir(os.path.join(r, "eval_base"))),
                     None)
        if first and copy_base_cache(first, d):
            print(f"{name}: base model's generations copied from {os.path.join(first, 'eval_base')}")
        cmd = train_command(method, d, a)
        print(f"{name}: {'resuming' if status(d) == 'resume' else 'training'}: {' '.join(cmd)}", flush=True)
        if run_train(cmd) != 0 or status(d) != "finished":
            failed.append(name)
            print(f"{name}: failed (no {os.path.join(d, 'results.json')})", file=sys.stderr)

    rows, skipped = {}, {}
    for method, name, d in runs:
        if status(d) != "finished":
            continue
        metrics, skips = read_metrics(d)
        if "base" in metrics and "base" not in rows:  # the first finished run's: the same base model for all
            rows = {"base": metrics["base"], **rows}
        rows[name] = metrics["trained"]
        skipped.update(skips)
    table = ev.write_results(a.out, rows, skipped, name="paper")
    print(ev.format_results_md(table))
    print(f"wrote {os.path.join(a.out, 'paper.md')} and paper.json ({len(rows) - ('base' in rows)}/{len(runs)} runs)")
    if failed:
        raise SystemExit(f"error: {len(failed)} runs failed: {', '.join(failed)}; rerun the same command to resume")
    return table


if __name__ == "__main__":
    main()
