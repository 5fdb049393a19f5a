"""
Train a student with MIND (or a baseline / ablation of it) in one hand-written loop.

    python train.py                                   # the default demo: synthetic world, tiny student, CPU
    python train.py --student Qwen2.5-1.5B --out out/qwen15      # the paper: shipped data, base-vs-trained table

The file reads top to bottom as the paper's stages:
  config    the CLI (every default lives in build_parser) and the method table METHODS
  data      the questions with their rationales, tokenised once
  student   student.py builds or loads it (tiny / Hugging Face / GGUF, LoRA, precision)
  1. probe            one no-grad pass of the initial student over every (question, perspective): the losses ℓ⁰
                      that seed the inertia calibrator and, with --ta-encoder student, the MetaNet features e_k
  2. warmup_metanet   the MetaNet alone, on the targets π_τ(−ℓ⁰)
  3. train_step       every step: MetaNet scores → selection I_q and weights α → the student's
                      L = Σ α ℓ + λ Σ α_i α_j JSD → EMA update of L̃ → the MetaNet's KL(π_τ(s) ‖ π_τ(−L̃))
  final evaluation    greedy generation on the test splits (and --eval-tasks benchmarks)
Baselines (--method sft | sft-all | mcc) and ablations are rows of METHODS and flags of this same loop.

OUT/ holds metrics.json, log.jsonl (one line per step), probe.pt, and ckpt/ (the student in Hugging Face
format + tokenizer, and trainer.pt with everything else needed to resume exactly: --resume OUT).
"""
import argparse
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm import tqdm

import distributed
import perspectives
from eval import (DEFAULT_TASKS, GPQA_HELP, Encoded, HelpFormatter, encode_example, evaluate_tasks,
                  read_questions, task_name, task_path, write_json, write_results)
from losses import (consistency_loss, consistency_loss_partial, mcc_kl, mcc_kl_partial, meta_loss,
                    weighted_sft)
from metanet import MetaNet, encode_sentences
from mind import RULES, InertiaCalibrator, Mind
from student import (PRECISIONS, Compute, StudentSpec, atomic_torch_save, find_checkpoint, load_student,
                     lr_lambda, make_optimizer, resolve_precision, rng_state, run_student, save_checkpoint,
                     set_rng_state, truncate_log)

K = perspectives.K  # 8 perspectives
# stage 0's perspectives: SmolLM2-135M-Instruct's four lowest initial losses on data/mind_gsm8k_train.jsonl (README)
PRETRAIN_KEYS = ("formal_symbolic", "decomposition", "planning", "socratic")
# the paper-sized training set a pretrained student trains on by default (data/mind_gsm8k_train.md)
PAPER_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mind_gsm8k_train.jsonl")


# -----------------------------------------------------------------------------
# The method table: each --method resolves once to what it uses. A fork that adds a baseline adds one row.

METANET_FLAGS = ("select_beta", "select_tau", "select_beta_end", "min_selected", "trend_weight", "student_tau",
                 "meta_tau", "probe_every", "ta_encoder", "meta_hidden", "meta_attn_heads", "meta_score_heads",
                 "meta_dropout", "meta_warmup_epochs", "meta_warmup_lr", "meta_lr", "meta_accum", "meta_batch_size",
                 "no_attention")


@dataclass(frozen=True)
class Method:
    metanet: bool  # the Teaching Assistant picks I_q and weighs α; else I_q = K_q with uniform α
    probe: bool  # stage 1 seeds the inertia calibrator with ℓ⁰, so c_k and L̃ start from the initial student
    consistency: bool  # + λ Σ_{i<j∈I_q} α_i α_j JSD(P_i ‖ P_j) on the answer span
    mcc: bool  # + MCC-KD's ½[KL(P_i‖P_j) + KL(P_j‖P_i)] on the answer span, uniform pairs
    single: bool  # one golden rationale per question (--perspective)
    flags: tuple[str, ...]  # the method-specific flags it reads; any other one given is an error


METHODS = {
    "mind": Method(metanet=True, probe=True, consistency=True, mcc=False, single=False,
                   flags=METANET_FLAGS + ("inertia", "inertia_rule", "cons_weight", "no_metanet")),
    "sft": Method(metanet=False, probe=False, consistency=False, mcc=False, single=True, flags=("perspective",)),
    "sft-all": Method(metanet=False, probe=False, consistency=False, mcc=False, single=False, flags=()),
    "mcc": Method(metanet=False, probe=False, consistency=False, mcc=True, single=False, flags=("mcc_weight",)),
}
METHOD_FLAGS = {f for m in METHODS.values() for f in m.flags}


def resolve_method(name: str, no_metanet: bool) -> Method:
    if no_metanet:  # ablation: uniform α over every present perspective; the probe still seeds c_k and L̃
        return replace(METHODS[name], metanet=False, flags=("inertia", "inertia_rule", "cons_weight", "no_metanet"))
    return METHODS[name]


# -----------------------------------------------------------------------------
# CLI: every default lives here. The paper gives no values for β, τ, τ_s, μ, λ or the MetaNet's optimisation; the
# defaults marked "ours" in --help are this project's (README, Defaults).

# flags a resumed run may change (--resume OUT --steps 2000 extends a run); every other flag is the saved one
RESUME_FLAGS = {"resume", "steps", "eval_every", "eval_limit", "eval_batch_size", "max_new_tokens", "eval_tasks",
                "eval_tasks_limit", "eval_data_dir", "gpqa_csv", "save_every", "no_progress", "device",
                "max_batch_tokens", "fsdp"}
DEVICE_FLAGS = ("device", "precision", "max_batch_tokens")  # saved as given, resolved again on resume


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    g = ap.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="training JSONL (MIND format), or a directory with train.jsonl [+ test_id.jsonl, test_ood.jsonl] "
                        "as written by perspectives.py; default: the synthetic world generated in memory from --seed "
                        "for the tiny student, data/mind_gsm8k_train.jsonl (518 GSM8K questions x 8) for a pretrained one")
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

    g = ap.add_argument_group("stage 0: pre-training the tiny student (the synthetic world only; ours)")
    g.add_argument("--pretrain-steps", type=int, default=None,
                   help="steps of plain SFT before the probe, on 1-event problems of the world written in "
                        "--pretrain-perspectives only, so the student starts as a real LLM does: able, and unevenly so "
                        "across perspectives (default: 150 for the tiny student on the synthetic world; 0: off)")
    g.add_argument("--pretrain-perspectives", default=",".join(PRETRAIN_KEYS),
                   help="the perspectives of stage 0 (default: the four a real student, SmolLM2-135M-Instruct, finds "
                        "easiest on the shipped GSM8K data; README)")
    g.add_argument("--pretrain-lr", type=float, default=3e-3,
                   help="peak learning rate of stage 0 (warm-up, then cosine to a tenth), whatever --lr is")
    g.add_argument("--pretrain-cache", default=os.path.join(os.path.expanduser("~"), ".cache", "mind", "stage0"),
                   help="where stage 0's students are kept, keyed by a hash of everything they depend on (a seed's "
                        "stage 0 runs once for all its runs)")

    g = ap.add_argument_group("memory plan")
    g.add_argument("--dry-run", action="store_true",
                   help="build the student on the meta device (no weights) and print the memory plan as JSON "
                        "(scripts/plan_memory.py): parameters, bytes of weights, gradients, optimizer state, "
                        "activations and the peak (--student may be a config dir or a name: the shipped configs/NAME "
                        "is used when present)")
    g.add_argument("--plan-perspectives", type=int, default=None,
                   help="rationales per question the plan assumes all run with gradients (None: 1 for --method "
                        "sft, else 8)")
    g.add_argument("--plan-gpu-gib", type=float, default=80.0, help="GPU memory the plan is checked against")
    add_method_flags(ap)
    add_training_flags(ap)
    return ap


