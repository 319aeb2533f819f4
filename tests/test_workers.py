"""WORKERS=N: several serving processes on one port, supervised, each an instance on the
one store, answering /metrics and /servers/status for the whole group."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import BalancerProcess
from fakeollama import FakeOllama, tag

import ollamabalancer as ob

CHAT = {"model": "llama3", "messages": [], "stream": False}


@pytest.fixture
def group(start_workers: Any) -> BalancerProcess:
    """Two workers on SQLite, beating five times a second."""
    process: BalancerProcess = start_workers("--sync-interval", "0.2", "--num-parallel", "4")
    return process


def add_server(lb: BalancerProcess, backend: FakeOllama, cap: int) -> None:
    """A server added through one worker, once every worker has it and its share."""
    lb.add_server(backend.url, maxConcurrency=cap)
    lb.wait_for(lambda: len(workers(lb)) == 2 and all(
        lb.call("POST", "/api/chat", CHAT).status == 200 for _ in range(10)))
    backend.requests.clear()


def workers(lb: BalancerProcess) -> list[dict[str, Any]]:
    return list(lb.call("GET", "/servers/status").json()["workers"])


def worker_pids(lb: BalancerProcess) -> set[int]:
    return {w["pid"] for w in workers(lb)}


def pids_answered(lb: BalancerProcess) -> set[int]:
    """worker_pids, or none when the connection was reset: one waiting at a worker's
    listener when the worker is killed is (unless net.ipv4.tcp_migrate_req is set)."""
    try:
        return worker_pids(lb)
    except ConnectionError:
        return set()


def chats_counted(lb: BalancerProcess) -> int:
    """The group's /api/chat requests answered 200, as /metrics says."""
    text = lb.call("GET", "/metrics").text
    return sum(int(float(n)) for n in re.findall(
        r'^ollamabalancer_requests_total\{endpoint="/api/chat",[^}]*status="200"\} (\S+)$',
        text, re.MULTILINE))


def slow_chats(lb: BalancerProcess, count: int, seconds: float
               ) -> tuple[list[threading.Thread], list[int]]:
    """``count`` chats started at once, each on its own connection and held ``seconds`` by
    the server: the threads, and the statuses they gather."""
    statuses: list[int] = []
    slow = {**CHAT, "fake_sleep": seconds}
    threads = [threading.Thread(target=lambda: statuses.append(
        lb.call("POST", "/api/chat", slow).status)) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads, statuses


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead but still listed: its state is Z.
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_two_workers_share_the_port_and_each_answers_for_the_group(
        group: BalancerProcess, backend: FakeOllama) -> None:
    add_server(group, backend, 64)
    time.sleep(0.5)  # every worker has written its counts since
    before = chats_counted(group)
    served = [w["requests"] for w in workers(group)]
    # Each call is a new connection: the kernel spreads them over both workers.
    assert all(group.call("POST", "/api/chat", CHAT).status == 200 for _ in range(40))
    time.sleep(0.5)
    listed = workers(group)
    assert len({w["pid"] for w in listed}) == 2
    assert all(w["requests"] > n for w, n in zip(listed, served, strict=True))
    # Whichever worker a scrape reaches, it counts the whole group's requests.
    assert {chats_counted(group) for _ in range(10)} == {before + 40}
    status = group.call("GET", "/servers/status").json()
    assert status["instances"] == 2  # each worker is an instance on the store
    assert status["servers"][0]["requestsPerMinute"] == before + 40
    assert sum(requests for requests, _ in status["servers"][0]["history"]) == before + 40
    metrics = group.call("GET", "/metrics").text
    assert "\nollamabalancer_workers 2\n" in metrics
    page = group.call("GET", "/dashboard").text  # drawn from the group's status
    assert page.count('"pid":') == 2 and f'"requestsPerMinute": {before + 40}' in page


def test_a_worker_that_dies_is_started_again_and_what_it_counted_stays(
        group: BalancerProcess, backend: FakeOllama) -> None:
    add_server(group, backend, 64)
    assert all(group.call("POST", "/api/chat", CHAT).status == 200 for _ in range(20))
    time.sleep(0.5)  # both have written their counts since
    counted = chats_counted(group)
    victim = min(worker_pids(group))
    os.kill(victim, signal.SIGKILL)
    group.wait_for(lambda: len(pids := pids_answered(group)) == 2 and victim not in pids
                   and "was killed by SIGKILL: starting it again" in group.log)
    assert {chats_counted(group) for _ in range(10)} == {counted}
    group.wait_for(lambda: all(
        group.call("POST", "/api/chat", CHAT).status == 200 for _ in range(10)))
    group.wait_for(lambda: chats_counted(group) >= counted + 10)


def test_sigterm_lets_every_workers_requests_finish_then_leaves_nothing_behind(
        group: BalancerProcess, backend: FakeOllama, tmp_path: Path) -> None:
    add_server(group, backend, 64)
    pids = worker_pids(group)
    assert list((tmp_path / "tmp").iterdir())  # the group's directory, while it runs
    threads, statuses = slow_chats(group, 8, 1.0)
    group.wait_for(lambda: backend.active == 8)
    group.proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(20)
    assert statuses == [200] * 8
    assert group.proc.wait(15) == 0
    assert not any(alive(pid) for pid in pids)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_workers_share_each_servers_cap(group: BalancerProcess, backend: FakeOllama) -> None:
    add_server(group, backend, 2)
    backend.most_active = 0
    threads, statuses = slow_chats(group, 10, 0.3)
    for thread in threads:
        thread.join(60)
    assert statuses == [200] * 10
    assert backend.most_active == 2


def test_workers_drain_and_exit_when_their_supervisor_is_killed(
        group: BalancerProcess) -> None:
    group.wait_for(lambda: len(workers(group)) == 2)
    pids = worker_pids(group)
    group.proc.send_signal(signal.SIGKILL)
    group.proc.wait(5)
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)


