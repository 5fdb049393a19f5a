"""
Peak memory and time of one student step's loss + backward, on the CPU, for three ways of computing the loss (issue 13):

  full     today's path: the model's full logits, losses.sequence_ce, answer logits gathered from the full logits,
           L = L_SFT + λ L_cons, one backward after every chunk has run (all chunks' graphs live at once)
  hidden   losses.hidden_ce and losses.answer_logits_from_hidden on the final hidden states; still one backward
  chunked  `hidden` plus a per-chunk backward: a no-grad pre-pass collects every rationale's answer logits, then each
           chunk runs, takes its share of L_SFT and losses.consistency_loss_partial, and backpropagates at once

A scaled-down Qwen2 with a large vocabulary (default hidden 256, 2 layers, V = 32000, tied embeddings as
Qwen2.5-1.5B) runs B questions × K rationales of about --len tokens in chunks of --rows sequences, as train.run_student
chunks them. Each measurement is a fresh subprocess (variants interleaved, --repeats times): peak RSS of the process
(resource.getrusage ru_maxrss) minus its RSS before the first step, and the allocator's peak during one more step
(torch.profiler, profile_memory=True: the bytes live at the step's start plus the highest running total of its own
allocations). Every variant must give the same loss and gradient norm; the script checks it.

    OMP_NUM_THREADS=1 python scripts/bench_memory.py            # ~2-3 min on one core
    python scripts/bench_memory.py --repeats 1 --len 128        # a quick look
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import losses as L  # noqa: E402
from scripts.measure_memory import allocator_peak  # noqa: E402

VARIANTS = ("full", "hidden", "chunked")
PROMPT, ANSWER = 64, 4  # prompt tokens (label -100); answer-span tokens, followed by "." and end of turn


def build(args):
    """-> model, the step's sequences as chunks of padded tensors, alpha[B,K], span_mask[B,K,A]"""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=args.len, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).float().train()
    g = torch.Generator().manual_seed(1)
    B, K = args.questions, args.perspectives
    seqs = []  # (b, k, ids, prompt_len, answer_start)
    for b in range(B):
        for k in range(K):
            n = args.len - int(torch.randint(0, args.len // 4, (1,), generator=g))  # lengths vary: padding
            ids = torch.randint(0, args.vocab, (n,), generator=g)
            seqs.append((b, k, ids, min(PROMPT, args.len // 4), n - 2 - ANSWER))
    seqs.sort(key=lambda s: len(s[2]))  # length-sorted chunks, as train.length_chunks
    chunks = []
    for s in range(0, len(seqs), args.rows):
        part = seqs[s:s + args.rows]
        T = max(len(p[2]) for p in part)
        ids = torch.zeros(len(part), T, dtype=torch.long)
        attn = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        pos = torch.zeros(len(part), ANSWER, dtype=torch.long)
        for r, (_, _, x, p0, a0) in enumerate(part):
            ids[r, :len(x)], attn[r, :len(x)], labels[r, p0:len(x)] = x, 1, x[p0:]
            pos[r] = torch.arange(a0 - 1, a0 - 1 + ANSWER)  # logits at a0-1+a predict answer token a
        rows = (torch.tensor([p[0] for p in part]), torch.tensor([p[1] for p in part]))
        chunks.append({"ids": ids, "attn": attn, "labels": labels, "pos": pos, "rows": rows})
    alpha = torch.rand(B, K, generator=g)
    alpha = alpha / alpha.sum(1, keepdim=True)  # every rationale selected, unequal weights
    span = torch.ones(B, K, ANSWER, dtype=torch.bool)
    return model, chunks, alpha, span


def step_full(model, chunks, alpha, span, lam, chunk_tokens):
    """Today's train.student_objective: full logits per chunk, one backward."""
    B, K = alpha.shape
    ell = torch.zeros(B, K)
    ans = torch.zeros(B, K, ANSWER, model.config.vocab_size)
    for c in chunks:
        logits = model(input_ids=c["ids"], attention_mask=c["attn"], use_cache=False).logits
        ell = ell.index_put(c["rows"], L.sequence_ce(logits, c["labels"]))
        al = logits.gather(1, c["pos"].unsqueeze(-1).expand(-1, -1, logits.size(-1))).float()
        ans = ans.index_put(c["rows"], al)
        del logits  # as `out` being rebound in the loop
    loss = L.weighted_sft(ell, alpha) + lam * L.consistency_loss(ans, alpha, span)
    loss.backward()
    return loss.item()


def step_hidden(model, chunks, alpha, span, lam, chunk_tokens):
    """hidden_ce + answer logits from the hidden states; still one backward."""
    B, K = alpha.shape
    head = model.get_output_embeddings()
    ell = torch.zeros(B, K)
    ans = torch.zeros(B, K, ANSWER, model.config.vocab_size)
    for c in chunks:
        hidden = model.model(input_ids=c["ids"], attention_mask=c["attn"], use_cache=False).last_hidden_state
        ell = ell.index_put(c["rows"], L.hidden_ce(hidden, head.weight, c["labels"], head.bias, chunk_tokens))
        ans = ans.index_put(c["rows"], L.answer_logits_from_hidden(hidden, head.weight, c["pos"], head.bias))
    loss = L.weighted_sft(ell, alpha) + lam * L.consistency_loss(ans, alpha, span)
    loss.backward()
    return loss.item()


def step_chunked(model, chunks, alpha, span, lam, chunk_tokens):
    """Pre-pass for the partners' answer logits, then one backward per chunk."""
    B, K = alpha.shape
    head = model.get_output_embeddings()
    partners = torch.zeros(B, K, ANSWER, model.config.vocab_size)
    with torch.no_grad():
        for c in chunks:
            hidden = model.model(input_ids=c["ids"], attention_mask=c["attn"], use_cache=False).last_hidden_state
            partners.index_put_(c["rows"], L.answer_logits_from_hidden(hidden, head.weight, c["pos"], head.bias))
    total = 0.0
    for c in chunks:
        hidden = model.model(input_ids=c["ids"], attention_mask=c["attn"], use_cache=False).last_hidden_state
        ell = L.hidden_ce(hidden, head.weight, c["labels"], head.bias, chunk_tokens)
        al = L.answer_logits_from_hidden(hidden, head.weight, c["pos"], head.bias)
        sft = (alpha[c["rows"]] * ell).sum() / B  # this chunk's terms of L_SFT = mean_b Σ_k α_k ℓ_k
        cons = L.consistency_loss_partial(al, c["rows"], partners, alpha, span)
        loss = sft + lam * cons
        loss.backward()
        total += loss.item()  # the partial's value is half its pairs: the chunks add up to L
    return total


STEPS = {"full": step_full, "hidden": step_hidden, "chunked": step_chunked}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args):
    torch.set_num_threads(1)
    model, chunks, alpha, span = build(args)
    fn = STEPS[args.child]

    def step():
        return fn(model, chunks, alpha, span, args.cons_weight, args.chunk_tokens)

    base = rss_bytes()
    t0 = time.perf_counter()
    loss = step()  # no separate warm-up: the lazy initialisation is small next to the step, and time is short
    seconds = time.perf_counter() - t0
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss: KiB on Linux
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # every step allocates its gradients; they are dropped outside the profiled region, because the profiler does not
    # report frees of blocks allocated before it started (it would count the old gradients as still live)
    model.zero_grad(set_to_none=True)
    alloc_peak = weights + allocator_peak(step)  # live at the step's start: the weights
    tokens = sum(int((c["labels"][:, 1:] != -100).sum()) for c in chunks)
    print(json.dumps({"variant": args.child, "rss_peak": rss_peak, "alloc_peak": alloc_peak, "weights": weights,
                      "step_s": seconds, "loss": loss, "grad_norm": grad_norm, "labelled_tokens": tokens,
                      "padded_tokens": sum(c["ids"].numel() for c in chunks)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary V (the LM head is what the loss projects onto)")
    ap.add_argument("--hidden", type=int, default=256, help="width of the Qwen2 model")
    ap.add_argument("--layers", type=int, default=2, help="layers of the Qwen2 model")
    ap.add_argument("--questions", type=int, default=2, help="B")
    ap.add_argument("--perspectives", type=int, default=4, help="K rationales per question")
    ap.add_argument("--len", type=int, default=512, help="longest sequence; the others are up to a quarter shorter")
    ap.add_argument("--rows", type=int, default=2, help="sequences per model chunk (train.py's --max-batch-tokens)")
    ap.add_argument("--chunk-tokens", type=int, default=1024, help="hidden_ce's projection chunk")
    ap.add_argument("--cons-weight", type=float, default=1.0, help="λ")
    ap.add_argument("--repeats", type=int, default=2, help="fresh subprocesses per variant, interleaved")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "repeats")]
    runs = {v: [] for v in VARIANTS}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for r in range(args.repeats):
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]  # interleaved, each variant in a different slot each repeat
        for v in order:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", v, *flags], env=env,
                                 capture_output=True, text=True, check=True)
            runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))

    # memory: the median; time: the fastest run (other jobs on the machine only ever slow a run down)
    med = {v: {"rss_peak": statistics.median(x["rss_peak"] for x in runs[v]),
               "alloc_peak": statistics.median(x["alloc_peak"] for x in runs[v]),
               "step_s": min(x["step_s"] for x in runs[v])} for v in VARIANTS}
    ref = runs["full"][0]
    for v in VARIANTS:  # the three ways must compute the same loss and the same gradients
        for x in runs[v]:
            assert abs(x["loss"] - ref["loss"]) <= 1e-4 * abs(ref["loss"]), (v, x["loss"], ref["loss"])
            assert abs(x["grad_norm"] - ref["grad_norm"]) <= 1e-4 * ref["grad_norm"], (v, x["grad_norm"])
    mib = 2 ** 20
    print(f"V={args.vocab} hidden={args.hidden} layers={args.layers} {args.questions}x{args.perspectives} sequences "
          f"<= {args.len} tokens ({ref['labelled_tokens']} labelled, {ref['padded_tokens']} padded), "
          f"{args.rows} per chunk, hidden_ce chunk {args.chunk_tokens}; weights {ref['weights'] / mib:.0f} MiB; "
          f"memory: median of {args.repeats}, time: fastest; loss {ref['loss']:.6f}, grad norm {ref['grad_norm']:.6f} "
          f"in every variant")
    print(f"{'variant':<9} {'peak RSS MiB':>13} {'ratio':>6} {'alloc peak MiB':>15} {'ratio':>6} {'step s':>7} "
          f"{'ratio':>6}")
    for v in VARIANTS:
        m, f = med[v], med["full"]
        print(f"{v:<9} {m['rss_peak'] / mib:>13.0f} {m['rss_peak'] / f['rss_peak']:>6.2f} "
              f"{m['alloc_peak'] / mib:>15.0f} {m['alloc_peak'] / f['alloc_peak']:>6.2f} {m['step_s']:>7.2f} "
              f"{m['step_s'] / f['step_s']:>6.2f}")
    print(json.dumps({"config": {k: v for k, v in vars(args).items() if k != "child"},
                      "median": med, "runs": runs}))


if __name__ == "__main__":
    main()
