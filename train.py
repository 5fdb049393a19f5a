"""
Train a student with MIND (or a baseline / ablation of it) in one hand-written loop.

    python train.py                                   # the default demo: synthetic world, tiny student, CPU
    python train.py --student Qwen2.5-1.5B --data data/gsm8k_mind.jsonl --out out/qwen15

Stages (mind only):
  1. probe    one no-grad pass of the initial student over every (question, perspective): losses ℓ⁰
              (they seed the inertia calibrator) and, with --ta-encoder student, the MetaNet features e_k
  2. warm-up  the MetaNet alone, on the targets π_τ(−ℓ⁰)
  3. joint    every step: MetaNet scores → selection I_q and weights α → the student's
              L = Σ α ℓ + λ Σ α_i α_j JSD → EMA update of L̃ → the MetaNet's KL(π_τ(s) ‖ π_τ(−L̃))
Baselines (--method sft | sft-all | mcc) and ablations are flags of this same loop.

OUT/ holds metrics.json, log.jsonl (one line per step), probe.pt, and ckpt/ (the student in Hugging Face
format + tokenizer, and trainer.pt with everything else needed to resume exactly: --resume OUT).
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import eval as ev
import losses as L
import perspectives as P
from metanet import MetaNet, encode_sentences, mean_pool
from mind import InertiaCalibrator, Mind

METHODS = ("mind", "sft", "sft-all", "mcc")
PRECISIONS = ("auto", "fp32", "bf16-mixed")


# -----------------------------------------------------------------------------
# CLI: every default lives here


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=ev.HelpFormatter)
    g = ap.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="training JSONL (MIND format), or a directory with train.jsonl [+ test_id.jsonl, test_ood.jsonl] "
                        "as written by perspectives.py; default: the synthetic world generated in memory from --seed")
    g.add_argument("--eval-id", default=None, help="JSONL of in-distribution test questions (question, answer)")
    g.add_argument("--eval-ood", default=None, help="JSONL of out-of-distribution test questions (question, answer)")
    g.add_argument("--synthetic-n", type=int, default=1000, help="training questions of the in-memory synthetic world")
    g.add_argument("--synthetic-n-test", type=int, default=300, help="questions in each synthetic test split")
    g.add_argument("--max-len", type=int, default=1024,
                   help="tokens per sequence; longer rationales lose body tokens from their end, never the final line")

    g = ap.add_argument_group("student")
    g.add_argument("--student", default="tiny",
                   help="'tiny' (a small Qwen2 built from a config, with a BPE tokenizer trained on the data), a local "
                        "path, or a Hugging Face name (short names like Qwen2.5-1.5B resolve to Qwen/Qwen2.5-1.5B)")
    g.add_argument("--tiny-hidden", type=int, default=128, help="width of the tiny student")
    g.add_argument("--tiny-layers", type=int, default=4, help="layers of the tiny student")
    g.add_argument("--tiny-heads", type=int, default=4, help="attention heads of the tiny student")
    g.add_argument("--tiny-vocab", type=int, default=1024, help="BPE vocabulary of the tiny student's tokenizer")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (saves memory)")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="fp32; bf16-mixed (fp32 master weights, forward in bf16 autocast; a LoRA base, being frozen, is "
                        "stored in bf16); auto: bf16-mixed on CUDA, else fp32")
    g.add_argument("--attn", choices=("sdpa", "eager", "flash_attention_2"), default="sdpa",
                   help="attention kernel of the student (flash_attention_2 needs the flash-attn package and CUDA)")
    g.add_argument("--lora-r", type=int, default=0,
                   help="LoRA rank on q,k,v,o,gate,up,down (0: full fine-tuning); merged into the weights on save")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA α: the update is (α/r)·B·A")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA branch's input")

    g = ap.add_argument_group("memory plan")
    g.add_argument("--dry-run", action="store_true",
                   help="build the student on the meta device (no weights) and print the memory plan as JSON: "
                        "parameters, bytes of weights, gradients, optimizer state, activations and the peak "
                        "(--student may be a config dir or a name: the shipped configs/NAME is used when present)")
    g.add_argument("--plan-perspectives", type=int, default=None,
                   help="rationales per question the plan assumes all run with gradients (None: 1 for --method "
                        "sft, else 8)")
    g.add_argument("--plan-gpu-gib", type=float, default=80.0, help="GPU memory the plan is checked against")

    g = ap.add_argument_group("method and ablations")
    g.add_argument("--method", choices=METHODS, default="mind",
                   help="mind; sft (one perspective); sft-all (all, uniform); mcc (all, uniform + MCC-KD bidirectional KL)")
    g.add_argument("--perspective", choices=P.KEYS, default=None,
                   help="the perspective of --method sft (default: the first perspective present in the data)")
    g.add_argument("--no-metanet", action="store_true", help="ablation: uniform α over all present perspectives (I_q = K_q)")
    g.add_argument("--no-attention", action="store_true", help="ablation: the MetaNet's synergy layer becomes identity")
    g.add_argument("--inertia", type=float, default=0.9, help="μ of the EMA over losses (0 = instantaneous loss ablation)")
    g.add_argument("--select-beta", type=float, default=0.5, help="β of the soft threshold p_k ≥ β·max p (0 keeps all)")
    g.add_argument("--cons-weight", type=float, default=0.1, help="λ of the JS consistency term (0 disables it)")
    g.add_argument("--mcc-weight", type=float, default=0.1, help="weight of the bidirectional KL of --method mcc")
    g.add_argument("--meta-tau", type=float, default=1.0, help="τ of π_τ in the meta loss")
    g.add_argument("--student-tau", type=float, default=1.0, help="τ_s of the compatibility weights α")
    g.add_argument("--probe-every", type=int, default=1,
                   help="run the unselected rationales (no grad, for the EMA) every N-th step only")

    g = ap.add_argument_group("MetaNet (Teaching Assistant)")
    g.add_argument("--ta-encoder", default="student",
                   help="features e_k: 'student' (mean-pooled last hidden state of the initial student, from the probe "
                        "pass) or a sentence encoder name/path through transformers.AutoModel")
    g.add_argument("--meta-hidden", type=int, default=256, help="width H of the MetaNet")
    g.add_argument("--meta-attn-heads", type=int, default=4, help="attention heads of the synergy layer")
    g.add_argument("--meta-score-heads", type=int, default=4, help="M independent scoring heads, averaged")
    g.add_argument("--meta-dropout", type=float, default=0.1, help="dropout inside the MetaNet")
    g.add_argument("--meta-warmup-epochs", type=int, default=3, help="epochs of MetaNet-only warm-up on π_τ(−ℓ⁰)")
    g.add_argument("--meta-warmup-lr", type=float, default=1e-3, help="MetaNet learning rate during warm-up")
    g.add_argument("--meta-lr", type=float, default=1e-4, help="MetaNet learning rate in the joint stage")
    g.add_argument("--meta-accum", type=int, default=4, help="the MetaNet steps once every N student steps")
    g.add_argument("--meta-batch-size", type=int, default=64, help="questions per MetaNet warm-up batch")

    g = ap.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None,
                   help="optimiser steps (default: 650 for the tiny student, else 3 epochs of the data)")
    g.add_argument("--batch-size", type=int, default=4, help="questions per micro-step (all their perspectives go together)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimiser step")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 3e-3 tiny, 1e-5 otherwise)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 5%% of --steps)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay ends at this fraction of --lr")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    g.add_argument("--max-batch-tokens", type=int, default=None,
                   help="padded tokens per forward; a step's sequences are sorted by length and cut into such chunks "
                        "(default: 8192 on a GPU; 2048 on a CPU, where smaller chunks pad less and run faster)")
    g.add_argument("--seed", type=int, default=0, help="seed of everything (data order, init, synthetic world)")

    g = ap.add_argument_group("evaluation and logging")
    g.add_argument("--eval-every", type=int, default=100, help="evaluate on --eval-limit ID questions every N steps (0: only at the end)")
    g.add_argument("--eval-limit", type=int, default=64, help="questions of the periodic evaluation")
    g.add_argument("--eval-batch-size", type=int, default=64, help="questions generated together")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation budget (default: 1.5x the longest training completion, at most 512)")
    g.add_argument("--eval-tasks", default=None,
                   help="after training, also evaluate these benchmarks with eval.py (comma list, e.g. "
                        "gsm8k,svamp,math500,csqa,strategyqa,gpqa_diamond); generations go to OUT/eval/")
    g.add_argument("--eval-tasks-limit", type=int, default=None, help="questions per benchmark of --eval-tasks")
    g.add_argument("--eval-data-dir", default=None, help="benchmark files for --eval-tasks (default: data/benchmarks)")
    g.add_argument("--gpqa-csv", default=None, help="the official gpqa_diamond.csv, for --eval-tasks gpqa_diamond")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and CI)")

    g = ap.add_argument_group("checkpoints")
    g.add_argument("--out", default="out/default", help="output directory")
    g.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (and at the end; 0: end only)")
    g.add_argument("--resume", default=None, metavar="OUT",
                   help="continue the run in OUT exactly where its last checkpoint left it (its saved flags are used)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return ap


def check_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if not 0.0 <= a.inertia < 1.0:
        ap.error(f"--inertia {a.inertia}: must be in [0, 1)")
    if a.select_beta < 0:
        ap.error(f"--select-beta {a.select_beta}: must be >= 0")
    for name in ("batch_size", "grad_accum", "meta_accum", "probe_every", "max_len", "max_batch_tokens", "meta_batch_size"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(a, name)}: must be >= 1")
    if a.steps is not None and a.steps < 1:
        ap.error(f"--steps {a.steps}: must be >= 1")
    for name in ("meta_tau", "student_tau"):
        if getattr(a, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0")
    if a.method != "mind" and (a.no_metanet or a.no_attention):
        ap.error("--no-metanet / --no-attention are ablations of --method mind")
    if a.perspective and a.method != "sft":
        ap.error("--perspective goes with --method sft")
    check_scale_args(ap, a)


# -----------------------------------------------------------------------------
# Data


def load_data(a) -> tuple[list[P.Example], dict[str, list[dict]]]:
    """-> (training examples, {split name: [{question, answer}]} for evaluation)"""
    evals = {}
    if a.data is None:
        splits = P.synthetic_splits(a.synthetic_n, a.synthetic_n_test, a.seed)
        train = splits["train"]
        evals = {"id": [e.to_json() for e in splits["test_id"]], "ood": [e.to_json() for e in splits["test_ood"]]}
    elif os.path.isdir(a.data):
        train = P.read_training_jsonl(os.path.join(a.data, "train.jsonl"))
        for name in ("id", "ood"):
            path = os.path.join(a.data, f"test_{name}.jsonl")
            if os.path.exists(path):
                evals[name] = ev.read_questions(path)
    else:
        train = P.read_training_jsonl(a.data)
    for name, path in (("id", a.eval_id), ("ood", a.eval_ood)):
        if path:
            if not os.path.exists(path):
                raise SystemExit(f"error: --eval-{name} {path}: no such file")
            evals[name] = ev.read_questions(path)
    if not train:
        raise SystemExit(f"error: {a.data}: no usable training question")
    return train, evals


# -----------------------------------------------------------------------------
# Student

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def train_tiny_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on the data. Each digit is its own token (as in Qwen's tokenizer), with the
    space before a number kept on its first digit, so the student does arithmetic digit by digit."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r" ?\d"), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_input_names=["input_ids", "attention_mask"])
    fast.chat_template = CHATML
    return fast


def build_tiny_student(a, train: list[P.Example]):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    # the texts as the student will see them (role names included), so frequent pieces become single tokens
    texts = [f"user\n{ev.user_message(ex.question)}\nassistant\n" for ex in train]
    texts += [r for ex in train for r in ex.rationales.values()]
    tokenizer = train_tiny_tokenizer(texts, a.tiny_vocab)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=a.tiny_hidden, intermediate_size=4 * a.tiny_hidden,
                      num_hidden_layers=a.tiny_layers, num_attention_heads=a.tiny_heads,
                      num_key_value_heads=a.tiny_heads, max_position_embeddings=a.max_len, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(a.seed)
    model = Qwen2ForCausalLM(cfg)
    return model, tokenizer


def load_student(a, train: list[P.Example], path: str | None = None):
    """The tiny student, or a pretrained one (fp32 master weights; bf16 autocast on CUDA, see --precision).
    path: a checkpoint to resume from. With LoRA it holds merged weights, so the base comes from --student again
    and the adapters from its trainer.pt (prepare_student)."""
    base_path = None if a.lora_r else path
    if base_path is None and a.student == "tiny":
        model, tokenizer = build_tiny_student(a, train)
    else:
        name = base_path or ev.resolve_model_name(a.student)
        try:
            model, tokenizer = load_pretrained(name, a)
        except OSError as e:
            raise SystemExit(f"error: --student {a.student}: cannot load {name!r} ({e}); with HF_HUB_OFFLINE=1 it "
                             f"must be a local directory or already in the Hugging Face cache")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if a.grad_checkpointing:
        model.activation_checkpointing_enable()  # transformers 5: the old name is deprecated
        model.config.use_cache = False
    model = prepare_student(model, a, resume_ckpt=path)
    return model.to(a.device).train(), tokenizer


# -----------------------------------------------------------------------------
# At scale: precision, attention kernel, real checkpoints (GGUF too), LoRA and its merge on save


def resolve_precision(precision: str, device: str) -> str:
    """auto -> bf16-mixed on CUDA (fp32 master weights, forward under bf16 autocast), fp32 elsewhere."""
    if precision == "auto":
        return "bf16-mixed" if str(device).startswith("cuda") else "fp32"
    return precision


def autocast(a):
    """The forward's autocast context: bf16 under bf16-mixed, disabled under fp32."""
    device = str(a.device)
    on = resolve_precision(getattr(a, "precision", "auto"), device) == "bf16-mixed"
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=on)