def add_method_flags(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("method and ablations")
    g.add_argument("--method", choices=tuple(METHODS), default="mind",
                   help="mind; sft (one perspective); sft-all (all, uniform); mcc (all, uniform + MCC-KD bidirectional KL)")
    g.add_argument("--perspective", choices=perspectives.KEYS, default=None,
                   help="the perspective of --method sft (default: the first perspective present in the data)")
    g.add_argument("--no-metanet", action="store_true", help="ablation: uniform α over all present perspectives (I_q = K_q)")
    g.add_argument("--no-attention", action="store_true", help="ablation: the MetaNet's synergy layer becomes identity")
    g.add_argument("--inertia", type=float, default=0.9, help="μ of the EMA over losses (0 = the paper's instantaneous-loss ablation); 0.9 is ours")
    g.add_argument("--inertia-rule", choices=RULES, default="offset",
                   help="how L̃ filters a question's losses (ours; mind.py): offset L̃ = c_k + EMA_q(ℓ − c_k), debiased "
                        "L̃ = EMA_q(ℓ) bias-corrected, seeded L̃ ← μ(L̃ or c_k) + (1−μ)ℓ (the rule of earlier versions)")
    g.add_argument("--select-beta", type=float, default=0.5, help="β of the soft threshold p_k ≥ β·max p, p = π_τ(s) (0 keeps all); 0.5 is ours")
    g.add_argument("--select-beta-end", type=float, default=0.01,
                   help="a self-paced curriculum (ours): β falls geometrically from --select-beta to this value over the "
                        "joint stage, so the threshold τ·ln(1/β) grows linearly (0.17 to 1.15 nats at the defaults): "
                        "selective while the student is uneven, inclusive once it has caught up (give --select-beta's "
                        "value to keep β fixed, as in the paper)")
    g.add_argument("--trend-weight", type=float, default=0.0,
                   help="γ: the MetaNet's target is π_τ(−(L̃ − (1−γ)·c_k)); 1 is the paper's π_τ(−L̃); 0 (ours) ranks a "
                        "question's perspectives by how far each sits from its own trend c_k, so that no perspective wins "
                        "everywhere and the rest are forgotten (README)")
    g.add_argument("--min-selected", type=int, default=2,
                   help="a floor on |I_q|: the N best-scored perspectives are always kept (ours: 2, so the JS term always "
                        "has a pair; 1 is the paper's arg-max)")
    g.add_argument("--cons-weight", type=float, default=0.1, help="λ of the JS consistency term (0 disables it); 0.1 is ours")
    g.add_argument("--mcc-weight", type=float, default=0.1, help="weight of the bidirectional KL of --method mcc")
    g.add_argument("--meta-tau", type=float, default=1.0, help="τ of π_τ in the meta loss (ours)")
    g.add_argument("--select-tau", type=float, default=0.25,
                   help="τ of p = π_τ(s) in selection: k is dropped when its score trails the best by more than "
                        "τ·ln(1/β) nats, 0.17 at the defaults (ours, from the measured spread of ℓ across a question's "
                        "perspectives, README; the paper's p = π(s) is 1)")
    g.add_argument("--student-tau", type=float, default=1.0, help="τ_s of the compatibility weights α (ours)")
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
    g.add_argument("--meta-warmup-epochs", type=int, default=3, help="epochs of MetaNet-only warm-up on π_τ(−ℓ⁰) (ours)")
    g.add_argument("--meta-warmup-lr", type=float, default=1e-3, help="MetaNet learning rate during warm-up (ours)")
    g.add_argument("--meta-lr", type=float, default=1e-4, help="MetaNet learning rate in the joint stage (ours: 10x below warm-up)")
    g.add_argument("--meta-accum", type=int, default=4, help="the MetaNet steps once every N student steps (ours)")
    g.add_argument("--meta-batch-size", type=int, default=64, help="questions per MetaNet warm-up batch")


def add_training_flags(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None,
                   help="optimiser steps (default: 480 for the tiny student, else 3 epochs of the data); with --resume, "
                        "the new total (the cosine schedule stretches to it)")
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
    g.add_argument("--backward-per-chunk", action="store_true",
                   help="run the backward of each --max-batch-tokens chunk as soon as its forward is done, so only one "
                        "chunk's activations live at a time (same gradients; the JS/MCC terms then cost one more "
                        "forward of the selected rationales without a graph, for their partners' answer logits)")
    g.add_argument("--seed", type=int, default=0, help="seed of everything (data order, init, synthetic world)")
    g.add_argument("--fsdp", action="store_true",  # torchrun
                   help="under torchrun: shard the student's weights, gradients and optimizer state across the "
                        "processes with FSDP2 (full fine-tuning of a model that does not fit one GPU); default DDP")

    g = ap.add_argument_group("evaluation and logging")
    g.add_argument("--eval-every", type=int, default=100,
                   help="evaluate on --eval-limit ID questions every N steps (0: only at the end)")
    g.add_argument("--eval-limit", type=int, default=64, help="questions of the periodic evaluation")
    g.add_argument("--eval-batch-size", type=int, default=64, help="questions generated together")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation budget (default: 1.5x the longest training completion, at most 512)")
    g.add_argument("--eval-tasks", default=None,
                   help="benchmarks evaluated with eval.py for the initial student (once, OUT/eval_base/) and after "
                        "training (OUT/eval/), tabulated like the paper in OUT/results.md (comma list; 'none': off). "
                        f"Default: none for the tiny student; {DEFAULT_TASKS} (+ gpqa_diamond with --gpqa-csv) for a "
                        "pretrained one")
    g.add_argument("--eval-tasks-limit", type=int, default=None, help="questions per benchmark of --eval-tasks")
    g.add_argument("--eval-data-dir", default=None, help="benchmark files for --eval-tasks (default: data/benchmarks)")
    g.add_argument("--gpqa-csv", default=None, help="the official gpqa_diamond.csv, for --eval-tasks gpqa_diamond")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and CI)")

    g = ap.add_argument_group("checkpoints")
    g.add_argument("--out", default="out/default", help="output directory")
    g.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (and at the end; 0: end only)")
    g.add_argument("--resume", default=None, metavar="OUT",
                   help="continue the run in OUT exactly where its newest complete checkpoint left it, with its saved "
                        "flags; only these may be given again: " +
                        ", ".join("--" + f.replace("_", "-") for f in sorted(RESUME_FLAGS - {"resume"})))
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def given_flags(ap: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the flags written on the command line (a default written out counts as given)."""
    dest = {o: act.dest for act in ap._actions for o in act.option_strings}
    return {dest[t.split("=", 1)[0]] for t in argv if t.split("=", 1)[0] in dest}


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def eval_tasks(flag_value: str | None, student: str, gpqa_csv: str | None) -> list[str]:
    """The benchmarks of --eval-tasks; by default the paper's table for a pretrained student, none for the tiny one."""
    if flag_value is None:  # torchrun: none (the benchmarks are evaluated in one process, see check_args)
        return [] if student == "tiny" or distributed.world() > 1 else \
            DEFAULT_TASKS.split(",") + (["gpqa_diamond"] if gpqa_csv else [])
    return [] if flag_value == "none" else [t for t in flag_value.split(",") if t]


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace, given: set[str]) -> None:
    """Values in range, and no flag that would have no effect in this configuration."""
    if not 0.0 <= args.inertia < 1.0:
        ap.error(f"--inertia {args.inertia}: must be in [0, 1)")
    if args.select_beta < 0:
        ap.error(f"--select-beta {args.select_beta}: must be >= 0")
    if args.select_beta > 0 and not 0 < args.select_beta_end <= args.select_beta:
        ap.error(f"--select-beta-end {args.select_beta_end}: must be in (0, --select-beta {args.select_beta}] (give "
                 f"--select-beta's value for a fixed β)")
    if not 1 <= args.min_selected <= K:
        ap.error(f"--min-selected {args.min_selected}: must be in 1..{K}")
    for name in ("batch_size", "grad_accum", "meta_accum", "probe_every", "max_len", "max_batch_tokens",
                 "meta_batch_size", "steps", "eval_tasks_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"{flag(name)} {getattr(args, name)}: must be >= 1")
    for name in ("meta_tau", "student_tau", "select_tau"):
        if getattr(args, name) <= 0:
            ap.error(f"{flag(name)} must be > 0")
    if args.lora_r < 0:
        ap.error(f"--lora-r {args.lora_r}: must be >= 0 (0 = full fine-tuning)")
    if distributed.world() > 1 and args.batch_size < distributed.world():  # torchrun
        ap.error(f"--batch-size {args.batch_size}: each of the {distributed.world()} processes needs a question")
    if distributed.world() > 1 and eval_tasks(args.eval_tasks, args.student, args.gpqa_csv):  # torchrun
        ap.error("--eval-tasks runs in one process: evaluate OUT/ckpt afterwards with python scripts/paper.py or "
                 "eval.py, or train without torchrun")
    if args.fsdp and args.backward_per_chunk:  # torchrun: gave wrong gradients on CPU (the JS/MCC no-grad pre-pass)
        ap.error("--fsdp with --backward-per-chunk is not supported yet: use --grad-checkpointing")
    if args.fsdp and (distributed.world() == 1 or args.lora_r):  # torchrun
        ap.error("--fsdp has no effect " + ("with --lora-r (its trainable weights are small: DDP)" if args.lora_r else
                                            "without torchrun (torchrun --nproc_per_node N train.py --fsdp ...)"))
    if args.lora_r and args.lora_alpha <= 0:
        ap.error(f"--lora-alpha {args.lora_alpha}: must be > 0")
    if not 0.0 <= args.lora_dropout < 1.0:
        ap.error(f"--lora-dropout {args.lora_dropout}: must be in [0, 1)")
    if args.plan_perspectives is not None and not 1 <= args.plan_perspectives <= K:
        ap.error(f"--plan-perspectives {args.plan_perspectives}: must be in 1..{K}")
    if args.dry_run and args.student == "tiny":
        ap.error("--dry-run plans a pretrained student: give --student NAME, a config dir (e.g. configs/Qwen2.5-1.5B) "
                 "or a .gguf file")
    if args.attn == "flash_attention_2" and not args.dry_run:
        import importlib.util
        if importlib.util.find_spec("flash_attn") is None:
            ap.error("--attn flash_attention_2: the flash-attn package is not installed (pip install flash-attn; CUDA "
                     "only); use --attn sdpa")
        if args.device is not None and not args.device.startswith("cuda"):
            ap.error(f"--attn flash_attention_2 runs on CUDA only, not --device {args.device}")
    # a flag that would be silently ignored is an error: --cons-weight with --method mcc is an easy slip
    method = resolve_method(args.method, args.no_metanet)
    if args.no_metanet and args.method != "mind":
        ap.error("--no-metanet is an ablation of --method mind")
    unused = {f: f"--method {args.method}" + (" --no-metanet" if args.no_metanet else "")
              for f in METHOD_FLAGS - set(method.flags)}
    unused.update({f: f"--student {args.student}" for f in ("tiny_hidden", "tiny_layers", "tiny_heads", "tiny_vocab")
                   if args.student != "tiny"})
    unused.update({f: "--lora-r 0" for f in ("lora_alpha", "lora_dropout") if not args.lora_r})
    unused.update({f: f"--data {args.data}" if args.data else f"--student {args.student} (it trains on {PAPER_DATA})"
                   for f in ("synthetic_n", "synthetic_n_test") if args.data or args.student != "tiny"})
    unused.update({f: "--student tiny (nothing to plan)" for f in ("plan_perspectives", "plan_gpu_gib")
                   if args.student == "tiny"})
    tasks = eval_tasks(args.eval_tasks, args.student, args.gpqa_csv)
    unused.update({f: "no benchmark to evaluate (--eval-tasks)" for f in ("eval_tasks_limit", "eval_data_dir")
                   if not tasks})
    if "gpqa_diamond" not in tasks:
        unused["gpqa_csv"] = "--eval-tasks without gpqa_diamond"
    if not args.eval_every:
        unused["eval_limit"] = "--eval-every 0"
    if args.select_beta == 0:  # nothing is dropped: no schedule, temperature or floor of the threshold matters
        unused.update({f: "--select-beta 0 (nothing is dropped)" for f in ("select_beta_end", "select_tau",
                                                                            "min_selected")})
    world = "the synthetic world's tiny student"
    if args.student != "tiny" or args.data:
        unused.update({f: f"--student {args.student}" + (f" --data {args.data}" if args.data else "") +
                       f" (stage 0 is for {world})" for f in ("pretrain_steps", "pretrain_perspectives",
                                                                "pretrain_cache", "pretrain_lr")})
    elif args.pretrain_steps == 0:
        unused.update({f: "--pretrain-steps 0" for f in ("pretrain_perspectives", "pretrain_cache", "pretrain_lr")})
    if args.pretrain_steps is not None and args.pretrain_steps < 0:
        ap.error(f"--pretrain-steps {args.pretrain_steps}: must be >= 0")
    bad_keys = [k for k in args.pretrain_perspectives.split(",") if k not in perspectives.KEYS]
    if bad_keys or not args.pretrain_perspectives:
        ap.error(f"--pretrain-perspectives {args.pretrain_perspectives}: unknown {bad_keys} (one or more of "
                 f"{', '.join(perspectives.KEYS)})")
    bad = sorted(f for f in given & set(unused))
    if bad:
        ap.error("; ".join(f"{flag(f)} has no effect with {unused[f]}" for f in bad))


def parse(ap: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, dict | None]:
    """-> (flags, trainer state of the checkpoint to resume or None). A resumed run takes its saved flags; only
    RESUME_FLAGS may be given again, anything else is refused rather than silently ignored."""
    args = ap.parse_args(argv)
    given = given_flags(ap, argv)
    if not args.resume:
        check_args(ap, args, given)
        return args, None
    ckpt = find_checkpoint(args.resume)
    if ckpt is None:
        raise SystemExit(f"error: --resume {args.resume}: no checkpoint (no complete ckpt/, ckpt.tmp/ or ckpt.old/ "
                         f"in it)")
    refused = sorted(given - RESUME_FLAGS)
    if refused:
        ap.error(f"--resume {args.resume} keeps the run's saved flags; these cannot change: "
                 f"{', '.join(flag(f) for f in refused)}")
    state = torch.load(os.path.join(ckpt, "trainer.pt"), weights_only=False, map_location="cpu")
    saved = {**vars(ap.parse_args([])), **state["args"]}  # flags added since the run started: their defaults
    changed = {f: getattr(args, f) for f in given}
    args = argparse.Namespace(**{**saved, **changed, "out": args.resume, "resume": args.resume})
    check_args(ap, args, set())
    if args.steps is not None and args.steps < state["step"]:
        ap.error(f"--steps {args.steps}: the checkpoint in {ckpt} is already at step {state['step']}")
    print(f"resuming {args.resume} at step {state['step']} from {ckpt}" +
          (f" with {', '.join(flag(f) for f in sorted(given - {'resume'}))} changed" if given - {"resume"} else ""))
    state["dir"] = ckpt
    return args, state


def resolve_defaults(args: argparse.Namespace, n_train: int) -> None:
    """Fill the defaults that depend on the student, the data and the device (documented in --help)."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.lr is None:
        args.lr = 3e-3 if args.student == "tiny" else 1e-5
    if args.steps is None:
        args.steps = 480 if args.student == "tiny" else math.ceil(3 * n_train / (args.batch_size * args.grad_accum))
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.steps // 20)
    if args.max_batch_tokens is None:
        args.max_batch_tokens = 8192 if args.device.startswith("cuda") else 2048
    if args.pretrain_steps is None:
        args.pretrain_steps = 150 if args.student == "tiny" and not args.data else 0
    args.precision = resolve_precision(args.precision, args.device)


# -----------------------------------------------------------------------------
# Data


def load_data(data: str | None, eval_id: str | None, eval_ood: str | None, synthetic_n: int, synthetic_n_test: int,
              seed: int) -> tuple[list[perspectives.Example], dict[str, list[dict]]]:
    """-> (training examples, {split name: [{question, answer}]} for evaluation)"""
    evals = {}
    if data is None:
        splits = perspectives.synthetic_splits(synthetic_n, synthetic_n_test, seed)
        train = splits["train"]
        evals = {"id": [e.to_json() for e in splits["test_id"]], "ood": [e.to_json() for e in splits["test_ood"]]}
    elif os.path.isdir(data):
        train = perspectives.read_training_jsonl(os.path.join(data, "train.jsonl"))
        for name in ("id", "ood"):
            path = os.path.join(data, f"test_{name}.jsonl")
            if os.path.exists(path):
                evals[name] = read_questions(path)
    else:
        train = perspectives.read_training_jsonl(data)
    for name, path in (("id", eval_id), ("ood", eval_ood)):
        if path:
            if not os.path.exists(path):
                raise SystemExit(f"error: --eval-{name} {path}: no such file")
            evals[name] = read_questions(path)
    if not train:
        raise SystemExit(f"error: {data}: no usable training question")
    counts = Counter(len(ex.rationales) for ex in train)
    if set(counts) != {K}:  # absent perspectives are masked out of selection, α and the JS pairs
        print(f"{data}: questions by number of perspectives: " +
              ", ".join(f"{n}: {counts[n]}" for n in sorted(counts, reverse=True)) + " (absent ones are masked)")
    return train, evals


def training_rows(train: list, single: bool, perspective: str | None, data: str | None):
    """-> (examples, perspective or None, mask[Q,K] of the rationales trained on). --method sft keeps one
    perspective (default: the first present) and the questions that have it."""
    mask = torch.tensor([[k in ex.rationales for k in perspectives.KEYS] for ex in train])
    if not single:
        return train, None, mask
    if perspective is None:
        perspective = next(k for i, k in enumerate(perspectives.KEYS) if mask[:, i].any())
    col = perspectives.KEYS.index(perspective)
    mask = torch.zeros_like(mask).index_fill(1, torch.tensor([col]), True) & mask
    keep = mask.any(1)
    if not keep.any():
        raise SystemExit(f"error: --perspective {perspective}: no question of {data} has it")
    return [ex for ex, k in zip(train, keep.tolist()) if k], perspective, mask[keep]


def encode_all(tokenizer, train: list, mask: torch.Tensor, max_len: int, data: str | None) -> list[list]:
    """Every (question, perspective) tokenised once: seqs[q][k] is an Encoded, None where absent."""
    def encode(ex, k: str) -> Encoded:
        try:
            return encode_example(tokenizer, ex.question, ex.rationales[k], ex.answer, max_len=max_len)
        except ValueError as e:
            raise SystemExit(f"error: {data or 'synthetic data'}: question {ex.id!r}, {k}: {e}")

    seqs = [[encode(ex, k) if mask[q, i] else None for i, k in enumerate(perspectives.KEYS)]
            for q, ex in enumerate(train)]
    cut = [s.n_cut for row in seqs for s in row if s and s.n_cut]
    if cut:
        print(f"note: {len(cut)} rationales were longer than --max-len {max_len}; their bodies were cut (final lines "
              f"kept): {sum(cut)} tokens in all")
    return seqs


# -----------------------------------------------------------------------------
# Stage 0 (the synthetic world only, ours): a pre-trained tiny student


def stage_0(model, tokenizer, corpus: list, keys: list[str], steps: int, batch_size: int, lr: float, max_len: int,
            compute: Compute, seed: int, cache: str, progress: bool) -> None:
    """Plain SFT of the freshly built tiny student on `corpus` written in `keys` only, in place. A student from
    random weights has ℓ⁰ ≈ ln V for every perspective alike, so the probe would measure nothing; a real LLM starts
    able and uneven. Cached under `cache` by a hash of all it depends on (the initial weights, the tokenizer, the
    corpus, the schedule): the result is the same whether it ran now or was loaded. Uses no global RNG."""
    import hashlib
    rest = [k for k in perspectives.KEYS if k not in keys]
    # every question in `keys`, plus one of the other perspectives in turn: those are seen 4x less (with 4 + 4), so
    # they start harder but not foreign, as narrative styles are for a real LLM (a gap of ~1 nat, not ln V)
    rows = [[*keys, rest[i % len(rest)]] if rest else list(keys) for i in range(len(corpus))]
    seqs = [[encode_example(tokenizer, ex.question, ex.rationales[k], ex.answer, max_len=max_len) for k in row]
            for ex, row in zip(corpus, rows)]
    digest = hashlib.sha256()
    for t in model.state_dict().values():
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps([[s.input_ids, s.prompt_len] for row in seqs for s in row]).encode())
    digest.update(json.dumps([len(tokenizer), steps, batch_size, lr, seed]).encode())
    path = os.path.join(cache, f"stage0-{digest.hexdigest()[:16]}.pt")
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location=compute.device))
        print(f"stage 0: loaded {path}")
        return
    t0 = time.time()
    opt = make_optimizer(model, lr, 0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_lambda(i, max(1, steps // 20), steps, 0.1))
    order = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(seed)).tolist()
    per_step = batch_size * len(rows[0])
    bar = tqdm(range(steps), desc="stage 0", disable=not progress)
    for i in bar:
        idx = [order[(i * batch_size + j) % len(corpus)] for j in range(batch_size)]
        batch = [s for q in idx for s in seqs[q]]
        loss = run_student(model, tokenizer, batch, compute, answers=False).losses.mean()  # uniform, like sft-all
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    if distributed.is_main():  # torchrun: every rank computed the same student; one writes it
        os.makedirs(cache, exist_ok=True)
        atomic_torch_save(model.state_dict(), path)
    print(f"stage 0: {steps} steps of {per_step} rationales ({', '.join(keys)}; the others one per question in "
          f"turn) in {time.time() - t0:.1f}s -> {path}")


def pretrain_corpus(n: int, seed: int, exclude: list[dict]) -> list:
    """n one-event problems of the synthetic world from their own stream, none of them a test question."""
    banned = {e["question"] for e in exclude}
    return [ex for ex in perspectives.synthetic_examples(n + len(banned), seed, "pretrain")
            if ex.question not in banned][:n]


# -----------------------------------------------------------------------------
# Stage 1: probe. Stage 2: MetaNet warm-up.


@torch.no_grad()
def probe(model, tokenizer, seqs: list[list], mask: torch.Tensor, compute: Compute, features: bool,
          progress: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One no-grad pass of the initial student over every present (q, k). -> (ℓ⁰[Q,K], NaN where absent;
    e[Q,K,H] = the mean-pooled last hidden state over the rationale, or None)"""
    flat = mask.nonzero().tolist()
    l0 = torch.full(mask.shape, float("nan"))
    feats = torch.zeros(*mask.shape, model.config.hidden_size) if features else None
    model.eval()
    for s in tqdm(range(0, len(flat), 512), desc="probe", disable=not progress):
        part = flat[s:s + 512]
        r = run_student(model, tokenizer, [seqs[q][k] for q, k in part], compute, answers=False, features=features)
        for n, (q, k) in enumerate(part):
            l0[q, k] = r.losses[n].item()
            if features:
                feats[q, k] = r.features[n].cpu()
    model.train()
    return l0, feats


def sentence_features(encoder: str, train: list, mask: torch.Tensor, device: str, progress: bool) -> torch.Tensor:
    """e[Q,K,d] from a frozen sentence encoder (the paper's choice) instead of the student."""
    flat = mask.nonzero().tolist()
    emb = encode_sentences(encoder, [train[q].rationales[perspectives.KEYS[k]] for q, k in flat],
                           progress=progress, device=device)
    feats = torch.zeros(*mask.shape, emb.size(1))
    for n, (q, k) in enumerate(flat):
        feats[q, k] = emb[n]
    return feats


def warmup_metanet(metanet: MetaNet, features: torch.Tensor, l0: torch.Tensor, mask: torch.Tensor, epochs: int,
                   lr: float, batch_size: int, tau: float, seed: int) -> torch.optim.Optimizer:
    """Stage 2: the MetaNet alone on the targets π_τ(−ℓ⁰) (l0: ℓ⁰ as Mind.target sees it, minus (1−γ)·c⁰), so the
    joint stage starts from informed scores.
    -> its optimiser, gradients cleared: nothing of the warm-up may leak into the first joint-stage update."""
    opt = torch.optim.AdamW(metanet.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    l0, mask = l0.to(features.device), mask.to(features.device)
    for epoch in range(epochs):
        perm, total = torch.randperm(len(l0), generator=gen), 0.0
        for s in range(0, len(l0), batch_size):
            idx = perm[s:s + batch_size].to(features.device)
            scores = metanet(features[idx], mask[idx])
            loss = meta_loss(scores, l0[idx], mask[idx], tau)  # KL(π_τ(s) ‖ π_τ(−ℓ⁰))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        print(f"meta warm-up epoch {epoch + 1}/{epochs}: KL(π_τ(s) ‖ π_τ(−target)) = {total / len(l0):.4f}")
    opt.zero_grad(set_to_none=True)
    return opt


# -----------------------------------------------------------------------------
# Stage 3: the joint step


@dataclass
class Objective:
    loss: torch.Tensor  # L = L_SFT + λ L_cons (+ w L_mcc), with gradients into the student (detached per chunk)
    seq_losses: torch.Tensor  # ℓ[B,K], detached; 0 where not run
    parts: dict  # float value of each term, for the log
    tokens: int
    padded: int


def student_objective(model, tokenizer, seqs: list[list], selected: torch.Tensor, alpha: torch.Tensor,
                      unselected: torch.Tensor, compute: Compute, cons_weight: float = 0.0,
                      mcc_weight: float = 0.0, backward_scale: float | None = None) -> Objective:
    """The student's loss for B questions: selected rationales run with gradients, the unselected ones (wanted only
    by the EMA) run under no_grad, so they can never leak a gradient into the student. seqs[b][k] is the Encoded
    (question b, perspective k); cons_weight λ of the JS term, mcc_weight of MCC-KD's KL (0: the term is off).
    backward_scale: run backward(scale · L) chunk by chunk inside this call (the returned loss is then detached),
    so only one chunk's activations live at a time; otherwise the caller runs one backward over all chunks."""
    if backward_scale is not None:
        return chunked_objective(model, tokenizer, seqs, selected, alpha, unselected, compute, cons_weight,
                                 mcc_weight, backward_scale)
    B, _ = selected.shape
    sel = selected.nonzero(as_tuple=True)
    answers = cons_weight > 0 or mcc_weight > 0  # a term reads the answer spans
    run = run_student(model, tokenizer, [seqs[b][k] for b, k in zip(*(t.tolist() for t in sel))], compute,
                      answers=answers)
    seq_losses, tokens, padded = observe_unselected(model, tokenizer, seqs, sel, run, unselected, compute)
    loss = weighted_sft(seq_losses, alpha)  # L_SFT = Σ_{k∈I_q} α_k ℓ_k
    parts = {"sft": loss.item()}
    if answers:
        # answer-span logits laid out as [B,K,A,V]; rows that were not run stay 0 and carry α = 0
        ans = torch.zeros(*selected.shape, *run.answer_logits.shape[1:], device=alpha.device).index_put(
            sel, run.answer_logits)
        span = torch.zeros(*selected.shape, run.answer_mask.size(1), dtype=torch.bool, device=alpha.device).index_put(
            sel, run.answer_mask)
        if cons_weight > 0:
            loss_cons = consistency_loss(ans, alpha, span)  # L_cons = Σ_{i<j∈I_q} α_i α_j JSD(P_i ‖ P_j)
            loss = loss + cons_weight * loss_cons  # L = L_SFT + λ L_cons
            parts["cons"] = loss_cons.item()
        if mcc_weight > 0:
            loss_mcc = mcc_kl(ans, selected, span)  # MCC-KD: uniform pairs, bidirectional KL
            loss = loss + mcc_weight * loss_mcc
            parts["mcc"] = loss_mcc.item()
    return Objective(loss, seq_losses.detach(), parts, tokens, padded)


def observe_unselected(model, tokenizer, seqs: list[list], sel: tuple, run, unselected: torch.Tensor,
                       compute: Compute) -> tuple[torch.Tensor, int, int]:
    """ℓ[B,K] of the selected rationales (from `run`, with their gradients) and of the unselected ones, run now under
    no_grad: the EMA wants them, the student must get no gradient from them. -> (ℓ, real tokens, padded tokens)"""
    seq_losses = torch.zeros(unselected.shape, device=run.losses.device).index_put(sel, run.losses)
    tokens, padded = run.tokens, run.padded
    if distributed.any_rank(unselected.any()):  # torchrun: every rank runs it, or none does
        un = unselected.nonzero(as_tuple=True)
        with torch.no_grad():
            r = run_student(model, tokenizer, [seqs[b][k] for b, k in zip(*(t.tolist() for t in un))], compute,
                            answers=False)
        seq_losses = seq_losses.index_put(un, r.losses)
        tokens, padded = tokens + r.tokens, padded + r.padded
    return seq_losses, tokens, padded


def chunked_objective(model, tokenizer, seqs: list[list], selected: torch.Tensor, alpha: torch.Tensor,
                      unselected: torch.Tensor, compute: Compute, cons_weight: float, mcc_weight: float,
                      scale: float) -> Objective:
    """student_objective with the backward run per chunk (--backward-per-chunk; ours, an implementation choice with
    the same gradient). The pairwise terms couple a question's rationales across chunks, but
    ∂/∂x_i Σ_{i<j} w_ij D(x_i, x_j) = ∂/∂x_i Σ_{j≠i} w_ij D(x_i, sg x_j) for a symmetric D, so a no-grad pre-pass
    gives every rationale's answer-span logits (the partners sg x_j), and each chunk backpropagates its own share."""
    B, _ = selected.shape
    sel = selected.nonzero(as_tuple=True)
    sel_seqs = [seqs[b][k] for b, k in zip(*(t.tolist() for t in sel))]
    answers = cons_weight > 0 or mcc_weight > 0
    parts, partners = {}, None
    if answers:  # the pre-pass: one more forward of the selected rationales, without a graph
        with torch.no_grad():
            pre = run_student(model, tokenizer, sel_seqs, compute, answers=True)
        partners = torch.zeros(*selected.shape, *pre.answer_logits.shape[1:], device=alpha.device).index_put(
            sel, pre.answer_logits)
        span = torch.zeros(*selected.shape, pre.answer_mask.size(1), dtype=torch.bool,
                           device=alpha.device).index_put(sel, pre.answer_mask)
        del pre

    pair_values = {"cons": 0.0, "mcc": 0.0}  # the chunks' shares of the pairwise terms add up to their values

    def backward_chunk(idx: list[int], ce: torch.Tensor, al: torch.Tensor | None) -> None:
        i = torch.tensor(idx, device=alpha.device)
        rows = (sel[0][i], sel[1][i])
        share = (alpha[rows] * ce).sum() / B  # these rows' terms of L_SFT = mean_b Σ_k α_k ℓ_k
        if cons_weight > 0:
            part = consistency_loss_partial(al, rows, partners, alpha, span)
            share, pair_values["cons"] = share + cons_weight * part, pair_values["cons"] + part.item()
        if mcc_weight > 0:
            part = mcc_kl_partial(al, rows, partners, selected, span)
            share, pair_values["mcc"] = share + mcc_weight * part, pair_values["mcc"] + part.item()
        (scale * share).backward()

    run = run_student(model, tokenizer, sel_seqs, compute, answers=answers, on_chunk=backward_chunk)
    seq_losses, tokens, padded = observe_unselected(model, tokenizer, seqs, sel, run, unselected, compute)
    loss = weighted_sft(seq_losses, alpha).item()  # the values, for the log: the gradients are already in .grad
    parts["sft"] = loss
    for name, weight in (("cons", cons_weight), ("mcc", mcc_weight)):
        if weight > 0:
            parts[name] = pair_values[name]
            loss += weight * pair_values[name]
    return Objective(torch.tensor(loss), seq_losses.detach(), parts, tokens, padded)


@dataclass
class Loop:
    """What the joint stage works with, built once by main()."""
    model: torch.nn.Module
    tokenizer: object
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    seqs: list  # seqs[q][k]: Encoded or None
    qids: list[str]
    mask: torch.Tensor  # [Q,K] on the device: the rationales trained on
    mind: Mind  # selection, α, the inertia calibrator and the meta loss (uniform α without a MetaNet)
    features: torch.Tensor | None  # e[Q,K,d] on the device, for the MetaNet
    meta_opt: torch.optim.Optimizer | None
    compute: Compute
    tokens: int = 0
    padded: int = 0


@dataclass(frozen=True)
class StepConfig:
    cons_weight: float = 0.0  # λ; 0 unless the method has the JS term
    mcc_weight: float = 0.0
    probe_every: int = 0  # run the unselected rationales for the EMA every N steps (0: never)
    meta_accum: int = 4  # the MetaNet steps once every N optimiser steps
    max_grad_norm: float = 1.0
    backward_per_chunk: bool = False  # backward inside student_objective, one chunk at a time
    beta: tuple[float, float, int] | None = None  # (β at step 0, β at the last step, steps): the curriculum; None: fixed


def scheduled_beta(step: int, beta: tuple[float, float, int]) -> float:
    """β_t = β_0 (β_T / β_0)^(t / (T−1)): the selection threshold τ·ln(1/β_t) in nats grows linearly (ours)."""
    b0, b1, total = beta
    return b0 * (b1 / b0) ** (step / max(1, total - 1))


def sig(x: float) -> float:
    """7 significant digits: a readable log that still resolves tiny terms such as an early JSD."""
    return float(f"{x:.7g}")


def train_step(loop: Loop, cfg: StepConfig, step: int, micro_batches: list[list[int]],
               timer: dict | None = None) -> dict:
    """One optimiser step of the joint stage over len(micro_batches) micro-steps. -> its log row.
    timer: if given, seconds spent per phase are added to it (scripts/bench.py)."""
    clock, t = time.perf_counter, time.perf_counter()
    phase = {} if timer is None else timer

    def lap(name: str) -> None:
        nonlocal t
        now = clock()
        phase[name] = phase.get(name, 0.0) + now - t
        t = now

    n = len(micro_batches)
    stats = dict.fromkeys(("loss", "sft", "cons", "mcc", "meta", "sel", "alpha_entropy"), 0.0)
    seen = []  # (questions, ℓ, observed, scores, mask) of each micro-step: the EMA and the meta loss see them all
    alpha_sum, alpha_n, sel_sum = torch.zeros(K), torch.zeros(K), torch.zeros(K)
    beta = None if cfg.beta is None else scheduled_beta(step, cfg.beta)
    for qs in micro_batches:
        mask = loop.mask[qs]
        mine = distributed.rows(len(qs))  # torchrun: this process's questions (all of them without torchrun)
        # who is trained on, with what weight: I_q = {k : p_k ≥ β max p}, α = π_τs(s) on I_q (uniform, no MetaNet)
        scores, selected, alpha = loop.mind.plan(None if loop.features is None else loop.features[qs], mask, beta)
        probe_now = cfg.probe_every and step % cfg.probe_every == 0
        unselected = mask & ~selected if probe_now else torch.zeros_like(mask)
        lap("plan")
        w = distributed.loss_weight(len(qs))  # torchrun: its share of the micro-step's mean (1.0 without)
        obj = student_objective(loop.model, loop.tokenizer, [loop.seqs[q] for q in qs[mine]], selected[mine],
                                alpha[mine], unselected[mine], loop.compute, cfg.cons_weight, cfg.mcc_weight,
                                backward_scale=w / n if cfg.backward_per_chunk else None)
        lap("forward")
        if not cfg.backward_per_chunk:
            (obj.loss * w / n).backward()
        lap("backward")
        obj = distributed.whole_batch(obj, len(qs))  # torchrun: ℓ[B,K] and the log values of all B questions
        loop.tokens, loop.padded = loop.tokens + obj.tokens, loop.padded + obj.padded
        seen.append((qs, obj.seq_losses, selected | unselected, scores, mask))
        for name in ("sft", "cons", "mcc"):
            stats[name] += obj.parts.get(name, 0.0) / n
        stats["loss"] += obj.loss.item() / n
        stats["sel"] += selected.sum(1).float().mean().item() / n  # mean |I_q|
        stats["alpha_entropy"] += -(alpha * alpha.clamp(min=1e-12).log()).sum(1).mean().item() / n
        alpha_sum += alpha.detach().cpu().sum(0)
        sel_sum += selected.cpu().sum(0)
        alpha_n += mask.cpu().sum(0)
    # once per optimiser step: the EMA (c_k, L̃) sees what was observed, then the MetaNet chases π_τ(−L̃)
    qs = [q for s in seen for q in s[0]]
    losses, observed, mask = (torch.cat([s[i] for s in seen]) for i in (1, 2, 4))
    scores = torch.cat([s[3] for s in seen]) if seen[0][3] is not None else None
    _, loss_meta = loop.mind.observe([loop.qids[q] for q in qs], losses, observed, scores, mask)
    if loss_meta is not None:
        (loss_meta / cfg.meta_accum).backward()  # accumulated over --meta-accum steps: the MetaNet's inertia
        stats["meta"] = loss_meta.item()
    lap("observe")
    params = [p for p in loop.model.parameters() if p.requires_grad]
    grad_norm = distributed.grad_norm_value(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)) \
        if cfg.max_grad_norm > 0 else float("nan")
    distributed.drop_gathered(loop.model)  # torchrun, FSDP2: no gathered copy of old weights outlives the step
    loop.opt.step()
    loop.sched.step()
    loop.opt.zero_grad(set_to_none=True)
    if loop.meta_opt is not None and (step + 1) % cfg.meta_accum == 0:
        distributed.average_grads(loop.mind.metanet)  # torchrun: equal on every rank already; kept equal whatever
        loop.meta_opt.step()
        loop.meta_opt.zero_grad(set_to_none=True)
    lap("optimizer")
    ell = torch.where(observed, losses, 0.0).cpu().sum(0)
    ell_n = observed.cpu().sum(0)
    return {"step": step + 1, "lr": loop.sched.get_last_lr()[0], **{k: sig(v) for k, v in stats.items()},
            "grad_norm": sig(grad_norm), "c": [sig(x) for x in loop.mind.calibrator.c.tolist()],
            "alpha": [sig(x) for x in (alpha_sum / alpha_n.clamp(min=1)).tolist()],
            "sel_k": [sig(x) for x in (sel_sum / alpha_n.clamp(min=1)).tolist()],  # how often k ∈ I_q
            "loss_k": [sig(s / c) if c else None for s, c in zip(ell.tolist(), ell_n.tolist())],
            "tokens": loop.tokens, **({} if beta is None else {"beta": sig(beta)})}


# -----------------------------------------------------------------------------
# Data order and checkpoints of the joint stage


@dataclass
class Order:
    """The data order: one permutation per epoch that depends only on (seed, epoch), so a resumed run continues it."""
    n: int
    seed: int
    epoch: int = 0
    pos: int = 0
    _perm: tuple = field(default=(None, None), init=False, repr=False)  # (epoch, its permutation)

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
            out.append(self.permutation()[self.pos])
            self.pos += 1
        return out

    def permutation(self) -> list[int]:
        if self._perm[0] != self.epoch:
            gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            self._perm = (self.epoch, torch.randperm(self.n, generator=gen).tolist())
        return self._perm[1]


def trainer_state(loop: Loop, order: Order, step: int, args: dict, train_time: float) -> dict:
    metanet = loop.mind.metanet
    return {"step": step, "epoch": order.epoch, "pos": order.pos, "args": args,
            "optimizer": distributed.optimizer_state_dict(loop.model, loop.opt),  # torchrun: whatever N
            "scheduler": loop.sched.state_dict(), "calibrator": loop.mind.calibrator.state_dict(),
            "metanet": metanet.state_dict() if metanet else None,
            "meta_optimizer": loop.meta_opt.state_dict() if loop.meta_opt else None,
            # the MetaNet accumulates gradients over --meta-accum steps: a checkpoint can fall in between
            "meta_grads": [p.grad for p in metanet.parameters()] if metanet else None, "rng": rng_state(),
            "tokens": loop.tokens, "padded_tokens": loop.padded, "train_time": train_time}


def restore(loop: Loop, order: Order, state: dict, device: str) -> float:
    """The joint stage's state from a checkpoint (on any device: tensors were loaded on the CPU). -> train time."""
    distributed.load_optimizer_state_dict(loop.model, loop.opt, state["optimizer"])  # to the parameters' device
    loop.sched.load_state_dict(state["scheduler"])
    loop.mind.calibrator.load_state_dict(state["calibrator"])
    if loop.mind.metanet is not None:
        loop.mind.metanet.load_state_dict(state["metanet"])
        loop.meta_opt.load_state_dict(state["meta_optimizer"])
        for p, g in zip(loop.mind.metanet.parameters(), state["meta_grads"]):
            p.grad = None if g is None else g.to(device)
    order.epoch, order.pos = state["epoch"], state["pos"]
    loop.tokens, loop.padded = state["tokens"], state["padded_tokens"]
    set_rng_state(state["rng"])
    return state["train_time"]


def run_eval(model, tokenizer, evals: dict, splits: list[str], limit: int | None, max_new_tokens: int,
             batch_size: int, progress: bool) -> dict:
    return {name: distributed.evaluate(model, tokenizer, evals[name][:limit] if limit else evals[name],  # torchrun: split
                                       max_new_tokens, batch_size, progress, desc=f"eval {name}")
            for name in splits if name in evals}


# -----------------------------------------------------------------------------
# The run


def describe_run(args, model, seqs: list, mask: torch.Tensor) -> None:
    """Say what the run will do before it starts, with the memory plan's peak for a pretrained student: a user whose
    GPU is too small learns it now, with the flag that brings the plan under, not after the first step's OOM."""
    n = mask.sum(1).float()
    tokens = [len(s.input_ids) for row in seqs for s in row if s]
    per_step = sum(tokens) / len(seqs) * args.batch_size * args.grad_accum
    epochs = args.steps * args.batch_size * args.grad_accum / len(seqs)
    print(f"run: {len(seqs)} questions, {int(n.sum())} rationales ({n.mean():.1f} per question), {args.steps} steps "
          f"= {epochs:.2f} epochs, ~{per_step:,.0f} tokens per step (mean {sum(tokens) / len(tokens):.0f} per sequence, "
          f"--max-len {args.max_len})")
    if args.student != "tiny":
        from scripts.plan_memory import advise
        gib = torch.cuda.get_device_properties(args.device).total_memory / 2 ** 30 \
            if args.device.startswith("cuda") else None
        print("\n".join(advise(model.config, args, gib)))


def evaluate_base(model, tokenizer, tasks: list[str], args, resuming: bool) -> dict | None:
    """The initial student on the benchmarks, once: OUT/eval_base/ (its generations are reused by a rerun, and by
    scripts/paper.py across methods). A resumed run's weights have moved on, so it only reads a finished one."""
    out = os.path.join(args.out, "eval_base")
    names = [task_name(t) for t in tasks]
    if resuming:
        done = json.load(open(os.path.join(out, "results.json"))) if os.path.exists(os.path.join(out, "results.json")) \
            else {}
        if all(n in done for n in names):
            return {n: done[n] for n in names}
        print(f"note: {out} has no finished base evaluation: results.md gets no base row")
        return None
    results = evaluate_tasks(model, tokenizer, tasks, args.eval_data_dir, args.gpqa_csv, args.eval_tasks_limit,
                             args.max_new_tokens, args.eval_batch_size, out, not args.no_progress, resume=True,
                             model_name=f"base {args.student} {args.precision}")
    for n, m in results.items():
        print(f"base {n}: accuracy {m['accuracy']:.3f} (strict {m['strict_accuracy']:.3f}) on {m['n']} questions")
    return results


def stages_1_and_2(model, tokenizer, train: list, seqs: list, mask: torch.Tensor, mind: Mind, compute: Compute,
                   method: Method, args, resuming: bool):
    """Stage 1, the probe (ℓ⁰ seeds the calibrator; the MetaNet's features), cached in OUT/probe.pt; stage 2, the
    MetaNet's warm-up. -> (features on the device or None, MetaNet or None, its joint-stage optimiser or None)"""
    features = l0 = None
    probe_path = os.path.join(args.out, "probe.pt")
    if method.probe and resuming and os.path.exists(probe_path):
        features, l0 = (torch.load(probe_path)[k] for k in ("features", "l0"))
    elif method.probe:
        t0 = time.time()
        l0, features = probe(model, tokenizer, seqs, mask, compute, method.metanet and args.ta_encoder == "student",
                             progress=not args.no_progress)
        print(f"probe: {int(mask.sum())} rationales in {time.time() - t0:.1f}s")
        if method.metanet and args.ta_encoder != "student":
            features = sentence_features(args.ta_encoder, train, mask, args.device, not args.no_progress)
        if distributed.is_main():  # torchrun
            atomic_torch_save({"features": features, "l0": l0, "ids": [ex.id for ex in train]}, probe_path)
        mind.calibrator.update([ex.id for ex in train], l0, mask)  # the probe: the first observation of every (q, k)
    if not method.metanet:
        return None, None, None
    metanet = MetaNet(features.size(-1), K, args.meta_hidden, args.meta_attn_heads, args.meta_score_heads,
                      attention=not args.no_attention, dropout=args.meta_dropout).to(args.device)
    features = features.to(args.device)
    meta_opt = warmup_metanet(metanet, features, mind.target(l0), mask, 0 if resuming else args.meta_warmup_epochs,
                              args.meta_warmup_lr, args.meta_batch_size, args.meta_tau, args.seed)
    if not resuming and distributed.is_main():  # the MetaNet as the joint stage starts, to compare its scores
        atomic_torch_save(metanet.state_dict(), os.path.join(args.out, "metanet_start.pt"))
    for group in meta_opt.param_groups:
        group["lr"] = args.meta_lr  # the joint stage: 10x slower, the MetaNet's own inertia
    return features, metanet, meta_opt


def final_evaluation(model, tokenizer, tasks: list[str], args, evaluate_now, base: dict | None) -> dict:
    """The test splits of the data (id, ood) and the --eval-tasks benchmarks (generations in OUT/eval/), with the
    paper's table of the initial student against the trained one in OUT/results.md and results.json."""
    t0 = time.time()
    results = evaluate_now(["id", "ood"], None)
    if tasks:
        trained = evaluate_tasks(model, tokenizer, tasks, args.eval_data_dir, args.gpqa_csv, args.eval_tasks_limit,
                                 args.max_new_tokens, args.eval_batch_size, os.path.join(args.out, "eval"),
                                 not args.no_progress)
        results.update(trained)
        skipped = {} if "gpqa_diamond" in tasks else {"gpqa_diamond": f"no --gpqa-csv given. {GPQA_HELP}"}
        write_results(args.out, {**({"base": base} if base else {}), "trained": trained}, skipped)
        print(open(os.path.join(args.out, "results.md")).read())
    print(f"final evaluation took {time.time() - t0:.1f}s")
    for name, m in results.items():
        print(f"eval {name}: accuracy {m['accuracy']:.3f} (strict {m['strict_accuracy']:.3f}) on {m['n']} questions")
    return results


def main(argv=None, on_step=None):
    """on_step(loop, step): called after every optimiser step (scripts/track_loss.py measures the EMA with it)."""
    distributed.init()  # torchrun: join the process group; else nothing
    ap = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, state = parse(ap, argv)
    args.no_progress = args.no_progress or not distributed.is_main()  # torchrun: rank 0's bars only
    if args.dry_run:
        from scripts.plan_memory import dry_run
        return dry_run(args)
    if args.data is None and args.student != "tiny":
        args.data = PAPER_DATA  # a pretrained student runs the paper's experiment by default
    device_flags = {k: getattr(args, k) for k in DEVICE_FLAGS}  # as given: resolved again on resume
    os.makedirs(args.out, exist_ok=True)
    train, evals = load_data(args.data, args.eval_id, args.eval_ood, args.synthetic_n, args.synthetic_n_test, args.seed)
    tasks = eval_tasks(args.eval_tasks, args.student, args.gpqa_csv)
    for t in tasks:  # a missing benchmark file fails now, not after hours of training
        task_path(t, args.eval_data_dir, args.gpqa_csv)
    resolve_defaults(args, len(train))
    saved_args = {**vars(args), **device_flags, "resume": None, "fsdp": False}  # the flags trainer.pt keeps
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    method = resolve_method(args.method, args.no_metanet)
    train, args.perspective, mask = training_rows(train, method.single, args.perspective, args.data)
    spec = StudentSpec(**{f: getattr(args, f) for f in StudentSpec.__dataclass_fields__ if f != "name"},
                       name=args.student)
    model, tokenizer = load_student(spec, train, args.device, resume_ckpt=state and state["dir"])
    if args.pretrain_steps and state is None:  # stage 0 (the synthetic world only): able, unevenly, before the probe
        corpus = pretrain_corpus(args.pretrain_steps * args.batch_size, args.seed, evals["id"] + evals["ood"])
        stage_0(model, tokenizer, corpus, args.pretrain_perspectives.split(","), args.pretrain_steps,
                args.batch_size, args.pretrain_lr, args.max_len, Compute(args.device, args.max_batch_tokens, args.precision),
                args.seed, args.pretrain_cache, not args.no_progress)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"student: {args.student} ({n_params / 1e6:.2f}M parameters), {len(train)} training questions, "
          f"method {args.method}, device {args.device}")
    seqs = encode_all(tokenizer, train, mask, args.max_len, args.data)
    if args.max_new_tokens is None:
        longest = max(len(s.input_ids) - s.prompt_len for row in seqs for s in row if s)
        args.max_new_tokens = min(512, int(1.5 * longest) + 8)
    compute = Compute(args.device, args.max_batch_tokens, args.precision, even_chunks=distributed.world() > 1)
    describe_run(args, model, seqs, mask)
    base = evaluate_base(model, tokenizer, tasks, args, resuming=state is not None) if tasks else None
    qids = [ex.id for ex in train]
    calibrator = InertiaCalibrator(K, args.inertia, args.inertia_rule)

    mind = Mind(None, calibrator, args.select_beta, args.meta_tau, args.student_tau, args.min_selected,
                args.trend_weight, args.select_tau)
    features, mind.metanet, meta_opt = stages_1_and_2(model, tokenizer, train, seqs, mask, mind, compute, method, args,
                                                      resuming=state is not None)

    # ---- stage 3: joint training
    model = distributed.wrap(model, args.fsdp)  # torchrun: DDP or FSDP2; else the model itself
    opt = make_optimizer(model, args.lr, args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, args.warmup_steps, args.steps, args.min_lr_ratio))
    loop = Loop(model, tokenizer, opt, sched, seqs, qids, mask.to(args.device),
                mind, features, meta_opt, compute)
    cfg = StepConfig(args.cons_weight if method.consistency else 0.0, args.mcc_weight if method.mcc else 0.0,
                     args.probe_every if method.metanet else 0, args.meta_accum, args.max_grad_norm,
                     args.backward_per_chunk,
                     (args.select_beta, args.select_beta_end, args.steps)
                     if method.metanet and 0 < args.select_beta_end < args.select_beta else None)
    order, step, train_time = Order(len(train), args.seed), 0, 0.0
    if state:
        train_time, step = restore(loop, order, state, args.device), state["step"]
    evaluate_now = lambda splits, limit: run_eval(model, tokenizer, evals, splits, limit, args.max_new_tokens,
                                                  args.eval_batch_size, not args.no_progress)
    train_time = joint_stage(loop, cfg, order, step, train_time, args, saved_args, evaluate_now, on_step)

    # ---- final evaluation
    results = final_evaluation(model, tokenizer, tasks, args, evaluate_now, base)
    metrics = {"eval": results, "config": vars(args), "steps": args.steps, "tokens": loop.tokens,
               "tokens_per_s": loop.tokens / max(train_time, 1e-9), "padding_ratio": loop.padded / max(loop.tokens, 1),
               "train_time_s": train_time, "parameters": n_params, "c": calibrator.c.tolist(),
               "perspectives": perspectives.KEYS}
    if distributed.is_main():  # torchrun
        write_json(os.path.join(args.out, "metrics.json"), metrics)
    print(f"wrote {os.path.join(args.out, 'metrics.json')}")
    if method.metanet and distributed.is_main():  # what the Teaching Assistant did: selection, α and c_k over training
        from scripts.plots import plot_run, read_log
        print(f"wrote {plot_run(read_log(os.path.join(args.out, 'log.jsonl')), os.path.join(args.out, 'mind.png'))}")
    return metrics


