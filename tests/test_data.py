"""The perspectives, the synthetic teacher, the training format, and the token layout of a rationale."""
import json
import os
import re

import pytest

import eval as ev
import perspectives as P
from conftest import SHARED_DATA


def test_eight_perspectives_in_paper_order():
    assert P.KEYS == ["formal_symbolic", "intuitive", "decomposition", "planning", "analogy", "socratic",
                      "contrastive", "counterfactual"]
    assert len({p.instruction for p in P.PERSPECTIVES}) == 8
    prompt = P.teacher_prompt("What is 2+2?", "socratic")
    assert "Socratic" in prompt and "What is 2+2?" in prompt and "The answer is X." in prompt


def test_final_line_round_trip():
    assert P.final_line("42") == "The answer is 42."
    assert ev.split_final_line("a\nb\nThe answer is 42.") == ("a\nb", "42")
    assert ev.split_final_line("no final line here") == ("no final line here", None)
    assert P.with_final_line("work\nthe answer is: 41", "42") == "work\nThe answer is 42."
    assert P.with_final_line("work", "7") == "work\nThe answer is 7."


def test_synthetic_is_deterministic_and_seeded():
    a, b = P.synthetic_examples(20, 3, "train"), P.synthetic_examples(20, 3, "train")
    assert [e.to_json() for e in a] == [e.to_json() for e in b]
    assert [e.question for e in P.synthetic_examples(20, 4, "train")] != [e.question for e in a]


def _check_arithmetic(text):
    """Every `a + b = c` / `a - b = c` / `a + b + c = d` in a rationale is true."""
    n = 0
    for expr, res in re.findall(r"(\d+(?: [+-] \d+)+) = (\d+)", text):
        assert eval(expr) == int(res), text  # noqa: S307 - digits and +/- only
        n += 1
    return n


def test_synthetic_rationales_are_correct_and_end_canonically():
    splits = P.synthetic_splits(200, 50, seed=0)
    for name, exs in splits.items():
        for ex in exs:
            assert set(ex.rationales) == set(P.KEYS)
            for k, r in ex.rationales.items():
                body, ans = ev.split_final_line(r)
                assert ans == ex.answer and r.endswith(f"\nThe answer is {ex.answer}.")
                # the contrastive wrong candidate is a true sum too; it is wrong for the question, not as arithmetic
                assert _check_arithmetic(body) >= 1
            # the answer is the start plus gains minus losses stated in the question
            nums = [int(x) for x in re.findall(r"\d+", ex.question)]
            assert 0 <= int(ex.answer) <= 9 and nums


def test_synthetic_splits_id_vs_ood():
    splits = P.synthetic_splits(300, 60, seed=0)
    steps = lambda ex: ex.rationales["formal_symbolic"].count("\nx = ")  # one line per event
    assert {steps(e) for e in splits["train"]} == {1, 2}
    assert {steps(e) for e in splits["test_id"]} <= {1, 2}
    assert {steps(e) for e in splits["test_ood"]} == {1, 2}  # the same problems, worded differently
    train_q = {e.question for e in splits["train"]}
    assert not train_q & {e.question for e in splits["test_id"]}
    # OOD questions use opening and question sentences that training never shows, and no training sentence
    first = lambda e: e.question.split(".")[0]
    ood_openings = {"owns a box", "'s bag"}
    assert all(any(o in first(e) for o in ood_openings) for e in splits["test_ood"])
    assert not any(o in e.question for o in ood_openings for e in splits["train"])
    assert all("ends up with?" in e.question or "are left with" in e.question for e in splits["test_ood"])
    assert not any("ends up with" in e.question or "are left with" in e.question for e in splits["train"])
    # stage 0's stream: one event each
    assert {steps(e) for e in P.synthetic_examples(50, 0, "pretrain")} == {1}


def test_synthetic_styles_differ_in_length():
    exs = P.synthetic_examples(300, 0, "train")
    mean = {k: sum(len(e.rationales[k]) for e in exs) / len(exs) for k in P.KEYS}
    assert mean["formal_symbolic"] == min(mean.values())
    assert mean["contrastive"] > 2 * mean["formal_symbolic"]


def test_cli_writes_three_splits(tmp_path):
    P.main(["--teacher", "synthetic", "--n", "40", "--n-test", "10", "--out", str(tmp_path)])
    counts = {n: sum(1 for _ in open(tmp_path / f"{n}.jsonl")) for n in ("train", "test_id", "test_ood")}
    assert counts["train"] == 40 and counts["test_ood"] == 10 and 1 <= counts["test_id"] <= 10
    assert len(P.read_training_jsonl(str(tmp_path / "train.jsonl"))) == 40