def check_scale_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.lora_r < 0:
        ap.error(f"--lora-r {a.lora_r}: must be >= 0 (0 = full fine-tuning)")
    if a.lora_r and a.lora_alpha <= 0:
        ap.error(f"--lora-alpha {a.lora_alpha}: must be > 0")
    if not 0.0 <= a.lora_dropout < 1.0:
        ap.error(f"--lora-dropout {a.lora_dropout}: must be in [0, 1)")
    if a.plan_perspectives is not None and not 1 <= a.plan_perspectives <= P.K:
        ap.error(f"--plan-perspectives {a.plan_perspectives}: must be in 1..{P.K}")
    if a.dry_run and a.student == "tiny":
        ap.error("--dry-run plans a pretrained student: give --student NAME, a config dir (e.g. configs/Qwen2.5-1.5B) "
                 "or a .gguf file")
    if a.attn == "flash_attention_2" and not a.dry_run:
        import importlib.util
        if importlib.util.find_spec("flash_attn") is None:
            ap.error("--attn flash_attention_2: the flash-attn package is not installed (pip install flash-attn; CUDA "
                     "only); use --attn sdpa")
        if a.device is not None and not a.device.startswith("cuda"):
            ap.error(f"--attn flash_attention_2 runs on CUDA only, not --device {a.device}")


