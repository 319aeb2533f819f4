"""/servers/ollama/<id>/...: byte-exact streaming relay, errors, and HTTP/1.1 strictness."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from conftest import BalancerProcess, both_event_loops, free_port, raw_exchange
from fakeollama import FakeOllama

import ollamabalancer as ob

#: Every test here runs on both event loops.
event_loop_name = pytest.fixture(params=["asyncio", "uvloop"])(both_event_loops)


@pytest.fixture
def routed(balancer: BalancerProcess, backend: FakeOllama) -> tuple[BalancerProcess, str]:
    balancer.add_server(backend.url)
    return balancer, balancer.server_id()


def test_body_is_relayed_byte_for_byte_both_ways(routed: tuple[BalancerProcess, str],
                                                 backend: FakeOllama) -> None:
    lb, sid = routed
    payload = bytes(range(256)) * 4096 + b'{"model": "x",  "odd spacing" : 1}'
    reply = lb.call("POST", f"/servers/ollama/{sid}/echo?a=1&b=%20x", raw=payload,
                    headers={"Content-Type": "application/octet-stream", "X-Custom": "kept"})
    assert reply.status == 200
    assert reply.body == payload
    received = backend.requests[-1]
    assert received["body"] == payload
    assert received["query"] == "a=1&b=%20x"
    assert received["headers"]["X-Custom"] == "kept"


def test_chunked_request_body_is_reframed_and_relayed(routed: tuple[BalancerProcess, str],
                                                      backend: FakeOllama) -> None:
    lb, sid = routed
    request = (f"POST /servers/ollama/{sid}/echo HTTP/1.1\r\nHost: lb\r\n"
               "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").encode()
    answer = raw_exchange(lb.port, request)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"hello world")
    assert backend.requests[-1]["body"] == b"hello world"


def test_serverid_query_form_is_forwarded_without_serverid(
        routed: tuple[BalancerProcess, str], backend: FakeOllama) -> None:
    lb, sid = routed
    reply = lb.call("POST", f"/servers/ollama/echo?x=1&serverId={sid}&y=2", raw=b"abc")
    assert reply.status == 200 and reply.body == b"abc"
    assert backend.requests[-1]["query"] == "x=1&y=2"


def test_numeric_database_id_also_routes(balancer: BalancerProcess, backend: FakeOllama) -> None:
    server = balancer.add_server(backend.url)
    reply = balancer.call("GET", f"/servers/ollama/{server['id']}/api/version")
    assert reply.status == 200 and reply.json() == {"version": "0.12.0"}


def test_status_code_and_error_body_are_kept(routed: tuple[BalancerProcess, str]) -> None:
    lb, sid = routed
    for status in (404, 418, 500, 503):
        reply = lb.call("POST", f"/servers/ollama/{sid}/status/{status}", raw=b"{}")
        assert reply.status == status
        assert reply.json() == {"error": f"status {status} as asked"}


def test_hop_by_hop_headers_are_stripped_and_host_is_the_upstreams(
        routed: tuple[BalancerProcess, str], backend: FakeOllama) -> None:
    lb, sid = routed
    reply = lb.call("POST", f"/servers/ollama/{sid}/echo", raw=b"x", headers={
        "Connection": "keep-alive, X-Custom", "X-Custom": "hop", "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==", "X-Forwarded-For": "10.9.9.9",
        "Origin": "http://localhost:3000",  # allowed, answered here, never sent on
    })
    assert reply.status == 200
    # Exactly these, in this order: Host first, each once, the end-to-end ones as sent.
    sent = [name.lower() for name, _ in backend.requests[-1]["header_list"]]
    assert sent[0] == "host" and "origin" not in sent
    assert sorted(sent) == sorted(set(sent))
    assert set(sent) >= {"host", "content-length", "x-forwarded-for"}
    headers = {k.lower(): v for k, v in backend.requests[-1]["headers"].items()}
    assert headers["host"] == f"127.0.0.1:{backend.port}"
    assert "x-custom" not in headers  # named in Connection: hop-by-hop
    assert "keep-alive" not in headers
    assert "proxy-authorization" not in headers
    assert headers["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
    assert reply.headers["X-Upstream"] == "fake"


def test_each_chunk_reaches_the_client_before_the_next_is_sent(
        routed: tuple[BalancerProcess, str], backend: FakeOllama) -> None:
    lb, sid = routed
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    conn.request("GET", f"/servers/ollama/{sid}/gated?n=4")
    backend.release()  # the first chunk goes out only once released
    response = conn.getresponse()
    assert response.status == 200
    assert response.headers["Transfer-Encoding"] == "chunked"
    for index in range(4):
        line = response.readline()
        assert json.loads(line) == {"n": index}
        if index < 3:
            backend.release()  # chunk N+1 only after the client received chunk N
    assert response.read() == b""
    conn.close()


def test_ndjson_stream_arrives_unchanged(routed: tuple[BalancerProcess, str]) -> None:
    lb, sid = routed
    reply = lb.call("POST", f"/servers/ollama/{sid}/api/chat",
                    {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/x-ndjson"
    lines = reply.body.decode().splitlines()
    assert len(lines) == 6 and all(json.loads(line) for line in lines)
    assert json.loads(lines[-1])["done"] is True


def test_sse_stream_arrives_unchanged(routed: tuple[BalancerProcess, str]) -> None:
    lb, sid = routed
    reply = lb.call("POST", f"/servers/ollama/{sid}/v1/chat/completions",
                    {"model": "llama3", "stream": True, "messages": []})
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/event-stream"
    assert reply.body.endswith(b"data: [DONE]\n\n")
    assert reply.body.count(b"data: ") == 7  # five words, the finish, [DONE]


def ask_for_a_flood(lb: BalancerProcess, server_id: str) -> socket.socket:
    """A client, with a small receive buffer, that asks server ``server_id`` for 64 MiB
    and has read nothing of it yet."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", lb.port))
    sock.sendall(f"GET /servers/ollama/{server_id}/flood?mib=64 HTTP/1.1\r\nHost: lb\r\n\r\n"
                 .encode())
    return sock


