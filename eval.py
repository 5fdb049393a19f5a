"""
Evaluation: benchmark loaders, the student's prompt format, batched greedy generation, answer extraction,
grading and the accuracy table.

    python eval.py --model out/ckpt --tasks gsm8k,svamp,math500,csqa,strategyqa --out out/eval
    python eval.py --model out/ckpt --tasks gpqa_diamond --gpqa-csv path/to/gpqa_diamond.csv
    python eval.py --model Qwen2.5-1.5B-Instruct --data data/synth/test_id.jsonl --limit 100

Tasks: in-distribution gsm8k, svamp, math500; out-of-distribution csqa, strategyqa, gpqa_diamond. The first five
read the files shipped in data/benchmarks/ (Hugging Face schemas, see its README); GPQA-Diamond reads the
official CSV, which its authors ask not to republish. --data takes JSONL files of any of those schemas or plain
{question, answer} rows. OUT gets results.json and one <task>.jsonl with every generation; rerunning the same
command into the same OUT resumes an interrupted evaluation.

This file owns everything about *how a question is put to the student and how its answer is read*:
train.py builds its training sequences with `encode_example` (so training and evaluation see the same
chat format), perspectives.py judges teacher rationales with `extract_answer` / `is_correct` and reads benchmark
rows with `to_example`, and metanet.py / analysis.py pool hidden states over the rationale tokens that
`encode_example` marks.
"""
import argparse
import csv
import json
import os
import random
import re
import sys
import threading
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

# -----------------------------------------------------------------------------
# The canonical final line: every rationale ends with `The answer is X.`

FINAL_PREFIX = "The answer is"
_FINAL_RE = re.compile(r"^\s*\**\s*the\s+(?:final\s+)?answer\s+is\s*[:=]?\s*(.+?)\s*\**\s*\.?\s*\**\s*$", re.IGNORECASE)


def split_final_line(text: str) -> tuple[str, str | None]:
    """(body, answer) when the last non-empty line is a final line `The answer is X.`, else (text, None)."""
    lines = text.rstrip().split("\n")
    m = _FINAL_RE.match(lines[-1])
    if not m:
        return text.rstrip(), None
    return "\n".join(lines[:-1]).rstrip(), m.group(1).strip()


# -----------------------------------------------------------------------------
# Tasks. An answer *kind* says what the final line holds and how it is graded; a task is a benchmark with a
# kind, a default file and the Hugging Face dataset whose schema that file follows.

KINDS = ("number", "expression", "letter", "yesno")
LETTERS = "ABCDEFGHIJ"  # choice letters accepted when the task does not say how many choices it has


@dataclass(frozen=True)
class Task:
    kind: str
    file: str | None  # under --data-dir; None: the user supplies it (GPQA)
    hf: str  # the dataset whose schema the file follows
    split: str  # "ID" or "OOD" as in the paper's table
    letters: str = LETTERS


TASKS = {
    "gsm8k": Task("number", "gsm8k_test.jsonl", "openai/gsm8k (main, test)", "ID"),
    "svamp": Task("number", "svamp.jsonl", "ChilleD/SVAMP (train+test)", "ID"),
    "math500": Task("expression", "math500_test.jsonl", "HuggingFaceH4/MATH-500 (test)", "ID"),
    "csqa": Task("letter", "csqa_validation.jsonl", "tau/commonsense_qa (validation)", "OOD", "ABCDE"),
    "strategyqa": Task("yesno", "strategyqa_test.jsonl", "StrategyQA test split of Fine-tune-CoT", "OOD"),
    "gpqa_diamond": Task("letter", None, "Idavidrein/gpqa (gpqa_diamond.csv)", "OOD", "ABCD"),
}
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "benchmarks")
GPQA_HELP = ("GPQA-Diamond is distributed password-protected and may not be republished, so it is not shipped: "
             "download dataset.zip from https://github.com/idavidrein/gpqa (the password is in its README) or the "
             "gated Hugging Face dataset Idavidrein/gpqa, and pass --gpqa-csv path/to/gpqa_diamond.csv")
GPQA_SEED = 0  # choice order of every GPQA question: a fixed function of this seed and the question text
GPQA_COLUMNS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


def task_spec(task: str) -> tuple[str, str]:
    """(kind, valid choice letters) of a task name or of a plain answer kind."""
    if task in TASKS:
        return TASKS[task].kind, TASKS[task].letters
    if task in KINDS:
        return task, LETTERS
    raise ValueError(f"unknown task or answer kind {task!r}; expected one of {', '.join([*TASKS, *KINDS])}")


def answer_kind(gold: str) -> str:
    """What the final line should hold for this gold answer: number, letter, yesno or expression."""
    g = str(gold).strip()
    if g.lower() in ("yes", "no", "true", "false"):
        return "yesno"
    if re.fullmatch(r"[A-Ja-j]", g):
        return "letter"
    if parse_number(g) is not None:
        return "number"
    return "expression"


# -----------------------------------------------------------------------------
# Reading an answer string: numbers, LaTeX, choice letters, yes/no

_DECIMAL_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
# a number inside running text: thousands commas, decimals, a plain fraction; not glued to a word ("x2", "3.5.1")
_NUM_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?![\d])")


def parse_number(s: str) -> float | None:
    """'1,234.50' / '$12' / '-3' / '3/4' / '50%' / '5.' -> float; None if it is not a plain number."""
    t = str(s).strip().replace("\u2212", "-").replace("$", "").strip()
    t = re.sub(r"\s*%$", "", t.rstrip(".").strip())
    if "," in t:  # only as a thousands separator: "1,2,3" is a list, not 123
        if not re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", t):
            return None
        t = t.replace(",", "")
    m = re.fullmatch(r"([-+]?\d+)\s*/\s*(\d+)", t)
    if m:
        return int(m.group(1)) / int(m.group(2)) if int(m.group(2)) != 0 else None
    if not _DECIMAL_RE.fullmatch(t):  # float() would also take 'nan', 'inf', '1e5', '1_000'
        return None
    return float(t)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces included; None if there is none."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    j = text.find("{", i)
    if j < 0 or text[i:j].strip() not in ("\\boxed", "\\fbox"):
        m = re.match(r"\\boxed\s+([^\s$]+)", text[i:])  # `\boxed 5`
        return m.group(1) if m else None
    depth = 0
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1:k]
    return None  # unbalanced: cut off by the token budget


