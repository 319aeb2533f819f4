"""The scheduler's decisions, in-process: tiers, capacity, the queue's order, the breaker."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ollamabalancer as ob

#: Affinities as the front makes them for an X-Session-Id: the session is key and hint.
CONV, S1, NEW = (ob.Affinity(name, name) for name in ("conv", "s1", "a new conversation"))


def fleet(count: int, models: tuple[str, ...] = ("a", "b", "c"), **config: Any
          ) -> tuple[ob.Scheduler, dict[int, ob.Server]]:
    settings = ob.Config(**{"num_parallel": 1, "max_loaded_models": 2, "max_concurrency": 2,
                            **config})
    servers = {}
    for index in range(1, count + 1):
        server = ob.Server(index, f"h{index}", 11434, reachable=True,
                           models=[{"name": f"{m}:latest"} for m in models])
        servers[index] = server
    return ob.Scheduler(settings), servers


def test_tiers_follow_ollamas_own_scheduling() -> None:
    scheduler, servers = fleet(1)
    server = servers[1]
    assert scheduler.ranking.tier(server, "a:latest") == 1  # memory free: a load, no eviction
    slot = scheduler.take(server, "a:latest")
    assert scheduler.ranking.tier(server, "a:latest") == 2  # loaded, its one slot taken
    scheduler.release(servers, slot)
    assert scheduler.ranking.tier(server, "a:latest") == 0  # loaded and free: runs at once
    scheduler.take(server, "b:latest")
    assert scheduler.ranking.tier(server, "c:latest") == 3  # full memory, "a" idle: evicts it
    scheduler.take(server, "a:latest")
    assert scheduler.ranking.tier(server, "c:latest") == 4  # full memory, all busy: waits


def test_taking_a_model_predicts_the_lru_eviction() -> None:
    scheduler, servers = fleet(1)
    server = servers[1]
    for model in ("a:latest", "b:latest"):
        scheduler.release(servers, scheduler.take(server, model))
    # "a" used last; "b" is now least recently used
    scheduler.release(servers, scheduler.take(server, "a:latest"))
    scheduler.take(server, "c:latest")
    assert set(server.load.loaded) == {"a:latest", "c:latest"}


def test_least_load_prefers_a_ready_server_then_memory_then_least_busy() -> None:
    scheduler, servers = fleet(3)
    scheduler.release(servers, scheduler.take(servers[2], "a:latest"))
    candidates = list(servers.values())
    assert scheduler.ranking.choose(candidates, "a:latest") is servers[2]
    scheduler.take(servers[2], "a:latest")  # now busy: a load elsewhere beats waiting
    assert scheduler.ranking.choose(candidates, "a:latest") in (servers[1], servers[3])


def test_weight_breaks_ties_and_scales_load() -> None:
    scheduler, servers = fleet(2, max_concurrency=4)
    servers[2].weight = 3.0
    assert scheduler.ranking.choose(list(servers.values()), None) is servers[2]  # idle tie: heavier
    scheduler.take(servers[1], None)
    scheduler.take(servers[2], None)
    scheduler.take(servers[2], None)
    # 2/4 used per 3 units of weight is less loaded than 1/4 per 1 unit.
    assert scheduler.ranking.choose(list(servers.values()), None) is servers[2]


def test_the_index_breaks_ties_by_weight_too() -> None:
    scheduler, servers = fleet(3, max_concurrency=4)
    servers[2].weight = 3.0
    assert scheduler.ranking.pick(servers, None) == (servers[2], True)  # idle tie: the heavier


def test_the_index_is_kept_for_a_fleet_and_made_anew_for_another() -> None:
    scheduler, servers = fleet(2)
    assert scheduler.ranking.pick(servers, "a:latest")[1]
    heap = scheduler.ranking._ranked["a:latest"]
    scheduler.ranking.pick(servers, "a:latest")
    assert scheduler.ranking._ranked["a:latest"] is heap  # kept: a decision costs O(log n)
    reloaded = {5: ob.Server(5, "h5", 11434, reachable=True, models=[{"name": "a:latest"}])}
    assert scheduler.ranking.pick(reloaded, "a:latest") == (reloaded[5], True)
    assert scheduler.ranking.pick(servers, "a:latest")[0] in (servers[1], servers[2])


def test_a_server_that_got_better_is_ranked_anew_for_every_model_it_serves() -> None:
    """Worse is found out lazily, at the top of the index; better must be pushed at once,
    or a freed server would stay buried under one that is busier."""
    for model in (None, "a:latest"):
        scheduler, servers = fleet(2, max_concurrency=4, num_parallel=4)
        first = [scheduler.take(servers[1], model) for _ in range(2)]
        scheduler.take(servers[2], model)
        assert scheduler.ranking.pick(servers, model) == (servers[2], True)  # the index is made
        for slot in first:
            scheduler.release(servers, slot)  # server 1 idle now, server 2 still busy
        assert scheduler.ranking.pick(servers, model) == (servers[1], True), model


def test_the_index_stays_bounded_however_often_servers_change() -> None:
    """Stale entries are dropped once they outnumber the live ones twice over (plus 64)."""
    scheduler, servers = fleet(2, max_concurrency=4)
    scheduler.ranking.pick(servers, None)
    heap = scheduler.ranking._ranked[None]
    sizes = []
    for _ in range(300):
        scheduler.release(servers, scheduler.take(servers[1], None))
        sizes.append(len(heap.entries))
    assert max(sizes) == 2 * len(heap.latest) + 64
    assert min(sizes) <= len(heap.latest) + 1  # compacted down to the live entries
    scheduler.take(servers[1], None)  # server 2 is the better now: its entry must be live
    assert scheduler.ranking.pick(servers, None) == (servers[2], True)


def test_pick_keeps_a_session_on_its_server_unless_excluded_or_full() -> None:
    scheduler, servers = fleet(3, max_concurrency=2)
    scheduler.release(servers, scheduler.take(servers[2], None, affinity=CONV))
    scheduler.take(servers[2], None)  # server 2 is now the busiest
    assert scheduler.ranking.pick(servers, None, CONV) == (servers[2], True)
    others = (servers[1], servers[3])
    assert scheduler.ranking.pick(servers, None, CONV, exclude=frozenset({2}))[0] in others
    scheduler.take(servers[2], None)  # and now full
    assert scheduler.ranking.pick(servers, None, CONV)[0] in others
    scheduler.take(servers[1], None)  # server 3 is the least loaded
    assert scheduler.ranking.pick(servers, None, NEW) == (servers[3], True)


def test_a_session_stays_put_in_the_queues_ready_pass_too() -> None:
    scheduler, servers = fleet(2, num_parallel=2, max_concurrency=4)
    for server in servers.values():
        scheduler.release(servers, scheduler.take(server, "a:latest"))  # loaded on both
    scheduler.release(servers, scheduler.take(servers[2], "a:latest", affinity=CONV))
    scheduler.take(servers[2], "a:latest")  # the busier, yet ready (1 of 2 parallel)
    assert scheduler.ranking.pick(servers, "a:latest", CONV, max_tier=0) == (servers[2], True)


def test_pick_goes_as_far_as_a_server_that_must_wait_but_never_to_a_full_one() -> None:
    scheduler, servers = fleet(1, max_loaded_models=1, num_parallel=1, max_concurrency=2)
    server = servers[1]
    scheduler.take(server, "a:latest")  # "a" loaded and busy: "b" would wait (tier 4)
    assert scheduler.ranking.tier(server, "b:latest") == 4
    assert scheduler.ranking.pick(servers, "b:latest") == (server, True)
    scheduler.take(server, "a:latest")  # both slots taken: full
    assert scheduler.ranking.pick(servers, "b:latest") == (None, True)


def test_capacity_is_enforced_and_the_server_value_wins() -> None:
    scheduler, servers = fleet(1, max_concurrency=1)
    server = servers[1]
    scheduler.take(server, None)
    assert scheduler.ranking.choose([server], None) is None
    server.max_concurrency = 2
    assert scheduler.ranking.choose([server], None) is server


def queue_order(strategy: str = "least_load") -> list[str]:
    """One server, full; "a" loaded and idle, "b" running. A request for "c" (a cold load)
    queues, then one for "a"; "b" finishes. In which order do they get the slot?"""
    async def scenario() -> list[str]:
        scheduler, servers = fleet(1, max_concurrency=1, strategy=strategy)
        server = servers[1]
        scheduler.release(servers, scheduler.take(server, "a:latest"))
        running = scheduler.take(server, "b:latest")
        order: list[str] = []

        async def want(model: str) -> None:
            got = await scheduler.acquire(servers, model)
            order.append(model)
            await asyncio.sleep(0)
            scheduler.release(servers, got)

        tasks = [asyncio.ensure_future(want(m)) for m in ("c:latest", "a:latest")]
        await asyncio.sleep(0.01)
        scheduler.release(servers, running)
        await asyncio.gather(*tasks)
        return order

    return asyncio.run(scenario())


def test_queue_grants_ready_work_first() -> None:
    # "a" is loaded and idle: it runs at once, before the older request that needs a load.
    assert queue_order() == ["a:latest", "c:latest"]


def test_plain_strategies_keep_a_strict_fifo_queue() -> None:
    assert queue_order("round_robin") == ["c:latest", "a:latest"]
    assert queue_order("random") == ["c:latest", "a:latest"]


def test_aged_waiters_are_served_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ob, "QUEUE_AGING", 0.0)
    assert queue_order() == ["c:latest", "a:latest"]


def queue_up(scheduler: ob.Scheduler, *models: str, since: float | None = None
             ) -> list[ob.Waiter]:
    """Waiters put in the queue as acquire() would, to see what one dispatch() does."""
    loop = asyncio.new_event_loop()
    waiters = [ob.Waiter(model, frozenset(), None, loop.create_future())
               for model in models]
    for waiter in waiters:
        if since is not None:
            waiter.since = since
        scheduler.queue.append(waiter)
    return waiters


def served(waiters: list[ob.Waiter]) -> list[int | None]:
    return [w.future.result().server.id if w.future.done() else None for w in waiters]


def test_a_waiter_exactly_queue_aging_old_is_served_in_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ob.time, "monotonic", lambda: 1000.0)
    scheduler, servers = fleet(1, max_concurrency=1)
    scheduler.release(servers, scheduler.take(servers[1], "a:latest"))  # "a" loaded, idle
    running = scheduler.take(servers[1], "b:latest")
    cold, ready = queue_up(scheduler, "c:latest", "a:latest", since=1000.0 - ob.QUEUE_AGING)
    scheduler.release(servers, running)
    assert served([cold, ready]) == [1, None]  # the aged one first, though "a" is ready


def test_an_aged_waiter_still_waits_for_its_models_server_rather_than_evict(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Aging serves the oldest first; it does not make an eviction worth it: a backlog of
    long waiters would otherwise evict every model in turn."""
    monkeypatch.setattr(ob.time, "monotonic", lambda: 1000.0)
    scheduler, servers = fleet(2, max_concurrency=1, max_loaded_models=1)
    scheduler.service_seconds, scheduler.load_seconds = 0.5, 5.0
    running = scheduler.take(servers[1], "a:latest")
    scheduler.release(servers, scheduler.take(servers[2], "b:latest"))
    (aged,) = queue_up(scheduler, "a:latest", since=1000.0 - ob.QUEUE_AGING - 1)
    scheduler.dispatch(servers)
    assert served([aged]) == [None]  # not server 2, by evicting "b"
    scheduler.release(servers, running)
    assert served([aged]) == [1]