def test_workers_setting_takes_a_count_or_auto() -> None:
    assert ob.load_config(["--workers", "3"], {}).workers == 3
    assert ob.load_config([], {"WORKERS": "auto"}).workers == len(os.sched_getaffinity(0))
    assert ob.load_config([], {}).workers == 1
    for wrong in ("0", "-1", "two", "1025"):
        with pytest.raises(ob.ConfigError, match="WORKERS"):
            ob.load_config([], {"WORKERS": wrong})


def test_group_counters_add_up_and_a_bad_snapshot_changes_nothing() -> None:
    first, second = ob.Metrics(), ob.Metrics()
    labels = ("/api/chat", "gpu", "llama3:latest", "200")
    first.count("requests_total", labels, 3)
    second.count("requests_total", labels, 4)
    first.observe("ttfb_seconds", ("gpu", "llama3:latest"), 0.02)
    second.observe("ttfb_seconds", ("gpu", "llama3:latest"), 900.0)  # past the last bound
    import json
    merged = ob.Metrics()
    for metrics in (first, second):
        merged.absorb(json.loads(json.dumps(metrics.snapshot())))
    assert merged.counters["requests_total"] == {labels: 7.0}
    histogram = merged.histograms["ttfb_seconds"][("gpu", "llama3:latest")]
    assert (histogram.count, sum(histogram.counts), histogram.sum) == (2, 1, 900.02)
    before = merged.render({})
    bad = json.loads(json.dumps(first.snapshot()))
    bad["histograms"]["ttfb_seconds"][0][1] = [1, 2]  # buckets that are not ours
    with pytest.raises(ValueError):
        merged.absorb(bad)
    bad = json.loads(json.dumps(first.snapshot()))
    bad["counters"]["requests_total"][0][0] = ["/api/chat"]  # labels that are not its own
    with pytest.raises(ValueError):
        merged.absorb(bad)
    assert merged.render({}) == before
    assert 'requests_total{endpoint="/api/chat",server="gpu",model="llama3:latest",' \
           'status="200"} 7' in before


