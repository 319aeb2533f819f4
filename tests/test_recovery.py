"""Mid-stream recovery: an answer whose server dies goes on on another server, and the
client reads one whole answer; where it must not go on, the stream ends as it broke."""

from __future__ import annotations

import http.client
import json
import re
from typing import Any

import pytest
from conftest import BalancerProcess, StoreConfig, require_module
from fakeollama import FakeOllama, generate_messages, reply_text, tag

import ollamabalancer as ob

WORDS = 8  # each answer's length, in words (a word a chunk)
USER = [{"role": "user", "content": "tell me a story"}]


@pytest.fixture
def pair(start_balancer: Any, sqlite_store: StoreConfig, make_backend: Any) -> Any:
    """A balancer and two servers of the same model: ``first`` has it loaded (so a
    request goes there first), ``second`` is where the answer goes on."""
    def build(*args: str, **env: str) -> tuple[BalancerProcess, FakeOllama, FakeOllama]:
        lb = start_balancer(sqlite_store, "--health-interval", "600", *args, env=env)
        first = make_backend(models=[tag("llama3:latest")], tokens=WORDS, name="first")
        second = make_backend(models=[tag("llama3:latest")], tokens=WORDS, name="second")
        first.loaded = ["llama3:latest"]
        lb.add_server(first.url, name="first")
        lb.add_server(second.url, name="second")
        return lb, first, second

    return build


def post(lb: BalancerProcess, path: str, body: Any, headers: dict[str, str] | None = None
         ) -> tuple[http.client.HTTPResponse, bytes, bool]:
    """The answer's head, its body, and whether the body came whole (its last chunk)."""
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=30)
    conn.request("POST", path, json.dumps(body), headers or {})
    answer = conn.getresponse()
    try:
        data, whole = answer.read(), True
    except http.client.IncompleteRead as exc:
        data, whole = exc.partial, False
    conn.close()
    return answer, data, whole


def ndjson(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.split(b"\n") if line.strip()]


def sse(data: bytes) -> list[Any]:
    events = [e for e in data.split(b"\n\n") if e.strip()]
    assert all(e.startswith(b"data: ") for e in events), data
    return [e[6:].decode() if e == b"data: [DONE]" else json.loads(e[6:]) for e in events]


def text_of(path: str, data: bytes) -> str:
    if path == "/v1/chat/completions":
        return "".join(e["choices"][0]["delta"].get("content", "") for e in sse(data)
                       if isinstance(e, dict) and e["choices"])
    field = "response" if path == "/api/generate" else "message"
    return "".join(line[field] if field == "response" else line[field]["content"]
                   for line in ndjson(data) if field in line)


def request_for(path: str, **extra: Any) -> dict[str, Any]:
    if path == "/api/generate":
        return {"model": "llama3", "prompt": "tell me a story", "system": "be brief",
                **extra}
    body = {"model": "llama3", "messages": USER, **extra}
    return {**body, "stream": True} if path.startswith("/v1/") else body


def uninterrupted(path: str) -> str:
    if path == "/api/generate":
        return reply_text(generate_messages(request_for(path)), WORDS)
    return reply_text(USER, WORDS)


def continuations(fake: FakeOllama) -> list[dict[str, Any]]:
    return [json.loads(r["body"]) for r in fake.model_requests()
            if r["path"] in ("/api/chat", "/api/generate", "/v1/chat/completions")]


ENDPOINTS = ["/api/chat", "/api/generate", "/v1/chat/completions"]


# -- a stream continued: one whole answer ---------------------------------------------------


