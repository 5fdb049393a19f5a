"""
What MIND costs per optimiser step against its baselines, measured in one run on the same data and model.

    python scripts/bench.py               # a 4-layer 256-wide student, the demo data, 8 rationales x <= 256 tokens
    python scripts/bench.py --reps 4 --hidden 128 # quicker

Every method runs train.py's own step (train.train_step: the MetaNet's plan, the student's objective, backward,
the EMA and the meta loss, gradient clipping, AdamW, the MetaNet's step every --meta-accum) on the same question batches, the methods interleaved
step by step so that a change in machine load hits all of them alike; step times are medians. Printed:

  1. time per optimiser step of each method and its ratio to sft-all, with the phases of the MIND step (MetaNet
     plan, the student's forward, backward, EMA + meta loss, optimiser) and the real tokens per second;
  2. padded tokens over real tokens for chunk sizes of --max-batch-tokens (a step's sequences are sorted by length
     and cut into chunks of at most that many padded tokens: student.length_chunks), and sft-all's step time at each;
  3. peak memory of one step, mind vs sft-all: bytes live before the step (weights, AdamW state, the MetaNet, its
     features) plus the highest running total the step allocates on top of them (gradients, activations,
     transients), read from the CPU allocator through torch.profiler(profile_memory=True); not the process RSS
     (which adds the Python and torch libraries and the allocator's cache).

The MIND rows: "mind" is the default (β = 0.5) with the MetaNet as initialised, which on a fresh student selects about
every rationale (its scores are near-uniform); "mind β=0" selects all 8, the upper bound of its price (every rationale
with gradient, plus the MetaNet and the JS term); "mind β=1" keeps only the arg-max with gradient and runs the other
seven under no_grad for the EMA (the cost of the no-grad pass).
"""
import argparse
import copy
import os
import random
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import perspectives as P  # noqa: E402
import student  # noqa: E402
import train  # noqa: E402
from eval import encode_example, write_json  # noqa: E402
from measure_memory import allocator_peak  # noqa: E402
from metanet import MetaNet  # noqa: E402
from mind import InertiaCalibrator, Mind  # noqa: E402

DEMO = os.path.join(REPO, "data", "demo_perspectives.jsonl")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=type(
        "F", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))
    g = ap.add_argument_group("data and model")
    g.add_argument("--data", default=DEMO, help="training JSONL (MIND format); 'synthetic' for the synthetic world")
    g.add_argument("--hidden", type=int, default=256,
                   help="width of the student (a Qwen2 built like train.py's tiny one)")
    g.add_argument("--layers", type=int, default=4, help="layers of the student")
    g.add_argument("--heads", type=int, default=4, help="attention heads")
    g.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary trained on the data")
    g.add_argument("--max-len", type=int, default=256, help="tokens per sequence (longer rationale bodies are cut)")
    g = ap.add_argument_group("measurement")
    g.add_argument("--batch-size", type=int, default=4, help="questions per step (x their 8 rationales)")
    g.add_argument("--max-batch-tokens", type=int, default=2048, help="chunk size of the timed steps (section 1)")
    g.add_argument("--chunks", default="512,1024,2048,4096,8192,1000000",
                   help="chunk sizes of section 2 (1000000: one chunk per step, i.e. no length grouping)")
    g.add_argument("--reps", type=int, default=8, help="timed steps per method (after --warmup untimed ones)")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    g.add_argument("--chunk-reps", type=int, default=3, help="timed sft-all steps per chunk size in section 2")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    g.add_argument("--seed", type=int, default=0, help="seed of the model, the MetaNet and the batches")
    g.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    return ap


def train_args(method: str, mbt: int, a, **kw) -> argparse.Namespace:
    """train.py's flags for `method`, as its parser gives them (so defaults stay train.py's)."""
    ns = train.build_parser().parse_args(["--method", method, "--max-batch-tokens", str(mbt), "--max-len",
                                          str(a.max_len), "--tiny-hidden", str(a.hidden), "--tiny-layers",
                                          str(a.layers), "--tiny-heads", str(a.heads), "--tiny-vocab", str(a.vocab),
                                          "--device", "cpu", "--seed", str(a.seed)])
    train.resolve_defaults(ns, 1000)
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


