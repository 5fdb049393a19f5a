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


def plan(tmp_path, *extra):
    a = reproduce.build_parser().parse_args(["--out", str(tmp_path), *BUDGET, *extra])
    return a, {(r["name"], r["seed"]): r for r in reproduce.planned_runs(a)}


def test_aggregate_mean_std_best_sft_and_paired(tmp_path):
    a, runs = plan(tmp_path)
    acc = {  # (ID, OOD) per seed
        "mind": [(0.5, 0.2), (0.6, 0.3), (0.7, 0.4)],
        "sft-all": [(0.4, 0.3), (0.6, 0.3), (0.5, 0.1)],
        "sft-intuitive": [(0.3, 0.1), (0.3, 0.1), (0.3, 0.1)],
        "sft-planning": [(0.3, 0.2), (0.3, 0.2), (0.3, 0.2)],  # ties intuitive on ID, wins on OOD
        "sft-analogy": [(0.1, 0.0), (0.2, 0.0), (0.1, 0.0)],
    }
    for name, per_seed in acc.items():
        for seed, (i, o) in enumerate(per_seed):
            fake_run(tmp_path, runs[(name, seed)], i, o)
    rep = reproduce.main(["--out", str(tmp_path), *BUDGET, "--aggregate-only", "--no-plots"])
    rows = rep["rows"]
    assert rows["mind"]["id"]["mean"] == pytest.approx(0.6)
    assert rows["mind"]["id"]["std"] == pytest.approx(0.1)  # sample std (ddof 1) of 0.5, 0.6, 0.7
    assert rows["sft-all"]["ood"]["std"] == pytest.approx(np.std([0.3, 0.3, 0.1], ddof=1))
    assert rows["mind"]["id_strict"]["mean"] == pytest.approx(0.3)
    assert rep["best_sft"] == "planning" and rows["sft-best"]["from"] == "sft-planning"
    assert rows["sft-best"]["ood"]["mean"] == pytest.approx(0.2)
    # MIND minus sft-all on the same seeds: OOD -0.1, 0.0, +0.3
    d = rep["paired"]["sft-all"]
    assert d["ood"]["values"] == pytest.approx([-0.1, 0.0, 0.3])
    assert d["ood_higher_tied_lower"] == [1, 1, 1]
    assert rep["paired"]["sft-best"]["id"]["mean"] == pytest.approx(0.3)
    md = open(tmp_path / "miniature.md").read()
    assert "60.0 ± 10.0" in md and "best single perspective (planning)" in md and "not run" in md  # mcc is missing
    assert json.load(open(tmp_path / "miniature.json"))["best_sft"] == "planning"


def test_single_seed_has_zero_std_and_missing_seeds_are_counted(tmp_path):
    a, runs = plan(tmp_path)
    fake_run(tmp_path, runs[("mcc", 1)], 0.25, 0.5)
    rep = reproduce.main(["--out", str(tmp_path), *BUDGET, "--aggregate-only", "--no-plots"])
    assert rep["rows"]["mcc"]["id"] == {"mean": 0.25, "std": 0.0, "n": 1, "values": [0.25]}
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
    assert len(runs) == 17 * 3
    assert {r["name"] for r in runs} == set(reproduce.CONFIGS)
    mind = next(r for r in runs if r["name"] == "mind-inertia0" and r["seed"] == 2)
    assert mind["argv"][:2] == ["--inertia", "0"] and mind["argv"][mind["argv"].index("--seed") + 1] == "2"
    # one step budget for every configuration
    assert {r["argv"][r["argv"].index("--steps") + 1] for r in runs} == {"7"}
    assert not os.path.exists(tmp_path / "runs")
    assert "51 to run" in capsys.readouterr().out


def test_makespan_longest_first():
    assert reproduce.makespan([3, 3, 2, 2, 2], 2) == 7
    assert reproduce.makespan([5, 1, 1], 3) == 5
    assert reproduce.makespan([1, 2, 3], 1) == 6


def test_end_to_end_tiny_then_resume_skips(tmp_path, monkeypatch):
    """Two real tiny runs through train.py; the second invocation launches nothing and rebuilds the same table."""
    args = ["--out", str(tmp_path), *BUDGET, "--seeds", "0", "--only", "sft-all,mind", "--save-every", "5",
            "--", "--tiny-vocab", "300", "--eval-batch-size", "8"]
    rep = reproduce.main(args)
    for name in ("sft-all", "mind"):
        d = tmp_path / "runs" / name / "0"
        assert (d / "metrics.json").exists() and (d / "log.jsonl").exists()
        assert not (d / "ckpt").exists()  # dropped after the run
        assert len(open(d / "log.jsonl").readlines()) == 7
    assert (tmp_path / "runs" / "mind" / "0" / "final_state.pt").exists()
    for png in ("ck_trends.png", "selection.png", "metanet_scores.png", "miniature.png"):
        assert (tmp_path / png).stat().st_size > 0
    monkeypatch.setattr(reproduce, "launch", lambda *a, **k: pytest.fail("a finished run was launched again"))
    rep2 = reproduce.main(args)
    assert rep2["rows"]["mind"]["id"] == rep["rows"]["mind"]["id"]
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
    assert out["steps"]["mind β=1"]["sel"] == 1  # β = 1 keeps the arg-max only
    assert out["steps"]["sft-all"]["ratio"] == 1.0
    assert out["padding"]["64"]["padding_ratio"] <= out["padding"]["1000000"]["padding_ratio"]
    assert out["padding"]["64"]["padding_ratio"] >= 1.0
    assert set(out["memory"]) == {"sft-all", "mind", "mind β=0"}
    assert all(m["step_peak"] > 0 and m["live_before"] > 0 for m in out["memory"].values())
    assert json.load(open(tmp_path / "b.json"))["steps"].keys() == out["steps"].keys()
