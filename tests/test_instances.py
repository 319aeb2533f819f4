"""Several instances on one database: what one writes, the others apply within about
SYNC_INTERVAL, through the store's change log, without waiting for a health round."""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    MYSQL,
    ROOT,
    BalancerProcess,
    StoreConfig,
    call,
    drop_database,
    free_port,
    mysql_connect,
    unavailable,
)
from fakeollama import FakeOllama

import ollamabalancer as ob


def chat(lb: BalancerProcess, **headers: str) -> int:
    return lb.call("POST", "/api/chat", {"model": "llama3", "messages": [], "stream": False},
                   headers=headers).status


@pytest.fixture
def pair(start_balancer: Any, store: StoreConfig) -> tuple[BalancerProcess, BalancerProcess]:
    """Two instances on one database, neither with a health round in the test's time;
    the servers run four requests of a model at once (so only the cap limits them)."""
    args = ("--health-interval", "600", "--sync-interval", "0.2", "--num-parallel", "4")
    return start_balancer(store, *args), start_balancer(store, *args)


def test_a_server_added_on_one_instance_is_served_by_the_other_at_once(
        pair: tuple[BalancerProcess, BalancerProcess], backend: FakeOllama) -> None:
    first, second = pair
    first.add_server(backend.url, name="gpu")
    second.wait_for(lambda: chat(second) == 200)  # checked there when it learned of it
    assert second.call("GET", "/servers/getServer?models=llama3").status == 200
    assert backend.model_requests()


def test_a_server_disabled_or_deleted_on_one_instance_gets_nothing_more_from_the_other(
        pair: tuple[BalancerProcess, BalancerProcess], backend: FakeOllama) -> None:
    first, second = pair
    row = first.add_server(backend.url, name="gpu")
    second.wait_for(lambda: chat(second) == 200)
    first.call("PATCH", f"/servers/{row['id']}", {"enabled": False})
    second.wait_for(lambda: chat(second) == 503)  # its only server is down: unavailable
    served = len(backend.model_requests())
    assert chat(second) == 503 and len(backend.model_requests()) == served
    first.call("PATCH", f"/servers/{row['id']}", {"enabled": True})
    second.wait_for(lambda: chat(second) == 200)
    first.call("DELETE", f"/servers/{row['id']}")
    second.wait_for(lambda: chat(second) == 404)  # no server has the model any more
    assert second.call("GET", f"/servers/ollama/{row['id']}/api/tags").status == 404


def test_a_key_made_on_one_instance_is_asked_for_and_taken_by_the_other(
        pair: tuple[BalancerProcess, BalancerProcess], backend: FakeOllama) -> None:
    first, second = pair
    first.add_server(backend.url)
    second.wait_for(lambda: chat(second) == 200)
    key, other = (first.call("POST", "/keys/addKey", {"name": n}).json() for n in "ab")
    second.wait_for(lambda: chat(second) == 401)  # keys exist now: one is needed
    assert chat(second, Authorization=f"Bearer {key['key']}") == 200
    first.call("DELETE", f"/keys/{key['id']}")
    second.wait_for(lambda: chat(second, Authorization=f"Bearer {key['key']}") == 401)
    assert chat(second, Authorization=f"Bearer {other['key']}") == 200


def test_a_proxy_added_on_one_instance_carries_the_others_requests(
        pair: tuple[BalancerProcess, BalancerProcess], backend: FakeOllama) -> None:
    first, second = pair
    row = first.add_server(backend.url)
    proxy_id = first.add_proxy(name="nowhere", ip="127.0.0.1", port=1)
    first.call("PATCH", f"/servers/{row['id']}", {"proxyId": proxy_id})
    # Through a proxy nobody listens on: the server is down for the other instance too.
    second.wait_for(lambda: second.call("GET", f"/servers/ollama/{row['id']}/api/tags")
                    .status == 502)


