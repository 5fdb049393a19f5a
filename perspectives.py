"""
The eight reasoning perspectives of MIND, the training-data format, and the teachers that write it.

    python perspectives.py --teacher synthetic --n 2000 --out data/synth
    python perspectives.py --teacher openai:http://localhost:8000/v1#Qwen2.5-72B-Instruct
        --data ../shared/data/gsm8k_train_questions.jsonl --out data/gsm8k_mind.jsonl
    python perspectives.py --teacher hf:Qwen/Qwen2.5-7B-Instruct --data questions.jsonl --out data/mind.jsonl

A real teacher -- hf: a local transformers model, openai: any chat-completions server (vLLM, SGLang, OpenAI,
DeepSeek; key from $OPENAI_API_KEY) -- writes every question's eight rationales; the judge keeps a rationale only if
its answer is the gold one (eval.py's graders) and rewrites its last line as `The answer is X.`. OUT gets one line per
kept question as soon as it is judged; OUT.dropped.jsonl the questions the judge dropped or the server refused;
OUT.stats.json acceptance rates, requests and tokens of the whole output, across resumes. Rerunning the same
command resumes where a killed run stopped. --dry-run counts the requests and tokens first.

The synthetic teacher writes data/synth/{train,test_id,test_ood}.jsonl: seeded arithmetic word problems with one
rationale per perspective, an in-distribution test split, and a harder out-of-distribution split
(one more step, and question sentences the student never saw).

Every rationale ends with the canonical final line `The answer is X.` so that the answer span is
the same token sequence under every perspective (the consistency loss relies on it).
"""
import argparse
import email.utils
import http.client
import json
import os
import queue
import random
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from tqdm import tqdm

from eval import (FINAL_PREFIX, HelpFormatter, extract_answer, generate, is_correct, load_model, read_rows,
                  split_final_line, to_example, write_json, write_jsonl)

# -----------------------------------------------------------------------------
# The eight perspectives (names are the paper's; instructions are what the teacher is asked to do)


@dataclass(frozen=True)
class Perspective:
    key: str  # snake_case, used in data files and code
    name: str  # as the paper writes it
    instruction: str  # one line the teacher prompt is built from


PERSPECTIVES = [
    Perspective("formal_symbolic", "Formal-Symbolic",
                "Name the quantities with variables, write equations and derive the result symbolically; no narrative shortcuts."),
    Perspective("intuitive", "Intuitive",
                "Reason in everyday language with practical heuristics and analogies to experience; keep notation minimal."),
    Perspective("decomposition", "Decomposition",
                "Split the problem into numbered sub-problems, solve them in sequence, then combine the results."),
    Perspective("planning", "Planning",
                "First write a short high-level plan, then execute each step of the plan."),
    Perspective("analogy", "Analogy",
                "Map the problem to a simpler, structurally similar example, solve that, then transfer the structure back."),
    Perspective("socratic", "Socratic",
                "Make progress by asking yourself questions and answering them, one at a time."),
    Perspective("contrastive", "Contrastive",
                "Propose candidate approaches or answers, check them, eliminate the wrong ones and keep the right one."),
    Perspective("counterfactual", "Counterfactual",
                "Vary a condition of the problem to expose its critical constraints, then reason back to the answer."),
]
KEYS = [p.key for p in PERSPECTIVES]
K = len(KEYS)  # 8

# -----------------------------------------------------------------------------
# The canonical final line (parsed by eval.py, which owns answer extraction)


def final_line(answer: str) -> str:
    return f"{FINAL_PREFIX} {answer}."


def with_final_line(body: str, answer: str) -> str:
    """Replace (or add) the final line so that it reads exactly `The answer is {answer}.`."""
    body, _ = split_final_line(body)
    return f"{body}\n{final_line(answer)}" if body else final_line(answer)


def teacher_prompt(question: str, key: str) -> str:
    """What the teacher model is asked for one (question, perspective)."""
    p = PERSPECTIVES[KEYS.index(key)]
    return (f"Solve the problem below using the {p.name} perspective. {p.instruction}\n"
            f"Be concise. End with exactly one final line of the form \"{FINAL_PREFIX} X.\", where X is only the "
            f"final answer (a number without units or commas, a choice letter, or yes/no).\n\n"
            f"Problem: {question}")


# -----------------------------------------------------------------------------
# The training format: one question per JSON line
#   {"id": ..., "question": ..., "answer": ..., "rationales": {perspective_key: text, ...}}


@dataclass
class Example:
    id: str
    question: str
    answer: str
    rationales: dict[str, str] = field(default_factory=dict)  # key -> text ending in the final line

    def to_json(self) -> dict:
        return {"id": self.id, "question": self.question, "answer": self.answer, "rationales": self.rationales}


