"""Fleet intelligence that survives scale-out: a conversation's turns reach one server
whichever worker or instance each turn reaches (rendezvous hashing, the same in every
process), and what one process learns of a server every other one knows."""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Sequence
from typing import Any

from conftest import BalancerProcess, StoreConfig
from fakeollama import FakeOllama, tag

import ollamabalancer as ob

CONVERSATIONS, TURNS = 16, 4
#: A conversation's first turn (nothing cached anywhere yet), named b"hot".
HOT = ob.Affinity(b"hot", None, cached=False)


def servers_of_each_conversation(fakes: list[FakeOllama]) -> dict[str, set[int]]:
    """By each conversation's first message: the fakes its turns reached."""
    reached: dict[str, set[int]] = collections.defaultdict(set)
    for index, fake in enumerate(fakes):
        for request in fake.model_requests():
            messages = json.loads(request["body"]).get("messages") or []
            if len(messages) > 1:
                reached[messages[1]["content"]].add(index)
    return reached


def talk(balancers: list[BalancerProcess]) -> None:
    """CONVERSATIONS conversations of TURNS turns, each turn a new connection to the
    next of ``balancers`` (and the kernel spreads a group's connections over its
    workers), the conversations interleaved as users are."""
    # One system prompt for all, as an application's conversations have: each is still
    # a conversation of its own (named by the prompt and its first user message).
    histories = [[{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": f"conversation {n}: hello"}]
                 for n in range(CONVERSATIONS)]
    for turn in range(TURNS):
        for number, history in enumerate(histories):
            lb = balancers[(turn + number) % len(balancers)]  # each turn the next one
            reply = lb.call("POST", "/api/chat", {"model": "llama3", "messages": history,
                                                  "stream": False})
            assert reply.status == 200, reply
            history += [reply.json()["message"], {"role": "user", "content": f"and {turn}?"}]


def knows_the_fleet(lb: BalancerProcess, size: int, shared: bool = False) -> bool:
    """Whether the process that answers has every server, up, its /api/ps read, and,
    ``shared`` among instances, room on each: a share of it, which the others have not
    given yet a beat or two after it starts."""
    servers = lb.call("GET", "/servers/status").json()["servers"]
    return len(servers) == size and all(
        s["reachable"] and s["loadedModels"] == ["llama3:latest"]
        and (not shared or (s["share"] or 0) > 0) for s in servers)


def fleet_of(make_backend: Any, lb: BalancerProcess, size: int) -> list[FakeOllama]:
    """``size`` servers, each with the model loaded and room for every conversation."""
    fakes = [make_backend(models=[tag("llama3:latest")]) for _ in range(size)]
    for fake in fakes:
        fake.loaded = ["llama3:latest"]
        lb.add_server(fake.url)
    return fakes


def test_conversations_stay_on_one_server_across_two_workers(
        start_workers: Any, make_backend: Any) -> None:
    group = start_workers("--sync-interval", "0.2", "--num-parallel", "8")
    fakes = fleet_of(make_backend, group, 4)
    group.wait_for(lambda: group.call("GET", "/servers/status").json()["instances"] == 2)
    group.wait_for(lambda: all(knows_the_fleet(group, 4) for _ in range(10)))
    talk([group])
    reached = servers_of_each_conversation(fakes)
    assert len(reached) == CONVERSATIONS
    assert all(len(servers) == 1 for servers in reached.values()), reached
    # And they are spread: rendezvous hashing is no "everyone to server 1".
    assert len(set.union(*reached.values())) >= 3


def test_conversations_stay_on_one_server_across_two_instances(
        start_balancer: Any, store: StoreConfig, make_backend: Any) -> None:
    args = ("--health-interval", "600", "--sync-interval", "0.2", "--num-parallel", "8")
    first, second = start_balancer(store, *args), start_balancer(store, *args)
    fakes = fleet_of(make_backend, first, 4)
    for lb in (first, second):
        lb.wait_for(lambda lb=lb: lb.call("GET", "/servers/status").json()["instances"] == 2
                    and knows_the_fleet(lb, 4, shared=True))
    talk([first, second])  # each conversation's turns alternate between them
    reached = servers_of_each_conversation(fakes)
    assert len(reached) == CONVERSATIONS
    assert all(len(servers) == 1 for servers in reached.values()), reached


# -- rendezvous hashing, in process -----------------------------------------------------------


def servers(count: int, **fields: Any) -> list[ob.Server]:
    return [ob.Server(id=i, host=f"10.0.0.{i}", port=11434, **fields)
            for i in range(1, count + 1)]


def test_rendezvous_order_is_the_same_whatever_order_the_servers_come_in() -> None:
    fleet = servers(8)
    for key in (b"\x00" * 16, b"conversation", "session-7"):
        order = list(ob.rendezvous_order(key, fleet))
        assert list(ob.rendezvous_order(key, list(reversed(fleet)))) == order
        assert sorted(s.id for s in order) == list(range(1, 9))


def test_a_server_leaving_moves_only_the_keys_it_held_and_the_rest_spread_evenly() -> None:
    fleet = servers(5)
    keys = [f"key {n}".encode() for n in range(5000)]
    before = {key: next(ob.rendezvous_order(key, fleet)).id for key in keys}
    counts = collections.Counter(before.values())
    assert all(abs(n - 1000) < 150 for n in counts.values()), counts  # about a fifth each
    after = {key: next(ob.rendezvous_order(key, fleet[1:])).id for key in keys}
    moved = [key for key in keys if after[key] != before[key]]
    assert moved and all(before[key] == 1 for key in moved)  # only server 1's keys
    assert len(moved) == counts[1]


def test_a_heavier_server_wins_more_keys_in_proportion() -> None:
    light, heavy = servers(2)
    heavy.weight = 3.0
    won = collections.Counter(next(ob.rendezvous_order(f"k{n}", [light, heavy])).id
                              for n in range(4000))
    assert math.isclose(won[heavy.id] / 4000, 0.75, abs_tol=0.03), won


def scheduled(count: int, models: Sequence[str], loaded: bool, **settings: Any
              ) -> tuple[ob.Scheduler, list[ob.Server], dict[int, ob.Server]]:
    """A scheduler and ``count`` servers up, with ``models`` (each run once, so loaded,
    when ``loaded``)."""
    scheduler = ob.Scheduler(ob.Config(**settings))
    fleet = servers(count)
    by_id = {s.id: s for s in fleet}
    for server in fleet:
        server.reachable = True
        server.set_models([tag(model) for model in models])
        for model in models if loaded else ():
            scheduler.release(by_id, scheduler.take(server, model))
    return scheduler, fleet, by_id


def test_a_hot_key_overflows_down_its_own_order_past_the_bound() -> None:
    # 4 servers, each running 4 requests of a model at once, 2 models: a cap of 8.
    scheduler, fleet, by_id = scheduled(4, ("a:latest", "b:latest"), True, num_parallel=4,
                                        max_loaded_models=2)
    ranking = scheduler.ranking
    order = list(ob.rendezvous_order(b"hot", fleet))
    assert ranking.affine(fleet, "a:latest", HOT, ob.ANY_FREE) is order[0]
    # Its server busy with another model's requests, past (1 + slack) x its share of
    # what runs (4 of 4 + 1, where its share is a quarter): passed over, for the next
    # in its own order, though a slot of its model is free there.
    for _ in range(4):
        scheduler.take(order[0], "b:latest")
    assert ranking.tier(order[0], "a:latest") == 0 and ranking.has_room(order[0])
    assert ranking.affine(fleet, "a:latest", HOT, ob.ANY_FREE) is order[1]
    # Within its model's parallel slots it is never passed over, however light the load.
    other = ob.Scheduler(ob.Config(num_parallel=4, max_loaded_models=2))
    for server in fleet:
        server.load = ob.ServerLoad()
        other.release(by_id, other.take(server, "a:latest"))
    for _ in range(3):
        other.take(order[0], "a:latest")
        assert other.ranking.affine(fleet, "a:latest", HOT, ob.ANY_FREE) is order[0]


# -- learned capacity, shared through the store -------------------------------------------


def test_what_any_process_saw_counts_and_waits_go_with_the_most_seen_running() -> None:
    merge = ob.merge_figures
    assert merge((2, 0, 3, 1, 100, 0), (1, 1, 2, 3, 200, 50)) == (2, 1, 3, 1, 200, 50)
    assert merge((2, 0, 3, 1, 100, 80), (2, 0, 3, 2, 100, 50)) == (2, 0, 3, 2, 100, 50)
    assert merge((0,) * 6, (4, 2, 1, 0, 9, 0)) == (4, 2, 1, 0, 9, 0)
    learned = ob.Learned(resident_seen=3, parallel_seen=2, waited=7)
    assert learned.figures() == (3, 0, 2, 3, 0, 0)  # waits past SURE_AFTER change nothing
    assert not learned.absorb((1, 0, 2, 1, 0, 0))  # it knew more of everything
    assert learned.absorb((3, 1, 4, 0, 0, 10))
    assert (learned.evictions, learned.parallel_seen, learned.waited,
            learned.vram_limit) == (1, 4, 0, 10)
    for bad in ("", "[1,2]", '{"a": 1}', "[1,2,3,4,5,-6]", '[1,2,3,4,5,"6"]', "[1,2,3,4,5,true]",
                None, "[1,2,3,4,5,1e400]",
                # Past what a server can show: a row that would make any server take
                # thousands of requests at once, or call a guess known.
                "[5000,0,0,0,0,0]", "[0,0,5000,0,0,0]", "[0,0,1,9,0,0]",
                f"[0,0,0,0,{1 << 60},0]"):
        assert ob.parse_figures(bad) is None, bad
    assert ob.parse_figures("[1,2,3,3,5,6]") == (1, 2, 3, 3, 5, 6)


def chat(lb: BalancerProcess, model: str) -> int:
    return lb.call("POST", "/api/chat", {"model": model, "stream": False, "messages": [
        {"role": "user", "content": "hi"}]}).status


def learned_of(lb: BalancerProcess, server_id: int) -> dict[str, Any]:
    return dict(lb.call("GET", f"/servers/{server_id}").json()["capacity"]["learned"])


def test_what_one_instance_learns_of_a_server_every_other_shows_within_seconds(
        start_balancer: Any, store: StoreConfig, make_backend: Any) -> None:
    args = ("--health-interval", "600", "--sync-interval", "0.2")
    first, second = start_balancer(store, *args), start_balancer(store, *args)
    fake = make_backend(models=[tag(f"m{n}:latest") for n in range(3)])
    row = first.add_server(fake.url)
    second.wait_for(lambda: second.call("GET", f"/servers/{row['id']}").status == 200)
    assert learned_of(second, row["id"])["maxLoadedModelsSeen"] == 0
    # Three models loaded at once, for requests of the first instance: it learns that
    # the server holds three (from /api/ps after each load), the second asked nothing.
    fake.loaded = ["m0:latest", "m1:latest", "m2:latest"]
    for model in fake.loaded:
        assert chat(first, model) == 200
    assert first.call("PATCH", f"/servers/{row['id']}", {"weight": 2}).status == 200  # read
    assert learned_of(first, row["id"])["maxLoadedModelsSeen"] == 3
    second.wait_for(lambda: learned_of(second, row["id"])["maxLoadedModelsSeen"] == 3)
    # Less seen later, by the other, forgets nothing.
    fake.loaded = ["m0:latest"]
    assert chat(second, "m0") == 200
    assert second.call("PATCH", f"/servers/{row['id']}", {"weight": 1}).status == 200
    assert learned_of(second, row["id"])["maxLoadedModelsSeen"] == 3
    # A row an outside writer spoiled is no figures, and no trouble.
    store.execute(f"UPDATE learned SET figures = 'not json' WHERE server_id = {row['id']}")
    store.execute(f"INSERT INTO change_log (kind, row_id) VALUES ('learned', '{row['id']}')")
    for lb in (first, second):
        assert learned_of(lb, row["id"])["maxLoadedModelsSeen"] == 3


def test_two_workers_show_the_same_learned_figures(
        start_workers: Any, make_backend: Any) -> None:
    group = start_workers("--sync-interval", "0.2")
    fake = make_backend(models=[tag(f"m{n}:latest") for n in range(3)])
    row = group.add_server(fake.url)
    fake.loaded = ["m0:latest", "m1:latest", "m2:latest"]
    for model in fake.loaded * 10:  # the kernel picks the worker of each: at least one
        assert chat(group, model) == 200  # asks all three (a worker counts what it asked)

    def shown_alike() -> bool:
        # A PATCH has the worker it reaches read /api/ps; once one that asked all three
        # has, every worker shows what it learned, whichever answers (a new connection
        # each time).
        assert group.call("PATCH", f"/servers/{row['id']}", {"weight": 2}).status == 200
        return all(learned_of(group, row["id"])["maxLoadedModelsSeen"] == 3
                   for _ in range(10))

    group.wait_for(shown_alike, timeout=20)


def test_a_pass_for_requests_that_run_at_once_gets_no_cold_load_through_affinity() -> None:
    scheduler, fleet, by_id = scheduled(2, ("a:latest",), False, num_parallel=2,
                                        max_loaded_models=2)
    conversation = ob.Affinity(b"first message", None, cached=False)
    assert scheduler.ranking.pick(by_id, "a:latest", conversation, max_tier=0) == (None, True)
    assert scheduler.ranking.pick(by_id, "a:latest", conversation)[0] is next(
        ob.rendezvous_order(b"first message", fleet))  # a load is fine on arrival
