"""eval.py: benchmark loaders, answer extraction and grading, GPQA shuffling, batched generation, resume, CLI."""
import copy
import csv
import json
import os

import pytest
import torch

import eval as ev

# ---- loaders: the shipped files, in their Hugging Face schemas


@pytest.mark.parametrize("task,n", [("gsm8k", 1319), ("svamp", 1000), ("math500", 500), ("csqa", 1221),
                                    ("strategyqa", 687)])
def test_shipped_benchmarks_load(task, n):
    rows = ev.load_task(task)
    assert len(rows) == n
    assert len({r["id"] for r in rows}) == n  # ids key the resume cache
    assert all(r["question"] and r["answer"] and r["kind"] == ev.TASKS[task].kind for r in rows)


def test_gold_answers_spot_checks():
    """Checked by hand against the raw lines of data/benchmarks/*.jsonl."""
    g = ev.load_task("gsm8k")
    assert g[0]["question"].startswith("Janet’s ducks lay 16 eggs per day.") and g[0]["answer"] == "18"
    assert g[146]["question"].startswith("Johnny is picking up the toys") and g[146]["answer"] == "2125"  # "#### 2,125"

    s = ev.load_task("svamp")
    assert s[0] == {"id": "chal-777", "kind": "number", "answer": "145",  # "Answer": 145.0
                    "question": "There are 87 oranges and 290 bananas in Philip's collection. If the bananas are "
                                "organized into 2 groups and oranges are organized into 93 groups. How big is each "
                                "group of bananas?"}
    assert s[1]["question"].endswith("weighed 30 pounds. How much did Marco's strawberries weigh?")  # no "..": Body has its stop
    assert s[1]["answer"] == "19"

    m = ev.load_task("math500")
    assert m[0]["id"] == "test/precalculus/807.json" and m[0]["answer"] == r"\left( 3, \frac{\pi}{2} \right)"
    assert m[4]["answer"] == r"\text{Evelyn}" and m[0]["question"].startswith("Convert the point $(0,3)$")

    c = ev.load_task("csqa")
    assert c[0]["question"] == ("A revolving door is convenient for two direction travel, but it also serves as a "
                                "security measure at a what?\nA. bank\nB. library\nC. department store\nD. mall\nE. new york")
    assert c[0]["answer"] == "A" and c[1]["question"].endswith("\nE. talk to each other")

    q = ev.load_task("strategyqa")
    assert q[0] == {"id": "strategyqa-0", "question": "Is it common to see frost during some college commencements?",
                    "answer": "yes", "kind": "yesno"}
    assert q[3]["question"] == "Was Jackson Pollock trained by Leonardo da Vinci?" and q[3]["answer"] == "no"
    assert sum(r["answer"] == "yes" for r in q) == 326 and sum(r["answer"] == "no" for r in q) == 361


def test_detect_schema_and_to_example():
    rows = {
        "gsm8k": {"question": "q", "answer": "3 + 4 = 7\n#### 1,007"},
        "svamp": {"ID": "x", "Body": "b", "Question": "q", "Answer": 2.5},
        "math": {"problem": "p", "solution": r"so $\boxed{\frac{1}{2}}$."},  # competition_math: no answer field
        "csqa": {"question": {"stem": "s", "choices": [{"label": "A", "text": "t"}, {"label": "B", "text": "u"}]},
                 "answerKey": "B"},  # the original CommonsenseQA jsonl
        "strategyqa": {"qid": "abc", "question": "q", "answer": False},
        "gpqa": {"Question": "q", "Correct Answer": "c", "Incorrect Answer 1": "1", "Incorrect Answer 2": "2",
                 "Incorrect Answer 3": "3"},
        "plain": {"id": "t-1", "question": "q", "answer": "Yes", "rationales": {}},
    }
    assert {s: ev.detect_schema(r) for s, r in rows.items()} == {s: s for s in rows}
    assert ev.detect_schema({"text": "x"}) is None and ev.detect_schema([1]) is None
    ex = {s: ev.to_example(r, "f:1") for s, r in rows.items()}
    assert ex["gsm8k"]["answer"] == "1007" and ex["gsm8k"]["kind"] == "number"
    assert ex["svamp"]["answer"] == "2.5" and ex["svamp"]["question"] == "b. q"
    assert ex["math"]["answer"] == r"\frac{1}{2}" and ex["math"]["kind"] == "expression"
    assert ex["csqa"] == {"id": "", "question": "s\nA. t\nB. u", "answer": "B", "kind": "letter"}
    assert ex["strategyqa"]["answer"] == "no" and ex["strategyqa"]["id"] == "abc"
    assert ex["plain"] == {"id": "t-1", "question": "q", "answer": "yes", "kind": "yesno"}
    with pytest.raises(SystemExit, match=r"f:7: unknown row schema \(text\)"):
        ev.to_example({"text": "x"}, "f:7")
    with pytest.raises(SystemExit, match="f:8: no question or no letter gold"):
        ev.to_example({"question": "q", "answer": "42"}, "f:8", task="csqa")


