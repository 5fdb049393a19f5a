"""Shared fixtures: everything offline and small, so the suite runs on a 2-core CPU."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import perspectives as P

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def synth():
    return P.synthetic_splits(64, 16, seed=0)


@pytest.fixture(scope="session")
def tiny(synth):
    """A tiny Qwen2 student and its BPE tokenizer, built exactly as `train.py --student tiny` does."""
    from student import build_tiny_student
    model, tokenizer = build_tiny_student(synth["train"], hidden=32, layers=2, heads=2, vocab=384, max_len=256, seed=0)
    return model.eval(), tokenizer


def fast_flags(*extra: str) -> list[str]:
    """A small, fast configuration of train.py's real CLI, then `extra` (later flags win). Flags that would have no
    effect with `extra` are left out: train.py refuses them (synthetic sizes with --data, MetaNet flags with a
    baseline, the periodic evaluation's size with --eval-every 0, tiny sizes with a pretrained student)."""
    extra = list(extra)
    method = extra[extra.index("--method") + 1] if "--method" in extra else "mind"
    flags = ["--batch-size", "3", "--max-new-tokens", "6", "--save-every", "0", "--no-progress"]
    if "--student" not in extra:
        flags += ["--tiny-hidden", "32", "--tiny-layers", "1", "--tiny-heads", "2", "--tiny-vocab", "300"]
    if "--data" not in extra:
        flags += ["--synthetic-n", "24", "--synthetic-n-test", "8"]
    if "--data" not in extra and "--student" not in extra and "--pretrain-steps" not in extra:
        flags += ["--pretrain-steps", "0"]  # stage 0 has its own tests (test_train.py); elsewhere it costs time
    if "--eval-every" not in extra:
        flags += ["--eval-every", "2", "--eval-limit", "4"]
    if method == "mind" and "--no-metanet" not in extra:
        flags += ["--meta-warmup-epochs", "1"]
    return flags + extra