def read_training_jsonl(path: str, require_rationales: bool = True, warn=print) -> list[Example]:
    """Read the training format; bad lines are reported as `path:line: why` and skipped."""
    if not os.path.exists(path):
        raise SystemExit(f"error: {path}: no such file")
    examples, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                warn(f"warning: {where}: skipped, not valid JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                warn(f"warning: {where}: skipped, not a JSON object")
                continue
            question, answer = row.get("question"), row.get("answer")
            if not isinstance(question, str) or not question.strip():
                warn(f"warning: {where}: skipped, no question")
                continue
            if answer is None or str(answer).strip() == "":
                warn(f"warning: {where}: skipped, no answer")
                continue
            rats = row.get("rationales") or {}
            if not isinstance(rats, dict):
                warn(f"warning: {where}: skipped, 'rationales' is not an object")
                continue
            unknown = sorted(set(rats) - set(KEYS))
            if unknown:
                warn(f"warning: {where}: ignored unknown perspective(s) {unknown}")
            rats = {k: rats[k] for k in KEYS if isinstance(rats.get(k), str) and rats[k].strip()}
            if require_rationales and not rats:
                warn(f"warning: {where}: skipped, no rationale")
                continue
            qid = str(row.get("id", f"{os.path.basename(path)}-{lineno}"))
            if qid in seen:
                warn(f"warning: {where}: skipped, duplicate id {qid!r}")
                continue
            seen.add(qid)
            examples.append(Example(qid, question.strip(), str(answer).strip(), rats))
    return examples


def write_examples(path: str, examples: list[Example]) -> None:
    """The examples as MIND-format JSONL, atomically (eval.write_jsonl)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_jsonl(path, [ex.to_json() for ex in examples])


# -----------------------------------------------------------------------------
# The synthetic teacher: offline, deterministic, seeded.
#
# A problem is a person with a start count of objects and a few events that add or remove some.
# Numbers are kept to one digit (every running total in 0-9, changes 1-6), so the arithmetic is a table
# of ~70 facts that a ~1M-parameter student learns in minutes on a CPU; what remains hard is reading
# the problem: copying the right numbers in the right order. The in-distribution split has 1-2 events; so has the
# out-of-distribution split, worded with opening and question sentences that training never uses (3-event problems,
# the split of earlier versions, stayed at chance for every method within the budget: it said nothing).
# The eight styles differ the way real ones do: formal/decomposition are short and predictable,
# analogy and contrastive carry numbers that are not in the problem (an invented example, a wrong
# candidate), which is harder for a small student to predict.

MAX_VALUE, MAX_CHANGE = 9, 6
NAMES = {"Tom": "he", "Ann": "she", "Ben": "he", "Mia": "she", "Sam": "he", "Lily": "she", "Max": "he",
         "Eva": "she", "Leo": "he", "Zoe": "she", "Jack": "he", "Emma": "she", "Noah": "he", "Ella": "she",
         "Liam": "he", "Ava": "she"}
OBJECTS = ["apples", "pens", "cards", "stickers", "marbles", "books", "coins", "shells", "stamps",
           "cookies", "balloons", "rocks"]
# (sentence in the problem, short phrase inside rationales, its base form for "did not ...")
GAINS = [("buys {n} more", "buys {n}", "buy"), ("finds {n} more", "finds {n}", "find"),
         ("gets {n} from {friend}", "gets {n}", "get"), ("picks up {n} more", "picks up {n}", "pick up")]
LOSSES = [("gives {n} to {friend}", "gives away {n}", "give away"), ("loses {n}", "loses {n}", "lose"),
          ("sells {n}", "sells {n}", "sell"), ("uses {n}", "uses {n}", "use")]
OPENINGS_ID = ["{name} has {a} {obj}.", "At first {name} has {a} {obj}."]
QUESTIONS_ID = ["How many {obj} does {pronoun} have now?", "How many {obj} does {name} have in the end?"]
OPENINGS_OOD = ["{name} owns a box with {a} {obj} in it.", "There are {a} {obj} in {name}'s bag."]
QUESTIONS_OOD = ["What is the number of {obj} {name} ends up with?", "How many {obj} are left with {name}?"]


@dataclass
class Problem:
    name: str
    friend: str
    obj: str
    start: int
    events: list[tuple[int, int, int]]  # (sign +1/-1, amount, template index)

    def values(self) -> list[int]:
        """Running totals: start, after event 1, after event 2, ..."""
        out = [self.start]
        for sign, n, _ in self.events:
            out.append(out[-1] + sign * n)
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def event_sentence(self, i: int) -> str:
        sign, n, t = self.events[i]
        tpl = (GAINS if sign > 0 else LOSSES)[t][0]
        return tpl.format(n=n, obj=self.obj, friend=self.friend)

    def event_phrase(self, i: int, base: bool = False) -> str:
        sign, n, t = self.events[i]
        return (GAINS if sign > 0 else LOSSES)[t][2 if base else 1].format(n=n)


def sample_problem(rng: random.Random, steps: int) -> Problem:
    """Every running total stays in [0, MAX_VALUE], so every number the student writes is one digit."""
    name, friend = rng.sample(sorted(NAMES), 2)
    obj = rng.choice(OBJECTS)
    start = rng.randint(2, MAX_VALUE)
    events, total = [], start
    for _ in range(steps):
        can_gain, can_lose = total < MAX_VALUE, total > 0
        sign = rng.choice([1, -1]) if can_gain and can_lose else (1 if can_gain else -1)
        n = rng.randint(1, min(MAX_CHANGE, MAX_VALUE - total if sign > 0 else total))
        events.append((sign, n, rng.randrange(4)))
        total += sign * n
    return Problem(name, friend, obj, start, events)


def problem_text(p: Problem, rng: random.Random, ood: bool) -> str:
    opening = rng.choice(OPENINGS_OOD if ood else OPENINGS_ID)
    question = rng.choice(QUESTIONS_OOD if ood else QUESTIONS_ID)
    parts = [opening.format(name=p.name, a=p.start, obj=p.obj)]
    for i in range(len(p.events)):
        lead = f"Then {NAMES[p.name]}" if i else NAMES[p.name].capitalize()
        parts.append(f"{lead} {p.event_sentence(i)}.")
    parts.append(question.format(name=p.name, obj=p.obj, pronoun=NAMES[p.name]))
    return " ".join(parts)


def _op(sign: int) -> str:
    return "+" if sign > 0 else "-"


def _steps(p: Problem) -> list[str]:
    """The running computation `a + n = b` once per event."""
    v = p.values()
    return [f"{v[i]} {_op(s)} {n} = {v[i + 1]}" for i, (s, n, _) in enumerate(p.events)]


def synthetic_rationales(p: Problem, rng: random.Random) -> dict[str, str]:
    """One rationale per perspective, written programmatically from the problem's trace."""
    v, steps, obj, ans = p.values(), _steps(p), p.obj, p.answer
    gains = [n for s, n, _ in p.events if s > 0]
    losses = [n for s, n, _ in p.events if s < 0]
    r = {}
    # formal_symbolic: variables and equations only; the shortest, most regular style
    r["formal_symbolic"] = "\n".join([f"Let x = {p.start}."] + [f"x = {s}." for s in steps])
    # intuitive: narrative in everyday words
    lines = [f"{p.name} starts with {p.start} {obj}."]
    for i, s in enumerate(steps):
        lines.append(f"{p.name} {p.event_phrase(i)}, so now {NAMES[p.name]} has {s}.")
    r["intuitive"] = "\n".join(lines)
    # decomposition: numbered sub-problems, then combine
    lines = [f"{i + 1}. After the {'first second third fourth'.split()[i]} change: {s}." for i, s in enumerate(steps)]
    r["decomposition"] = "\n".join(lines + [f"Combining the parts gives {ans}."])
    # planning: plan first (gains, then losses), then execute it; a different computation path
    lines = ["Plan: add all gains to the start, then subtract all losses."]
    total = p.start
    for n in gains:
        lines.append(f"Add {n}: {total} + {n} = {total + n}.")
        total += n
    for n in losses:
        lines.append(f"Subtract {n}: {total} - {n} = {total - n}.")
        total -= n
    r["planning"] = "\n".join(lines)
    # analogy: solve a smaller invented case first (numbers not in the problem), then transfer
    a0 = rng.randint(1, 5)
    n0 = rng.randint(1, a0) if p.events[0][0] < 0 else rng.randint(1, 5)
    toy = f"{a0} {_op(p.events[0][0])} {n0} = {a0 + p.events[0][0] * n0}"
    r["analogy"] = "\n".join([f"A simpler case: with {a0} {obj}, the first change works like {toy}.",
                              "The same structure holds here:"] + [f"{s}." for s in steps])
    # socratic: ask and answer
    lines = [f"How many {obj} at the start? {p.start}."]
    for i, s in enumerate(steps):
        lines.append(f"What happens when {p.name} {p.event_phrase(i)}? {s}.")
    lines.append(f"How many are left at the end? {ans}.")
    r["socratic"] = "\n".join(lines)
    # contrastive: a wrong candidate that adds every number, checked against the right one
    wrong = p.start + sum(n for _, n, _ in p.events)
    wrong_expr = " + ".join([str(p.start)] + [str(n) for _, n, _ in p.events])
    lines = [f"Candidate A adds every number: {wrong_expr} = {wrong}."]
    if losses:
        lines.append("But losses lower the count, so A is wrong.")
    else:
        lines.append("Every change is a gain, so A could be right; check it step by step.")
    lines.append("Candidate B goes step by step: " + ", ".join(steps) + ".")
    lines.append(f"B is right: {ans}.")
    r["contrastive"] = "\n".join(lines)
    # counterfactual: remove the last change, then put it back
    last_n = p.events[-1][1]
    lines = [f"Suppose {p.name} did not {p.event_phrase(len(steps) - 1, base=True)} the last {last_n}."]
    lines += [f"Then: {s}." for s in steps[:-1]] or [f"Then there would be {p.start}."]
    lines.append(f"With that change back in: {steps[-1]}.")
    r["counterfactual"] = "\n".join(lines)
    return {k: with_final_line(r[k], str(ans)) for k in KEYS}


def synthetic_examples(n: int, seed: int, split: str) -> list[Example]:
    """`split` is train / test_id (1-2 events), test_ood (1-2 events, opening and question sentences that training
    never uses: a change of wording, as SVAMP is to GSM8K) or pretrain (1 event: train.py's stage 0)."""
    offset = {"train": 0, "test_id": 1, "test_ood": 2, "pretrain": 3}[split]
    rng = random.Random(f"mind-synthetic-{seed}-{offset}")  # each split its own stream
    ood = split == "test_ood"
    out, seen = [], set()
    while len(out) < n:
        p = sample_problem(rng, steps=1 if split == "pretrain" else rng.choice([1, 2]))
        q = problem_text(p, rng, ood)
        if q in seen:
            continue
        seen.add(q)
        out.append(Example(f"synth-{split}-{seed}-{len(out)}", q, str(p.answer), synthetic_rationales(p, rng)))
    return out


def synthetic_splits(n_train: int, n_test: int, seed: int) -> dict[str, list[Example]]:
    splits = {s: synthetic_examples(n_train if s == "train" else n_test, seed, s)
              for s in ("train", "test_id", "test_ood")}
    # no test question is also a training question (the world is small: 1-step problems repeat)
    train_q = {ex.question for ex in splits["train"]}
    splits["test_id"] = [ex for ex in splits["test_id"] if ex.question not in train_q]
    return splits


# -----------------------------------------------------------------------------
# The teacher pipeline: a real teacher writes the eight rationales of every question; the judge keeps the right ones.
#
# --data is read with eval.py's loaders and judged with its graders, so a rationale counts as right exactly when
# eval.py would grade its answer right. OUT gets one line per kept question, appended and flushed the moment the
# question is judged; OUT.dropped.jsonl one line per question the judge dropped (with the correct rationales it had)
# or the server refused (HTTP 400 / 413 / 422, with its message), so that a rerun does not pay for it again. Every
# line carries its question's counts (requests, tokens, samples), and OUT.stats.json is summed from the lines, so it
# describes the whole output however many runs wrote it. A question on which the teacher failed (retries exhausted)
# is in neither file, so the next run asks again.

STOP = threading.Event()  # Ctrl-C or a fatal error: worker threads send no new request
DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo_perspectives.jsonl")


class TeacherError(Exception):
    """The teacher refuses every request (bad key, unknown model or URL): fatal, unlike one failing question."""


def _sleep(seconds: float) -> None:
    STOP.wait(seconds)  # a back-off that Ctrl-C cuts short (the tests replace it to record the waits)


def approx_tokens(text: str) -> int:
    return len(text) // 4 + 1  # ~4 characters per token: the dry run, and servers that send no `usage`


@dataclass
class Reply:
    """One sample of the teacher. text None: no usable answer after every retry, or not sent."""
    text: str | None
    attempts: int = 0  # HTTP requests (or generated sequences) behind it; 0: not sent
    tokens_in: int = 0
    tokens_out: int = 0
    error: str = ""
    truncated: bool = False  # cut off by --max-tokens
    rejected: bool = False  # the server refused this request for good (HTTP 400 / 413 / 422): drop the question
    fatal: bool = False  # the server refuses every request (bad key, wrong URL): stop the run
    timeouts: int = 0  # attempts that timed out


def load_questions(path: str, limit: int | None = None) -> list[dict]:
    """{id, question, answer, kind} per row of a questions file in any schema eval.py reads (GSM8K with `####` or a
    bare answer, SVAMP, MATH, CommonsenseQA, StrategyQA, plain question/answer rows, the training format). The id is
    the row's own (SVAMP `ID`, MATH `unique_id`, ...) or `<file stem>-<line>`: stable across runs, as resuming needs."""
    stem = os.path.splitext(os.path.basename(path))[0]
    out, seen = [], {}
    for where, row in read_rows(path):
        q = to_example(row, where, default_id=f"{stem}-{where[len(path):].strip(':[]')}")
        n = seen[q["id"]] = seen.get(q["id"], 0) + 1
        if n > 1:  # two rows under one id would resume as one
            q["id"] = f"{q['id']}#{n}"
        out.append(q)
        if limit and len(out) >= limit:
            break
    if not out:
        raise SystemExit(f"error: --data {path}: no questions")
    return out


_THINK_RE = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)
# where a teacher states its conclusion: the phrases eval.py's flexible grader reads an answer from, with the
# connective that leads into them ("..., so the answer is 5.")
_CONCLUSION_RE = re.compile(r"(?:\b(?:so|thus|therefore|hence)\b[\s,]*)?(?:\bthe\s+)?(?:final\s+)?\banswer\s*"
                            r"(?:is|:|=|would be|should be)|####|\\boxed", re.IGNORECASE)


