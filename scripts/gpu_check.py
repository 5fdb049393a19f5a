"""
A first GPU check, ready before anyone spends GPU time: a few real training steps at the headline settings, with
nothing to download, and one JSON line of what a reader of the README needs.

    python scripts/gpu_check.py                                  # Qwen2.5-1.5B shape, random weights, one CUDA GPU
    python scripts/gpu_check.py --config configs/Qwen2.5-7B --lora-r 16
    python scripts/gpu_check.py --tiny --device cpu              # the same code path on a CPU, in seconds (tested)

The student is built from the shipped config (random weights: speed and memory do not depend on their values) in
fp32 master weights with bf16 autocast, sdpa attention and activation checkpointing; the step is train.train_step
itself, on --batch-size questions × 8 rationales of exactly --max-len tokens (the planner's worst case), for
`sft-all` and for `mind` (a MetaNet on random features, β = 0: all eight selected, the JS term on). Printed, as one
JSON line: torch.cuda.max_memory_allocated of a step next to the --dry-run plan's peak for the same flags, tokens/s,
the step time of MIND against sft-all, and model FLOPs utilisation (6·N·tokens per step, 8·N with checkpointing's
recomputation, against --peak-tflops, by default the card's dense bf16 peak when it is known).
"""
import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import perspectives as P  # noqa: E402
import student  # noqa: E402
import train  # noqa: E402
from eval import Encoded  # noqa: E402
from metanet import MetaNet  # noqa: E402
from mind import InertiaCalibrator, Mind  # noqa: E402
from scripts import plan_memory  # noqa: E402

# dense bf16 peak of common cards, TFLOP/s (vendor figures, no sparsity)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "Qwen2.5-1.5B"),
                    help="directory with the student's config.json (the shipped configs/NAME)")
    ap.add_argument("--tiny", action="store_true", help="shrink the config to 2 layers × 64 wide, vocabulary 512 "
                                                        "(for a CPU check of this script)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--batch-size", type=int, default=4, help="questions per step (× 8 rationales)")
    ap.add_argument("--max-len", type=int, default=1024, help="tokens of every rationale")
    ap.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--backward-per-chunk", action="store_true", help="train.py's --backward-per-chunk")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per method (after one untimed step)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the card's dense bf16 peak for MFU (default: from the device name when known)")
    return ap


def make_config(path: str, tiny: bool):
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(path)
    if tiny:
        cfg.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512})
    return cfg


def run_method(method: str, cfg, args, device: str, seqs: list, mask: torch.Tensor) -> dict:
    """A fresh student stepped by train.train_step: one untimed step, then --steps timed ones."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    spec = student.StudentSpec(name="gpu-check", attn="sdpa", precision="bf16-mixed", grad_checkpointing=True,
                               lora_r=args.lora_r, lora_alpha=2.0 * max(args.lora_r, 1))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if args.lora_r else torch.float32,
                                                 attn_implementation="sdpa")
    model.activation_checkpointing_enable()
    model.config.use_cache = False
    if args.lora_r:
        student.add_lora(model, spec)
    model.train()
    opt = student.make_optimizer(model, 1e-5, 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    metanet = meta_opt = features = None
    m = train.METHODS[method]
    if m.metanet:
        features = torch.randn(*mask.shape, cfg.hidden_size, device=device)
        metanet = MetaNet(cfg.hidden_size, P.K).to(device)
        meta_opt = torch.optim.AdamW(metanet.parameters(), lr=1e-4)
    mind = Mind(metanet, InertiaCalibrator(P.K, 0.9), beta=0.0)  # β = 0: every rationale with gradients
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=0)
    loop = train.Loop(model, tok, opt, sched, seqs, [str(q) for q in range(len(seqs))], mask.to(device), mind,
                      features, meta_opt, student.Compute(device, 8192, "bf16-mixed"))
    step_cfg = train.StepConfig(cons_weight=0.1 if m.consistency else 0.0, probe_every=1 if m.metanet else 0,
                                backward_per_chunk=args.backward_per_chunk)
    batch = [list(range(len(seqs)))]
    on_cuda = device.startswith("cuda")
    train.train_step(loop, step_cfg, 0, batch)  # untimed: allocator warm-up, AdamW state
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        train.train_step(loop, step_cfg, step, batch)
        if on_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"step_s": sorted(times)[len(times) // 2], "peak_bytes": torch.cuda.max_memory_allocated() if on_cuda
            else None, "params": n_params, "tokens": sum(len(s.input_ids) for row in seqs for s in row if s)}


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = make_config(args.config, args.tiny)
    B, T, A = args.batch_size, args.max_len, plan_memory.PLAN_ANSWER_TOKENS
    gen = torch.Generator().manual_seed(0)
    seqs = [[Encoded(torch.randint(0, cfg.vocab_size, (T,), generator=gen).tolist(), prompt_len=1,
                     answer_start=T - 1 - A, answer_end=T - 1) for _ in range(P.K)] for _ in range(B)]
    mask = torch.ones(B, P.K, dtype=torch.bool)
    res = {m: run_method(m, cfg, args, device, seqs, mask) for m in ("sft-all", "mind")}
    flags = ["--student", args.config, "--dry-run", "--precision", "bf16-mixed", "--grad-checkpointing",
             "--batch-size", str(B), "--max-len", str(T), "--device", device, "--max-batch-tokens", "8192"]
    flags += ["--lora-r", str(args.lora_r)] if args.lora_r else []
    flags += ["--backward-per-chunk"] if args.backward_per_chunk else []
    plan = plan_memory.memory_plan(cfg, train.build_parser().parse_args(flags))
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    mind, sft = res["mind"], res["sft-all"]
    flops = 8 * mind["params"] * mind["tokens"]  # 6·N·D, + 2·N·D for checkpointing's recomputed forward
    out = {"device": name, "config": os.path.basename(args.config.rstrip("/")) + (" (tiny)" if args.tiny else ""),
           "lora_r": args.lora_r, "backward_per_chunk": args.backward_per_chunk, "tokens_per_step": mind["tokens"], "params": mind["params"],
           "plan_peak_gib": plan["gib"]["peak"], "plan_peak_at": plan["peak_at"],
           "measured_peak_gib": {m: None if r["peak_bytes"] is None else round(r["peak_bytes"] / 2 ** 30, 2)
                                 for m, r in res.items()},
           "step_s": {m: round(r["step_s"], 4) for m, r in res.items()},
           "tokens_per_s": {m: round(r["tokens"] / r["step_s"]) for m, r in res.items()},
           "mind_vs_sft_all": round(mind["step_s"] / sft["step_s"], 3),
           "mfu": None if peak_tflops is None else round(flops / mind["step_s"] / (peak_tflops * 1e12), 4),
           "peak_tflops": peak_tflops}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