@pytest.mark.parametrize("fault", ["die", "crash", "stall"])
@pytest.mark.parametrize("path", ENDPOINTS)
def test_a_stream_whose_server_fails_midway_is_continued_on_another_server(
        pair: Any, path: str, fault: str) -> None:
    lb, first, second = pair("--upstream-timeout", "1")
    first.fault = {"after": 3, "kind": fault}
    answer, data, whole = post(lb, path, request_for(path))
    assert answer.status == 200 and whole
    assert first.faults == 1
    assert text_of(path, data) == uninterrupted(path)
    if path == "/v1/chat/completions":
        events = sse(data)
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        chunks = [e for e in events if isinstance(e, dict)]
        assert {e["id"] for e in chunks} == {f"chatcmpl-{first.port}"}  # one stream
        assert len({e["created"] for e in chunks}) == 1
        assert [e["choices"][0]["delta"].get("role") for e in chunks].count("assistant") == 1
        assert [e["choices"][0]["finish_reason"] for e in chunks].count("stop") == 1
    else:
        lines = ndjson(data)
        assert not any("error" in line for line in lines)
        assert [line["done"] for line in lines] == [False] * WORDS + [True]
        assert lines[-1]["eval_count"] == WORDS  # three words there, five here
        if path == "/api/generate":
            assert all("message" not in line for line in lines)
            assert lines[-1]["response"] == "" and lines[-1]["done_reason"] == "stop"
    # The second server was asked to go on from the text so far, nothing else added.
    (continued,) = continuations(second)
    said = "".join(uninterrupted(path).split(" ")[i] + " " for i in range(3))
    if path == "/api/generate":
        assert continued["messages"] == [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "tell me a story"},
            {"role": "assistant", "content": said}]
        assert [r["path"] for r in second.model_requests()][-1] == "/api/chat"
    else:
        assert continued["messages"] == [*USER, {"role": "assistant", "content": said}]


def test_the_client_s_own_final_assistant_message_is_extended_not_followed(
        pair: Any) -> None:
    lb, first, second = pair()
    first.fault = {"after": 2, "kind": "die"}
    messages = [*USER, {"role": "assistant", "content": "Once "}]
    _, data, whole = post(lb, "/api/chat", {"model": "llama3", "messages": messages})
    assert whole
    (continued,) = continuations(second)
    assert continued["messages"][-1]["content"].startswith("Once ")
    assert continued["messages"][:-1] == USER  # one assistant message, not two
    assert text_of("/api/chat", data) == "".join(
        reply_text(USER, WORDS).split(" ")[i] + " " for i in range(1, WORDS))


def test_a_continuation_that_fails_goes_on_elsewhere_at_most_retries_times(
        pair: Any, make_backend: Any) -> None:
    lb, first, second = pair()
    third = make_backend(models=[tag("llama3:latest")], tokens=WORDS)
    lb.add_server(third.url, name="third")
    first.fault = {"after": 2, "kind": "die"}
    second.fault = third.fault = {"after": 2, "kind": "crash"}
    _, data, whole = post(lb, "/api/chat", request_for("/api/chat"))
    # Two words from each: the first, then two continuations (RETRIES), each failing;
    # the last one's error line ends the answer, which never says it is done.
    assert first.faults == second.faults == third.faults == 1
    assert text_of("/api/chat", data) == "".join(
        uninterrupted("/api/chat").split(" ")[i] + " " for i in range(6))
    lines = ndjson(data)
    assert whole and "error" in lines[-1] and not any(line.get("done") for line in lines)
    lb.wait_for(lambda: 'ollamabalancer_recoveries_total{outcome="failed"} 1'
                in lb.call("GET", "/metrics").text)


def test_the_token_budget_carries_over_to_the_continuation(pair: Any) -> None:
    lb, first, second = pair()
    first.fault = {"after": 3, "kind": "die"}
    _, data, whole = post(lb, "/api/chat", request_for("/api/chat",
                                                       options={"num_predict": 6}))
    assert whole
    assert continuations(second)[0]["options"] == {"num_predict": 3}
    lines = ndjson(data)
    assert text_of("/api/chat", data) == "".join(uninterrupted("/api/chat").split(" ")[i]
                                                 + " " for i in range(6))
    assert lines[-1]["done_reason"] == "length" and lines[-1]["eval_count"] == 6


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_openai_token_limits_carry_over_and_usage_covers_the_whole_answer(
        pair: Any, field: str) -> None:
    lb, first, second = pair()
    first.fault = {"after": 2, "kind": "die"}
    body = request_for("/v1/chat/completions", stream_options={"include_usage": True},
                       **{field: 5})
    _, data, whole = post(lb, "/v1/chat/completions", body)
    assert whole
    assert continuations(second)[0][field] == 3
    events = [e for e in sse(data) if isinstance(e, dict)]
    usage = events[-1]["usage"]
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"


