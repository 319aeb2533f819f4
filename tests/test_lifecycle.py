"""Graceful shutdown: SIGTERM lets streams in flight finish, then the process exits 0."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
from typing import Any

from conftest import BalancerProcess, StoreConfig
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
    assert "cutting 1 unfinished requests" in lb.log