def test_a_client_that_stops_reading_stops_the_upstream_too(
        routed: tuple[BalancerProcess, str], backend: FakeOllama) -> None:
    """Flow control end to end: while the client reads nothing, the balancer stops reading
    the server (which then blocks) instead of buffering the answer; once the client reads
    again, every byte arrives."""
    lb, sid = routed
    total = 64 * 1024 * 1024
    sock = ask_for_a_flood(lb, sid)
    time.sleep(1.5)  # reading nothing
    stalled = backend.flood_sent
    time.sleep(0.5)
    assert backend.flood_sent == stalled, "the server was still being read"
    assert stalled < total // 4, f"{stalled} bytes were taken in for a client reading none"
    received = 0
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(65536)
    received = len(head) - head.index(b"\r\n\r\n") - 4
    assert head.startswith(b"HTTP/1.1 200 ") and f"Content-Length: {total}".encode() in head
    while received < total:
        piece = sock.recv(1 << 20)
        assert piece, f"closed after {received} of {total} bytes"
        received += len(piece)
    assert received == total
    sock.close()


def test_client_disconnect_closes_the_upstream_at_once(
        routed: tuple[BalancerProcess, str], backend: FakeOllama) -> None:
    lb, sid = routed
    sock = socket.create_connection(("127.0.0.1", lb.port), timeout=5)
    sock.sendall(f"GET /servers/ollama/{sid}/slow HTTP/1.1\r\nHost: lb\r\n\r\n".encode())
    assert b"200 OK" in sock.recv(4096)
    started = time.monotonic()
    sock.close()
    assert backend.disconnected.wait(5), "the upstream kept streaming to nobody"
    assert time.monotonic() - started < 2


def test_a_client_that_leaves_mid_answer_is_logged_with_what_it_was_sent(
        start_balancer: Any, sqlite_store: Any, backend: FakeOllama) -> None:
    """Its answer began: the access log and the metrics keep its status and server (and
    the server is not blamed for the stream it had to drop)."""
    lb = start_balancer(sqlite_store, env={"LOG_FORMAT": "json"})
    lb.add_server(backend.url, name="gpu-slow")
    sid = lb.server_id()
    sock = socket.create_connection(("127.0.0.1", lb.port), timeout=5)
    sock.sendall(f"GET /servers/ollama/{sid}/slow HTTP/1.1\r\nHost: lb\r\n\r\n".encode())
    assert b"200 OK" in sock.recv(4096)
    sock.close()
    assert backend.disconnected.wait(5)
    lb.wait_for(lambda: any(line["path"].endswith("/slow") for line in access_lines(lb)))
    line = next(line for line in access_lines(lb) if line["path"].endswith("/slow"))
    assert (line["status"], line["server"]) == (200, "gpu-slow") and line["bytes_out"] > 0
    metrics = lb.call("GET", "/metrics").text
    assert 'server="gpu-slow"' in metrics and "upstream_errors_total{" not in metrics


def test_client_leaving_before_the_first_byte_closes_the_upstream(
        routed: tuple[BalancerProcess, str], backend: FakeOllama) -> None:
    lb, sid = routed
    sock = socket.create_connection(("127.0.0.1", lb.port), timeout=5)
    sock.sendall(f"POST /servers/ollama/{sid}/hang HTTP/1.1\r\nHost: lb\r\n"
                 "Content-Length: 2\r\n\r\n{}".encode())
    deadline = time.monotonic() + 5
    while not any(r["path"] == "/hang" for r in backend.requests):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    sock.close()
    assert backend.disconnected.wait(3), "the upstream kept loading for nobody"
    assert lb.call("GET", f"/servers/ollama/{sid}/api/version").status == 200


