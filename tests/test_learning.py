"""Fleet learning: each server's Ollama settings learned as it runs (models it keeps loaded,
requests a loaded model runs at once, its memory), the settings as overrides, and
conversations that keep their server (and its KV cache) without a header."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
from conftest import BalancerProcess, StoreConfig
from fakeollama import FakeOllama, tag

import ollamabalancer as ob

# -- what /api/ps shows ----------------------------------------------------------------


def ps(*models: str, size: int = 0, expires: float | None = None) -> list[dict[str, Any]]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.5Z", time.gmtime(
        time.time() + 300 if expires is None else expires))
    return [{"name": m, "size_vram": size, "expires_at": stamp} for m in models]


def test_an_eviction_makes_the_most_models_seen_loaded_the_limit() -> None:
    learned = ob.Learned()
    learned.from_ps(ps("a:latest"), time.time())
    assert learned.resident() == (2, "guessed")  # one seen: two, before two are seen
    learned.from_ps(ps("a:latest", "b:latest"), time.time())
    assert learned.resident() == (2, "guessed")  # two seen, more may fit: still a guess
    learned.from_ps(ps("a:latest", "c:latest"), time.time())  # b went early, for c
    assert learned.evictions == 1
    assert learned.resident() == (2, "learned")


def test_a_model_gone_when_its_keep_alive_ran_out_is_no_eviction() -> None:
    learned = ob.Learned()
    learned.from_ps(ps("a:latest") + ps("b:latest", expires=time.time() - 1), time.time())
    learned.from_ps(ps("a:latest", "c:latest"), time.time())
    assert learned.evictions == 0
    assert learned.resident() == (2, "guessed")


def test_more_models_seen_loaded_than_guessed_raise_the_guess() -> None:
    learned = ob.Learned()
    learned.from_ps(ps("a:latest", "b:latest", "c:latest"), time.time())
    assert learned.resident() == (3, "guessed")
    learned.from_ps(ps("a:latest", "b:latest", "c:latest", "d:latest"), time.time())
    assert learned.resident() == (4, "guessed")


def test_an_eviction_below_the_count_seen_teaches_the_memory_limit() -> None:
    learned = ob.Learned()
    sizes: dict[str, int] = {}
    learned.from_ps(ps("a:latest", "b:latest", "c:latest", size=10), time.time(), sizes)
    learned.from_ps(ps("a:latest", "b:latest", size=10), time.time())  # c expired? no:
    assert learned.evictions == 0  # nothing came in: c's keep-alive was cut, not evicted
    learned.from_ps(ps("a:latest", size=10) + ps("big:latest", size=50), time.time(), sizes)
    assert learned.evictions == 1
    assert learned.vram_limit == 10 + 10 + 50  # a, b and big did not fit together
    assert learned.vram_seen == 60 and sizes == {"a:latest": 10, "b:latest": 10,
                                                 "c:latest": 10, "big:latest": 50}
    assert learned.resident() == (3, "learned")  # it held three at once: the count is three


def test_expires_at_is_read_with_nanoseconds_and_offsets() -> None:
    assert ob._expiry("2026-11-26T12:00:00Z") == 1795694400.0
    assert ob._expiry("2026-11-26T13:00:00.250000000+01:00") == 1795694400.25
    assert ob._expiry("soon") == float("inf") and ob._expiry(None) == float("inf")


# -- requests a loaded model runs at once ----------------------------------------------


def test_answers_seen_streaming_at_once_are_the_parallel_floor() -> None:
    learned = ob.Learned()
    assert learned.parallel() == (2, "guessed")  # nothing seen: two are tried
    learned.first_token("m", 0, 0.0, 1.0)
    learned.first_token("m", 1, 0.5, 1.1)
    learned.answered("m", 2.0)
    assert learned.parallel() == (3, "guessed")  # two seen at once: a third is tried
    learned.answered("m", 2.1)
    assert learned.generating == {}


def test_a_first_token_read_just_before_the_end_of_the_answer_it_followed_is_no_overlap(
        ) -> None:
    """Ollama starts a waiting request as one ends: its first token can be read a moment
    before the balancer has seen the end of the one whose slot it took."""
    learned = ob.Learned()
    learned.first_token("m", 0, 0.0, 0.1)
    learned.first_token("m", 1, 0.5, 2.0)  # sent while one ran ...
    learned.answered("m", 2.0 + ob.Learned.HANDOFF / 2)  # ... which ended as it began
    learned.answered("m", 3.0)
    assert learned.parallel_seen == 1
    assert learned.parallel() == (2, "guessed")


def test_requests_seen_waiting_for_a_slot_make_the_parallel_limit_known() -> None:
    learned = ob.Learned()
    learned.first_token("m", 0, 0.0, 0.1)  # one runs
    for turn in range(ob.Learned.SURE_AFTER):
        sent = 1.0 + turn * 10
        # Sent while one ran; its first token 50 ms after that one ended, 5 s later.
        learned.answered("m", sent + 5.0)
        learned.first_token("m", 1, sent, sent + 5.05)
    assert learned.parallel() == (1, "learned")


def test_a_first_token_long_after_an_answer_ended_is_no_wait_for_a_slot() -> None:
    learned = ob.Learned()
    learned.first_token("m", 0, 0.0, 0.1)
    for turn in range(5):
        sent = 1.0 + turn * 10
        learned.answered("m", sent + 0.5)  # ended a while after it was sent ...
        learned.first_token("m", 1, sent, sent + 3.0)  # ... its first token much later
    for turn in range(5):
        sent = 100.0 + turn * 10
        learned.answered("m", sent + 0.02)  # ended at once (a wait too short to tell) ...
        learned.first_token("m", 1, sent, sent + 0.03)  # ... and its first token soon
    assert learned.parallel() == (2, "guessed")  # a long prompt, not a queue


# -- what the scheduler counts on --------------------------------------------------------


def server_with(learned: ob.Learned, **fields: Any) -> ob.Server:
    server = ob.Server(1, "h", 11434, reachable=True, **fields)
    server.load.learned = learned
    return server


def test_the_cap_is_models_times_parallel_as_learned_and_four_before() -> None:
    scheduler = ob.Scheduler(ob.Config())
    server = server_with(ob.Learned())
    assert scheduler.ranking.capacity(server) == 4  # nothing learned: 4, as it always was
    known = ob.Learned(resident_seen=1, evictions=1, parallel_seen=2, waited=ob.Learned.SURE_AFTER)
    server = server_with(known)
    assert (scheduler.ranking.resident(server), scheduler.ranking.parallel(server)) == (1, 2)
    assert scheduler.ranking.capacity(server) == 2
    guessing = server_with(ob.Learned(resident_seen=2, evictions=1, parallel_seen=2))
    assert scheduler.ranking.parallel(guessing) == 3  # two seen at once: a third is tried ...
    assert scheduler.ranking.capacity(guessing) == 2 * 2 + 1  # ... one at a time, not one a model
    # Neither known: the models loaded now x the requests seen at once, + 1.
    unknown = server_with(ob.Learned(resident_seen=2, parallel_seen=2))
    assert scheduler.ranking.capacity(unknown) == 1 * 2 + 1  # nothing loaded: counted as one
    unknown.load.loaded = {"a:latest": 0.0, "b:latest": 0.0}
    assert scheduler.ranking.capacity(unknown) == 2 * 2 + 1  # not the 3 models guessed
    report = scheduler.ranking.capacity_report(server)
    assert report["maxLoadedModelsFrom"] == report["numParallelFrom"] == "learned"


def test_settings_and_a_servers_own_values_win_over_what_was_learned() -> None:
    known = ob.Learned(resident_seen=1, evictions=1, parallel_seen=2, waited=ob.Learned.SURE_AFTER)
    configured = ob.Scheduler(ob.Config(num_parallel=4, max_loaded_models=2))
    server = server_with(known)
    assert (configured.ranking.resident(server), configured.ranking.parallel(server)) == (2, 4)
    assert configured.ranking.capacity(server) == 8
    own = server_with(known, num_parallel=3, max_loaded_models=5, max_concurrency=7)
    assert (configured.ranking.resident(own), configured.ranking.parallel(own)) == (5, 3)
    assert configured.ranking.capacity(own) == 7
    report = configured.ranking.capacity_report(own)
    assert (report["numParallelFrom"], report["maxLoadedModelsFrom"],
            report["maxConcurrencyFrom"]) == ("server", "server", "server")
    assert configured.ranking.capacity_report(server)["numParallelFrom"] == "setting"


def test_a_server_that_keeps_one_model_is_not_sent_another_while_it_runs_one() -> None:
    scheduler = ob.Scheduler(ob.Config())
    small = server_with(ob.Learned(resident_seen=1, evictions=1), models=[
        {"name": "a:latest"}, {"name": "b:latest"}])
    big = ob.Server(2, "h2", 11434, reachable=True,
                    models=[{"name": "a:latest"}, {"name": "b:latest"}])
    big.id = 2
    servers = {1: small, 2: big}
    slot = scheduler.take(small, "a:latest")
    # b on small would wait for a to finish, then evict it: big loads it instead.
    assert scheduler.ranking.tier(small, "b:latest") == 4
    assert scheduler.ranking.pick(servers, "b:latest")[0] is big
    scheduler.release(servers, slot)


def test_a_load_past_the_models_a_server_has_shown_counts_as_one_that_evicts() -> None:
    """Server 2 has shown two models loaded, nothing more: a third there may evict one
    (its limit is not known), so a request for "a", whose server 1 (holding only "a") is
    busy, waits for that server, as it would rather than make any load that evicts: not
    every new server takes a third model at once (each evicting one that a request then
    loads again elsewhere)."""
    async def scenario() -> tuple[int, int, int]:
        scheduler = ob.Scheduler(ob.Config())
        models = [{"name": f"{m}:latest"} for m in ("a", "b", "c", "d")]
        busy = server_with(ob.Learned(parallel_seen=1, waited=ob.Learned.SURE_AFTER),
                           models=models[:1])
        shown = ob.Server(2, "h2", 11434, reachable=True, models=models)
        shown.load.learned.from_ps(ps("b:latest", "c:latest"), time.time())
        shown.load.loaded = {"b:latest": 0.0, "c:latest": 1.0}
        servers = {1: busy, 2: shown}
        running = scheduler.take(busy, "a:latest")
        tier = scheduler.ranking.tier(shown, "a:latest")
        arriving = await asyncio.wait_for(scheduler.acquire(servers, "a:latest"), 1)
        scheduler.release(servers, arriving)
        scheduler.release(servers, running)
        # A model loaded nowhere is loaded there all the same: the limit is found where
        # a load must evict anyway.
        elsewhere = await asyncio.wait_for(scheduler.acquire(servers, "d:latest"), 1)
        return tier, arriving.server.id, elsewhere.server.id

    assert asyncio.run(scenario()) == (ob.EVICTS, 1, 2)


def test_a_load_that_must_evict_goes_first_where_it_may_evict_nothing() -> None:
    """Both servers hold "a" and "b", idle; server 1 (the heavier, so the better ranked)
    has shown two is its limit, server 2 has not: a load of "c" may fit there beside them,
    and if it does not, the eviction shows server 2's limit."""
    scheduler = ob.Scheduler(ob.Config())
    models = [{"name": f"{m}:latest"} for m in ("a", "b", "c")]
    full = server_with(ob.Learned(resident_seen=2, evictions=1), models=models, weight=2.0)
    unknown = ob.Server(2, "h2", 11434, reachable=True, models=models)
    unknown.load.learned.from_ps(ps("a:latest", "b:latest"), time.time())
    servers = {1: full, 2: unknown}
    for server in servers.values():
        server.load.loaded = {"a:latest": 0.0, "b:latest": 1.0}
    assert {scheduler.ranking.tier(s, "c:latest") for s in servers.values()} == {ob.EVICTS}
    assert scheduler.ranking.pick(servers, "c:latest")[0] is unknown


