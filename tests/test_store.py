"""The stores: the seed's MySQL tables upgraded in place, schema.sql, database outages,
and a start on nothing but the standard library."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, StoreConfig, drop_database, mysql_connect
from fakeollama import FakeOllama, tag

import ollamabalancer as ob

# The seed's DDL, as its two drizzle migrations leave it.
SEED_DDL = [
    """CREATE TABLE IF NOT EXISTS `ollamaServers` (
        `id` int, `port` int NOT NULL, `host` varchar(255) NOT NULL,
        `location` varchar(255) NOT NULL, `runner` varchar(255) NOT NULL, `models` json,
        `last_checked` timestamp, `created_at` timestamp NOT NULL DEFAULT (now()),
        `updated_at` timestamp DEFAULT (now()) ON UPDATE CURRENT_TIMESTAMP,
        CONSTRAINT `ollamaServers_id` PRIMARY KEY(`id`),
        CONSTRAINT `ollamaServers_host_unique` UNIQUE(`host`))""",
    """CREATE TABLE IF NOT EXISTS `proxy` (
        `id` int AUTO_INCREMENT, `name` varchar(255) NOT NULL, `ip` varchar(255) NOT NULL,
        `port` int NOT NULL, `user_name` varchar(255), `password` varchar(255),
        `created_at` timestamp NOT NULL DEFAULT (now()),
        `updated_at` timestamp DEFAULT (now()) ON UPDATE CURRENT_TIMESTAMP,
        CONSTRAINT `proxy_id` PRIMARY KEY(`id`))""",
    "ALTER TABLE `ollamaServers` MODIFY COLUMN `id` int NOT NULL",
    "ALTER TABLE `proxy` ADD `protocol` varchar(255)",
    "ALTER TABLE `proxy` ADD `status` tinyint NOT NULL",
]


@pytest.fixture
def mysql_store(tmp_path: Path) -> Any:
    config = StoreConfig("mysql", tmp_path)
    mysql_connect().close()
    yield config
    drop_database(config.database)


def columns(database: str) -> dict[str, list[tuple[Any, ...]]]:
    conn = mysql_connect()
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT TABLE_NAME, COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE, EXTRA, COLUMN_DEFAULT"
            " FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s"
            " ORDER BY TABLE_NAME, COLUMN_NAME", [database])
        rows = cursor.fetchall()
        cursor.execute(
            "SELECT TABLE_NAME, INDEX_NAME, GROUP_CONCAT(COLUMN_NAME ORDER BY SEQ_IN_INDEX),"
            " NON_UNIQUE FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = %s"
            " GROUP BY TABLE_NAME, INDEX_NAME, NON_UNIQUE ORDER BY TABLE_NAME, INDEX_NAME",
            [database])
        indexes = cursor.fetchall()
    conn.close()
    return {"columns": list(rows), "indexes": list(indexes)}


def test_schema_sql_is_the_schema_the_balancer_creates() -> None:
    text = (ROOT / "schema.sql").read_text()
    body = "\n".join(line for line in text.splitlines(keepends=False)
                     if not line.startswith("--")).strip()
    assert body == ob.MYSQL_SCHEMA.strip()


def test_seed_database_is_upgraded_in_place_and_its_rows_served(
        mysql_store: StoreConfig, start_balancer: Any, make_backend: Any) -> None:
    first, second = make_backend(), make_backend(models=[tag("mistral:7b", "7.2B")])
    conn = mysql_connect()
    with conn.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{mysql_store.database}`")
        cursor.execute(f"USE `{mysql_store.database}`")
        for statement in SEED_DDL:
            cursor.execute(statement)
        # Rows as the seed's outside crawler writes them: its own ids, whole tag lists.
        cursor.execute(
            "INSERT INTO ollamaServers (id, port, host, location, runner, models)"
            " VALUES (%s, %s, %s, %s, %s, %s), (%s, %s, %s, %s, %s, %s)",
            [41, first.port, "127.0.0.1", "Paris", "ollama", json.dumps(first.models),
             57, second.port, "localhost", "Berlin", "ollama",
             json.dumps({"models": second.models})])
        cursor.execute("INSERT INTO proxy (name, ip, port, user_name, password, protocol,"
                       " status) VALUES ('old', '127.0.0.1', 3128, 'u', 'plain-pw', NULL, 1)")
    conn.close()

    lb = start_balancer(mysql_store)
    servers = {s["id"]: s for s in lb.call("GET", "/servers/allServers").json()}
    assert set(servers) == {41, 57}
    assert servers[41]["location"] == "Paris" and servers[41]["reachable"] is True
    assert servers[57]["models"] == ["mistral:7b"]
    assert lb.call("GET", "/proxy/allProxies").json()[0]["protocol"] == "http"
    sid = lb.server_id(models="mistral:7b")
    assert lb.call("GET", f"/servers/ollama/{sid}/api/version").status == 200
    assert second.requests[-1]["path"] == "/api/version"
    assert lb.call("GET", "/servers/ollama/41/api/version").status == 200
    # New servers get ids after the crawler's, also on a host that is already listed.
    added = lb.add_server(f"http://127.0.0.1:{first.port + 1}")
    assert added["id"] > 57
    lb.stop()

    fresh = StoreConfig("mysql", Path("/nonexistent"))
    try:
        start_balancer(fresh).stop()
        assert columns(mysql_store.database)["columns"] == columns(fresh.database)["columns"]
        assert columns(mysql_store.database)["indexes"] == columns(fresh.database)["indexes"]
    finally:
        drop_database(fresh.database)
    again = start_balancer(mysql_store)  # a second upgrade changes nothing
    assert len(again.call("GET", "/servers/allServers").json()) == 3


def test_mysql_database_is_created_when_missing(mysql_store: StoreConfig,
                                                start_balancer: Any) -> None:
    lb = start_balancer(mysql_store)
    assert lb.call("GET", "/servers/allServers").json() == []
    conn = mysql_connect(mysql_store.database)
    with conn.cursor() as cursor:
        cursor.execute("SHOW TABLES")
        assert {row[0] for row in cursor.fetchall()} >= {"ollamaServers", "proxy"}
    conn.close()


@pytest.mark.parametrize("seed_tables", [False, True], ids=["new", "seed-upgrade"])
def test_a_latin1_database_holds_any_name_and_the_longest_secrets(
        mysql_store: StoreConfig, start_balancer: Any, seed_tables: bool) -> None:
    conn = mysql_connect()
    with conn.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{mysql_store.database}` CHARACTER SET latin1"
                       " COLLATE latin1_swedish_ci")
        if seed_tables:  # made by the seed on that database: latin1 tables
            cursor.execute(f"USE `{mysql_store.database}`")
            for statement in SEED_DDL:
                cursor.execute(statement)
    conn.close()
    secret_key = "a passphrase for the latin1 test"
    lb = start_balancer(mysql_store, env={"SECRET_KEY": secret_key})
    password, authorization = "🔑" * 255, "Bearer " + "ÿ" * 1017  # the longest allowed
    proxy_name, server_name = "代理-東京 🔑", "GPU-München-🚀"
    assert lb.call("POST", "/proxy/addProxy", {"name": proxy_name, "ip": "127.0.0.1",
                                               "port": 1080, "userName": "ünïcode",
                                               "password": password}).status == 200
    added = lb.add_server("http://127.0.0.1:9", name=server_name, authorization=authorization)
    assert added["name"] == server_name
    assert lb.call("GET", "/proxy/allProxies").json()[0]["name"] == proxy_name
    assert lb.call("GET", "/servers/allServers").json()[0]["name"] == server_name
    assert "Traceback" not in lb.log
    lb.stop()
    config = ob.load_config([], {**mysql_store.env(), "SECRET_KEY": secret_key})
    store = ob.open_store(config)
    try:
        (proxy,) = store.list_proxies()
        (server,) = store.list_servers()
        assert (proxy.password, proxy.user_name) == (password, "ünïcode")  # whole, not cut
        assert server.authorization == authorization
        collations = {str(c) for c, in store._rows(
            "SELECT DISTINCT COLLATION_NAME FROM information_schema.COLUMNS"
            " WHERE TABLE_SCHEMA = DATABASE() AND COLLATION_NAME IS NOT NULL")}
        assert collations == {"utf8mb4_bin"}
    finally:
        store.close()


def test_secret_columns_hold_the_longest_sealed_value() -> None:
    widths = {column: int(kind[8:-1]) for _, column, kind in ob.MYSQL_WIDENED_COLUMNS}
    box = ob.SecretBox(b"k" * 32)
    assert len(box.encrypt("🔑" * 255)) == ob.sealed_length(255 * 4) <= widths["password"]
    assert len(box.encrypt("ÿ" * 1024)) == ob.sealed_length(1024 * 2) <= widths["upstream_auth"]
    for _, column, kind in ob.MYSQL_WIDENED_COLUMNS:
        assert f"`{column}` {kind}" in ob.MYSQL_SCHEMA


class TcpRelay:
    """A TCP relay to MariaDB that the test can cut and restore, to play a database outage
    without touching the real server."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.frozen = False  # connections stay open, but nothing passes: a hung server
        self.pairs: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.pairs += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while self.frozen and self.up:
                    time.sleep(0.01)
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.up = False
        with self.lock:
            for sock in self.pairs:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.pairs.clear()

    def restore(self) -> None:
        self.up = True
        self.frozen = False

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_database_outage_keeps_passthrough_and_answers_admin_503(
        mysql_store: StoreConfig, start_balancer: Any, backend: FakeOllama) -> None:
    relay = TcpRelay(3306)
    try:
        lb = start_balancer(mysql_store, env={"DB_PORT": str(relay.port)})
        lb.add_server(backend.url)
        sid = lb.server_id()
        relay.cut()
        for method, path, body in (("GET", "/servers/allServers", None),
                                   ("POST", "/proxy/addProxy",
                                    {"ip": "127.0.0.1", "port": 1, "name": "x"}),
                                   ("GET", "/proxy/allProxies", None)):
            reply = lb.call(method, path, body)
            assert reply.status == 503, reply
            assert reply.json() == {"error": "database unavailable"}
        for _ in range(3):
            assert lb.call("GET", f"/servers/ollama/{sid}/api/version").status == 200
        assert lb.call("GET", "/servers/getServer").status == 200  # the ID is in memory
        relay.restore()
        lb.wait_for(lambda: lb.call("GET", "/servers/allServers").status == 200)
        assert lb.call("POST", "/proxy/addProxy",
                       {"ip": "127.0.0.1", "port": 1, "name": "x"}).status == 200
    finally:
        relay.close()


