"""
The memory plan of one optimiser step of train.py's loop (`train.py --dry-run`), from the student's config alone.

One micro-step runs B questions × P rationales of T tokens with gradients, in chunks of ≤ --max-batch-tokens padded
tokens, and keeps every chunk's graph until one backward (the JS term couples a question's rationales). Counted:
tensors autograd saves (what torch.cuda.max_memory_allocated sees), not the CUDA context or allocator slack.
tests/test_scale.py and scripts/measure_memory.py check it against measured steps of scaled-down models on CPU.
"""
import argparse
import json
import math
import os

import torch

import distributed
from eval import resolve_model_name
from perspectives import K
from student import LoRALinear, apply_lora, resolve_precision

PLAN_ANSWER_TOKENS = 8  # answer-span positions per rationale the plan assumes (a GSM8K number is 1–6 Qwen tokens)
HIDDEN_CE_CHUNK = 1024  # losses.hidden_ce's default chunk_tokens
SHIPPED_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")



def plan_config(student: str):
    """The student's transformers config, no weights: a directory with config.json, the shipped configs/NAME, a
    .gguf file's header, else the hub's config.json (that file only). -> (config, where it was read)"""
    from transformers import AutoConfig
    for d in (student, os.path.join(SHIPPED_CONFIGS, os.path.basename(student.rstrip("/")))):
        if os.path.isfile(os.path.join(d, "config.json")):
            where = os.path.relpath(os.path.join(d, "config.json"))
            return AutoConfig.from_pretrained(d), where if not where.startswith("..") else os.path.join(d, "config.json")
    try:
        if student.endswith(".gguf"):
            return AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(student)),
                                              gguf_file=os.path.basename(student)), student
        name = resolve_model_name(student)
        return AutoConfig.from_pretrained(name), name
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --student {student}: no config found ({e}); give a directory with config.json, "
                         f"e.g. configs/Qwen2.5-1.5B")