def test_a_server_counts_on_as_many_models_as_another_of_its_fleet_has_shown() -> None:
    """Server 1 has shown three models loaded at once, and no eviction anywhere says a
    limit: server 2, holding two, takes a third as a load that evicts nothing (most
    fleets are alike), until an eviction somewhere makes a limit usual."""
    scheduler = ob.Scheduler(ob.Config())
    models = [{"name": f"{m}:latest"} for m in ("a", "b", "c")]
    shown = server_with(ob.Learned(), models=models)
    shown.load.learned.from_ps(ps("a:latest", "b:latest", "c:latest"), time.time())
    new = ob.Server(2, "h2", 11434, reachable=True, models=models)
    new.load.loaded = {"a:latest": 0.0, "b:latest": 1.0}
    servers = {1: shown, 2: new}
    assert scheduler.ranking.tier(new, "c:latest") == ob.EVICTS  # nothing shown yet
    scheduler.ranking.learned(servers, shown)
    assert scheduler.ranking.resident_known(new) == (3, "guessed")
    assert scheduler.ranking.tier(new, "c:latest") == 1
    shown.load.learned.from_ps(ps("a:latest", "b:latest", "d:latest"), time.time())
    scheduler.ranking.learned(servers, shown)  # c went early, for d: three is server 1's limit
    assert scheduler.ranking.resident_known(new) == (3, "fleet")
    del servers[1]
    scheduler.ranking.forget(servers)  # a server gone counts no more
    assert scheduler.ranking.resident_known(new) == (2, "guessed")


