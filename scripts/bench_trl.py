"""
This loop's training step against TRL's SFTTrainer: same model, same init, same data, same optimiser, one run.

    OMP_NUM_THREADS=1 python scripts/bench_trl.py            # about 10 minutes on a 2-core CPU, one thread
    python scripts/bench_trl.py --rounds 1 --steps 2 --systems ours,trl   # a quick look

TRL is a benchmark-only dependency, not in requirements.txt: `pip install trl` (measured with trl 1.16.0,
transformers 5.24, torch 2.13). Without it the script says so and exits with status 2.

Every system trains one tiny Qwen2 (built like train.py's tiny student; one saved init, deep-copied per system) on
the same (prompt, completion) pairs of the data: encode_example's token ids, the prompt masked out of the loss. A step
is --batch-size questions x their 8 rationales (32 sequences), in train.py's data order (train.Order); AdamW betas
(0.9, 0.95), weight decay on matrices only (student.make_optimizer, handed to TRL as its optimiser), clipping at
--max-grad-norm, a constant --lr. The systems (--systems):

  ours            train.train_step, --method sft-all, sorted chunks of <= --max-batch-tokens padded tokens
  ours-bpc        the same with --backward-per-chunk (each chunk's graph freed before the next chunk runs)
  ours-mind       train.train_step, --method mind (MetaNet, JS term; at init it keeps all eight rationales)
  ours-mind-bpc   the same with --backward-per-chunk
  trl             SFTTrainer as a user would set it on CPU: batch 32 (a step's sequences), no grad-accum,
                  bf16=False, gradient_checkpointing=False (TRL's two defaults that a CPU run has to turn off)
  trl-sorted-ga4  SFTTrainer tuned: each step's 32 sequences sorted by length, batch 8 x grad-accum 4
  trl-sorted-ga2, trl-sorted-ga8: the same with batch 16 x grad-accum 2, batch 4 x grad-accum 8
  trl-padfree     SFTTrainer with padding_free=True, batch 32 (one flattened row of the step's tokens)
  trl-padfree-ga4 padding_free, sorted, batch 8 x grad-accum 4

TRL runs its own Trainer.train() (its data loader, collator, fused-LM-head loss, logging); a callback reads the clock
at the end of each optimiser step. The systems are interleaved round by round: each round runs --steps steps of
every system from the saved init, in an order rotated every round, so a change in machine load hits all alike.
The first step of a round is not timed (first calls, AdamW's state being created). Printed per system:

  tokens/s     real tokens (prompt + completion, no padding) per second of the timed steps, median over rounds
  padded/real  tokens the model ran (padding included) over real tokens
  RSS+         peak RSS increase of the first --memory-steps steps (AdamW state, gradients, activations,
               the allocator's cache), each system in a fresh process of this script (--rss-of); untimed
  alloc        weights + the highest running total those steps ask of the CPU allocator (torch.profiler, as
               scripts/bench.py and scripts/measure_memory.py read it). It counts memory asked for and never
               touched: TRL's fused LM head reserves a [4096, 32768] fp32 tile (512 MiB) whatever the
               vocabulary, of which a 1024-token vocabulary touches 1/32, so RSS+ is the fairer figure here
  first-step loss, both definitions: ours optimises the mean over sequences of each sequence's mean token
               cross-entropy ("seq"); TRL the mean over all completion tokens of the step ("tok"). Each system's
               own loss is what it logged; the other definition is computed by hand (full logits, log-softmax,
               gather) from the same init on the batch that system was fed (ours: eval.collate of the step's
               sequences; TRL: the rows of its prepared dataset). They must agree across systems to 1e-3.
"""
import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL's trainers report their use on start
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))
import bench  # noqa: E402
import perspectives as P  # noqa: E402
import student  # noqa: E402
import train  # noqa: E402
from eval import collate, write_json  # noqa: E402
from measure_memory import allocator_peak  # noqa: E402

DEMO = os.path.join(REPO, "data", "demo_perspectives.jsonl")
INSTALL_HINT = "bench_trl.py needs TRL, a benchmark-only dependency: pip install trl  (measured with trl 1.16.0)"

# name -> what the system is; ours: (method, backward_per_chunk); TRL: (sorted, grad-accum, padding_free), its
# micro-batch being a step's sequences / grad-accum (ga4: 8 x 4 at the default 4 questions x 8 rationales)
OURS = {"ours": ("sft-all", False), "ours-bpc": ("sft-all", True),
        "ours-mind": ("mind", False), "ours-mind-bpc": ("mind", True)}