def test_a_stream_that_broke_off_with_its_budget_spent_ends_there(pair: Any) -> None:
    lb, first, second = pair()
    first.fault = {"after": 4, "kind": "die"}  # after every token it was allowed
    _, data, whole = post(lb, "/api/chat", request_for("/api/chat",
                                                       options={"num_predict": 4}))
    assert whole
    lines = ndjson(data)
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "length"
    assert lines[-1]["eval_count"] == 4
    assert not continuations(second)


@pytest.mark.parametrize("fault", ["die", "crash"])
def test_an_answer_not_streamed_is_answered_whole_by_another_server(
        pair: Any, fault: str) -> None:
    lb, first, second = pair()
    # Twice: a pooled connection that breaks is tried once more on a fresh one.
    first.fault = {"after": 3, "kind": fault, "times": 2}
    reply = lb.call("POST", "/api/chat", {**request_for("/api/chat"), "stream": False})
    assert reply.status == 200
    assert reply.json()["message"]["content"] == uninterrupted("/api/chat")
    assert first.faults >= 1 and len(continuations(second)) == 1


def test_the_official_client_reads_a_continued_stream_as_one_answer(pair: Any) -> None:
    ollama = require_module("ollama")
    lb, first, _ = pair()
    first.fault = {"after": 3, "kind": "crash"}
    client = ollama.Client(host=f"http://127.0.0.1:{lb.port}")
    parts = list(client.chat(model="llama3", messages=USER, stream=True))
    assert "".join(p.message.content for p in parts) == uninterrupted("/api/chat")
    assert [p.done for p in parts].count(True) == 1 and parts[-1].eval_count == WORDS


def test_a_client_that_leaves_during_the_continuation_frees_the_second_server(
        pair: Any) -> None:
    lb, first, second = pair()
    first.fault = {"after": 3, "kind": "die"}
    second.token_delay = 0.5
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=30)
    conn.request("POST", "/api/chat", json.dumps(request_for("/api/chat")))
    answer = conn.getresponse()
    seen = [answer.readline() for _ in range(4)]  # three from the first, one from the next
    assert all(json.loads(line)["done"] is False for line in seen)
    conn.close()  # gone while the second server generates
    lb.wait_for(lambda: all(s["inflight"] == 0 for s in
                            lb.call("GET", "/servers/allServers").json()))
    second.token_delay = 0.005
    _, data, whole = post(lb, "/api/chat", request_for("/api/chat"))
    assert whole and text_of("/api/chat", data) == uninterrupted("/api/chat")


# -- where it must not go on, it says so ---------------------------------------------------


def assert_ended_as_it_broke(path: str, data: bytes, whole: bool, fault: str) -> None:
    """Three words, then the stream as the server ended it: cut, or its error line."""
    assert text_of(path, data) == "".join(uninterrupted(path).split(" ")[i] + " "
                                          for i in range(3))
    lines = ndjson(data)
    assert not any(line.get("done") for line in lines)
    if fault == "crash":
        assert whole and "error" in lines[-1]
    else:
        assert not whole  # no last chunk: the client cannot take it for whole


@pytest.mark.parametrize("fault", ["die", "crash"])
@pytest.mark.parametrize("extra", [
    {"format": "json"}, {"tools": [{"type": "function", "function": {"name": "f"}}]},
    {"raw": True}, {"suffix": "end"}, {"template": "{{ .Prompt }}"}, {"context": [1, 2]},
], ids=["format", "tools", "raw", "suffix", "template", "context"])
def test_answers_a_prefill_cannot_continue_end_as_they_broke(
        pair: Any, extra: dict[str, Any], fault: str) -> None:
    lb, first, second = pair()
    first.fault = {"after": 3, "kind": fault}
    path = "/api/generate" if set(extra) & {"raw", "suffix", "template", "context"} else (
        "/api/chat")
    _, data, whole = post(lb, path, request_for(path, **extra))
    assert_ended_as_it_broke(path, data, whole, fault)
    assert not continuations(second)
    lb.wait_for(lambda: 'ollamabalancer_recoveries_total{outcome="not_resumable"} 1'
                in lb.call("GET", "/metrics").text)