def load_pretrained(name: str, a):
    """A Hugging Face causal LM and its tokenizer from a hub name, a local directory, or one .gguf file (llama.cpp
    format, dequantised by transformers; needs the gguf package). Trained weights load in fp32 (the master copy);
    a LoRA base under bf16-mixed loads in bf16: it is frozen, so it needs no master copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = torch.bfloat16 if a.lora_r and a.precision == "bf16-mixed" else torch.float32
    kw = {"dtype": dtype, "attn_implementation": a.attn}
    if name.endswith(".gguf"):
        import importlib.util
        if not os.path.isfile(name):
            raise SystemExit(f"error: --student {name}: no such file")
        if importlib.util.find_spec("gguf") is None:
            raise SystemExit(f"error: --student {name}: reading GGUF needs the gguf package (pip install gguf)")
        from transformers import GgufConfig
        kw["gguf_file"] = os.path.basename(name)
        # unpacked to dense weights at load time: they are trained, and a dense model saves with save_pretrained
        kw["quantization_config"] = GgufConfig(gguf_file=kw["gguf_file"], dequantize=True)
        name = os.path.dirname(os.path.abspath(name))
        tokenizer = AutoTokenizer.from_pretrained(name, gguf_file=kw["gguf_file"])
    else:
        tokenizer = ev.load_tokenizer(name)
    return AutoModelForCausalLM.from_pretrained(name, **kw), tokenizer


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Qwen2 and Llama names


class LoRALinear(torch.nn.Module):
    """y = W·x + b + (α/r)·B·A·dropout(x). W and b are the base layer's own frozen tensors (same state-dict names);
    A ∈ R^{r×in} is Kaiming-uniform and B ∈ R^{out×r} zero, so training starts exactly at the base model.
    A and B are fp32 master weights whatever the base dtype."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        dev = base.weight.device
        self.lora_A = torch.nn.Parameter(torch.empty(r, self.in_features, device=dev))
        self.lora_B = torch.nn.Parameter(torch.zeros(self.out_features, r, device=dev))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise A
        self.scale = alpha / r  # α/r
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        F = torch.nn.functional
        y = F.linear(x, self.weight, self.bias)  # W·x + b
        # + (α/r)·B·A·x; A and B follow x's dtype outside autocast (generation with a bf16 base)
        return y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))

    def merged_weight(self) -> torch.Tensor:
        """W + (α/r)·B·A, computed in fp32, in W's dtype."""
        return (self.weight.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())).to(self.weight.dtype)