def test_a_server_not_yet_known_is_counted_on_for_the_fleets_usual_limits() -> None:
    scheduler = ob.Scheduler(ob.Config())
    known = {i: server_with(ob.Learned(resident_seen=r, evictions=1, parallel_seen=p,
                                       waited=ob.Learned.SURE_AFTER))
             for i, (r, p) in enumerate([(1, 1), (2, 2), (2, 2)], start=1)}
    new = server_with(ob.Learned())
    new.id = 4
    servers = {**known, 4: new}
    for server_id, server in known.items():
        server.id = server_id
    assert scheduler.ranking.capacity(new) == 4  # nothing known anywhere: the old default
    for server in known.values():
        scheduler.ranking.learned(servers, server)
    # The median of what the others showed, as a guess of its own (no probing slot).
    assert scheduler.ranking.resident_known(new) == (2, "fleet")
    assert scheduler.ranking.parallel_known(new) == (2, "fleet")
    assert scheduler.ranking.capacity(new) == 4
    assert scheduler.ranking.capacity_report(new)["numParallelFrom"] == "fleet"
    new.load.learned.parallel_seen = 3  # it showed more than the others: that counts
    assert scheduler.ranking.parallel_known(new) == (3, "fleet")
    # A server gone from the fleet is no longer part of what is usual.
    del servers[2], servers[3]
    scheduler.ranking.learned(servers, known[1])
    scheduler.ranking.learned(servers, new)
    assert scheduler.ranking.usual_resident == 2  # no change for server 1: nothing worked out
    known[1].load.learned.parallel_seen = 2
    known[1].load.learned.waited = ob.Learned.SURE_AFTER
    scheduler.ranking.learned(servers, known[1])
    assert (scheduler.ranking.usual_resident, scheduler.ranking.usual_parallel) == (1, 2)