def test_read_questions_any_schema_and_bad_lines(tmp_path):
    p = tmp_path / "mix.jsonl"
    p.write_text(json.dumps({"question": "a", "answer": 5}) + "\n\n" +
                 json.dumps({"question": "b", "answer": "#### 1,234"}) + "\n")
    assert ev.read_questions(str(p)) == [{"id": "mix-0", "question": "a", "answer": "5", "kind": "number"},
                                         {"id": "mix-1", "question": "b", "answer": "1234", "kind": "number"}]
    p.write_text(json.dumps({"question": "a", "answer": "5"}) + "\n{oops\n")
    with pytest.raises(SystemExit, match=r"mix.jsonl:2: not valid JSON"):
        ev.read_questions(str(p))
    with pytest.raises(SystemExit, match="no such file"):
        ev.read_questions(str(tmp_path / "missing.jsonl"))


# ---- extraction and grading, from the formats real models write

# (task, generation, strict answer, flexible answer, gold, flexible answer graded correct)
CASES = [
    ("gsm8k", "She sells 9 eggs.\nThe answer is 18.", "18", "18", "18", True),
    ("gsm8k", "She makes 9 * 2 = $18.\nThe answer is $18.", "$18", "$18", "18", True),
    ("gsm8k", "The answer is $1,234.50.", "$1,234.50", "$1,234.50", "1234.5", True),
    ("gsm8k", "The answer is 18 dollars.", "18 dollars", "18 dollars", "18", True),
    ("gsm8k", "The answer is 18.0.", "18.0", "18.0", "18", True),
    ("gsm8k", "**The answer is 18.**", "18", "18", "18", True),
    ("gsm8k", "The answer is 25%.", "25%", "25%", "25", True),
    ("gsm8k", "The answer is \\frac{3}{4}.", "\\frac{3}{4}", "\\frac{3}{4}", "0.75", True),
    ("gsm8k", "The answer is 3/4.", "3/4", "3/4", "0.75", True),
    ("gsm8k", "The answer is -5.", "-5", "-5", "-5", True),
    ("gsm8k", "The answer is -5.", "-5", "-5", "5", False),
    ("gsm8k", "It was 3 degrees at noon and fell by 10, so it ends at -7 degrees.", None, "-7", "-7", True),
    ("gsm8k", "First 3 + 4 = 7, then 7 * 2 = 14. So she has 14 apples left.", None, "14", "14", True),
    ("gsm8k", "I don't know.", None, None, "5", False),
    ("gsm8k", "Total = 5 + 6 = 11.\n$\\boxed{11}$\nThen 12 more steps", None, "11", "11", True),
    ("gsm8k", "48 / 2 = 24\n#### 72", None, "72", "72", True),
    ("gsm8k", "So the answer is 1,000 dollars, since each costs 10.", None, "1,000", "1000", True),
    ("gsm8k", "The answer is 2 hours and 30 minutes.", "2 hours and 30 minutes", "2", "150", False),
    ("gsm8k", "The answer is \\boxed{1{,}234}.", "\\boxed{1{,}234}", "\\boxed{1{,}234}", "1234", True),
    ("gsm8k", "The answer is 12 + 6 = 18.", "12 + 6 = 18", "12 + 6 = 18", "18", True),
    ("gsm8k", "The answer is \u22125.", "-5", "-5", "-5", True),  # unicode minus
    ("svamp", "19 pounds. The answer is 19.", None, "19", "19", True),  # not a line of its own: not strict
    ("csqa", "The answer is B.", "B", "B", "B", True),
    ("csqa", "The answer is (B).", "(B)", "(B)", "B", True),
    ("csqa", "The answer is B) library.", "B) library", "B) library", "B", True),
    ("csqa", "Answer: b", None, "B", "B", True),
    ("csqa", "The answer is b.", "b", "b", "B", True),
    ("csqa", "The answer is bank.", "bank", None, "A", False),
    ("csqa", "A bank is a secure place. Among the options, (A) fits best.", None, "A", "A", True),
    ("csqa", "Option C seems wrong, so I pick D.", None, "D", "D", True),
    ("csqa", "\\boxed{E}", None, "E", "E", True),
    ("csqa", "The correct answer is **C. department store**", None, "C", "C", True),
    ("gpqa_diamond", "The answer is E.", "E", None, "A", False),  # GPQA has four choices
    ("strategyqa", "The answer is yes.", "yes", "yes", "yes", True),
    ("strategyqa", "Frost forms below freezing. So the answer is no", None, "no", "no", True),
    ("strategyqa", "The answer is True.", "True", "True", "yes", True),
    ("strategyqa", "No, Pollock was born in 1912, centuries after da Vinci died.", None, "No", "no", True),
    ("strategyqa", "There is no doubt hamsters are prey.\nThe answer is yes.", "yes", "yes", "yes", True),
    ("strategyqa", "The answer is \\text{No}.", "\\text{No}", "\\text{No}", "no", True),
    ("strategyqa", "I cannot determine this.", None, None, "yes", False),
    ("math500", "So $r=3$ and $\\theta=\\frac{\\pi}{2}$.\nThe answer is $\\left(3, \\frac{\\pi}{2}\\right)$.",
     "$\\left(3, \\frac{\\pi}{2}\\right)$", "$\\left(3, \\frac{\\pi}{2}\\right)$", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("math500", "Thus the answer is \\boxed{\\frac{1}{2}}.", None, "\\frac{1}{2}", "\\dfrac{1}{2}", True),
    ("math500", "We get $\\boxed{\\frac{\\sqrt{3}}{2}}$ at the end", None, "\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}", True),
    ("math500", "The answer is $\\sqrt{20}$.", "$\\sqrt{20}$", "$\\sqrt{20}$", "2\\sqrt{5}", True),
    ("math500", "The answer is 5.", "5", "5", "\\sqrt{5}", False),
    ("math500", "The answer is x = 5.", "x = 5", "x = 5", "5", True),
    ("math500", "The answer is 0.5.", "0.5", "0.5", "\\frac{1}{2}", True),
    ("math500", "The answer is Evelyn.", "Evelyn", "Evelyn", "\\text{Evelyn}", True),
    ("math500", "The answer is 5.4.", "5.4", "5.4", "5.4 \\text{ cents}", True),
    # a negated, conditional or either-or final answer is no answer (it was graded correct)
    ("gsm8k", "The answer is not 5.", None, None, "5", False),
    ("svamp", "So the answer isn't 5.", None, None, "5", False),
    ("gsm8k", "The answer is 5 or 18.", None, None, "5", False),
    ("csqa", "The answer is A or B.", None, None, "A", False),
    ("csqa", "\\boxed{A or B}", None, None, "A", False),
    ("csqa", "A is tempting.\nThe answer is neither A nor B.", None, None, "B", False),
    ("strategyqa", "The answer is yes or no, depending on the year.", None, None, "yes", False),
    ("strategyqa", "Frost is common.\nThe answer is unclear, it depends. Maybe yes.", None, None, "yes", False),
    # ... but "or" inside a choice text, a restatement after a comma and MATH's list of solutions are answers
    ("csqa", "The answer is B) city or town.", "B) city or town", "B) city or town", "B", True),
    ("gsm8k", "So the answer is 150 minutes, or 2.5 hours.", None, "150", "150", True),
    ("math500", "The answer is $x=2$ or $x=3$.", "$x=2$ or $x=3$", "$x=2$ or $x=3$", "2, 3", True),
    # an equation opening the answer means its result (it gave 2); "no" before a noun is no answer (it gave no)
    ("gsm8k", "So the answer is 2 + 3 = 5.", None, "5", "5", True),
    ("gsm8k", "so the answer is $2 \\times 4 = 8$ apples, not 9.", None, "8", "8", True),
    ("strategyqa", "Yes, no doubt.", None, "Yes", "yes", True),
    ("strategyqa", "Frost forms in May, so no: it is not common.", None, "no", "no", True),
]


@pytest.mark.parametrize("task,text,strict,flexible,gold,correct", CASES)
def test_extract_and_grade(task, text, strict, flexible, gold, correct):
    assert ev.extract_answer(task, text, strict=True) == strict
    assert ev.extract_answer(task, text) == flexible
    assert ev.is_correct(task, flexible, gold) is correct


@pytest.mark.parametrize("task,text,gold", [("gsm8k", "Step.\nThe answer is not 5.", "5"),
                                            ("csqa", "Step.\nThe answer is A or B.", "A"),
                                            ("strategyqa", "Step.\nThe answer is yes or no, depending on the year.", "yes"),
                                            ("gsm8k", "Step.\nThe answer is 5 or 18.", "5")])
def test_hedged_final_line_is_wrong_strict_and_flexible(task, text, gold):
    """What eval.grade and the teacher judge see: neither grading passes a hedged final line."""
    g = ev.grade(task, text, gold)
    assert g == {"pred": None, "pred_strict": None, "correct": False, "correct_strict": False}
    body_answer = text.split("The answer is ")[1].rstrip(".")
    assert not ev.is_correct(task, body_answer, gold)  # passed straight to the grader: still wrong


def test_strict_and_flexible_grading_differ():
    out = "Frost forms below freezing. So the answer is no"
    g = ev.grade("strategyqa", out, "no")
    assert g == {"pred": "no", "pred_strict": None, "correct": True, "correct_strict": False}


def test_kinds_work_like_tasks():
    text = "Option C seems wrong, so I pick D.\nThe answer is (D)."
    assert ev.extract_answer("letter", text) == ev.extract_answer("csqa", text) == "(D)"
    assert ev.is_correct("number", "$1,234", "1234") and ev.is_correct("yesno", "false", "no")
    assert ev.is_correct("letter", "Answer: (h)", "H") and not ev.is_correct("csqa", "H", "H")  # csqa: A-E only
    assert not ev.is_correct("number", None, "5")
    with pytest.raises(ValueError, match="unknown task or answer kind 'mmlu'"):
        ev.extract_answer("mmlu", "The answer is A.")


def test_numbers_and_canonical_answers():
    assert ev.parse_number("1,234.50") == 1234.5 and ev.parse_number("$12") == 12 and ev.parse_number("-3/4") == -0.75
    assert ev.parse_number("50%") == 50 and ev.parse_number("5.") == 5
    assert ev.parse_number("1,2,3") is None and ev.parse_number("nan") is None and ev.parse_number("1e5") is None
    assert ev.to_number("\\sqrt{5}") is None and ev.to_number("5 or 6") is None and ev.to_number("x = -2.5") == -2.5
    assert ev.last_boxed("a \\boxed{1} b \\boxed{\\frac{a}{b+{c}}} c") == "\\frac{a}{b+{c}}"
    assert ev.last_boxed("\\boxed{\\frac{1}{2}") is None  # cut off by the token budget
    assert ev.normalize_answer("gsm8k", "$1,234.50") == "1234.5" and ev.normalize_answer("svamp", 145.0) == "145"
    assert ev.normalize_answer("csqa", "(b)") == "B" and ev.normalize_answer("strategyqa", True) == "yes"
    assert ev.normalize_answer("math500", "$\\boxed{\\frac12}$.") == "\\frac12"
    assert ev.normalize_answer("gsm8k", "many") is None and ev.normalize_answer("csqa", "a bank") is None


# ---- GPQA-Diamond from the official CSV


def _write_gpqa(path, n=12, reverse=False):
    cols = ["Record ID", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
            "Incorrect Answer 3", "Subdomain"]
    rows = [{"Record ID": f"rec{i}", "Question": f"Question {i}: which value is right?", "Correct Answer": f"right {i}",
             "Incorrect Answer 1": f"wrong {i}a", "Incorrect Answer 2": f"wrong {i}b",
             "Incorrect Answer 3": f"wrong {i}c", "Subdomain": "Physics"} for i in range(n)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows[::-1] if reverse else rows)


def test_gpqa_csv_shuffled_fixed_and_gold_follows(tmp_path):
    p = str(tmp_path / "gpqa_diamond.csv")
    _write_gpqa(p)
    rows = ev.load_task("gpqa_diamond", gpqa_csv=p)
    assert len(rows) == 12 and rows[0]["id"] == "rec0" and rows[0]["kind"] == "letter"
    for i, r in enumerate(rows):
        lines = r["question"].split("\n")
        assert lines[0] == f"Question {i}: which value is right?"
        choices = {ln[0]: ln[3:] for ln in lines[1:]}
        assert sorted(choices) == ["A", "B", "C", "D"]
        assert sorted(choices.values()) == sorted([f"right {i}", f"wrong {i}a", f"wrong {i}b", f"wrong {i}c"])
        assert choices[r["answer"]] == f"right {i}"  # the gold letter follows the correct answer
    # shuffled, and pinned: the order is a function of the question text (a str seed hashes the same in every
    # process), so this string is what every run on every machine gets
    assert "".join(r["answer"] for r in rows) == "CACCDDADDDBD"
    assert rows[0]["question"].endswith("\nA. wrong 0a\nB. wrong 0b\nC. right 0\nD. wrong 0c")
    _write_gpqa(p, reverse=True)  # another file order: each question keeps its order
    again = {r["id"]: r for r in ev.load_task("gpqa_diamond", gpqa_csv=p)}
    assert all(again[r["id"]] == r for r in rows)


def test_gpqa_missing_csv_says_where_to_get_it(tmp_path):
    with pytest.raises(SystemExit, match="needs --gpqa-csv.*github.com/idavidrein/gpqa"):
        ev.load_task("gpqa_diamond")
    with pytest.raises(SystemExit, match="--gpqa-csv .*nope.csv: no such file"):
        ev.task_path("gpqa_diamond", gpqa_csv=str(tmp_path / "nope.csv"))
    with pytest.raises(SystemExit, match="gsm8k_test.jsonl: no such file"):
        ev.task_path("gsm8k", data_dir=str(tmp_path))


# ---- generation


def _prompts(tok, n=6):
    rows = ev.load_task("gsm8k")[:n // 2] + ev.load_task("csqa")[:n - n // 2]
    return [ev.chat_prompt(tok, r["question"], r["kind"]) for r in rows]


def test_batched_greedy_equals_batch_size_one(tiny):
    model, tok = tiny
    model = copy.deepcopy(model).double()  # float64: the comparison tests padding and positions, not rounding
    # the fresh student's small init answers "\n\n..." to every prompt, which would hide rows getting mixed up
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5, generator=g)
    prompts = _prompts(tok)
    assert len({len(ev._ids(tok, p)) for p in prompts}) == len(prompts)  # every batch is really padded
    one = ev.generate(model, tok, prompts, max_new_tokens=24, batch_size=1, progress=False)
    many = ev.generate(model, tok, prompts, max_new_tokens=24, batch_size=4, progress=False)  # batches of 4 and 2
    assert one == many
    assert len(set(one)) == len(prompts)  # each row decodes its own prompt


class ScriptedLM(torch.nn.Module):
    """Stands in for a causal LM: `generate` appends a fixed continuation, as HF does after the prompt."""

    def __init__(self, continuation):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.continuation = continuation
        self.config = type("C", (), {"_name_or_path": "scripted"})()

    def generate(self, input_ids, attention_mask, generation_config):
        assert generation_config.do_sample is False and generation_config.repetition_penalty == 1.0
        assert (attention_mask[:, -1] == 1).all()  # left padding: every prompt ends at the right edge
        cont = torch.tensor(self.continuation).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, cont], 1)