def _unwrap(s: str) -> str:
    """Strip the LaTeX and markdown that models put around a short answer: \\boxed, \\text, $, \\(, **, ..."""
    t = str(s).replace("\u2212", "-")
    b = last_boxed(t)
    if b is not None:
        t = b
    for _ in range(3):  # nested \text{\textbf{...}}
        t = re.sub(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}", r"\1", t)
    t = re.sub(r"\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}", r"\1/\2", t)  # \frac{3}{4} -> 3/4
    t = re.sub(r"\\[dt]?frac(\d)(\d)", r"\1/\2", t)  # \frac34
    t = re.sub(r"\^\s*\{?\\circ\}?|\\left|\\right|\\[,;:! ]", "", t)
    t = t.replace("{,}", ",")  # 1{,}234: LaTeX thousands separator
    for a, b in (("\\$", "$"), ("\\%", "%"), ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", "")):
        t = t.replace(a, b)
    return t.replace("$", "").strip().strip("*_`'\" ").strip()


def to_number(s: str) -> float | None:
    """The number an answer string states: '18', '$1,234.50', '75%', '\\frac{3}{4}', '\\boxed{18}', 'x = 18',
    '18 apples'. Unit words are dropped, but text with operators or LaTeX commands left in it ('\\sqrt{5}',
    '2+3') or with several numbers ('5 or 6') is not a number."""
    t = _unwrap(s)
    x = parse_number(t)
    if x is not None:
        return x
    t = t.rsplit("=", 1)[-1]
    if re.search(r"[\\^_{}*+×÷<>]", t):
        return None
    nums = _NUM_RE.findall(t)
    return parse_number(nums[0]) if len(nums) == 1 else None


def format_number(x: float) -> str:
    """Canonical text of a number: '18' rather than '18.0', otherwise the shortest exact decimal."""
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


def _letter(s: str, letters: str = LETTERS) -> str | None:
    """'B', '(B)', 'B)', 'b.', 'B. library', '**B**', '\\boxed{B}', 'Option B', 'choice (c)' -> 'B'."""
    t = _unwrap(s)
    m = re.match(r"^(?:(?:option|choice|answer)\b\s*:?\s*)?(\()?([A-Za-z])(\))?(?=$|[\s.:,)\]])", t, re.IGNORECASE)
    if not m:
        return None
    L, paren = m.group(2), m.group(1) or m.group(3)
    if L.islower() and not paren and re.match(r"\s+\w", t[m.end():]):
        return None  # "a bank": an article, not choice (a)
    return L.upper() if L.upper() in letters else None


def _yesno(s: str) -> str | None:
    """'yes' / 'No, because ...' / 'True' / '\\text{false}' -> 'yes' or 'no'."""
    m = re.match(r"(yes|no|true|false)\b", _unwrap(s).lower())
    return None if not m else "yes" if m.group(1) in ("yes", "true") else "no"


def normalize_answer(task: str, s) -> str | None:
    """The canonical X of `The answer is X.` for an answer string (or a JSON bool / number) of a task or kind:
    a number without units or commas, an upper-case letter, yes / no, or the expression without $ and \\boxed.
    None when s is not an answer of that kind."""
    kind, letters = task_spec(task)
    if isinstance(s, bool):
        s = "yes" if s else "no"
    s = str(s)
    if kind == "number":
        x = to_number(s)
        return None if x is None else format_number(x)
    if kind == "letter":
        return _letter(s, letters)
    if kind == "yesno":
        return _yesno(s)
    b = last_boxed(s)
    t = (b if b is not None else s).strip().rstrip(".").strip()
    t = re.sub(r"^\$+|\$+$|^\\\(|\\\)$|^\\\[|\\\]$", "", t).strip()
    return t or None


# -----------------------------------------------------------------------------
# Extraction and grading

# "answer is X" / "Answer: X" / "#### X" anywhere in the text (models that do not write the canonical final line)
_PHRASE_RE = re.compile(r"(?:\banswer\s*(?:is|:|=|would be|should be)|####)\s*:?\s*(.+)", re.IGNORECASE)
# a choice letter in running text: "(B)", "B)", or a capital letter standing alone
_LETTER_SCAN_RE = re.compile(r"\(([A-Ja-j])\)|(?<![\w(])([A-J])\)|(?<![\w'’\\-])([A-J])(?![\w'’-])")


# A final answer the model did not commit to is no answer. Graders that read the first answer-like token would pass
# "not 5" for gold 5 and "A or B" for gold A, and the teacher judge would then rewrite such a rationale into a
# confident final line. Negated: "not 5", "definitely not A", "neither A nor B", "none of them", "isn't 5" (the
# phrase "answer is" leaves "n't 5").
_NEGATED_RE = re.compile(r"^[\W_]*(?:[a-z]{3,}ly\s+)?(?:not|never|neither|none)\b|^\W*n't\b", re.IGNORECASE)
# Conditional or unsure: "yes or no, depending on ...", "it depends", "maybe 5", "either A or B".
_UNSURE_RE = re.compile(r"\bdepend(?:s|ing)\b|^[\W_]*(?:either|maybe|perhaps|possibly)\b", re.IGNORECASE)
# Alternatives: "or" before a second answer of the task's kind. Only then, because choice texts hold "or" ("B) city
# or town"), and "150 minutes, or 2.5 hours" restates one answer (a comma before "or" is not an alternative).
# Expressions have none: "x = 2 or x = 3" is how a MATH answer lists the solutions of an equation.
_ALTERNATIVE_RE = {
    "number": re.compile(r"(?<![,;])\s(?:or|and/or)\s+[-$\\(]*\d"),
    "letter": re.compile(r"(?<![,;])\s(?:or|and/or)\s+(?:\(?[A-J]\b|\([a-j]\))"),
    "yesno": re.compile(r"(?i)(?<![,;])\s(?:or|and/or)\s+(?:yes|no|true|false)\b"),
}


def _hedged(kind: str, s: str) -> bool:
    """Whether an answer string is negated, conditional or a choice between alternatives (looked for in its first
    sentence, so later reasoning on the same line does not count)."""
    first = re.split(r"\.(?:\s|$)|\n", s.strip())[0]
    alternative = _ALTERNATIVE_RE.get(kind)
    return bool(_NEGATED_RE.search(first) or _UNSURE_RE.search(first) or (alternative and alternative.search(first)))


def _valid(kind: str, letters: str, s: str) -> bool:
    if kind == "number":
        return to_number(s) is not None
    if kind == "letter":
        return _letter(s, letters) is not None
    if kind == "yesno":
        return _yesno(s) is not None
    return bool(s.strip())


def _from_phrase(kind: str, letters: str, s: str) -> str | None:
    """The answer at the start of the text after 'answer is'."""
    s = s.strip()
    if kind == "number":
        t = re.split(r"\.(?:\s|$)", _unwrap(s))[0]
        # "2 + 3 = 5": an equation that opens the answer means its result, the value after its last "="
        eq = re.match(r"(?:[^=a-zA-Z\\]|\\[a-zA-Z]+)*=(?:[^a-zA-Z\\]|\\[a-zA-Z]+)*", t)
        if eq:
            t = eq.group(0).rsplit("=", 1)[-1]
        nums = _NUM_RE.findall(t)
        return nums[0] if nums else None
    if kind == "letter":
        return _letter(s, letters)
    if kind == "yesno":
        return _yesno(s)
    m = re.match(r"\$([^$]+)\$", s)  # "answer is $\frac{1}{2}$, which ..."
    s = m.group(1) if m else re.split(r"\.\s", s)[0].rstrip(".")
    return s.strip() or None


def _scan(kind: str, letters: str, text: str) -> str | None:
    """The last answer-like token anywhere in the text."""
    if kind in ("number", "expression"):
        nums = _NUM_RE.findall(re.sub(r"\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}", r"\1/\2", text))
        return nums[-1] if nums else None
    if kind == "letter":
        for m in reversed(list(_LETTER_SCAN_RE.finditer(text))):
            L = next(g for g in m.groups() if g)
            if m.group(3) and L in "AI" and re.match(r"\s+[a-z]", text[m.end():]):
                continue  # "A bank is ...", "I think ...": an article or a pronoun
            if L.upper() in letters:
                return L.upper()
        return None
    # "no" before a noun is a determiner, not an answer: "Yes, no doubt." answers yes
    m = re.findall(r"\b(yes|true|false|no(?![ \t]+(?!(?:because|since|as|but|and|so|it|they|he|she|this|that|there|i|we)\b)[a-z]))\b",
                   text, re.IGNORECASE)
    return m[-1] if m else None


def extract_answer(task: str, text: str, strict: bool = False) -> str | None:
    """The answer in a generation, for a task name (gsm8k, csqa, ...) or an answer kind (number, expression,
    letter, yesno). Strict: X of the last canonical final line `The answer is X.`, as written. Flexible (default):
    that X if it is an answer of the task's kind, else the last \\boxed{}, else the last "answer is X" /
    "Answer: X" / "#### X", else the last number / choice letter / yes-no in the text. None when nothing is found,
    and when the answer it would read is negated, conditional or a choice between alternatives ("not 5", "A or B",
    "yes or no, depending on ...")."""
    kind, letters = task_spec(task)
    text = text.replace("\u2212", "-")
    final = None
    for ln in reversed([ln for ln in text.strip().split("\n") if ln.strip()]):
        m = _FINAL_RE.match(ln)
        if m:  # the last final line wins (models sometimes restate)
            final = m.group(1).strip()
            break
    if final is not None and _hedged(kind, final):
        return None  # the model's last word commits to nothing; an answer read from earlier text would not be its own
    if strict:
        return final
    if final is not None and _valid(kind, letters, final):
        return final
    b = last_boxed(text)
    if b is not None and _hedged(kind, _unwrap(b)):
        return None
    if b is not None and _valid(kind, letters, b):
        return b
    for m in reversed(list(_PHRASE_RE.finditer(text))):
        if _hedged(kind, m.group(1)):
            return None
        found = _from_phrase(kind, letters, m.group(1))
        if found is not None:
            return found
    return _scan(kind, letters, text)


def is_correct(task: str, pred: str | None, gold: str) -> bool:
    """Whether an extracted answer matches the gold one, for a task name or an answer kind. Numbers compare as
    numbers (commas, $, %, unit words and trailing .0 ignored; 3/4 == 0.75); MATH expressions with math_verify;
    letters case-insensitively; yes/no/true/false as booleans. A negated or hedged pred ("not 5") is wrong."""
    kind, letters = task_spec(task)
    if pred is None or _hedged(kind, pred):  # "not 5" / "A or B" passed in directly is no answer either
        return False
    if kind == "number":
        p, g = to_number(pred), to_number(gold)
        if p is not None and g is not None:
            return abs(p - g) <= 1e-6 * max(1.0, abs(g))
        return _unwrap(pred).lower() == _unwrap(gold).lower()
    if kind == "letter":
        p = _letter(pred, letters)
        return p is not None and p == _letter(gold, letters)
    if kind == "yesno":
        p = _yesno(pred)
        return p is not None and p == _yesno(gold)
    return math_equal(pred, gold)


def math_equal(pred: str, gold: str) -> bool:
    """MATH-style equivalence: plain numbers numerically, then math_verify (gold first: it is not symmetric)."""
    p, g = normalize_answer("expression", pred), normalize_answer("expression", gold)
    if p is None or g is None:
        return False
    if p.replace(" ", "") == g.replace(" ", "") or _unwrap(p).lower() == _unwrap(g).lower():  # \text{Evelyn}
        return True
    pn, gn = parse_number(_unwrap(p)), parse_number(_unwrap(g))
    if pn is not None and gn is not None:
        return abs(pn - gn) <= 1e-6 * max(1.0, abs(gn))
    from math_verify import parse, verify  # sympy is slow to import; only MATH grading needs it
    # math_verify's timeouts use SIGALRM, which only the main thread may set (a threaded teacher judge is not)
    t = 5 if threading.current_thread() is threading.main_thread() else None
    gp, pp = parse(f"${g}$", parsing_timeout=t), parse(f"${p}$", parsing_timeout=t)
    return bool(gp) and bool(pp) and verify(gp, pp, timeout_seconds=t)


# -----------------------------------------------------------------------------
# Benchmarks: every supported row schema becomes {id, question, answer, kind}, the question with its choices
# listed for multiple choice and the answer normalised (number string / letter / yes|no / LaTeX expression).

def detect_schema(row) -> str | None:
    """Which dataset schema a JSON / CSV row follows (None: none we know)."""
    if not isinstance(row, dict):
        return None
    if "Question" in row and "Correct Answer" in row and "Incorrect Answer 1" in row:
        return "gpqa"
    if "Body" in row and "Question" in row and "Answer" in row:
        return "svamp"
    if "problem" in row and ("answer" in row or "solution" in row):
        return "math"
    if "answerKey" in row and ("choices" in row or isinstance(row.get("question"), dict)):
        return "csqa"
    if "question" in row and "answer" in row:
        if isinstance(row["answer"], bool):
            return "strategyqa"
        if isinstance(row["answer"], str) and "####" in row["answer"]:
            return "gsm8k"
        return "plain"
    return None


def with_choices(question: str, labels: list[str], texts: list[str]) -> str:
    return question.strip() + "\n" + "\n".join(f"{lab}. {str(t).strip()}" for lab, t in zip(labels, texts))


def gpqa_choices(row: dict, seed: int = GPQA_SEED) -> tuple[list[str], str]:
    """The four answers of a GPQA row in a shuffled order and the letter of the correct one. The order is a fixed
    function of (seed, question text), so it is the same in every run, whatever the file order or --limit."""
    texts = [str(row[k]).strip() for k in GPQA_COLUMNS[1:]]
    order = list(range(4))
    random.Random(f"gpqa:{seed}:{str(row['Question']).strip()}").shuffle(order)  # str seeds hash stably (sha512)
    return [texts[i] for i in order], "ABCD"[order.index(0)]


def _question_answer(schema: str, row: dict) -> tuple[str, object]:
    """(question text, raw gold answer) of a row of a known schema."""
    if schema == "gsm8k":
        return row["question"], row["answer"].split("####")[-1]
    if schema == "svamp":  # the Body/Question join of the Qwen2.5-Math evaluation
        body = str(row["Body"]).strip()
        body = body if body.endswith((".", "?", "!")) else body + "."
        return body + " " + str(row["Question"]).strip(), row["Answer"]
    if schema == "math":
        gold = row.get("answer")
        return row["problem"], gold if gold not in (None, "") else last_boxed(row.get("solution") or "")
    if schema == "csqa":
        q = row["question"]
        if isinstance(q, dict):  # the original CommonsenseQA jsonl: {"stem", "choices": [{"label", "text"}]}
            labels, texts = [c["label"] for c in q["choices"]], [c["text"] for c in q["choices"]]
            return with_choices(q["stem"], labels, texts), row["answerKey"]
        return with_choices(q, row["choices"]["label"], row["choices"]["text"]), row["answerKey"]
    if schema == "gpqa":
        choices, gold = gpqa_choices(row)
        return with_choices(str(row["Question"]), list("ABCD"), choices), gold
    return row["question"], row["answer"]  # strategyqa, plain


def to_example(row, where: str = "", task: str | None = None, default_id: str = "") -> dict:
    """{id, question, answer, kind} from one benchmark row in any supported schema. task (a task name or answer
    kind) fixes the kind; otherwise it follows the schema (or, for plain rows, the gold answer). Bad rows stop the
    run with an error naming `where` (file:line)."""
    schema = detect_schema(row)
    if schema is None:
        keys = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
        raise SystemExit(f"error: {where}: unknown row schema ({keys}); expected the Hugging Face schema of "
                         f"GSM8K, SVAMP, MATH, CommonsenseQA, StrategyQA or GPQA, or 'question' and 'answer'")
    try:
        question, raw = _question_answer(schema, row)
    except (KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"error: {where}: malformed {schema} row ({type(e).__name__}: {e})")
    if task is not None:
        kind = task_spec(task)[0]
    else:
        kind = {"gsm8k": "number", "svamp": "number", "math": "expression", "csqa": "letter", "gpqa": "letter",
                "strategyqa": "yesno"}.get(schema) or answer_kind(raw)
    if isinstance(raw, bool):
        raw = "yes" if raw else "no"
    gold = None if raw is None else normalize_answer(task or kind, raw)
    if not str(question).strip() or gold is None:
        raise SystemExit(f"error: {where}: no question or no {kind} gold answer (answer {raw!r})")
    rid = next((row[k] for k in ("id", "ID", "unique_id", "Record ID", "qid") if row.get(k) not in (None, "")), default_id)
    return {"id": str(rid), "question": str(question).strip(), "answer": gold, "kind": kind}


def read_rows(path: str):
    """(where, row) for every row of a JSONL, JSON-list or CSV file; where = 'path:line'."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: no such file")
    with open(path, encoding="utf-8-sig", newline="" if path.endswith(".csv") else None) as f:
        if path.endswith(".csv"):
            reader = csv.DictReader(f)
            for row in reader:
                yield f"{path}:{reader.line_num}", row
            return
        head = f.read(1)
        while head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":  # a JSON list (the mentor-kd / Fine-tune-CoT dumps)
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{e.lineno}: not valid JSON ({e.msg})")
            for i, row in enumerate(rows):
                yield f"{path}[{i}]", row
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{lineno}: not valid JSON ({e.msg})")
            yield f"{path}:{lineno}", row


def read_examples(path: str, task: str | None = None, prefix: str | None = None) -> list[dict]:
    """to_example over a whole file; ids default to PREFIX-<row index> and are made unique."""
    prefix = prefix or task or os.path.splitext(os.path.basename(path))[0]
    out, seen = [], {}
    for i, (where, row) in enumerate(read_rows(path)):
        ex = to_example(row, where, task, default_id=f"{prefix}-{i}")
        n = seen[ex["id"]] = seen.get(ex["id"], 0) + 1
        if n > 1:  # ids key the resume cache
            ex["id"] = f"{ex['id']}#{n}"
        out.append(ex)
    return out


def task_path(task: str, data_dir: str | None = None, gpqa_csv: str | None = None) -> str:
    """The file a task reads: DATA_DIR (or data_dir) / its file, --gpqa-csv for GPQA, or the task itself when it
    is a path to a data file. Stops with an error saying what is missing."""
    if task == "gpqa_diamond":
        if not gpqa_csv:
            raise SystemExit(f"error: task gpqa_diamond needs --gpqa-csv. {GPQA_HELP}")
        if not os.path.isfile(gpqa_csv):
            raise SystemExit(f"error: --gpqa-csv {gpqa_csv}: no such file. {GPQA_HELP}")
        # checked here, before any model is loaded; each row would otherwise fail as an "unknown row schema"
        with open(gpqa_csv, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), [])
        missing = [c for c in GPQA_COLUMNS if c not in header]
        if missing:
            raise SystemExit(f"error: --gpqa-csv {gpqa_csv}: missing columns {', '.join(repr(c) for c in missing)} "
                             f"(has {', '.join(repr(c) for c in header[:8]) or 'no header'}); expected the official "
                             f"gpqa_diamond.csv. {GPQA_HELP}")
        return gpqa_csv
    if task in TASKS:
        path = os.path.join(data_dir or DATA_DIR, TASKS[task].file)
        if not os.path.isfile(path):
            flag = f"--data-dir {data_dir}" if data_dir else "the shipped data/benchmarks/"
            raise SystemExit(f"error: {path}: no such file ({flag} must hold {TASKS[task].file} in the schema of "
                             f"{TASKS[task].hf})")
        return path
    if os.path.isfile(task):
        return task
    raise SystemExit(f"error: unknown task {task!r}: expected one of {', '.join(TASKS)} or a data file")


def task_name(task: str) -> str:
    return task if task in TASKS else os.path.splitext(os.path.basename(task))[0]


def load_task(task: str, path: str | None = None, data_dir: str | None = None, gpqa_csv: str | None = None) -> list[dict]:
    """[{id, question, answer, kind}] of a benchmark (gsm8k, svamp, math500, csqa, strategyqa, gpqa_diamond) read
    from path, default its file under data_dir / DATA_DIR (--gpqa-csv for GPQA); or of any data file given as the
    task, each row's kind following its schema."""
    path = path or task_path(task, data_dir, gpqa_csv)
    return read_examples(path, task if task in TASKS else None, task_name(task))


def read_questions(path: str) -> list[dict]:
    """{id, question, answer, kind} rows of any supported schema from a JSONL file (the training format and
    plain {question, answer} rows qualify)."""
    return read_examples(path)


# -----------------------------------------------------------------------------
# The prompt: one user turn in the model's chat template, the rationale as the assistant turn

HINTS = {
    "number": "a number",
    "expression": "a simplified expression",
    "letter": "the letter of the correct choice",
    "yesno": "yes or no",
}


def user_message(question: str, kind: str = "number") -> str:
    # short on purpose: it is repeated in front of every rationale the student trains on
    return f"{question}\nThink step by step. End with \"{FINAL_PREFIX} X.\" (X: {HINTS[kind]})"


def chat_prompt(tokenizer, question: str, kind: str = "number") -> str:
    """The text the student is conditioned on, ending where its answer begins."""
    msg = user_message(question, kind)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                             add_generation_prompt=True)
    return f"Question: {msg}\nAnswer: "  # base models without a chat template


