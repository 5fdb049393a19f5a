"""scripts/reproduce.py, scripts/plots.py and scripts/bench.py: aggregation, best-sft choice, resuming, plots,
and a smoke run of the benchmark. Fake run directories are hand-made; one tiny real run goes through train.py."""
import json
import os
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import bench  # noqa: E402
import plots  # noqa: E402
import reproduce  # noqa: E402

import perspectives as P  # noqa: E402

BUDGET = ["--steps", "7", "--synthetic-n", "16", "--synthetic-n-test", "4", "--tiny-hidden", "32", "--tiny-layers", "1"]


def fake_run(out, run: dict, id_acc: float, ood_acc: float, steps: int = 5, sel: float = 8.0):
    """A finished run as train.py + reproduce.py leave it: cmd.json, metrics.json, log.jsonl."""
    d = run["dir"]
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "cmd.json"), "w") as f:
        json.dump({"argv": run["argv"]}, f)
    ev = {s: {"accuracy": v, "strict_accuracy": v / 2, "no_answer": 0, "n": 100} for s, v in (("id", id_acc),
                                                                                                ("ood", ood_acc))}
    with open(os.path.join(d, "metrics.json"), "w") as f:
        json.dump({"eval": ev, "tokens": 1000, "steps": steps, "train_time_s": 1.0, "config": {}}, f)
    with open(os.path.join(d, "log.jsonl"), "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "sel": sel, "alpha_entropy": 2.0, "c": [float(s + k) for k in range(8)],
                                "alpha": [0.125] * 8, "loss": 1.0}) + "\n")


def plan(tmp_path, *extra, best=None):
    a = reproduce.build_parser().parse_args(["--out", str(tmp_path), *BUDGET, "--seeds", "0", "1", "2", *extra])
    return a, {(r["name"], r["seed"]): r for r in reproduce.planned_runs(a, best)}


def test_aggregate_mean_std_ci_best_sft_on_validation_and_paired(tmp_path):
    a, runs = plan(tmp_path)
    # the validation world (--val-seed 100) picks the single perspective: planning, by its ID accuracy there
    for k in P.KEYS:
        fake_run(tmp_path, runs[(f"sft-{k}", 100)], 0.5 if k == "planning" else 0.2, 0.0)
    assert ("sft-planning", 0) not in runs  # not known before the selection runs are done
    assert reproduce.best_single(a) == ("planning", {k: 0.5 if k == "planning" else 0.2 for k in P.KEYS})
    a, runs = plan(tmp_path, best="planning")
    acc = {  # (ID, OOD) per seed
        "mind": [(0.5, 0.2), (0.6, 0.3), (0.7, 0.4)],
        "sft-all": [(0.4, 0.3), (0.6, 0.3), (0.5, 0.1)],
        "sft-planning": [(0.3, 0.2), (0.3, 0.2), (0.3, 0.2)],
    }
    for name, per_seed in acc.items():
        for seed, (i, o) in enumerate(per_seed):
            fake_run(tmp_path, runs[(name, seed)], i, o)
    rep = reproduce.main(["--out", str(tmp_path), *BUDGET, "--seeds", "0", "1", "2", "--aggregate-only", "--no-plots"])
    rows = rep["rows"]
    assert rows["mind"]["id"]["mean"] == pytest.approx(0.6)
    assert rows["mind"]["id"]["std"] == pytest.approx(0.1)  # sample std (ddof 1) of 0.5, 0.6, 0.7
    assert rows["sft-all"]["ood"]["std"] == pytest.approx(np.std([0.3, 0.3, 0.1], ddof=1))
    assert rows["mind"]["id_strict"]["mean"] == pytest.approx(0.3)
    assert rep["best_sft"] == "planning" and rows["sft-best"]["from"] == "sft-planning"
    assert rows["sft-best"]["ood"]["mean"] == pytest.approx(0.2) and rows["sft-best"]["seeds"] == [0, 1, 2]
    # MIND minus sft-all on the same seeds: ID +0.1, 0.0, +0.2: mean 0.1, std 0.1, 95% CI ± t(2)·0.1/√3
    d = rep["paired"]["sft-all"]
    assert d["id"]["values"] == pytest.approx([0.1, 0.0, 0.2])
    assert d["id"]["ci95"] == pytest.approx(4.303 * 0.1 / np.sqrt(3))
    assert d["id_higher_tied_lower"] == [2, 1, 0]
    assert rep["paired"]["sft-best"]["id"]["mean"] == pytest.approx(0.3)
    # the majority-answer floor of each seed's test splits, computed from the world itself
    splits = P.synthetic_splits(16, 4, 1)
    top = max(sum(e.answer == x.answer for x in splits["test_ood"]) for e in splits["test_ood"])
    assert rep["majority"][1]["ood"] == pytest.approx(top / len(splits["test_ood"]))
    md = open(tmp_path / "miniature.md").read()
    assert "60.0 ± 10.0" in md and "best single perspective (planning)" in md and "not run" in md  # mcc is missing
    assert "+10.0 [-14.8, +34.8]" in md and "validation world (seed 100;" in md
    assert json.load(open(tmp_path / "miniature.json"))["best_sft"] == "planning"