def test_generation_stops_at_end_of_turn(tiny):
    _, tok = tiny
    ids = ev._ids(tok, "The answer is 7.")
    junk = ev._ids(tok, "\nuser: and 99 more")
    model = ScriptedLM(ids + [tok.convert_tokens_to_ids("<|im_end|>")] + junk)
    assert ev.generate(model, tok, _prompts(tok, 3), 64, 2, progress=False) == ["The answer is 7."] * 3


def test_evaluate_metrics_hand_counted(tiny, monkeypatch):
    _, tok = tiny
    outputs = {"q1": "The answer is 5.", "q2": "so 5 + 1 = 6", "q3": "no idea", "q4": "The answer is 4."}
    monkeypatch.setattr(ev, "generate", lambda model, tok, prompts, *a, **k:
                        [next(o for q, o in outputs.items() if f"{q}\n" in p) for p in prompts])
    rows = [{"question": f"q{i}", "answer": a} for i, a in zip("1234", ["5", "6", "1", "5"])]  # train.py's rows
    m, recs = ev.evaluate(ScriptedLM([]), tok, rows, progress=False)
    assert m == {"n": 4, "accuracy": 0.5, "strict_accuracy": 0.25, "no_answer": 1, "no_final_line": 2}
    assert [r["pred"] for r in recs] == ["5", "6", None, "4"] and [r["id"] for r in recs] == ["0", "1", "2", "3"]