def test_a_servers_own_settings_count_toward_the_fleets_usual_limits() -> None:
    scheduler = ob.Scheduler(ob.Config())
    told = server_with(ob.Learned(), num_parallel=4, max_loaded_models=1)
    scheduler.ranking.learned({1: told}, told)
    assert scheduler.ranking.resident_known(server_with(ob.Learned())) == (1, "fleet")
    assert scheduler.ranking.parallel(server_with(ob.Learned())) == 4


def test_one_wait_that_agrees_with_the_fleets_usual_limit_makes_it_known() -> None:
    learned = ob.Learned()
    learned.first_token("m", 0, 0.0, 0.1)  # one runs
    learned.answered("m", 6.0)
    learned.first_token("m", 1, 1.0, 6.05)  # sent while it ran, its first token after
    assert learned.parallel() == (2, "guessed")  # alone, one wait is not enough
    assert learned.parallel(usual=1) == (1, "learned")  # the fleet's other servers agree
    assert learned.parallel(usual=2) == (2, "fleet")  # they do not: still a guess
    assert learned.known() == (None, None)  # and nothing of its own for the fleet's


# -- conversations ---------------------------------------------------------------------


def chat_body(messages: list[dict[str, str]], model: str = "llama3") -> bytes:
    return json.dumps({"model": model, "messages": messages, "stream": True}).encode()