def burst(balancers: list[BalancerProcess], seconds: float) -> list[int]:
    """One request through each of ``balancers`` at once, each held ``seconds`` by the
    server: the statuses."""
    statuses: list[int] = []
    body = {"model": "llama3", "messages": [], "stream": False, "fake_sleep": seconds}
    threads = [threading.Thread(target=lambda lb=lb: statuses.append(
        lb.call("POST", "/api/chat", body).status)) for lb in balancers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return statuses


def test_instances_share_a_servers_cap_and_one_that_dies_gives_its_share_back(
        pair: tuple[BalancerProcess, BalancerProcess], backend: FakeOllama) -> None:
    first, second = pair
    row = first.add_server(backend.url, maxConcurrency=2)
    for lb in pair:
        lb.wait_for(lambda lb=lb: lb.call("GET", "/servers/status").json()["instances"] == 2
                    and chat(lb) == 200)
    # Four requests through each at once: the server sees at most its cap, all served.
    backend.most_active = 0
    assert burst([first, second] * 4, 0.3) == [200] * 8
    assert backend.most_active == 2, backend.most_active
    # One instance idle: the other gets its share within a beat or two.
    backend.most_active = 0
    assert burst([first] * 6, 0.5) == [200] * 6
    assert backend.most_active == 2
    # An instance that dies without a word: after a few missed beats it holds nothing.
    second.proc.send_signal(signal.SIGKILL)
    second.proc.wait(10)
    first.wait_for(lambda: first.call("GET", "/servers/status").json()["instances"] == 1)
    status = first.call("GET", "/servers/status").json()
    assert [s["share"] for s in status["servers"] if s["id"] == row["id"]] == [None]
    backend.most_active = 0
    assert burst([first] * 4, 0.3) == [200] * 4
    assert backend.most_active == 2


def test_a_change_log_row_that_names_no_row_is_skipped_and_sync_goes_on(
        pair: tuple[BalancerProcess, BalancerProcess], store: StoreConfig,
        backend: FakeOllama) -> None:
    first, second = pair
    row = first.add_server(backend.url)
    store.execute("INSERT INTO change_log (kind, row_id) VALUES ('server', 'x; DROP')")
    for lb in pair:  # reads that catch up first, and a write, still answer
        assert lb.call("GET", f"/servers/{row['id']}").status == 200
        assert lb.call("PATCH", f"/servers/{row['id']}", {"weight": 2}).status == 200
    later = second.add_server("http://127.0.0.1:9", name="added-later")
    first.wait_for(lambda: first.call("GET", f"/servers/{later['id']}").status == 200)
    assert "names server 'x; DROP', not a row id: skipped" in first.log


def test_a_heartbeat_from_the_future_is_no_live_instance(
        start_balancer: Any, store: StoreConfig, backend: FakeOllama) -> None:
    lb = start_balancer(store, "--health-interval", "600", "--sync-interval", "0.2")
    row = lb.add_server(backend.url, maxConcurrency=2)
    future = ("datetime('now', '+1 hour')" if store.engine == "sqlite"
              else "NOW() + INTERVAL 1 HOUR")
    store.execute("INSERT INTO instances (id, beat_at, demand, holding) VALUES "
                  f"('from-the-future', {future}, '{{\"{row['id']}\": 9}}', '{{}}')")
    time.sleep(1)  # a few beats
    status = lb.call("GET", "/servers/status").json()
    assert status["instances"] == 1
    assert [s["share"] for s in status["servers"]] == [None]  # the whole cap its own
    backend.most_active = 0
    assert burst([lb] * 4, 0.3) == [200] * 4
    assert backend.most_active == 2


def test_the_heartbeat_lock_is_the_databases_own_and_a_lock_not_taken_is_no_beat(
        tmp_path: Path) -> None:
    # (SQLite beats under the database's write lock, which needs no name.)
    store = StoreConfig("mysql", tmp_path)
    mysql_connect().close()
    config = ob.Config(db_engine="mysql", db_database=store.database, db_host=MYSQL["host"],
                       db_port=MYSQL["port"], db_username=MYSQL["user"],
                       db_password=MYSQL["password"])
    mysql = ob.MySQLStore(config)
    mysql.connect()
    mysql.migrate()
    holder = mysql_connect(store.database)
    try:
        assert mysql.beat_lock == f"ollamabalancer.{store.database}"
        long_name = ob.MySQLStore(ob.Config(db_engine="mysql", db_database="d" * 64))
        assert len(long_name.beat_lock) <= 64 and long_name.beat_lock != mysql.beat_lock
        assert mysql.beat("me", "{}", 5, lambda others: "{}") == []  # alone
        with holder.cursor() as cursor:  # another instance holds it, and holds on
            cursor.execute("SELECT GET_LOCK(%s, 0)", [mysql.beat_lock])
        with pytest.raises(ob.StoreUnavailable, match="could not take the lock"):
            mysql.beat("me", "{}", 5, lambda others: "{}")
    finally:
        holder.close()
        mysql.close()
        drop_database(store.database)


def test_fair_shares_meet_small_wants_first_and_share_what_is_left() -> None:
    assert ob.fair_shares(2, {"a": 0, "b": 0}) == {"a": 1, "b": 1}
    assert ob.fair_shares(2, {"a": 5, "b": 0}) == {"a": 2, "b": 0}
    assert ob.fair_shares(4, {"a": 1, "b": 9}) == {"a": 1, "b": 3}
    assert ob.fair_shares(3, {"a": 5, "b": 5}) == {"a": 2, "b": 1}
    assert ob.fair_shares(1, {"a": 0, "b": 0, "c": 0}) == {"a": 1, "b": 0, "c": 0}
    assert ob.fair_shares(8, {"a": 1, "b": 2, "c": 0}) == {"a": 3, "b": 4, "c": 1}
    for capacity in range(0, 12):
        for wants in ({"a": 0}, {"a": 3, "b": 1}, {"a": 2, "b": 2, "c": 7}):
            shares = ob.fair_shares(capacity, wants)
            assert sum(shares.values()) == capacity


def test_the_change_log_names_each_write_and_says_when_it_no_longer_reaches_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ob.SQLiteStore(str(tmp_path / "log.db"), 5.0)
    store.connect()
    store.migrate()
    try:
        assert store.latest_change() == 0 and store.changes_since(0) == []
        server = store.add_server({"host": "h", "port": 1, "scheme": "http"})
        store.update_server(server, {"name": "gpu"})
        proxy = store.add_proxy({"ip": "p", "port": 2, "name": "p", "protocol": "http"})
        token = store.handle_for(server, proxy)
        key = store.add_key({"name": "k", "key_hash": "0" * 64})
        store.delete_server(server)
        assert [(k, r) for _, k, r in store.changes_since(0) or []] == [
            ("server", str(server)), ("server", str(server)), ("proxy", str(proxy)),
            ("handle", token), ("key", str(key)), ("server", str(server))]
        assert store.change_mark(0) == (6, 6) and store.change_mark(4) == (6, 2)
        monkeypatch.setattr(ob, "CHANGE_LOG_KEPT", 2)
        store.prune_changes()
        assert store.changes_since(3) is None  # pruned past it: reload everything
        assert [r for r, _, _ in store.changes_since(4) or []] == [5, 6]
    finally:
        store.close()


def haproxy_config(front: int, backends: list[int]) -> str:
    """docs/operations.md's HAProxy configuration, on this test's ports."""
    readme = (ROOT / "docs" / "operations.md").read_text()
    match = re.search(r"```haproxy\n(.*?)```", readme, re.S)
    assert match, "docs/operations.md gives no HAProxy configuration"
    text = match.group(1).replace("bind :8080", f"bind 127.0.0.1:{front}")
    for address, port in zip(("10.0.0.11:8080", "10.0.0.12:8080"), backends, strict=True):
        text = text.replace(address, f"127.0.0.1:{port}")
    return text


def test_behind_haproxy_only_the_requests_in_flight_on_a_killed_instance_fail(
        pair: tuple[BalancerProcess, BalancerProcess], backend: FakeOllama,
        tmp_path: Path) -> None:
    binary = shutil.which("haproxy") or ("/usr/sbin/haproxy"
                                         if os.path.exists("/usr/sbin/haproxy") else None)
    if binary is None:
        unavailable("haproxy is not installed (apt-get install haproxy)")
    first, second = pair
    first.add_server(backend.url)
    second.wait_for(lambda: chat(second) == 200)
    front = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config(front, [first.port, second.port]))
    proxy = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    def up() -> bool:
        try:
            return call(front, "GET", "/").status == 200
        except OSError:
            return False  # not listening yet

    try:
        first.wait_for(up)
        outcomes: list[tuple[float, int]] = []
        stop = threading.Event()

        def traffic() -> None:
            body = {"model": "llama3", "messages": [], "stream": False, "fake_sleep": 0.05}
            while not stop.is_set():
                try:
                    status = call(front, "POST", "/api/chat", body).status
                except (OSError, http.client.HTTPException):  # cut off with its instance
                    status = 0
                outcomes.append((time.monotonic(), status))

        clients = [threading.Thread(target=traffic) for _ in range(2)]
        for client in clients:
            client.start()
        time.sleep(1.5)
        killed_at = time.monotonic()
        second.proc.send_signal(signal.SIGKILL)
        time.sleep(3)
        stop.set()
        for client in clients:
            client.join(10)
    finally:
        proxy.terminate()
        proxy.wait(10)
    before = [s for t, s in outcomes if t < killed_at]
    after = [s for t, s in outcomes if t >= killed_at]
    assert before and set(before) == {200}
    failed = [s for s in after if s != 200]
    assert len(failed) <= 2, failed  # at most the two requests in flight on it
    assert len(after) - len(failed) >= 10  # and the rest of the run is served by the other
    assert [s for t, s in outcomes if t >= killed_at + 1.5] == [200] * len(
        [t for t, _ in outcomes if t >= killed_at + 1.5])