def test_evaluate_resumes_after_interruption(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    rows = ev.load_task("strategyqa")[:5]
    out = str(tmp_path / "strategyqa.jsonl")
    _, first = ev.evaluate(model, tok, rows, 8, 2, progress=False, task="strategyqa", out_path=out, resume=True)
    lines = open(out).read().splitlines(keepends=True)
    assert [json.loads(ln)["id"] for ln in lines] == [r["id"] for r in rows]  # rewritten in row order
    assert all(json.loads(ln)["output"] == r["output"] for ln, r in zip(lines, first))
    # interrupted: two records written, the third cut mid-line
    with open(out, "w") as f:
        f.writelines(lines[:2] + [lines[2][:25]])
    asked = []
    real = ev.generate
    monkeypatch.setattr(ev, "generate", lambda m, t, prompts, *a, **k: asked.extend(prompts) or real(m, t, prompts, *a, **k))
    _, again = ev.evaluate(model, tok, rows, 8, 2, progress=False, task="strategyqa", out_path=out, resume=True)
    assert len(asked) == 3 and again == first
    assert [json.loads(ln) for ln in open(out)] == first
    # another model (or budget) in the same file: nothing is reused
    asked.clear()
    ev.evaluate(model, tok, rows, 8, 2, progress=False, task="strategyqa", out_path=out, resume=True, model_name="other")
    assert len(asked) == 5
    asked.clear()
    ev.evaluate(model, tok, rows, 8, 2, progress=False, task="strategyqa", out_path=out, resume=False, model_name="other")
    assert len(asked) == 5


# ---- CLI


def test_cli_end_to_end(tiny, tmp_path, capsys):
    model, tok = tiny
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "eval")
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    ev.main(["--model", ckpt, "--tasks", "gsm8k,csqa", "--limit", "3", "--max-new-tokens", "8", "--batch-size", "2",
             "--out", out, "--no-progress"])
    table = capsys.readouterr().out
    assert "| task | split | n | strict acc | flexible acc | no answer | no final line |" in table
    assert "| gsm8k | ID | 3 |" in table and "| csqa | OOD | 3 |" in table and "| mean | | 6 |" in table
    res = json.load(open(os.path.join(out, "results.json")))
    assert set(res) == {"gsm8k", "csqa"} and res["gsm8k"]["n"] == 3 and res["csqa"]["kind"] == "letter"
    recs = [json.loads(ln) for ln in open(os.path.join(out, "gsm8k.jsonl"))]
    assert [r["id"] for r in recs] == ["gsm8k-0", "gsm8k-1", "gsm8k-2"] and [r["gold"] for r in recs] == ["18", "3", "70000"]
    for r in recs:
        assert set(r) >= {"prompt", "output", "pred", "pred_strict", "gold", "correct", "correct_strict"}
        assert r["correct"] == ev.is_correct("gsm8k", r["pred"], r["gold"])
        assert r["prompt"] == ev.chat_prompt(tok, r["question"], "number")
    assert res["gsm8k"]["accuracy"] == sum(r["correct"] for r in recs) / 3


