"""scripts/bench_trl.py: the rows TRL is fed equal encode_example's ids and prompt mask, our first-step loss equals a
hand computation, padding is counted as TRL's collator pads, argument errors are clean; with TRL installed, a tiny
end-to-end run whose first-step losses agree across the systems."""
import importlib.util
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import bench_trl  # noqa: E402

import eval as ev  # noqa: E402
import perspectives as P  # noqa: E402
import train  # noqa: E402

TINY = ["--data", "synthetic", "--hidden", "32", "--layers", "1", "--heads", "2", "--vocab", "300", "--max-len", "192",
        "--batch-size", "2", "--max-batch-tokens", "768"]


@pytest.fixture(scope="module")
def world(tiny, synth):
    model, tok = tiny
    data = synth["train"][:6]
    seqs = [[ev.encode_example(tok, ex.question, ex.rationales[k], ex.answer, max_len=192) if k in ex.rationales
             else None for k in P.KEYS] for ex in data]
    return model, tok, data, seqs


def test_rows_are_encode_examples_ids_and_prompt_mask(world):
    _, tok, data, seqs = world
    steps = [[0, 3], [5, 1]]
    rows = bench_trl.trl_rows(seqs, steps, sort=False)
    expect = [seqs[q][k] for qs in steps for q in qs for k in range(P.K) if seqs[q][k]]
    assert len(rows) == len(expect) == 2 * 2 * P.K
    for r, e in zip(rows, expect):
        assert r["input_ids"] == e.input_ids
        assert r["completion_mask"] == [0] * e.prompt_len + [1] * (len(e.input_ids) - e.prompt_len)
        # TRL's label rule (completion_mask -> labels, -100 elsewhere) gives eval.collate's labels
        labels = [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])]
        assert labels == ev.collate([e], tok)["labels"][0].tolist()
    # sorted: the same sequences of each step, by length, never across steps
    srt = bench_trl.trl_rows(seqs, steps, sort=True)
    n = 2 * P.K
    for i in range(len(steps)):
        part, orig = srt[i * n:(i + 1) * n], rows[i * n:(i + 1) * n]
        assert [len(r["input_ids"]) for r in part] == sorted(len(r["input_ids"]) for r in orig)
        assert sorted(map(tuple, (r["input_ids"] for r in part))) == sorted(map(tuple, (r["input_ids"] for r in orig)))


def test_padded_tokens_as_the_collator_pads():
    assert bench_trl.padded_tokens([3, 5, 2, 2], 2, False) == 2 * 5 + 2 * 2
    assert bench_trl.padded_tokens([3, 5, 2], 2, False) == 2 * 5 + 1 * 2  # a short last micro-batch
    assert bench_trl.padded_tokens([3, 5, 2, 2], 4, False) == 4 * 5
    assert bench_trl.padded_tokens([3, 5, 2, 2], 4, True) == 12  # padding-free: one flattened row


def test_hand_losses_are_the_two_definitions():
    torch.manual_seed(0)
    V = 7

    class Fixed(torch.nn.Module):  # a "model" whose logits are given
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, attention_mask):
            return type("O", (), {"logits": self.logits})()

    logits = torch.randn(2, 4, V)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 4, -100]])  # row 1: one labelled token, then padding
    ids = labels.clamp(min=0)
    seq, tok = bench_trl.hand_losses(Fixed(logits), {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                     "labels": labels})
    lp = torch.log_softmax(logits, -1)
    row0 = [-lp[0, 0, 1], -lp[0, 1, 2], -lp[0, 2, 3]]  # logits at t predict the label at t + 1
    row1 = [-lp[1, 1, 4]]
    assert seq == pytest.approx(((sum(row0) / 3 + row1[0]) / 2).item(), rel=1e-6)
    assert tok == pytest.approx((sum(row0 + row1) / 4).item(), rel=1e-6)


def test_our_first_step_loss_equals_the_hand_computation(world):
    model, tok, data, seqs = world
    a = bench_trl.build_parser().parse_args(TINY)
    mask_all = torch.tensor([[k in ex.rationales for k in P.KEYS] for ex in data])
    steps = [[0, 3], [5, 1]]
    init = model.eval()
    for name in ("ours", "ours-bpc"):
        t = bench_trl.ours_trainer(name, model.train(), tok, seqs, [ex.id for ex in data], mask_all, None, a)
        assert t.opt.param_groups[0]["lr"] == a.lr  # constant: no warm-up
        assert t.cfg.backward_per_chunk == (name == "ours-bpc")
        r = bench_trl.run_ours(t, steps)
        assert r["sel"] == P.K and len(r["times"]) == 2
        assert r["tokens"][0] == sum(len(s.input_ids) for s in bench_trl.step_sequences(seqs, steps[0], False))
        seq, _ = bench_trl.hand_losses(init.eval(), ev.collate(bench_trl.step_sequences(seqs, steps[0], False), tok))
        assert r["first_loss"] == pytest.approx(seq, rel=1e-5)


def test_our_two_variants_take_the_same_step(world):
    model, tok, data, seqs = world
    a = bench_trl.build_parser().parse_args(TINY)
    mask_all = torch.tensor([[k in ex.rationales for k in P.KEYS] for ex in data])
    ts = [bench_trl.ours_trainer(n, model.train(), tok, seqs, [ex.id for ex in data], mask_all, None, a)
          for n in ("ours", "ours-bpc")]
    for t in ts:
        bench_trl.run_ours(t, [[0, 3]])
    for p, q in zip(ts[0].model.parameters(), ts[1].model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--steps", "1"], "--steps 1: must be >= 2"),
    (["--rounds", "0"], "--rounds 0: must be >= 1"),
    (["--systems", "ours,nope"], "expected distinct names"),
    (["--systems", "ours,ours,trl"], "expected distinct names"),
    (["--systems", "ours,trl-sorted-ga4"], "must include trl"),
    (["--memory-steps", "-1"], "--memory-steps -1: must be >= 0"),
    (["--lr", "0"], "--lr 0.0: must be > 0"),
])
def test_argument_errors_are_clean(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench_trl.main(flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_without_trl_it_says_how_to_install_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(bench_trl, "trl_missing", lambda: True)
    with pytest.raises(SystemExit) as e:
        bench_trl.main(TINY)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "pip install trl" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is a benchmark-only dependency")
def test_end_to_end_two_steps_losses_agree(tmp_path, capsys):
    out = bench_trl.main([*TINY, "--steps", "2", "--rounds", "1", "--memory-steps", "1",
                          "--systems", "ours,trl,trl-sorted-ga4", "--out", str(tmp_path / "t.json")])
    s = out["systems"]
    assert out["losses_agree"]
    for name in ("trl", "trl-sorted-ga4"):
        assert s[name]["first_step_loss_seq"] == pytest.approx(s["ours"]["first_step_loss_seq"], abs=1e-3)
        assert s[name]["first_step_loss_tok"] == pytest.approx(s["ours"]["first_step_loss_tok"], abs=1e-3)
    assert s["trl"]["tokens_per_s_vs_trl"] == 1.0
    assert s["trl-sorted-ga4"]["padded_over_real"] <= s["trl"]["padded_over_real"]
    assert all(v["rss_increase_bytes"] and v["allocator_peak_bytes"] > out["weight_bytes"] for v in s.values())
    assert (tmp_path / "t.json").exists()
    assert '"losses_agree": true' in capsys.readouterr().out