def test_each_turn_of_a_conversation_extends_the_fingerprints_of_the_last() -> None:
    turn = [{"role": "system", "content": "be [brief] {ok}"}, {"role": "user", "content": "hi"}]
    first = ob.conversation_prints(chat_body(turn), "llama3:latest")
    turn += [{"role": "assistant", "content": "hello \"there\""},
             {"role": "user", "content": "and?"}]
    second = ob.conversation_prints(chat_body(turn), "llama3:latest")
    assert len(first) == 2 and len(second) == 4 and second[:2] == first
    assert ob.conversation_prints(chat_body(turn), "other:latest")[0] != second[0]
    other = ob.conversation_prints(chat_body([{"role": "user", "content": "hey"}]),
                                   "llama3:latest")
    assert other[0] not in second


@pytest.mark.parametrize("body", [
    b'{"model": "m", "prompt": "no messages"}',
    b'{"model": "messages", "x": [{"a": 1}]}',  # "messages" as a value, not a key
    b'{"messages": "not a list"}',
    b'[{"messages": [{"a": 1}]}]',
    b'{"messages": [{"a": 1}',  # cut short
    b'not json at all',
])
def test_bodies_without_a_message_list_have_no_fingerprints(body: bytes) -> None:
    assert ob.conversation_prints(body, "m") == []


def test_a_system_prompt_outside_the_messages_is_part_of_the_conversation() -> None:
    def prints(system: str) -> list[bytes]:
        return ob.conversation_prints(json.dumps({
            "model": "m", "system": system,
            "messages": [{"role": "user", "content": "hi"}]}).encode(), "m")

    assert prints("be brief") != prints("be long") and len(prints("x")) == 1


def test_the_longest_known_start_of_a_conversation_names_its_server() -> None:
    scheduler = ob.Scheduler(ob.Config())
    scheduler.ranking.remember(b"one", 1)
    scheduler.ranking.remember(b"one-two-three", 2)
    assert scheduler.ranking.conversation([b"one", b"one-two", b"one-two-three", b"four"]) == (
        b"one-two-three")
    assert scheduler.ranking.conversation([b"five"]) is None


def test_conversations_share_the_bounded_session_table_the_oldest_forgotten_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ob, "MAX_SESSIONS", 2)
    scheduler = ob.Scheduler(ob.Config())
    for key in (b"a", "session", b"b"):
        scheduler.ranking.remember(key, 1)
    assert list(scheduler.ranking.sessions) == ["session", b"b"]
    assert scheduler.ranking.conversation([b"a"]) is None


# -- through the balancer, with Ollama-like fakes ----------------------------------------


@pytest.fixture
def balancer(start_balancer: Any, sqlite_store: StoreConfig, make_backend: Any) -> Any:
    def build(*args: str, **env: str) -> tuple[BalancerProcess, Any]:
        lb = start_balancer(sqlite_store, "--health-interval", "600", *args, env=env)

        def add(models: tuple[str, ...] = ("llama3:latest",), **knobs: Any
                ) -> tuple[FakeOllama, dict[str, Any]]:
            fake = make_backend(models=[tag(m) for m in models])
            for name, value in knobs.items():
                setattr(fake, name, value)
            return fake, lb.add_server(fake.url)

        return lb, add

    return build


def stream_chat(lb: BalancerProcess, model: str, messages: list[dict[str, str]]
                ) -> tuple[int, str]:
    reply = lb.call("POST", "/api/chat", {"model": model, "messages": messages,
                                          "stream": True}, timeout=30)
    text = "".join(json.loads(line)["message"]["content"]
                   for line in reply.body.splitlines() if line.strip())
    return reply.status, text


