"""Tenants: which models an API key may use, what it used, its day's budget, and a fair
share of a full fleet between keys."""

from __future__ import annotations

import asyncio
import datetime
import http.client
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import BalancerProcess, StoreConfig, call, chromium
from fakeollama import FakeOllama, generate_messages, prompt_key, tag

import ollamabalancer as ob

WORDS = 5


def add_key(lb: BalancerProcess, name: str, **fields: Any) -> tuple[int, dict[str, str]]:
    reply = lb.call("POST", "/keys/addKey", {"name": name, **fields})
    assert reply.status == 201, reply
    return reply.json()["id"], {"Authorization": f"Bearer {reply.json()['key']}"}


@pytest.fixture
def keyed(start_balancer: Any, sqlite_store: StoreConfig, make_backend: Any) -> Any:
    def build(*args: str, models: tuple[str, ...] = ("llama3:latest", "qwen2:7b",
                                                      "mistral:latest"),
              **fake: Any) -> tuple[BalancerProcess, FakeOllama]:
        lb = start_balancer(sqlite_store, "--health-interval", "600", "--sync-interval",
                            "0.2", *args)
        backend = make_backend(models=[tag(m) for m in models], tokens=WORDS)
        for name, value in fake.items():
            setattr(backend, name, value)
        backend.loaded = list(models)
        lb.add_server(backend.url, name="gpu")
        return lb, backend

    return build


# -- models per key ----------------------------------------------------------------------


def test_a_key_uses_only_its_models_and_sees_only_them(keyed: Any) -> None:
    lb, backend = keyed()
    _, limited = add_key(lb, "team-a", models=["llama3*", "qwen2:7b"])
    _, everything = add_key(lb, "team-b")
    chat = {"model": "mistral", "messages": [], "stream": False}
    refused = lb.call("POST", "/api/chat", chat, headers=limited)
    assert refused.status == 403
    assert refused.json() == {"error": "API key 'team-a' may not use model 'mistral:latest'"}
    openai = lb.call("POST", "/v1/chat/completions", {"model": "mistral", "messages": []},
                     headers=limited)
    assert openai.status == 403 and "mistral:latest" in openai.json()["error"]["message"]
    assert lb.call("POST", "/api/chat", {**chat, "model": "llama3"},
                   headers=limited).status == 200
    assert lb.call("POST", "/api/chat", chat, headers=everything).status == 200
    assert not any(json.loads(r["body"]).get("model") == "mistral" and
                   r["headers"].get("Authorization") for r in backend.model_requests())
    tags = lb.call("GET", "/api/tags", headers=limited).json()["models"]
    assert sorted(m["name"] for m in tags) == ["llama3:latest", "qwen2:7b"]
    assert len(lb.call("GET", "/api/tags", headers=everything).json()["models"]) == 3
    assert sorted(m["name"] for m in lb.call("GET", "/api/ps", headers=limited).json()[
        "models"]) == ["llama3:latest", "qwen2:7b"]
    assert sorted(m["id"] for m in lb.call("GET", "/v1/models", headers=limited).json()[
        "data"]) == ["llama3:latest", "qwen2:7b"]
    assert lb.call("GET", "/v1/models/mistral:latest", headers=limited).status == 404
    assert lb.call("POST", "/api/show", {"model": "mistral"}, headers=limited).status == 403
    # A server chosen by id names no model the balancer could hold it to.
    assert lb.call("GET", "/servers/ollama/1/api/tags", headers=limited).status == 403
    assert lb.call("GET", "/servers/getServer?models=llama3", headers=limited).status == 403
    assert lb.call("GET", "/servers/ollama/1/api/tags", headers=everything).status == 200