class Trainer:
    """One method's model, optimiser and (for mind) MetaNet + calibrator, stepped by train.py's own train_step."""

    def __init__(self, name: str, method: str, model, tokenizer, targs, seqs, qids, mask_all, features=None,
                 beta=None):
        self.name, self.a = name, targs
        m = train.METHODS[method]
        model = copy.deepcopy(model).train()
        opt = student.make_optimizer(model, targs.lr, targs.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: student.lr_lambda(s, targs.warmup_steps, targs.steps,
                                                                                    targs.min_lr_ratio))
        self.metanet = meta_opt = None
        if m.metanet:
            torch.manual_seed(targs.seed)
            self.metanet = MetaNet(features.size(-1), P.K, targs.meta_hidden, targs.meta_attn_heads,
                                   targs.meta_score_heads, dropout=targs.meta_dropout)
            meta_opt = torch.optim.AdamW(self.metanet.parameters(), lr=targs.meta_lr)
        mind = Mind(self.metanet, InertiaCalibrator(P.K, targs.inertia, targs.inertia_rule),
                    targs.select_beta if beta is None else beta, targs.meta_tau, targs.student_tau, targs.min_selected,
                    targs.trend_weight, targs.select_tau)
        self.loop = train.Loop(model, tokenizer, opt, sched, seqs, qids, mask_all, mind,
                               features if m.metanet else None, meta_opt,
                               student.Compute("cpu", targs.max_batch_tokens, targs.precision))
        self.cfg = train.StepConfig(targs.cons_weight if m.consistency else 0.0, targs.mcc_weight if m.mcc else 0.0,
                                    targs.probe_every if m.metanet else 0, targs.meta_accum, targs.max_grad_norm)
        self.model, self.opt, self.meta_opt, self.features = model, opt, meta_opt, features
        self.n = 0

    def step(self, qs: list[int]) -> dict:
        """One optimiser step of train.train_step (grad_accum 1). -> phase times, tokens, |I_q|."""
        phases, tokens, padded = {}, self.loop.tokens, self.loop.padded
        t0 = time.perf_counter()
        row = train.train_step(self.loop, self.cfg, self.n, [qs], timer=phases)
        total = time.perf_counter() - t0
        self.n += 1
        return {"total": total, **phases, "tokens": self.loop.tokens - tokens, "padded": self.loop.padded - padded,
                "sel": row["sel"]}

    def persistent_bytes(self) -> int:
        """Bytes of the distinct storages live between steps: weights, AdamW state, the MetaNet and its features."""
        tensors = list(self.model.parameters())
        for s in self.opt.state.values():
            tensors += [v for v in s.values() if torch.is_tensor(v)]
        if self.metanet is not None:
            tensors += list(self.metanet.parameters()) + [self.features]
            for s in self.meta_opt.state.values():
                tensors += [v for v in s.values() if torch.is_tensor(v)]
            tensors += [p.grad for p in self.metanet.parameters() if p.grad is not None]  # accumulating
        seen = {}
        for x in tensors:
            st = x.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return sum(seen.values())


def padding_ratio(lengths_per_step: list[list[int]], max_tokens: int) -> float:
    """Σ padded / Σ real tokens when each step's sequences are cut by student.length_chunks."""
    real = padded = 0
    for lengths in lengths_per_step:
        for idx in student.length_chunks(lengths, max_tokens):
            real += sum(lengths[i] for i in idx)
            padded += len(idx) * max(lengths[i] for i in idx)
    return padded / real


def load_data(data_arg: str, batch_size: int, hidden: int, layers: int, heads: int, vocab: int, max_len: int,
              seed: int):
    """The benchmark's questions (all 8 perspectives where the data has them), the tiny student built on them, and
    every (question, perspective) tokenised once, as train.py does. -> (data, model, tokenizer, mask[Q,K], seqs, qids)
    (scripts/bench_trl.py measures on the same)"""
    if data_arg == "synthetic":
        data = P.synthetic_splits(200, 1, seed)["train"]
    elif not os.path.exists(data_arg):
        raise SystemExit(f"error: --data {data_arg}: no such file")
    else:
        data = P.read_training_jsonl(data_arg)
    data = [ex for ex in data if len(ex.rationales) == P.K] or data
    if len(data) < batch_size:
        raise SystemExit(f"error: --data {data_arg}: {len(data)} questions, fewer than --batch-size {batch_size}")
    model, tok = student.build_tiny_student(data, hidden, layers, heads, vocab, max_len, seed)
    mask_all = torch.tensor([[k in ex.rationales for k in P.KEYS] for ex in data])
    seqs = [[encode_example(tok, ex.question, ex.rationales[k], ex.answer, max_len=max_len)
             if k in ex.rationales else None for k in P.KEYS] for ex in data]
    return data, model, tok, mask_all, seqs, [ex.id for ex in data]