def judge(text: str, q: dict, strict: bool = False) -> str | None:
    """The rationale with its conclusion rewritten as the final line `The answer is X.` (X the gold answer) if the
    answer it reaches is right by eval.py's graders (strict: only from a final line `The answer is X.`); None if it is
    wrong or missing, or if nothing but the answer is left."""
    text = _THINK_RE.sub("", text).strip()  # a reasoning model's scratchpad is not the rationale
    if not is_correct(q["kind"], extract_answer(q["kind"], text, strict=strict), q["answer"]):
        return None
    lines = text.split("\n")
    # The last line stating a conclusion ends the rationale: the grader read the answer there or before, and what
    # follows it ("I hope this helps!") is not reasoning (kept, the final line would come twice). Restatements
    # before it ("The answer is 18.\n#### 18") go too. Reasoning on the same line, before the phrase, stays: a
    # one-line rationale "3 + 2 = 5, so the answer is 5." keeps "3 + 2 = 5.".
    ends = [i for i, ln in enumerate(lines) if _CONCLUSION_RE.search(ln)]
    if ends:
        lines = lines[:ends[-1] + 1]
        while lines and _CONCLUSION_RE.search(lines[-1]):
            before = lines[-1][:_CONCLUSION_RE.search(lines[-1]).start()].rstrip(" \t*,;:-")
            if re.search(r"\w", before):
                lines[-1] = before if before.endswith((".", "!", "?")) else before + "."
                break
            lines.pop()
    body = "\n".join(lines).strip()
    return f"{body}\n{final_line(q['answer'])}" if body else None