def test_the_ready_pass_takes_only_a_loaded_model_with_a_free_slot() -> None:
    """A request that needs a load, even into free memory, waits behind one whose model
    is loaded and free: the ready pass is for tier 0 only."""
    scheduler, servers = fleet(1, max_concurrency=1, max_loaded_models=3)
    scheduler.release(servers, scheduler.take(servers[1], "a:latest"))
    running = scheduler.take(servers[1], "b:latest")
    cold, ready = queue_up(scheduler, "c:latest", "a:latest")  # "c": tier 1, a cold load
    scheduler.release(servers, running)
    assert served([cold, ready]) == [None, 1]


@pytest.mark.parametrize(("service", "backlog", "loads"), [
    (1.25, 1, False), (1.25, 4, False), (1.25, 5, True),  # worth 5 / 1.25 = 4 per slot
    (0.5, 6, False), (0.5, 10, False), (0.5, 11, True),  # worth 10
])
def test_a_model_loaded_elsewhere_is_loaded_again_only_when_its_backlog_pays_for_it(
        service: float, backlog: int, loads: bool) -> None:
    """"a" runs on server 1 (full); server 2 could take it only by evicting idle "b". The
    waiters wait for server 1 while their backlog is at most slots x load / service."""
    scheduler, servers = fleet(2, max_concurrency=1, max_loaded_models=1, num_parallel=1)
    scheduler.service_seconds, scheduler.load_seconds = service, 5.0
    scheduler.take(servers[1], "a:latest")
    scheduler.release(servers, scheduler.take(servers[2], "b:latest"))
    assert scheduler.ranking.tier(servers[2], "a:latest") == 3
    waiters = queue_up(scheduler, *["a:latest"] * backlog)
    scheduler.dispatch(servers)
    assert served(waiters)[0] == (2 if loads else None)


