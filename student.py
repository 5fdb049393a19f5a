"""
The student and the machinery that runs it, kept out of train.py so that file reads as the algorithm.

  - building the tiny student (a small Qwen2 with a BPE tokenizer trained on the data) or loading a pretrained
    one (a Hugging Face name or directory, or one .gguf file);
  - precision (fp32 / bf16-mixed) and the attention kernel;
  - LoRA, with the adapters merged into plain weights on save;
  - the teacher-forced forward over many sequences in length-sorted chunks (run_student);
  - the optimiser, the learning-rate schedule, and atomic, resumable checkpoints.
"""
import json
import math
import os
import random
import shutil
from dataclasses import dataclass

import numpy as np
import torch

import distributed
from eval import Encoded, collate, load_tokenizer, resolve_model_name, user_message
from losses import answer_logits_from_hidden, hidden_ce, sequence_ce
from metanet import mean_pool

PRECISIONS = ("auto", "fp32", "bf16-mixed")


@dataclass(frozen=True)
class StudentSpec:
    """What to build or load. name: 'tiny', a Hugging Face name, a local directory, or a .gguf file."""
    name: str = "tiny"
    attn: str = "sdpa"
    precision: str = "fp32"  # resolved: fp32 or bf16-mixed
    grad_checkpointing: bool = False
    lora_r: int = 0  # 0: full fine-tuning
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    tiny_hidden: int = 128
    tiny_layers: int = 4
    tiny_heads: int = 4
    tiny_vocab: int = 1024
    max_len: int = 1024
    seed: int = 0


# -----------------------------------------------------------------------------
# The tiny student

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen2's own pre-tokenisation (transformers' Qwen2Tokenizer): every digit is its own token, so the student does
# arithmetic digit by digit. It must be exactly Qwen2's: AutoTokenizer.from_pretrained(ckpt) rebuilds a qwen2
# model's tokenizer with this regex whatever tokenizer.json says, and any other rule would give other ids.
QWEN2_PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                     r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def train_tiny_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on the data, with Qwen2's normaliser and pre-tokeniser (see QWEN2_PRETOKENIZE)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_input_names=["input_ids", "attention_mask"])
    fast.chat_template = CHATML
    return fast


def build_tiny_student(examples, hidden: int, layers: int, heads: int, vocab: int, max_len: int, seed: int):
    """A small Qwen2 from random initialisation (seeded) and a tokenizer trained on `examples` (perspectives.Example)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    # the texts as the student will see them (role names included), so frequent pieces become single tokens
    texts = [f"user\n{user_message(ex.question)}\nassistant\n" for ex in examples]
    texts += [r for ex in examples for r in ex.rationales.values()]
    tokenizer = train_tiny_tokenizer(texts, vocab)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_len, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg), tokenizer


# -----------------------------------------------------------------------------
# A pretrained student, and loading either kind


def load_pretrained(name: str, attn: str, dtype: torch.dtype):
    """A Hugging Face causal LM and its tokenizer from a hub name, a local directory, or one .gguf file (llama.cpp
    format, dequantised by transformers; needs the gguf and accelerate packages)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kw = {"dtype": dtype, "attn_implementation": attn}
    if name.endswith(".gguf"):
        import importlib.util
        if not os.path.isfile(name):
            raise SystemExit(f"error: --student {name}: no such file")
        missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
        if missing:
            raise SystemExit(f"error: --student {name}: reading GGUF needs the {' and '.join(missing)} "
                             f"package{'s' if len(missing) > 1 else ''} (pip install {' '.join(missing)})")
        from transformers import GgufConfig
        kw["gguf_file"] = os.path.basename(name)
        # unpacked to dense weights at load time: they are trained, and a dense model saves with save_pretrained
        kw["quantization_config"] = GgufConfig(gguf_file=kw["gguf_file"], dequantize=True)
        name = os.path.dirname(os.path.abspath(name))
        tokenizer = AutoTokenizer.from_pretrained(name, gguf_file=kw["gguf_file"])
    else:
        tokenizer = load_tokenizer(name)
    return AutoModelForCausalLM.from_pretrained(name, **kw), tokenizer


