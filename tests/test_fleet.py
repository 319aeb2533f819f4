"""The root endpoint as one big Ollama: catalog, model-aware routing, the queue, failover,
the circuit breaker, affinity, strategies, and fan-out of pulls, deletes, copies, blobs."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import itertools
import json
import socket
import threading
import time
from typing import Any

import pytest
from conftest import BalancerProcess, Reply, StoreConfig, call, require_module
from fakeollama import FakeOllama, reply_text, tag

import ollamabalancer as ob

#: Each chat() is a conversation of its own (a first turn): the same messages again would
#: be the same conversation, which goes where it went before (conversation affinity).
CHATS = itertools.count()


def chat(lb: BalancerProcess, model: str = "llama3", *, stream: bool = False,
         headers: dict[str, str] | None = None, **extra: Any) -> Reply:
    body = {"model": model, "messages": [{"role": "user", "content": f"hi {next(CHATS)}"}],
            "stream": stream, **extra}
    return lb.call("POST", "/api/chat", body, headers=headers)


def in_thread(function: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(function(*args, **kwargs)),
                              daemon=True)
    thread.start()
    return thread, result


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def held(fake: FakeOllama) -> int:
    return sum(1 for r in fake.model_requests() if b'"fake_hold"' in r["body"])


@pytest.fixture
def fleet(start_balancer: Any, sqlite_store: StoreConfig, make_backend: Any) -> Any:
    """A balancer (slow health checks, so the tests decide what it knows) and a way to add
    fake servers to it."""
    def build(*args: str, **env: str) -> tuple[BalancerProcess, Any]:
        lb = start_balancer(sqlite_store, *args, env=env)

        def add(models: list[str] | None = None, loaded: list[str] | None = None,
                **fields: Any) -> tuple[FakeOllama, dict[str, Any]]:
            fake = make_backend(models=[tag(m) for m in (models or ["llama3:latest"])])
            fake.loaded = list(loaded or [])
            return fake, lb.add_server(fake.url, **fields)

        return lb, add

    return build


# -- the catalog --------------------------------------------------------------------------


def test_root_answers_like_ollama(fleet: Any) -> None:
    lb, add = fleet()
    add(["llama3:latest", "mistral:7b"], loaded=["mistral:7b"])
    second, _ = add(["llama3:latest", "qwen2:latest"], loaded=["llama3:latest"])
    second.version = "0.11.4"
    assert lb.call("GET", "/").text == "Ollama is running"
    head = lb.call("HEAD", "/")
    assert head.status == 200 and head.body == b""
    lb.call("PATCH", "/servers/2", {"name": "second"})  # a re-check reads the version again
    assert lb.call("GET", "/api/version").json() == {"version": "0.11.4"}
    tags = lb.call("GET", "/api/tags").json()["models"]
    assert sorted(m["name"] for m in tags) == ["llama3:latest", "mistral:7b", "qwen2:latest"]
    assert tags[0]["details"]["parameter_size"] == "8.0B"
    running = lb.call("GET", "/api/ps").json()["models"]
    assert sorted(m["name"] for m in running) == ["llama3:latest", "mistral:7b"]
    models = lb.call("GET", "/v1/models").json()
    assert models["object"] == "list"
    assert {m["id"] for m in models["data"]} == {"llama3:latest", "mistral:7b", "qwen2:latest"}
    one = lb.call("GET", "/v1/models/mistral:7b").json()
    assert one["id"] == "mistral:7b" and one["owned_by"] == "library" and one["created"] > 0
    missing = lb.call("GET", "/v1/models/nope")
    assert missing.status == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_requests_go_to_a_server_that_has_the_model(fleet: Any) -> None:
    lb, add = fleet()
    llama, _ = add(["llama3:latest"])
    mistral, _ = add(["mistral:7b"])
    for _ in range(3):
        assert chat(lb, "llama3").status == 200
        assert chat(lb, "mistral:7b").status == 200
    assert len(llama.model_requests()) == 3 and len(mistral.model_requests()) == 3
    assert all(b"llama3" in r["body"] for r in llama.model_requests())


def test_unknown_model_is_404_in_each_apis_shape(fleet: Any) -> None:
    lb, add = fleet()
    add()
    ollama_style = chat(lb, "nope")
    assert ollama_style.status == 404
    assert ollama_style.json() == {"error": "model 'nope' not found"}
    openai_style = lb.call("POST", "/v1/chat/completions", {"model": "nope", "messages": []})
    assert openai_style.status == 404
    assert openai_style.json()["error"]["message"] == "model 'nope' not found"
    anthropic_style = lb.call("POST", "/v1/messages", {"model": "nope", "messages": [],
                                                       "max_tokens": 5})
    assert anthropic_style.status == 404
    assert anthropic_style.json()["error"]["type"] == "not_found_error"
    assert lb.call("POST", "/api/chat", raw=b"{oops").status == 400
    assert lb.call("POST", "/api/chat", {"messages": []}).json() == {"error": "model is required"}


def test_a_model_whose_servers_are_all_down_is_503_not_404(fleet: Any) -> None:
    # A UI reads 404 as "not installed" and offers to pull it: a model the fleet has but
    # cannot run now is unavailable (503, Retry-After), whatever made its servers unusable.
    lb, add = fleet("--breaker-threshold", "1", "--breaker-cooldown", "30",
                    "--health-interval", "600")
    down, down_row = add(["phi3:latest"])
    _, off_row = add(["phi3:latest", "qwen2:latest"])
    failing, failing_row = add(["phi3:latest", "gemma:2b"])
    add(["llama3:latest"])
    down.close()
    lb.call("PATCH", f"/servers/{down_row['id']}", {"name": "gpu1"})  # checked again: down
    wait_until(lambda: lb.call("GET", f"/servers/{down_row['id']}").json()["reachable"]
               is False)
    assert lb.call("PATCH", f"/servers/{off_row['id']}", {"enabled": False}).status == 200
    failing.fail_status = 500  # its circuit opens on the first failure
    assert chat(lb, "gemma:2b").status == 500
    assert lb.call("GET", f"/servers/{failing_row['id']}").json()["circuitOpen"] is True
    for model in ("phi3", "qwen2", "gemma:2b"):
        reply = chat(lb, model)
        assert reply.status == 503, (model, reply)
        assert reply.json() == {"error": f"model '{model}' is unavailable: its servers are down"}
        assert int(reply.headers["retry-after"]) >= 1
    openai_style = lb.call("POST", "/v1/chat/completions", {"model": "phi3", "messages": []})
    assert openai_style.status == 503 and "unavailable" in openai_style.json()["error"]["message"]
    assert chat(lb, "nope").status == 404  # no server has it: not found, as before
    assert chat(lb, "llama3").status == 200
    metrics = lb.call("GET", "/metrics").text
    assert ('endpoint="/api/chat",server="",model="phi3:latest",status="503"} 1' in metrics)
    assert 'model="nope:latest"' not in metrics  # names nobody has are not labels
    failing.fail_status = None


def test_a_draining_server_finishes_what_it_runs_takes_nothing_new_and_is_still_checked(
        fleet: Any) -> None:
    lb, add = fleet("--health-interval", "600")
    draining, row = add(loaded=["llama3:latest"])
    other, other_row = add()
    holder, result = in_thread(chat, lb, fake_hold=True)
    wait_until(lambda: held(draining) == 1)  # the warm server has it
    patched = lb.call("PATCH", f"/servers/{row['id']}", {"draining": True})
    assert patched.status == 200 and patched.json()["draining"] is True
    assert patched.json()["reachable"] is True  # still checked, unlike a disabled one
    assert patched.json()["inflight"] == 1
    for _ in range(4):  # new work goes elsewhere, its loaded model notwithstanding
        assert chat(lb).status == 200
    assert len(other.model_requests()) == 4 and len(draining.model_requests()) == 1
    assert lb.call("GET", "/servers/getServer?models=llama3").text != str(row["id"])
    draining.release()  # what it ran finishes
    holder.join(10)
    assert result[0].status == 200
    assert lb.call("GET", f"/servers/{row['id']}").json()["inflight"] == 0
    # Reachable by id still (an operator checks it before maintenance) ...
    assert lb.call("GET", f"/servers/ollama/{row['id']}/api/tags").status == 200
    # ... and when every holder of a model drains, a request says so (503, not 404).
    assert lb.call("PATCH", f"/servers/{other_row['id']}", {"draining": True}).status == 200
    reply = chat(lb)
    assert reply.status == 503
    assert reply.json() == {"error": "model 'llama3' is unavailable: its servers are draining"}
    assert lb.call("GET", "/servers/getServer?models=llama3").json() == {
        "error": "every enabled server is draining"}
    assert lb.call("PATCH", f"/servers/{row['id']}", {"draining": False}).status == 200
    assert chat(lb).status == 200 and len(draining.model_requests()) == 2


def test_a_model_pulled_since_the_last_check_is_found_by_one_refresh(fleet: Any) -> None:
    lb, add = fleet("--health-interval", "600")
    fake, _ = add(["llama3:latest"])
    fake.models.append(tag("phi3:latest"))
    assert chat(lb, "phi3").status == 200


# -- scheduling ---------------------------------------------------------------------------


def test_servers_with_the_model_loaded_are_preferred(fleet: Any) -> None:
    lb, add = fleet()
    cold, _ = add()
    warm, _ = add(loaded=["llama3:latest"])
    for _ in range(6):
        assert chat(lb).status == 200
    assert len(warm.model_requests()) == 6 and not cold.model_requests()


def test_a_full_server_sends_work_to_the_next_and_load_counts(fleet: Any) -> None:
    # NUM_PARALLEL=4: by Ollama's own scheduling the first (model loaded) stays the best
    # place with one request running; only its maxConcurrency of 1 sends work elsewhere.
    lb, add = fleet(MAX_CONCURRENCY="1", NUM_PARALLEL="4")
    first, first_row = add(loaded=["llama3:latest"], weight=5)
    second, _ = add()
    holder, _ = in_thread(chat, lb, fake_hold=True)
    wait_until(lambda: held(first) == 1)
    assert lb.call("GET", f"/servers/{first_row['id']}").json()["inflight"] == 1
    assert chat(lb).status == 200  # the loaded server is full: the other one serves it
    assert len(second.model_requests()) == 1
    first.release()
    holder.join(10)


def test_queue_serves_waiting_requests_in_arrival_order(fleet: Any) -> None:
    lb, add = fleet(MAX_CONCURRENCY="1")
    fake, _ = add()
    threads = []
    for index in range(4):
        threads.append(in_thread(chat, lb, fake_hold=True, order=index))
        wait_until(lambda: held(fake) == 1)  # the first runs, the others queue in turn
        time.sleep(0.1)
    for index in range(4):
        wait_until(lambda index=index: held(fake) == index + 1)
        fake.release()
    for thread, result in threads:
        thread.join(10)
        assert result[0].status == 200
    orders = [json.loads(r["body"])["order"] for r in fake.model_requests()]
    assert orders == [0, 1, 2, 3]


def test_full_queue_and_queue_timeout_answer_503_with_retry_after(fleet: Any) -> None:
    lb, add = fleet(MAX_CONCURRENCY="1", MAX_QUEUE="1", QUEUE_TIMEOUT="1")
    fake, _ = add()
    holder, _ = in_thread(chat, lb, fake_hold=True)
    wait_until(lambda: held(fake) == 1)
    waiting, waited = in_thread(chat, lb)
    time.sleep(0.3)
    full = chat(lb)
    assert full.status == 503 and full.headers["Retry-After"]
    assert "maximum pending requests exceeded" in full.json()["error"]
    waiting.join(5)
    assert waited[0].status == 503 and waited[0].headers["Retry-After"]
    assert waited[0].json()["error"].startswith("server busy, please try again.")
    openai = lb.call("POST", "/v1/chat/completions", {"model": "llama3", "messages": []})
    assert openai.status == 503 and openai.json()["error"]["type"] == "server_error"
    fake.release()
    holder.join(10)


def test_a_client_that_leaves_the_queue_is_never_sent_upstream(fleet: Any) -> None:
    lb, add = fleet(MAX_CONCURRENCY="1")
    fake, _ = add()
    holder, _ = in_thread(chat, lb, fake_hold=True)
    wait_until(lambda: held(fake) == 1)
    body = json.dumps({"model": "llama3", "messages": [], "stream": False,
                       "marker": "gone"}).encode()
    sock = socket.create_connection(("127.0.0.1", lb.port))
    sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: lb\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    time.sleep(0.3)
    sock.close()
    time.sleep(0.3)
    after, result = in_thread(chat, lb, marker="next")
    time.sleep(0.3)
    fake.release()
    holder.join(10)
    after.join(10)
    assert result[0].status == 200
    markers = [json.loads(r["body"]).get("marker") for r in fake.model_requests()]
    assert "gone" not in markers and markers[-1] == "next"


def test_a_session_stays_on_its_server_though_another_is_less_loaded(fleet: Any) -> None:
    lb, add = fleet("--health-interval", "600", NUM_PARALLEL="4")
    first, _ = add(loaded=["llama3:latest"])
    second, _ = add(loaded=["llama3:latest"])
    session = {"X-Session-Id": "conversation-7"}
    assert chat(lb, headers=session).status == 200
    home, away = (first, second) if first.model_requests() else (second, first)
    holders = [in_thread(chat, lb, headers=session, fake_hold=True) for _ in range(2)]
    wait_until(lambda: held(home) == 2)  # two of its turns running there: the busier one
    for turn in range(3):
        assert chat(lb, headers=session, turn=turn).status == 200
    assert [json.loads(r["body"]).get("turn") for r in home.model_requests()][-3:] == [0, 1, 2]
    assert not away.model_requests()
    # Not a conversation (a chat is one, placed by its first message): the least loaded.
    assert lb.call("POST", "/api/generate", {"model": "llama3", "prompt": "hi",
                                             "stream": False}).status == 200
    assert len(away.model_requests()) == 1
    home.release(2)
    for thread, _ in holders:
        thread.join(10)


def test_session_affinity_keeps_a_conversation_on_one_server(fleet: Any) -> None:
    lb, add = fleet()
    first, _ = add()
    second, _ = add()
    for session in ("alpha", "beta"):
        for _ in range(4):
            assert chat(lb, headers={"X-Session-Id": session}).status == 200
    sessions = {}
    for fake in (first, second):
        for r in fake.model_requests():
            sessions.setdefault(r["headers"]["X-Session-Id"], set()).add(fake.port)
    assert all(len(ports) == 1 for ports in sessions.values())


@pytest.mark.parametrize("strategy", ["round_robin", "random"])
def test_other_strategies_spread_requests(fleet: Any, strategy: str) -> None:
    lb, add = fleet(STRATEGY=strategy)
    fakes = [add(loaded=["llama3:latest"] if i == 0 else None)[0] for i in range(2)]
    for _ in range(20):
        assert chat(lb).status == 200
    counts = [len(f.model_requests()) for f in fakes]
    if strategy == "round_robin":
        assert counts == [10, 10]
    else:
        assert min(counts) >= 3  # 10 expected each; the loaded one is not favoured
    sids = {lb.call("GET", "/servers/getServer").text for _ in range(10)}
    assert len(sids) == 2


def test_weight_and_max_concurrency_are_settable_and_validated(fleet: Any) -> None:
    lb, add = fleet()
    _, row = add(weight=2.5, maxConcurrency=8)
    assert (row["weight"], row["maxConcurrency"]) == (2.5, 8)
    patched = lb.call("PATCH", f"/servers/{row['id']}", {"maxConcurrency": None, "weight": 1})
    assert (patched.json()["weight"], patched.json()["maxConcurrency"]) == (1, None)
    for bad in ({"weight": 0}, {"weight": "x"}, {"maxConcurrency": 0},
                {"maxConcurrency": 1.5}):
        reply = lb.call("PATCH", f"/servers/{row['id']}", bad)
        assert reply.status == 400 and next(iter(bad)) in reply.json()["error"]


# -- failures -----------------------------------------------------------------------------


def test_failover_when_the_preferred_server_is_killed(fleet: Any) -> None:
    lb, add = fleet("--health-interval", "600")
    doomed, _ = add(loaded=["llama3:latest"])
    spare, _ = add()
    doomed.close()  # the balancer still believes it is up
    for stream in (False, True):
        reply = chat(lb, stream=stream)
        assert reply.status == 200, reply
    assert len(spare.model_requests()) == 2


def test_503_from_ollama_fails_over_and_the_breaker_opens(fleet: Any) -> None:
    # Without conversation affinity: a chat's rendezvous order could prefer the spare
    # once both have the model loaded, whatever the breaker says (the chats' texts
    # depend on the tests that ran before in the same process).
    lb, add = fleet("--breaker-threshold", "2", "--breaker-cooldown", "1",
                    "--health-interval", "600", "--conversation-affinity", "off")
    busy, busy_row = add(loaded=["llama3:latest"], weight=5)  # first choice while it works
    spare, _ = add()
    busy.fail_status = 503
    for _ in range(2):
        assert chat(lb).status == 200
    assert len(busy.model_requests()) == 2
    assert lb.call("GET", f"/servers/{busy_row['id']}").json()["circuitOpen"] is True
    for _ in range(3):  # open: the fast-failing server gets nothing, idle as it looks
        assert chat(lb).status == 200
    assert len(busy.model_requests()) == 2 and len(spare.model_requests()) == 5
    busy.fail_status = None
    time.sleep(1.2)
    assert chat(lb).status == 200  # the one probe after the cooldown
    assert len(busy.model_requests()) == 3
    assert lb.call("GET", f"/servers/{busy_row['id']}").json()["circuitOpen"] is False


def test_only_a_model_not_found_is_tried_on_another_server(fleet: Any) -> None:
    # An old Ollama without /v1/embeddings answers "404 page not found" (or a proxy in
    # front of it, in JSON): not a stale catalog, so no other server is tried.
    lb, add = fleet("--health-interval", "600")
    old, _ = add(loaded=["llama3:latest"], weight=5)
    new, _ = add()
    old.missing_paths = {"/v1/embeddings"}
    for answer in [(b"404 page not found", "text/plain"),
                   (b'{"error": "404 page not found"}', "application/json")]:
        old.missing_answer = answer
        reply = lb.call("POST", "/v1/embeddings", {"model": "llama3", "input": "hi"})
        assert reply.status == 404, reply
        assert "404 page not found" in reply.text
    assert not new.model_requests()
    assert [r["path"] for r in old.model_requests()] == ["/v1/embeddings"] * 2
    old.missing_paths = set()
    old.models = []  # "model 'llama3' not found" from a stale catalog: the other server
    assert chat(lb).status == 200
    assert [r["path"] for r in new.model_requests()] == ["/api/chat"]


def open_circuit(lb: BalancerProcess, fake: FakeOllama, row: dict[str, Any]) -> None:
    """Fails one request on ``fake`` (threshold 1), then lets it work again."""
    fake.fail_status = 503
    assert chat(lb).status == 503
    assert lb.call("GET", f"/servers/{row['id']}").json()["circuitOpen"] is True
    fake.fail_status = None


def test_an_abandoned_probe_does_not_wedge_the_circuit_and_others_queue_behind_it(
        fleet: Any) -> None:
    lb, add = fleet("--breaker-threshold", "1", "--breaker-cooldown", "1",
                    "--health-interval", "600")
    fake, row = add()  # the only server with the model
    open_circuit(lb, fake, row)
    time.sleep(1.2)  # past the cooldown: the next request is the probe
    body = json.dumps({"model": "llama3", "messages": [], "stream": False,
                       "fake_hold": True}).encode()
    probe = socket.create_connection(("127.0.0.1", lb.port))
    probe.sendall(b"POST /api/chat HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json"
                  b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_until(lambda: held(fake) == 1)
    others = [in_thread(chat, lb, order=index) for index in range(6)]
    time.sleep(0.5)
    assert all(not result for _, result in others), "requests must queue behind the probe"
    probe.close()  # the user pressed stop: the probe ends without a verdict
    for thread, result in others:
        thread.join(15)
        assert result and result[0].status == 200, result
    assert lb.call("GET", f"/servers/{row['id']}").json()["circuitOpen"] is False
    fake.release()


def test_a_passing_health_check_after_the_cooldown_closes_the_circuit(fleet: Any) -> None:
    lb, add = fleet("--breaker-threshold", "1", "--breaker-cooldown", "0.5",
                    "--health-interval", "0.3")
    fake, row = add()
    open_circuit(lb, fake, row)
    wait_until(lambda: lb.call("GET", f"/servers/{row['id']}").json()["circuitOpen"] is False,
               timeout=5)
    assert chat(lb).status == 200


def test_retries_are_bounded_and_the_last_error_is_returned(fleet: Any) -> None:
    lb, add = fleet("--retries", "1", "--health-interval", "600")
    fakes = [add()[0] for _ in range(3)]
    for fake in fakes:
        fake.fail_status = 503
    reply = chat(lb)
    assert reply.status == 503 and "busy" in reply.json()["error"]
    assert sum(len(f.model_requests()) for f in fakes) == 2


def test_stale_catalog_404_tries_another_server_and_refreshes(fleet: Any) -> None:
    lb, add = fleet("--health-interval", "600")
    stale, stale_row = add(loaded=["llama3:latest"])
    fresh, _ = add()
    stale.models = []  # deleted behind the balancer's back
    assert chat(lb).status == 200
    assert len(stale.model_requests()) == 1 and len(fresh.model_requests()) == 1
    wait_until(lambda: lb.call("GET", f"/servers/{stale_row['id']}").json()["models"] == [])


def test_a_500_is_relayed_not_retried(fleet: Any) -> None:
    lb, add = fleet("--health-interval", "600", LOG_FORMAT="json")
    broken, _ = add(loaded=["llama3:latest"])
    other, _ = add()
    broken.fail_status = 500
    reply = chat(lb)
    assert reply.status == 500 and reply.json() == {"error": "failing with 500"}
    # Once the request is over (its access-log line written), nothing went elsewhere.
    lb.wait_for(lambda: any('"path": "/api/chat"' in line and '"status": 500' in line
                            for line in lb.lines))
    assert not other.model_requests()


# -- fan-out ------------------------------------------------------------------------------


def progress_lines(reply: Reply) -> list[dict[str, Any]]:
    return [json.loads(line) for line in reply.body.decode().splitlines()]


def test_pull_runs_on_every_server_with_one_merged_progress_stream(fleet: Any) -> None:
    lb, add = fleet()
    first, first_row = add(name="gpu-a")
    second, _ = add(name="gpu-b")
    reply = lb.call("POST", "/api/pull", {"model": "qwen2"})
    assert reply.status == 200 and reply.headers["Content-Type"] == "application/x-ndjson"
    lines = progress_lines(reply)
    assert lines[-1] == {"status": "success"}
    assert {line["server"] for line in lines[:-1]} == {"gpu-a", "gpu-b"}
    layer = [line for line in lines if line.get("digest") == "sha256:aaaa"]
    assert max(line["total"] for line in layer) == 2000  # summed over both servers
    assert layer[-1]["completed"] == 2000
    assert first.has("qwen2") and second.has("qwen2")
    wait_until(lambda: "qwen2:latest" in lb.call("GET", f"/servers/{first_row['id']}")
               .json()["models"])


def test_pull_failure_on_one_server_ends_with_an_error_naming_it(fleet: Any) -> None:
    lb, add = fleet()
    add(name="gpu-a")
    broken, _ = add(name="gpu-b")
    broken.pull_error = "disk full"
    lines = progress_lines(lb.call("POST", "/api/pull", {"model": "qwen2"}))
    assert "gpu-b" in lines[-1]["error"] and "disk full" in lines[-1]["error"]
    assert {"status": "success"} not in lines
    whole = lb.call("POST", "/api/pull", {"model": "qwen2", "stream": False})
    assert whole.status == 502 and "gpu-b" in whole.json()["error"]


def test_the_official_client_sees_every_healthy_servers_pull_then_one_error(
        fleet: Any) -> None:
    ollama = require_module("ollama")
    lb, add = fleet("--health-interval", "600")
    add(name="gpu-fast")
    late, _ = add(name="gpu-late")
    late.pull_delay = 0.5  # joins the layer when gpu-fast has it whole
    broken, _ = add(name="gpu-broken")
    broken.pull_error = "disk full"  # halfway, before gpu-late has begun
    down, down_row = add(name="gpu-down")
    down.close()
    lb.call("PATCH", f"/servers/{down_row['id']}", {"weight": 1})  # checked again: down
    wait_until(lambda: not lb.call("GET", f"/servers/{down_row['id']}").json()["reachable"])
    client = ollama.Client(host=f"http://127.0.0.1:{lb.port}")
    seen = []
    with pytest.raises(ollama.ResponseError) as caught:
        for progress in client.pull("qwen2", stream=True):
            seen.append(progress)
    assert caught.value.error == ("qwen2: failed on gpu-broken: disk full; "
                                  "skipped, being down: gpu-down")
    statuses = [p.status for p in seen]
    assert "gpu-broken: failed: disk full" in statuses
    assert statuses.index("gpu-broken: failed: disk full") < statuses.index("gpu-late: done")
    assert "gpu-fast: done" in statuses
    layer = [(p.total, p.completed) for p in seen if p.digest == "sha256:aaaa"]
    assert layer[0][0] == 3000  # three servers pulling the layer, from the first line
    assert {total for total, _ in layer} == {3000}
    completed = [done for _, done in layer]
    assert completed == sorted(completed) and completed[-1] == 2500  # gpu-broken: 500
    assert late.has("qwen2") and not broken.has("qwen2")


def test_a_pull_that_skips_a_down_server_says_so_on_its_last_line(fleet: Any) -> None:
    lb, add = fleet("--health-interval", "600")
    add(name="gpu-a")
    down, down_row = add(name="gpu-down")
    down.close()
    lb.call("PATCH", f"/servers/{down_row['id']}", {"weight": 1})
    wait_until(lambda: not lb.call("GET", f"/servers/{down_row['id']}").json()["reachable"])
    lines = progress_lines(lb.call("POST", "/api/pull", {"model": "qwen2"}))
    assert lines[-1] == {"status": "success", "skipped": ["gpu-down"]}
    named = progress_lines(lb.call("POST", "/api/pull", {"model": "qwen2",
                                                         "servers": ["gpu-a"]}))
    assert named[-1] == {"status": "success"}  # what was asked for: nothing skipped


def test_pull_to_chosen_servers_only(fleet: Any) -> None:
    lb, add = fleet()
    chosen, row = add(name="gpu-a")
    other, _ = add(name="gpu-b")
    whole = lb.call("POST", "/api/pull", {"model": "qwen2", "stream": False,
                                          "servers": [row["id"]]})
    assert whole.status == 200 and whole.json() == {"status": "success"}
    assert chosen.has("qwen2") and not other.has("qwen2")
    pulls = [r for r in chosen.requests if r["path"] == "/api/pull"]
    assert len(pulls) == 1 and json.loads(pulls[0]["body"]) == {"model": "qwen2",
                                                                 "stream": True}
    assert not [r for r in other.requests if r["path"] == "/api/pull"]
    assert lb.call("POST", "/api/pull", {"model": "x", "servers": ["nobody"]}).status == 404


def test_delete_reaches_every_server_that_has_the_model(fleet: Any) -> None:
    lb, add = fleet()
    first, _ = add(["llama3:latest", "phi3:latest"])
    second, _ = add(["phi3:latest"])
    third, _ = add(["llama3:latest"])
    assert lb.call("DELETE", "/api/delete", {"model": "phi3"}).status == 200
    assert not first.has("phi3") and not second.has("phi3")
    # The third was asked too (it may have pulled it since its last check): it said it
    # does not have it, which is no failure while others did.
    assert [r["path"] for r in third.requests].count("/api/delete") == 1
    assert lb.call("DELETE", "/api/delete", {"model": "phi3"}).status == 404


def test_copy_goes_to_every_server(fleet: Any) -> None:
    lb, add = fleet()
    fakes = [add()[0] for _ in range(2)]
    reply = lb.call("POST", "/api/copy", {"source": "llama3", "destination": "mine:latest"})
    assert reply.status == 200
    assert all(f.has("mine:latest") for f in fakes)
    missing = lb.call("POST", "/api/copy", {"source": "nope", "destination": "x"})
    assert missing.status == 404


def test_blob_upload_then_create_works_on_every_server(fleet: Any) -> None:
    lb, add = fleet()
    fakes = [add()[0] for _ in range(2)]
    blob = bytes(range(256)) * 8192  # 2 MiB, streamed to both at once
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    assert lb.call("HEAD", f"/api/blobs/{digest}").status == 404
    upload = lb.call("POST", f"/api/blobs/{digest}", raw=blob)
    assert upload.status == 201, upload
    assert all(f.blobs[digest] == blob for f in fakes)
    assert lb.call("HEAD", f"/api/blobs/{digest}").status == 200
    bad = lb.call("POST", f"/api/blobs/{digest}", raw=b"not the blob")
    assert bad.status == 502 and "digest mismatch" in bad.json()["error"]
    created = lb.call("POST", "/api/create", {"model": "made:latest",
                                              "files": {"model.gguf": digest}})
    assert progress_lines(created)[-1] == {"status": "success"}
    assert all(f.has("made:latest") for f in fakes)


# -- clients -------------------------------------------------------------------------------


def test_official_client_at_the_root(fleet: Any) -> None:
    ollama = require_module("ollama")
    lb, add = fleet()
    add(["llama3:latest", "nomic-embed-text:latest"], loaded=["llama3:latest"])
    add(["mistral:7b"])
    client = ollama.Client(host=f"http://127.0.0.1:{lb.port}")
    assert {m.model for m in client.list().models} == {"llama3:latest", "mistral:7b",
                                                       "nomic-embed-text:latest"}
    assert [m.model for m in client.ps().models] == ["llama3:latest"]
    assert client.show("mistral:7b").details.parameter_size == "8.0B"
    streamed = [p.message.content for p in client.chat(
        model="mistral:7b", messages=[{"role": "user", "content": "hi"}], stream=True)]
    assert "".join(streamed) == reply_text([{"role": "user", "content": "hi"}])
    assert client.chat(model="llama3", messages=[], stream=False).message.content
    assert "".join(p.response for p in client.generate(model="llama3", prompt="x",
                                                       stream=True)) == reply_text(
        [{"role": "user", "content": "x"}])
    assert client.generate(model="llama3", prompt="x", stream=False).done
    assert client.embed(model="nomic-embed-text", input="x").embeddings == [[0.1, 0.2, 0.3]]
    pulled = list(client.pull("qwen2", stream=True))
    assert pulled[-1].status == "success"
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="absent", messages=[])
    assert caught.value.status_code == 404


def test_openai_format_through_v1(fleet: Any) -> None:
    lb, add = fleet()
    fake, _ = add()
    streamed = lb.call("POST", "/v1/chat/completions", {"model": "llama3", "stream": True,
                                                        "messages": []})
    assert streamed.status == 200 and streamed.body.endswith(b"data: [DONE]\n\n")
    whole = lb.call("POST", "/v1/chat/completions", {"model": "llama3", "messages": []})
    assert whole.json()["choices"][0]["message"]["content"] == reply_text([])
    embedded = lb.call("POST", "/v1/embeddings", {"model": "llama3", "input": "x"})
    assert embedded.json()["data"][0]["embedding"] == [0.1, 0.2]
    assert [r["path"] for r in fake.model_requests()] == [
        "/v1/chat/completions", "/v1/chat/completions", "/v1/embeddings"]


def test_routed_body_reaches_ollama_byte_for_byte(fleet: Any) -> None:
    lb, add = fleet()
    fake, _ = add()
    raw = b'{"model":"llama3",  "prompt":"\\u00e9t\\u00e9", "stream":false, "x":[1,2.50]}'
    reply = call(lb.port, "POST", "/api/generate", raw=raw)
    assert reply.status == 200
    assert fake.model_requests()[-1]["body"] == raw


class SlowTags:
    """Servers on many ports that answer /api/tags after a moment, counting how many
    health checks they were in at once."""

    def __init__(self, count: int) -> None:
        import http.server

        owner = self
        self.active = self.most = 0
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/api/tags":
                    with owner.lock:
                        owner.active += 1
                        owner.most = max(owner.most, owner.active)
                    time.sleep(0.2)
                    with owner.lock:
                        owner.active -= 1
                    body = json.dumps({"models": [tag("llama3:latest")]}).encode()
                else:
                    body = b'{"models": [], "version": "0.12.0"}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
                        for _ in range(count)]
        for server in self.servers:
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


def test_a_round_of_health_checks_runs_only_so_many_at_once(fleet: Any) -> None:
    # 10,000 servers must not mean 10,000 sockets at once every round.
    lb, _ = fleet("--health-interval", "600", "--health-concurrency", "3")
    slow = SlowTags(12)
    try:
        for server in slow.servers:
            lb.add_server(f"http://127.0.0.1:{server.server_address[1]}")
        time.sleep(0.5)  # the checks of the adds are over
        slow.most = 0
        assert chat(lb, "not-here").status == 404  # one fresh look at the whole fleet
        assert slow.most == 3, slow.most
    finally:
        slow.close()


# -- Ollama's contract kept (issue 27) ---------------------------------------------------------


def test_a_missing_endpoint_is_not_called_a_missing_model(fleet: Any) -> None:
    """An older Ollama's "404 page not found" is passed on: not an OpenAI
    ``model_not_found``, nor, from every server of a fan-out, "model not found"."""
    lb, add = fleet("--health-interval", "600")
    old, _ = add(loaded=["llama3:latest"])
    old.missing_paths = {"/v1/embeddings", "/api/copy"}
    reply = lb.call("POST", "/v1/embeddings", {"model": "llama3", "input": "hi"})
    assert reply.status == 404 and reply.json()["error"]["code"] is None, reply
    copied = lb.call("POST", "/api/copy", {"source": "llama3", "destination": "mine"})
    assert copied.status == 502 and "404 page not found" in copied.json()["error"], copied
    old.missing_paths = set()
    gone = lb.call("POST", "/v1/embeddings", {"model": "nothing-here", "input": "hi"})
    assert gone.json()["error"]["code"] == "model_not_found"


def test_a_repaired_server_is_back_within_a_health_round_not_its_cooldown(
        fleet: Any) -> None:
    """A server that did not answer (here: in time) opens its circuit; once it answers
    its health check again, it is back within a health round (the cooldown is 60 s)."""
    lb, add = fleet("--health-interval", "0.5", "--breaker-threshold", "1",
                    "--breaker-cooldown", "60", "--upstream-timeout", "0.5")
    _, row = add(loaded=["llama3:latest"])
    assert chat(lb, fake_sleep=1.0).status == 504
    assert lb.call("GET", f"/servers/{row['id']}").json()["circuitOpen"] is True
    repaired = time.monotonic()
    wait_until(lambda: lb.call("GET", f"/servers/{row['id']}").json()["circuitOpen"] is False,
               timeout=0.5 + 2)
    assert time.monotonic() - repaired < 0.5 + 2
    assert chat(lb).status == 200


def test_long_session_ids_keep_their_affinity_at_a_bounded_size() -> None:
    long_id = "s" * 60_000
    key = ob.session_key(long_id)
    assert key is not None and len(key) <= ob.MAX_SESSION_ID
    assert key == ob.session_key("s" * 60_000) != ob.session_key("s" * 59_999)
    assert ob.session_key("short-id") == "short-id" and ob.session_key(None) is None


def test_long_session_ids_still_stick_to_their_server(fleet: Any) -> None:
    lb, add = fleet("--health-interval", "600")
    first, _ = add(loaded=["llama3:latest"])
    second, _ = add(loaded=["llama3:latest"])
    for index in range(3):
        session = {"X-Session-Id": f"{index}-" + "x" * 50_000}
        for _ in range(3):
            assert chat(lb, headers=session).status == 200
    # Each session's three turns went to one server.
    turns = [r["headers"].get("X-Session-Id", "")[:2] for f in (first, second)
             for r in f.model_requests()]
    assert sorted(turns) == sorted(["0-"] * 3 + ["1-"] * 3 + ["2-"] * 3)
    for fake in (first, second):
        seen = [r["headers"].get("X-Session-Id", "")[:2] for r in fake.model_requests()]
        assert all(seen.count(prefix) in (0, 3) for prefix in ("0-", "1-", "2-")), seen


def test_a_model_name_with_a_newline_cannot_forge_an_access_log_line(fleet: Any) -> None:
    lb, add = fleet("--health-interval", "600")
    add(["evil\n2026-01-01 00:00:00,000 INFO    forged:latest"])
    assert chat(lb, "evil\n2026-01-01 00:00:00,000 INFO    forged:latest").status == 200
    lb.wait_for(lambda: any("/api/chat" in line for line in lb.lines))
    assert not [line for line in lb.lines if line.startswith("2026-01-01")]
    assert any("evil\\n2026-01-01" in line for line in lb.lines)


def test_a_quick_refusal_keeps_the_connection_when_the_request_was_read_whole(
        fleet: Any) -> None:
    lb, add = fleet("--health-interval", "600")
    add(loaded=["llama3:latest"])
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    sockets = []
    try:
        for model, status in (("nothing-here", 404), ("llama3", 200), ("nothing", 404),
                              ("llama3", 200)):
            conn.request("POST", "/api/chat", json.dumps(
                {"model": model, "messages": [], "stream": False}),
                {"Content-Type": "application/json"})
            sockets.append(conn.sock)
            reply = conn.getresponse()
            reply.read()
            assert reply.status == status and reply.getheader("Connection") != "close"
    finally:
        conn.close()
    assert len({id(sock) for sock in sockets}) == 1  # one connection for all four


def test_metadata_is_answered_at_once_while_every_slot_is_busy_and_requests_queue(
        fleet: Any) -> None:
    lb, add = fleet("--health-interval", "600", "--max-concurrency", "1")
    fake, _ = add(loaded=["llama3:latest"])
    holder, _ = in_thread(chat, lb, fake_hold=True)
    wait_until(lambda: held(fake) == 1)
    waiting = [in_thread(chat, lb) for _ in range(2)]
    wait_until(lambda: lb.call("GET", "/servers/status").json()["queue"]["depth"] == 2)
    for method, path, body in (("POST", "/api/show", {"model": "llama3"}),
                               ("GET", "/api/tags", None), ("GET", "/api/ps", None),
                               ("GET", "/api/version", None), ("GET", "/v1/models", None),
                               ("GET", "/v1/models/llama3:latest", None)):
        started = time.monotonic()
        reply = lb.call(method, path, body, timeout=5)
        assert reply.status == 200 and time.monotonic() - started < 1.0, (path, reply)
    assert lb.call("POST", "/api/show", {"model": "nothing-here"}).status == 404
    fake.release(3)
    for thread in [holder, *(waiter for waiter, _ in waiting)]:
        thread.join(10)


def test_a_model_held_under_two_digests_is_shown_as_drift(fleet: Any) -> None:
    lb, add = fleet("--health-interval", "0.5")
    first, _ = add()
    second, _ = add()
    models = lb.call("GET", "/models").json()
    assert [(m["name"], m["drift"]) for m in models] == [("llama3:latest", False)]
    assert {s["label"] for s in models[0]["digests"][0]["servers"]} == {
        first.url, second.url}
    second.models = [dict(tag("llama3:latest"), digest="b" * 64)]  # pulled after the tag moved
    wait_until(lambda: lb.call("GET", "/models").json()[0]["drift"] is True)
    digests = lb.call("GET", "/models").json()[0]["digests"]
    assert [(d["digest"], [s["label"] for s in d["servers"]]) for d in digests] == [
        ("a" * 64, [first.url]), ("b" * 64, [second.url])]
    assert "ollamabalancer_models_drifted 1" in lb.call("GET", "/metrics").text
    assert lb.call("GET", "/servers/status").json()["drifted"] == ["llama3:latest"]
    lb.wait_for(lambda: sum("llama3:latest differs between servers" in line
                            for line in lb.lines) == 1)
    time.sleep(1.2)  # more health rounds: said once
    assert sum("llama3:latest differs between servers" in line for line in lb.lines) == 1


def test_a_fresh_check_asked_for_as_the_last_one_ends_starts_another_and_never_spins(
        ) -> None:
    """Once.run(fresh=True) arriving when the run under way has just ended (its end not yet
    told to the Once) starts a run of its own; it once looped on that ended run without
    ever yielding, freezing the whole event loop."""
    runs: list[int] = []

    async def scenario() -> None:
        once = ob.Once()

        async def start() -> None:
            runs.append(len(runs))

        first = asyncio.ensure_future(once.run("server", start))
        await asyncio.sleep(0)  # the first run is made; it ends in the next step
        fresh = asyncio.ensure_future(once.run("server", start, fresh=True))
        await asyncio.wait_for(asyncio.gather(first, fresh), 2)

    thread = threading.Thread(target=asyncio.run, args=(scenario(),), daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "the event loop spun"
    assert runs == [0, 1]  # the fresh caller's own run, after the first