def test_single_seed_has_zero_std_and_missing_seeds_are_counted(tmp_path):
    a, runs = plan(tmp_path)
    fake_run(tmp_path, runs[("mcc", 1)], 0.25, 0.5)
    rep = reproduce.main(["--out", str(tmp_path), *BUDGET, "--seeds", "0", "1", "2", "--aggregate-only", "--no-plots"])
    m = rep["rows"]["mcc"]["id"]
    assert (m["mean"], m["std"], m["n"], m["values"]) == (0.25, 0.0, 1, [0.25]) and np.isnan(m["ci95"])
    assert "| 1/3 |" in open(tmp_path / "miniature.md").read()


def test_status_done_stale_resume(tmp_path):
    a, runs = plan(tmp_path)
    new = runs[("mcc", 0)]
    done = runs[("mind", 0)]
    fake_run(tmp_path, done, 0.5, 0.5)
    stale = runs[("mind", 1)]
    fake_run(tmp_path, {**stale, "argv": stale["argv"] + ["--lr", "1"]}, 0.9, 0.9)  # made with other flags
    resume = runs[("mind", 2)]
    os.makedirs(os.path.join(resume["dir"], "ckpt"))
    open(os.path.join(resume["dir"], "ckpt", "trainer.pt"), "w").close()
    with open(os.path.join(resume["dir"], "cmd.json"), "w") as f:
        json.dump({"argv": resume["argv"]}, f)
    assert [reproduce.status(r) for r in (done, stale, resume, new)] == ["done", "stale", "resume", "new"]
    # a stale run is not in the table
    rep = reproduce.main(["--out", str(tmp_path), *BUDGET, "--aggregate-only", "--no-plots"])
    assert rep["rows"]["mind"]["id"]["values"] == [0.5]
    # a resumable run is continued with train.py --resume, not started over
    launched = []

    class FakePopen:
        def __init__(self, cmd, **kw):
            launched.append(cmd)
            self.args, self.returncode = cmd, 1

        def poll(self):
            return 1

    mp = pytest.MonkeyPatch()
    mp.setattr(reproduce.subprocess, "Popen", FakePopen)
    try:
        proc = reproduce.launch(resume, a)
    finally:
        mp.undo()
    assert proc.args[-2:] == ["--resume", resume["dir"]]
    assert os.path.exists(os.path.join(resume["dir"], "ckpt", "trainer.pt"))  # not wiped


def test_dry_list_plans_every_configuration_and_runs_nothing(tmp_path, capsys):
    runs = reproduce.main(["--out", str(tmp_path), *BUDGET, "--dry-list"])
    assert len(runs) == 8 + 9 * 5  # the selection runs on the validation world, then 9 configurations x 5 seeds
    assert {r["name"] for r in runs} == set(reproduce.CONFIGS)
    assert {r["seed"] for r in runs if r["name"] in reproduce.SFT} == {100}
    mind = next(r for r in runs if r["name"] == "mind-inertia0" and r["seed"] == 2)
    assert mind["argv"][:2] == ["--inertia", "0"] and mind["argv"][mind["argv"].index("--seed") + 1] == "2"
    # one step budget for every configuration
    assert {r["argv"][r["argv"].index("--steps") + 1] for r in runs} == {"7"}
    assert not os.path.exists(tmp_path / "runs")
    out = capsys.readouterr().out
    assert "53 to run" in out and "plus sft-best on 5 seeds" in out


