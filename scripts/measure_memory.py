"""
Check train.py's memory plan (--dry-run) against a real training step on the CPU.

    python scripts/measure_memory.py --family configs/Qwen2.5-0.5B --layers 2 --hidden 256 -- --max-len 64 --batch-size 1
    python scripts/measure_memory.py --family configs/Llama-3.1-8B -- --lora-r 8 --grad-checkpointing --max-len 64

A scaled-down model of the family (its vocabulary, tying, biases, GQA ratio and MLP ratio; fewer and narrower
layers) runs two optimiser steps of the real loop's step (train.train_step with every rationale selected:
forward, backward, gradient clipping, AdamW). The peak of the second step (AdamW state exists by then) is read from the
allocator through torch.profiler(profile_memory=True): the bytes live when the step starts (weights, AdamW state)
plus the highest running total of the step's own allocations. It is printed next to plan_memory.memory_plan for the same
flags (after --), as JSON.
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
from types import SimpleNamespace

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import eval as ev  # noqa: E402
import perspectives as P  # noqa: E402
import student  # noqa: E402
import train  # noqa: E402
from mind import InertiaCalibrator, Mind  # noqa: E402
from scripts import plan_memory  # noqa: E402


def scaled_config(family: str, layers: int = 2, hidden: int = 256, heads: int = 4, vocab: int | None = None):
    """The config of `family` (a directory with config.json) with fewer, narrower layers; kv heads and the MLP width
    keep the family's ratios."""
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(family)
    kv = max(1, heads * cfg.num_key_value_heads // cfg.num_attention_heads)
    mlp = round(hidden * cfg.intermediate_size / cfg.hidden_size / 64) * 64
    cfg.update({"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
                "num_key_value_heads": kv, "intermediate_size": mlp, "head_dim": hidden // heads})
    if vocab:
        cfg.vocab_size = vocab
    return cfg


@contextlib.contextmanager
def quiet_stderr():
    """The profiler's C++ side logs start/stop lines to fd 2; keep them out of printed tables."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def allocator_peak(fn) -> int:
    """Highest running total of bytes allocated (minus freed) while fn runs, from the profiler's memory events
    (counted from 0 when profiling starts, so it is what fn adds to what was already live)."""
    from torch.profiler import ProfilerActivity, profile
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return max([0, *(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")])


def live_bytes(tensors) -> int:
    """Bytes of the distinct storages behind tensors."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def measure(cfg, flags: list[str], seed: int = 0) -> dict:
    """-> {"plan": plan_memory.memory_plan(...), "measured_peak": bytes, "planned_peak": bytes, "ratio": plan/measured}"""
    from transformers import AutoModelForCausalLM
    ap = train.build_parser()
    argv = ["--student", "scaled", "--device", "cpu", *flags]
    a = ap.parse_args(argv)
    train.check_args(ap, a, train.given_flags(ap, argv))
    a.precision = student.resolve_precision(a.precision, a.device)
    a.max_batch_tokens = a.max_batch_tokens or 8192  # as planned (the plan's default is the GPU's)
    plan = plan_memory.memory_plan(cfg, a)

    torch.manual_seed(seed)
    dtype = torch.bfloat16 if a.lora_r and a.precision == "bf16-mixed" else torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)  # as student.load_student loads it
    if a.grad_checkpointing:
        model.activation_checkpointing_enable()
        model.config.use_cache = False
    if a.lora_r:
        student.add_lora(model, student.StudentSpec(name="scaled", precision=a.precision, lora_r=a.lora_r,
                                                    lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout))
    model.train()
    opt = student.make_optimizer(model, a.lr or 1e-4, a.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    # B questions × P rationales of exactly --max-len tokens, the worst case the plan assumes
    B, Pq, T = a.batch_size, plan["perspectives"], a.max_len
    gen = torch.Generator().manual_seed(seed)
    # (a one-token prompt, so every position but the first is labelled, and an answer span of the planned length)
    A = plan_memory.PLAN_ANSWER_TOKENS
    seqs = [[ev.Encoded(torch.randint(0, cfg.vocab_size, (T,), generator=gen).tolist(), prompt_len=1,
                        answer_start=T - 1 - A, answer_end=T - 1) for _ in range(Pq)] + [None] * (P.K - Pq)
            for _ in range(B)]
    mask = torch.zeros(B, P.K, dtype=torch.bool)
    mask[:, :Pq] = True  # every rationale selected, uniform α: the plan's worst case
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=0)
    loop = train.Loop(model, tok, opt, sched, seqs, [str(b) for b in range(B)], mask,
                      Mind(None, InertiaCalibrator(P.K, 0.9)), None, None,
                      student.Compute("cpu", a.max_batch_tokens, a.precision))
    method = train.METHODS[a.method]
    cfg_step = train.StepConfig(cons_weight=a.cons_weight if method.consistency else 0.0,
                                mcc_weight=a.mcc_weight if method.mcc else 0.0, max_grad_norm=1.0,
                                backward_per_chunk=a.backward_per_chunk)
    step = lambda: train.train_step(loop, cfg_step, 0, [list(range(B))])  # the loop's real step

    step()  # creates AdamW's state
    state = [p for p in model.parameters()] + [t for s in opt.state.values() for t in s.values()]
    resident = live_bytes(state)
    measured = resident + allocator_peak(step)
    return {"plan": plan, "resident_at_step_start": resident, "measured_peak": measured,
            "planned_peak": plan["bytes"]["peak"], "ratio": plan["bytes"]["peak"] / measured}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default=os.path.join(REPO, "configs", "Qwen2.5-0.5B"), help="config dir of the family")
    ap.add_argument("--layers", type=int, default=2, help="layers of the scaled-down model")
    ap.add_argument("--hidden", type=int, default=256, help="width of the scaled-down model")
    ap.add_argument("--heads", type=int, default=4, help="attention heads of the scaled-down model")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default: the family's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("train_flags", nargs="*", help="train.py flags after --")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = scaled_config(args.family, args.layers, args.hidden, args.heads, args.vocab)
    r = measure(cfg, args.train_flags)
    print(json.dumps({"family": args.family, "layers": args.layers, "hidden": args.hidden, "flags": args.train_flags,
                      "measured_peak": r["measured_peak"], "planned_peak": r["planned_peak"],
                      "ratio": round(r["ratio"], 4), "peak_at": r["plan"]["peak_at"],
                      "resident_at_step_start": r["resident_at_step_start"], "plan_bytes": r["plan"]["bytes"],
                      "plan_activations": r["plan"]["activations"]}, indent=2))


if __name__ == "__main__":
    main()