def apply_lora(model, r: int, alpha: float, dropout: float) -> int:
    """Freeze every weight, then put a LoRALinear around each nn.Linear named like LORA_TARGETS. -> how many."""
    model.requires_grad_(False)
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LORA_TARGETS]
    if not targets:
        raise SystemExit(f"error: --lora-r {r}: the student has no linear layer named {', '.join(LORA_TARGETS)}")
    for n, m in targets:
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(m, r, alpha, dropout))
    return len(targets)


def lora_modules(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merged_state_dict(model) -> dict:
    """The state dict of the plain architecture: each adapted weight merged (W + (α/r)·B·A), A and B dropped, so
    the saved checkpoint loads with a plain from_pretrained."""
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
    for n, m in lora_modules(model).items():
        sd[f"{n}.weight"] = m.merged_weight().detach()
    return sd


def base_fingerprint(model) -> list[float]:
    """64 strided entries of every frozen tensor, summed: tells whether --resume rebuilt the same base."""
    return [p.detach().reshape(-1)[::max(1, p.numel() // 64)][:64].double().cpu().sum().item()
            for n, p in model.named_parameters() if not n.endswith((".lora_A", ".lora_B"))]


def lora_state(model) -> dict:
    """What --resume needs on top of the base: the adapters (exact fp32) and the base's fingerprint."""
    adapters = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}
    return {"adapters": adapters, "base": base_fingerprint(model)}


def prepare_student(model, a, resume_ckpt: str | None = None):
    """The attention kernel, then LoRA (base frozen, in bf16 under bf16-mixed; adapters fp32), with the adapters
    saved in resume_ckpt/trainer.pt when resuming."""
    if model.config._attn_implementation != a.attn:  # the tiny student is built with transformers' default
        model.set_attn_implementation(a.attn)
    if not a.lora_r:
        return model
    if a.precision == "bf16-mixed":
        model.to(torch.bfloat16)
    n = apply_lora(model, a.lora_r, a.lora_alpha, a.lora_dropout)
    if resume_ckpt:
        saved = torch.load(os.path.join(resume_ckpt, "trainer.pt"), weights_only=False, map_location="cpu")["lora"]
        if saved["base"] != base_fingerprint(model):
            raise SystemExit(f"error: --resume: --student {a.student} is not the base model the LoRA adapters in "
                             f"{resume_ckpt} were trained on")
        missing = set(lora_state(model)["adapters"]) ^ set(saved["adapters"])
        if missing:
            raise SystemExit(f"error: --resume: {resume_ckpt}: LoRA adapters do not match the model ({sorted(missing)[:3]})")
        model.load_state_dict(saved["adapters"], strict=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"LoRA r={a.lora_r} α={a.lora_alpha:g} on {n} projections: {trainable / 1e6:.2f}M trainable parameters "
          f"of {total / 1e6:.1f}M")
    return model


# -----------------------------------------------------------------------------
# Running the student on many sequences at once


@dataclass
class Run:
    losses: torch.Tensor  # ℓ per sequence [N]
    answer_logits: torch.Tensor | None  # [N, A, V] at the positions predicting the answer tokens
    answer_mask: torch.Tensor | None  # [N, A]
    features: torch.Tensor | None  # mean-pooled last hidden state over the completion [N, H]
    tokens: int  # real tokens
    padded: int  # tokens including padding


def length_chunks(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices sorted by length, cut so that (rows × longest) ≤ max_tokens per chunk: little padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > max_tokens:
            chunks.append(cur)
            cur = []
        cur.append(i)
    return chunks + [cur] if cur else chunks


def run_student(model, tokenizer, seqs: list[ev.Encoded], a, answers: bool = True, features: bool = False) -> Run:
    """Teacher-forced forward over `seqs` in length-sorted chunks; gradients flow if enabled by the caller."""
    device = a.device
    lengths = [len(s.input_ids) for s in seqs]
    A = max(s.answer_end - s.answer_start for s in seqs)
    losses = [None] * len(seqs)
    ans = [None] * len(seqs)
    feats = [None] * len(seqs)
    padded = 0
    amp = autocast(a)
    for idx in length_chunks(lengths, a.max_batch_tokens):
        batch = {k: v.to(device) for k, v in ev.collate([seqs[i] for i in idx], tokenizer).items()}
        padded += batch["input_ids"].numel()
        with amp:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=features, use_cache=False)
        ce = L.sequence_ce(out.logits, batch["labels"])  # ℓ_k
        if answers:
            pos = batch["answer_pos"]  # logits at answer_start-1+a predict answer token a
            al = out.logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, out.logits.size(-1))).float()
            al = torch.nn.functional.pad(al, (0, 0, 0, A - al.size(1)))
        if features:
            pooled = mean_pool(out.hidden_states[-1].float(), batch["completion_mask"])
        for r, i in enumerate(idx):
            losses[i] = ce[r]
            if answers:
                ans[i] = al[r]
            if features:
                feats[i] = pooled[r]
    amask = None
    if answers:
        amask = torch.zeros(len(seqs), A, dtype=torch.bool, device=device)
        for i, s in enumerate(seqs):
            amask[i, :s.answer_end - s.answer_start] = True
    return Run(torch.stack(losses), torch.stack(ans) if answers else None, amask,
               torch.stack(feats) if features else None, sum(lengths), padded)