def too_short(rationale: str, min_words: int) -> bool:
    """The minimal-quality rule: fewer than min_words words of reasoning before the final line ("1\\n5\\nThe
    answer is 5." has two) leave nothing to learn a way of reasoning from."""
    body, _ = split_final_line(rationale)
    return len(body.split()) < min_words


@dataclass
class OpenAIConfig:
    base_url: str  # BASE_URL, without the trailing /
    model: str
    temperature: float
    max_tokens: int
    timeout: float
    retries: int
    backoff: float
    max_backoff: float
    api_key: str = field(default="", repr=False)  # never printed

    def headers(self) -> dict:
        return {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.api_key}"}
                                                         if self.api_key else {})}


RETRY_STATUS = {408, 409, 425, 429}  # and every 5xx
# the request itself is refused (prompt over the context length, a body too large, unprocessable): asking again gets
# the same answer, so its question is dropped with the reason instead of failing on every rerun
REJECT_STATUS = {400, 413, 422}
MAX_RETRY_AFTER = 600.0  # a server asking for more is waited on for this long, then asked again


def retry_after(value: str | None) -> float | None:
    """The seconds a 429 / 503 asks to wait: `Retry-After: 7` or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff(cfg: OpenAIConfig, attempt: int, wait: float | None) -> float:
    """Seconds before the next attempt: exponential with jitter, at least what Retry-After asked for."""
    base = min(cfg.max_backoff, cfg.backoff * 2 ** (attempt - 1))
    jitter = random.uniform(0, base / 2)  # concurrent workers that failed together do not retry together
    return (min(wait, MAX_RETRY_AFTER) if wait is not None else base / 2) + jitter


def _error_body(e: urllib.error.HTTPError) -> str:
    """The server's explanation, whole ("maximum context length is 2048 tokens ..." is past byte 200)."""
    try:
        return " ".join(e.read(65536).decode("utf-8", "replace").split())
    except Exception:  # noqa: BLE001 - the status code is what matters; the body is only a hint
        return ""


def _is_timeout(e: BaseException) -> bool:
    return isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError)


def waiting_line(attempt: int, retries: int, error: str) -> str:
    return f"waiting for the teacher (retry {attempt}/{retries}): {error}"


def check_model(cfg: OpenAIConfig, say_waiting) -> None:
    """Stop with one line if the server does not serve cfg.model. Some servers answer any model name with their only
    one (llama-cpp-python echoes the name back), so the chat replies cannot tell; GET BASE_URL/models can. A server
    without that endpoint is not checked. A server that cannot be reached after --retries is a fatal error here,
    before any output file is created."""
    url = cfg.base_url + "/models"
    error = ""
    for attempt in range(1, cfg.retries + 2):
        wait = None
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=cfg.headers()),
                                        timeout=cfg.timeout) as resp:
                data = json.loads(resp.read())
            ids = [str(m["id"]) for m in data["data"]]
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise TeacherError(f"{url}: HTTP {e.code} {e.reason} (check $OPENAI_API_KEY) {_error_body(e)}".strip())
            if e.code not in RETRY_STATUS and (e.code < 500 or e.code == 501):
                return  # no list of models here (404, 405, 501): the first chat request finds out
            error, wait = f"HTTP {e.code}", retry_after((e.headers or {}).get("Retry-After"))
        except (ValueError, LookupError, TypeError):
            return  # not the OpenAI shape: nothing to check against
        except (OSError, http.client.HTTPException) as e:
            error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        else:
            if cfg.model not in ids:
                shown = ", ".join(ids[:20]) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")
                raise TeacherError(f"the server does not serve model {cfg.model!r}; it serves: {shown or 'nothing'}")
            return
        if attempt > cfg.retries or STOP.is_set():
            break
        say_waiting(waiting_line(attempt, cfg.retries, error))
        _sleep(backoff(cfg, attempt, wait))
    if error.startswith("HTTP"):
        return  # it answers, but not this endpoint: the chat requests have their own retries
    raise TeacherError(f"cannot reach {url} after {cfg.retries} retries ({error}); is the server up?")