def main(argv=None):
    ap = build_parser()
    a = ap.parse_args(argv)
    for name in ("hidden", "layers", "heads", "vocab", "max_len", "batch_size", "max_batch_tokens", "reps", "threads",
                 "chunk_reps"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(a, name)}: must be >= 1")
    try:
        chunk_sizes = [int(x) for x in a.chunks.split(",") if x]
    except ValueError:
        ap.error(f"--chunks {a.chunks}: expected a comma list of integers")
    torch.set_num_threads(a.threads)
    random.seed(a.seed)
    torch.manual_seed(a.seed)

    # ---- data, model, every (question, perspective) tokenised once: what train.py does
    data, model, tok, mask_all, seqs, qids = load_data(a.data, a.batch_size, a.hidden, a.layers, a.heads, a.vocab,
                                                       a.max_len, a.seed)
    n_params = sum(p.numel() for p in model.parameters())
    lens = [len(s.input_ids) for row in seqs for s in row if s]
    print(f"student: {a.layers} layers x {a.hidden} wide, {n_params / 1e6:.2f}M parameters; {len(data)} questions x "
          f"{P.K} perspectives from {os.path.relpath(a.data, REPO) if a.data != 'synthetic' else 'synthetic'}; "
          f"sequence length mean {statistics.mean(lens):.0f}, max {max(lens)} tokens (--max-len {a.max_len}); "
          f"{a.batch_size} questions x {P.K} rationales per step; {torch.get_num_threads()} thread(s)")

    # ---- the MetaNet's features: train.py's probe pass (mean-pooled hidden states of the initial student)
    t0 = time.perf_counter()
    features = train.probe(model, tok, seqs, mask_all, student.Compute("cpu", a.max_batch_tokens), features=True,
                           progress=False)[1]
    t_probe = time.perf_counter() - t0

    data_args = (seqs, qids, mask_all)

    # ---- 1. step time, interleaved
    mbt = a.max_batch_tokens
    trainers = [Trainer("sft-all", "sft-all", model, tok, train_args("sft-all", mbt, a), *data_args),
                Trainer("mcc", "mcc", model, tok, train_args("mcc", mbt, a), *data_args),
                Trainer("mind", "mind", model, tok, train_args("mind", mbt, a), *data_args, features),
                Trainer("mind β=0", "mind", model, tok, train_args("mind", mbt, a), *data_args, features, beta=0.0),
                Trainer("mind β=1", "mind", model, tok, train_args("mind", mbt, a), *data_args, features, beta=1.0)]
    gen = random.Random(a.seed)
    batches = [gen.sample(range(len(data)), a.batch_size) for _ in range(a.warmup + a.reps)]
    times = {t.name: [] for t in trainers}
    total = (a.warmup + a.reps) * len(trainers)
    done = 0
    for i, qs in enumerate(batches):
        order = trainers if i % 2 == 0 else trainers[::-1]  # alternate the order: no method always goes first
        for t in order:
            res = t.step(qs)
            if i >= a.warmup:
                times[t.name].append(res)
            done += 1
            print(f"\rtiming steps {done}/{total}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in times[name])

    ref = med("sft-all", "total")
    print(f"\n1. time per optimiser step (median of {a.reps}, chunks of <= {mbt} padded tokens)\n")
    print(f"{'method':<10} {'step s':>8} {'vs sft-all':>10} {'|I_q|':>6} {'tokens/s':>9}   phases: plan / forward / "
          f"backward / EMA+meta / optimizer (s)")
    out = {"config": vars(a), "parameters": n_params, "probe_s_per_rationale": t_probe / int(mask_all.sum()), "steps": {}}
    for t in trainers:
        s = med(t.name, "total")
        tok_s = sum(r["tokens"] for r in times[t.name]) / sum(r["total"] for r in times[t.name])
        ph = {k: med(t.name, k) for k in ("plan", "forward", "backward", "observe", "optimizer")}
        sel = statistics.mean(r["sel"] for r in times[t.name])
        print(f"{t.name:<10} {s:>8.3f} {s / ref:>10.3f} {sel:>6.2f} {tok_s:>9.0f}   "
              + " / ".join(f"{v:.3f}" for v in ph.values()))
        out["steps"][t.name] = {"step_s": s, "ratio": s / ref, "sel": sel, "tokens_per_s": tok_s, "phases": ph}
    print(f"\nprobe pass (once per run, MIND only): {1e3 * t_probe / int(mask_all.sum()):.2f} ms per rationale, no grad")

    # ---- 2. padding vs chunk size: the lengths of 200 random steps; sft-all's step time at each size
    lsteps = [[len(seqs[q][k].input_ids) for q in gen.sample(range(len(data)), a.batch_size) for k in range(P.K)
               if seqs[q][k]] for _ in range(200)]
    print(f"\n2. padding: padded / real tokens over 200 random steps, and sft-all's step time "
          f"(median of {a.chunk_reps})\n")
    print(f"{'max-batch-tokens':>16} {'chunks/step':>11} {'padded/real':>11} {'step s':>8} {'tokens/s':>9}")
    out["padding"] = {}
    chunk_batches = [gen.sample(range(len(data)), a.batch_size) for _ in range(a.chunk_reps + 1)]
    for cs in chunk_sizes:
        ratio = padding_ratio(lsteps, cs)
        nch = statistics.mean(len(student.length_chunks(ls, cs)) for ls in lsteps)
        tr = Trainer("sft-all", "sft-all", model, tok, train_args("sft-all", cs, a), *data_args)
        rs = [tr.step(qs) for qs in chunk_batches][1:]  # first: untimed warm-up
        st = statistics.median(r["total"] for r in rs)
        tps = sum(r["tokens"] for r in rs) / sum(r["total"] for r in rs)
        label = f"{cs}" if cs < 10 ** 6 else "one chunk"
        print(f"{label:>16} {nch:>11.1f} {ratio:>11.3f} {st:>8.3f} {tps:>9.0f}")
        out["padding"][str(cs)] = {"chunks_per_step": nch, "padding_ratio": ratio, "step_s": st, "tokens_per_s": tps}

    # ---- 3. peak memory of one step: the same batch for both, after a step has created the AdamW state
    print("\n3. peak memory of one step (CPU allocator, torch.profiler): live before the step + the step's own peak\n")
    print(f"{'method':<10} {'live before':>12} {'step peak':>10} {'total':>10} {'vs sft-all':>10}")
    qs = batches[-1]
    mem = {}
    for t in [tr for tr in trainers if tr.name in ("sft-all", "mind", "mind β=0")]:
        before = t.persistent_bytes()
        peak = allocator_peak(lambda: t.step(qs))
        mem[t.name] = (before, peak)
    for name, (before, peak) in mem.items():
        tot, ref_tot = before + peak, sum(mem["sft-all"])
        print(f"{name:<10} {before / 2**20:>10.1f}Mi {peak / 2**20:>8.1f}Mi {tot / 2**20:>8.1f}Mi "
              f"{tot / ref_tot:>10.3f}")
        out.setdefault("memory", {})[name] = {"live_before": before, "step_peak": peak, "ratio": tot / ref_tot}

    m, w = out["steps"]["mind"]["ratio"], out["steps"]["mind β=0"]["ratio"]
    pad = padding_ratio(lsteps, mbt)
    one = padding_ratio(lsteps, 10 ** 9)
    print(f"\nsummary: step time mind / sft-all {m:.3f} (all 8 selected: {w:.3f}; target <= 1.15); padded / real "
          f"{pad:.3f} with length grouping in chunks of {mbt} tokens (target <= 1.10; one chunk per step: {one:.3f}); "
          f"peak memory mind / sft-all {out['memory']['mind']['ratio']:.3f}")
    out["summary"] = {"step_ratio": m, "step_ratio_all_selected": w, "padding_ratio": pad,
                      "padding_ratio_one_chunk": one, "memory_ratio": out["memory"]["mind"]["ratio"]}
    if a.json:
        write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