def test_cli_errors(capsys):
    for argv, msg in [(["--tasks", "gpqa_diamond"], "needs --gpqa-csv"), (["--tasks", "mmlu"], "unknown task 'mmlu'"),
                      (["--limit", "0"], "--limit 0: must be >= 1"), (["--data-dir", "/nonexistent"], "no such directory")]:
        with pytest.raises(SystemExit):
            ev.main(["--model", "unused", *argv])
        assert msg in capsys.readouterr().err


# ---- the paper's results table

def _metrics(**acc):
    return {t: {"accuracy": a, "strict_accuracy": a / 2, "no_answer": 0, "n": 100} for t, a in acc.items()}


PAPER_ROWS = {  # deliberately not base-first: the table puts the base row first
    "mind": {**_metrics(gsm8k=0.6, svamp=0.3333, math500=0.2, csqa=0.45, strategyqa=0.55),
             "id": {"accuracy": 0.9}},  # train.py's synthetic set: not a column of the paper's table
    "base": _metrics(gsm8k=0.5, svamp=0.25, math500=0.1, csqa=0.4, strategyqa=0.6),
    "sft": _metrics(gsm8k=0.55, csqa=0.5),
}


def test_task_groups_follow_the_paper():
    assert ev.ID_TASKS == ("gsm8k", "svamp", "math500")
    assert ev.OOD_TASKS == ("csqa", "strategyqa", "gpqa_diamond")