def test_history_of_several_workers_adds_up_by_step() -> None:
    step = int(time.monotonic() // ob.HISTORY_STEP)
    mine, theirs = [[step - 1, 2, 0], [step, 1, 1]], [[step, 4, 0], [step - 40, 9, 9]]
    points = ob.recent_history([*mine, *theirs])
    assert points[-1] == [5, 1] and points[-2] == [2, 0] and len(points) == ob.HISTORY_POINTS
    assert ob.per_minute(points) == (7, 1)  # the step forty back is out of the window



def test_a_worker_that_hangs_is_killed_and_started_again(group: BalancerProcess) -> None:
    group.wait_for(lambda: len(workers(group)) == 2)
    time.sleep(0.5)  # each has written its file
    stuck = min(worker_pids(group))
    os.kill(stuck, signal.SIGSTOP)  # alive, but its event loop runs no more
    # 30 beats of 0.2 s without a word: killed, and another started in its place.
    group.wait_for(lambda: not alive(stuck) and len(pids := pids_answered(group)) == 2
                   and stuck not in pids
                   and f"(pid {stuck}) has not written its counts" in group.log
                   and "was killed by SIGKILL: starting it again" in group.log, timeout=30)


def test_a_worker_dying_young_waits_twice_as_long_each_time_one_that_lived_long_not(
        ) -> None:
    supervisor = ob.Supervisor(ob.Config())
    least, most = ob.WORKER_RESTART
    young, old = ob.WORKER_YOUNG / 2, ob.WORKER_YOUNG * 2
    assert [supervisor.restart_pause(0, young) for _ in range(3)] == [least, 2 * least,
                                                                      4 * least]
    assert supervisor.restart_pause(1, young) == least  # each worker its own
    assert supervisor.restart_pause(0, old) == least  # lived long: from the start again
    assert supervisor.restart_pause(0, old) == least
    for _ in range(30):
        pause = supervisor.restart_pause(2, young)
    assert pause == most


def test_a_wall_clock_jump_kills_no_worker_and_a_silent_one_is_killed_on_the_monotonic_clock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    supervisor = ob.Supervisor(ob.Config(sync_interval=0.2))  # stuck after 6 s silent
    supervisor.directory = str(tmp_path)
    worker = subprocess.Popen(["sleep", "60"])
    try:
        supervisor.watch(worker.pid, 0)
        (tmp_path / f"worker-{worker.pid}-0a1b2c3d.json").write_text("{}")
        supervisor.kill_hung()  # its first word
        real_time, real_monotonic = time.time, time.monotonic
        monkeypatch.setattr(ob.time, "time", lambda: real_time() + 7200)  # NTP step
        supervisor.kill_hung()
        assert worker.poll() is None and not supervisor.hung
        monkeypatch.setattr(ob.time, "time", real_time)
        monkeypatch.setattr(ob.time, "monotonic", lambda: real_monotonic() + 7)
        supervisor.kill_hung()  # 7 s with no word, on the clock that does not jump
        assert worker.wait(10) == -signal.SIGKILL and supervisor.hung == {worker.pid}
    finally:
        worker.kill()
        worker.wait()


def test_a_workers_counts_are_on_the_board_for_the_others_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "board")
    ob.LoadBoard.create(path, 3)
    first, second, third = (ob.LoadBoard(path, 3, index) for index in range(3))
    try:
        for board, instance in ((first, "a"), (second, "b"), (third, "")):
            board.join(instance)
        assert second.siblings() == {ob._instance_hash("a")}  # an empty row is no one
        before = second.view()
        first.publish(7, 3)
        third.publish(7, 1)
        first.publish(7 + ob.BOARD_SLOTS, 2)  # the same cell by its id: the next one
        assert second.others(7) == 4 and second.others(7 + ob.BOARD_SLOTS) == 2
        assert first.others(7) == 1 and second.others(8) == 0
        assert second.changed_servers(before, second.view()) == {7, 7 + ob.BOARD_SLOTS}
        first.publish(7, 0)
        assert second.others(7) == 1
        # A neighbourhood full of busy servers: one more goes unseen, never misread.
        for n in range(ob.BOARD_PROBE):
            first.publish(100 + n * ob.BOARD_SLOTS, 1)
        first.publish(100 + ob.BOARD_PROBE * ob.BOARD_SLOTS, 5)
        assert second.others(100 + ob.BOARD_PROBE * ob.BOARD_SLOTS) == 0
        assert second.others(100) == 1
        # A worker that died: the supervisor empties its row.
        ob.LoadBoard.clear(path, 3, 0)
        assert second.others(7 + ob.BOARD_SLOTS) == 0 and second.others(7) == 1
        assert second.siblings() == set()
    finally:
        for board in (first, second, third):
            board.close()


def test_a_slot_freed_by_one_worker_goes_to_the_others_queue_without_waiting_a_beat(
        start_workers: Any, backend: FakeOllama) -> None:
    # Heartbeats 5 s apart: only the board can tell one worker that the other's request
    # is done, and only it keeps the cap of 1 for the two.
    group = start_workers("--sync-interval", "5")
    group.add_server(backend.url, maxConcurrency=1)
    group.wait_for(lambda: len(workers(group)) == 2, timeout=20)
    backend.most_active = 0
    took = []
    for _ in range(6):  # pairs: wherever the kernel puts each, the second waits its turn
        threads, statuses = slow_chats(group, 1, 0.4)
        time.sleep(0.1)
        started = time.monotonic()
        assert group.call("POST", "/api/chat", CHAT).status == 200
        took.append(time.monotonic() - started)
        threads[0].join(10)
        assert statuses == [200]
    assert backend.most_active == 1
    assert max(took) < 2.0, took  # 0.3 s behind the first, not a heartbeat of 5


def test_a_models_slots_taken_by_another_worker_count_in_this_ones_ranking(
        tmp_path: Path) -> None:
    # Without this, each worker of an unconfigured fleet took a model's slots as free
    # that the other held, and its requests waited inside Ollama (the simulated fleet's
    # p95 with WORKERS=2 was 3.3x its configured one's).
    path = str(tmp_path / "board")
    ob.LoadBoard.create(path, 2)
    first, second = ob.LoadBoard(path, 2, 0), ob.LoadBoard(path, 2, 1)
    try:
        ranking = ob.Ranking(ob.Config(num_parallel=1, max_loaded_models=2), second)
        server = ob.Server(id=1, host="h", port=11434, reachable=True)
        server.set_models([tag("a:latest"), tag("b:latest")])
        server.load.loaded = {"a:latest": time.monotonic(), "b:latest": time.monotonic()}
        assert ranking.tier(server, "a:latest") == 0
        first.publish(ob.model_cell(1, "a:latest"), 1)  # the other worker runs one of "a"
        assert ranking.running(server, "a:latest") == 1
        assert ranking.tier(server, "a:latest") == 2  # its one slot taken
        first.publish(ob.model_cell(1, "b:latest"), 1)
        assert ranking.tier(server, "c:latest") == 4  # nothing idle to evict
        assert ob.model_cell(1, "a:latest") >= 1 << 30 > 1  # no server id's cell
    finally:
        first.close()
        second.close()