def test_every_field_of_a_key_can_be_changed_and_cleared(keyed: Any) -> None:
    lb, _ = keyed()
    key_id, headers = add_key(lb, "team-a", models=["llama3"])
    changed = lb.call("PATCH", f"/keys/{key_id}", {
        "name": "team-b", "models": ["qwen2*"], "tokensPerDay": 5000, "weight": 2.5,
        "priority": "HIGH", "requestsPerMinute": 60, "maxConcurrent": 3})
    assert changed.status == 200, changed
    assert {k: v for k, v in changed.json().items() if k not in ("createdAt", "lastUsedAt")} == {
        "id": key_id, "name": "team-b", "models": ["qwen2*"], "tokensPerDay": 5000,
        "weight": 2.5, "priority": "high", "requestsPerMinute": 60, "maxConcurrent": 3,
        "labels": {}}
    cleared = lb.call("PATCH", f"/keys/{key_id}", {
        "models": None, "tokensPerDay": None, "requestsPerMinute": None,
        "maxConcurrent": None}).json()
    assert (cleared["models"], cleared["tokensPerDay"], cleared["requestsPerMinute"],
            cleared["maxConcurrent"]) == (None, None, None, None)
    assert lb.call("GET", f"/keys/{key_id}").json()["name"] == "team-b"
    assert lb.call("POST", "/api/chat", {"model": "mistral", "messages": [], "stream": False},
                   headers=headers).status == 200  # every model again
    for bad in ({"weight": 0}, {"priority": "urgent"}, {"models": ["a b"]},
                {"models": "llama3"}, {"tokensPerDay": -1}, {"name": None}, {"nope": 1}):
        reply = lb.call("PATCH", f"/keys/{key_id}", bad)
        assert reply.status == 400 and "error" in reply.json(), (bad, reply)
    assert lb.call("PATCH", "/keys/999", {"weight": 2}).status == 404
    assert lb.call("DELETE", f"/keys/{key_id}").status == 204
    assert lb.call("GET", f"/keys/{key_id}").status == 404


# -- usage -------------------------------------------------------------------------------


def usage_of(lb: BalancerProcess, key_id: int) -> dict[str, Any]:
    reply = lb.call("GET", f"/keys/{key_id}/usage")
    assert reply.status == 200, reply
    return dict(reply.json())


def stream_lines(lb: BalancerProcess, path: str, body: Any, headers: dict[str, str]
                 ) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=30)
    conn.request("POST", path, json.dumps(body), headers)
    data = conn.getresponse().read()
    conn.close()
    return data


@pytest.fixture
def keyed_store(start_balancer: Any, store: StoreConfig, make_backend: Any) -> Any:
    """``keyed`` on SQLite and on MySQL."""
    def build() -> tuple[BalancerProcess, FakeOllama, Any]:
        lb = start_balancer(store, "--health-interval", "600", "--sync-interval", "0.2")
        backend = make_backend(models=[tag("llama3:latest"), tag("qwen2:7b")], tokens=WORDS)
        lb.add_server(backend.url, name="gpu")
        return lb, backend, lambda: start_balancer(store, "--health-interval", "600")

    return build


def test_usage_is_what_the_servers_counted_and_survives_a_restart(keyed_store: Any) -> None:
    lb, _, restart = keyed_store()
    key_id, headers = add_key(lb, "team-a")
    chat = [{"role": "user", "content": "tell me a story please"}]
    prompt = len(prompt_key(chat).split())
    stream_lines(lb, "/api/chat", {"model": "llama3", "messages": chat}, headers)
    assert lb.call("POST", "/api/chat", {"model": "llama3", "messages": chat,
                                         "stream": False}, headers=headers).status == 200
    generate = {"model": "qwen2:7b", "prompt": "once upon a time", "stream": False}
    generated_prompt = len(prompt_key(generate_messages(generate)).split())
    assert lb.call("POST", "/api/generate", generate, headers=headers).status == 200
    stream_lines(lb, "/v1/chat/completions", {
        "model": "llama3", "messages": chat, "stream": True,
        "stream_options": {"include_usage": True}}, headers)
    assert lb.call("POST", "/v1/chat/completions", {"model": "llama3", "messages": chat},
                   headers=headers).status == 200
    expected = {"total": {"requests": 5, "promptTokens": 4 * prompt + generated_prompt,
                          "completionTokens": 5 * WORDS},
                "models": [{"model": "llama3:latest", "requests": 4,
                            "promptTokens": 4 * prompt, "completionTokens": 4 * WORDS},
                           {"model": "qwen2:7b", "requests": 1,
                            "promptTokens": generated_prompt, "completionTokens": WORDS}]}
    usage = usage_of(lb, key_id)
    assert {k: usage[k] for k in ("total", "models")} == expected
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    assert [d["day"] for d in usage["days"]] == [today]
    assert usage["today"] == {**expected["total"], "tokensPerDay": None}
    metrics = lb.call("GET", "/metrics").text
    assert (f'ollamabalancer_key_tokens_total{{key="team-a",model="llama3:latest",'
            f'kind="completion"}} {4 * WORDS}') in metrics
    lb.stop()  # its last counts written as it stops
    again = restart()
    usage = usage_of(again, key_id)
    assert {k: usage[k] for k in ("total", "models")} == expected