def joint_stage(loop: Loop, cfg: StepConfig, order: Order, step: int, train_time: float, args, saved_args: dict,
                evaluate_now, on_step=None) -> float:
    """Stage 3 from `step` to --steps: train_step, the log line, periodic evaluation and checkpoints. -> train time."""
    log_path = os.path.join(args.out, "log.jsonl")
    if not distributed.is_main():  # torchrun: rank 0 alone writes the log
        log_path = os.devnull
    elif step:
        truncate_log(log_path, step)  # steps after the checkpoint are run again
    elif os.path.exists(log_path):
        os.remove(log_path)
    bar = tqdm(total=args.steps, initial=step, desc=f"train {args.method}", disable=args.no_progress)
    with open(log_path, "a") as log:
        while step < args.steps:
            t0 = time.time()
            row = train_step(loop, cfg, step, [order.take(args.batch_size) for _ in range(args.grad_accum)])
            step += 1
            train_time += time.time() - t0
            if on_step is not None:
                on_step(loop, step)
            if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                row["eval"] = {k: v["accuracy"] for k, v in evaluate_now(["id"], args.eval_limit).items()}
                bar.write(f"step {step}: eval {row['eval']}")
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", sel=f"{row['sel']:.1f}")
            if (args.save_every and step % args.save_every == 0) or step == args.steps:
                save_checkpoint(args.out, loop.model, loop.tokenizer,
                                trainer_state(loop, order, step, saved_args, train_time))
    bar.close()
    return train_time


if __name__ == "__main__":
    main()
    distributed.close()