def end_of_turn(tokenizer) -> str:
    """The string that closes an assistant turn in this tokenizer's chat template (<|im_end|> for ChatML),
    found by rendering a dummy turn; falls back to the EOS token."""
    if getattr(tokenizer, "chat_template", None):
        probe = "XYZZY"
        text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}],
                                             tokenize=False)
        tail = text[text.rfind(probe) + len(probe):]
        specials = sorted((t for t in tokenizer.all_special_tokens + list(getattr(tokenizer, "added_tokens_encoder", {}))
                           if t and t in tail), key=tail.find)
        if specials:
            return specials[0]
    return tokenizer.eos_token or ""


def stop_token_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer))}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)


@dataclass
class Encoded:
    input_ids: list[int]
    prompt_len: int  # tokens [0, prompt_len) are the prompt (no loss)
    answer_start: int  # tokens [answer_start, answer_end) are X of the final line
    answer_end: int
    n_cut: int = 0  # rationale-body tokens dropped to fit max_len


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_example(tokenizer, question: str, rationale: str, answer: str | None = None,
                   max_len: int | None = None, kind: str | None = None) -> Encoded:
    """Token ids of prompt + rationale body + final line + end of turn.

    Segments are tokenised separately and concatenated, so the answer X has the same ids under every
    perspective (a BPE merge across the body/final-line boundary cannot change them); the consistency
    loss compares the student's distributions exactly at [answer_start, answer_end).
    Over max_len, tokens are cut from the end of the rationale body, never from the final line."""
    body, found = split_final_line(rationale)
    answer = str(answer if answer is not None else found)
    if answer in ("None", ""):
        raise ValueError(f"rationale has no final line and no answer was given: {rationale[-80:]!r}")
    prompt = _ids(tokenizer, chat_prompt(tokenizer, question, kind or answer_kind(answer)))
    body_ids = _ids(tokenizer, body + "\n") if body else []
    pre = _ids(tokenizer, FINAL_PREFIX)
    ans = _ids(tokenizer, " " + answer)
    post = _ids(tokenizer, ".") + _ids(tokenizer, end_of_turn(tokenizer))
    n_cut = 0
    if max_len is not None:
        room = max_len - len(prompt) - len(pre) - len(ans) - len(post)
        if room < 0:
            raise ValueError(f"prompt and final line alone take {max_len - room} tokens > --max-len {max_len}")
        n_cut = max(0, len(body_ids) - room)
        body_ids = body_ids[:len(body_ids) - n_cut]
    ids = prompt + body_ids + pre + ans + post
    a0 = len(prompt) + len(body_ids) + len(pre)
    return Encoded(ids, len(prompt), a0, a0 + len(ans), n_cut)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(items: list[Encoded], tokenizer) -> dict[str, torch.Tensor]:
    """Right-padded teacher-forcing batch.

    labels: the ids on the completion (rationale + final line + end of turn), -100 on prompt and padding.
    completion_mask: the completion positions (what features are pooled over).
    answer_pos[n,a]: the position whose logits predict answer token a (= answer_start - 1 + a),
    answer_mask[n,a]: which of the A slots are real for this sequence."""
    N, T = len(items), max(len(e.input_ids) for e in items)
    A = max(e.answer_end - e.answer_start for e in items)
    input_ids = torch.full((N, T), pad_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((N, T), dtype=torch.long)
    labels = torch.full((N, T), -100, dtype=torch.long)
    completion_mask = torch.zeros((N, T), dtype=torch.bool)
    answer_pos = torch.zeros((N, A), dtype=torch.long)
    answer_mask = torch.zeros((N, A), dtype=torch.bool)
    for n, e in enumerate(items):
        L = len(e.input_ids)
        input_ids[n, :L] = torch.tensor(e.input_ids)
        attention_mask[n, :L] = 1
        labels[n, e.prompt_len:L] = input_ids[n, e.prompt_len:L]
        completion_mask[n, e.prompt_len:L] = True
        a = e.answer_end - e.answer_start
        answer_pos[n, :a] = torch.arange(e.answer_start - 1, e.answer_end - 1)
        answer_mask[n, :a] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "completion_mask": completion_mask, "answer_pos": answer_pos, "answer_mask": answer_mask}