def test_results_table_hand_computed():
    t = ev.results_table(PAPER_ROWS)
    # no row has GPQA: no column; the paper's order, MATH500 first
    assert t["columns"] == ["math500", "gsm8k", "svamp", "csqa", "strategyqa", "id_avg", "ood_avg"]
    assert t["base"] == "base"
    # base: ID (10 + 50 + 25) / 3 = 28.33; OOD (40 + 60) / 2 = 50
    assert t["rows"]["base"] == {"math500": 10.0, "gsm8k": 50.0, "svamp": 25.0, "csqa": 40.0, "strategyqa": 60.0,
                                 "id_avg": 28.3, "ood_avg": 50.0}
    # mind: SVAMP 33.33 -> 33.3; ID (20 + 60 + 33.3) / 3 = 37.77; OOD (45 + 55) / 2 = 50
    assert t["rows"]["mind"] == {"math500": 20.0, "gsm8k": 60.0, "svamp": 33.3, "csqa": 45.0, "strategyqa": 55.0,
                                 "id_avg": 37.8, "ood_avg": 50.0}
    assert t["gain"]["mind"] == {"math500": 10.0, "gsm8k": 10.0, "svamp": 8.3, "csqa": 5.0, "strategyqa": -5.0,
                                 "id_avg": 9.5, "ood_avg": 0.0}  # 37.8 - 28.3, 50 - 50
    # sft has two tasks: its averages are over those; no gain on an average over other tasks than the base's
    assert t["rows"]["sft"] == {"math500": None, "gsm8k": 55.0, "svamp": None, "csqa": 50.0, "strategyqa": None,
                                "id_avg": 55.0, "ood_avg": 50.0}
    assert t["gain"]["sft"] == {"math500": None, "gsm8k": 5.0, "svamp": None, "csqa": 10.0, "strategyqa": None,
                                "id_avg": None, "ood_avg": None}
    assert "base" not in t["gain"]
    json.dumps(t)  # JSON-able
    assert ev.results_table(PAPER_ROWS, base=None)["gain"] == {}
    assert ev.results_table({"mind": PAPER_ROWS["mind"]})["base"] is None  # no base row: no gains