def test_a_change_committed_late_under_a_lower_revision_is_still_applied(
        tmp_path: Path) -> None:
    """MySQL hands out auto-increment revisions at insert, not at commit: a writer can
    commit revision 3 after another's 5 was read. The instance that read 5 still applies 3."""
    tables = ob.SQLiteStore(str(tmp_path / "late.db"), 5.0)
    tables.connect()
    tables.migrate()
    config = ob.Config(db_engine="sqlite", db_path=str(tmp_path / "late.db"))
    shown: list[list[str]] = []

    async def scenario() -> None:
        app = ob.Balancer(config, ob.AsyncStore(tables))
        await app.fleet.reload()
        tables.add_key({"name": "k", "key_hash": "1" * 64})  # revision 1
        tables._execute("UPDATE change_log SET revision = 5 WHERE revision = 1")
        await app.fleet.sync()  # read up to 5
        late = tables.add_server({"host": "127.0.0.1", "port": 1, "scheme": "http",
                                  "name": "late"})
        tables._execute("UPDATE change_log SET revision = 3 WHERE kind = 'server'")
        await app.fleet.sync()
        shown.append([s["name"] for s in app.observability.status_payload()["servers"]
                      if s["id"] == late])
        await app.close()

    asyncio.run(scenario())
    tables.close()
    assert shown == [["late"]]


def test_a_model_pulled_or_deleted_through_one_instance_is_seen_by_the_other_at_once(
        pair: tuple[BalancerProcess, BalancerProcess], backend: FakeOllama) -> None:
    """Read-your-writes: once a pull (or delete) has answered, the very next request,
    through the other instance too, sees the change (no health round in between)."""
    first, second = pair
    first.add_server(backend.url)
    second.wait_for(lambda: chat(second) == 200)
    failures = []
    for index in range(20):
        name = f"fresh{index}:latest"
        pulled = first.call("POST", "/api/pull", {"model": name, "stream": False})
        assert pulled.status == 200, pulled
        for lb in (second, first):
            status = lb.call("POST", "/api/chat", {"model": name, "messages": [],
                                                   "stream": False}).status
            failures += [(index, status)] if status != 200 else []
    assert failures == []
    for index in range(10):
        name = f"fresh{index}:latest"
        deleted = second.call("DELETE", "/api/delete", {"model": name})
        failures += [(index, deleted.status)] if deleted.status != 200 else []
        listed = {m["name"] for lb in (first, second)
                  for m in lb.call("GET", "/api/tags").json()["models"]}
        failures += [(index, "still listed")] if name in listed else []
    assert failures == []