# -----------------------------------------------------------------------------
# Models

# short names of the paper's students (and their relatives) -> Hugging Face organisation
ORGS = {"Qwen": "Qwen", "Llama": "meta-llama", "SmolLM": "HuggingFaceTB"}


def resolve_model_name(name: str) -> str:
    """Local paths win; `Qwen2.5-1.5B` -> `Qwen/Qwen2.5-1.5B`, `Llama-3.1-8B` -> `meta-llama/Llama-3.1-8B`."""
    if os.path.exists(name) or "/" in name:
        return name
    for prefix, org in ORGS.items():
        if name.startswith(prefix):
            return f"{org}/{name}"
    return name


def load_tokenizer(path: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    cfg = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg):
        with open(cfg) as f:
            cls = json.load(f).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            # a tokenizer trained here (the tiny student). AutoTokenizer would pick the class of the model family
            # from config.json (Qwen2Tokenizer), which swaps in that family's pre-tokenizer and changes the ids.
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def load_model(path: str, device: str = "cpu", dtype=None):
    from transformers import AutoModelForCausalLM
    path = resolve_model_name(path)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).to(device).eval()
    return model, tokenizer


def model_id(model, path: str | None = None) -> str:
    """Which weights produced a generation, for the resume cache: a local checkpoint's path and the time its
    files were last written (retraining into the same directory changes it), else the model's name."""
    if path and os.path.isdir(path):
        mtime = max((os.path.getmtime(os.path.join(path, f)) for f in os.listdir(path)), default=0.0)
        return f"{os.path.abspath(path)}@{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(mtime))}"
    return path or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__


