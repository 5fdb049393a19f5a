"""
Speed-up of batched greedy generation over one question at a time, both measured in the same run.

    python scripts/bench_generation.py                                   # a tiny random Qwen2, 64 GSM8K prompts
    python scripts/bench_generation.py --model out/ckpt --batch-size 32 --max-new-tokens 128
    python scripts/bench_generation.py --model Qwen/Qwen2.5-1.5B-Instruct --device cuda --n 128

Both passes run eval.generate (the function eval.py evaluates with) on the same prompts of a benchmark, in the
chat format of the student. It prints wall time and generated tokens per second of each pass, the speed-up, and
how many outputs are identical: greedy decoding must not depend on the batch, so a mismatch is a bug (on a GPU in
half precision a few can differ through rounding).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as ev  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_random_student(texts: list[str], vocab: int, hidden: int, layers: int, seed: int):
    """A randomly initialised Qwen2 and a byte-level BPE trained on the prompts: the shape of train.py's tiny
    student, so the benchmark needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        model_input_names=["input_ids", "attention_mask"])
    tokenizer.chat_template = CHATML
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 16),
                      num_key_value_heads=max(1, hidden // 16), max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).eval(), tokenizer


def timed(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> tuple[float, list[str]]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = ev.generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress=True, desc=f"batch {batch_size}")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model")
    g.add_argument("--model", default=None, help="checkpoint or Hugging Face name (default: a tiny random Qwen2)")
    g.add_argument("--device", default="cpu", help="torch device")
    g.add_argument("--tiny-hidden", type=int, default=64, help="hidden size of the tiny random model")
    g.add_argument("--tiny-layers", type=int, default=2, help="layers of the tiny random model")
    g.add_argument("--tiny-vocab", type=int, default=512, help="BPE vocabulary of the tiny random model")
    g = ap.add_argument_group("workload")
    g.add_argument("--task", default="gsm8k", choices=[t for t in ev.TASKS if ev.TASKS[t].file],
                   help="benchmark whose questions are the prompts")
    g.add_argument("--n", type=int, default=64, help="prompts (the first N questions of the task)")
    g.add_argument("--batch-size", type=int, default=32, help="batch size of the batched pass")
    g.add_argument("--max-new-tokens", type=int, default=64, help="generation budget per prompt")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps the measurement quiet)")
    g.add_argument("--seed", type=int, default=0, help="seed of the tiny random model")
    a = ap.parse_args(argv)
    for name in ("n", "batch_size", "max_new_tokens", "threads"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(a, name)}: must be >= 1")
    torch.set_num_threads(a.threads)

    rows = ev.load_task(a.task)[:a.n]
    if a.model:
        model, tokenizer = ev.load_model(a.model, a.device)
        name = a.model
    else:
        model, tokenizer = tiny_random_student([ev.user_message(r["question"], r["kind"]) for r in ev.load_task(a.task)],
                                               a.tiny_vocab, a.tiny_hidden, a.tiny_layers, a.seed)
        model = model.to(a.device)
        name = f"tiny random Qwen2 (hidden {a.tiny_hidden}, {a.tiny_layers} layers)"
    prompts = [ev.chat_prompt(tokenizer, r["question"], r["kind"]) for r in rows]
    ev.generate(model, tokenizer, prompts[:2], 4, 2, progress=False)  # warm-up: one-time allocations, lazy imports

    t1, out1 = timed(model, tokenizer, prompts, a.max_new_tokens, 1)
    tb, outb = timed(model, tokenizer, prompts, a.max_new_tokens, a.batch_size)
    tokens = sum(len(ev._ids(tokenizer, o)) for o in out1)
    same = sum(x == y for x, y in zip(out1, outb))
    print(f"model: {name}; {len(prompts)} {a.task} prompts, max {a.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} thread(s), {a.device}")
    print(f"batch size 1:  {t1:8.2f} s  {tokens / t1:9.1f} tokens/s")
    print(f"batch size {a.batch_size}: {tb:8.2f} s  {tokens / tb:9.1f} tokens/s")
    print(f"speed-up of batched over batch-size-1 generation: {t1 / tb:.1f}x")
    print(f"identical outputs: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