def test_a_hung_database_costs_each_call_its_timeout_and_never_stops_health_checks(
        mysql_store: StoreConfig, start_balancer: Any, make_backend: Any) -> None:
    relay = TcpRelay(3306)
    try:
        lb = start_balancer(mysql_store, "--health-interval", "0.3",
                            env={"DB_PORT": str(relay.port), "DB_TIMEOUT": "3"})
        stays, goes = make_backend(), make_backend()
        lb.add_server(stays.url)
        gone_id = lb.add_server(goes.url)["id"]
        relay.frozen = True  # not refusing: silent
        started = time.monotonic()
        replies: list[Any] = []
        calls = [threading.Thread(target=lambda: replies.append(
            lb.call("GET", "/proxy/allProxies", timeout=12))) for _ in range(4)]
        for thread in calls:
            thread.start()
        for thread in calls:
            thread.join(15)
        assert [r.status for r in replies] == [503] * 4, replies
        assert all(r.json() == {"error": "database unavailable"} for r in replies)
        assert time.monotonic() - started < 8  # side by side, not 4 x 30 s in a row
        # The catalog reads the change log first, but waits a second for it at most.
        started = time.monotonic()
        tags = lb.call("GET", "/api/tags", timeout=12)
        assert tags.status == 200 and len(tags.json()["models"]) == 1, tags
        assert time.monotonic() - started < 2.5  # UP_TO_DATE_WAIT, not DB_TIMEOUT
        goes.close()  # the health loop still notices, while the database hangs
        lb.wait_for(lambda: not next(s for s in lb.call("GET", "/servers/status").json()[
            "servers"] if s["id"] == gone_id)["reachable"])
        assert lb.call("POST", "/api/chat", {"model": "llama3", "messages": [],
                                             "stream": False}).status == 200
        relay.restore()
        lb.wait_for(lambda: lb.call("GET", "/proxy/allProxies").status == 200, timeout=20)
    finally:
        relay.close()