def meta_student(cfg, a):
    """The student on the meta device (shapes, no memory), with LoRA if asked: exact parameter counts."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
        if a.lora_r:
            apply_lora(model, a.lora_r, a.lora_alpha, a.lora_dropout)
    return model


def layer_activation_bytes(h: int, f: int, kv: int, nh: int, T: int, r: int, full: bool, amp: bool,
                           attn: str) -> float:
    """Bytes autograd saves per token in one Qwen2/Llama decoder layer (RMSNorm, GQA attention with RoPE, SwiGLU MLP).
    h hidden, f intermediate, kv = key/value width, nh heads, T sequence length, r LoRA rank (0: full fine-tuning).
    Dtypes: c = the compute dtype (bf16 under autocast); the RMSNorms work in fp32."""
    c = 2 if amp else 4
    stream_fp32 = full or not amp  # the residual stream has the weights' dtype (fp32 master, or a bf16 LoRA base)
    b = 2 * 4 * h + 2 * 4  # the two RMSNorms: their fp32 input (x, or an fp32 copy of it) and rsqrt(mean x²)
    if full:
        b += 2 * 4 * h  # x·rsqrt, which the norm weight's gradient needs
    # the normalised inputs of q,k,v and of gate,up: one tensor each, but autocast casts an fp32 input once per linear
    b += (5 if amp and stream_fp32 else 2) * c * h
    if attn == "flash_attention_2":
        b += c * (h + 2 * kv)  # q after RoPE, k, v (GQA without repeating k, v)
    else:
        b += 3 * c * h  # q after RoPE, k and v repeated to every head (transformers' repeat_kv)
    b += 2 * c * h + 4 * nh  # attention output, its contiguous copy (o_proj's input), log-sum-exp
    if attn == "eager":
        b += nh * T * (4 + (c if amp else 0))  # softmax probabilities in fp32 (+ their bf16 cast under autocast)
    b += 4 * c * f  # MLP: gate, silu(gate), up, silu(gate)·up
    if r:
        b += 7 * c * r  # A·x of the 7 adapted projections (dropout > 0 adds its masks: not counted)
    return b


def memory_plan(cfg, a, model=None, world: int = 1) -> dict:
    """Bytes of weights, gradients, AdamW state and activations of one step at --batch-size questions ×
    P rationales × --max-len tokens (every sequence taken at --max-len: the worst case), and the peak.
    world: torchrun's processes, one per GPU; the plan is then the busiest GPU's: it runs ceil(B/N) of a
    micro-step's questions; under DDP it holds everything plus DDP's gradient buckets (one more copy of the
    gradients); under FSDP2 (a.fsdp) weights, gradients and AdamW state are split N ways, plus what is gathered:
    the root unit (embeddings, final norm, head) for the whole step with its full gradient, and one decoder layer
    with the next one prefetched and its full gradient."""
    model = model if model is not None else meta_student(cfg, a)
    device = a.device or "cuda"  # a plan is for a GPU unless --device says otherwise
    precision = resolve_precision(a.precision, device)
    amp, full, ckpt = precision == "bf16-mixed", not a.lora_r, a.grad_checkpointing
    c = 2 if amp else 4
    L, h, f, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nh = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or h // nh
    kv = (getattr(cfg, "num_key_value_heads", None) or nh) * hd
    B = -(-a.batch_size // world)  # the largest block of a micro-step's questions (distributed.rows)
    Pq = a.plan_perspectives or (1 if a.method == "sft" else K)
    T = a.max_len
    seqs = B * Pq
    rows = min(seqs, max(1, (a.max_batch_tokens or 8192) // T))  # sequences per chunk; None: the GPU default
    chunks = math.ceil(seqs / rows)
    n = rows * T  # tokens of the largest chunk
    tokens = seqs * T

    # parameters (tied embeddings counted once); linear weights are what autocast casts to bf16 in every forward
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    head = model.get_output_embeddings().weight
    linear_layers = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                        for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, LoRALinear))
                        and m.weight is not head)
    weights = 4 * trainable + (c if amp and not full else 4) * (total - trainable)  # fp32 master; bf16 frozen base
    grads = 4 * trainable
    optimizer = 2 * 4 * trainable  # AdamW: exp_avg and exp_avg_sq in fp32
    fsdp = world > 1 and getattr(a, "fsdp", False)
    gathered = 0
    if fsdp:  # full fine-tuning only (train.py refuses --fsdp with --lora-r): every parameter is fp32 and trained
        layer_params = sum(p.numel() for p in model.get_decoder().layers[0].parameters())
        root = total - L * layer_params
        weights, grads, optimizer = weights / world, grads / world, optimizer / world
        gathered = 4 * 2 * root + 4 * 3 * layer_params
    elif world > 1:
        gathered = grads  # DDP's buckets

    # activations kept from the forward until the backward, per token...
    layer = layer_activation_bytes(h, f, kv, nh, T, a.lora_r, full, amp, a.attn)
    s = 4 if full or not amp else 2  # bytes of the final hidden states: the residual stream's dtype
    per_token = {
        "layers": L * ((4 if full or not amp else 2) * h if ckpt else layer),  # checkpointing: each layer's input
        "final_norm": 4 * h + 4 + (4 * h if full else 0),
        # losses.hidden_ce keeps only the hidden rows of the labelled positions (+ their indices and nll), and
        # recomputes each [chunk, V] block of logits in the backward: no V-sized term per token
        "loss_rows": (s * h + 28) * (T - 1) / T,
        "attention_mask": T if a.attn != "flash_attention_2" else 0,  # [rows,1,T,T] bool, one per chunk
    }
    # ...per sequence: the fp32 answer-span logits the JS term reads (two copies: run_student's and the [B,K,A,V]
    # layout of student_objective) and the answer rows the checkpointed projection keeps...
    A = PLAN_ANSWER_TOKENS
    answers = a.method == "mcc" or (a.method == "mind" and a.cons_weight > 0)
    per_seq = (8 * A * V + s * A * h) if answers else 0
    # ...and per chunk: autocast's bf16 copies of fp32 weights, saved for the backward (a new copy every chunk); the
    # head's own copy is not kept (its projections are checkpointed)
    per_chunk = 0
    if amp and full:
        per_chunk = 2 * (0 if ckpt else linear_layers)
    elif amp:
        per_chunk = 2 * (trainable if not ckpt else 0)  # bf16 copies of the LoRA A, B
    kept = {k: v * tokens for k, v in per_token.items()}
    kept["answer_logits"] = per_seq * seqs
    # the JS / MCC term over every pair of a question's rationales runs after the last chunk: measured (CPU profiler)
    # at 26·V bytes kept per (pair, answer position) and a peak of 47·V in its forward or its backward
    pairs = B * Pq * (Pq - 1) // 2
    kept["pairwise_term"] = 26 * V * A * pairs if answers else 0
    pairwise_peak = 47 * V * A * pairs if answers else 0
    kept["weight_casts"] = per_chunk * chunks
    activations = sum(kept.values())
    last_chunk = sum(per_token.values()) * n + per_seq * rows + per_chunk

    # transients of the last chunk: one [k, V] block of hidden_ce's logits (the projection, its fp32 copy and the
    # log-softmax; recomputed with its gradients in the backward), k ≤ HIDDEN_CE_CHUNK labelled tokens
    k = min(HIDDEN_CE_CHUNK, n)
    fwd = (c + 8) * V * k
    if amp and full and ckpt:  # the autocast weight cache lives through a chunk's forward
        fwd = max(fwd, 2 * (linear_layers + head.numel()) + (c + 8) * V * k)

    # backward: a block's recomputed logits and their gradients, and the head weight's gradient for that block
    # (fp32; under autocast also the bf16 weight recast and the bf16 gradient)
    ce_backward = 12 * V * k + ((4 + (4 if amp else 0)) * V * h if full else (2 * V * h if amp else 0))
    recompute = (layer * n + (2 * linear_layers // L if amp and full else 0)) if ckpt else 0
    on_cuda = str(device).startswith("cuda")
    # AdamW's step: the foreach kernels (CUDA) hold one fp32 copy of all of sqrt(v); the per-tensor loop (CPU) one tensor
    opt_tmp = 4 * (trainable if on_cuda else max((p.numel() for p in params if p.requires_grad), default=0))
    if fsdp:
        opt_tmp /= world  # each GPU steps its shard
    if a.backward_per_chunk:
        # one chunk's graph at a time (the gradients of the earlier chunks already accumulated), next to the
        # pre-pass's detached answer logits of the whole step (4·A·V per sequence) and the chunk's pairwise share
        partners = 4 * A * V * seqs if answers else 0
        chunk_pairs = 22 * V * A * rows * (Pq - 1) if answers else 0
        pairwise_peak = 47 * V * A * rows * (Pq - 1) if answers else 0  # the chunk's share, against its partners
        kept = {k: v * n for k, v in per_token.items()}
        kept.update({"answer_logits": partners + per_seq // 2 * rows, "pairwise_term": chunk_pairs,
                     "weight_casts": per_chunk})
        activations = sum(kept.values())
        fwd = (c + 8) * V * k
        if amp and full and ckpt:
            fwd = max(fwd, 2 * (linear_layers + head.numel()) + (c + 8) * V * k)
        grads_live = grads  # the worst case: the last chunk, after the others' backward
    else:
        grads_live = 0
    # the pairwise term's tensors exist only from its own forward on: not during the chunks' cross-entropy
    activations_before_pairs = activations - kept["pairwise_term"]
    held = weights + gathered  # what DDP or FSDP2 hold besides the model's own tensors, for the whole step
    phases = {
        "forward end": held + optimizer + grads_live + activations_before_pairs + max(fwd, pairwise_peak),
        "backward start": held + optimizer + grads_live + activations_before_pairs + max(ce_backward, pairwise_peak),
        "backward of the last chunk done": held + optimizer + grads + activations - last_chunk + recompute,
        "optimizer step": held + optimizer + grads + opt_tmp,
    }
    peak_at = max(phases, key=phases.get)
    peak = phases[peak_at]
    out = {
        "student": a.student, "model_type": cfg.model_type, "device": device, "precision": precision, "attn": a.attn,
        "grad_checkpointing": ckpt, "lora_r": a.lora_r, "world": world, "fsdp": fsdp, "batch_size_per_gpu": B, "perspectives": Pq, "seq_len": T,
        "max_batch_tokens": a.max_batch_tokens or 8192, "chunks": chunks, "tokens_per_step": tokens,
        "params_total": total, "params_trainable": trainable,
        "bytes": {"weights": int(weights), "gradients": int(grads), "optimizer": int(optimizer),
                  "gathered": int(gathered), "activations": int(activations), "peak": int(peak)},
        "activations": {k: int(v) for k, v in kept.items()},
        "peak_at": peak_at,
    }
    gib = {k: round(v / 2 ** 30, 2) for k, v in out["bytes"].items()}
    out["gib"] = gib
    out["gpu_gib"] = a.plan_gpu_gib
    out["fits"] = peak <= 0.9 * a.plan_gpu_gib * 2 ** 30  # 10% for the CUDA context and allocator fragmentation
    return out


def dry_run(a) -> dict:
    cfg, where = plan_config(a.student)
    plan = memory_plan(cfg, a)
    plan["config"] = where
    print(json.dumps(plan, indent=2))
    return plan



def advise(cfg, args, gpu_gib: float | None) -> list[str]:
    """What train.py prints before the first step: the plan's peak against this GPU's memory (or --plan-gpu-gib),
    and when it does not fit, the first of --grad-checkpointing, --lora-r 16, a smaller --batch-size that fits."""
    gib = gpu_gib or args.plan_gpu_gib
    plan = lambda **kw: memory_plan(cfg, argparse.Namespace(**{**vars(args), "plan_gpu_gib": gib, **kw}),
                                    world=distributed.world())  # torchrun: the busiest GPU's plan
    p = plan()
    where = f"this GPU's {gib:.0f} GiB" if gpu_gib else f"a {gib:g} GiB GPU (--plan-gpu-gib)"
    lines = [f"memory plan (every rationale --max-len long, scripts/plan_memory.py): peak {p['gib']['peak']} GiB at "
             f"'{p['peak_at']}' on {where}: {'fits' if p['fits'] else 'does NOT fit'}"]
    if p["fits"]:
        return lines
    tries = [("--grad-checkpointing", {"grad_checkpointing": True})] if not args.grad_checkpointing else []
    tries += [("--lora-r 16", {"lora_r": 16, "grad_checkpointing": True})] if not args.lora_r else []
    tries += [(f"--batch-size {b}", {"batch_size": b, "grad_checkpointing": True}) for b in (2, 1)
              if b < args.batch_size]
    for label, kw in tries:
        q = plan(**kw)
        if q["fits"]:
            extra = " --grad-checkpointing" if label != "--grad-checkpointing" and not args.grad_checkpointing else ""
            return lines + [f"warning: {label}{extra} brings the plan to {q['gib']['peak']} GiB, which fits"]
    return lines + ["warning: no single flag brings the plan under; see the README's memory section"]
