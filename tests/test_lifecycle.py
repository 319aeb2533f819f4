"""Graceful shutdown: SIGTERM lets streams in flight finish, then the process exits 0."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import ROOT, BalancerProcess, StoreConfig
from fakeollama import FakeOllama


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_sigterm_lets_a_stream_finish_then_closes_the_port(
        start_balancer: Any, sqlite_store: StoreConfig, backend: FakeOllama) -> None:
    lb: BalancerProcess = start_balancer(sqlite_store)
    lb.add_server(backend.url)
    sid = lb.server_id()
    idle = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    idle.request("GET", "/api/version")
    idle.getresponse().read()  # an idle keep-alive connection, closed at once on drain
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    conn.request("GET", f"/servers/ollama/{sid}/gated?n=3")
    backend.release()
    response = conn.getresponse()
    assert json.loads(response.readline()) == {"n": 0}
    lb.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while port_open(lb.port):
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.05)
    for index in (1, 2):
        backend.release()
        assert json.loads(response.readline()) == {"n": index}
    assert response.read() == b""  # the stream ended properly, final chunk and all
    assert lb.proc.wait(10) == 0
    lb.stop()  # reads the rest of its log
    assert "draining" in lb.log


def test_drain_timeout_cuts_what_does_not_finish(start_balancer: Any,
                                                 sqlite_store: StoreConfig,
                                                 backend: FakeOllama) -> None:
    lb: BalancerProcess = start_balancer(sqlite_store, "--drain-timeout", "0.5")
    lb.add_server(backend.url)
    sid = lb.server_id()
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    conn.request("GET", f"/servers/ollama/{sid}/slow")
    response = conn.getresponse()
    response.readline()
    started = time.monotonic()
    lb.proc.send_signal(signal.SIGTERM)
    assert lb.proc.wait(10) == 0
    assert time.monotonic() - started < 5
    assert backend.disconnected.wait(5)
    lb.stop()  # reads the rest of its log
    assert "cutting 1 unfinished requests" in lb.log


def start_with_open_files(where: Path, limit: int, *args: str) -> list[str]:
    """The balancer's log up to "listening on", started with RLIMIT_NOFILE at ``limit``."""
    script = ("import resource, runpy, sys; "
              f"resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit})); "
              f"sys.argv = ['ollamabalancer', '--ip', '127.0.0.1', '--port', '0', *{args!r}]; "
              f"runpy.run_path({str(ROOT / 'ollamabalancer.py')!r}, run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "MAX_"))}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=where)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                break
    finally:
        proc.terminate()
        proc.wait(10)
    return lines


def test_the_open_file_limit_is_a_warning_only_when_a_configured_cap_needs_more(
        tmp_path: Path) -> None:
    quiet = start_with_open_files(tmp_path, 1024)  # a tiny deployment on defaults: no alarm
    assert not [line for line in quiet if "open files are limited" in line], quiet
    loud = start_with_open_files(tmp_path, 1024, "--max-connections", "5000")
    said = [line for line in loud if "open files are limited" in line]
    assert said and " WARNING " in said[0], loud
    enough = start_with_open_files(tmp_path, 1024, "--max-connections", "400")
    assert not [line for line in enough if "open files are limited" in line]


def test_startup_says_one_summary_line_and_only_warnings_that_need_action(
        tmp_path: Path) -> None:
    lines = start_with_open_files(tmp_path, 4096)
    info = [line for line in lines if " INFO " in line]
    assert len(info) <= 2, lines  # the summary (and a new key file's, the first time)
    summary = next(line for line in info if "listening on http://" in line)
    for part in ("store sqlite", "0 servers (0 up)", "management: clients on this host",
                 "model changes: clients on this host", "Ollama endpoints: anyone"):
        assert part in summary, summary
    assert not [line for line in lines if " WARNING " in line]  # on loopback: nothing to do
