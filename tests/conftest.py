"""Fixtures: the balancer as a real process, fake Ollama backends, real proxies, MariaDB.

Tests that need MySQL, microsocks or tinyproxy skip with a reason when those are missing,
unless OLLAMABALANCER_REQUIRE_ALL=1 (set by .ci/run), which turns the skips into failures.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fakeollama import FakeOllama

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_ALL = os.environ.get("OLLAMABALANCER_REQUIRE_ALL") == "1"
MYSQL = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}
#: The addresses the test proxies connect from: what a backend sees of a tunnel.
SOCKS_SOURCE, HTTP_PROXY_SOURCE = "127.0.0.3", "127.0.0.4"


def unavailable(reason: str) -> None:
    """Skips the test, or fails it where every dependency is required (CI)."""
    if REQUIRE_ALL:
        pytest.fail(f"{reason} (OLLAMABALANCER_REQUIRE_ALL=1 forbids skipping)")
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str) -> Any:
    """The module, imported; when missing, the test skips, or fails under REQUIRE_ALL
    (what pytest.importorskip would skip silently with exit 0)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        unavailable(f"the {name} package is not installed (pip install '.[test]')")


# -- HTTP helpers -------------------------------------------------------------------------


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:200]!r})"


def call(port: int, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 15) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        fields = dict(headers or {})
        if body is not None:  # as curl -H 'Content-Type: application/json' would send
            fields.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=fields)
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Sends bytes on a fresh connection and returns everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                piece = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not piece:
                break
            received += piece
        return bytes(received)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the balancer process -------------------------------------------------------------------


#: Every balancer process started, with the test that started it: a failing test shows
#: the log of each one it started and of each still running (pytest_runtest_makereport).
STARTED: list[tuple[str, BalancerProcess]] = []
CURRENT_TEST = [""]


class BalancerProcess:
    def __init__(self, env: dict[str, str], args: list[str]) -> None:
        STARTED.append((CURRENT_TEST[0], self))
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "ollamabalancer.py"), "--ip", "127.0.0.1",
             "--port", "0", *args],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            match = next((re.search(r"listening on https?://127\.0\.0\.1:(\d+)", line)
                          for line in list(self.lines) if "listening on" in line), None)
            if match:
                self.port = int(match.group(1))
                return
            if self.proc.poll() is not None:
                self._reader.join(2)
                raise RuntimeError("balancer exited:\n" + self.log)
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("balancer did not start:\n" + self.log)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Reply:
        return call(self.port, method, path, body, **kwargs)

    def add_server(self, url: str, **fields: Any) -> dict[str, Any]:
        reply = self.call("POST", "/servers/addServer", {"url": url, **fields})
        assert reply.status == 201, reply
        return dict(reply.json())

    def add_proxy(self, **fields: Any) -> int:
        reply = self.call("POST", "/proxy/addProxy", fields)
        assert reply.status == 200 and reply.json() is True, reply
        listing = self.call("GET", "/proxy/allProxies").json()
        return int(max(p["id"] for p in listing if p["name"] == fields["name"]))

    def server_id(self, **query: str) -> str:
        from urllib.parse import urlencode

        reply = self.call("GET", "/servers/getServer?" + urlencode(query))
        assert reply.status == 200, reply
        return reply.text

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError("condition not met in time; log:\n" + self.log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(2)


class StoreConfig:
    """Where a balancer keeps its data: one SQLite file or one fresh MySQL database."""

    def __init__(self, engine: str, tmp: Path) -> None:
        self.engine = engine
        self.database = f"obtest_{secrets.token_hex(4)}"
        self.path = tmp / "balancer.db"

    def execute(self, sql: str) -> None:
        """Runs ``sql`` on the store's database as an outside writer would (a hand-made
        row, a damaged one)."""
        if self.engine == "sqlite":
            import sqlite3

            with contextlib.closing(sqlite3.connect(self.path)) as conn, conn:
                conn.execute(sql)
            return
        conn = mysql_connect(self.database)
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql)
        finally:
            conn.close()

    def env(self) -> dict[str, str]:
        if self.engine == "sqlite":
            return {"DB_ENGINE": "sqlite", "DB_PATH": str(self.path)}
        return {"DB_ENGINE": "mysql", "DB_HOST": MYSQL["host"], "DB_PORT": str(MYSQL["port"]),
                "DB_USERNAME": MYSQL["user"], "DB_PASSWORD": MYSQL["password"],
                "DB_DATABASE": self.database}


def mysql_connect(database: str | None = None) -> Any:
    try:
        import pymysql
    except ImportError:
        unavailable("pymysql is not installed")
    try:
        return pymysql.connect(host=MYSQL["host"], port=MYSQL["port"], user=MYSQL["user"],
                               password=MYSQL["password"], database=database, autocommit=True,
                               connect_timeout=3)
    except pymysql.err.MySQLError as exc:
        unavailable(f"no MySQL server on 127.0.0.1:3306: {exc}")


def drop_database(name: str) -> None:
    conn = mysql_connect()
    with conn.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


