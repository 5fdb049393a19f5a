"""torchrun on this CPU: 2 processes over gloo against 1 process with the same global batch, with DDP and with FSDP2
(which runs on CPU/gloo in torch 2.13), and --resume across a change of the number of processes.

All the 2-process runs are jobs of one torchrun launch of this file (python -m torch.distributed.run ... this file
JOBS.json): torch and transformers are imported once. Every run, 1 or 2 processes, is recorded the same way
(`recorded`): the selected sets I_q of every Mind.plan call and, at the end, the calibrator and the MetaNet of each
process, written to OUT/mind<rank>.pt.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as a torchrun script too
from conftest import REPO, fast_flags  # noqa: E402

# --select-beta 0.95 makes the selection act (some rationales unselected, run without gradients for the EMA);
# --batch-size 3 over 2 processes gives unequal blocks (2 and 1 questions), so the loss weights matter and the
# processes run different numbers of chunks (the idle chunks are exercised)
MIND = ("--select-beta", "0.95", "--steps", "4")
RUNS = {  # name: (flags, 2-process extra flags)
    "mind": (fast_flags(*MIND, "--grad-accum", "2"), []),
    "sft-all": (fast_flags("--method", "sft-all", "--steps", "4"), []),
    "per-chunk": (fast_flags(*MIND, "--backward-per-chunk", "--max-batch-tokens", "900"), []),
    "fsdp": (fast_flags(*MIND, "--max-batch-tokens", "900"), ["--fsdp"]),
}
LONG = fast_flags("--steps", "6", "--save-every", "3")  # the uninterrupted run the resumed ones must equal


class Stopped(Exception):
    pass


def recorded(argv: list[str], out: str, stop_at: int | None = None) -> None:
    """train.main(argv), recording every Mind.plan's selected set and the final MIND state into OUT/mind<rank>.pt;
    with stop_at, the run stops right after writing its checkpoint of that step (as a kill just after it would)."""
    import distributed
    import mind
    import train
    selected, minds = [], []
    plan, observe, save = mind.Mind.plan, mind.Mind.observe, train.save_checkpoint

    def plan_(self, features, mask, beta=None):
        out = plan(self, features, mask, beta)
        selected.append(out[1].tolist())
        return out

    def observe_(self, *a):
        minds[:] = [self]
        return observe(self, *a)

    def save_(out_, model, tokenizer, state):
        save(out_, model, tokenizer, state)
        if state["step"] == stop_at:
            raise Stopped

    mind.Mind.plan, mind.Mind.observe, train.save_checkpoint = plan_, observe_, save_
    try:
        train.main(argv)
    except Stopped:
        pass
    finally:
        mind.Mind.plan, mind.Mind.observe, train.save_checkpoint = plan, observe, save
    m = minds[0]
    torch.save({"selected": selected, "calibrator": m.calibrator.state_dict(),
                "metanet": m.metanet.state_dict() if m.metanet is not None else None},
               os.path.join(out, f"mind{distributed.rank()}.pt"))
    distributed.barrier()


def log(out: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def assert_same_log(got: list[dict], want: list[dict]) -> None:
    """Every logged number to 1e-5 relative (3e-6 absolute: the JS term starts near 1e-7); the counts exactly."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for r, q in zip(got, want):
        assert r["tokens"] == q["tokens"] and r.get("eval") == q.get("eval"), r["step"]
        for key in ("loss", "sft", "cons", "mcc", "meta", "sel", "alpha_entropy", "grad_norm", "lr", "c", "alpha"):
            assert r[key] == pytest.approx(q[key], rel=1e-5, abs=3e-6), (r["step"], key)
        assert [x is None for x in r["loss_k"]] == [x is None for x in q["loss_k"]]
        assert [x for x in r["loss_k"] if x is not None] == pytest.approx([x for x in q["loss_k"] if x is not None],
                                                                       rel=1e-5)