def test_makespan_longest_first():
    assert reproduce.makespan([3, 3, 2, 2, 2], 2) == 7
    assert reproduce.makespan([5, 1, 1], 3) == 5
    assert reproduce.makespan([1, 2, 3], 1) == 6


def test_end_to_end_tiny_then_resume_skips(tmp_path, monkeypatch):
    """Two real tiny runs through train.py; the second invocation launches nothing and rebuilds the same table."""
    args = ["--out", str(tmp_path), *BUDGET, "--seeds", "0", "--only", "sft-all,mind", "--save-every", "5",
            "--", "--tiny-vocab", "300", "--eval-batch-size", "8", "--pretrain-steps", "2"]
    rep = reproduce.main(args)
    for name in ("sft-all", "mind"):
        d = tmp_path / "runs" / name / "0"
        assert (d / "metrics.json").exists() and (d / "log.jsonl").exists()
        assert not (d / "ckpt").exists()  # dropped after the run
        assert len(open(d / "log.jsonl").readlines()) == 7
    assert (tmp_path / "runs" / "mind" / "0" / "final_state.pt").exists()
    for png in ("ck_trends.png", "selection.png", "metanet_scores.png", "miniature.png", "mind_run.png"):
        assert (tmp_path / png).stat().st_size > 0
    monkeypatch.setattr(reproduce, "launch", lambda *a, **k: pytest.fail("a finished run was launched again"))
    rep2 = reproduce.main(args)
    assert rep2["rows"]["mind"]["id"]["values"] == rep["rows"]["mind"]["id"]["values"]
    # the MetaNet's probabilities: rows sum to 1 over the present perspectives; the start is the saved MetaNet
    pr = plots.metanet_probs(str(tmp_path / "runs" / "mind" / "0"))
    assert pr["start_source"] == "MetaNet after warm-up"
    for key in ("start", "end", "target_end"):
        assert np.allclose(np.nansum(pr[key], 1), 1.0, atol=1e-5)
    assert (tmp_path / "runs" / "mind" / "0" / "metanet_start.pt").exists()  # train.py saves it after warm-up
    # with the MetaNet saved after warm-up (OUT/metanet_start.pt), the start panel is that network's own p = π(s)
    end = torch.load(tmp_path / "runs" / "mind" / "0" / "final_state.pt", weights_only=False)["metanet"]
    torch.save(end, tmp_path / "runs" / "mind" / "0" / "metanet_start.pt")
    pr = plots.metanet_probs(str(tmp_path / "runs" / "mind" / "0"))
    assert pr["start_source"] == "MetaNet after warm-up" and np.allclose(pr["start"], pr["end"])


def test_smooth_is_a_trailing_mean():
    assert plots.smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2).tolist() == [1.0, 2.0, 4.0, 6.0]


def test_padding_ratio_of_length_chunks():
    lengths = [[10, 20, 10, 20]]
    assert bench.padding_ratio(lengths, 40) == pytest.approx(1.0)  # [10,10] and [20,20]
    assert bench.padding_ratio(lengths, 10 ** 6) == pytest.approx(80 / 60)  # one chunk padded to 20


def test_bench_smoke(tmp_path):
    out = bench.main(["--data", "synthetic", "--hidden", "32", "--layers", "1", "--heads", "2", "--vocab", "300",
                      "--reps", "1", "--warmup", "0", "--chunk-reps", "1", "--chunks", "64,1000000",
                      "--max-batch-tokens", "64", "--json", str(tmp_path / "b.json")])
    assert out["steps"]["mind β=0"]["sel"] == P.K  # β = 0 keeps every perspective
    assert out["steps"]["mind β=1"]["sel"] == 2  # β = 1 keeps the arg-max and the next best (--min-selected 2)
    assert out["steps"]["sft-all"]["ratio"] == 1.0
    assert out["padding"]["64"]["padding_ratio"] <= out["padding"]["1000000"]["padding_ratio"]
    assert out["padding"]["64"]["padding_ratio"] >= 1.0
    assert set(out["memory"]) == {"sft-all", "mind", "mind β=0"}
    assert all(m["step_peak"] > 0 and m["live_before"] > 0 for m in out["memory"].values())
    assert json.load(open(tmp_path / "b.json"))["steps"].keys() == out["steps"].keys()