@dataclass
class Objective:
    loss: torch.Tensor  # L = L_SFT + λ L_cons (or + w L_mcc), with gradients into the student
    seq_losses: torch.Tensor  # ℓ[B,K], detached; 0 where not run
    parts: dict  # float value of each term, for the log
    tokens: int
    padded: int


def student_objective(model, tokenizer, seqs: list[list], selected: torch.Tensor, alpha: torch.Tensor,
                      unselected: torch.Tensor, a) -> Objective:
    """The student's loss for B questions: selected rationales run with gradients, the unselected ones
    (wanted only by the EMA) run under no_grad, so they can never leak a gradient into the student.
    seqs[b][k] is the Encoded (question b, perspective k)."""
    B, K = selected.shape
    sel = selected.nonzero(as_tuple=True)
    answers = (a.method == "mind" and a.cons_weight > 0) or a.method == "mcc"  # a term reads the answer spans
    run = run_student(model, tokenizer, [seqs[b][k] for b, k in zip(*(t.tolist() for t in sel))], a, answers=answers)
    seq_losses = torch.zeros(B, K, device=alpha.device).index_put(sel, run.losses)
    tokens, padded = run.tokens, run.padded
    if unselected.any():
        un = unselected.nonzero(as_tuple=True)
        with torch.no_grad():
            r = run_student(model, tokenizer, [seqs[b][k] for b, k in zip(*(t.tolist() for t in un))], a, answers=False)
        seq_losses = seq_losses.index_put(un, r.losses)
        tokens, padded = tokens + r.tokens, padded + r.padded
    loss_sft = L.weighted_sft(seq_losses, alpha)  # Σ_{k∈I_q} α_k ℓ_k
    loss, parts = loss_sft, {"sft": loss_sft.item()}
    if answers:
        # answer-span logits laid out as [B,K,A,V]; rows that were not run stay 0 and carry α = 0
        ans = torch.zeros(B, K, *run.answer_logits.shape[1:], device=alpha.device).index_put(sel, run.answer_logits)
        span = torch.zeros(B, K, run.answer_mask.size(1), dtype=torch.bool, device=alpha.device).index_put(
            sel, run.answer_mask)
        if a.method == "mind":
            loss_cons = L.consistency_loss(ans, alpha, span)  # Σ_{i<j∈I_q} α_i α_j JSD(P_i ‖ P_j)
            loss = loss + a.cons_weight * loss_cons
            parts["cons"] = loss_cons.item()
        if a.method == "mcc":
            loss_mcc = L.mcc_kl(ans, selected, span)  # MCC-KD: uniform pairs, bidirectional KL
            loss = loss + a.mcc_weight * loss_mcc
            parts["mcc"] = loss_mcc.item()
    return Objective(loss, seq_losses.detach(), parts, tokens, padded)


# -----------------------------------------------------------------------------
# Checkpoints: atomic (write ckpt.tmp, then swap), resumable


def rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def atomic_torch_save(obj, path: str) -> None:
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def save_checkpoint(out: str, model, tokenizer, trainer_state: dict) -> None:
    final, tmp, old = (os.path.join(out, n) for n in ("ckpt", "ckpt.tmp", "ckpt.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    if lora_modules(model):  # the export is plain W + (α/r)·B·A; trainer.pt keeps the adapters for --resume
        model.save_pretrained(tmp, state_dict=merged_state_dict(model))
        trainer_state = {**trainer_state, "lora": lora_state(model)}
    else:
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)  # from here on the new checkpoint is the one --resume finds
    shutil.rmtree(old, ignore_errors=True)


def truncate_log(path: str, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they will be run again)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a half-written last line of a killed run
            if row.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------
# Learning-rate schedule


def sig(x: float) -> float:
    """7 significant digits: a readable log that still resolves tiny terms such as an early JSD."""
    return float(f"{x:.7g}")


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def make_optimizer(model, a):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95))