def test_format_results_md_layout_and_gpqa_note():
    md = ev.format_results_md(ev.results_table(PAPER_ROWS), {"gpqa_diamond": "no --gpqa-csv given"})
    assert md == ("| | MATH500 | GSM8K | SVAMP | CSQA | StrategyQA | ID avg | OOD avg |\n"
                  "|---|---:|---:|---:|---:|---:|---:|---:|\n"
                  "| base | 10.0 | 50.0 | 25.0 | 40.0 | 60.0 | 28.3 | 50.0 |\n"
                  "| mind | 20.0 | 60.0 | 33.3 | 45.0 | 55.0 | 37.8 | 50.0 |\n"
                  "| sft | — | 55.0 | — | 50.0 | — | 55.0 | 50.0 |\n"
                  "| mind − base | +10.0 | +10.0 | +8.3 | +5.0 | -5.0 | +9.5 | +0.0 |\n"
                  "| sft − base | — | +5.0 | — | +10.0 | — | — | — |\n"
                  "\n"
                  "Note: GPQA-D was not evaluated: no --gpqa-csv given\n")
    with_gpqa = {**PAPER_ROWS, "base": {**PAPER_ROWS["base"], **_metrics(gpqa_diamond=0.25)}}
    md = ev.format_results_md(ev.results_table(with_gpqa))
    assert "| StrategyQA | GPQA-D | ID avg |" in md and "Note" not in md
    assert "| base | 10.0 | 50.0 | 25.0 | 40.0 | 60.0 | 25.0 | 28.3 | 41.7 |" in md  # OOD (40 + 60 + 25) / 3
    assert "| mind | 20.0 | 60.0 | 33.3 | 45.0 | 55.0 | — | 37.8 | 50.0 |" in md
    assert "| mind − base | +10.0 | +10.0 | +8.3 | +5.0 | -5.0 | — | +9.5 | — |" in md  # OOD avgs over other tasks