@pytest.mark.parametrize("fault", ["die", "crash"])
def test_an_answer_cut_while_thinking_is_not_continued(pair: Any, fault: str) -> None:
    lb, first, second = pair()
    first.thinkers.add("llama3:latest")
    first.fault = {"after": 1, "kind": fault}  # in its thinking
    _, data, whole = post(lb, "/api/chat", request_for("/api/chat", think=True))
    lines = ndjson(data)
    assert [line["message"].get("thinking") for line in lines if "message" in line] == [
        "hmm "]
    assert not any(line.get("done") for line in lines)
    assert whole is (fault == "crash") and not continuations(second)


@pytest.mark.parametrize("show", [{"template": "{{ .Prompt }}"},
                                  {"template": "{{ range .Messages }}{{ .Content }}<end>"
                                               "{{ end }}"},
                                  {"renderer": "gemma4", "parser": "gemma4"}],
                         ids=["prompt-only-template", "closing-template", "gemma4"])
@pytest.mark.parametrize("fault", ["die", "crash"])
def test_a_model_that_answers_a_prefill_anew_is_never_stitched(
        pair: Any, show: dict[str, Any], fault: str) -> None:
    lb, first, second = pair()
    for fake in (first, second):
        fake.restarts.add("llama3:latest")
        fake.show_fields["llama3:latest"] = show
    first.fault = {"after": 3, "kind": fault}
    _, data, whole = post(lb, "/api/chat", request_for("/api/chat"))
    assert_ended_as_it_broke("/api/chat", data, whole, fault)
    assert not continuations(second)
    assert [r["path"] for r in second.model_requests()] == ["/api/show"]
    models = lb.call("GET", "/models").json()
    assert models[0]["digests"][0]["continues"] is False
    assert models[0]["digests"][0]["continuesWhy"]


def test_a_model_no_server_can_describe_is_not_continued(pair: Any) -> None:
    lb, first, second = pair()
    first.fault = {"after": 3, "kind": "die"}
    second.fail_status = 500  # /api/show too
    _, data, whole = post(lb, "/api/chat", request_for("/api/chat"))
    assert_ended_as_it_broke("/api/chat", data, whole, "die")
    assert [r["path"] for r in second.model_requests()] == ["/api/show"]
    lb.wait_for(lambda: 'ollamabalancer_recoveries_total{outcome="unverified"} 1'
                in lb.call("GET", "/metrics").text)


@pytest.mark.parametrize("fault", ["die", "crash"])
def test_with_no_other_server_the_stream_ends_as_it_broke(
        start_balancer: Any, sqlite_store: StoreConfig, make_backend: Any,
        fault: str) -> None:
    lb = start_balancer(sqlite_store, "--health-interval", "600")
    only = make_backend(models=[tag("llama3:latest")], tokens=WORDS)
    lb.add_server(only.url)
    only.fault = {"after": 3, "kind": fault}
    _, data, whole = post(lb, "/api/chat", request_for("/api/chat"))
    assert_ended_as_it_broke("/api/chat", data, whole, fault)
    lb.wait_for(lambda: 'ollamabalancer_recoveries_total{outcome="no_server"} 1'
                in lb.call("GET", "/metrics").text)


@pytest.mark.parametrize("how", ["setting", "header"])
def test_recovery_can_be_turned_off(pair: Any, how: str) -> None:
    lb, first, second = pair(*(["--recovery", "off"] if how == "setting" else []))
    first.fault = {"after": 3, "kind": "die"}
    _, data, whole = post(lb, "/api/chat", request_for("/api/chat"),
                          {"X-Recovery": "off"} if how == "header" else None)
    assert_ended_as_it_broke("/api/chat", data, whole, "die")
    assert not continuations(second)
    lb.wait_for(lambda: 'ollamabalancer_recoveries_total{outcome="off"} 1'
                in lb.call("GET", "/metrics").text)