# -----------------------------------------------------------------------------
# Memory plan (--dry-run): the bytes one optimiser step of this loop holds at its peak, from the config alone.
# One micro-step runs B questions × P rationales of T tokens with gradients, in chunks of ≤ --max-batch-tokens padded
# tokens, and keeps every chunk's graph until one backward (the JS term couples a question's rationales). Counted:
# tensors autograd saves (what torch.cuda.max_memory_allocated sees), not the CUDA context or allocator slack.

SHIPPED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


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
        name = ev.resolve_model_name(student)
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
    Pq = a.plan_perspectives or (1 if a.method == "sft" else P.K)
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


# -----------------------------------------------------------------------------
# The run


def resolve_defaults(a, n_train: int) -> None:
    """Fill the defaults that depend on the student and the data (documented in --help)."""
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.lr is None:
        a.lr = 3e-3 if a.student == "tiny" else 1e-5
    if a.steps is None:
        a.steps = 650 if a.student == "tiny" else math.ceil(3 * n_train / (a.batch_size * a.grad_accum))
    if a.warmup_steps is None:
        a.warmup_steps = max(1, a.steps // 20)
    if a.max_batch_tokens is None:
        a.max_batch_tokens = 8192 if a.device.startswith("cuda") else 2048
    a.precision = resolve_precision(a.precision, a.device)


def main(argv=None):
    ap = build_parser()
    a = ap.parse_args(argv)
    resume = a.resume
    if resume:
        state_path = os.path.join(resume, "ckpt", "trainer.pt")
        if not os.path.exists(state_path):
            raise SystemExit(f"error: --resume {resume}: no checkpoint at {state_path}")
        state = torch.load(state_path, weights_only=False)
        a = argparse.Namespace(**{**vars(ap.parse_args([])), **state["args"]})  # flags added since: defaults
        a.out, a.resume = resume, resume
        print(f"resuming {resume} at step {state['step']} with its saved flags")
    else:
        check_args(ap, a)
        state = None
        if a.dry_run:
            return dry_run(a)
    progress = not a.no_progress
    os.makedirs(a.out, exist_ok=True)
    log_path = os.path.join(a.out, "log.jsonl")

    train, evals = load_data(a)
    tasks = [t for t in (a.eval_tasks or "").split(",") if t]
    for t in tasks:  # a missing benchmark file fails now, not after hours of training
        ev.task_path(t, a.eval_data_dir, a.gpqa_csv)
    resolve_defaults(a, len(train))
    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    K = P.K
    qids = [ex.id for ex in train]

    # who trains on what: present perspectives, and for sft the one perspective
    mask_all = torch.tensor([[k in ex.rationales for k in P.KEYS] for ex in train])
    if a.method == "sft":
        if a.perspective is None:
            a.perspective = next(k for i, k in enumerate(P.KEYS) if mask_all[:, i].any())
        col = P.KEYS.index(a.perspective)
        mask_all = torch.zeros_like(mask_all).index_fill(1, torch.tensor([col]), True) & mask_all
        keep = mask_all.any(1)
        if not keep.any():
            raise SystemExit(f"error: --perspective {a.perspective}: no question of {a.data} has it")
        train = [ex for ex, k in zip(train, keep.tolist()) if k]
        mask_all, qids = mask_all[keep], [ex.id for ex in train]

    model, tokenizer = load_student(a, train, path=os.path.join(resume, "ckpt") if resume else None)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"student: {a.student} ({n_params / 1e6:.2f}M parameters), {len(train)} training questions, "
          f"method {a.method}, device {a.device}")

    # every (question, perspective) tokenised once; seqs[q][k] is None where absent
    def encode(ex: P.Example, k: str) -> ev.Encoded:
        try:
            return ev.encode_example(tokenizer, ex.question, ex.rationales[k], ex.answer, max_len=a.max_len)
        except ValueError as e:
            raise SystemExit(f"error: {a.data or 'synthetic data'}: question {ex.id!r}, {k}: {e}")

    seqs = [[encode(ex, k) if mask_all[q, i] else None for i, k in enumerate(P.KEYS)] for q, ex in enumerate(train)]
    n_cut = sum(s.n_cut > 0 for row in seqs for s in row if s)
    if n_cut:
        tokens_cut = sum(s.n_cut for row in seqs for s in row if s)
        print(f"note: {n_cut} rationales were longer than --max-len {a.max_len}; their bodies were cut (final lines "
              f"kept): {tokens_cut} tokens in all")
    longest = max(len(s.input_ids) - s.prompt_len for row in seqs for s in row if s)
    if a.max_new_tokens is None:
        a.max_new_tokens = min(512, int(1.5 * longest) + 8)

    use_metanet = a.method == "mind" and not a.no_metanet
    features = l0 = None
    metanet = None
    probe_path = os.path.join(a.out, "probe.pt")
    if use_metanet:
        # ---- stage 1: probe (ℓ⁰ and features of the initial student), cached in OUT/probe.pt
        if resume and os.path.exists(probe_path):
            probe = torch.load(probe_path)
            features, l0 = probe["features"], probe["l0"]
        else:
            flat = [(q, k) for q in range(len(train)) for k in range(K) if mask_all[q, k]]
            want_feats = a.ta_encoder == "student"
            l0 = torch.full((len(train), K), float("nan"))
            fdim = model.config.hidden_size
            features = torch.zeros(len(train), K, fdim) if want_feats else None
            model.eval()
            t_probe = time.time()
            with torch.no_grad():
                chunk = 512
                for s in tqdm(range(0, len(flat), chunk), desc="probe", disable=not progress):
                    part = flat[s:s + chunk]
                    r = run_student(model, tokenizer, [seqs[q][k] for q, k in part], a, answers=False,
                                    features=want_feats)
                    for n, (q, k) in enumerate(part):
                        l0[q, k] = r.losses[n].item()
                        if want_feats:
                            features[q, k] = r.features[n].cpu()
            model.train()
            print(f"probe: {len(flat)} rationales in {time.time() - t_probe:.1f}s")
            if not want_feats:
                texts = [train[q].rationales[P.KEYS[k]] for q, k in flat]
                emb = encode_sentences(a.ta_encoder, texts, progress=progress, device=a.device)
                features = torch.zeros(len(train), K, emb.size(1))
                for n, (q, k) in enumerate(flat):
                    features[q, k] = emb[n]
            atomic_torch_save({"features": features, "l0": l0, "ids": qids}, probe_path)
        metanet = MetaNet(features.size(-1), K, a.meta_hidden, a.meta_attn_heads, a.meta_score_heads,
                          attention=not a.no_attention, dropout=a.meta_dropout).to(a.device)
        features = features.to(a.device)

    calibrator = InertiaCalibrator(K, a.inertia)
    mind = Mind(metanet, calibrator, a.select_beta, a.meta_tau, a.student_tau)
    meta_opt = torch.optim.AdamW(metanet.parameters(), lr=a.meta_warmup_lr) if metanet else None

    if use_metanet and not resume:
        # the probe is the first observation of every (q, k) and of every c_k
        calibrator.update(qids, l0, mask_all)
        # ---- stage 2: MetaNet warm-up on π_τ(−ℓ⁰)
        gen = torch.Generator().manual_seed(a.seed)
        l0_dev, m_dev = l0.to(a.device), mask_all.to(a.device)
        for epoch in range(a.meta_warmup_epochs):
            perm, tot = torch.randperm(len(train), generator=gen), 0.0
            for s in range(0, len(train), a.meta_batch_size):
                idx = perm[s:s + a.meta_batch_size].to(a.device)
                loss = L.meta_loss(metanet(features[idx], m_dev[idx]), l0_dev[idx], m_dev[idx], a.meta_tau)
                meta_opt.zero_grad(set_to_none=True)
                loss.backward()
                meta_opt.step()
                tot += loss.item() * len(idx)
            print(f"meta warm-up epoch {epoch + 1}/{a.meta_warmup_epochs}: KL(π(s) ‖ π(−ℓ⁰)) = {tot / len(train):.4f}")
        # the MetaNet as the joint stage starts, for comparing its scores at the start and the end
        atomic_torch_save(metanet.state_dict(), os.path.join(a.out, "metanet_start.pt"))
    if meta_opt:
        for group in meta_opt.param_groups:
            group["lr"] = a.meta_lr  # the joint stage: 10x slower, the MetaNet's own inertia

    # ---- stage 3: joint training
    opt = make_optimizer(model, a)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, a.warmup_steps, a.steps, a.min_lr_ratio))
    step, epoch, pos, tokens, padded_tokens, train_time = 0, 0, 0, 0, 0, 0.0
    if resume:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        calibrator.load_state_dict(state["calibrator"])
        if metanet:
            metanet.load_state_dict(state["metanet"])
            meta_opt.load_state_dict(state["meta_optimizer"])
            for p, g in zip(metanet.parameters(), state["meta_grads"]):
                p.grad = None if g is None else g.to(a.device)
        step, epoch, pos = state["step"], state["epoch"], state["pos"]
        tokens, padded_tokens, train_time = state["tokens"], state["padded_tokens"], state["train_time"]
        set_rng_state(state["rng"])
        truncate_log(log_path, step)
    elif os.path.exists(log_path):
        os.remove(log_path)

    def permutation(ep: int) -> list[int]:  # data order depends only on (seed, epoch): resumable
        return torch.randperm(len(train), generator=torch.Generator().manual_seed(a.seed * 100003 + ep)).tolist()

    perm = permutation(epoch)

    def next_questions(n: int) -> list[int]:
        nonlocal epoch, pos, perm
        out = []
        while len(out) < n:
            if pos == len(perm):
                epoch, pos = epoch + 1, 0
                perm = permutation(epoch)
            out.append(perm[pos])
            pos += 1
        return out

    def trainer_state() -> dict:
        return {"step": step, "epoch": epoch, "pos": pos, "args": vars(a), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "calibrator": calibrator.state_dict(),
                "metanet": metanet.state_dict() if metanet else None,
                "meta_optimizer": meta_opt.state_dict() if meta_opt else None,
                # the MetaNet accumulates gradients over --meta-accum steps: a checkpoint can fall in between
                "meta_grads": [p.grad for p in metanet.parameters()] if metanet else None, "rng": rng_state(),
                "tokens": tokens, "padded_tokens": padded_tokens, "train_time": train_time}

    def run_eval(limit: int | None, splits: list[str]) -> dict:
        res = {}
        for name in splits:
            if name in evals:
                rows = evals[name][:limit] if limit else evals[name]
                res[name], _ = ev.evaluate(model, tokenizer, rows, a.max_new_tokens, a.eval_batch_size,
                                           progress=progress, desc=f"eval {name}")
        return res

    mask_dev = mask_all.to(a.device)
    sft_col = P.KEYS.index(a.perspective) if a.method == "sft" else None
    log_f = open(log_path, "a")
    bar = tqdm(total=a.steps, initial=step, desc=f"train {a.method}", disable=not progress)
    while step < a.steps:
        t0 = time.time()
        stats = {"loss": 0.0, "sft": 0.0, "cons": 0.0, "mcc": 0.0, "meta": 0.0, "sel": 0.0, "alpha_entropy": 0.0}
        alpha_sum, alpha_n = torch.zeros(K), torch.zeros(K)
        ell_sum, ell_n = torch.zeros(K), torch.zeros(K)
        for micro in range(a.grad_accum):
            qs = next_questions(a.batch_size)
            mask = mask_dev[qs]
            # who is trained on, with what weight
            if a.method == "mind":
                scores, selected, alpha = mind.plan(features[qs] if metanet else None, mask)
            else:  # sft: the one perspective; sft-all and mcc: all present, uniform
                scores, selected = None, mask
                alpha = mask.float() / mask.sum(-1, keepdim=True).clamp(min=1)
            probe_now = a.method == "mind" and step % a.probe_every == 0
            unselected = mask & ~selected if probe_now else torch.zeros_like(mask)
            obj = student_objective(model, tokenizer, [seqs[q] for q in qs], selected, alpha, unselected, a)
            loss, seq_losses = obj.loss, obj.seq_losses
            tokens += obj.tokens
            padded_tokens += obj.padded
            for name in ("sft", "cons", "mcc"):
                stats[name] += obj.parts.get(name, 0.0) / a.grad_accum
            (loss / a.grad_accum).backward()
            # the EMA sees what was observed this step; then the MetaNet chases π_τ(−L̃)
            observed = selected | unselected
            _, loss_meta = mind.observe([qids[q] for q in qs], seq_losses.detach(), observed, scores, mask)
            if loss_meta is not None:
                (loss_meta / (a.grad_accum * a.meta_accum)).backward()
                stats["meta"] += loss_meta.item() / a.grad_accum
            stats["loss"] += loss.item() / a.grad_accum
            stats["sel"] += selected.sum(1).float().mean().item() / a.grad_accum
            ent = -(alpha * alpha.clamp(min=1e-12).log()).sum(1).mean().item()
            stats["alpha_entropy"] += ent / a.grad_accum
            alpha_sum += alpha.detach().cpu().sum(0)
            alpha_n += mask.cpu().sum(0)
            ell_sum += torch.where(observed, seq_losses, 0.0).cpu().sum(0)
            ell_n += observed.cpu().sum(0)
        if a.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.max_grad_norm).item()
        else:
            grad_norm = float("nan")
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if metanet is not None and (step + 1) % a.meta_accum == 0:
            meta_opt.step()
            meta_opt.zero_grad(set_to_none=True)
        step += 1
        train_time += time.time() - t0
        row = {"step": step, "lr": sched.get_last_lr()[0], **{k: sig(v) for k, v in stats.items()},
               "grad_norm": sig(grad_norm), "c": [sig(x) for x in calibrator.c.tolist()],
               "alpha": [sig(x) for x in (alpha_sum / alpha_n.clamp(min=1)).tolist()],
               "loss_k": [sig(s / n) if n else None for s, n in zip(ell_sum.tolist(), ell_n.tolist())],
               "tokens": tokens}
        if a.eval_every and step % a.eval_every == 0 and step < a.steps:
            row["eval"] = {k: v["accuracy"] for k, v in run_eval(a.eval_limit, ["id"]).items()}
            bar.write(f"step {step}: eval {row['eval']}")
        log_f.write(json.dumps(row) + "\n")
        log_f.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", sel=f"{stats['sel']:.1f}")
        if (a.save_every and step % a.save_every == 0) or step == a.steps:
            save_checkpoint(a.out, model, tokenizer, trainer_state())
    bar.close()
    log_f.close()

    # ---- final evaluation
    t_eval = time.time()
    results = run_eval(None, ["id", "ood"])
    if tasks:
        results.update(ev.evaluate_tasks(model, tokenizer, tasks, a.eval_data_dir, a.gpqa_csv, a.eval_tasks_limit,
                                         a.max_new_tokens, a.eval_batch_size, os.path.join(a.out, "eval"), progress))
    print(f"final evaluation took {time.time() - t_eval:.1f}s")
    for name, m in results.items():
        print(f"eval {name}: accuracy {m['accuracy']:.3f} (strict {m['strict_accuracy']:.3f}) on {m['n']} questions")
    metrics = {"eval": results, "config": vars(a), "steps": step, "tokens": tokens,
               "tokens_per_s": tokens / max(train_time, 1e-9), "padding_ratio": padded_tokens / max(tokens, 1),
               "train_time_s": train_time, "parameters": n_params,
               "c": calibrator.c.tolist(), "perspectives": P.KEYS}
    ev.write_json(os.path.join(a.out, "metrics.json"), metrics)
    print(f"wrote {os.path.join(a.out, 'metrics.json')}")
    return metrics


if __name__ == "__main__":
    main()