# -- budgets -----------------------------------------------------------------------------


def test_a_budget_refuses_once_spent_until_the_utc_day_turns(keyed: Any) -> None:
    lb, _ = keyed()
    key_id, headers = add_key(lb, "team-a", tokensPerDay=12)
    chat = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}],
            "stream": False}
    assert lb.call("POST", "/api/chat", chat, headers=headers).status == 200  # 2 + 5
    assert lb.call("POST", "/api/chat", chat, headers=headers).status == 200  # 14: spent
    refused = lb.call("POST", "/api/chat", chat, headers=headers)
    assert refused.status == 429
    assert refused.json() == {"error": "API key 'team-a' has spent its 12 tokens for today; "
                                       "its budget renews at 00:00 UTC"}
    now = datetime.datetime.now(datetime.UTC)
    midnight = (now + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0,
                                                          microsecond=0)
    assert abs(int(refused.headers["Retry-After"]) - (midnight - now).total_seconds()) < 30
    openai = lb.call("POST", "/v1/chat/completions", {"model": "llama3", "messages": []},
                     headers=headers)
    assert openai.status == 429 and openai.json()["error"]["code"] == "rate_limit_exceeded"
    # Nor through a server chosen by id; what costs no tokens still answers.
    assert lb.call("POST", "/servers/ollama/1/api/chat", chat, headers=headers).status == 429
    assert lb.call("GET", "/api/tags", headers=headers).status == 200
    # A larger budget lets it on at once; the usage says why it stopped.
    lb.call("PATCH", f"/keys/{key_id}", {"tokensPerDay": 1000})
    assert lb.call("POST", "/api/chat", chat, headers=headers).status == 200
    assert usage_of(lb, key_id)["today"]["tokensPerDay"] == 1000


def test_a_budget_is_the_sum_over_every_instance(start_balancer: Any,
                                                  sqlite_store: StoreConfig,
                                                  make_backend: Any) -> None:
    first = start_balancer(sqlite_store, "--health-interval", "600", "--sync-interval",
                           "0.2")
    second = start_balancer(sqlite_store, "--health-interval", "600", "--sync-interval",
                            "0.2")
    backend = make_backend(models=[tag("llama3:latest")], tokens=WORDS)
    first.add_server(backend.url)
    _, headers = add_key(first, "team-a", tokensPerDay=12)
    chat = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}],
            "stream": False}
    second.wait_for(lambda: second.call("POST", "/api/chat", chat,
                                        headers=headers).status == 200)
    assert first.call("POST", "/api/chat", chat, headers=headers).status == 200  # 14
    # The first instance's usage reaches the second through the store.
    second.wait_for(lambda: second.call("POST", "/api/chat", chat,
                                        headers=headers).status == 429)


def test_the_budget_renews_when_the_utc_day_turns(tmp_path: Path) -> None:
    """In-process, with a clock that moves past midnight: yesterday's tokens count for
    the usage, not for today's budget."""
    config = ob.Config(db_path=str(tmp_path / "b.db"))
    store = ob.AsyncStore(ob.open_store(config))
    clock = [datetime.datetime(2026, 12, 7, 23, 59, 0, tzinfo=datetime.UTC).timestamp()]
    tenants = ob.Tenants(config, store, ob.Metrics(), clock=lambda: clock[0])
    key = ob.ApiKey(1, "team-a", "0" * 64, tokens_per_day=100)

    async def scenario() -> list[int]:
        seen = []
        tenants.record(key, "llama3:latest", (40, 70))
        with pytest.raises(ob.HTTPError) as caught:
            tenants.check_budget(key)
        seen.append(caught.value.status)
        assert list(caught.value.headers) == [("Retry-After", "60")]
        await tenants.flush()
        with pytest.raises(ob.HTTPError):
            tenants.check_budget(key)  # written: the store's sum says the same
        clock[0] += 120  # 00:01 the next day
        tenants.check_budget(key)
        seen.append(tenants.spent_today(1))
        await tenants.flush()
        seen.append(tenants.spent_today(1))
        usage = await tenants.usage(key)
        seen.append(usage["total"]["completionTokens"])
        seen.append(usage["today"]["completionTokens"])
        return seen

    try:
        assert asyncio.run(scenario()) == [429, 0, 0, 70, 0]
    finally:
        store.shutdown()