@pytest.mark.parametrize("strategy", ["least_load", "random"])
def test_an_arriving_request_waits_for_its_models_server_rather_than_evict_one_elsewhere(
        strategy: str) -> None:
    """As a queued one would: "a" runs on server 1 (full); server 2 could take the new
    request only by evicting its idle "b", a load that would take longer than the wait.
    random and round_robin take any free server, as they always did."""
    async def scenario() -> tuple[int | None, int]:
        scheduler, servers = fleet(2, max_concurrency=1, max_loaded_models=1,
                                   strategy=strategy)
        scheduler.service_seconds, scheduler.load_seconds = 0.5, 5.0
        running = scheduler.take(servers[1], "a:latest")
        scheduler.release(servers, scheduler.take(servers[2], "b:latest"))
        arriving = asyncio.ensure_future(scheduler.acquire(servers, "a:latest"))
        await asyncio.sleep(0.01)
        first = arriving.result().server.id if arriving.done() else None
        scheduler.release(servers, running)
        slot = await asyncio.wait_for(arriving, 1)
        return first, slot.server.id

    if strategy == "least_load":
        assert asyncio.run(scenario()) == (None, 1)  # waited, then ran where "a" is loaded
    else:
        assert asyncio.run(scenario()) == (2, 2)


def test_an_arriving_request_whose_model_is_loaded_nowhere_loads_it_at_once() -> None:
    async def scenario() -> int:
        scheduler, servers = fleet(2, max_concurrency=1, max_loaded_models=1)
        scheduler.take(servers[1], "a:latest")
        scheduler.release(servers, scheduler.take(servers[2], "b:latest"))
        slot = await asyncio.wait_for(scheduler.acquire(servers, "c:latest"), 1)
        return slot.server.id

    assert asyncio.run(scenario()) == 2  # "b" evicted: there is nothing to wait for