def test_mysql_connection_killed_by_the_server_is_reopened(
        mysql_store: StoreConfig, start_balancer: Any) -> None:
    lb = start_balancer(mysql_store)
    assert lb.call("GET", "/servers/allServers").status == 200
    conn = mysql_connect()
    with conn.cursor() as cursor:
        cursor.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s",
                       [mysql_store.database])
        for (thread_id,) in cursor.fetchall():
            cursor.execute(f"KILL {int(thread_id)}")
    conn.close()
    assert lb.call("POST", "/servers/addServer", {"host": "h.invalid"}).status == 201


def test_missing_pymysql_names_the_package(mysql_store: StoreConfig, tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "pymysql.py").write_text("raise ImportError('hidden for the test')\n")
    env = {"PYTHONPATH": str(shadow), **mysql_store.env(), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, str(ROOT / "ollamabalancer.py"), "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "pip install pymysql" in done.stderr


def test_runs_on_the_standard_library_alone(tmp_path: Path, backend: FakeOllama) -> None:
    # -S leaves site-packages out: no pymysql, no python-socks, nothing but the stdlib.
    proc = subprocess.Popen(
        [sys.executable, "-S", str(ROOT / "ollamabalancer.py"), "--ip", "127.0.0.1",
         "--port", "0", "--db-path", str(tmp_path / "alone.db")],
        stderr=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"})
    try:
        assert proc.stderr is not None
        port = 0
        for line in proc.stderr:
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found.group(1))
                break
        from conftest import call

        reply = call(port, "POST", "/servers/addServer", {"url": backend.url})
        assert reply.status == 201 and reply.json()["reachable"] is True
        assert call(port, "GET", "/servers/ollama/1/api/version").status == 200
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize(
    ("env", "message"),
    [({"PORT": "abc"}, "PORT='abc'"), ({"DB_ENGINE": "oracle"}, "DB_ENGINE='oracle'"),
     ({"HEALTH_INTERVAL": "-1"}, "HEALTH_INTERVAL='-1'")],
)
def test_bad_settings_exit_non_zero_with_one_line(env: dict[str, str], message: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "ollamabalancer.py")],
                          env={"PATH": "/usr/bin:/bin", **env}, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_help_lists_every_setting() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "ollamabalancer.py"), "--help"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    for env, flag, *_ in ob.SETTINGS:
        assert env in done.stdout and flag in done.stdout