def test_a_usage_batch_that_timed_out_is_not_counted_twice(tmp_path: Path) -> None:
    store = ob.open_store(ob.Config(db_path=str(tmp_path / "u.db")))
    rows = [(1, "2026-12-07", "llama3:latest", 1, 10, 20)]
    try:
        assert store.add_usage("a", 1, rows, "2026-12-07") == {1: 30}
        assert store.add_usage("a", 1, rows, "2026-12-07") == {1: 30}  # tried again
        assert store.add_usage("b", 1, rows, "2026-12-07") == {1: 60}  # another instance
        assert store.add_usage("a", 2, rows, "2026-12-07") == {1: 90}
    finally:
        store.close()


# -- a fair share of a full fleet --------------------------------------------------------


def scheduler_with_one_slot() -> tuple[ob.Scheduler, dict[int, ob.Server]]:
    config = ob.Config(num_parallel=1, max_loaded_models=1, max_concurrency=1,
                       max_queue=20_000)
    server = ob.Server(1, "h1", 11434, reachable=True, models=[{"name": "m:latest"}])
    return ob.Scheduler(config), {1: server}


def grant_order(arrivals: list[tuple[ob.Tenant, str]]) -> list[str]:
    """Queues ``arrivals`` (a tenant and a label each) behind one busy slot, then frees
    the slot again and again: the labels in the order their requests got it."""
    async def scenario() -> list[str]:
        scheduler, servers = scheduler_with_one_slot()
        held = scheduler.take(servers[1], "m:latest")
        waiting = []
        for tenant, label in arrivals:
            waiting.append((label, asyncio.ensure_future(
                scheduler.acquire(servers, "m:latest", tenant=tenant))))
            await asyncio.sleep(0)
        order = []
        slot = held
        for _ in arrivals:
            scheduler.release(servers, slot)
            while not any(t.done() for _, t in waiting):
                await asyncio.sleep(0)
            label, task = next((lbl, t) for lbl, t in waiting if t.done())
            waiting.remove((label, task))
            order.append(label)
            slot = task.result()
        scheduler.release(servers, slot)
        return order

    return asyncio.run(scenario())


def test_a_flood_of_one_key_does_not_hold_back_another_key() -> None:
    flood, other = ob.Tenant("key 1"), ob.Tenant("key 2")
    order = grant_order([(flood, f"A{i}") for i in range(30)] +
                        [(other, f"B{i}") for i in range(3)])
    # B's three come within the next few turns, alternating with A's, each key in its
    # own arrival order.
    assert [label for label in order if label.startswith("B")] == ["B0", "B1", "B2"]
    assert max(order.index(f"B{i}") for i in range(3)) < 6
    assert [label for label in order if label.startswith("A")] == [f"A{i}" for i in range(30)]


def test_weights_share_turns_and_priorities_go_first() -> None:
    light, heavy = ob.Tenant("key 1", weight=1), ob.Tenant("key 2", weight=3)
    order = grant_order([(light, "L")] * 20 + [(heavy, "H")] * 20)
    assert order[:16].count("H") == 12 and order[:16].count("L") == 4
    urgent = ob.Tenant("key 3", lane=ob.PRIORITY_LANES["high"])
    low = ob.Tenant("key 4", lane=ob.PRIORITY_LANES["low"])
    order = grant_order([(low, "low")] * 3 + [(light, "normal")] * 3 + [(urgent, "high")] * 3)
    assert order == ["high"] * 3 + ["normal"] * 3 + ["low"] * 3
    # Requests without a key are one tenant among the keys.
    order = grant_order([(ob.NO_TENANT, "none")] * 6 + [(light, "key")] * 3)
    assert order[:6].count("key") == 3