def load_student(spec: StudentSpec, examples, device: str, resume_ckpt: str | None = None):
    """The tiny student or a pretrained one, on `device` in train mode. Trained weights are fp32 (the master copy;
    bf16 autocast in the forward under bf16-mixed); a LoRA base under bf16-mixed is stored in bf16: it is frozen,
    so it needs no master copy. resume_ckpt: a checkpoint to resume from. With LoRA it holds merged weights, so the
    base comes from spec.name again and the adapters from its trainer.pt."""
    base_path = None if spec.lora_r else resume_ckpt
    if base_path is None and spec.name == "tiny":
        model, tokenizer = build_tiny_student(examples, spec.tiny_hidden, spec.tiny_layers, spec.tiny_heads,
                                              spec.tiny_vocab, spec.max_len, spec.seed)
    else:
        name = base_path or resolve_model_name(spec.name)
        dtype = torch.bfloat16 if spec.lora_r and spec.precision == "bf16-mixed" else torch.float32
        try:
            model, tokenizer = load_pretrained(name, spec.attn, dtype)
        except OSError as e:
            raise SystemExit(f"error: --student {spec.name}: cannot load {name!r} ({e}); with HF_HUB_OFFLINE=1 it "
                             f"must be a local directory or already in the Hugging Face cache")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.grad_checkpointing:
        model.activation_checkpointing_enable()  # transformers 5: the old name is deprecated
        model.config.use_cache = False
    if model.config._attn_implementation != spec.attn:  # the tiny student is built with transformers' default
        model.set_attn_implementation(spec.attn)
    if spec.lora_r:
        add_lora(model, spec, resume_ckpt)
    return model.to(device).train(), tokenizer


# -----------------------------------------------------------------------------
# Precision


def resolve_precision(precision: str, device: str) -> str:
    """auto -> bf16-mixed on CUDA (fp32 master weights, forward under bf16 autocast), fp32 elsewhere."""
    if precision == "auto":
        return "bf16-mixed" if str(device).startswith("cuda") else "fp32"
    return precision


def autocast(device: str, precision: str):
    """The forward's autocast context: bf16 under bf16-mixed, disabled under fp32."""
    on = resolve_precision(precision, device) == "bf16-mixed"
    return torch.autocast(str(device).split(":")[0], dtype=torch.bfloat16, enabled=on)


# -----------------------------------------------------------------------------
# LoRA, merged into plain weights on save

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


def add_lora(model, spec: StudentSpec, resume_ckpt: str | None = None) -> None:
    """LoRA on the student (base frozen, in bf16 under bf16-mixed; adapters fp32); with resume_ckpt, the adapters
    saved in its trainer.pt."""
    if spec.precision == "bf16-mixed":
        model.to(torch.bfloat16)
    n = apply_lora(model, spec.lora_r, spec.lora_alpha, spec.lora_dropout)
    if resume_ckpt:
        saved = torch.load(os.path.join(resume_ckpt, "trainer.pt"), weights_only=False, map_location="cpu")["lora"]
        if saved["base"] != base_fingerprint(model):
            raise SystemExit(f"error: --resume: --student {spec.name} is not the base model the LoRA adapters in "
                             f"{resume_ckpt} were trained on")
        missing = set(lora_state(model)["adapters"]) ^ set(saved["adapters"])
        if missing:
            raise SystemExit(f"error: --resume: {resume_ckpt}: LoRA adapters do not match the model ({sorted(missing)[:3]})")
        model.load_state_dict(saved["adapters"], strict=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"LoRA r={spec.lora_r} α={spec.lora_alpha:g} on {n} projections: {trainable / 1e6:.2f}M trainable "
          f"parameters of {total / 1e6:.1f}M")


# -----------------------------------------------------------------------------
# Running the student on many sequences at once


@dataclass(frozen=True)
class Compute:
    """Where and how the student runs: the device, padded tokens per forward, and the precision."""
    device: str = "cpu"
    max_batch_tokens: int = 2048
    precision: str = "fp32"
    # torchrun: DDP and FSDP2 communicate in every forward (FSDP2) and backward, so every rank runs as many chunks
    # as the busiest one (idle one-token chunks where it has fewer)
    even_chunks: bool = False


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