def test_a_load_that_must_evict_evicts_a_model_another_server_also_holds() -> None:
    """Servers 1 and 2 hold "a", server 3 (the heavier, so the best ranked) holds the only
    "b": a load of "c" goes where it evicts a copy of "a", not the last "b" (whose next
    request would then evict another model, and so on)."""
    scheduler, servers = fleet(3, max_loaded_models=1, models=("a", "b", "c", "d"))
    servers[3].weight = 2.0
    for server_id, model in ((1, "a:latest"), (2, "a:latest"), (3, "b:latest")):
        scheduler.release(servers, scheduler.take(servers[server_id], model))
    assert {scheduler.ranking.tier(s, "c:latest") for s in servers.values()} == {ob.EVICTS}
    server, _ = scheduler.ranking.pick(servers, "c:latest")
    assert server in (servers[1], servers[2])
    # With every eviction an only copy, the ranking decides as before: the heavier.
    scheduler.release(servers, scheduler.take(servers[2], "d:latest"))
    assert scheduler.ranking.pick(servers, "c:latest")[0] is servers[3]


def test_a_backlog_that_pays_for_a_load_does_not_wait_for_a_busy_model_to_drain() -> None:
    """"a" runs on server 1 (full) with a backlog worth a load; server 2 has room, but
    its one loaded model is busy: a load there would wait for that to drain, then take
    the model its own next requests need. The backlog waits for "a"'s own slot."""
    scheduler, servers = fleet(2, max_concurrency=1, max_loaded_models=1, num_parallel=1)
    servers[2].max_concurrency = 2
    scheduler.service_seconds, scheduler.load_seconds = 0.5, 5.0  # worth 10 a slot
    running = scheduler.take(servers[1], "a:latest")
    scheduler.take(servers[2], "b:latest")
    assert scheduler.ranking.tier(servers[2], "a:latest") == 4
    waiters = queue_up(scheduler, *["a:latest"] * 11)
    scheduler.dispatch(servers)
    assert served(waiters)[0] is None
    scheduler.release(servers, running)
    assert served(waiters)[0] == 1


def test_a_cancelled_waiter_leaves_the_queue_and_a_late_grant_is_returned() -> None:
    async def scenario() -> tuple[int, int]:
        scheduler, servers = fleet(1, max_concurrency=1)
        server = servers[1]
        held = scheduler.take(server, None)
        waiting = asyncio.ensure_future(scheduler.acquire(servers, "a:latest"))
        await asyncio.sleep(0.01)
        assert len(scheduler.queue) == 1
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        queued = len(scheduler.queue)
        scheduler.release(servers, held)
        return queued, server.load.inflight

    assert asyncio.run(scenario()) == (0, 0)


def test_the_queue_holds_max_queue_waiters_each_for_queue_timeout() -> None:
    async def scenario() -> None:
        scheduler, servers = fleet(1, max_concurrency=1, max_queue=2, queue_timeout=0.2)
        scheduler.take(servers[1], None)
        waiting = [asyncio.ensure_future(scheduler.acquire(servers, "a:latest"))
                   for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ob.QueueFull):
            await scheduler.acquire(servers, "a:latest")  # the third: no room to wait
        for waiter in waiting:
            with pytest.raises(ob.QueueTimeout):
                await waiter
        assert not scheduler.queue

    asyncio.run(scenario())