# -----------------------------------------------------------------------------
# Batched greedy generation


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 512, batch_size: int = 32,
             progress: bool = True, desc: str = "generate", on_batch=None, temperature: float = 0.0) -> list[str]:
    """Greedy (sampled when temperature > 0: the hf: teacher), left-padded, KV-cached; each output stops at the first
    EOS / end-of-turn token.
    Prompts are sorted by length, longest first, so a batch wastes little padding and an out-of-memory error shows
    at once. on_batch(indices, outputs) is called as each batch finishes (the resume cache appends there)."""
    from transformers import GenerationConfig
    device = next(model.parameters()).device
    enc = [_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(enc[i]))
    pad = pad_id(tokenizer)
    stops = stop_token_ids(tokenizer)
    # every knob explicit: a checkpoint's generation_config.json (Qwen-Instruct: repetition_penalty 1.05,
    # temperature 0.7) would otherwise fill in whatever is left unset
    gc = GenerationConfig(do_sample=temperature > 0, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=stops,
                          pad_token_id=pad, repetition_penalty=1.0, no_repeat_ngram_size=0,
                          temperature=temperature or 1.0, top_p=1.0, top_k=50, use_cache=True)
    out = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(enc[i]):] = torch.tensor(enc[i], dtype=torch.long)
            att[r, width - len(enc[i]):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), generation_config=gc)
        texts = []
        for r, i in enumerate(idx):
            new = gen[r, width:].tolist()
            cut = next((t for t, tok in enumerate(new) if tok in stops), len(new))
            out[i] = tokenizer.decode(new[:cut], skip_special_tokens=True)
            texts.append(out[i])
        if on_batch is not None:
            on_batch(idx, texts)
        bar.update(len(idx))
    bar.close()
    return out