def test_an_answer_longer_than_the_budget_for_kept_text_is_not_continued(
        pair: Any) -> None:
    # Room for the request's body (1 MB), none for 64 KiB of its answer's text.
    lb, first, second = pair("--max-buffered-bodies", "1M")
    first.fault = {"after": 3, "kind": "die"}
    long = [{"role": "user", "content": "x" * 1_000_000}]
    _, data, whole = post(lb, "/api/chat", {"model": "llama3", "messages": long})
    assert text_of("/api/chat", data) == "".join(reply_text(long, WORDS).split(" ")[i] + " "
                                                 for i in range(3))
    assert not whole and not any(line.get("done") for line in ndjson(data))
    assert not continuations(second)
    lb.wait_for(lambda: 'ollamabalancer_recoveries_total{outcome="over_limit"} 1'
                in lb.call("GET", "/metrics").text)


# -- seen and counted --------------------------------------------------------------------


def test_a_recovery_is_logged_counted_and_shown(pair: Any) -> None:
    lb, first, _ = pair()
    first.fault = {"after": 3, "kind": "crash"}
    answer, _, whole = post(lb, "/api/chat", request_for("/api/chat"))
    assert whole
    request_id = answer.headers["X-Request-Id"]
    # The access line names both servers; the request's warnings say what happened.
    lb.wait_for(lambda: re.search(rf"POST +/api/chat +200 first>second .* {request_id}$",
                                  lb.log, re.M) is not None)
    trace = [line for line in lb.lines if request_id in line]
    assert any("broke off" in line and "llama runner process has terminated" in line
               for line in trace)
    assert any("continued on second" in line for line in trace)
    metrics = lb.call("GET", "/metrics").text
    assert 'ollamabalancer_recoveries_total{outcome="continued"} 1' in metrics
    assert "ollamabalancer_recovery_gap_seconds_count 1" in metrics
    assert 'ollamabalancer_upstream_errors_total{server="first",kind="cut_stream"} 1' in (
        metrics)
    # Three tokens came from the first server, five from the second.
    assert 'ollamabalancer_tokens_total{server="first",model="llama3:latest"} 3' in metrics
    assert 'ollamabalancer_tokens_total{server="second",model="llama3:latest"} 5' in metrics
    assert lb.call("GET", "/servers/status").json()["recoveries"] == {"continued": 1}
    models = lb.call("GET", "/models").json()
    assert models[0]["digests"][0]["continues"] is True


def test_the_json_access_log_lists_the_servers_an_answer_went_through(pair: Any) -> None:
    lb, first, _ = pair(LOG_FORMAT="json")
    first.fault = {"after": 3, "kind": "die"}
    answer, _, whole = post(lb, "/api/chat", request_for("/api/chat"))
    assert whole
    request_id = answer.headers["X-Request-Id"]

    def line() -> dict[str, Any] | None:
        for text in lb.lines:
            if request_id in text and '"ollamabalancer.access"' in text:
                return dict(json.loads(text))
        return None

    lb.wait_for(lambda: line() is not None)
    entry = line()
    assert entry is not None
    assert entry["server"] == "second" and entry["servers"] == ["first", "second"]
    assert entry["cut"] is False


# -- the parts, sans-IO --------------------------------------------------------------------


@pytest.mark.parametrize(("show", "continues"), [
    ({"template": "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i))"
                  " 1 }}{{ .Content }}{{ if not $last }}<|eot_id|>{{ end }}{{ end }}"}, True),
    ({"template": "[INST] {{ .Prompt }} [/INST] {{ .Response }}"}, True),
    ({"template": "{{ .Prompt }}"}, False),
    ({"template": "{{ range .Messages }}{{ .Content }}<|end|>{{ end }}"}, False),
    ({"renderer": "qwen3.5", "parser": "qwen3.5"}, True),
    ({"renderer": "gemma4", "parser": "gemma4"}, False),
    ({"renderer": "deepseek3.1", "parser": "deepseek3"}, False),
    ({"renderer": "a-renderer-of-tomorrow"}, False),
    ({"template": "{{ .Prompt }}{{ .Response }}", "parser": "qwen3-thinking"}, False),
    ({"template": "{{ .Prompt }}{{ .Response }}", "parser": "harmony"}, True),
    ([], False),
])
def test_whether_a_model_continues_a_prefill_is_read_from_api_show(
        show: Any, continues: bool) -> None:
    verdict, why = ob.prefill_verdict(show)
    assert verdict is continues and why