def test_each_queued_request_waits_its_own_queue_timeout_under_one_timer() -> None:
    """One timer serves the queue: set for the oldest, then for the oldest left. A waiter
    served early does not make the next time out at its deadline, nor later ones wait
    past theirs; a waiter that left is not counted."""
    async def scenario() -> list[str]:
        scheduler, servers = fleet(1, max_concurrency=1, queue_timeout=1.0)
        held = scheduler.take(servers[1], None)
        first = asyncio.ensure_future(scheduler.acquire(servers, "a:latest"))
        await asyncio.sleep(0.4)
        second = asyncio.ensure_future(scheduler.acquire(servers, "a:latest"))
        gone = asyncio.ensure_future(scheduler.acquire(servers, "a:latest"))
        await asyncio.sleep(0.1)
        gone.cancel()  # its client left
        scheduler.release(servers, held)  # the first is served at 0.5
        slot = await first
        seen = []
        await asyncio.sleep(0.6)  # 1.1: past the first's deadline, before the second's
        seen.append("waiting" if not second.done() else "done")
        await asyncio.sleep(0.7)  # 1.8: past the second's (1.4)
        seen.append(type(second.exception()).__name__ if second.done() else "waiting")
        scheduler.release(servers, slot)
        assert not scheduler.queue and len(scheduler.queue.arrivals) <= 1
        return seen

    assert asyncio.run(scenario()) == ["waiting", "QueueTimeout"]


def test_a_request_for_no_model_may_start_anywhere_at_once() -> None:
    scheduler, servers = fleet(2)
    assert {scheduler.ranking.tier(s, None) for s in servers.values()} == {0}
    assert scheduler.ranking.pick(servers, None, max_tier=0)[0] is not None


def test_slots_count_what_runs_per_server_and_model() -> None:
    scheduler, servers = fleet(1, max_concurrency=4, num_parallel=4)
    server = servers[1]
    slots = [scheduler.take(server, "a:latest") for _ in range(3)]
    assert (server.load.inflight, server.load.requests, server.load.by_model) == (
        3, 3, {"a:latest": 3})
    scheduler.release(servers, slots.pop())
    assert (server.load.inflight, server.load.requests, server.load.by_model) == (
        2, 3, {"a:latest": 2})
    for slot in slots:
        scheduler.release(servers, slot)
    assert (server.load.inflight, server.load.by_model) == (0, {})


def test_requests_relayed_to_a_half_open_server_are_each_its_probe() -> None:
    """The passthrough takes a slot without asking for room: two at once on a half-open
    server are two probes, and both must be given back for it to take work again."""
    scheduler, servers = fleet(1, max_concurrency=4)
    server = servers[1]
    server.load.breaker_open = True
    slots = [scheduler.take(server, None), scheduler.take(server, None)]
    assert server.load.probing == 2 and not scheduler.ranking.has_room(server)
    for slot in slots:
        scheduler.release(servers, slot)
    assert server.load.probing == 0 and scheduler.ranking.has_room(server)


def test_sessions_are_remembered_up_to_max_sessions_the_oldest_forgotten_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ob, "MAX_SESSIONS", 3)
    scheduler, servers = fleet(1, max_concurrency=9)
    for name in ("s1", "s2", "s3", "s4"):
        scheduler.take(servers[1], None, affinity=ob.Affinity(name, name))
    assert list(scheduler.ranking.sessions) == ["s2", "s3", "s4"]


def test_breaker_opens_after_the_threshold_and_allows_one_probe() -> None:
    async def scenario() -> None:
        scheduler, servers = fleet(1, breaker_threshold=2, breaker_cooldown=0.05)
        server = servers[1]
        scheduler.record(servers, server, False)
        assert scheduler.ranking.candidates(servers.values(), None) == [server]
        scheduler.record(servers, server, False)
        assert scheduler.ranking.candidates(servers.values(), None) == []
        await asyncio.sleep(0.06)
        assert scheduler.ranking.candidates(servers.values(), None) == [server]
        probe = scheduler.take(server, None)
        assert probe.probe
        ranking = scheduler.ranking
        assert ranking.choose(ranking.candidates(servers.values(), None), None) is None
        scheduler.record(servers, server, True)
        scheduler.release(servers, probe)
        assert not server.load.breaker_open
        assert scheduler.ranking.candidates(servers.values(), None) == [server]

    asyncio.run(scenario())