# -----------------------------------------------------------------------------
# Evaluation


def grade(task: str, output: str, gold: str) -> dict:
    """Strict and flexible answers of one generation and whether each is right."""
    strict, pred = extract_answer(task, output, strict=True), extract_answer(task, output)
    return {"pred": pred, "pred_strict": strict, "correct": is_correct(task, pred, gold),
            "correct_strict": is_correct(task, strict, gold)}


def summarize(records: list[dict]) -> dict:
    n = len(records)
    return {"n": n, "accuracy": sum(r["correct"] for r in records) / max(1, n),
            "strict_accuracy": sum(r["correct_strict"] for r in records) / max(1, n),
            "no_answer": sum(r["pred"] is None for r in records),
            "no_final_line": sum(r["pred_strict"] is None for r in records)}


def write_text(path: str, text: str) -> None:
    """Atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_jsonl(path: str, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_cache(path: str) -> dict[str, dict]:
    """id -> record of the generations already in path; a partial last line (an interrupted write) is ignored."""
    done = {}
    if not os.path.exists(path):
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict) and "id" in r and isinstance(r.get("output"), str):
                done[str(r["id"])] = r
    return done


def evaluate(model, tokenizer, rows: list[dict], max_new_tokens: int = 512, batch_size: int = 32,
             progress: bool = True, desc: str = "eval", task: str | None = None, out_path: str | None = None,
             resume: bool = False, model_name: str | None = None) -> tuple[dict, list[dict]]:
    """rows: dicts with question and answer (and id and kind, as load_task gives them).
    task: a task name or answer kind for every row; default each row's kind, else answer_kind(its answer).
    out_path: a JSONL that gets each record as soon as its batch is done and, at the end, all records in row
    order; with resume, the records already there for the same model (model_name), prompt and max_new_tokens
    are kept and not generated again.
    Returns (metrics {n, accuracy (flexible), strict_accuracy, no_answer, no_final_line}, per-question records)."""
    was_training = model.training
    model.eval()
    name = model_name or model_id(model)
    specs = [task or r.get("kind") or answer_kind(r["answer"]) for r in rows]
    ids = [str(r.get("id", i)) for i, r in enumerate(rows)]
    prompts = [chat_prompt(tokenizer, r["question"], task_spec(k)[0]) for r, k in zip(rows, specs)]

    def record(i: int, output: str) -> dict:
        g = grade(specs[i], output, rows[i]["answer"])
        return {"id": ids[i], "question": rows[i]["question"], "prompt": prompts[i], "output": output,
                "pred": g["pred"], "pred_strict": g["pred_strict"], "gold": rows[i]["answer"],
                "correct": g["correct"], "correct_strict": g["correct_strict"], "model": name,
                "max_new_tokens": max_new_tokens}

    records = [None] * len(rows)
    f = None
    if out_path:
        cached = read_cache(out_path) if resume else {}
        for i in range(len(rows)):
            c = cached.get(ids[i])
            same = c and c.get("model") == name and c.get("max_new_tokens") == max_new_tokens
            if same and c.get("prompt") == prompts[i]:
                records[i] = record(i, c["output"])  # graded again: grader fixes apply to old generations
        stale = sum(1 for c in cached.values() if c.get("model") != name or c.get("max_new_tokens") != max_new_tokens)
        if stale:
            print(f"note: {out_path}: {stale} cached generations come from another model or --max-new-tokens; "
                  f"they are generated again", file=sys.stderr)
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        # start the cache from the kept records only: drops a partial last line and stale records
        write_jsonl(out_path, [r for r in records if r is not None])
        f = open(out_path, "a", encoding="utf-8")
    todo = [i for i in range(len(rows)) if records[i] is None]

    def on_batch(idx: list[int], outputs: list[str]) -> None:
        for j, o in zip(idx, outputs):
            records[todo[j]] = record(todo[j], o)
            if f:
                f.write(json.dumps(records[todo[j]], ensure_ascii=False) + "\n")
        if f:
            f.flush()

    try:
        if todo:
            outputs = generate(model, tokenizer, [prompts[i] for i in todo], max_new_tokens, batch_size, progress,
                               f"{desc} ({len(rows) - len(todo)} cached)" if len(todo) < len(rows) else desc, on_batch)
            for j, i in enumerate(todo):
                records[i] = records[i] or record(i, outputs[j])
    finally:
        if f:
            f.close()
        model.train(was_training)
    if out_path:
        write_jsonl(out_path, records)
    return summarize(records), records


def evaluate_tasks(model, tokenizer, tasks: list[str], data_dir: str | None = None, gpqa_csv: str | None = None,
                   limit: int | None = None, max_new_tokens: int = 512, batch_size: int = 32,
                   out_dir: str | None = None, progress: bool = True, resume: bool = False,
                   model_name: str | None = None) -> dict[str, dict]:
    """Accuracy of a model on benchmarks (task names of TASKS, or paths of data files in any supported schema).
    -> {task: {n, accuracy, strict_accuracy, no_answer, no_final_line, kind, split, file}}.
    With out_dir: OUT/<task>.jsonl (every generation) and OUT/results.json, rewritten after each task; with
    resume, generations already in OUT/<task>.jsonl for the same model_name are reused.
    Every task's file is checked before the first generation, so a missing one fails at once."""
    paths = {t: task_path(t, data_dir, gpqa_csv) for t in tasks}
    names = [task_name(t) for t in tasks]
    if len(set(names)) < len(names):
        raise SystemExit(f"error: two tasks share a name: {', '.join(names)}")
    results = {}
    for t, name in zip(tasks, names):
        rows = load_task(t, paths[t])[:limit]
        out_path = os.path.join(out_dir, f"{name}.jsonl") if out_dir else None
        metrics, _ = evaluate(model, tokenizer, rows, max_new_tokens, batch_size, progress, name,
                              task=t if t in TASKS else None, out_path=out_path, resume=resume, model_name=model_name)
        kinds = sorted({r["kind"] for r in rows})
        results[name] = {**metrics, "kind": "/".join(kinds), "split": TASKS[t].split if t in TASKS else "",
                         "file": paths[t]}
        if out_dir:
            write_json(os.path.join(out_dir, "results.json"), results)
        if progress:  # a long run shows each task's result as it lands, not only the table at the end
            tqdm.write(f"{name}: flexible {metrics['accuracy']:.1%}, strict {metrics['strict_accuracy']:.1%} "
                       f"on {metrics['n']} ({metrics['no_answer']} without an answer)", file=sys.stderr)
    return results