def chunked(*lines: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(line), line) for line in lines)


STREAM = [b'{"message":{"content":"a"},"done":false}\n',
          b'{"message":{"content":"b"},"done":false}\n',
          b'{"done":true,"eval_count":2}\n']


def relay_lines(data: bytes, splits: list[int], chunked_out: bool, end: bool = True
                ) -> tuple[bytes, ob.Lines]:
    """Feeds ``data`` (a chunked body without its last chunk) split at ``splits`` to
    Lines as a relay would (and its ``end``, unless cut); what the client got."""
    lines, scanner = ob.Lines(False, None), ob.ChunkedScanner()
    out, buf, last = [], bytearray(), 0
    for cut in [*splits, len(data)]:
        buf += data[last:cut]
        last = cut
        aligned = scanner.at_boundary
        checked, _, spans = scanner.take(buf)
        out += lines.take(checked, spans, aligned and scanner.at_boundary, chunked_out)
    if end:
        out += lines.finish(chunked_out)
    return b"".join(out), lines


@pytest.mark.parametrize("chunked_out", [True, False])
def test_a_stream_is_relayed_in_whole_lines_however_it_is_split(chunked_out: bool) -> None:
    data = chunked(*STREAM)
    for split in range(1, len(data)):
        got, lines = relay_lines(data, [split], chunked_out)
        body = ob.ChunkedDecoder().next_event(bytearray(got + b"0\r\n\r\n")) if (
            chunked_out) else got
        assert body == b"".join(STREAM) and lines.complete
    boundaries = [len(chunked(*STREAM[:n])) for n in range(1, len(STREAM))]
    whole, _ = relay_lines(data, boundaries, True)
    assert whole == data  # the common case, a chunk a read: passed on as it came


def test_a_stream_cut_mid_line_leaves_the_client_whole_lines_only() -> None:
    data = chunked(*STREAM)[:-10]  # the final line half sent
    got, lines = relay_lines(data, [], False, end=False)
    assert got == b"".join(STREAM[:2]) and not lines.complete
    assert lines.transcript.text() == got


def test_an_error_line_is_held_back_with_what_follows_it() -> None:
    error = b'{"error":"llama runner process has terminated: exit status 2"}\n'
    data = chunked(STREAM[0], error)
    for split in range(1, len(data)):
        got, lines = relay_lines(data, [split], False)
        assert got == STREAM[0] and lines.held == error and not lines.complete
        assert lines.why() == "llama runner process has terminated: exit status 2"
    # A tool's argument named "error" is no error line.
    nested = b'{"message":{"tool_calls":[{"function":{"arguments":{"error":1}}}]}}\n'
    got, lines = relay_lines(chunked(nested), [5], False)
    assert got == nested and not lines.held