def capacity(lb: BalancerProcess, server_id: int) -> dict[str, Any]:
    reply = lb.call("GET", f"/servers/{server_id}")
    assert reply.status == 200, reply
    return dict(reply.json()["capacity"])


def test_the_balancer_learns_a_server_keeps_one_model_from_the_eviction_it_sees(
        balancer: Any) -> None:
    lb, add = balancer()
    fake, row = add(("llama3:latest", "qwen2:latest"), max_loaded=1, tokens=2)
    assert capacity(lb, row["id"])["maxLoadedModelsFrom"] == "guessed"
    for model in ("llama3", "qwen2", "llama3"):
        assert stream_chat(lb, model, [{"role": "user", "content": model}])[0] == 200
    assert fake.evictions >= 1
    deadline = time.monotonic() + 10
    while capacity(lb, row["id"])["maxLoadedModelsFrom"] != "learned":
        assert time.monotonic() < deadline, capacity(lb, row["id"])
        time.sleep(0.1)
    report = capacity(lb, row["id"])
    assert report["maxLoadedModels"] == 1 and report["learned"]["evictions"] >= 1
    assert report["maxConcurrency"] == 2  # 1 model x 1 seen at once, + 1 to find out


def test_a_server_added_to_a_fleet_that_showed_its_limits_starts_from_them(
        balancer: Any) -> None:
    lb, add = balancer()
    _, row = add(("llama3:latest", "qwen2:latest"), max_loaded=1, tokens=2)
    for model in ("llama3", "qwen2", "llama3"):
        assert stream_chat(lb, model, [{"role": "user", "content": model}])[0] == 200
    deadline = time.monotonic() + 10
    while capacity(lb, row["id"])["maxLoadedModelsFrom"] != "learned":
        assert time.monotonic() < deadline, capacity(lb, row["id"])
        time.sleep(0.1)
    _, second = add(("llama3:latest", "qwen2:latest"), max_loaded=1)
    report = capacity(lb, second["id"])
    assert (report["maxLoadedModels"], report["maxLoadedModelsFrom"]) == (1, "fleet"), report
    assert report["learned"]["evictions"] == 0  # its own: nothing yet


def run_at_once(count: int, work: Any) -> list[Any]:
    results: list[Any] = [None] * count

    def one(index: int) -> None:
        results[index] = work(index)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # in order, each while the ones before run
    for thread in threads:
        thread.join(30)
    return results


def test_the_balancer_learns_a_server_runs_one_request_at_a_time(balancer: Any) -> None:
    lb, add = balancer()
    _, row = add(parallel=1, tokens=6, token_delay=0.05)
    for round_ in range(3):
        results = run_at_once(3, lambda i, r=round_: stream_chat(
            lb, "llama3", [{"role": "user", "content": f"{r}-{i}"}]))
        assert all(status == 200 for status, _ in results)
    report = capacity(lb, row["id"])
    assert report["learned"]["numParallelSeen"] == 1
    assert (report["numParallel"], report["numParallelFrom"]) == (1, "learned"), report
    assert report["maxConcurrency"] == 2  # 2 models (guessed) x 1, now known


def test_the_balancer_sees_a_server_run_two_requests_at_once(balancer: Any) -> None:
    lb, add = balancer()
    _, row = add(parallel=2, tokens=8, token_delay=0.05)
    results = run_at_once(2, lambda i: stream_chat(
        lb, "llama3", [{"role": "user", "content": str(i)}]))
    assert all(status == 200 for status, _ in results)
    report = capacity(lb, row["id"])
    assert report["learned"]["numParallelSeen"] == 2
    # Two seen at once, the limit not known: a third is tried where it can run.
    assert report["numParallel"] == 3 and report["numParallelFrom"] == "guessed"
    # The one model loaded (how many it keeps is a guess) x 2 seen, + 1 to find out.
    assert report["maxConcurrency"] == 3