@pytest.fixture(params=["sqlite", "mysql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreConfig]:
    config = StoreConfig(request.param, tmp_path)
    if config.engine == "mysql":
        mysql_connect().close()
    yield config
    if config.engine == "mysql":
        drop_database(config.database)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> StoreConfig:
    return StoreConfig("sqlite", tmp_path)


@pytest.fixture
def start_workers(start_balancer: Any, sqlite_store: StoreConfig, tmp_path: Path) -> Any:
    """A way to start two workers (WORKERS=2) on SQLite, with no health round in the
    test's time; their shared directory goes under the test's own TMPDIR."""
    def start(*args: str) -> BalancerProcess:
        (tmp_path / "tmp").mkdir(exist_ok=True)
        process: BalancerProcess = start_balancer(
            sqlite_store, "--workers", "2", "--health-interval", "600", *args,
            env={"TMPDIR": str(tmp_path / "tmp")})
        return process

    return start


@pytest.fixture
def event_loop_name() -> str:
    """The balancer's event loop: asyncio's own, what runs with the standard library
    alone. Modules about the relay run on uvloop as well (``both_event_loops``)."""
    return "asyncio"


def both_event_loops(request: pytest.FixtureRequest) -> str:
    """An ``event_loop_name`` fixture body for modules whose every test should run on
    asyncio's loop and on uvloop (the optional ``fast`` extra)."""
    if request.param == "uvloop" and importlib.util.find_spec("uvloop") is None:
        unavailable("uvloop is not installed")
    return str(request.param)


@pytest.fixture
def start_balancer(event_loop_name: str) -> Iterator[Any]:
    started: list[BalancerProcess] = []

    def start(store: StoreConfig, *args: str, env: dict[str, str] | None = None
              ) -> BalancerProcess:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "OLLAMA"))}
        full_env.update(store.env())
        full_env.update(env or {})
        process = BalancerProcess(full_env, ["--health-interval", "0.5", "--drain-timeout", "2",
                                             "--event-loop", event_loop_name, *args])
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def balancer(start_balancer: Any, sqlite_store: StoreConfig) -> BalancerProcess:
    """A balancer on SQLite, for tests about HTTP rather than the store."""
    return start_balancer(sqlite_store)  # type: ignore[no-any-return]


@pytest.fixture
def backend() -> Iterator[FakeOllama]:
    fake = FakeOllama()
    yield fake
    fake.close()


@pytest.fixture
def make_backend() -> Iterator[Any]:
    made: list[FakeOllama] = []

    def make(**kwargs: Any) -> FakeOllama:
        fake = FakeOllama(**kwargs)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.close()


# -- a real browser ----------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def chromium(*args: str) -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        unavailable("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout



# -- real proxies -------------------------------------------------------------------------


def _wait_listening(port: int, proc: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on {port}")


@pytest.fixture
def microsocks() -> Iterator[tuple[int, str, str]]:
    binary = shutil.which("microsocks")
    if binary is None:
        unavailable("microsocks is not installed (apt-get install microsocks)")
    user, password = "sockuser", "s3cret-" + secrets.token_hex(4)
    port = free_port()
    # Its outgoing connections come from 127.0.0.3, so a backend can tell a request that
    # came through it (``peer`` in FakeOllama's records) from one that came direct.
    proc = subprocess.Popen([binary, "-i", "127.0.0.1", "-p", str(port), "-u", user,
                             "-P", password, "-b", SOCKS_SOURCE], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc, "microsocks")
        yield port, user, password
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[tuple[int, str, str]]:
    binary = shutil.which("tinyproxy")
    if binary is None:
        unavailable("tinyproxy is not installed (apt-get install tinyproxy)")
    user, password = "httpuser", "p4ss-" + secrets.token_hex(4)
    port = free_port()
    conf = tmp_path / "tinyproxy.conf"
    # No ConnectPort line: CONNECT is allowed to every port (Ollama listens on 11434).
    conf.write_text(
        f"Port {port}\nListen 127.0.0.1\nBind {HTTP_PROXY_SOURCE}\nTimeout 60\nMaxClients 50\n"
        "Allow 127.0.0.1\n"
        f"BasicAuth {user} {password}\nLogLevel Critical\n"
        + ("User root\nGroup root\n" if os.geteuid() == 0 else "")
    )
    proc = subprocess.Popen([binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc, "tinyproxy")
        yield port, user, password
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.fixture
def tmpdir_path() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


# -- the unit subset: pytest -m unit ---------------------------------------------------------

#: Fixtures that start a process, a server or a database: a test that asks for none of them
#: (nor starts a process itself) is a unit test, run by ``pytest -m unit`` in seconds.
END_TO_END_FIXTURES = frozenset({
    "start_balancer", "balancer", "backend", "make_backend", "microsocks", "tinyproxy",
    "store", "sqlite_store", "mysql_store", "fleet", "routed", "scripted", "pair", "client",
    "fuzzed", "attack_site", "group"})
STARTS_A_PROCESS = re.compile(r"\b(subprocess|Popen|chromium|BalancerProcess|FakeOllama|"
                              r"mysql_connect|cli)\(|subprocess\.")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unit: in-process, no servers or processes started "
                            "(pytest -m unit: the edit loop's subset)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    import inspect

    for item in items:
        function = getattr(item, "function", None)
        fixtures = set(getattr(item, "fixturenames", ()))
        if function is None or fixtures & END_TO_END_FIXTURES:
            continue
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError):
            continue
        if not STARTS_A_PROCESS.search(source):
            item.add_marker(pytest.mark.unit)


# -- a failing end-to-end test shows what its balancers logged ---------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    CURRENT_TEST[0] = item.nodeid


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for index, (test, process) in enumerate(STARTED):
        if test == item.nodeid or process.proc.poll() is None:
            log = process.log
            report.sections.append((f"balancer {index} (pid {process.proc.pid}) log",
                                    log[-20_000:] if log else "(nothing)"))