def chat_completion(cfg: OpenAIConfig, prompt: str, on_error=lambda attempt, error, timed_out: None) -> Reply:
    """One sample through the chat-completions API. Connection errors, timeouts, 429, 5xx and malformed responses are
    retried cfg.retries times after an exponential back-off with jitter (at least Retry-After when the server sends
    one), each failed attempt reported to on_error first; 400 / 413 / 422 reject the sample (the question is
    dropped); 401 / 403 / 404 are fatal, as every request would get them; any other 4xx fails the sample."""
    body = json.dumps({"model": cfg.model, "messages": [{"role": "user", "content": prompt}],
                       "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}).encode()
    url = cfg.base_url + "/chat/completions"
    error, attempt, timeouts = "", 0, 0
    while True:
        attempt += 1
        wait, raw, timed_out = None, b"", False
        try:
            req = urllib.request.Request(url, data=body, headers=cfg.headers(), method="POST")
            with urllib.request.urlopen(req, timeout=cfg.timeout) as resp:
                raw = resp.read()
            data = json.loads(raw)
            choice = data["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}")
            usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
            return Reply(text, attempt, int(usage.get("prompt_tokens") or approx_tokens(prompt)),
                         int(usage.get("completion_tokens") or approx_tokens(text)),
                         truncated=choice.get("finish_reason") == "length", timeouts=timeouts)
        except urllib.error.HTTPError as e:  # before OSError: it is one
            detail = _error_body(e)
            if e.code in (401, 403, 404):
                hint = ("check $OPENAI_API_KEY" if e.code in (401, 403)
                        else "check BASE_URL (it usually ends in /v1) and MODEL")
                return Reply(None, attempt, error=f"{url}: HTTP {e.code} {e.reason} ({hint}) {detail}".strip(),
                             fatal=True, timeouts=timeouts)
            if e.code in REJECT_STATUS:
                return Reply(None, attempt, error=f"HTTP {e.code} {detail}".strip(), rejected=True, timeouts=timeouts)
            if e.code not in RETRY_STATUS and e.code < 500:
                return Reply(None, attempt, error=f"HTTP {e.code} {detail}".strip(), timeouts=timeouts)
            error, wait = f"HTTP {e.code}", retry_after((e.headers or {}).get("Retry-After"))
        except (ValueError, LookupError, TypeError) as e:  # not JSON, or not the chat-completions shape
            error = f"malformed response ({type(e).__name__}: {raw[:60]!r})"
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out (URLError is an OSError)
            error, timed_out = f"{type(e).__name__}: {getattr(e, 'reason', e)}", _is_timeout(e)
            timeouts += timed_out
        on_error(attempt, error, timed_out)
        if attempt > cfg.retries or STOP.is_set():
            return Reply(None, attempt, error=error, timeouts=timeouts)
        _sleep(backoff(cfg, attempt, wait))


def openai_backend(cfg: OpenAIConfig, concurrency: int, say_waiting, warn):
    """complete(prompts) -> replies, one request at a time: the caller runs `concurrency` of these in threads, so
    exactly that many requests are in flight. After a failed sample the question is lost anyway, so the rest of its
    prompts are not sent. Every failed attempt is shown with say_waiting; once as many requests have timed out as
    there are in flight, warn says why that happens."""
    lock, timeouts = threading.Lock(), [0]

    def on_error(attempt: int, error: str, timed_out: bool) -> None:
        if attempt <= cfg.retries:
            say_waiting(waiting_line(attempt, cfg.retries, error))
        if not timed_out or concurrency == 1:
            return
        with lock:
            timeouts[0] += 1
            if timeouts[0] != concurrency:
                return
        # --timeout runs from the moment a request is sent, so it includes the wait in the queue of a server that
        # serves fewer requests at once than --concurrency sends; the abandoned requests keep its slots busy
        warn(f"warning: {concurrency} requests timed out after --timeout {cfg.timeout:g} s with --concurrency "
             f"{concurrency}: a server that answers fewer requests at once queues the rest, and the queue counts "
             f"against --timeout. Lower --concurrency to the server's parallel slots, or raise --timeout to "
             f"--concurrency / slots times the time of one answer")

    def complete(prompts: list[str]) -> list[Reply]:
        replies = []
        for p in prompts:
            if STOP.is_set() or (replies and replies[-1].text is None):
                replies.append(Reply(None, error="not sent"))
            else:
                replies.append(chat_completion(cfg, p, on_error))
        return replies
    return complete


def hf_backend(path: str, args):
    """complete(prompts) -> replies by batched generation (eval.generate) with the model's chat template."""
    import torch
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    try:
        model, tok = load_model(path, device, dtype)
    except OSError as e:
        raise SystemExit(f"error: --teacher hf:{path}: cannot load it ({e})")
    torch.manual_seed(args.seed)
    n_tokens = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731

    def complete(prompts: list[str]) -> list[Reply]:
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 if getattr(tok, "chat_template", None) else p + "\n" for p in prompts]
        try:
            outs = generate(model, tok, texts, args.max_tokens, args.batch_size, progress=False,
                            temperature=args.temperature)
        except torch.OutOfMemoryError:
            raise SystemExit(f"error: --teacher hf:{path}: out of memory; lower --batch-size ({args.batch_size}) "
                             f"or --max-tokens ({args.max_tokens})")
        replies = [Reply(o, 1, n_tokens(t), n_tokens(o)) for t, o in zip(texts, outs)]
        for r in replies:
            r.truncated = r.tokens_out >= args.max_tokens  # no stop token within the budget
        return replies
    return complete


@dataclass
class Outcome:
    """What the teacher and the judge made of one question."""
    q: dict  # {id, question, answer, kind}
    rationales: dict[str, str] = field(default_factory=dict)  # perspective -> its first correct sample, canonical
    samples: dict[str, int] = field(default_factory=dict)  # perspective -> samples judged
    short: dict[str, int] = field(default_factory=dict)  # perspective -> right samples dropped by --min-words
    easy: bool = False  # every perspective right on its first sample
    failed: str = ""  # why some sample got no usable answer; such a question is not written
    rejected: str = ""  # why the server refused a sample for good; such a question is dropped
    fatal: str = ""  # why the server refuses every request; the run stops
    requests: int = 0
    retries: int = 0
    truncated: int = 0  # samples cut off by --max-tokens (judged wrong)
    tokens_in: int = 0
    tokens_out: int = 0
    timeouts: int = 0

    def counts(self) -> dict:
        """What this question cost and how the judge fared, stored on its output line: OUT.stats.json is summed from
        these, so it describes the whole output file whichever runs wrote it."""
        return {"samples": self.samples, "short": self.short,
                **{n: getattr(self, n) for n in ("requests", "retries", "truncated", "tokens_in", "tokens_out")}}


def solve(qs: list[dict], complete, n_samples: int, strict: bool = False, min_words: int = 0) -> list[Outcome]:
    """Sampling rounds for a group of questions: round r asks once more for every perspective that has no correct
    rationale yet, so --samples-per-perspective N costs more than one request only where the teacher was wrong."""
    outs = [Outcome(q) for q in qs]
    for r in range(n_samples):
        todo = [(o, k) for o in outs if not (o.failed or o.rejected) for k in KEYS if k not in o.rationales]
        if not todo or STOP.is_set():
            break
        replies = complete([teacher_prompt(o.q["question"], k) for o, k in todo])
        for (o, k), rep in zip(todo, replies):
            o.requests += rep.attempts > 0
            o.retries += max(0, rep.attempts - 1)
            o.tokens_in += rep.tokens_in
            o.tokens_out += rep.tokens_out
            o.timeouts += rep.timeouts
            if rep.text is None:
                if rep.fatal:
                    STOP.set()  # before the main thread sees it: no worker sends another request
                    o.fatal = o.fatal or rep.error
                if rep.rejected:
                    o.rejected = o.rejected or f"{k}: {rep.error}"
                elif not (o.failed or o.rejected):  # the first reason; the prompts after it were not sent
                    o.failed = f"{k}: {rep.error}"
                continue
            o.samples[k] = o.samples.get(k, 0) + 1
            o.truncated += rep.truncated
            # a cut-off rationale has no conclusion: the last number in it is not its answer
            good = None if rep.truncated else judge(rep.text, o.q, strict)
            if good is not None and too_short(good, min_words):
                o.short[k] = o.short.get(k, 0) + 1
                good = None
            if good is not None:
                o.rationales[k] = good
        if r == 0:
            for o in outs:
                o.easy = len(o.rationales) == K
    if STOP.is_set():  # cut short: what it has is not what an uninterrupted run would have written
        for o in outs:
            o.failed = o.failed or "interrupted"
    return outs


def verdict(o: Outcome, min_perspectives: int, keep_easy: float, seed: int) -> str:
    """kept, failed, rejected (by the server), too_few (perspectives with a correct rationale) or easy
    (downsampled)."""
    if o.failed:
        return "failed"
    if o.rejected:
        return "rejected"
    if len(o.rationales) < min_perspectives:
        return "too_few"
    # one draw per question id, so a rerun (or a resumed run) makes the same choice whatever the order
    if o.easy and random.Random(f"keep-easy:{seed}:{o.q['id']}").random() >= keep_easy:
        return "easy"
    return "kept"


def solve_all(groups: list[list[dict]], solve_group, workers: int):
    """Each group's outcomes as it finishes. With workers > 1 the groups run in daemon threads, so that Ctrl-C does
    not wait for the requests in flight; an exception in a worker is raised here."""
    if workers == 1:
        for g in groups:
            yield solve_group(g)
        return
    jobs, results = queue.Queue(), queue.Queue()
    for g in groups:
        jobs.put(g)

    def work():
        while not STOP.is_set():
            try:
                g = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                results.put((solve_group(g), None))
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                STOP.set()  # before the main thread sees it: no worker takes another question
                results.put((None, e))

    for _ in range(min(workers, len(groups))):
        threading.Thread(target=work, daemon=True).start()
    for _ in range(len(groups)):
        while True:
            try:
                outs, err = results.get(timeout=0.5)  # a timeout keeps the main thread responsive to Ctrl-C
                break
            except queue.Empty:
                continue
        if err is not None:
            raise err
        yield outs


def resume_ids(path: str, need: str, repair: bool, warn=print) -> set[str]:
    """The ids already in an output file of an earlier run. A last line without its newline is what a killed run left
    half written: with repair it is moved to PATH.partial (nothing is lost) and cut from PATH, so its question is
    generated again and the file holds complete lines only. `need` is a key every line of this file has; a file
    without it is refused rather than appended to."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    tail = data[end:]
    if tail.strip():
        try:
            row = json.loads(tail)
            whole = isinstance(row, dict) and "id" in row and need in row
        except ValueError:
            whole = False
        if whole:  # only the newline is missing
            data += b"\n"
            if repair:
                with open(path, "ab") as f:
                    f.write(b"\n")
        else:
            data = data[:end]
            if repair:
                with open(path + ".partial", "ab") as f:
                    f.write(tail + b"\n")
                os.truncate(path, end)
                lineno = data.count(b"\n") + 1
                warn(f"note: {path}:{lineno}: a partial line from an interrupted run ({len(tail)} "
                     f"bytes) moved to {path}.partial; its question is generated again")
    ids = set()
    for lineno, line in enumerate(data.decode("utf-8", "replace").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            warn(f"warning: {path}:{lineno}: not valid JSON; ignored")
            continue
        if not isinstance(row, dict) or "id" not in row or need not in row:
            raise SystemExit(f"error: {path}:{lineno}: not a line of this program's output (no 'id' or '{need}'); "
                             f"is --out the right file?")
        ids.add(str(row["id"]))
    return ids


def lock_output(f, path: str) -> None:
    """Two runs appending to one file would write questions twice."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; do not run two at once
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise SystemExit(f"error: --out {path}: another run is writing it")


def demo_tokens_per_rationale() -> int | None:
    """Mean length of the shipped demo's rationales (a real teacher's), in approx_tokens: the dry run's typical case."""
    if not os.path.exists(DEMO):
        return None
    exs = read_training_jsonl(DEMO, warn=lambda *_: None)
    lens = [approx_tokens(r) for e in exs for r in e.rationales.values()]
    return round(sum(lens) / len(lens)) if lens else None


def dry_run(questions: list[dict], todo: list[dict], args) -> dict:
    n, N = len(todo) * K, args.samples_per_perspective
    tokens_in = sum(approx_tokens(teacher_prompt(q["question"], k)) for q in todo for k in KEYS)
    typical = demo_tokens_per_rationale()
    print(f"dry run: {len(todo)} of {len(questions)} questions to generate "
          f"({len(questions) - len(todo)} already in {args.out} or its .dropped.jsonl); the teacher is not called")
    print(f"requests:   {n:,}" + (f" (up to {n * N:,} if samples keep being wrong)" if N > 1 else ""))
    print(f"tokens in:  ~{tokens_in:,}" + (f" (up to ~{tokens_in * N:,})" if N > 1 else "") +
          " (~4 characters per token; the chat template's own tokens, such as a default system prompt, are not "
          "counted: SmolLM2's add 16%)")
    print("tokens out: " + (f"~{n * typical:,} at ~{typical} per rationale (the mean of {os.path.relpath(DEMO)}), "
                            if typical else "")
          + f"at most {n * N * args.max_tokens:,} (--max-tokens {args.max_tokens})")
    return {"todo": len(todo), "requests": n, "max_requests": n * N, "tokens_in": tokens_in,
            "tokens_out_typical": n * typical if typical else None, "tokens_out_max": n * N * args.max_tokens}


def say(msg: str, err: bool = False) -> None:
    """print that survives a reader that is gone: `| tee` gets the same Ctrl-C and exits first, and a BrokenPipeError
    traceback (exit 1) would replace the run's summary, its stats file and its exit status."""
    stream = sys.stderr if err else sys.stdout
    try:
        print(msg, file=stream, flush=True)
    except BrokenPipeError:
        mute(stream)


def mute(stream) -> None:
    """Point a stream whose reader is gone at /dev/null: later writes, and Python's flush at exit, succeed unseen."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
    except (OSError, ValueError):  # not a real file (pytest's capture): nothing to protect
        pass


COUNTERS = ("requests", "retries", "truncated", "tokens_in", "tokens_out")
REASONS = ("too_few", "easy", "rejected")  # why a question is in OUT.dropped.jsonl


def output_stats(out: str, dropped_path: str) -> dict:
    """Totals over every line of OUT and OUT.dropped.jsonl, whichever run wrote it (each line carries its question's
    counts): what OUT.stats.json reports, so it stays true after a resume with nothing left to do or a kill -9."""
    st = {"kept": 0, "dropped": 0, "dropped_by_reason": dict.fromkeys(REASONS, 0), **dict.fromkeys(COUNTERS, 0),
          "lines_without_counts": 0}
    per = {k: {"samples": 0, "correct": 0, "short": 0} for k in KEYS}
    for path, kept in ((out, True), (dropped_path, False)):
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:  # resume_ids reported it
                    continue
                if not isinstance(row, dict):
                    continue
                st["kept" if kept else "dropped"] += 1
                if not kept:
                    reason = str(row.get("reason"))
                    st["dropped_by_reason"][reason] = st["dropped_by_reason"].get(reason, 0) + 1
                c = row.get("teacher_counts")
                if not isinstance(c, dict):  # written by a version that did not count per line
                    st["lines_without_counts"] += 1
                    continue
                for n in COUNTERS:
                    st[n] += int(c.get(n) or 0)
                for k in KEYS:
                    per[k]["samples"] += int((c.get("samples") or {}).get(k, 0))
                    per[k]["short"] += int((c.get("short") or {}).get(k, 0))
                    per[k]["correct"] += k in (row.get("rationales") or {})
    st["acceptance"] = {k: {**v, "rate": round(v["correct"] / v["samples"], 4) if v["samples"] else None}
                        for k, v in per.items()}
    return st


def run_teacher(args, backend: str, target: str, model: str) -> dict:
    """Generate, judge and append every question of --data not yet in --out; save and return the stats."""
    t0 = time.time()
    STOP.clear()
    questions = load_questions(args.data, args.limit)
    out, dropped_path, stats_path = args.out, args.out + ".dropped.jsonl", args.out + ".stats.json"
    if os.path.isdir(out):
        raise SystemExit(f"error: --out {out}: is a directory; the hf:/openai: teachers write one JSONL file")
    if os.path.exists(out) and os.path.samefile(out, args.data):
        raise SystemExit(f"error: --out {out} is the --data file")
    warn = lambda msg: say(msg, err=True)  # noqa: E731
    note = lambda msg: tqdm.write(msg, file=sys.stderr)  # noqa: E731 - above the progress bar, from any thread
    # read first, without repairing: a wrong --out is refused before the teacher is loaded or asked anything
    done = (resume_ids(out, "rationales", False, warn if args.dry_run else lambda _: None)
            | resume_ids(dropped_path, "reason", False, warn if args.dry_run else lambda _: None))
    if args.dry_run:
        return dry_run(questions, [q for q in questions if q["id"] not in done], args)

    # the model is loaded (a wrong path reported), or the server asked for its models, before any output file exists
    if backend == "openai":
        cfg = OpenAIConfig(target.rstrip("/"), model, args.temperature, args.max_tokens, args.timeout, args.retries,
                           args.backoff, args.max_backoff, os.environ.get("OPENAI_API_KEY", ""))
        try:
            check_model(cfg, warn)
        except TeacherError as e:
            raise SystemExit(f"error: --teacher {args.teacher}: {e}")
    else:
        complete = hf_backend(target, args)
    workers, group = (args.concurrency, 1) if backend == "openai" else (1, args.batch_size)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    created = [p for p in (out, dropped_path) if not os.path.exists(p)]
    f_out = open(out, "a", encoding="utf-8")
    f_drop = None
    try:
        lock_output(f_out, out)
        done = resume_ids(out, "rationales", True, warn) | resume_ids(dropped_path, "reason", True, warn)
        f_drop = open(dropped_path, "a", encoding="utf-8")
        todo = [q for q in questions if q["id"] not in done]
        groups = [todo[i:i + group] for i in range(0, len(todo), group)]
        counts = dict.fromkeys(("kept",) + REASONS + ("failed",), 0)
        tot = dict.fromkeys(COUNTERS + ("timeouts",), 0)
        status, in_a_row, written = "finished", 0, 0
        pending = []  # refused questions of the current run of failures, written once a question gets through
        bar = tqdm(total=len(todo), desc="teacher", unit="q", disable=args.no_progress, file=sys.stderr)
        if backend == "openai":
            # from the first failed attempt, not only once a question has failed after every retry
            say_waiting = note if bar.disable else lambda msg: bar.set_description_str(f"teacher: {msg}")
            complete = openai_backend(cfg, workers, say_waiting, note)

        def write(f, row: dict) -> None:
            nonlocal written
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            written += 1

        try:
            solve_group = lambda g: solve(g, complete, args.samples_per_perspective, args.strict_judge,  # noqa: E731
                                          args.min_words)
            for outs in solve_all(groups, solve_group, workers):
                for o in outs:
                    v = verdict(o, args.min_perspectives, args.keep_easy, args.seed)
                    counts[v] += 1
                    in_a_row = in_a_row + 1 if v in ("failed", "rejected") else 0
                    for name in tot:
                        tot[name] += getattr(o, name)
                    rats = {k: o.rationales[k] for k in KEYS if k in o.rationales}
                    if v == "kept":
                        write(f_out, {**Example(o.q["id"], o.q["question"], o.q["answer"], rats).to_json(),
                                      "teacher_counts": o.counts()})
                    elif v == "failed" and not o.fatal:
                        note(f"warning: {o.q['id']}: the teacher failed ({o.failed}); not written, a rerun asks again")
                    elif v != "failed":
                        row = {"id": o.q["id"], "reason": v, "easy": o.easy, "rationales": rats,
                               **({"error": o.rejected} if o.rejected else {}), "teacher_counts": o.counts()}
                        if v == "rejected":
                            note(f"warning: {o.q['id']}: dropped, the server refused it ({o.rejected})")
                            # held back while nothing else gets through: a server that refuses every request
                            # refuses a setting (--max-tokens, ...), not these questions, and they are asked again
                            pending.append(row)
                        else:
                            write(f_drop, row)
                    if in_a_row == 0:
                        for row in pending:
                            write(f_drop, row)
                        pending.clear()
                        if not bar.disable:
                            bar.set_description_str("teacher", refresh=False)  # the teacher answers again
                    if o.fatal:
                        raise TeacherError(o.fatal)
                bar.update(len(outs))
                if args.max_consecutive_failures and in_a_row >= args.max_consecutive_failures:
                    # a teacher that is down is not one bad question: stop instead of failing the whole file slowly
                    raise TeacherError(f"failed on {in_a_row} questions in a row (last: {o.failed or o.rejected}); "
                                       + ("is it up?" if o.failed else "does it refuse a setting such as --max-tokens? "
                                          "None of them was written as dropped.")
                                       + " Rerun the same command to continue")
                bar.set_postfix(kept=counts["kept"], dropped=sum(counts[r] for r in REASONS),
                                failed=counts["failed"], retries=tot["retries"], refresh=False)
        except KeyboardInterrupt:
            STOP.set()
            status = "interrupted"
        except BrokenPipeError:  # the progress bar's reader is gone (`2>&1 | tee` after Ctrl-C, `| head`): stop too
            mute(sys.stderr)
            STOP.set()
            status = "interrupted"
        except TeacherError as e:
            STOP.set()
            status = f"error: --teacher {args.teacher}: {e}"
            pending.clear()
        finally:
            try:
                bar.close()
            except BrokenPipeError:
                mute(sys.stderr)
        for row in pending:
            write(f_drop, row)
    finally:
        f_out.close()
        if f_drop:
            f_drop.close()
    if status.startswith("error"):  # nothing of this run in them: do not leave empty files behind
        for p in created:
            if os.path.exists(p) and os.path.getsize(p) == 0:
                os.remove(p)

    dropped = sum(counts[r] for r in REASONS)
    this_run = {"already_done": len(questions) - len(todo), "todo": len(todo), "kept": counts["kept"],
                "dropped": dropped, "dropped_by_reason": {r: counts[r] for r in REASONS}, "failed": counts["failed"],
                "not_reached": len(todo) - sum(counts.values()), **tot, "wall_time_s": round(time.time() - t0, 3)}
    stats = {"teacher": args.teacher, "data": args.data, "out": out, "status": status,
             "questions": len(questions), "remaining": len(todo) - written, **output_stats(out, dropped_path),
             "this_run": this_run,
             "settings": {n: getattr(args, n) for n in ("samples_per_perspective", "min_perspectives", "min_words",
                                                        "keep_easy", "strict_judge", "temperature", "max_tokens",
                                                        "seed")}}
    write_json(stats_path, stats)  # before anything is printed: a closed pipe cannot cost the stats
    word = status if status in ("finished", "interrupted") else "stopped"
    say(f"{word}: kept {counts['kept']}, dropped {dropped} ({counts['too_few']} with fewer than "
        f"{args.min_perspectives} correct perspectives, {counts['easy']} easy, {counts['rejected']} refused by the "
        f"server), failed {counts['failed']}"
        + (f", not reached {this_run['not_reached']}" if this_run["not_reached"] else "")
        + f" of {len(todo)} questions ({this_run['already_done']} done before)")
    say(f"requests {tot['requests']:,}, retries {tot['retries']:,}"
        + (f" ({tot['timeouts']:,} timeouts)" if tot["timeouts"] else "")
        + f", tokens in {tot['tokens_in']:,} / out {tot['tokens_out']:,}, {this_run['wall_time_s']:.1f} s")
    if tot["truncated"]:
        warn(f"{tot['truncated']} samples were cut off by --max-tokens {args.max_tokens} and judged wrong; "
             f"consider a larger --max-tokens")
    say(f"{out}: {stats['kept']} kept, {stats['dropped']} dropped; {stats['remaining']} of the {len(questions)} "
        f"questions still to do. Acceptance over the file: "
        + ", ".join((f"{k} {v['rate']:.0%}" if v["rate"] is not None else f"{k} -")
                    + (f" ({v['short']} too short)" if v["short"] else "") for k, v in stats["acceptance"].items()))
    say("wrote " + ", ".join(p for p in (out, dropped_path, stats_path) if os.path.exists(p)))
    if counts["failed"] or status == "interrupted":
        warn("rerun the same command to ask again for the questions not written")
    if status.startswith("error"):
        raise SystemExit(status)  # the one place the error is printed
    if status == "interrupted":
        raise SystemExit(130)
    return stats


# -----------------------------------------------------------------------------
# CLI


def parse_teacher(spec: str) -> tuple[str, str, str]:
    """'synthetic' | 'hf:NAME_OR_PATH' | 'openai:BASE_URL#MODEL' -> (backend, target, model)."""
    if spec == "synthetic":
        return "synthetic", "", ""
    backend, _, rest = spec.partition(":")
    if backend == "hf" and rest:
        return "hf", rest, rest
    if backend == "openai":
        url, _, model = rest.rpartition("#")
        if not url or not model:
            raise ValueError(f"--teacher {spec}: expected openai:BASE_URL#MODEL, e.g. "
                             f"openai:http://localhost:8000/v1#Qwen2.5-72B-Instruct")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--teacher {spec}: BASE_URL must start with http:// or https://")
        return "openai", url, model
    raise ValueError(f"--teacher {spec}: expected synthetic, hf:NAME_OR_PATH or openai:BASE_URL#MODEL")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = ap.add_argument_group("teacher")
    g.add_argument("--teacher", default="synthetic",
                   help="synthetic (the offline arithmetic world), hf:NAME_OR_PATH (a local transformers model) or "
                        "openai:BASE_URL#MODEL (a chat-completions server: vLLM, SGLang, OpenAI, DeepSeek; the key, "
                        "if any, from $OPENAI_API_KEY)")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the teacher (0: greedy)")
    g.add_argument("--max-tokens", type=int, default=1024, help="longest rationale the teacher may write, in tokens")
    g.add_argument("--samples-per-perspective", type=int, default=1, metavar="N",
                   help="samples per question and perspective at most: another is asked for only while every "
                        "earlier one was wrong")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic world, of hf: sampling and of the --keep-easy draws")
    g = ap.add_argument_group("openai: backend")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight (one question per worker)")
    g.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for one response")
    g.add_argument("--retries", type=int, default=6,
                   help="extra attempts of a request after a connection error, timeout, 429, 5xx or malformed response")
    g.add_argument("--backoff", type=float, default=1.0,
                   help="first back-off in seconds, doubling at each retry, with jitter; at least Retry-After when "
                        "the server sends one")
    g.add_argument("--max-backoff", type=float, default=60.0, help="longest back-off in seconds (Retry-After aside)")
    g.add_argument("--max-consecutive-failures", type=int, default=20,
                   help="stop the run when this many questions in a row failed after all retries (0: never)")
    g = ap.add_argument_group("hf: backend")
    g.add_argument("--batch-size", type=int, default=16,
                   help="sequences generated together; OUT is appended to after every BATCH_SIZE questions")
    g.add_argument("--device", default="auto", help="torch device (auto: cuda if available, else cpu)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    g = ap.add_argument_group("judge")
    g.add_argument("--min-perspectives", type=int, default=K, metavar="M",
                   help="drop a question with fewer than M perspectives answered right (the paper keeps all eight)")
    g.add_argument("--keep-easy", type=float, default=1.0, metavar="P",
                   help="keep a question whose eight first samples were all right with probability P (difficulty-"
                        "aware downsampling; one seeded draw per question id)")
    g.add_argument("--min-words", type=int, default=8, metavar="W",
                   help="drop a right rationale with fewer than W words of reasoning before its final line (\"1\\n5\\n"
                        "The answer is 5.\" has 2); counted per perspective as `short` in OUT.stats.json")
    g.add_argument("--strict-judge", action="store_true",
                   help="read the answer only from a final line 'The answer is X.' (otherwise also the last "
                        "\\boxed{}, 'answer: X', or the last number / letter / yes-no, as eval.py's flexible grading)")
    g = ap.add_argument_group("data (hf: and openai: teachers)")
    g.add_argument("--data", default=None,
                   help="questions (JSONL, JSON list or CSV) in the schema of GSM8K, SVAMP, MATH-500, CommonsenseQA, "
                        "StrategyQA, or plain question/answer rows")
    g.add_argument("--limit", type=int, default=None, help="only the first N questions of --data")
    g = ap.add_argument_group("synthetic world")
    g.add_argument("--n", type=int, default=2000, help="number of training questions")
    g.add_argument("--n-test", type=int, default=300, help="questions in each of test_id and test_ood")
    g = ap.add_argument_group("output")
    g.add_argument("--out", required=True,
                   help="synthetic: output directory for train/test_id/test_ood.jsonl; hf:/openai: the training "
                        "JSONL, appended to (rerun to resume), with OUT.dropped.jsonl and OUT.stats.json beside it")
    g.add_argument("--dry-run", action="store_true",
                   help="print the number of requests and a token estimate without calling the teacher")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (for logs and CI)")
    return ap


def main(argv=None):
    """Returns the run's stats for the hf:/openai: teachers (None for the synthetic one)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        backend, target, model = parse_teacher(args.teacher)
    except ValueError as e:
        ap.error(str(e))

    if backend == "synthetic":
        if args.data:
            ap.error("--data is for the hf: and openai: teachers; the synthetic teacher writes its own questions")
        if args.n < 1 or args.n_test < 1:
            ap.error("--n and --n-test must be positive")
        splits = synthetic_splits(args.n, args.n_test, args.seed)
        for name, exs in splits.items():
            path = os.path.join(args.out, f"{name}.jsonl")
            write_examples(path, exs)
            print(f"wrote {len(exs)} questions to {path}")
        return None

    if not args.data:
        ap.error(f"--teacher {args.teacher} needs --data QUESTIONS.jsonl")
    if not os.path.isfile(args.data):
        ap.error(f"--data {args.data}: no such file")
    for name in ("max_tokens", "samples_per_perspective", "concurrency", "batch_size", "limit"):
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} {v}: must be >= 1")
    for name in ("temperature", "retries", "backoff", "max_backoff", "max_consecutive_failures", "min_words"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 0")
    if args.timeout <= 0:
        ap.error(f"--timeout {args.timeout}: must be > 0")
    if not 1 <= args.min_perspectives <= K:
        ap.error(f"--min-perspectives {args.min_perspectives}: must be in 1..{K}")
    if not 0 <= args.keep_easy <= 1:
        ap.error(f"--keep-easy {args.keep_easy}: must be in [0, 1]")
    if args.samples_per_perspective > 1 and args.temperature == 0:
        print("warning: --samples-per-perspective > 1 with --temperature 0: a greedy teacher repeats its samples",
              file=sys.stderr)
    return run_teacher(args, backend, target, model)


if __name__ == "__main__":
    stats = main()
    sys.exit(3 if stats and stats["this_run"]["failed"] else 0)  # 3: some questions failed; rerunning asks again
