"""The teacher pipeline: the judge, the openai: backend against an in-process chat-completions server scripted to
fail in every way a real one does, resuming after SIGKILL, and the hf: backend with the tiny offline model."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import eval as ev
import perspectives as P
from conftest import REPO

NAME_TO_KEY = {p.name: p.key for p in P.PERSPECTIVES}
# every way a teacher states its answer that the judge must read and rewrite into the canonical final line
ENDINGS = ["The answer is {a}.", "**Final answer:** {a}", "#### {a}", "So the answer is ${a}$.",
           "Therefore the final answer is \\boxed{{{a}}}.", "Answer: {a}", "The answer is: {a}", "the answer is {a}"]


# ---- a scripted chat-completions server


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default backlog of 5 drops connections when 8 workers connect at once

    def handle_error(self, request, client_address):  # a client that timed out and left: expected here
        pass


class FakeTeacher:
    """An OpenAI-compatible server in a thread. script(tag, key, attempt) says what the attempt-th request for
    (question tagged `tag`, perspective `key`) gets: "ok", "wrong", "429", "500", "hang", "garbage", "nochoices",
    "401". Every request is logged as (tag, key, attempt, what)."""

    def __init__(self, script, delay: float = 0.0):
        self.script, self.delay = script, delay
        self.log, self.auth, self.attempts = [], set(), {}
        self.lock, self.release = threading.Lock(), threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                key = NAME_TO_KEY[re.search(r"using the (.+?) perspective", prompt).group(1)]
                question = prompt.split("Problem: ", 1)[1]
                tag, gold = re.search(r"\[(\w+)\]", question).group(1), re.search(r"gold (\S+)\?", question).group(1)
                with fake.lock:
                    n = fake.attempts[(tag, key)] = fake.attempts.get((tag, key), 0) + 1
                    what = fake.script(tag, key, n)
                    fake.log.append((tag, key, n, what))
                    fake.auth.add(self.headers.get("Authorization"))
                if fake.delay:
                    time.sleep(fake.delay)
                if what == "hang":  # past the client's timeout, then give up without answering
                    fake.release.wait(10)
                    self.close_connection = True
                    return
                if what in ("429", "500", "401"):
                    self.send_response(int(what))
                    if what == "429":
                        self.send_header("Retry-After", "1")
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    return
                if what == "garbage":
                    data = b'{"choices": [{"message": {"content": "The ans'
                elif what == "nochoices":
                    data = json.dumps({"choices": []}).encode()
                else:
                    answer = gold if what in ("ok", "cut") else str(int(gold) + 1)
                    i = P.KEYS.index(key)
                    text = (f"Reasoning about {tag} from the {key} perspective.\nStep {i}: it is {answer}.\n"
                            + ENDINGS[i].format(a=answer))
                    finish = "length" if what == "cut" else "stop"  # cut: right so far, but cut off
                    data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text},
                                                    "finish_reason": finish}],
                                       "usage": {"prompt_tokens": 100, "completion_tokens": 10}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def requests_for(self, tag: str) -> list[tuple]:
        return [r for r in self.log if r[0] == tag]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def write_questions(path, tags: list[str]) -> dict[str, str]:
    """One plain question per tag; the server reads the tag and the gold answer from the question. -> tag: id."""
    with open(path, "w") as f:
        for i, tag in enumerate(tags):
            f.write(json.dumps({"id": f"q-{tag}", "question": f"[{tag}] What is {i} + {i}, gold {2 * i}?",
                                "answer": str(2 * i)}) + "\n")
    return {tag: f"q-{tag}" for tag in tags}


def read_lines(path) -> list[dict]:
    with open(path) as f:
        text = f.read()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def run(url, data, out, *extra) -> dict:
    return P.main(["--teacher", f"openai:{url}#fake-model", "--data", str(data), "--out", str(out), "--no-progress",
                   "--timeout", "0.5", "--retries", "2", "--backoff", "0.01", *map(str, extra)])


@pytest.fixture
def waits(monkeypatch):
    """Back-off waits are recorded, not slept (Retry-After: 1 would otherwise cost a second per retry)."""
    seen = []
    monkeypatch.setattr(P, "_sleep", seen.append)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET-123")
    return seen


# ---- the judge


def test_judge_rewrites_final_line_and_filters():
    q = {"id": "x", "question": "?", "answer": "1234", "kind": "number"}
    assert P.judge("2 * 617 = 1234.\n**Final answer:** $1,234", q) == "2 * 617 = 1234.\nThe answer is 1234."
    assert P.judge("<think>hmm</think>\nSo 1234 it is.\n\\boxed{1234}", q) == "So 1234 it is.\nThe answer is 1234."
    assert P.judge("Work: 1000 + 234.\nThe answer is 1234.\n#### 1234", q) == "Work: 1000 + 234.\nThe answer is 1234."
    assert P.judge("Adding up gives 1234 apples", q) == "Adding up gives 1234 apples\nThe answer is 1234."
    assert P.judge("Adding up gives 1234 apples", q, strict=True) is None  # no final line
    assert P.judge("Work.\nThe answer is 1235.", q) is None
    assert P.judge("The answer is 1234.", q) is None  # no reasoning: nothing to train on
    assert P.judge("", q) is None
    csqa = {"id": "c", "question": "?", "answer": "B", "kind": "letter"}
    assert P.judge("A bank is wrong; a library fits.\nThe answer is (b).", csqa) == \
        "A bank is wrong; a library fits.\nThe answer is B."
    yes = {"id": "s", "question": "?", "answer": "no", "kind": "yesno"}
    assert P.judge("Pollock was born centuries later.\nThe answer is False.", yes).endswith("The answer is no.")


def test_judge_cuts_what_follows_the_conclusion_and_keeps_one_line_rationales():
    q = {"id": "x", "question": "?", "answer": "1234", "kind": "number"}
    # text after the final line goes: kept, the rewritten final line came twice
    assert P.judge("Work: 1000 + 234 = 1234.\nThe answer is 1234.\nI hope this helps!", q) == \
        "Work: 1000 + 234 = 1234.\nThe answer is 1234."
    assert P.judge("Sum: 1000 + 234.\nTherefore, the answer is 1234. Let me know if you need more.", q) == \
        "Sum: 1000 + 234.\nThe answer is 1234."
    # reasoning and conclusion on one line: the reasoning is the rationale (it was rejected as "no reasoning")
    assert P.judge("Tom has 1000 coins and finds 234 more, so the answer is 1234.", q) == \
        "Tom has 1000 coins and finds 234 more.\nThe answer is 1234."
    assert P.judge("Therefore the final answer is \\boxed{1234}.", q) is None  # nothing but the conclusion


def test_load_questions_any_schema_stable_ids(tmp_path):
    bench = os.path.join(REPO, "data", "benchmarks")
    svamp = P.load_questions(os.path.join(bench, "svamp.jsonl"), limit=3)
    assert svamp[0]["id"] == "chal-777" and svamp[0]["answer"] == "145" and svamp[0]["kind"] == "number"
    gsm = P.load_questions(os.path.join(bench, "gsm8k_test.jsonl"), limit=2)  # `#### N` answers
    assert [q["id"] for q in gsm] == ["gsm8k_test-1", "gsm8k_test-2"] and gsm[0]["answer"] == "18"
    csqa = P.load_questions(os.path.join(bench, "csqa_validation.jsonl"), limit=1)[0]
    assert csqa["kind"] == "letter" and "\nA. bank" in csqa["question"] and csqa["answer"] == "A"
    sqa = P.load_questions(os.path.join(bench, "strategyqa_test.jsonl"), limit=1)[0]
    assert sqa["kind"] == "yesno" and sqa["answer"] == "yes"
    math = P.load_questions(os.path.join(bench, "math500_test.jsonl"), limit=1)[0]
    assert math["kind"] == "expression" and math["id"].startswith("test/")
    # a blank line does not shift the ids of the rows after it; a repeated id is made unique
    p = tmp_path / "qs.jsonl"
    p.write_text('{"question": "a?", "answer": "1"}\n\n{"question": "b?", "answer": "2"}\n'
                 '{"id": "z", "question": "c?", "answer": "3"}\n{"id": "z", "question": "d?", "answer": "4"}\n')
    assert [q["id"] for q in P.load_questions(str(p))] == ["qs-1", "qs-3", "z", "z#2"]
    p.write_text('{"question": "a?", "answer": "1"}\n{"question": "b?"}\n')
    with pytest.raises(SystemExit, match=re.escape(f"{p}:2")):
        P.load_questions(str(p))


# ---- the openai: backend against every scripted fault


def script(tag, key, attempt):
    first = attempt == 1
    return {"ok": "ok", "wrong": "wrong",
            "seven": "wrong" if key == "counterfactual" else "ok",
            "ratelimited": "429" if first else "ok",
            "flaky": "500" if first else "ok",
            "slow": "hang" if first and key == "intuitive" else "ok",
            "garbage": ("garbage" if key == "analogy" else "nochoices") if first and key in ("analogy", "socratic")
            else "ok",
            "dead": "500" if key == "planning" else "ok",
            "cut": "cut" if key == "decomposition" else "ok"}[tag]


TAGS = ["ok", "wrong", "seven", "ratelimited", "flaky", "slow", "garbage", "dead", "cut"]


def test_openai_backend_survives_every_fault(tmp_path, waits, capsys):
    data, out = tmp_path / "q.jsonl", tmp_path / "out" / "mind.jsonl"
    ids = write_questions(data, TAGS)
    with FakeTeacher(script) as t:
        stats = run(t.url, data, out, "--concurrency", 3)
        kept = read_lines(out)
        # exactly the questions with eight correct rationales; every transient fault was retried into one
        good = ("ok", "ratelimited", "flaky", "slow", "garbage")
        assert sorted(r["id"] for r in kept) == sorted(ids[g] for g in good)
        for r in kept:
            assert set(r["rationales"]) == set(P.KEYS) and list(r["rationales"]) == P.KEYS
            for text in r["rationales"].values():
                body, ans = ev.split_final_line(text)
                assert ans == r["answer"] and text.endswith(f"\nThe answer is {r['answer']}.")
                assert "answer" not in body.lower() and "####" not in body  # the teacher's own line was replaced
        assert P.read_training_jsonl(str(out)) and len(P.read_training_jsonl(str(out))) == 5
        dropped = {r["id"]: r for r in read_lines(str(out) + ".dropped.jsonl")}
        assert set(dropped) == {ids["wrong"], ids["seven"], ids["cut"]}
        assert "decomposition" not in dropped[ids["cut"]]["rationales"] and len(dropped[ids["cut"]]["rationales"]) == 7
        assert dropped[ids["seven"]]["reason"] == "too_few" and len(dropped[ids["seven"]]["rationales"]) == 7
        for tag, n_faults in [("ratelimited", 8), ("flaky", 8), ("slow", 1), ("garbage", 2)]:
            log = t.requests_for(tag)
            assert len(log) == 8 + n_faults  # each fault followed by one more attempt, which succeeded
            assert sorted(r[3] for r in log).count("ok") == 8
        # the dead perspective: 1 + 2 retries, then the question failed and its later perspectives were not asked
        dead = t.requests_for("dead")
        assert [r[3] for r in dead if r[1] == "planning"] == ["500"] * 3
        assert not [r for r in dead if P.KEYS.index(r[1]) > P.KEYS.index("planning")]
        assert ids["dead"] not in {r["id"] for r in kept} | set(dropped)
        assert stats["kept"] == 5 and stats["dropped"] == 3 and stats["failed"] == 1 and stats["not_reached"] == 0
        assert stats["retries"] == 8 + 8 + 1 + 2 + 2 and stats["truncated"] == 1
        assert stats["requests"] == 8 * 8 + 4  # dead: formal_symbolic, intuitive, decomposition, planning
        assert stats["acceptance"]["counterfactual"] == {"samples": 8, "correct": 6, "rate": 0.75}
        assert stats["acceptance"]["planning"] == {"samples": 8, "correct": 7, "rate": 0.875}
        assert stats["acceptance"]["decomposition"] == {"samples": 9, "correct": 7, "rate": round(7 / 9, 4)}
        assert stats["tokens_in"] == 100 * 67 and stats["tokens_out"] == 10 * 67
        assert json.load(open(str(out) + ".stats.json")) == stats
        # one wait per retry: at least the Retry-After: 1 of each 429 (plus a little jitter), tiny back-offs otherwise
        assert len(waits) == stats["retries"] and len([w for w in waits if 1 <= w < 1.01]) == 8
        assert all(w < 0.02 for w in waits if not 1 <= w < 1.01)
        # the key is sent, never printed
        assert t.auth == {"Bearer sk-test-SECRET-123"}
        printed = capsys.readouterr()
        assert "SECRET" not in printed.out + printed.err + open(str(out) + ".stats.json").read()
        assert f"warning: {ids['dead']}: the teacher failed (planning: HTTP 500)" in printed.err

        # a rerun asks only for the failed question; nothing else is asked again or written twice
        before = len(t.log)
        again = run(t.url, data, out)
        assert {r[0] for r in t.log[before:]} == {"dead"}
        assert again["already_done"] == 8 and again["todo"] == 1 and again["failed"] == 1
        assert read_lines(out) == kept
        t.script = lambda tag, key, attempt: "ok"  # the server recovers
        third = run(t.url, data, out)
        assert third["kept"] == 1 and third["failed"] == 0
        assert [r["id"] for r in read_lines(out)] == [r["id"] for r in kept] + [ids["dead"]]


def test_fatal_http_error_stops_with_one_line(tmp_path, waits, capsys):
    data, out = tmp_path / "q.jsonl", tmp_path / "mind.jsonl"
    write_questions(data, ["ok", "ok2"])
    with FakeTeacher(lambda *_: "401") as t:
        with pytest.raises(SystemExit, match=r"HTTP 401.*OPENAI_API_KEY"):
            run(t.url, data, out, "--concurrency", 1)
        assert len(t.log) == 1  # not retried, and no second question asked
    assert "SECRET" not in capsys.readouterr().out
    assert json.load(open(str(out) + ".stats.json"))["status"].startswith("error")


def test_teacher_down_stops_the_run(tmp_path, waits):
    data, out = tmp_path / "q.jsonl", tmp_path / "mind.jsonl"
    write_questions(data, [f"t{i}" for i in range(10)])
    with FakeTeacher(lambda *_: "500") as t:
        with pytest.raises(SystemExit, match="failed on 3 questions in a row"):
            run(t.url, data, out, "--concurrency", 1, "--max-consecutive-failures", 3)
        assert {r[0] for r in t.log} == {"t0", "t1", "t2"}  # each asked 1 + 2 times, then the run stopped
        assert len(t.log) == 9
    stats = json.load(open(str(out) + ".stats.json"))
    assert stats["failed"] == 3 and stats["not_reached"] == 7 and read_lines(out) == []


def test_keep_easy_and_min_perspectives(tmp_path, waits):
    # "hard": formal_symbolic wrong on its first sample, right on its second; "seven": one perspective never right
    def s(tag, key, attempt):
        if tag == "hard" and key == "formal_symbolic":
            return "wrong" if attempt == 1 else "ok"
        return "wrong" if tag == "seven" and key == "counterfactual" else "ok"
    data = tmp_path / "q.jsonl"
    ids = write_questions(data, ["easy", "hard", "seven"])
    with FakeTeacher(s) as t:
        stats = run(t.url, data, tmp_path / "a.jsonl", "--samples-per-perspective", 2, "--keep-easy", 0,
                    "--min-perspectives", 7)
        # the easy one is downsampled away; the hard one needed a second sample; seven has seven
        assert {r["id"] for r in read_lines(tmp_path / "a.jsonl")} == {ids["hard"], ids["seven"]}
        assert stats["dropped_easy"] == 1 and stats["requests"] == 8 + 9 + 9
        assert len([r for r in t.requests_for("seven") if r[1] == "counterfactual"]) == 2
        easy = read_lines(str(tmp_path / "a.jsonl") + ".dropped.jsonl")
        assert easy[0]["reason"] == "easy" and easy[0]["easy"] and len(easy[0]["rationales"]) == 8
        # keep-easy 0.5 draws once per question id: two runs agree
        tags = [f"e{i}" for i in range(12)]
        ids = write_questions(data, tags)
        a = run(t.url, data, tmp_path / "b.jsonl", "--keep-easy", 0.5, "--seed", 1)
        b = run(t.url, data, tmp_path / "c.jsonl", "--keep-easy", 0.5, "--seed", 1, "--concurrency", 1)
        assert 0 < a["kept"] < 12 and a["kept"] == b["kept"]
        assert sorted(r["id"] for r in read_lines(tmp_path / "b.jsonl")) == \
            sorted(r["id"] for r in read_lines(tmp_path / "c.jsonl"))


def test_dry_run_calls_nothing(tmp_path, capsys):
    data, out = tmp_path / "q.jsonl", tmp_path / "mind.jsonl"
    write_questions(data, ["a", "b", "c"])
    with FakeTeacher(lambda *_: "ok") as t:
        plan = run(t.url, data, out, "--dry-run", "--samples-per-perspective", 3)
        assert t.log == [] and not os.path.exists(out)
    assert plan["todo"] == 3 and plan["requests"] == 24 and plan["max_requests"] == 72
    assert plan["tokens_in"] > 24 * 50 and plan["tokens_out_max"] == 72 * 1024
    assert "requests:   24 (up to 72" in capsys.readouterr().out


def test_bad_command_lines(tmp_path):
    data = tmp_path / "q.jsonl"
    write_questions(data, ["a"])
    for argv, msg in [(["--teacher", "openai:http://x/v1"], "openai:BASE_URL#MODEL"),
                      (["--teacher", "openai:localhost:8000#m"], "http://"),
                      (["--teacher", "vllm:x"], "expected synthetic"),
                      (["--teacher", "hf:x"], "needs --data"),
                      (["--teacher", "hf:x", "--data", str(tmp_path / "nope.jsonl")], "no such file"),
                      (["--teacher", "hf:x", "--data", str(data), "--min-perspectives", "9"], "--min-perspectives 9"),
                      (["--teacher", "hf:x", "--data", str(data), "--keep-easy", "2"], "--keep-easy 2"),
                      (["--teacher", "hf:x", "--data", str(data), "--timeout", "0"], "--timeout 0")]:
        with pytest.raises(SystemExit):
            P.main(argv + (["--out", str(tmp_path / "o.jsonl")]))
    with pytest.raises(SystemExit, match="is the --data file"):
        P.main(["--teacher", "openai:http://127.0.0.1:9/v1#m", "--data", str(data), "--out", str(data)])
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"question": "q", "answer": "1"}\n')
    with pytest.raises(SystemExit, match="foreign.jsonl:1: not a line of this program"):
        P.main(["--teacher", "openai:http://127.0.0.1:9/v1#m", "--data", str(data), "--out", str(foreign)])
    assert foreign.read_text() == '{"question": "q", "answer": "1"}\n'  # never truncated


# ---- killed half-way, resumed: the same file as an uninterrupted run


def test_sigkill_then_resume_gives_the_same_file(tmp_path, waits):
    data = tmp_path / "q.jsonl"
    tags = [f"t{i}" for i in range(24)]
    write_questions(data, tags)
    full, resumed = tmp_path / "full.jsonl", tmp_path / "resumed.jsonl"
    with FakeTeacher(lambda *_: "ok") as t:
        run(t.url, data, full)
        t.delay = 0.02  # 192 requests, 2 in flight: ~2 s, long enough to be killed half-way
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen([sys.executable, "perspectives.py", "--teacher", f"openai:{t.url}#fake-model",
                                 "--data", str(data), "--out", str(resumed), "--concurrency", "2", "--no-progress"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while time.time() < deadline and proc.poll() is None:
            if resumed.exists() and resumed.read_text().count("\n") >= 8:
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()  # still running: this is a kill half-way
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        n_killed = len(read_lines(resumed))
        assert 8 <= n_killed < 24
        # what a kill in the middle of a write leaves: the first bytes of a line, no newline
        with open(resumed, "a") as f:
            f.write('{"id": "q-t23", "question": "[t23] What is 23 + 23, gold 4')
        t.delay = 0.0
        stats = run(t.url, data, resumed)
        assert stats["already_done"] == n_killed and stats["kept"] == 24 - n_killed
    a, b = read_lines(full), read_lines(resumed)  # read_lines: every line whole, the file ends in a newline
    assert len(b) == 24 and len({r["id"] for r in b}) == 24
    assert {r["id"]: r for r in a} == {r["id"]: r for r in b}
    assert open(str(resumed) + ".partial").read().startswith('{"id": "q-t23"')  # moved aside, not lost


# ---- the hf: backend with the tiny offline model


def test_hf_backend_end_to_end(tmp_path, tiny, synth):
    model, tok = tiny
    ckpt = tmp_path / "teacher"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    data, out = tmp_path / "q.jsonl", tmp_path / "mind.jsonl"
    with open(data, "w") as f:
        for ex in synth["train"][:6]:
            f.write(json.dumps({"question": ex.question, "answer": ex.answer}) + "\n")
    # sampled (eval.generate's temperature), two samples: the second round asks again where the first was wrong
    argv = ["--teacher", f"hf:{ckpt}", "--data", str(data), "--out", str(out), "--no-progress", "--max-tokens", "12",
            "--batch-size", "4", "--temperature", "1", "--samples-per-perspective", "2", "--min-perspectives", "1",
            "--device", "cpu"]
    stats = P.main(argv)
    samples = sum(v["samples"] for v in stats["acceptance"].values())
    assert 6 * 8 < stats["requests"] == samples <= 6 * 8 * 2 and stats["failed"] == 0
    assert stats["kept"] + stats["dropped"] == 6 and stats["tokens_out"] > 0
    kept, dropped = read_lines(out), read_lines(str(out) + ".dropped.jsonl")
    assert len(kept) == stats["kept"] and len(dropped) == stats["dropped"]
    assert {r["id"] for r in kept} | {r["id"] for r in dropped} == {f"q-{i}" for i in range(1, 7)}
    golds = {f"q-{i + 1}": ex.answer for i, ex in enumerate(synth["train"][:6])}
    accepted = sum(v["correct"] for v in stats["acceptance"].values())
    assert accepted == sum(len(r["rationales"]) for r in kept + dropped)
    for r in kept:  # whatever the tiny model got right passed the judge and ends canonically
        assert r["answer"] == golds[r["id"]]
        for text in r["rationales"].values():
            assert text.endswith(f"\nThe answer is {r['answer']}.")
    # resuming: nothing left to generate, nothing written twice
    again = P.main(argv)
    assert again["requests"] == 0 and again["already_done"] == 6
    assert read_lines(out) == kept