def assert_same_state(a: dict, b: dict, exact: bool, metanet_atol: float = 3e-5) -> None:
    """Two processes' (or two runs') calibrator and MetaNet: bit for bit, or to 1e-5 relative. The MetaNet to 3e-5
    absolute (measured: 1.1e-5 under FSDP2): float-order noise in its gradients becomes AdamW steps of up to a fraction
    of --meta-lr."""
    close = lambda atol: lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=atol, equal_nan=True)
    same = torch.equal if exact else close(3e-6)
    ca, cb = a["calibrator"], b["calibrator"]
    assert ca["ids"] == cb["ids"] and same(ca["c"], cb["c"]) and same(ca["memory"], cb["memory"])
    assert same(ca["weight"], cb["weight"])
    assert (a["metanet"] is None) == (b["metanet"] is None)
    for k in a["metanet"] or {}:
        assert (same if exact else close(metanet_atol))(a["metanet"][k], b["metanet"][k]), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 1-process references in this process, then every 2-process job in one torchrun launch, then the
    1-process resume of the 2-process run that stopped after its step-3 checkpoint."""
    root = tmp_path_factory.mktemp("dist")
    d = lambda name: str(root / name)
    for name, (flags, _) in RUNS.items():
        recorded(flags + ["--out", d(f"{name}-1")], d(f"{name}-1"))
    recorded(LONG + ["--out", d("long-1")], d("long-1"))
    recorded(LONG + ["--out", d("stop-1")], d("stop-1"), stop_at=3)  # to be resumed by 2 processes
    jobs = [(flags + extra + ["--out", d(f"{name}-2")], d(f"{name}-2"), None) for name, (flags, extra) in RUNS.items()]
    jobs.append((LONG + ["--out", d("stop-2")], d("stop-2"), 3))  # to be resumed by 1 process
    jobs.append((["--resume", d("stop-1"), "--fsdp", "--no-progress"], d("stop-1"), None))  # 1 -> 2, into FSDP2
    with open(root / "jobs.json", "w") as f:
        json.dump(jobs, f)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.abspath(__file__), str(root / "jobs.json")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    recorded(["--resume", d("stop-2"), "--no-progress"], d("stop-2"))  # 2 -> 1
    return d, done.stdout


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_equal_one(runs, name):
    """The same global batch split over 2 processes (DDP; DDP with a backward per chunk; FSDP2) logs what one process
    logs, selects exactly the same sets, ends with the same calibrator and MetaNet, and evaluates the same."""
    d, _ = runs
    one, two = d(f"{name}-1"), d(f"{name}-2")
    assert_same_log(log(two), log(one))
    ranks = [torch.load(os.path.join(two, f"mind{r}.pt"), weights_only=False) for r in (0, 1)]
    ref = torch.load(os.path.join(one, "mind0.pt"), weights_only=False)
    assert ranks[0]["selected"] == ranks[1]["selected"] == ref["selected"]
    if name != "sft-all":
        assert any(not all(row) for step in ref["selected"] for row in step)  # the selection did act
    assert_same_state(ranks[0], ranks[1], exact=True)  # MIND's state is identical on every process
    assert_same_state(ranks[0], ref, exact=False)
    m1, m2 = (json.load(open(os.path.join(x, "metrics.json"))) for x in (one, two))
    assert m2["eval"] == m1["eval"] and m2["tokens"] == m1["tokens"] and m2["steps"] == m1["steps"]
    assert m2["c"] == pytest.approx(m1["c"], rel=1e-5)


def test_one_checkpoint_written_by_rank_0_loads_with_plain_transformers(runs):
    """Rank 0 alone writes: one log, one checkpoint (FSDP2's gathered into one plain save_pretrained directory)."""
    from transformers import AutoModelForCausalLM
    d, stdout = runs
    for name in RUNS:
        files = {f for f in os.listdir(d(f"{name}-2")) if not f.startswith("mind")}
        assert files == {"ckpt", "log.jsonl", "metrics.json"} | ({"probe.pt", "metanet_start.pt"} if name != "sft-all"
                                                                  else set())
    one = AutoModelForCausalLM.from_pretrained(d("fsdp-1") + "/ckpt").state_dict()
    two = AutoModelForCausalLM.from_pretrained(d("fsdp-2") + "/ckpt").state_dict()
    # FSDP2's reduce-scatter sums in another order; AdamW turns that into differences of ~1e-6 (measured: 2.7e-6 at
    # most, on weights of magnitude 0.08), which near-zero entries cannot meet at atol 1e-6
    assert one.keys() == two.keys() and all(torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-5) for k in one)
    assert stdout.count("eval id:") == len(RUNS) + 1  # the runs that finished, once each: rank 1 prints nothing


@pytest.mark.parametrize("name", ["stop-2", "stop-1"])
def test_resume_across_a_change_of_processes(runs, name):
    """Stopped after its step-3 checkpoint and resumed with the other number of processes (2 -> 1; 1 -> 2 under
    FSDP2, whose optimizer state is loaded from the same checkpoint format): the uninterrupted 1-process run."""
    d, _ = runs
    assert_same_log(log(d(name)), log(d("long-1")))
    # AdamW divides by √v: float-order noise in a near-zero MetaNet gradient moves a weight by up to a fraction of
    # --meta-lr (1e-4); measured here: 6e-6 at most, the calibrator within 1e-7 relative
    assert_same_state(torch.load(os.path.join(d(name), "mind0.pt"), weights_only=False),
                      torch.load(os.path.join(d("long-1"), "mind0.pt"), weights_only=False), exact=False,
                      metanet_atol=1e-5)


def test_flags_that_need_torchrun_are_refused(capsys):
    import train
    for argv, named in ((["--fsdp"], "--fsdp"), (["--fsdp", "--lora-r", "4"], "--lora-r"),
                        (["--fsdp", "--backward-per-chunk"], "--backward-per-chunk")):
        with pytest.raises(SystemExit):
            train.main(argv)
        assert named in capsys.readouterr().err.strip().splitlines()[-1]


if __name__ == "__main__":  # one process of the torchrun launch in `runs`
    import distributed
    distributed.init()
    for argv, out, stop_at in json.load(open(sys.argv[1])):
        recorded(argv, out, stop_at)
    distributed.close()
