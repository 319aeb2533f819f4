"""Relaying and health checks through real proxies: microsocks (SOCKS5) and tinyproxy
(HTTP CONNECT), each with right and wrong credentials."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from conftest import HTTP_PROXY_SOURCE, SOCKS_SOURCE, BalancerProcess
from fakeollama import FakeOllama


@pytest.mark.parametrize("protocol", ["socks5", "socks5h"])
def test_relay_through_socks5_with_credentials(
        balancer: BalancerProcess, backend: FakeOllama, microsocks: tuple[int, str, str],
        protocol: str) -> None:
    port, user, password = microsocks
    balancer.add_server(backend.url)
    proxy_id = balancer.add_proxy(name="socks", ip="127.0.0.1", port=port, protocol=protocol,
                                  userName=user, password=password)
    sid = balancer.server_id(proxy=str(proxy_id))
    reply = balancer.call("POST", f"/servers/ollama/{sid}/echo", raw=b"via socks")
    assert reply.status == 200 and reply.body == b"via socks"
    assert password not in balancer.log


def test_wrong_socks_credentials_answer_502(
        balancer: BalancerProcess, backend: FakeOllama, microsocks: tuple[int, str, str]
) -> None:
    port, user, _ = microsocks
    balancer.add_server(backend.url)
    proxy_id = balancer.add_proxy(name="socks-bad", ip="127.0.0.1", port=port,
                                  protocol="socks5", userName=user, password="wrong")
    sid = balancer.server_id(proxy=str(proxy_id))
    reply = balancer.call("GET", f"/servers/ollama/{sid}/api/version")
    assert reply.status == 502
    assert "socks-bad" in reply.json()["error"]
    assert "wrong" not in reply.json()["error"]


def test_relay_through_http_connect_with_basic_auth(
        balancer: BalancerProcess, backend: FakeOllama, tinyproxy: tuple[int, str, str]
) -> None:
    port, user, password = tinyproxy
    balancer.add_server(backend.url)
    proxy_id = balancer.add_proxy(name="tiny", ip="127.0.0.1", port=port, protocol="http",
                                  userName=user, password=password)
    sid = balancer.server_id(proxy=str(proxy_id))
    for _ in range(3):  # the tunnel is kept alive and reused
        reply = balancer.call("POST", f"/servers/ollama/{sid}/api/chat",
                              {"model": "llama3", "messages": [], "stream": True})
        assert reply.status == 200
        assert b'"done": true' in reply.body


def test_wrong_http_proxy_credentials_answer_502_naming_the_proxy_status(
        balancer: BalancerProcess, backend: FakeOllama, tinyproxy: tuple[int, str, str]
) -> None:
    port, user, _ = tinyproxy
    balancer.add_server(backend.url)
    proxy_id = balancer.add_proxy(name="tiny-bad", ip="127.0.0.1", port=port,
                                  userName=user, password="wrong")
    sid = balancer.server_id(proxy=str(proxy_id))
    reply = balancer.call("GET", f"/servers/ollama/{sid}/api/version")
    assert reply.status == 502
    # tinyproxy 1.11 answers a bad CONNECT login with 401 where RFC 9110 says 407.
    assert re.search(r"refused CONNECT to [0-9.:]+: 40[17] ", reply.json()["error"])


@pytest.mark.parametrize("which", ["socks", "http"])
def test_health_checks_go_through_the_servers_own_proxy(
        balancer: BalancerProcess, backend: FakeOllama, microsocks: tuple[int, str, str],
        tinyproxy: tuple[int, str, str], which: str) -> None:
    port, user, password = microsocks if which == "socks" else tinyproxy
    protocol = "socks5" if which == "socks" else "http"
    good = balancer.add_proxy(name="good", ip="127.0.0.1", port=port, protocol=protocol,
                              userName=user, password=password)
    bad = balancer.add_proxy(name="bad", ip="127.0.0.1", port=port, protocol=protocol,
                             userName=user, password="nope")
    server = balancer.add_server(backend.url, proxyId=bad)
    assert server["reachable"] is False
    assert "bad" in balancer.call("GET", f"/servers/{server['id']}").json()["lastError"]
    patched = balancer.call("PATCH", f"/servers/{server['id']}", {"proxyId": good})
    assert patched.json()["reachable"] is True
    # Relaying by the server's numeric id uses its own proxy too.
    reply = balancer.call("GET", f"/servers/ollama/{server['id']}/api/version")
    assert reply.status == 200


def test_proxy_that_refuses_connections_answers_502(balancer: BalancerProcess,
                                                    backend: FakeOllama) -> None:
    from conftest import free_port

    balancer.add_server(backend.url)
    for protocol in ("http", "socks5"):
        proxy_id = balancer.add_proxy(name=f"dead-{protocol}", ip="127.0.0.1",
                                      port=free_port(), protocol=protocol)
        sid = balancer.server_id(proxy=str(proxy_id))
        reply = balancer.call("GET", f"/servers/ollama/{sid}/api/version")
        assert reply.status == 502, reply
        assert f"dead-{protocol}" in reply.json()["error"]


def test_missing_python_socks_names_the_package(start_balancer: Any, sqlite_store: Any,
                                                backend: FakeOllama, tmp_path: Any,
                                                microsocks: tuple[int, str, str]) -> None:
    """A SOCKS proxy stored while python-socks was there, used once it is gone: the
    answer names the package (a new one is refused at once: see below)."""
    with_socks = start_balancer(sqlite_store)
    with_socks.add_server(backend.url)
    proxy_id = with_socks.add_proxy(name="s", ip="127.0.0.1", port=microsocks[0],
                                    protocol="socks5")
    with_socks.stop()
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "python_socks.py").write_text("raise ImportError('hidden for the test')\n")
    lb = start_balancer(sqlite_store, env={"PYTHONPATH": str(shadow)})
    sid = lb.server_id(proxy=str(proxy_id))
    reply = lb.call("GET", f"/servers/ollama/{sid}/api/version")
    assert reply.status == 502
    assert "pip install python-socks" in reply.json()["error"]


def test_a_server_with_a_proxy_is_reached_through_it_by_id_and_from_the_root(
        balancer: BalancerProcess, backend: FakeOllama, microsocks: tuple[int, str, str],
        tinyproxy: tuple[int, str, str]) -> None:
    """The server's own proxyId is used whichever way a request comes: its numeric id, a
    getServer ID made without a proxy, and the Ollama root. The backend tells: a tunnel's
    connections come from the proxy's source address, not the balancer's."""
    for (port, user, password), protocol, source in (
            (microsocks, "socks5", SOCKS_SOURCE), (tinyproxy, "http", HTTP_PROXY_SOURCE)):
        proxy_id = balancer.add_proxy(name=protocol, ip="127.0.0.1", port=port,
                                      protocol=protocol, userName=user, password=password)
        if protocol == "socks5":
            server_id = balancer.add_server(backend.url, proxyId=proxy_id)["id"]
        else:
            assert balancer.call("PATCH", f"/servers/{server_id}",
                                 {"proxyId": proxy_id}).status == 200
        sid = balancer.server_id()  # no proxy asked for: the server's own
        for path, body, marker in (
                (f"/servers/ollama/{server_id}/echo", None, f"by-id-{protocol}"),
                (f"/servers/ollama/{sid}/echo", None, f"by-handle-{protocol}"),
                ("/api/chat", {"model": "llama3", "messages": [], "stream": False,
                               "marker": f"root-{protocol}"}, f"root-{protocol}")):
            reply = balancer.call("POST", path, body, raw=None if body else marker.encode())
            assert reply.status == 200, reply
            (seen,) = [r for r in backend.requests if marker.encode() in r["body"]]
            assert seen["peer"] == source, (path, seen["peer"])


def test_a_socks_proxy_is_refused_while_python_socks_is_missing(
        start_balancer: Any, sqlite_store: Any, tmp_path: Path) -> None:
    hidden = tmp_path / "python_socks"
    hidden.mkdir()
    (hidden / "__init__.py").write_text("raise ImportError('not installed here')\n")
    lb = start_balancer(sqlite_store, env={"PYTHONPATH": str(tmp_path)})
    socks = lb.call("POST", "/proxy/addProxy", {"name": "s", "ip": "127.0.0.1", "port": 1080,
                                                "protocol": "socks5"})
    assert socks.status == 400 and "pip install python-socks" in socks.json()["error"]
    assert lb.call("GET", "/proxy/allProxies").json() == []
    assert lb.call("POST", "/proxy/addProxy", {"name": "h", "ip": "127.0.0.1", "port": 3128,
                                               "protocol": "http"}).status == 200
    proxy_id = lb.call("GET", "/proxy/allProxies").json()[0]["id"]
    assert lb.call("PATCH", f"/proxy/{proxy_id}", {"protocol": "socks5h"}).status == 400