# ---- scripts/paper.py: the paper's table on a real student; train.py is replaced by a fake that writes results

import eval as ev  # noqa: E402
import paper  # noqa: E402


def _acc(gsm8k, svamp, math500, csqa, strategyqa):
    return {t: {"accuracy": v, "strict_accuracy": v, "no_answer": 0, "n": 100} for t, v in
            (("gsm8k", gsm8k), ("svamp", svamp), ("math500", math500), ("csqa", csqa), ("strategyqa", strategyqa))}


TRAINED = {"sft-formal_symbolic": _acc(0.52, 0.3, 0.1, 0.38, 0.6), "sft-all": _acc(0.5, 0.5, 0.5, 0.5, 0.5),
           "mcc": _acc(0.4, 0.4, 0.4, 0.4, 0.4), "mind": _acc(0.6, 0.3333, 0.2, 0.45, 0.55),
           "sft-analogy": _acc(0.3, 0.3, 0.3, 0.3, 0.3)}
BASE = _acc(0.5, 0.25, 0.1, 0.4, 0.6)


def _fake_train(calls, fail=()):
    """train.py as the runner sees it: records the command and what OUT/eval_base held when it started; the base
    model is 'generated' only when no cached generations are there; writes results.json with eval.write_results."""
    def run(cmd):
        d = cmd[cmd.index("--out") + 1] if "--out" in cmd else cmd[cmd.index("--resume") + 1]
        name, cache = os.path.basename(d), os.path.join(d, "eval_base", "gsm8k.jsonl")
        calls.append({"name": name, "cmd": cmd, "cache": open(cache).read() if os.path.exists(cache) else None})
        if name in fail:
            return 1
        if not os.path.exists(cache):
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            with open(cache, "w") as f:
                f.write(f"generated in {name}\n")
        ev.write_results(d, {"base": BASE, "trained": TRAINED[name]}, {"gpqa_diamond": "no --gpqa-csv given"})
        return 0
    return run