def test_a_servers_own_settings_are_set_shown_and_cleared_through_the_api(
        balancer: Any) -> None:
    lb, add = balancer()
    _, row = add()
    changed = lb.call("PATCH", f"/servers/{row['id']}", {"numParallel": 4,
                                                         "maxLoadedModels": 2})
    assert changed.status == 200, changed
    body = changed.json()
    assert (body["numParallel"], body["maxLoadedModels"]) == (4, 2)
    report = body["capacity"]
    assert (report["numParallel"], report["numParallelFrom"]) == (4, "server")
    assert (report["maxLoadedModels"], report["maxConcurrency"]) == (2, 8)
    for bad in ({"numParallel": 0}, {"maxLoadedModels": 1001}, {"numParallel": "2"}):
        reply = lb.call("PATCH", f"/servers/{row['id']}", bad)
        assert reply.status == 400 and "error" in reply.json(), reply
    cleared = lb.call("PATCH", f"/servers/{row['id']}", {"numParallel": None}).json()
    assert cleared["numParallel"] is None
    assert cleared["capacity"]["numParallelFrom"] == "guessed"


def test_the_settings_override_what_is_learned(balancer: Any) -> None:
    lb, add = balancer(NUM_PARALLEL="3", MAX_LOADED_MODELS="2")
    _, row = add()
    report = capacity(lb, row["id"])
    assert (report["numParallel"], report["numParallelFrom"]) == (3, "setting")
    assert (report["maxLoadedModels"], report["maxLoadedModelsFrom"]) == (2, "setting")
    assert (report["maxConcurrency"], report["maxConcurrencyFrom"]) == (6, "learned")


def servers_of(fakes: list[FakeOllama]) -> dict[str, set[int]]:
    """Which fake served each conversation (named by its first message)."""
    seen: dict[str, set[int]] = {}
    for index, fake in enumerate(fakes):
        for request in fake.model_requests():
            first = json.loads(request["body"])["messages"][0]["content"]
            seen.setdefault(first, set()).add(index)
    return seen


def test_conversations_stay_each_on_one_server_turn_after_turn_and_spread(
        balancer: Any) -> None:
    lb, add = balancer()
    # Answers long enough that a turn's eight requests run at once, on servers that all
    # have the model loaded (else least_load keeps to the loaded ones, rightly).
    fakes = [add(tokens=5, token_delay=0.1, loaded=["llama3:latest"])[0] for _ in range(4)]
    chats: list[list[dict[str, str]]] = [
        [{"role": "user", "content": f"conversation {n}: a long document ..."}]
        for n in range(8)]
    for _ in range(4):  # four turns, the conversations' turns at once
        answers = run_at_once(len(chats), lambda n: stream_chat(lb, "llama3", chats[n]))
        for n, (status, text) in enumerate(answers):
            assert status == 200
            chats[n] += [{"role": "assistant", "content": text},
                         {"role": "user", "content": f"and then? ({len(chats[n])})"}]
    seen = servers_of(fakes)
    assert len(seen) == 8 and all(len(where) == 1 for where in seen.values()), seen
    assert len(set().union(*seen.values())) >= 3, seen  # spread over the fleet


def test_a_session_header_wins_over_the_conversation(balancer: Any) -> None:
    lb, add = balancer()
    fakes = [add(loaded=["llama3:latest"])[0] for _ in range(2)]

    def served_by(body: dict[str, Any]) -> int:
        return next(i for i, f in enumerate(fakes) if f.model_requests() and json.loads(
            f.model_requests()[-1]["body"]) == body)

    def chat(messages: list[dict[str, str]], **headers: str) -> dict[str, Any]:
        body = {"model": "llama3", "messages": messages, "stream": False}
        assert lb.call("POST", "/api/chat", body, headers=headers).status == 200
        return body

    held = threading.Thread(target=lb.call, args=("POST", "/api/chat", {
        "model": "llama3", "messages": [{"role": "user", "content": "held"}],
        "stream": False, "fake_hold": True}), kwargs={"headers": {"X-Session-Id": "s1"}})
    held.start()
    deadline = time.monotonic() + 10
    while not any(f.active for f in fakes):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    session_home = next(i for i, f in enumerate(fakes) if f.active)
    # A conversation whose own server (by rendezvous hashing) is the other one.
    start = next(body for n in range(20) if served_by(
        body := chat([{"role": "user", "content": f"a conversation {n}"}])) != session_home)
    fakes[session_home].release()
    held.join(10)
    follow_up = chat([*start["messages"], {"role": "assistant", "content": "ok"},
                      {"role": "user", "content": "next"}], **{"X-Session-Id": "s1"})
    assert served_by(follow_up) == session_home  # the header's server, not the chat's
    again = chat([*follow_up["messages"], {"role": "assistant", "content": "ok"},
                  {"role": "user", "content": "more"}])
    assert served_by(again) != session_home  # without the header: the conversation's