def test_a_key_that_floods_the_fleet_waits_its_turn_end_to_end(keyed: Any) -> None:
    """30 requests of key A queued behind one slot, then 3 of key B: B's complete within
    the next few completions, as the server saw them."""
    lb, backend = keyed("--max-concurrency", "1", "--conversation-affinity", "off",
                        models=("llama3:latest",), token_delay=0.02)
    _, flood = add_key(lb, "team-a")
    _, other = add_key(lb, "team-b")
    done: list[str] = []
    lock = threading.Lock()

    def ask(headers: dict[str, str], label: str) -> None:
        reply = call(lb.port, "POST", "/api/chat", {
            "model": "llama3", "messages": [{"role": "user", "content": label}],
            "stream": False}, headers=headers, timeout=60)
        assert reply.status == 200, reply
        with lock:
            done.append(label)

    threads = [threading.Thread(target=ask, args=(flood, f"A{i}")) for i in range(30)]
    for thread in threads:
        thread.start()
    lb.wait_for(lambda: lb.call("GET", "/servers/status").json()["queue"]["depth"] >= 25)
    with lock:
        before = len(done)
    late = [threading.Thread(target=ask, args=(other, f"B{i}")) for i in range(3)]
    for thread in late:
        thread.start()
    for thread in threads + late:
        thread.join(60)
    served = [json.loads(r["body"])["messages"][0]["content"]
              for r in backend.model_requests()]
    after = served[before:]
    # Served one at a time: B's three among the next eight the server saw (a few of A's
    # were already on their way to it when B came).
    assert max(after.index(f"B{i}") for i in range(3)) < 8, served
    assert len(done) == 33


def test_ten_thousand_waiting_are_served_in_fair_order() -> None:
    """10,000 waiters of 100 keys (100 each, key by key) behind one slot: the first 100
    releases give one turn to each key, and the queue's heap stays the size of what
    waits (a dispatch's cost, O(log n), is measured in bench/run.py)."""
    async def scenario() -> tuple[list[int], int, int]:
        scheduler, servers = scheduler_with_one_slot()
        slot = scheduler.take(servers[1], "m:latest")
        keys: dict[asyncio.Future[ob.Slot], int] = {}
        for key in range(100):
            for _ in range(100):
                keys[asyncio.ensure_future(scheduler.acquire(
                    servers, "m:latest", tenant=ob.Tenant(f"key {key}")))] = key
        await asyncio.sleep(0)
        turns = []
        for _ in range(100):
            scheduler.release(servers, slot)
            while not any(t.done() for t in keys):
                await asyncio.sleep(0)
            granted = next(t for t in keys if t.done())
            turns.append(keys.pop(granted))
            slot = granted.result()
        heap = len(scheduler.queue.queues["m:latest"])
        for task in keys:
            task.cancel()
        await asyncio.gather(*keys, return_exceptions=True)
        scheduler.release(servers, slot)
        return turns, heap, len(scheduler.queue)

    turns, heap, left = asyncio.run(scenario())
    assert sorted(turns) == list(range(100))  # each key once
    assert heap <= 2 * 9_900 + 64 and left == 0


def test_the_dashboard_shows_each_key_its_tokens_today_and_budget(keyed: Any) -> None:
    lb, _ = keyed()
    _, headers = add_key(lb, "team-<b>a</b>", tokensPerDay=5000, weight=2,
                         models=["llama3*"])
    assert lb.call("POST", "/api/chat", {"model": "llama3", "messages": [
        {"role": "user", "content": "hi"}], "stream": False}, headers=headers).status == 200
    status = lb.call("GET", "/servers/status").json()
    assert [(k["name"], k["tokensToday"], k["tokensPerDay"]) for k in status["keys"]] == [
        ("team-<b>a</b>", 2 + WORDS, 5000)]
    dom = chromium("--virtual-time-budget=2000", "--dump-dom",
                   f"http://127.0.0.1:{lb.port}/dashboard")
    assert ("<td>team-&lt;b&gt;a&lt;/b&gt;</td><td>llama3*</td><td>7</td><td>5000</td>"
            "<td>2</td><td>normal</td>") in dom
    assert '<div class="value" id="card-recovered">0</div>' in dom