def test_upstream_keep_alive_connection_is_reused(routed: tuple[BalancerProcess, str],
                                                  backend: FakeOllama) -> None:
    lb, sid = routed
    lb.call("GET", f"/servers/ollama/{sid}/api/version")
    before = backend.connections
    for _ in range(5):
        assert lb.call("GET", f"/servers/ollama/{sid}/api/version").status == 200
    assert backend.connections == before


def read_request(conn: socket.socket, buffered: bytes = b"") -> tuple[bytes, bytes] | None:
    """One request from ``conn``, head and Content-Length body, after what was ``buffered``:
    (the request, what came after it), or None if the peer closed first."""
    while b"\r\n\r\n" not in buffered:
        piece = conn.recv(65536)
        if not piece:
            return None
        buffered += piece
    head, _, rest = buffered.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(rest) < length:
        rest += conn.recv(65536)
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


def test_stale_pooled_connection_is_replaced_transparently(
        balancer: BalancerProcess) -> None:
    """An upstream that keeps each connection open after one answer, then drops it as the
    next request arrives on it (a keep-alive timeout racing a request): the balancer must
    send that request again on a fresh connection, unseen by its client."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    answered: list[bytes] = []
    dropped: list[bytes] = []

    def one_request(conn: socket.socket) -> bytes:
        return (read_request(conn) or (b"", b""))[0]

    def handle(conn: socket.socket) -> None:
        with conn:
            request = one_request(conn)
            if not request:
                return
            answered.append(request)
            if b"/api/tags" in request:
                body = b'{"models":[]}'
            else:
                body = request.partition(b"\r\n\r\n")[2] or b'{"version":"1"}'
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            dropped.append(one_request(conn))  # the next one is never answered

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        server = balancer.add_server(f"http://127.0.0.1:{port}")
        for index in range(3):
            reply = balancer.call("GET", f"/servers/ollama/{server['id']}/api/version")
            assert reply.status == 200 and reply.json() == {"version": "1"}, reply
            marker = f"body {index}".encode()
            echoed = balancer.call("POST", f"/servers/ollama/{server['id']}/x", raw=marker)
            assert echoed.status == 200 and echoed.body == marker, echoed
        # Each of those went first on a pooled connection that was dropped under it.
        assert sum(1 for r in dropped if b"GET /api/version" in r) >= 3
        assert sum(1 for r in dropped if r.endswith(b"body 2")) == 1
    finally:
        listener.close()


def test_unreachable_upstream_answers_502(balancer: BalancerProcess) -> None:
    server = balancer.add_server(f"http://127.0.0.1:{free_port()}")
    reply = balancer.call("GET", f"/servers/ollama/{server['id']}/api/tags")
    assert reply.status == 502
    assert "cannot connect" in reply.json()["error"]


def test_connect_timeout_answers_504(start_balancer: Any, sqlite_store: Any,
                                     backend: FakeOllama) -> None:
    # A proxy that accepts and never answers CONNECT: the connection can never complete.
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True).start()
    lb = start_balancer(sqlite_store, "--connect-timeout", "1")
    try:
        proxy_id = lb.add_proxy(name="mute", ip="127.0.0.1", port=listener.getsockname()[1])
        lb.add_server(backend.url)
        sid = lb.server_id(proxy=str(proxy_id))
        started = time.monotonic()
        reply = lb.call("GET", f"/servers/ollama/{sid}/api/tags")
        assert reply.status == 504
        assert "timed out" in reply.json()["error"]
        assert time.monotonic() - started < 5
    finally:
        listener.close()
        for sock in held:
            sock.close()


def test_upstream_death_mid_stream_cuts_the_client_stream(
        routed: tuple[BalancerProcess, str]) -> None:
    lb, sid = routed
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    conn.request("GET", f"/servers/ollama/{sid}/die")
    response = conn.getresponse()
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead) as caught:
        response.read()
    # What did arrive is intact, and no final line was invented.
    assert caught.value.partial.endswith(b'{"response":"b","done":false}\n')
    conn.close()
    assert lb.call("GET", "/servers/allServers").status == 200


@pytest.mark.parametrize("path", ["/../api/tags", "/a/%2e%2e/api/tags", "/x/..%2f..%2fetc"])
def test_dot_dot_paths_are_refused(routed: tuple[BalancerProcess, str], path: str) -> None:
    lb, sid = routed
    answer = raw_exchange(lb.port, f"GET /servers/ollama/{sid}{path} HTTP/1.1\r\nHost: a\r\n"
                                   "Connection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"'..'" in answer


def test_unknown_server_id_is_404(balancer: BalancerProcess) -> None:
    for key in ("0123456789abcdef0123456789abcdef", "999", "nope"):
        reply = balancer.call("GET", f"/servers/ollama/{key}/api/tags")
        assert reply.status == 404
        assert reply.json() == {"error": "unknown server id"}


def test_pipelined_requests_are_answered_in_order(routed: tuple[BalancerProcess, str]) -> None:
    lb, sid = routed
    requests = b"".join(
        f"POST /servers/ollama/{sid}/echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n"
        f"r{i}".encode() for i in range(4)
    ) + b"GET /servers/allServers HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n\r\n"
    answer = raw_exchange(lb.port, requests)
    assert answer.count(b"HTTP/1.1 200 OK") == 5
    positions = [answer.index(f"r{i}".encode()) for i in range(4)]
    assert positions == sorted(positions)


def test_expect_100_continue_is_answered(routed: tuple[BalancerProcess, str]) -> None:
    lb, sid = routed
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as sock:
        sock.sendall(f"POST /servers/ollama/{sid}/echo HTTP/1.1\r\nHost: a\r\n"
                     "Content-Length: 4\r\nExpect: 100-continue\r\n\r\n".encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"ping")
        answer = b""
        while not answer.endswith(b"ping"):
            answer += sock.recv(4096)
        assert b"HTTP/1.1 200 OK" in answer


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: a\r\n" * 101 + b"\r\n", 431),
        (b"POST /proxy/addProxy HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
         b"\r\nContent-Length: 2000000\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked"
         b"\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
         400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX@Y: a\r\n\r\n", 400),
    ],
    ids=["414", "431-size", "431-count", "413", "cl-te", "two-cl", "te-gzip", "obs-fold",
         "bad-name"],
)
def test_bad_requests_get_their_status_and_the_server_keeps_serving(
        balancer: BalancerProcess, request_bytes: bytes, status: int) -> None:
    answer = raw_exchange(balancer.port, request_bytes)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert b"Connection: close" in answer
    body = answer.split(b"\r\n\r\n", 1)[1]
    assert "error" in json.loads(body)
    assert balancer.call("GET", "/servers/allServers").status == 200


def test_malformed_chunk_in_a_proxied_body_closes_the_connection(
        routed: tuple[BalancerProcess, str], backend: FakeOllama) -> None:
    lb, sid = routed
    answer = raw_exchange(lb.port, f"POST /servers/ollama/{sid}/echo HTTP/1.1\r\nHost: a\r\n"
                                   "Transfer-Encoding: chunked\r\n\r\n"
                                   "3\r\nxxx__1\r\na\r\n0\r\n\r\n".encode())
    assert not answer.startswith(b"HTTP/1.1 200")
    assert lb.call("GET", f"/servers/ollama/{sid}/api/version").status == 200


def test_keep_alive_client_connection_serves_many_requests(
        routed: tuple[BalancerProcess, str]) -> None:
    lb, sid = routed
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    for _ in range(5):
        conn.request("POST", f"/servers/ollama/{sid}/api/generate",
                     body=json.dumps({"model": "llama3", "prompt": "x", "stream": False}))
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["done"] is True
    conn.close()


def test_head_request_gets_headers_only(routed: tuple[BalancerProcess, str]) -> None:
    lb, sid = routed
    reply = lb.call("HEAD", f"/servers/ollama/{sid}/")
    assert reply.status == 200
    assert reply.body == b""
    assert reply.headers["Content-Length"] == str(len(b"Ollama is running"))


def test_unknown_route_and_wrong_method_are_json_errors(balancer: BalancerProcess) -> None:
    missing = balancer.call("GET", "/nope")
    assert missing.status == 404 and "error" in missing.json()
    wrong = balancer.call("DELETE", "/proxy/allProxies")
    assert wrong.status == 405 and wrong.headers["Allow"] == "GET"


def test_hop_by_hop_fields_of_an_upstream_answer_never_reach_the_client(
        routed: tuple[BalancerProcess, str]) -> None:
    lb, sid = routed
    reply = lb.call("GET", f"/servers/ollama/{sid}/hop")
    assert reply.status == 200 and reply.body == b"hop"
    assert reply.headers["X-End-To-End"] == "kept"
    for name in ("X-Hop-Only", "Keep-Alive", "Proxy-Authenticate", "Proxy-Connection",
                 "Trailer", "Upgrade", "TE"):
        assert name not in reply.headers, name
    assert reply.headers.get("Connection") in (None, "close")  # its own, never upstream's


#: An Ollama's health check, answered on a connection kept open.
HEALTHY = {
    "/api/tags": b'HTTP/1.1 200 OK\r\nContent-Length: 61\r\n\r\n'
                 b'{"models":[{"name":"llama3:latest","model":"llama3:latest"}]}',
    "/api/ps": b'HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{"models":[]}',
    "/api/version": b'HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{"version":"0.12.0"}',
}


class ScriptedUpstream:
    """A raw upstream that answers each request by its path's script: the bytes to send
    (a list: pieces, each after ``gate`` is released), then what to do with the
    connection: close it, keep it for the next request, or hold it open unread."""

    SCRIPTS: ClassVar[dict[str, tuple[bytes | list[bytes] | None, str]]] = {
        "/close": (b"", "close"),
        "/silent": (None, "hold"),
        "/switch": (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", "close"),
        "/hints": (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                   b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "close"),
        "/garbage": (b"HTTP/9 nope\r\n\r\n", "close"),
        "/continues": (b"HTTP/1.1 100 Continue\r\n\r\n" * 1000, "hold"),
        "/no-reason": (b"HTTP/1.1 200\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"2\r\nok\r\n0\r\n\r\n", "close"),
        "/keep": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "keep"),
        "/partial-head": (b"HTTP/1.1 200 OK\r\nContent-", "close"),
        "/two-lengths": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3"
                         b"\r\n\r\nok", "close"),
        "/head-then-body": ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                             b"2\r\nok\r\n0\r\n\r\n"], "close"),
        "/until-close": ([b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello ",
                          b"world"], "close"),
        "/empty": (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "keep"),
        "/no-content": (b"HTTP/1.1 204 No Content\r\n\r\n", "keep"),
        "/not-modified": (b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n"
                          b"Content-Length: 5\r\n\r\n", "keep"),
        "/twice-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n"
                          b"Content-Length: 17\r\n\r\n", "keep"),
        "/counted": (b'HTTP/1.1 200 OK\r\nContent-Length: 29\r\n\r\n'
                     b'{"done":true,"eval_count":3}\n', "close"),
        "/api/chat": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3"
                      b"\r\n\r\nok", "close"),
        **{path: (answer, "keep") for path, answer in HEALTHY.items()},
    }

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.seen: list[str] = []
        self.gate = threading.Semaphore(0)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        buffered = b""
        while True:
            read = read_request(conn, buffered)
            if read is None:
                conn.close()
                return
            request, buffered = read
            path = request.split(b" ")[1].decode() if b" " in request else ""
            self.seen.append(path)
            answer, then = self.SCRIPTS.get(path, (b"", "close"))
            for index, piece in enumerate(answer if isinstance(answer, list) else [answer]):
                if index:
                    self.gate.acquire(timeout=10)
                if piece:
                    conn.sendall(piece)
            if then == "hold":
                self.held.append(conn)
                return
            if then == "close":
                conn.close()
                return

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()


def test_an_upstream_that_fails_before_answering_is_told_in_its_own_words(
        start_balancer: Any, sqlite_store: Any) -> None:
    upstream = ScriptedUpstream()
    lb = start_balancer(sqlite_store, "--upstream-timeout", "1")
    try:
        server = lb.add_server(f"http://127.0.0.1:{upstream.port}")
        label = f"http://127.0.0.1:{upstream.port}"

        def fetch(path: str) -> tuple[int, str]:
            reply = lb.call("GET", f"/servers/ollama/{server['id']}{path}")
            return reply.status, reply.json()["error"] if reply.status != 200 else reply.text

        assert fetch("/close") == (
            502, f"{label} closed the connection: closed before answering")
        assert fetch("/silent") == (504, f"{label} did not answer within 1 s")
        assert fetch("/switch") == (502, f"{label} switched protocols")
        assert fetch("/hints") == (200, "ok")  # the interim answer is not relayed
        assert fetch("/garbage") == (502, f"{label}: malformed upstream status line")
        # An HTTP/1.0 client: the chunked answer unframed, until the close; the missing
        # reason phrase filled in.
        answer = raw_exchange(lb.port, f"GET /servers/ollama/{server['id']}/no-reason "
                                       "HTTP/1.0\r\n\r\n".encode())
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b"ok"
        assert b"\r\nConnection: close" in head and b"Transfer-Encoding" not in head
    finally:
        upstream.close()


@pytest.fixture
def scripted(start_balancer: Any, sqlite_store: Any) -> Iterator[tuple[BalancerProcess, Any]]:
    """A balancer (health checks by hand, a short upstream timeout) and a scripted server
    added to it: its id, and the upstream."""
    upstream = ScriptedUpstream()
    lb = start_balancer(sqlite_store, "--upstream-timeout", "2", "--health-interval", "600",
                        "--breaker-threshold", "1", "--breaker-cooldown", "60",
                        env={"LOG_FORMAT": "json"})
    server = lb.add_server(f"http://127.0.0.1:{upstream.port}", name="scripted")
    yield lb, (server["id"], upstream)
    upstream.close()


def test_an_answer_broken_off_in_its_head_is_never_asked_again(
        scripted: tuple[BalancerProcess, Any]) -> None:
    # The server began to answer, so it had the request: sending it again on another
    # connection could run it twice. Only a connection that answered nothing is retried.
    lb, (sid, upstream) = scripted
    assert lb.call("GET", f"/servers/ollama/{sid}/keep").text == "ok"  # now pooled
    broken = lb.call("GET", f"/servers/ollama/{sid}/partial-head")
    assert broken.status == 502 and "closed the connection" in broken.json()["error"]
    assert upstream.seen.count("/partial-head") == 1


def test_an_answer_with_two_lengths_is_502_and_counts_against_its_server(
        scripted: tuple[BalancerProcess, Any]) -> None:
    lb, (sid, _) = scripted
    # From the root, it opens the circuit (threshold 1), as any failure of a server does.
    routed = lb.call("POST", "/api/chat", {"model": "llama3", "messages": []})
    assert routed.status == 502
    assert lb.call("GET", f"/servers/{sid}").json()["circuitOpen"] is True
    reply = lb.call("GET", f"/servers/ollama/{sid}/two-lengths")  # by id: still relayed
    assert reply.status == 502
    assert reply.json() == {"error": "scripted: more than one Content-Length"}, reply
    errors = lb.call("GET", "/servers/status").json()["recentErrors"]
    assert [e["kind"] for e in errors if e["server"] == "scripted"] == ["protocol"] * 2
    assert 'kind="protocol"} 2' in lb.call("GET", "/metrics").text


def test_the_head_of_an_answer_reaches_the_client_before_its_body(
        scripted: tuple[BalancerProcess, Any]) -> None:
    # A model loading sends its head and then nothing for a while: the client hears that
    # the request was taken at once, not when the first token comes.
    lb, (sid, upstream) = scripted
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as client:
        client.sendall(f"GET /servers/ollama/{sid}/head-then-body HTTP/1.1\r\n"
                       "Host: lb\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += client.recv(65536)  # before the body is even sent: else a timeout
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        upstream.gate.release()
        rest = head.partition(b"\r\n\r\n")[2]
        while not rest.endswith(b"0\r\n\r\n"):
            rest += client.recv(65536)
        assert rest == b"2\r\nok\r\n0\r\n\r\n"


def access_lines(lb: BalancerProcess) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in lb.lines if line.startswith("{")]
    return [line for line in lines if line.get("status") and line.get("bytes_out") is not None]


def test_the_access_log_counts_every_byte_sent_and_the_time_to_the_first(
        start_balancer: Any, sqlite_store: Any, backend: FakeOllama) -> None:
    lb = start_balancer(sqlite_store, env={"LOG_FORMAT": "json"})
    lb.add_server(backend.url)
    sid = lb.server_id()
    for path in ("/api/version", "/api/tags"):
        answer = raw_exchange(lb.port, f"GET /servers/ollama/{sid}{path} HTTP/1.1\r\n"
                                       "Host: lb\r\nConnection: close\r\n\r\n".encode())
        lb.wait_for(lambda p=path: any(line["path"].endswith(p) for line in access_lines(lb)))
        line = next(line for line in access_lines(lb) if line["path"].endswith(path))
        assert line["bytes_out"] == len(answer), (line, len(answer))
        assert 0 <= line["ttfb"] <= line["duration"] < 5, line


def test_a_cut_stream_and_a_5xx_are_recorded_as_what_happened(
        routed: tuple[BalancerProcess, str]) -> None:
    lb, sid = routed
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    conn.request("GET", f"/servers/ollama/{sid}/die")
    with pytest.raises(http.client.IncompleteRead):
        conn.getresponse().read()
    conn.close()
    assert lb.call("GET", f"/servers/ollama/{sid}/status/500").status == 500

    def said() -> list[tuple[str, str]]:
        errors = lb.call("GET", "/servers/status").json()["recentErrors"]
        return [(e["kind"], e["message"]) for e in errors]

    lb.wait_for(lambda: ("http_5xx", "answered 500") in said())  # once relayed
    assert ("cut_stream", "the stream broke off mid-answer") in said()
    # The warning names the request, its server and how much went out; the access line
    # says the answer was cut.
    lb.wait_for(lambda: re.search(r" WARNING +request (\S+): the answer of http://127\.0\.0\.1:"
                                  r"\d+ broke off after [1-9]\d* bytes: upstream closed in "
                                  r"the middle of the body$", lb.log, re.M) is not None)
    request_id = re.search(r" WARNING +request (\S+): the answer of", lb.log).group(1)
    lb.wait_for(lambda: re.search(rf" GET +/servers/ollama/\S+/die .* {request_id} cut$",
                                  lb.log, re.M) is not None)


@pytest.mark.parametrize("how", ["cut", "500", "500, its client gone at once"])
def test_a_root_answer_of_500_or_cut_short_counts_against_its_server(
        start_balancer: Any, sqlite_store: Any, make_backend: Any, how: str) -> None:
    lb = start_balancer(sqlite_store, "--breaker-threshold", "1", "--breaker-cooldown", "60",
                        "--health-interval", "600")
    fake = make_backend()
    row = lb.add_server(fake.url)
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    if how == "cut":
        conn.request("POST", "/api/chat", json.dumps({"model": "llama3", "fake_die": True}))
        with pytest.raises(http.client.IncompleteRead):
            conn.getresponse().read()
    else:
        fake.fail_status = 500
        conn.request("POST", "/api/chat", json.dumps({"model": "llama3"}))
        answer = conn.getresponse()
        assert answer.status == 500
        if how == "500":
            answer.read()  # the whole answer relayed: it still counts as a failure
    conn.close()
    # Counted as the answer is relayed, which the client may see a moment before; and it
    # stays open (a failure is never taken back as a success).
    lb.wait_for(lambda: lb.call("GET", f"/servers/{row['id']}").json()["circuitOpen"])
    time.sleep(0.2)
    assert lb.call("GET", f"/servers/{row['id']}").json()["circuitOpen"] is True


def test_tokens_are_counted_by_model_for_passthrough_requests_too(
        routed: tuple[BalancerProcess, str]) -> None:
    lb, sid = routed
    reply = lb.call("POST", f"/servers/ollama/{sid}/api/chat",
                    {"model": "llama3", "messages": [], "stream": False})
    assert reply.status == 200
    port = lb.call("GET", "/servers/allServers").json()[0]["port"]
    assert (f'ollamabalancer_tokens_total{{server="http://127.0.0.1:{port}",'
            'model="llama3:latest"} 5') in lb.call("GET", "/metrics").text


def test_tokens_of_an_answer_that_names_no_model_are_counted_without_one(
        scripted: tuple[BalancerProcess, Any]) -> None:
    lb, (sid, _) = scripted
    assert lb.call("GET", f"/servers/ollama/{sid}/counted").status == 200
    assert 'ollamabalancer_tokens_total{server="scripted",model=""} 3' in lb.call(
        "GET", "/metrics").text


def test_answers_without_a_body_are_framed_as_http_says(
        scripted: tuple[BalancerProcess, Any]) -> None:
    # The upstream keeps each connection open: the balancer must know from the head alone
    # that nothing follows, and one client connection takes them all in turn.
    lb, (sid, _) = scripted
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)

    def ask(method: str, path: str) -> http.client.HTTPResponse:
        conn.request(method, f"/servers/ollama/{sid}{path}")
        response = conn.getresponse()
        assert response.read() == b""
        return response

    empty = ask("GET", "/empty")
    assert (empty.status, empty.getheader("Content-Length")) == (200, "0")
    nothing = ask("GET", "/no-content")
    assert nothing.status == 204 and nothing.getheader("Content-Length") is None
    unchanged = ask("GET", "/not-modified")
    assert (unchanged.status, unchanged.getheader("Content-Length")) == (304, "5")
    assert unchanged.getheader("ETag") == '"v1"'
    head = ask("HEAD", "/twice-length")
    assert head.headers.get_all("Content-Length") == ["17"]
    conn.close()
    kinds = [e["kind"] for e in lb.call("GET", "/servers/status").json()["recentErrors"]]
    assert "cut_stream" not in kinds


def test_an_answer_that_ends_when_its_server_closes_reaches_the_client_whole(
        scripted: tuple[BalancerProcess, Any]) -> None:
    lb, (sid, upstream) = scripted
    upstream.gate.release()
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
    conn.request("GET", f"/servers/ollama/{sid}/until-close")
    response = conn.getresponse()
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert response.read() == b"hello world"  # the last chunk came: IncompleteRead if not
    conn.close()


def test_a_slow_reader_gets_a_large_answer_whole(routed: tuple[BalancerProcess, str]) -> None:
    lb, sid = routed
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as client:
        client.sendall(f"GET /servers/ollama/{sid}/flood?mib=8 HTTP/1.1\r\nHost: lb\r\n"
                       "Connection: close\r\n\r\n".encode())
        time.sleep(0.5)  # the buffers fill; the relay stops reading the server
        received = b""
        while piece := client.recv(1 << 20):
            received += piece
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"Content-Length: 8388608" in head and len(body) == 8 * 1024 * 1024
    assert lb.call("GET", "/").status == 200
    assert " ERROR " not in lb.log and "Traceback" not in lb.log, lb.log


class IdleWire:
    """What the pool looks at of a connection: bytes unread, usable, and abort()."""

    def __init__(self) -> None:
        self.buf = b""
        self.usable = True

    def abort(self) -> None:
        self.usable = False


def test_the_pool_keeps_few_idle_connections_over_a_large_fleet_the_longest_idle_going_first(
        ) -> None:
    pool = ob.UpstreamPool(max_idle=100)
    wires = []
    for port in range(1, 10_001):  # one idle connection to each of 10,000 servers
        wire = IdleWire()
        wires.append(wire)
        pool.put(("http", "10.0.0.1", port, None), wire)  # type: ignore[arg-type]
        assert len(pool) <= 100
    assert [w.usable for w in wires] == [False] * 9_900 + [True] * 100
    assert pool.take(("http", "10.0.0.1", 1, None)) is None  # closed, not handed out
    assert pool.take(("http", "10.0.0.1", 10_000, None)) is wires[-1]
    assert len(pool) == 99
    # Per server too: the server's own longest idle goes past POOL_MAX_IDLE.
    same = [IdleWire() for _ in range(ob.POOL_MAX_IDLE + 1)]
    big = ob.UpstreamPool(max_idle=10_000)
    for wire in same:
        big.put(("http", "h", 1, None), wire)  # type: ignore[arg-type]
    assert not same[0].usable and all(w.usable for w in same[1:]) and len(big) == 256
    big.close()
    assert len(big) == 0 and not any(w.usable for w in same)


def test_the_idle_pool_is_smaller_under_a_low_open_file_limit() -> None:
    assert ob.pool_cap(None) == ob.POOL_MAX_IDLE_TOTAL == ob.pool_cap(1_000_000)
    assert ob.pool_cap(2_000) == 200 and ob.pool_cap(5) == 1


def test_a_page_a_server_answers_runs_sandboxed_off_the_balancers_origin(
        routed: tuple[BalancerProcess, str], backend: FakeOllama) -> None:
    lb, sid = routed
    backend.missing_paths = {"/page"}
    backend.missing_answer = (b"<script>fetch('/keys/addKey')</script>", "text/html")
    reply = lb.call("GET", f"/servers/ollama/{sid}/page")
    assert reply.headers["Content-Type"] == "text/html"
    assert reply.headers["Content-Security-Policy"] == "sandbox"
    assert reply.headers["X-Content-Type-Options"] == "nosniff"


def test_passthrough_bodies_kept_for_a_retry_count_against_the_buffered_bodies_budget(
        start_balancer: Any, sqlite_store: Any, backend: FakeOllama) -> None:
    """Two uploads the server holds keep 1.4 MB for a retry: a routed request that needs
    more than the rest of a 1.5 MB budget waits for none of it (503), until they end."""
    lb = start_balancer(sqlite_store, "--max-buffered-bodies", str(1536 * 1024))
    lb.add_server(backend.url)
    sid = lb.server_id()
    holders = []
    for _ in range(2):
        sock = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
        sock.sendall(f"POST /servers/ollama/{sid}/hang HTTP/1.1\r\nHost: lb\r\n"
                     f"Content-Length: {700 * 1024}\r\n\r\n".encode() + b"x" * (700 * 1024))
        holders.append(sock)
    deadline = time.monotonic() + 10
    while sum(1 for r in backend.requests if r["path"] == "/hang") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    chat = {"model": "llama3", "messages": [{"role": "user", "content": "y" * 200_000}],
            "stream": False}
    assert lb.call("POST", "/api/chat", chat).status == 503
    for sock in holders:
        sock.close()
    lb.wait_for(lambda: lb.call("POST", "/api/chat", chat).status == 200)


def test_a_client_that_stops_reading_frees_its_server_and_is_not_its_failure(
        start_balancer: Any, sqlite_store: Any, backend: FakeOllama) -> None:
    """Past CLIENT_TIMEOUT without reading, the answer is cut and the upstream dropped:
    the server's slot is free and its circuit (one failure opens it) stays closed."""
    lb = start_balancer(sqlite_store, "--client-timeout", "1", "--breaker-threshold", "1",
                        "--breaker-cooldown", "60", "--health-interval", "600")
    row = lb.add_server(backend.url, maxConcurrency=1)
    sock = ask_for_a_flood(lb, str(row["id"]))
    started = time.monotonic()
    lb.wait_for(lambda: any("/flood" in line and " 200 " in line for line in lb.lines),
                timeout=10)
    assert time.monotonic() - started < 1 + 3
    sock.close()
    status = lb.call("GET", f"/servers/{row['id']}").json()
    assert status["circuitOpen"] is False
    assert lb.call("GET", f"/servers/ollama/{row['id']}/api/version").status == 200
    errors = lb.call("GET", "/servers/status").json()["recentErrors"]
    assert not [e for e in errors if e["kind"] != "health"]


def test_an_upstream_that_sends_1xx_without_end_gets_a_502(
        scripted: tuple[BalancerProcess, Any]) -> None:
    lb, (sid, _) = scripted
    reply = lb.call("GET", f"/servers/ollama/{sid}/continues")
    assert reply.status == 502
    assert lb.call("GET", f"/servers/ollama/{sid}/hints").body == b"ok"  # a few are fine