TRL = {"trl": (False, 1, False), "trl-sorted-ga2": (True, 2, False), "trl-sorted-ga4": (True, 4, False),
       "trl-sorted-ga8": (True, 8, False), "trl-padfree": (False, 1, True), "trl-padfree-ga4": (True, 4, True)}
DEFAULT_SYSTEMS = "ours,ours-bpc,ours-mind,trl,trl-sorted-ga4,trl-padfree-ga4"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=type(
        "F", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))
    g = ap.add_argument_group("data and model")
    g.add_argument("--data", default=DEMO, help="training JSONL (MIND format); 'synthetic' for the synthetic world")
    g.add_argument("--hidden", type=int, default=256, help="width of the student (train.py's tiny Qwen2)")
    g.add_argument("--layers", type=int, default=4, help="layers of the student")
    g.add_argument("--heads", type=int, default=4, help="attention heads")
    g.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary trained on the data")
    g.add_argument("--max-len", type=int, default=256, help="tokens per sequence (longer rationale bodies are cut)")
    g = ap.add_argument_group("training (the same for every system)")
    g.add_argument("--batch-size", type=int, default=4, help="questions per step (x their 8 rationales)")
    g.add_argument("--lr", type=float, default=3e-3, help="constant learning rate (train.py's tiny-student peak)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    g.add_argument("--max-batch-tokens", type=int, default=2048,
                   help="our chunk size: padded tokens per forward (train.py's CPU default)")
    g = ap.add_argument_group("measurement")
    g.add_argument("--systems", default=DEFAULT_SYSTEMS,
                   help=f"comma list from: {', '.join([*OURS, *TRL])} (see above)")
    g.add_argument("--steps", type=int, default=3, help="steps per system per round; the first is not timed")
    g.add_argument("--rounds", type=int, default=3, help="rounds (tokens/s is the median over rounds)")
    g.add_argument("--memory-steps", type=int, default=2, help="steps of the untimed peak-memory run (0: skip it)")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    g.add_argument("--seed", type=int, default=0, help="seed of the model and the data order")
    g.add_argument("--out", default=None, help="also write the numbers to this JSON file (atomically)")
    g.add_argument("--rss-of", default=None, metavar="SYSTEM",
                   help="internal: run --memory-steps steps of this one system in this fresh process and print its "
                        "peak RSS increase as JSON (the parent starts one such process per system)")
    return ap


def rss_kib() -> tuple[int, int]:
    """(resident now, peak resident since the last reset) of this process, KiB (Linux)."""
    with open("/proc/self/status") as f:
        kv = dict(line.split(":", 1) for line in f if ":" in line)
    return int(kv["VmRSS"].split()[0]), int(kv["VmHWM"].split()[0])