def test_read_training_jsonl_reports_bad_lines(tmp_path):
    good = {"id": "a", "question": "Q?", "answer": "1", "rationales": {"intuitive": "x\nThe answer is 1."}}
    lines = [json.dumps(good), "{not json", json.dumps({"id": "b", "answer": "1", "rationales": {"intuitive": "r"}}),
             json.dumps({"id": "c", "question": "Q", "rationales": {"intuitive": "r"}}),
             json.dumps({"id": "d", "question": "Q", "answer": "2", "rationales": {}}), "",
             json.dumps({**good, "rationales": {"intuitive": "r", "telepathy": "r"}, "id": "e"}), json.dumps(good)]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    warnings = []
    exs = P.read_training_jsonl(str(path), warn=warnings.append)
    assert [e.id for e in exs] == ["a", "e"]
    assert exs[1].rationales == {"intuitive": "r"}
    text = "\n".join(warnings)
    for lineno, why in [(2, "not valid JSON"), (3, "no question"), (4, "no answer"), (5, "no rationale"),
                        (7, "unknown perspective"), (8, "duplicate id")]:
        assert f"{path}:{lineno}:" in text and why in text


def test_demo_file_shipped_and_complete():
    exs = P.read_training_jsonl(os.path.join(os.path.dirname(__file__), "..", "data", "demo_perspectives.jsonl"))
    assert len(exs) == 94 and all(len(e.rationales) == 8 for e in exs)
    for e in exs:
        for r in e.rationales.values():
            assert ev.split_final_line(r)[1] == e.answer


# ---- the token layout of one training sequence


def test_encode_layout_and_answer_span(tiny):
    _, tok = tiny
    ex = P.synthetic_examples(1, 0, "train")[0]
    enc = ev.encode_example(tok, ex.question, ex.rationales["socratic"], ex.answer)
    ids = enc.input_ids
    assert tok.decode(ids[:enc.prompt_len]) == ev.chat_prompt(tok, ex.question)
    assert tok.decode(ids[enc.answer_start:enc.answer_end]) == " " + ex.answer
    assert tok.decode(ids[enc.prompt_len:], skip_special_tokens=True) == ex.rationales["socratic"]
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    batch = ev.collate([enc], tok)
    labels = batch["labels"][0]
    assert (labels[:enc.prompt_len] == -100).all() and (labels[enc.prompt_len:] >= 0).all()
    # the logits at answer_pos predict exactly the answer tokens
    assert [ids[p + 1] for p in batch["answer_pos"][0].tolist()] == ids[enc.answer_start:enc.answer_end]


def _assert_spans_align(tok, exs):
    for ex in exs:
        spans = set()
        for k, r in ex.rationales.items():
            e = ev.encode_example(tok, ex.question, r, ex.answer)
            spans.add(tuple(e.input_ids[e.answer_start:e.answer_end]))
            assert e.input_ids[e.answer_start - len(ev._ids(tok, "The answer is")):e.answer_start] == \
                ev._ids(tok, "The answer is")
        assert len(spans) == 1, ex.id


def test_answer_span_aligns_across_perspectives(tiny, synth):
    _, tok = tiny
    _assert_spans_align(tok, synth["train"][:30] + synth["test_ood"][:10])


def test_answer_span_aligns_on_real_teacher_data(tiny):
    _, tok = tiny
    exs = P.read_training_jsonl(os.path.join(SHARED_DATA, "demo_perspectives.jsonl"))
    _assert_spans_align(tok, exs)


def test_truncation_cuts_body_never_final_line(tiny):
    _, tok = tiny
    ex = P.synthetic_examples(1, 0, "train")[0]
    full = ev.encode_example(tok, ex.question, ex.rationales["contrastive"], ex.answer)
    cut = ev.encode_example(tok, ex.question, ex.rationales["contrastive"], ex.answer, max_len=len(full.input_ids) - 5)
    assert len(cut.input_ids) == len(full.input_ids) - 5 and cut.n_cut == 5
    tail = full.input_ids[full.answer_start - 3:]
    assert cut.input_ids[-len(tail):] == tail
    with pytest.raises(ValueError, match="max-len"):
        ev.encode_example(tok, ex.question, ex.rationales["contrastive"], ex.answer, max_len=full.prompt_len)