def test_the_breaker_counts_errors_says_when_it_opens_and_forgets_on_success(
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        scheduler, servers = fleet(1, breaker_threshold=2, breaker_cooldown=30)
        server = servers[1]
        server.name = "gpu1"
        with caplog.at_level("INFO", "ollamabalancer"):
            scheduler.record(servers, server, False)
            scheduler.record(servers, server, True)  # a success in between: start again
            assert (server.load.failures, server.load.errors) == (0, 1)
            for _ in range(3):
                scheduler.record(servers, server, False)
            assert (server.load.failures, server.load.errors) == (3, 4)
            scheduler.record(servers, server, True)
        assert caplog.messages == ["circuit of gpu1 opened after 2 failures",
                                   "circuit of gpu1 closed: a request succeeded"]
        assert server.load.failures == 0 and not server.load.breaker_open

    asyncio.run(scenario())


def test_a_waiter_gets_the_probe_of_a_circuit_whose_cooldown_ends() -> None:
    """Nothing else happens in this fleet: the end of the cooldown alone must hand the
    queued request a slot on the server that cooled down, as its probe."""
    async def scenario() -> None:
        scheduler, servers = fleet(2, max_concurrency=1, breaker_threshold=1,
                                   breaker_cooldown=0.1, queue_timeout=5)
        scheduler.record(servers, servers[1], False)  # server 1: open for 0.1 s
        scheduler.take(servers[2], None)  # server 2: full
        slot = await asyncio.wait_for(scheduler.acquire(servers, None), 2)
        assert slot.probe and slot.server is servers[1]

    asyncio.run(scenario())


def test_a_probe_granted_to_a_waiter_that_leaves_is_given_back() -> None:
    async def scenario() -> None:
        scheduler, servers = fleet(1, max_concurrency=1, breaker_threshold=1,
                                   breaker_cooldown=0.01)
        server = servers[1]
        running = scheduler.take(server, None)  # in flight when the circuit opens
        scheduler.record(servers, server, False)
        await asyncio.sleep(0.02)  # cooled down: half-open
        waiting = asyncio.ensure_future(scheduler.acquire(servers, None))
        await asyncio.sleep(0)
        assert len(scheduler.queue) == 1
        scheduler.release(servers, running)  # the slot goes to the waiter, as the probe
        waiting.cancel()  # ... whose client leaves before it runs
        await asyncio.gather(waiting, return_exceptions=True)
        assert (server.load.probing, server.load.inflight) == (0, 0)
        assert scheduler.ranking.pick(servers, None)[0] is server  # free to be probed again

    asyncio.run(scenario())


def test_waiters_fail_at_once_when_a_failed_probe_leaves_no_server() -> None:
    async def scenario() -> None:
        scheduler, servers = fleet(1, breaker_threshold=1, breaker_cooldown=0.01)
        server = servers[1]
        scheduler.record(servers, server, False)
        await asyncio.sleep(0.02)
        probe = await scheduler.acquire(servers, "a:latest")
        assert probe.probe
        waiting = asyncio.ensure_future(scheduler.acquire(servers, "a:latest"))
        await asyncio.sleep(0)
        assert not waiting.done()  # queued behind the probe, not refused
        scheduler.record(servers, server, False)  # the probe failed: open again
        scheduler.release(servers, probe)
        with pytest.raises(ob.NoCandidate):
            await asyncio.wait_for(waiting, 1)
        assert not scheduler.queue

    asyncio.run(scenario())


def test_session_affinity_holds_while_the_server_has_room() -> None:
    scheduler, servers = fleet(2)
    first = scheduler.ranking.choose(list(servers.values()), None, S1)
    assert first is not None
    scheduler.take(first, None, S1)
    assert scheduler.ranking.choose(list(servers.values()), None, S1) is first
    scheduler.take(first, None, S1)  # now full (capacity 2)
    other = scheduler.ranking.choose(list(servers.values()), None, S1)
    assert other is not None and other is not first


def test_a_slot_says_whether_its_model_had_to_be_loaded() -> None:
    scheduler, servers = fleet(1)
    assert scheduler.take(servers[1], "a:latest").cold is True
    assert scheduler.take(servers[1], "a:latest").cold is False


def test_load_and_service_times_are_learned_from_requests() -> None:
    scheduler, _ = fleet(1)
    for _ in range(100):
        scheduler.observe(False, 0.2, 1.5)
        scheduler.observe(True, 4.2, 5.5)
    assert scheduler.service_seconds == pytest.approx(1.5, rel=0.01)
    assert scheduler.first_byte_seconds == pytest.approx(0.2, rel=0.01)
    assert scheduler.load_seconds == pytest.approx(4.0, rel=0.01)


def test_one_request_moves_each_estimate_a_tenth_of_the_way_from_its_prior() -> None:
    scheduler, _ = fleet(1)
    assert (scheduler.service_seconds, scheduler.first_byte_seconds,
            scheduler.load_seconds) == (1.0, 0.1, 5.0)  # priors, before any request
    scheduler.observe(False, 0.3, 2.0)  # warm: first byte and whole request
    assert scheduler.first_byte_seconds == pytest.approx(0.12)
    assert scheduler.service_seconds == pytest.approx(1.1)
    scheduler.observe(True, 1.12, 9.0)  # cold: what its first byte took past a warm one's
    assert scheduler.load_seconds == pytest.approx(5.0 + 0.1 * (1.0 - 5.0))
    assert scheduler.service_seconds == pytest.approx(1.1)  # a cold request says nothing
    scheduler.observe(True, 0.05, 1.0)  # faster than a warm first byte: no load at all
    assert scheduler.load_seconds == pytest.approx(4.6 + 0.1 * (0.0 - 4.6))


def test_a_candidate_is_enabled_reachable_has_the_model_and_no_open_circuit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    scheduler, servers = fleet(4)
    servers[1].enabled = False
    servers[2].reachable = False
    servers[3].load.breaker_open, servers[3].load.open_until = True, 100.0
    monkeypatch.setattr(ob.time, "monotonic", lambda: 99.5)
    every = list(servers.values())
    assert scheduler.ranking.candidates(every, "a:latest") == [servers[4]]
    assert scheduler.ranking.candidates(every, None) == [servers[4]]
    assert scheduler.ranking.candidates(every, "z:latest") == []
    monkeypatch.setattr(ob.time, "monotonic", lambda: 100.0)  # cooled down: half-open
    assert scheduler.ranking.candidates(every, "a:latest") == [servers[3], servers[4]]
    assert scheduler.ranking.candidates(every, "a:latest", frozenset({3})) == [servers[4]]


def test_round_robin_takes_the_ready_servers_in_id_order_turn_by_turn() -> None:
    scheduler, servers = fleet(3, strategy="round_robin")
    ready = [servers[3], servers[1], servers[2]]
    picks = [scheduler.ranking.choose(ready, "a:latest") for _ in range(6)]
    assert [s.id for s in picks if s] == [2, 3, 1, 2, 3, 1]
    picked = scheduler.ranking.pick(servers, "a:latest", exclude=frozenset({3}))
    assert picked == (servers[2], True)  # turn 7 of the two left: [1, 2][7 % 2]


def test_random_ignores_load_where_least_load_does_not() -> None:
    for strategy, expected in (("random", {1, 2}), ("least_load", {2})):
        scheduler, servers = fleet(2, strategy=strategy, max_concurrency=4)
        for _ in range(3):
            scheduler.take(servers[1], None)  # three of its four slots busy
        scheduler.ranking._random.seed(7)
        picks = [scheduler.ranking.choose(list(servers.values()), None) for _ in range(100)]
        assert {s.id for s in picks if s} == expected, strategy
        assert {scheduler.ranking.pick(servers, None)[0].id for _ in range(100)  # type: ignore[union-attr]
                } == expected, strategy


def test_least_load_compares_the_busy_share_of_capacity_per_unit_of_weight() -> None:
    """Within a tier, inflight / capacity / weight: scanned (choose) and indexed (pick)."""
    for (busy_a, capacity_a, weight_a), (busy_b, capacity_b, weight_b) in (
            ((2, 4, 4.0), (1, 4, 1.0)),  # 0.125 beats 0.25: the heavier may be busier
            ((3, 12, 1.0), (1, 2, 1.0)),  # 0.25 beats 0.5: the bigger may be busier
    ):
        scheduler, servers = fleet(2)
        for server, busy, capacity, weight in ((servers[1], busy_a, capacity_a, weight_a),
                                               (servers[2], busy_b, capacity_b, weight_b)):
            server.max_concurrency, server.weight = capacity, weight
            for _ in range(busy):
                scheduler.take(server, None)
        assert scheduler.ranking.choose(list(servers.values()), None) is servers[1]
        assert scheduler.ranking.pick(servers, None) == (servers[1], True)


# Operations on a small fleet: (what, server index, model index).
fleet_operations = st.lists(st.tuples(
    st.sampled_from(["take", "release", "fail", "succeed", "unreachable", "reachable",
                     "pick", "disable", "enable"]),
    st.integers(1, 6), st.integers(0, 3)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(fleet_operations, st.frozensets(st.integers(1, 6), max_size=2))
def test_the_ranked_index_chooses_as_well_as_a_scan_of_the_fleet(
        operations: list[tuple[str, int, int]], exclude: frozenset[int]) -> None:
    """least_load's heap per model against the plain scan (candidates, then choose):
    through any mix of slots taken and freed, failures and health changes, both find
    a server of the same rank, or both find none."""
    scheduler, servers = fleet(6, max_concurrency=3, num_parallel=2, breaker_threshold=2,
                               breaker_cooldown=3600)
    models: list[str | None] = ["a:latest", "b:latest", "c:latest", None]
    held: list[ob.Slot] = []
    loop = asyncio.new_event_loop()  # the breaker schedules its cooldown on the loop

    def check(model: str | None) -> None:
        picked, possible = scheduler.ranking.pick(servers, model, exclude=exclude)
        candidates = scheduler.ranking.candidates(servers.values(), model, exclude)
        chosen = scheduler.ranking.choose(candidates, model)
        assert possible == bool(candidates)
        assert (picked is None) == (chosen is None)
        if picked is not None and chosen is not None:
            assert picked.id not in exclude
            rank = scheduler.ranking._rank
            assert rank(picked, model)[:3] == rank(chosen, model)[:3]

    async def run() -> None:
        for what, index, model_index in operations:
            server, model = servers[index], models[model_index]
            if what == "take" and server.load.inflight < 3:
                held.append(scheduler.take(server, model))
            elif what == "release" and held:
                scheduler.release(servers, held.pop(index % len(held)))
            elif what in ("fail", "succeed"):
                scheduler.record(servers, server, what == "succeed")
            elif what in ("unreachable", "reachable", "disable", "enable"):
                if what in ("unreachable", "reachable"):
                    server.reachable = what == "reachable"
                else:
                    server.enabled = what == "enable"
                scheduler.ranking.changed(server)  # what the health check and reload tell it
            check(model)
        for model in models:
            check(model)

    try:
        loop.run_until_complete(run())
    finally:
        loop.close()


class LookedAt(ob.Waiter):
    """A waiter that counts how often the scheduler looks at it (its future)."""

    looks = 0

    def __getattribute__(self, name: str) -> Any:
        if name == "future":
            LookedAt.looks += 1
        return super().__getattribute__(name)


def counting_picks(scheduler: ob.Scheduler, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The model of every pick() the scheduler makes from now on."""
    picked: list[str] = []
    real = scheduler.ranking.pick

    def pick(servers: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        picked.append(model)
        return real(servers, model, *args, **kwargs)

    monkeypatch.setattr(scheduler.ranking, "pick", pick)
    return picked


def test_a_release_looks_only_at_the_models_its_server_runs_and_their_oldest_waiters(
        monkeypatch: pytest.MonkeyPatch) -> None:
    scheduler, servers = fleet(2, max_concurrency=1, max_queue=100_000)
    servers[2].set_models([{"name": "d:latest"}])  # "d" only there
    running_a = scheduler.take(servers[1], "a:latest")
    running_d = scheduler.take(servers[2], "d:latest")
    loop = asyncio.new_event_loop()
    for _ in range(5_000):
        scheduler.queue.append(LookedAt("a:latest", frozenset(), None, loop.create_future()))
    waiting_d = queue_up(scheduler, "d:latest", "d:latest")
    picked = counting_picks(scheduler, monkeypatch)
    LookedAt.looks = 0
    scheduler.release(servers, running_d)  # server 2 runs no "a": none of those is looked at
    assert served(waiting_d) == [2, None] and set(picked) == {"d:latest"}
    assert len(picked) <= 6 and LookedAt.looks == 0
    picked.clear()
    scheduler.release(servers, running_a)  # one slot: the oldest "a" gets it, the rest wait
    assert len(scheduler.queue) == 5_000 and len(picked) <= 6 and LookedAt.looks <= 10


def test_waiters_that_left_do_not_pile_up_in_the_queue() -> None:
    async def scenario() -> int:
        scheduler, servers = fleet(1, max_concurrency=1, max_queue=100_000)
        scheduler.take(servers[1], None)
        first = asyncio.ensure_future(scheduler.acquire(servers, "a:latest"))
        for _ in range(10):  # thousands come and go behind one that stays
            batch = [asyncio.ensure_future(scheduler.acquire(servers, "a:latest"))
                     for _ in range(1_000)]
            await asyncio.sleep(0)
            for task in batch:
                task.cancel()
            await asyncio.gather(*batch, return_exceptions=True)
        assert len(scheduler.queue) == 1 and not first.done()
        first.cancel()
        return len(scheduler.queue.queues.get("a:latest", ()))

    assert asyncio.run(scenario()) <= 2 * 1 + 64 + 1_000


def test_an_arriving_request_queues_behind_waiters_for_its_model_though_a_server_has_room(
        ) -> None:
    """Server 2 has room for "a", but only behind "a"'s running request there (tier 2),
    which the one already waiting for "a" does not take: nor does a newcomer pass it.
    When server 1's "a" is free, the waiter that came first gets it."""
    async def scenario() -> tuple[bool, int, bool]:
        scheduler, servers = fleet(2)  # 1 parallel, 2 in flight per server
        scheduler.service_seconds, scheduler.load_seconds = 1.0, 5.0
        running_a = scheduler.take(servers[1], "a:latest")
        scheduler.take(servers[1], "b:latest")
        scheduler.take(servers[2], "a:latest")
        other = scheduler.take(servers[2], "b:latest")
        first = asyncio.ensure_future(scheduler.acquire(servers, "a:latest"))
        await asyncio.sleep(0.01)
        scheduler.release(servers, other)  # room on 2, behind its running "a"
        await asyncio.sleep(0.01)
        assert not first.done()
        newcomer = asyncio.ensure_future(scheduler.acquire(servers, "a:latest"))
        await asyncio.sleep(0.01)
        passed = newcomer.done()
        scheduler.release(servers, running_a)
        slot = await asyncio.wait_for(first, 1)
        await asyncio.sleep(0.01)
        waiting = not newcomer.done()
        newcomer.cancel()
        await asyncio.gather(newcomer, return_exceptions=True)
        return passed, slot.server.id, waiting

    assert asyncio.run(scenario()) == (False, 1, True)