def test_db_engine_defaults_to_mysql_when_db_host_is_set() -> None:
    assert ob.load_config([], {"DB_HOST": "db"}).db_engine == "mysql"
    assert ob.load_config([], {}).db_engine == "sqlite"
    assert ob.load_config(["--db-engine", "sqlite"], {"DB_HOST": "db"}).db_engine == "sqlite"


def test_help_says_what_a_new_server_is_counted_on_for() -> None:
    """The defaults --help gives for NUM_PARALLEL, MAX_LOADED_MODELS and MAX_CONCURRENCY
    are the ones the scheduler uses for a server it knows nothing of."""
    done = subprocess.run([sys.executable, str(ROOT / "ollamabalancer.py"), "--help"],
                          capture_output=True, text=True, timeout=30)
    text = " ".join(done.stdout.split())
    scheduler = ob.Scheduler(ob.Config())
    new = ob.Server(1, "h", 11434, reachable=True)
    ranking = scheduler.ranking
    parallel, resident = ranking.parallel_known(new), ranking.resident_known(new)
    assert (parallel[1], resident[1]) == ("guessed", "guessed")
    assert f"learned per server, {parallel[0]} until more is seen" in text
    assert f"learned per server, {resident[0]} until more is seen" in text
    assert f"{scheduler.ranking.capacity(new)} before anything is" in text


def test_a_balancer_prunes_the_change_log_to_its_last_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every instance keeps the change log short: at least once a minute (here sped up)
    all but the last CHANGE_LOG_KEPT rows go."""
    monkeypatch.setattr(ob, "CHANGE_LOG_KEPT", 3)
    monkeypatch.setattr(ob, "CHANGE_PRUNE_INTERVAL", 0.05, raising=False)
    config = ob.Config(db_engine="sqlite", db_path=str(tmp_path / "log.db"),
                       sync_interval=0.05)
    rows: list[int] = []

    tables = ob.SQLiteStore(config.db_path, 5.0)
    tables.connect()
    tables.migrate()
    for index in range(10):
        tables.add_key({"name": f"k{index}", "key_hash": f"{index:064x}"})

    async def scenario() -> None:
        app = ob.Balancer(config, ob.AsyncStore(tables))
        loop = asyncio.ensure_future(app.fleet.sync_loop())
        await asyncio.sleep(0.5)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await app.close()

    asyncio.run(scenario())
    rows.append(tables.change_mark(0)[1])  # the rows left
    tables.close()
    assert rows == [3]