def reset_peak_rss() -> None:
    """Hand freed heap back to the OS, then restart the kernel's peak-RSS count at the present RSS."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_in_fresh_process(name: str, a) -> int | None:
    """Peak RSS increase (bytes) of --memory-steps steps of `name`, each system in its own fresh process: the peak
    of a process never goes down, so one process cannot measure several systems one after the other."""
    flags = ["--data", a.data, "--hidden", a.hidden, "--layers", a.layers, "--heads", a.heads, "--vocab", a.vocab,
             "--max-len", a.max_len, "--batch-size", a.batch_size, "--lr", a.lr, "--weight-decay", a.weight_decay,
             "--max-grad-norm", a.max_grad_norm, "--max-batch-tokens", a.max_batch_tokens, "--systems",
             ",".join(dict.fromkeys(["trl", name])), "--memory-steps", a.memory_steps, "--threads", a.threads,
             "--seed", a.seed, "--rss-of", name]
    r = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, flags)], capture_output=True, text=True)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode or not lines:
        print(f"warning: the RSS run of {name} failed (status {r.returncode}): {r.stderr.strip()[-500:]}",
              file=sys.stderr)
        return None
    return json.loads(lines[-1])["rss_increase"]


def trl_missing() -> bool:
    return importlib.util.find_spec("trl") is None


def step_sequences(seqs: list, qs: list[int], sort: bool) -> list:
    """The step's sequences in train_step's order (question by question, perspective by perspective); sorted by
    length (stable) for the tuned TRL runs, so that its consecutive micro-batches are of alike lengths."""
    out = [s for q in qs for s in seqs[q] if s is not None]
    return sorted(out, key=lambda s: len(s.input_ids)) if sort else out


def trl_rows(seqs: list, steps: list[list[int]], sort: bool) -> list[dict]:
    """TRL's pre-tokenised prompt-completion rows, one per sequence, in the order its sequential sampler will
    read them: input_ids = prompt + completion ids (encode_example's), completion_mask = 0 on the prompt.
    Pre-tokenised because tokenising the text again would not give encode_example's ids for a rationale cut to
    --max-len (TRL would cut the end, i.e. the final line), and the answer ids are tokenised apart on purpose."""
    return [{"input_ids": list(s.input_ids),
             "completion_mask": [0] * s.prompt_len + [1] * (len(s.input_ids) - s.prompt_len)}
            for qs in steps for s in step_sequences(seqs, qs, sort)]


def padded_tokens(lengths: list[int], batch: int, padding_free: bool) -> int:
    """Tokens TRL's collator hands the model for rows of these lengths read `batch` at a time: each micro-batch
    padded to its longest row, or flattened into one row without padding (padding_free)."""
    if padding_free:
        return sum(lengths)
    return sum(len(lengths[i:i + batch]) * max(lengths[i:i + batch]) for i in range(0, len(lengths), batch))


def pad_rows(rows: list[dict], pad_id: int) -> dict:
    """One right-padded batch of rows with input_ids and labels (-100 where no loss)."""
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    for n, r in enumerate(rows):
        L = len(r["input_ids"])
        ids[n, :L], labels[n, :L], att[n, :L] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": att}


def hand_losses(model, batch: dict) -> tuple[float, float]:
    """(mean over sequences of each one's mean token CE, mean over all labelled tokens) of one padded batch, from
    the full logits: the two loss definitions computed the plain way, with nothing of either system's code."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = batch["labels"][:, 1:]  # logits at t predict the token at t + 1
    mask = target != -100
    nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return (nll.sum(1) / mask.sum(1)).mean().item(), (nll.sum() / mask.sum()).item()


def ours_trainer(name: str, model, tok, seqs, qids, mask_all, features, a) -> bench.Trainer:
    """scripts/bench.py's Trainer (train.py's own train_step) for one of OURS, with a constant lr."""
    method, per_chunk = OURS[name]
    targs = bench.train_args(method, a.max_batch_tokens, a, lr=a.lr, weight_decay=a.weight_decay,
                             max_grad_norm=a.max_grad_norm)
    t = bench.Trainer(name, method, model, tok, targs, seqs, qids, mask_all, features)
    # bench.Trainer warms the lr up over train.py's schedule and leaves --backward-per-chunk off: set both here
    t.loop.sched = torch.optim.lr_scheduler.LambdaLR(t.opt, lambda s: 1.0)
    t.cfg = dataclasses.replace(t.cfg, backward_per_chunk=per_chunk)
    return t


def run_ours(t: bench.Trainer, steps: list[list[int]]) -> dict:
    """Steps of train.train_step (as bench.Trainer.step runs it, keeping the log row) -> per-step seconds, real
    and padded tokens, mean |I_q|, and the first step's logged loss (ℓ averaged with α: the seq mean for sft-all)."""
    times, tokens, padded, sel, first = [], [], 0, [], None
    for qs in steps:
        tok0, pad0 = t.loop.tokens, t.loop.padded
        t0 = time.perf_counter()
        row = train.train_step(t.loop, t.cfg, t.n, [qs])
        times.append(time.perf_counter() - t0)
        t.n += 1
        tokens.append(t.loop.tokens - tok0)
        padded += t.loop.padded - pad0
        sel.append(row["sel"])
        first = row["sft"] if first is None else first
    return {"times": times, "tokens": tokens, "padded": padded, "sel": statistics.mean(sel), "first_loss": first}


def trl_trainer(name: str, model, tok, seqs, steps: list[list[int]], a, out_dir: str):
    """An SFTTrainer for one of TRL over `steps`, and the callback that reads its clock and its logged losses."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    sort, accum, padding_free = TRL[name]
    batch = len(trl_rows(seqs, steps[:1], sort)) // accum  # main() checks that accum divides a step

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks, self.losses = [], []

        def on_train_begin(self, args, state, control, **kw):
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    m = copy.deepcopy(model).train()
    opt = student.make_optimizer(m, a.lr, a.weight_decay)  # the same AdamW as ours, handed to TRL
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = SFTConfig(output_dir=out_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                    max_steps=len(steps), learning_rate=a.lr, max_grad_norm=a.max_grad_norm,
                    bf16=False, gradient_checkpointing=False,  # TRL's defaults; a CPU run turns them off
                    use_cpu=True, padding_free=padding_free, completion_only_loss=True,
                    max_length=None,  # the rows are already cut to --max-len (padding_free refuses a max_length)
                    train_sampling_strategy="sequential",  # our order (the rows are laid out step by step)
                    dataloader_num_workers=0, logging_steps=1, save_strategy="no", report_to="none",
                    disable_tqdm=True, seed=a.seed)
    clock = Clock()
    trainer = SFTTrainer(model=m, args=cfg, train_dataset=Dataset.from_list(trl_rows(seqs, steps, sort)),
                         processing_class=tok, optimizers=(opt, sched), callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # it prints every log row (disable_tqdm puts it in)
    return trainer, clock


def run_trl(name: str, trainer, clock, seqs, steps: list[list[int]]) -> dict:
    """-> per-step seconds (between the ends of consecutive optimiser steps: data, forward, backward, clipping,
    AdamW, logging), real and padded tokens, and the first step's logged loss."""
    sort, accum, padding_free = TRL[name]
    clock.marks, clock.losses = [], []
    trainer.train()
    lengths = [[len(s.input_ids) for s in step_sequences(seqs, qs, sort)] for qs in steps]
    return {"times": [b - e for b, e in zip(clock.marks[1:], clock.marks)], "tokens": [sum(ls) for ls in lengths],
            "padded": sum(padded_tokens(ls, len(ls) // accum, padding_free) for ls in lengths), "sel": float(P.K),
            "first_loss": clock.losses[0]}


def main(argv=None):
    ap = build_parser()
    a = ap.parse_args(argv)
    for name in ("hidden", "layers", "heads", "vocab", "max_len", "batch_size", "max_batch_tokens", "rounds",
                 "threads"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(a, name)}: must be >= 1")
    if a.steps < 2:
        ap.error(f"--steps {a.steps}: must be >= 2 (the first step of a round is not timed)")
    if a.memory_steps < 0:
        ap.error(f"--memory-steps {a.memory_steps}: must be >= 0")
    if a.rss_of and a.memory_steps < 1:
        ap.error("--rss-of needs --memory-steps >= 1")
    if a.lr <= 0:
        ap.error(f"--lr {a.lr}: must be > 0")
    systems = [s for s in a.systems.split(",") if s]
    unknown = [s for s in systems if s not in OURS and s not in TRL]
    if unknown or not systems or len(set(systems)) < len(systems):
        ap.error(f"--systems {a.systems}: expected distinct names from {', '.join([*OURS, *TRL])}")
    if a.rss_of and a.rss_of not in systems:
        ap.error(f"--rss-of {a.rss_of}: not one of --systems")
    if "trl" not in systems:
        ap.error(f"--systems {a.systems}: must include trl, the reference of the ratios")
    if trl_missing():
        print(INSTALL_HINT, file=sys.stderr)
        raise SystemExit(2)
    import datasets
    import transformers
    import trl
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()  # TRL's and Trainer's notices would interleave with the table
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers renames SFTConfig's own flags
    torch.set_num_threads(a.threads)

    # ---- data, model (one init for every system), every (question, perspective) tokenised once: train.py's way
    data, model, tok, mask_all, seqs, qids = bench.load_data(a.data, a.batch_size, a.hidden, a.layers, a.heads,
                                                             a.vocab, a.max_len, a.seed)
    order = train.Order(len(data), a.seed)
    steps = [order.take(a.batch_size) for _ in range(max(a.steps, a.memory_steps))]  # train.py's data order
    # TRL reads a fixed number of rows per step: every step must hold the same number of sequences (B x 8, which
    # the grad-accums of TRL, 1 to 8, divide), or its steps would straddle ours
    sizes = {len(step_sequences(seqs, qs, False)) for qs in steps}
    if len(sizes) > 1:
        raise SystemExit(f"error: --data {a.data}: steps of {sorted(sizes)} sequences (questions without all "
                         f"{P.K} rationales); TRL's batches need steps of one size")
    features = None
    if any(OURS.get(s, ("",))[0] == "mind" for s in systems):
        # the MetaNet's features: train.py's probe pass (mean-pooled hidden states of the initial student)
        features = train.probe(model, tok, seqs, mask_all, student.Compute("cpu", a.max_batch_tokens), features=True,
                               progress=False)[1]
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    lens = [len(s.input_ids) for qs in steps[:a.steps] for s in step_sequences(seqs, qs, False)]
    print(f"student: {a.layers} layers x {a.hidden} wide, {n_params / 1e6:.2f}M parameters, fp32; "
          f"{a.batch_size} questions x {P.K} rationales per step ({statistics.mean(lens):.0f} tokens mean, "
          f"{max(lens)} max); lr {a.lr:g} constant, AdamW (0.9, 0.95), wd {a.weight_decay:g} on matrices, clip "
          f"{a.max_grad_norm:g}; {torch.get_num_threads()} thread(s); trl {trl.__version__}, transformers "
          f"{transformers.__version__}, torch {torch.__version__}")

    tmp = tempfile.mkdtemp(prefix="bench_trl_")  # TRL wants an output_dir; nothing is saved in it

    def build(name: str, n_steps: int):
        """A fresh system from the saved init, and the function that runs its n_steps steps."""
        if name in OURS:
            t = ours_trainer(name, model, tok, seqs, qids, mask_all, features, a)
            return lambda: run_ours(t, steps[:n_steps])
        trainer, clock = trl_trainer(name, model, tok, seqs, steps[:n_steps], a, os.path.join(tmp, name))
        torch.set_num_threads(a.threads)  # in case the Trainer's set-up changed it
        return lambda: run_trl(name, trainer, clock, seqs, steps[:n_steps])

    if a.rss_of:  # the child of rss_in_fresh_process: one system, no profiler, then the numbers on stdout
        fn = build(a.rss_of, a.memory_steps)
        reset_peak_rss()
        rss0, _ = rss_kib()
        fn()
        print(json.dumps({"system": a.rss_of, "rss_increase": (rss_kib()[1] - rss0) * 1024}))
        return None

    # ---- 1. time: rounds of --steps steps per system from the init, the order rotated every round
    runs = {s: [] for s in systems}
    total, done = a.rounds * len(systems), 0
    for r in range(a.rounds):
        for name in systems[r % len(systems):] + systems[:r % len(systems)]:
            runs[name].append(build(name, a.steps)())
            done += 1
            print(f"\rtiming rounds: {done}/{total} system-rounds", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    # ---- 2. peak memory of --memory-steps steps from the init, untimed: the process's peak RSS increase, one fresh
    # process per system (what the OS had to give: pages touched), and the CPU allocator's peak in this process
    # (bytes asked for, touched or not: TRL's fused LM head asks for a [4096, 32768] fp32 tile buffer, 512 MiB, of
    # which a vocabulary of --vocab touches only --vocab columns)
    rss, alloc = {}, {}
    for name in systems if a.memory_steps else []:
        print(f"\rpeak memory: {name:<16}", end="", file=sys.stderr, flush=True)
        rss[name] = rss_in_fresh_process(name, a)
        alloc[name] = weights + allocator_peak(build(name, a.memory_steps))
    print(file=sys.stderr)

    # ---- 3. the first-step loss under both definitions, by hand from the init on what each system was fed
    init = copy.deepcopy(model).eval()
    ours_batch = collate(step_sequences(seqs, steps[0], False), tok)
    ours_hand = hand_losses(init, ours_batch)
    trl_hand = {}
    for name in [s for s in systems if s in TRL]:
        trainer, _ = trl_trainer(name, model, tok, seqs, steps[:1], a, os.path.join(tmp, name))
        trl_hand[name] = hand_losses(init, pad_rows(list(trainer.train_dataset), tok.pad_token_id))

    # ---- the table
    out = {"config": vars(a), "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                                           "torch": torch.__version__}, "parameters": n_params,
           "weight_bytes": weights, "systems": {}}
    for name in systems:
        rs = runs[name]
        own = rs[0]["first_loss"]
        if name in OURS:  # ours logs the seq mean; its token mean by hand on the batch ours collates
            seq_loss, tok_loss = own, ours_hand[1]
        else:  # TRL logs the token mean; the seq mean by hand on the rows of its prepared dataset
            seq_loss, tok_loss = trl_hand[name][0], own
        out["systems"][name] = {
            "tokens_per_s": statistics.median(sum(r["tokens"][1:]) / sum(r["times"][1:]) for r in rs),
            "step_s": statistics.median(t for r in rs for t in r["times"][1:]),
            "padded_over_real": sum(r["padded"] for r in rs) / sum(sum(r["tokens"]) for r in rs),
            "rss_increase_bytes": rss.get(name), "allocator_peak_bytes": alloc.get(name),
            "sel": statistics.mean(r["sel"] for r in rs), "first_step_loss_seq": seq_loss,
            "first_step_loss_tok": tok_loss, "own_loss": "seq" if name in OURS else "tok",
            "first_step_losses_all_rounds": [r["first_loss"] for r in rs]}
    ref = out["systems"]["trl"]
    for s in out["systems"].values():
        s["tokens_per_s_vs_trl"] = s["tokens_per_s"] / ref["tokens_per_s"]
        for k in ("rss_increase", "allocator_peak"):
            s[f"{k}_vs_trl"] = s[f"{k}_bytes"] / ref[f"{k}_bytes"] if s[f"{k}_bytes"] and ref[f"{k}_bytes"] else None

    def mem(s: dict, k: str) -> str:
        return f"{s[f'{k}_bytes'] / 2**20:>7.0f}Mi {s[f'{k}_vs_trl']:>6.2f}" if s[f"{k}_vs_trl"] else f"{'-':>9} {'-':>6}"

    print(f"\n{a.rounds} round(s) x {a.steps} steps per system from the init, {a.steps - 1} timed; tokens/s: real "
          f"(prompt + completion, no padding) tokens, median over rounds; RSS+: peak RSS increase over "
          f"{a.memory_steps} steps, a fresh process per system; alloc: weights + CPU allocator peak over the same "
          f"steps; first-step loss: seq = mean of per-sequence mean CE, tok = mean over completion tokens (* = the "
          f"system's own logged loss; the other by hand on its batch)\n")
    print(f"{'system':<16} {'tokens/s':>8} {'vs trl':>6} {'step s':>7} {'pad/real':>8} {'RSS+':>9} {'vs trl':>6} "
          f"{'alloc':>9} {'vs trl':>6} {'|I_q|':>5}  {'loss seq':>9} {'loss tok':>9}")
    for name, s in out["systems"].items():
        star_seq, star_tok = ("*", " ") if s["own_loss"] == "seq" else (" ", "*")
        print(f"{name:<16} {s['tokens_per_s']:>8.0f} {s['tokens_per_s_vs_trl']:>6.2f} {s['step_s']:>7.3f} "
              f"{s['padded_over_real']:>8.3f} {mem(s, 'rss_increase')} {mem(s, 'allocator_peak')} {s['sel']:>5.2f}  "
              f"{s['first_step_loss_seq']:>8.6f}{star_seq}{s['first_step_loss_tok']:>8.6f}{star_tok}")

    # the check: every system that trains all rationales with uniform weight saw the same loss at step 1
    uniform = [n for n in systems if n in TRL or OURS[n][0] == "sft-all"]
    spread = {k: max(out["systems"][n][f"first_step_loss_{k}"] for n in uniform)
              - min(out["systems"][n][f"first_step_loss_{k}"] for n in uniform) for k in ("seq", "tok")}
    agree = max(spread.values()) < 1e-3
    out["first_step_loss_spread"], out["losses_agree"] = spread, agree
    best_trl = max((n for n in systems if n in TRL and n != "trl"), key=lambda n: out["systems"][n]["tokens_per_s"],
                   default="trl")
    summary = {"losses_agree": agree, "best_tuned_trl": best_trl}
    for n in [n for n in systems if n in OURS and OURS[n][0] == "sft-all"]:
        s = out["systems"][n]
        summary[n] = {"tokens_per_s_vs_trl": round(s["tokens_per_s_vs_trl"], 3),
                      "tokens_per_s_vs_best_tuned": round(s["tokens_per_s"] / out["systems"][best_trl]["tokens_per_s"],
                                                          3),
                      "rss_increase_vs_trl": s["rss_increase_vs_trl"] and round(s["rss_increase_vs_trl"], 3),
                      "allocator_peak_vs_trl": s["allocator_peak_vs_trl"] and round(s["allocator_peak_vs_trl"], 3)}
    for mind, sft in (("ours-mind", "ours"), ("ours-mind-bpc", "ours-bpc")):
        if mind in out["systems"] and sft in out["systems"]:
            summary[f"{mind}_step_vs_{sft}"] = round(out["systems"][mind]["step_s"] / out["systems"][sft]["step_s"], 3)
    out["summary"] = summary
    print(f"\nfirst-step losses agree across {', '.join(uniform)}: {'yes' if agree else 'NO'} (spread: seq "
          f"{spread['seq']:.1e}, tok {spread['tok']:.1e}); best tuned TRL: {best_trl}")
    print(json.dumps(summary))
    if a.out:
        write_json(a.out, out)
    return out

if __name__ == "__main__":
    main()