def test_a_conversation_whose_server_is_gone_goes_elsewhere(balancer: Any) -> None:
    lb, add = balancer()
    fakes = [add()[0] for _ in range(2)]
    rows = lb.call("GET", "/servers/allServers").json()
    messages = [{"role": "user", "content": "hello"}]
    status, text = stream_chat(lb, "llama3", messages)
    assert status == 200
    home = next(i for i, f in enumerate(fakes) if f.model_requests())
    assert lb.call("PATCH", f"/servers/{rows[home]['id']}", {"enabled": False}).status == 200
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "more"}]
    assert stream_chat(lb, "llama3", messages)[0] == 200
    assert len(fakes[1 - home].model_requests()) == 1


@pytest.mark.parametrize("affinity", ["on", "off"])
def test_affinity_keeps_a_turn_home_though_another_server_is_idler_unless_off(
        balancer: Any, affinity: str) -> None:
    lb, add = balancer(CONVERSATION_AFFINITY=affinity)
    pairs = [add(loaded=["llama3:latest"]) for _ in range(2)]
    fakes = [fake for fake, _ in pairs]
    messages = [{"role": "user", "content": "first"}]
    status, text = stream_chat(lb, "llama3", messages)
    assert status == 200
    home = next(i for i, f in enumerate(fakes) if f.model_requests())
    # A request held on the conversation's server (sent to it by id): it is the busier.
    held = threading.Thread(target=lb.call, args=(
        "POST", f"/servers/ollama/{pairs[home][1]['id']}/api/chat",
        {"model": "llama3", "messages": [], "stream": False, "fake_hold": True}))
    held.start()
    deadline = time.monotonic() + 10
    while not fakes[home].active:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    before = [len(f.model_requests()) for f in fakes]
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "next"}]
    assert stream_chat(lb, "llama3", messages)[0] == 200
    went = next(i for i, f in enumerate(fakes) if len(f.model_requests()) > before[i])
    fakes[home].release()
    held.join(10)
    assert went == (home if affinity == "on" else 1 - home)


def test_a_huge_chat_is_fingerprinted_by_its_start_alone() -> None:
    """Only FINGERPRINT_BYTES of a chat are read: a 50 MiB one costs what 1 MiB does, and
    its next turn (longer still) is found by the same start."""
    big = "x" * (ob.FINGERPRINT_BYTES // 2)
    turn = [{"role": "user", "content": big}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "y" * (50 * 1024 * 1024)}]
    body = chat_body(turn)
    prints = ob.conversation_prints(body, "llama3:latest")
    assert prints == ob.conversation_prints(body[:ob.FINGERPRINT_BYTES + 100],
                                            "llama3:latest")
    assert len(prints) == 2  # the two messages that end within the first MiB
    following = chat_body([*turn, {"role": "assistant", "content": "z"}])
    assert ob.conversation_prints(following, "llama3:latest")[-1] == prints[-1]


def test_a_server_cannot_claim_models_it_was_never_asked_to_run(balancer: Any) -> None:
    """A hostile server lists 20 models on its GPU in /api/ps: they are not learned from
    (the fleet would count on every server holding 20), only models sent to it are."""
    lb, add = balancer("--health-interval", "0.3")
    add(tuple(f"m{i}:latest" for i in range(20)),
        loaded=[f"m{i}:latest" for i in range(20)])
    add()
    time.sleep(1.0)  # health rounds: /api/ps read again and again
    for server in lb.call("GET", "/servers/allServers").json():
        report = lb.call("GET", f"/servers/{server['id']}").json()["capacity"]
        assert report["maxLoadedModels"] == 2, report
        assert report["learned"]["maxLoadedModelsSeen"] == 0, report