def test_paper_trains_each_method_shares_the_base_cache_and_tabulates(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(paper, "run_train", _fake_train(calls))
    gpqa = tmp_path / "gpqa.csv"
    gpqa.write_text("Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\n")
    out = tmp_path / "paper"
    paper.main(["--student", "Qwen2.5-1.5B", "--out", str(out), "--seed", "3", "--steps", "7",
                "--eval-tasks-limit", "5", "--gpqa-csv", str(gpqa), "--", "--lora-r", "16"])
    assert [c["name"] for c in calls] == ["sft-formal_symbolic", "sft-all", "mcc", "mind"]
    cmd = calls[0]["cmd"]
    assert cmd[1] == paper.TRAIN and cmd[2:] == [
        "--student", "Qwen2.5-1.5B", "--method", "sft", "--perspective", "formal_symbolic",
        "--out", str(out / "sft-formal_symbolic"), "--seed", "3",
        "--data", os.path.join(REPO, "data", "mind_gsm8k_train.jsonl"), "--max-new-tokens", "512",
        "--steps", "7", "--eval-tasks-limit", "5", "--gpqa-csv", str(gpqa), "--lora-r", "16"]
    assert calls[3]["cmd"][2:6] == ["--student", "Qwen2.5-1.5B", "--method", "mind"]
    # the base model is generated in the first run only; every later run starts with its cache
    assert calls[0]["cache"] is None
    assert [c["cache"] for c in calls[1:]] == ["generated in sft-formal_symbolic\n"] * 3
    res = json.load(open(out / "paper.json"))
    assert list(res["rows"]) == ["base", "sft-formal_symbolic", "sft-all", "mcc", "mind"]
    # base: ID (10 + 50 + 25) / 3 = 28.3, OOD (40 + 60) / 2 = 50.0
    assert res["rows"]["base"] == {"math500": 10.0, "gsm8k": 50.0, "svamp": 25.0, "csqa": 40.0, "strategyqa": 60.0,
                                   "id_avg": 28.3, "ood_avg": 50.0}
    # sft: ID (10 + 52 + 30) / 3 = 30.7, OOD (38 + 60) / 2 = 49.0
    assert res["rows"]["sft-formal_symbolic"]["id_avg"] == 30.7 and res["rows"]["sft-formal_symbolic"]["ood_avg"] == 49.0
    assert res["gain"]["sft-formal_symbolic"] == {"math500": 0.0, "gsm8k": 2.0, "svamp": 5.0, "csqa": -2.0,
                                                  "strategyqa": 0.0, "id_avg": 2.4, "ood_avg": -1.0}
    # mind: ID (20 + 60 + 33.3) / 3 = 37.8 (+9.5), OOD (45 + 55) / 2 = 50.0 (+0.0)
    assert res["gain"]["mind"]["id_avg"] == 9.5 and res["gain"]["mind"]["ood_avg"] == 0.0
    assert res["rows"]["sft-all"]["id_avg"] == 50.0 and res["gain"]["mcc"]["ood_avg"] == -10.0
    md = (out / "paper.md").read_text()
    assert md.splitlines()[2] == "| base | 10.0 | 50.0 | 25.0 | 40.0 | 60.0 | 28.3 | 50.0 |"
    assert "| mind − base | +10.0 | +10.0 | +8.3 | +5.0 | -5.0 | +9.5 | +0.0 |" in md
    assert "Note: GPQA-D was not evaluated: no --gpqa-csv given" in md
    # run again: everything is finished, nothing is trained, the same table
    calls.clear()
    paper.main(["--student", "Qwen2.5-1.5B", "--out", str(out)])
    assert calls == [] and json.load(open(out / "paper.json")) == res


def test_paper_skips_finished_resumes_checkpointed_and_reports_failures(tmp_path, monkeypatch):
    out = tmp_path / "paper"
    # mind finished earlier (its base generations cached), mcc was killed after a checkpoint, sft-all never started
    ev.write_results(str(out / "mind"), {"base": _acc(0.9, 0.9, 0.9, 0.9, 0.9), "trained": TRAINED["mind"]})
    os.makedirs(out / "mind" / "eval_base")
    (out / "mind" / "eval_base" / "gsm8k.jsonl").write_text("generated in mind\n")
    os.makedirs(out / "mcc" / "ckpt")
    (out / "mcc" / "ckpt" / "trainer.pt").write_text("")
    os.makedirs(out / "mcc" / "eval_base")  # its own cache is kept, not replaced
    (out / "mcc" / "eval_base" / "gsm8k.jsonl").write_text("half of mcc's\n")
    calls = []
    monkeypatch.setattr(paper, "run_train", _fake_train(calls, fail={"sft-all"}))
    with pytest.raises(SystemExit, match="1 runs failed: sft-all; rerun the same command to resume"):
        paper.main(["--student", "Qwen2.5-1.5B", "--out", str(out), "--sft-perspective", "analogy"])
    assert [c["name"] for c in calls] == ["sft-analogy", "sft-all", "mcc"]  # mind: not trained again
    assert calls[0]["cmd"][4:8] == ["--method", "sft", "--perspective", "analogy"]
    assert calls[2]["cmd"][1:] == [paper.TRAIN, "--resume", str(out / "mcc")]
    assert calls[0]["cache"] == calls[1]["cache"] == "generated in mind\n" and calls[2]["cache"] == "half of mcc's\n"
    res = json.load(open(out / "paper.json"))  # the table of what finished; the base row of the first finished run
    assert list(res["rows"]) == ["base", "sft-analogy", "mcc", "mind"]
    assert res["rows"]["base"]["gsm8k"] == 50.0 and res["rows"]["mind"]["gsm8k"] == 60.0


def test_paper_dry_list_plans_and_runs_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "paper"
    ev.write_results(str(out / "mind"), {"base": BASE, "trained": TRAINED["mind"]})
    os.makedirs(out / "mcc" / "ckpt")
    (out / "mcc" / "ckpt" / "trainer.pt").write_text("")
    planned = []

    def fake_plan(cmd):
        planned.append(cmd)
        return {"error": "no config"} if "sft-all" in cmd else {"gib": {"peak": 41.87}, "tokens_per_step": 4096}

    monkeypatch.setattr(paper, "plan_memory", fake_plan)
    monkeypatch.setattr(paper, "run_train", lambda cmd: pytest.fail("--dry-list trained"))
    paper.main(["--student", "Qwen2.5-1.5B", "--out", str(out), "--dry-list", "--", "--batch-size", "2"])
    assert planned[0][1:] == [paper.TRAIN, "--student", "Qwen2.5-1.5B", "--dry-run", "--method", "sft",
                              "--perspective", "formal_symbolic", "--batch-size", "2"]
    assert [c[c.index("--method") + 1] for c in planned] == ["sft", "sft-all", "mcc", "mind"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:4] == ["sft-formal_symbolic", "train", "41.87", "4096"]
    assert lines[2].split()[:4] == ["sft-all", "train", "?", "?"] and lines[3] == "  memory plan failed: no config"
    assert lines[4].split()[:2] == ["mcc", "resume"] and lines[5].split()[:2] == ["mind", "finished"]
    assert not (out / "paper.json").exists()


def test_paper_bad_flags_fail_in_one_line(tmp_path, capsys):
    for argv, msg in [(["--methods", "mind,dpo"], "--methods: unknown method 'dpo'"),
                      (["--data", str(tmp_path / "none.jsonl")], "none.jsonl: no such file"),
                      (["--steps", "0"], "--steps 0: must be >= 1")]:
        with pytest.raises(SystemExit):
            paper.main(["--student", "Qwen2.5-1.5B", "--out", str(tmp_path), *argv])
        assert msg in capsys.readouterr().err
    bad = tmp_path / "gpqa.csv"
    bad.write_text("question,answer\n")
    with pytest.raises(SystemExit, match="missing columns 'Question'"):
        paper.main(["--student", "Qwen2.5-1.5B", "--out", str(tmp_path), "--gpqa-csv", str(bad)])


def test_probe_spread_by_hand(tmp_path):
    import probe_spread
    nan = float("nan")
    # question 0: ℓ⁰ 1..8 (spread 7); question 1: 2, 2.1, 5, absent... (spread 3)
    l0 = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 8], [2.0, 2.1, 5, nan, nan, nan, nan, nan]])
    os.makedirs(tmp_path / "run")
    torch.save({"l0": l0, "features": None}, tmp_path / "run" / "probe.pt")
    r = probe_spread.main([str(tmp_path / "run"), "--beta", "0.5", "--tau", "1", "2"])[str(tmp_path / "run")]
    assert r["mean"]["formal_symbolic"] == pytest.approx(1.5) and r["mean"]["planning"] == pytest.approx(4.0)
    assert r["spread_p10_p50_p90"][1] == pytest.approx(5.0)  # median of (7, 3)
    # kept if ℓ⁰_k − min ≤ τ ln 2: τ = 1 (0.69): q0 keeps 1, q1 keeps 2 (0.1); τ = 2 (1.39): q0 keeps 2, q1 keeps 2
    assert r["kept"] == {1.0: pytest.approx(1.5), 2.0: pytest.approx(2.0)}