def format_table(results: dict[str, dict]) -> str:
    """Markdown: one row per task (strict and flexible accuracy in %, outputs with no answer found), then the
    unweighted mean of the tasks' accuracies as the paper averages them."""
    lines = ["| task | split | n | strict acc | flexible acc | no answer | no final line |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, m in results.items():
        lines.append(f"| {name} | {m.get('split', '')} | {m['n']} | {100 * m['strict_accuracy']:.1f} | "
                     f"{100 * m['accuracy']:.1f} | {m['no_answer']} | {m['no_final_line']} |")
    if len(results) > 1:
        ms = list(results.values())
        strict, flexible = (100 * sum(m[k] for m in ms) / len(ms) for k in ("strict_accuracy", "accuracy"))
        lines.append(f"| mean | | {sum(m['n'] for m in ms)} | {strict:.1f} | {flexible:.1f} | "
                     f"{sum(m['no_answer'] for m in ms)} | {sum(m['no_final_line'] for m in ms)} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The paper's results table: base model and trained students side by side, accuracy per benchmark, the
# in-distribution and out-of-distribution averages, and each row's gain over the base model

ID_TASKS = tuple(t for t in TASKS if TASKS[t].split == "ID")  # gsm8k, svamp, math500
OOD_TASKS = tuple(t for t in TASKS if TASKS[t].split == "OOD")  # csqa, strategyqa, gpqa_diamond
# the paper's column order and headers
PAPER_COLUMNS = {"math500": "MATH500", "gsm8k": "GSM8K", "svamp": "SVAMP", "csqa": "CSQA",
                 "strategyqa": "StrategyQA", "gpqa_diamond": "GPQA-D", "id_avg": "ID avg", "ood_avg": "OOD avg"}
AVERAGES = {"id_avg": ID_TASKS, "ood_avg": OOD_TASKS}


def results_table(rows: dict[str, dict[str, dict]], base: str | None = "base") -> dict:
    """The paper's table from {row name: {task: metrics with 'accuracy' (0-1)}} (evaluate_tasks' results per model).
    -> {"columns": [task..., "id_avg", "ood_avg"], "headers": {column: header}, "base": base row or None,
        "rows": {name: {column: percent}}, "gain": {name: {column: points over the base row}}}.
    Accuracies are percents with one decimal; an average is the mean over the tasks of its group that the row has,
    and averages and gains are computed from the one-decimal numbers, so the table checks by hand. A task no row
    has is not a column; a cell a row lacks is None (no average or gain needs it). A gain on an average is None
    unless the row and the base row average the same tasks. Other entries of a row (data files, train.py's
    synthetic "id"/"ood" sets) are not in the paper's layout and are left out."""
    tasks = [t for t in PAPER_COLUMNS if t in TASKS and any(t in r for r in rows.values())]
    table_rows = {}
    for name, metrics in rows.items():
        row = {t: round(100 * metrics[t]["accuracy"], 1) if t in metrics else None for t in tasks}
        for avg, group in AVERAGES.items():
            vals = [row[t] for t in group if row.get(t) is not None]
            row[avg] = round(sum(vals) / len(vals), 1) if vals else None
        table_rows[name] = row
    base = base if base in rows else None
    gain = {}
    if base is not None:
        b = table_rows[base]
        for name, row in table_rows.items():
            if name == base:
                continue
            g = {t: None if row[t] is None or b[t] is None else round(row[t] - b[t], 1) for t in tasks}
            for avg, group in AVERAGES.items():
                same = [t for t in group if row.get(t) is not None] == [t for t in group if b.get(t) is not None]
                g[avg] = round(row[avg] - b[avg], 1) if same and row[avg] is not None else None
            gain[name] = g
    columns = tasks + list(AVERAGES)
    return {"columns": columns, "headers": {c: PAPER_COLUMNS[c] for c in columns}, "base": base,
            "rows": table_rows, "gain": gain}


def format_results_md(table: dict, skipped: dict[str, str] | None = None) -> str:
    """Markdown of results_table: the base row first, the others in their order, then one line per row with its
    gain over the base row; a missing cell is "—". skipped {task: reason} (default the table's own "skipped")
    adds a note line per benchmark that was not evaluated, GPQA-Diamond when no --gpqa-csv was given."""
    skipped = table.get("skipped", {}) if skipped is None else skipped
    cols, rows, base = table["columns"], table["rows"], table["base"]
    names = ([base] if base is not None else []) + [n for n in rows if n != base]

    def cells(values: dict, fmt: str) -> str:
        return " | ".join("—" if values.get(c) is None else format(values[c], fmt) for c in cols)

    lines = ["| | " + " | ".join(table["headers"][c] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {n} | {cells(rows[n], '.1f')} |" for n in names]
    lines += [f"| {n} − {base} | {cells(table['gain'][n], '+.1f')} |" for n in names if n in table["gain"]]
    if skipped:
        lines.append("")
    lines += [f"Note: {PAPER_COLUMNS.get(t, t)} was not evaluated: {reason}" for t, reason in skipped.items()]
    return "\n".join(lines) + "\n"


def write_results(out_dir: str, rows: dict[str, dict[str, dict]], skipped: dict[str, str] | None = None,
                  base: str | None = "base", name: str = "results") -> dict:
    """OUT/<name>.json (the table, the skipped benchmarks and the metrics it was made from, so a later script can
    put rows of several runs in one table) and OUT/<name>.md, each written atomically. Returns the table."""
    table = {**results_table(rows, base), "skipped": dict(skipped or {})}
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, f"{name}.json"), {**table, "metrics": rows})
    write_text(os.path.join(out_dir, f"{name}.md"), format_results_md(table))
    return table


# -----------------------------------------------------------------------------
# CLI

DEFAULT_TASKS = "gsm8k,svamp,math500,csqa,strategyqa"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows the module docstring as written and every flag's default."""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = ap.add_argument_group("model")
    g.add_argument("--model", required=True, help="checkpoint directory (train.py's OUT/ckpt) or Hugging Face name")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    g = ap.add_argument_group("data")
    g.add_argument("--tasks", default=None,
                   help=f"comma-separated benchmarks among {', '.join(TASKS)} (default: {DEFAULT_TASKS}, plus "
                        f"gpqa_diamond when --gpqa-csv is given; none when only --data is given)")
    g.add_argument("--data", nargs="+", default=[], metavar="FILE",
                   help="more JSONL files to evaluate, in any benchmark schema or plain question/answer rows")
    g.add_argument("--data-dir", default=None, help=f"folder with the benchmark files (default: {DATA_DIR})")
    g.add_argument("--gpqa-csv", default=None,
                   help="the official gpqa_diamond.csv (not shipped: see data/benchmarks/README.md)")
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions of each task")
    g = ap.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=512, help="generation budget per question")
    g.add_argument("--batch-size", type=int, default=32, help="questions generated together")
    g = ap.add_argument_group("output")
    g.add_argument("--out", default=None, help="directory for results.json and <task>.jsonl generations")
    g.add_argument("--no-resume", action="store_true",
                   help="generate everything again instead of reusing the generations already in --out")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and CI)")
    args = ap.parse_args(argv)

    for name in ("limit", "max_new_tokens", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} {v}: must be >= 1")
    if args.tasks is None:
        tasks = [] if args.data else DEFAULT_TASKS.split(",") + (["gpqa_diamond"] if args.gpqa_csv else [])
    else:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        for t in tasks:
            if t not in TASKS:
                ap.error(f"--tasks: unknown task {t!r}; choose from {', '.join(TASKS)}")
        if "gpqa_diamond" in tasks and not args.gpqa_csv:
            ap.error(f"--tasks gpqa_diamond needs --gpqa-csv. {GPQA_HELP}")
    tasks += args.data
    if not tasks:
        ap.error("nothing to evaluate: give --tasks or --data")
    if args.data_dir and not os.path.isdir(args.data_dir):
        ap.error(f"--data-dir {args.data_dir}: no such directory")
    for t in tasks:  # every file must be there before the model is loaded
        task_path(t, args.data_dir, args.gpqa_csv)

    if args.dtype == "auto":
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    path = resolve_model_name(args.model)
    if not os.path.exists(path) and (os.path.isabs(path) or path.startswith(".")):
        ap.error(f"--model {args.model}: no such directory")
    try:
        model, tokenizer = load_model(path, args.device, dtype)
    except OSError as e:
        raise SystemExit(f"error: --model {args.model}: cannot load {path!r} ({e})")
    results = evaluate_tasks(model, tokenizer, tasks, args.data_dir, args.gpqa_csv, args.limit, args.max_new_tokens,
                             args.batch_size, args.out, not args.no_progress, not args.no_resume, model_id(model, path))
    print(format_table(results))
    if args.out:
        print(f"wrote {os.path.join(args.out, 'results.json')} and the generations as {args.out}/<task>.jsonl")


if __name__ == "__main__":
    main()