def split_head(model):
    """(decoder, LM head) when the logits are exactly head(decoder(x).last_hidden_state), as in Qwen2, Llama and
    Mistral; None for models whose head scales or caps the logits (Gemma2, Cohere, Granite), which keep the
    full-logits path."""
    cfg = model.config
    if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in ("final_logit_softcapping", "logit_scale",
                                                                 "logits_scaling")):
        return None
    head, decoder = model.get_output_embeddings(), model.get_decoder()
    return (decoder, head) if isinstance(head, torch.nn.Linear) and decoder is not None else None


def forward_chunk(model, batch: dict, precision: str, answers: bool, features: bool):
    """One chunk's ℓ[n], answer-span logits [n,A',V] (fp32) or None, pooled features [n,H] or None. The loss comes
    from the final hidden states in token chunks (losses.hidden_ce): no [tokens, V] logits of the chunk are kept
    (the fp32 log-probabilities over a 152k vocabulary were most of the 1.5B plan's activations)."""
    device = batch["input_ids"].device
    parts = split_head(distributed.bare(model))
    with autocast(str(device), precision):
        if parts is None:  # a head that is not a plain projection: the full logits (exact, but memory-hungry)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=features, use_cache=False)
            ce = sequence_ce(out.logits, batch["labels"])  # ℓ_k
            pos = batch["answer_pos"]  # logits at answer_start-1+a predict answer token a
            al = out.logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, out.logits.size(-1))).float() if answers \
                else None
            hidden = out.hidden_states[-1] if features else None
        else:
            decoder, head = parts
            if distributed.wrapped(model):  # torchrun: through the root's forward (DDP's and FSDP2's hooks), one logit
                hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                               output_hidden_states=True, logits_to_keep=1).hidden_states[-1]  # after the final norm
            else:
                hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state
            ce = hidden_ce(hidden, head.weight, batch["labels"], head.bias)  # ℓ_k = mean_t −log p(x_t+1 | x_≤t)
            al = answer_logits_from_hidden(hidden, head.weight, batch["answer_pos"], head.bias) if answers else None
    pooled = mean_pool(hidden.float(), batch["completion_mask"]) if features else None
    return ce, al, pooled


def run_student(model, tokenizer, seqs: list[Encoded], compute: Compute, answers: bool = True,
                features: bool = False, on_chunk=None) -> Run:
    """Teacher-forced forward over `seqs` in length-sorted chunks; gradients flow if enabled by the caller.
    on_chunk(idx, ℓ[n], answer logits [n,A,V] or None): called with each chunk's live tensors (idx: the chunk's
    positions in seqs), so the caller can run that chunk's backward at once; Run then holds detached values."""
    device = compute.device
    lengths = [len(s.input_ids) for s in seqs]
    A = max((s.answer_end - s.answer_start for s in seqs), default=0)
    losses, ans, feats = [None] * len(seqs), [None] * len(seqs), [None] * len(seqs)
    padded = 0
    chunks = length_chunks(lengths, compute.max_batch_tokens)
    idle = None
    if compute.even_chunks:
        for _ in range(distributed.max_over_ranks(len(chunks)) - len(chunks)):
            idle = idle_chunk(model, tokenizer, compute, idle, backward=on_chunk is not None)
    for idx in chunks:
        batch = {k: v.to(device) for k, v in collate([seqs[i] for i in idx], tokenizer).items()}
        padded += batch["input_ids"].numel()
        ce, al, pooled = forward_chunk(model, batch, compute.precision, answers, features)
        if answers:
            al = torch.nn.functional.pad(al, (0, 0, 0, A - al.size(1)))
        if on_chunk is not None:  # the chunk's backward runs now: its graph is freed before the next chunk
            on_chunk(idx, ce, al)
            ce, al = ce.detach(), None if al is None else al.detach()
        for r, i in enumerate(idx):
            losses[i] = ce[r]
            if answers:
                ans[i] = al[r]
            if features:
                feats[i] = pooled[r]
    if not seqs:  # a rank with nothing to run here ran idle chunks only
        return Run(torch.zeros(0, device=device), None, None, None, 0, 0)
    if idle is not None and on_chunk is None and torch.is_grad_enabled():
        losses[0] = losses[0] + idle  # + 0: the idle chunks' graphs join the caller's one backward
    amask = None
    if answers:
        amask = torch.zeros(len(seqs), A, dtype=torch.bool, device=device)
        for i, s in enumerate(seqs):
            amask[i, :s.answer_end - s.answer_start] = True
    return Run(torch.stack(losses), torch.stack(ans) if answers else None, amask,
               torch.stack(feats) if features else None, sum(lengths), padded)


