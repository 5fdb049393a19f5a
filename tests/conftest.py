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
    import argparse

    import train
    a = argparse.Namespace(tiny_vocab=384, tiny_hidden=32, tiny_layers=2, tiny_heads=2, max_len=256, seed=0)
    model, tokenizer = train.build_tiny_student(a, synth["train"])
    return model.eval(), tokenizer