def test_a_line_that_never_ends_is_relayed_as_it_comes_and_never_continued() -> None:
    lines = ob.Lines(False, None)
    piece = b"x" * 65536
    sent = 0
    for _ in range(ob.MAX_RECOVERY_BYTES // len(piece) + 2):
        sent += sum(len(part) for part in lines.take(piece, [(0, len(piece))], False, False))
    assert sent > ob.MAX_RECOVERY_BYTES - len(piece)  # not held without bound
    assert len(lines.pending) <= ob.MAX_RECOVERY_BYTES and not lines.transcript.whole


def test_what_follows_an_error_line_is_not_kept_without_bound() -> None:
    lines = ob.Lines(False, None)
    lines.take(b'{"error":"boom"}\n', [(0, 17)], False, False)
    for _ in range(100):
        assert lines.take(b"y" * 65536, [(0, 65536)], False, False) == []
    assert len(lines.held) <= ob.MAX_ERROR_BODY + 65536 and lines.why() == "boom"


def test_a_transcript_past_its_budget_is_a_plain_tail() -> None:
    asked: list[int] = []

    def hold(size: int) -> bool:
        asked.append(size)
        return len(asked) == 1

    transcript = ob.Transcript(hold)
    transcript.add(b"x" * 1000)
    assert transcript.whole and asked == [ob.RECOVERY_HOLD_STEP]
    assert transcript.text() == b"x" * 1000
    transcript.add(b"y" * ob.RECOVERY_HOLD_STEP)  # past the first step: refused
    transcript.add(b"z" * ob.TAIL_BYTES)
    assert not transcript.whole and transcript.last() == b"z" * ob.TAIL_BYTES
    unbounded = ob.Transcript()
    unbounded.add(b"x" * ob.MAX_RECOVERY_BYTES)
    assert unbounded.whole
    unbounded.add(b"y")  # past MAX_RECOVERY_BYTES, whatever the budget
    assert not unbounded.whole and unbounded.last().endswith(b"xy")


def resumption(path: str, request: dict[str, Any], sent: list[bytes]) -> ob.Resumption:
    sse_stream = path.startswith("/v1/")
    lines = ob.Lines(sse_stream, None)
    for line in sent:
        lines.transcript.add(line)
    return ob.Resumption.of(path, json.dumps(request).encode(), lines)


def test_a_generate_goes_on_as_a_chat_and_comes_back_in_generate_s_shape() -> None:
    state = resumption("/api/generate", {"model": "m", "prompt": "p", "images": ["aW1n"],
                                         "options": {"num_predict": 10, "seed": 1}},
                       [b'{"model":"m","response":"Hel","done":false}\n',
                        b'{"model":"m","response":"lo","done":false}\n'])
    plan = state.continuation()
    assert plan is not None and plan[0] == "/api/chat"
    assert json.loads(plan[1]) == {
        "model": "m", "options": {"num_predict": 8, "seed": 1}, "stream": True,
        "messages": [{"role": "user", "content": "p", "images": ["aW1n"]},
                     {"role": "assistant", "content": "Hello"}]}
    line = state.translate(b'{"model":"m","created_at":"t","message":{"role":"assistant",'
                           b'"content":" world"},"done":false}')
    assert json.loads(line) == {"model": "m", "created_at": "t", "response": " world",
                                "done": False}
    final = json.loads(state.translate(
        b'{"model":"m","created_at":"t","message":{"role":"assistant","content":""},'
        b'"done":true,"done_reason":"stop","eval_count":4,"prompt_eval_count":9}'))
    assert final["eval_count"] == 6 and final["response"] == "" and "message" not in final
    assert state.finished and state.text == "Hello world"


def test_an_openai_continuation_keeps_the_stream_s_id_and_says_its_role_once() -> None:
    first = {"id": "chatcmpl-1", "created": 5, "object": "chat.completion.chunk",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]}
    state = resumption("/v1/chat/completions",
                       {"model": "m", "messages": [{"role": "user", "content": "q"}],
                        "stream": True}, [b"data: " + json.dumps(first).encode() + b"\n\n"])
    other = {"id": "chatcmpl-2", "created": 9, "object": "chat.completion.chunk",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "!"}}]}
    event = json.loads(state.translate(b"data: " + json.dumps(other).encode())[6:])
    assert event["id"] == "chatcmpl-1" and event["created"] == 5
    assert event["choices"][0]["delta"] == {"content": "!"}
    with pytest.raises(ob.Broken):
        state.translate(b'data: {"error":{"message":"boom"}}')
    assert state.translate(b"data: [DONE]") == b"data: [DONE]\n\n" and state.finished


def test_an_answer_with_tool_calls_is_not_resumable() -> None:
    with pytest.raises(ob.Unresumable) as caught:
        resumption("/api/chat", {"model": "m", "messages": []},
                   [b'{"message":{"content":"","tool_calls":[{"function":{"name":"f"}}]},'
                    b'"done":false}\n'])
    assert caught.value.outcome == "not_resumable"