def idle_chunk(model, tokenizer, compute: Compute, idle: torch.Tensor | None, backward: bool) -> torch.Tensor | None:
    """One forward of a single padding token whose output counts 0 (torchrun: a rank with fewer chunks than the
    busiest one runs these, so that every rank runs the same collectives). With backward, its backward runs now (the
    caller runs one backward per chunk); else, with gradients on, the zero is added to `idle` to join the caller's
    backward. -> the running sum of zeros, or None without gradients."""
    ids = torch.full((1, 1), tokenizer.pad_token_id, device=compute.device)
    with autocast(str(compute.device), compute.precision):
        zero = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float().sum() * 0.0
    if not torch.is_grad_enabled():
        return None
    if backward:
        zero.backward()
        return None
    return zero if idle is None else idle + zero


# -----------------------------------------------------------------------------
# Optimiser and learning-rate schedule


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, β = (0.9, 0.95); weight decay on matrices only (not on norms and biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


# -----------------------------------------------------------------------------
# Checkpoints: written to ckpt.tmp/, then swapped in; resume finds the newest complete one whenever a kill came

CKPT_DIRS = ("ckpt", "ckpt.tmp", "ckpt.old")
COMPLETE = "complete.json"  # written last into a checkpoint directory, removed first when one is deleted


def rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():  # a CUDA run resumed on a CPU-only machine keeps the CPU state
        torch.cuda.set_rng_state_all(s["cuda"])


def atomic_torch_save(obj, path: str) -> None:
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def _remove_checkpoint(path: str) -> None:
    """The marker goes first, so a directory half deleted by a kill never looks complete."""
    if os.path.exists(os.path.join(path, COMPLETE)):
        os.remove(os.path.join(path, COMPLETE))
    shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(out: str, model, tokenizer, trainer_state: dict) -> None:
    """OUT/ckpt/: the student (plain save_pretrained; LoRA merged) and tokenizer, trainer.pt (everything else to
    resume), complete.json. At every instant of this function one complete checkpoint is on disk.
    torchrun: every rank calls it (FSDP2 gathers the full state dict), rank 0 alone writes."""
    full = distributed.full_state_dict(model)
    model = distributed.bare(model)
    if not distributed.is_main():
        return
    final, tmp, old = (os.path.join(out, n) for n in CKPT_DIRS)
    _remove_checkpoint(tmp)
    if lora_modules(model):  # the export is plain W + (α/r)·B·A; trainer.pt keeps the adapters for --resume
        model.save_pretrained(tmp, state_dict=merged_state_dict(model))
        trainer_state = {**trainer_state, "lora": lora_state(model)}
    else:
        model.save_pretrained(tmp, state_dict=full)
    tokenizer.save_pretrained(tmp)
    torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
    with open(os.path.join(tmp, COMPLETE), "w") as f:
        json.dump({"step": trainer_state["step"]}, f)
    _remove_checkpoint(old)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)  # from here on the new checkpoint is the one --resume finds
    _remove_checkpoint(old)


def find_checkpoint(out: str) -> str | None:
    """The newest complete checkpoint among OUT/ckpt, ckpt.tmp and ckpt.old (a kill during save_checkpoint can leave
    the newest one in ckpt.tmp, or only ckpt.old), or None."""
    best, best_step = None, -1
    for name in CKPT_DIRS:
        marker = os.path.join(out, name, COMPLETE)
        if os.path.exists(marker):
            with open(marker) as f:
                step = json.load(f)["step"]
            if step > best_step:
                best, best_step = os.path.join(out, name), step
    return best


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