def test_track_loss_shadows_see_the_same_updates_and_count_gains_by_hand():
    import track_loss
    from mind import InertiaCalibrator
    tee = track_loss.Tee(2, 0.5, "offset")
    ids, m = ["a", "b"], torch.ones(2, 2, dtype=torch.bool)
    x1, x2 = torch.tensor([[1.0, 3.0], [3.0, 5.0]]), torch.tensor([[3.0, 3.0], [1.0, 1.0]])
    tee.update(ids, x1, m)
    tee.update(ids, x2, m)
    for (rule, mu), name in zip(track_loss.SHADOWS, tee.shadows):
        alone = InertiaCalibrator(2, mu, rule)
        alone.update(ids, x1, m)
        alone.update(ids, x2, m)
        assert torch.allclose(tee.shadows[name].filtered(ids), alone.filtered(ids))
    # μ = 0 takes the whole innovation (gain 1); the first visit has nothing to move from and is not counted
    moved, innovation, n = tee.moves["instantaneous (μ = 0)"]
    assert n == 4 and moved == pytest.approx(innovation) and moved == pytest.approx(2 + 0 + 2 + 4)
    # bias-corrected EMA at μ = .9: the second visit takes (1 − μ)/(1 − μ²) of the innovation ℓ − L̃
    moved, innovation, n = tee.moves["debiased (μ = 0.9)"]
    assert moved / innovation == pytest.approx(0.1 / 0.19)
