"""
The memory plan of one optimiser step of train.py's loop (`train.py --dry-run`), from the student's config alone.

One micro-step runs B questions × P rationales of T tokens with gradients, in chunks of ≤ --max-batch-tokens padded
tokens, and keeps every chunk's graph until one backward (the JS term couples a question's rationales). Counted:
tensors autograd saves (what torch.cuda.max_memory_allocated sees), not the CUDA context or allocator slack.
tests/test_scale.py and scripts/measure_memory.py check it against measured steps of scaled-down models on CPU.
"""
import json
import math
import os

import torch

from eval import resolve_model_name
from perspectives import K
from student import LoRALinear, apply_lora, resolve_precision

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


def memory_plan(cfg, a, model=None) -> dict:
    """Bytes of weights, gradients, AdamW state and activations of one step at --batch-size questions ×
    P rationales × --max-len tokens (every sequence taken at --max-len: the worst case), and the peak."""
    model = model if model is not None else meta_student(cfg, a)
    device = a.device or "cuda"  # a plan is for a GPU unless --device says otherwise
    precision = resolve_precision(a.precision, device)
    amp, full, ckpt = precision == "bf16-mixed", not a.lora_r, a.grad_checkpointing
    c = 2 if amp else 4
    L, h, f, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nh = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or h // nh
    kv = (getattr(cfg, "num_key_value_heads", None) or nh) * hd
    B = a.batch_size
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

    # activations kept from the forward until the backward, per token...
    layer = layer_activation_bytes(h, f, kv, nh, T, a.lora_r, full, amp, a.attn)
    per_token = {
        "layers": L * ((4 if full or not amp else 2) * h if ckpt else layer),  # checkpointing: each layer's input
        "final_norm_and_head": 4 * h + 4 + (4 * h + (c if amp else 4) * h if full else 0),
        "log_softmax": 4 * V * (T - 1) / T,  # losses.sequence_ce: fp32 log-probabilities of the V-way softmax
        "attention_mask": T if a.attn != "flash_attention_2" else 0,  # [rows,1,T,T] bool, one per chunk
    }
    # ...and per chunk: autocast's bf16 copies of fp32 weights, saved for the backward (a new copy every chunk)
    per_chunk = 0
    if amp and full:
        per_chunk = 2 * (head.numel() + (0 if ckpt else linear_layers))
    elif amp:
        per_chunk = 2 * (trainable if not ckpt else 0)  # bf16 copies of the LoRA A, B
    kept = {k: v * tokens for k, v in per_token.items()}
    kept["weight_casts"] = per_chunk * chunks
    activations = sum(kept.values())
    last_chunk = sum(per_token.values()) * n + per_chunk

    # transients of the last chunk (sequence_ce on [rows, T, V] logits)
    logits = c * V * n
    fwd = logits * (2 if chunks > 1 else 1)  # the previous chunk's logits live until `out` is rebound
    fwd += (4 * V * n if amp else 0) + 4 * V * n  # the fp32 upcast, cross_entropy's contiguous copy
    if amp and full and ckpt:  # the autocast weight cache lives through a chunk's forward
        fwd = max(fwd, 2 * (linear_layers + head.numel()) + logits)
    # backward starts with the answer-span gather's gradient (zeros of the logits' shape) and the gradients of the
    # log-softmax's output and input (fp32), while the log-probabilities are still held
    ce_backward = logits + 2 * 4 * V * n
    recompute = (layer * n + (2 * linear_layers // L if amp and full else 0)) if ckpt else 0
    on_cuda = str(device).startswith("cuda")
    # AdamW's step: the foreach kernels (CUDA) hold one fp32 copy of all of sqrt(v); the per-tensor loop (CPU) one tensor
    opt_tmp = 4 * (trainable if on_cuda else max((p.numel() for p in params if p.requires_grad), default=0))
    phases = {
        "forward end": weights + optimizer + activations + fwd,
        "backward start": weights + optimizer + activations + ce_backward,
        "backward of the last chunk done": weights + optimizer + grads + activations - last_chunk + recompute,
        "optimizer step": weights + optimizer + grads + opt_tmp,
    }
    peak_at = max(phases, key=phases.get)
    peak = phases[peak_at]
    out = {
        "student": a.student, "model_type": cfg.model_type, "device": device, "precision": precision, "attn": a.attn,
        "grad_checkpointing": ckpt, "lora_r": a.lora_r, "batch_size": B, "perspectives": Pq, "seq_len": T,
        "max_batch_tokens": a.max_batch_tokens or 8192, "chunks": chunks, "tokens_per_step": tokens,
        "params_total": total, "params_trainable": trainable,
        "bytes": {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": int(activations),
                  "peak": int(peak)},
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