def test_write_results_atomic(tmp_path, monkeypatch):
    out = tmp_path / "run"
    ev.write_results(str(out), PAPER_ROWS, {"gpqa_diamond": "no --gpqa-csv given"})
    res = json.load(open(out / "results.json"))
    assert res["rows"]["mind"]["id_avg"] == 37.8 and res["skipped"] == {"gpqa_diamond": "no --gpqa-csv given"}
    assert res["metrics"]["base"]["gsm8k"]["accuracy"] == 0.5  # what a later script rebuilds tables from
    md = (out / "results.md").read_text()
    assert md == ev.format_results_md(ev.results_table(PAPER_ROWS), {"gpqa_diamond": "no --gpqa-csv given"})
    assert sorted(os.listdir(out)) == ["results.json", "results.md"]
    # a crash while writing leaves the previous files whole
    monkeypatch.setattr(ev.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        ev.write_results(str(out), {"base": _metrics(gsm8k=0.1)})
    assert (out / "results.md").read_text() == md and json.load(open(out / "results.json")) == res


def test_gpqa_csv_without_its_columns_is_one_line_naming_file_and_columns(tmp_path):
    p = tmp_path / "gpqa.csv"
    p.write_text("Question,Correct answer,Incorrect Answer 1,Incorrect Answer 2\nq,a,b,c\n")
    for call in (lambda: ev.task_path("gpqa_diamond", gpqa_csv=str(p)),
                 lambda: ev.load_task("gpqa_diamond", gpqa_csv=str(p))):
        with pytest.raises(SystemExit) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and f"--gpqa-csv {p}: missing columns 'Correct Answer', 'Incorrect Answer 3'" in msg
    p.write_text("")
    with pytest.raises(SystemExit, match="missing columns 'Question', .* \\(has no header\\)"):
        ev.task_path("gpqa_diamond", gpqa_csv=str(p))


# ---- the shipped paper-sized training set

def test_shipped_training_set_is_whole_graded_and_disjoint_from_the_benchmarks():
    import re

    import perspectives as P
    path = os.path.join(os.path.dirname(ev.DATA_DIR), "mind_gsm8k_train.jsonl")
    warnings = []
    exs = P.read_training_jsonl(path, warn=warnings.append)
    assert warnings == [] and len(exs) == 518 and len({e.id for e in exs}) == 518
    assert all(sorted(e.rationales) == sorted(P.KEYS) for e in exs)  # 8 perspectives each
    # every final line is right by today's strict grader (the judge that kept them was an earlier one)
    assert all(ev.is_correct("number", ev.extract_answer("number", r, strict=True), e.answer)
               for e in exs for r in e.rationales.values())

    def norm(s):
        return re.sub(r"\s+", " ", s).strip().lower()

    bench = set()
    for task in ("gsm8k", "svamp", "math500", "csqa", "strategyqa"):
        for r in ev.load_task(task):
            bench.add(norm(r["question"]))
            bench.add(norm(r["question"].split("\nA. ")[0]))  # a CommonsenseQA stem without its choices
    assert len(bench) > 5000 and norm("  " + ev.load_task("gsm8k")[0]["question"].upper()) in bench  # it can match
    assert [e.id for e in exs if norm(e.question) in bench] == []
