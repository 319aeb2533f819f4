#!/usr/bin/env python3
"""Performance suite: the balancer beside nginx and beside going direct, in one run.

    python bench/run.py            # the whole suite, a few minutes
    python bench/run.py --quick    # a few seconds, to check that it runs

Everything starts here on 127.0.0.1 and every figure in the table comes from the same run:

- small requests: req/s and p50/p99 latency of POST /api/embed (model-routed) and GET
  /api/version with 64 keep-alive clients, and POST /api/embed with one (wrk when installed,
  else a Python generator),
  direct to a fast backend (nginx ``return 200``, else a minimal asyncio one), through nginx
  (one worker, upstream keep-alive, proxy_buffering off; when installed) and through the
  balancer, on asyncio's own event loop and on uvloop when installed;
- instructions: what the balancer's process runs per request and per streamed token,
  counted by valgrind's callgrind with one client (the same from run to run, unlike a time);
- streams: concurrent /api/chat streams of N tokens at a fixed pace from a simulated backend,
  direct and through the balancer: added time to first byte and added delay per chunk
  (p50, p99), and the balancer's peak RSS;
- scale: many open streams idle between tokens: peak RSS and streams lost;
- attacks: 20 bodies of 60 MiB at once (peak RSS, answered and refused, with and without
  MAX_BUFFERED_BODIES), and a 30 MiB body of 1-byte chunks (p50/p99 of another client's
  GET /api/version before and during it, the balancer's CPU);
- routing: time per scheduling decision with 10, 100 and 1,000 servers;
- fleet: the fleet simulator (bench/fleet_sim.py), every strategy.

``--only small streams ...`` runs some parts.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import timeit
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ollamabalancer as ob  # noqa: E402

TAGS = {"models": [{"name": "bench:latest", "model": "bench:latest", "size": 1,
                    "digest": "0" * 64, "modified_at": "2026-11-01T00:00:00Z",
                    "details": {"parameter_size": "1B", "family": "bench"}}]}
EMBED_BODY = json.dumps({"model": "bench", "input": "hello"})


def raise_nofile() -> None:
    """Room for tens of thousands of sockets (root may raise the hard limit too)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for limit in (200_000, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
            return
        except (ValueError, OSError):
            continue


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else float("nan")


# -- processes -----------------------------------------------------------------------------


def drain(stream: Any) -> None:
    """Reads a pipe to its end, keeping nothing (a balancer's log, line after line)."""
    while stream.read(65536):
        pass


class Nginx:
    """nginx as the fast backend (return 200) and, on another port, as a reverse proxy."""

    def __init__(self, workdir: Path, stream_port: int | None = None) -> None:
        """``stream_port``: a streaming backend nginx also proxies to, on
        ``stream_proxy_port``, as the balancer would (proxy_buffering off)."""
        workdir.mkdir(exist_ok=True)
        self.backend_port, self.proxy_port = free_port(), free_port()
        self.stream_proxy_port = free_port()
        streaming = "" if stream_port is None else f"""
                upstream streamer {{ server 127.0.0.1:{stream_port}; keepalive 1024; }}
                server {{
                    listen 127.0.0.1:{self.stream_proxy_port} backlog=16384;
                    location / {{
                        proxy_pass http://streamer;
                        proxy_http_version 1.1;
                        proxy_set_header Connection "";
                        proxy_buffering off;
                        proxy_read_timeout 600s;
                    }}
                }}"""
        tags = json.dumps(TAGS).replace("'", "\\'")
        embed = json.dumps({"model": "bench", "embeddings": [[0.1, 0.2]]})
        conf = workdir / "nginx.conf"
        conf.write_text(textwrap.dedent(f"""\
            worker_processes 1;
            daemon off;
            pid {workdir}/nginx.pid;
            error_log {workdir}/error.log crit;
            events {{ worker_connections 65536; }}
            http {{
                access_log off;
                client_body_temp_path {workdir}/body;
                proxy_temp_path {workdir}/proxy;
                keepalive_requests 1000000;
                upstream ollama {{ server 127.0.0.1:{self.backend_port}; keepalive 128; }}
                server {{
                    listen 127.0.0.1:{self.backend_port} backlog=4096;
                    default_type application/json;
                    location = /api/tags {{ return 200 '{tags}'; }}
                    location = /api/ps {{ return 200 '{{"models":[]}}'; }}
                    location = /api/version {{ return 200 '{{"version":"0.12.0"}}'; }}
                    location = /api/embed {{ return 200 '{embed}'; }}
                }}
                server {{
                    listen 127.0.0.1:{self.proxy_port} backlog=4096;
                    location / {{
                        proxy_pass http://ollama;
                        proxy_http_version 1.1;
                        proxy_set_header Connection "";
                        proxy_buffering off;
                    }}
                }}{streaming}
            }}
            """))
        self.proc = subprocess.Popen([shutil.which("nginx") or "nginx", "-c", str(conf),
                                      "-p", str(workdir)], stderr=subprocess.DEVNULL)
        wait_port(self.backend_port)
        wait_port(self.proxy_port)
        if stream_port is not None:
            wait_port(self.stream_proxy_port)

    def cpu(self) -> tuple[float, float]:
        """CPU seconds used so far by nginx's processes (its master and its worker)."""
        pids = [self.proc.pid, *(int(p) for p in Path(
            f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split())]
        times = [cpu_seconds(pid) for pid in pids]
        return sum(t[0] for t in times), sum(t[1] for t in times)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Balancer:
    def __init__(self, workdir: Path, *extra: str, wrapper: list[str] | None = None,
                 start_timeout: float = 15.0, settings: dict[str, str] | None = None
                 ) -> None:
        workdir.mkdir(exist_ok=True)
        # The defaults (MAX_CONCURRENCY 4 and the access log among them: its lines are
        # read here and dropped), but for one address's share of connections: the load
        # comes from one address here, a real fleet's clients are many.
        env = {**os.environ, "DB_ENGINE": "sqlite", "DB_PATH": str(workdir / "bench.db"),
               "HEALTH_INTERVAL": "5", "MAX_CONNECTIONS_PER_CLIENT": "10000000",
               **(settings or {})}
        env.pop("DB_HOST", None)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [*(wrapper or ()), sys.executable, str(ROOT / "ollamabalancer.py"), "--ip",
             "127.0.0.1",
             "--port", str(self.port), *extra], env=env, stderr=subprocess.PIPE, text=True,
            preexec_fn=raise_nofile)
        try:
            wait_port(self.port, start_timeout)
        except RuntimeError:
            self.proc.kill()
            raise RuntimeError("the balancer did not start: "
                               + (self.proc.communicate()[1] or "")[-2000:]) from None
        assert self.proc.stderr is not None  # drained, so a full pipe never stalls it
        threading.Thread(target=drain, args=(self.proc.stderr,), daemon=True).start()

    def add_server(self, port: int, max_concurrency: int | None = 100_000) -> None:
        """Adds the backend as a user would; its cap raised out of the way through the
        API (maxConcurrency), unless ``max_concurrency`` is None: the default, 4."""
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        body = {"url": f"http://127.0.0.1:{port}"}
        if max_concurrency is not None:
            body["maxConcurrency"] = max_concurrency  # type: ignore[assignment]
        conn.request("POST", "/servers/addServer", json.dumps(body),
                     {"Content-Type": "application/json"})
        answer = conn.getresponse()
        body = json.loads(answer.read())
        conn.close()
        if answer.status != 201 or not body["reachable"]:
            raise RuntimeError(f"could not add the backend: {body}")

    def stop(self) -> float:
        rss = peak_rss_mb(self.proc.pid)
        self.proc.terminate()
        self.proc.wait(40)
        return rss


#: The simulated side runs on uvloop when installed: the lighter it is, the more of the
#: machine is left to what is measured.
FAST_LOOP = """
try:
    from uvloop import run
except ImportError:
    from asyncio import run
"""

STREAM_BACKEND = FAST_LOOP + r'''
import asyncio, json, sys, time
TOKENS, PACE = int(sys.argv[2]), float(sys.argv[3])
TAGS = sys.argv[4].encode()
TICK = min(0.002, PACE / 10) if PACE else 0.002
SLOTS = max(1, round(PACE / TICK))
streaming = {}  # writer -> [tokens sent, future set when the last went]
slots = [[] for _ in range(SLOTS)]  # the streams whose next token is due at each tick
ticks = 0
def token(writer, state):
    if writer not in streaming:
        return  # the client left
    last = state[0] == TOKENS - 1  # the TOKENS-th line, counted from 0
    line = b'{"t":%.6f,"done":%s}\n' % (time.monotonic(), b"true" if last else b"false")
    writer.write(b"%x\r\n%s\r\n%s" % (len(line), line, b"0\r\n\r\n" if last else b""))
    state[0] += 1
    if last:
        del streaming[writer]
        state[1].set_result(None)
    else:
        slots[ticks % SLOTS].append((writer, state))  # again one pace from now
async def ticker():
    # One timer for every stream: each stream's tokens go one pace apart, and streams
    # that started at different times keep apart (no burst of every stream at once).
    global ticks
    start = time.monotonic()
    while True:
        ticks += 1
        await asyncio.sleep(max(0.0, start + ticks * TICK - time.monotonic()))
        due, slots[ticks % SLOTS] = slots[ticks % SLOTS], []
        for writer, state in due:
            token(writer, state)
async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await reader.readexactly(length)
            path = head.split(b" ")[1]
            if path != b"/api/chat":
                body = TAGS if path == b"/api/tags" else b'{"models":[],"version":"0.12.0"}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            state = streaming[writer] = [0, asyncio.get_running_loop().create_future()]
            token(writer, state)  # the first at once, the rest on the ticks
            await state[1]
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        streaming.pop(writer, None)
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]), backlog=16384)
    asyncio.ensure_future(ticker())
    async with server:
        await server.serve_forever()
run(main())
'''


#: A fleet of simulated servers in one process: ``count`` listening ports on 127.0.0.1,
#: each answering Ollama's /api/tags, /api/ps and /api/version on kept-alive connections;
#: prints the ports as one JSON line once all listen.
FLEET_BACKEND = FAST_LOOP + r'''
import asyncio, json, sys
COUNT, TAGS = int(sys.argv[1]), sys.argv[2].encode()
ANSWERS = {b"/api/tags": TAGS, b"/api/ps": b'{"models":[]}',
           b"/api/version": b'{"version":"0.12.0"}'}
class Server(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""
    def data_received(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            body = ANSWERS.get(head.split(b" ", 2)[1], b"{}")
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
async def main():
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(Server, "127.0.0.1", 0, backlog=64)
               for _ in range(COUNT)]
    print(json.dumps([s.sockets[0].getsockname()[1] for s in servers]), flush=True)
    await asyncio.Event().wait()
run(main())
'''


def start_stream_backend(tokens: int, pace: float, tags: dict[str, Any] = TAGS
                         ) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", STREAM_BACKEND, str(port), str(tokens),
                             str(pace), json.dumps(tags)], preexec_fn=raise_nofile)
    wait_port(port)
    return proc, port


# -- load generators --------------------------------------------------------------------------


class Run:
    """One load run: good answers a second, latency percentiles, and what went wrong."""

    def __init__(self, rate: float, p50: float, p99: float, errors: int) -> None:
        self.rate, self.p50, self.p99, self.errors = rate, p50, p99, errors


def wrk(url: str, seconds: float, post: bool, clients: int) -> Run:
    """2xx answers a second, p50 ms, p99 ms and errors (non-2xx answers and socket
    errors), with ``clients`` keep-alive connections."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        if post:
            script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(EMBED_BODY)}\n'
                         'wrk.headers["Content-Type"] = "application/json"\n')
    duration = f"-d{max(1, round(seconds))}s"  # whole seconds only
    done = subprocess.run(["wrk", "-t1", f"-c{clients}", duration, "--latency", "-s",
                           script.name, url], capture_output=True, text=True, timeout=120)
    os.unlink(script.name)
    out = done.stdout
    total, took, unit = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out).groups()  # type: ignore[union-attr]
    elapsed = float(took) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                        r"timeout (\d+)", out)
    if sockets:
        errors += sum(int(n) for n in sockets.groups())

    def percentile(name: str) -> float:
        value, unit = re.search(rf"\s{name}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    good = int(total) - (int(bad.group(1)) if bad else 0)
    return Run(good / elapsed, percentile("50"), percentile("99"), errors)


async def python_load(port: int, path: str, seconds: float, post: bool, clients: int
                      ) -> Run:
    """The same measurement as wrk, in Python, for machines without wrk."""
    body = EMBED_BODY.encode() if post else b""
    method = b"POST" if post else b"GET"
    request = (b"%s %s HTTP/1.1\r\nHost: b\r\nContent-Length: %d\r\n\r\n%s"
               % (method, path.encode(), len(body), body))
    latencies: list[float] = []
    errors = 0
    stop = time.monotonic() + seconds

    async def client() -> None:
        nonlocal errors
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            errors += 1
            return
        try:
            while time.monotonic() < stop:
                sent = time.monotonic()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                latencies.append(time.monotonic() - sent)
                if not head.startswith(b"HTTP/1.1 2"):
                    errors += 1
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
        writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    cuts = statistics.quantiles(latencies, n=100)
    return Run((len(latencies) - errors) / seconds, cuts[49] * 1000, cuts[98] * 1000, errors)


def load(port: int, path: str, seconds: float, post: bool, clients: int = 64) -> Run:
    if shutil.which("wrk"):
        return wrk(f"http://127.0.0.1:{port}{path}", seconds, post, clients)
    return asyncio.run(python_load(port, path, seconds, post, clients))


STREAM_CLIENT = FAST_LOOP + r'''
import asyncio, sys, time
port, streams, ramp = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
TOKENS = int(sys.argv[4])  # a stream is served only when every one of them arrived
first, gaps, lost, refused, served, why = [], [], 0, 0, 0, {}
BODY = b'{"model":"bench","messages":[],"stream":true}'
REQUEST = b"POST /api/chat HTTP/1.1\r\nHost: b\r\nContent-Length: %d\r\n\r\n%s" % (
    len(BODY), BODY)
class Stream(asyncio.Protocol):
    # Reads the tokens as they come, without a task per read or a JSON parser: each
    # token line carries its send time as "t" (the chunk framing around it is skipped).
    def __init__(self, done):
        self.done, self.buf, self.head, self.finished = done, bytearray(), False, False
        self.got_first, self.status = False, "closed before the last token"
        self.tokens = 0
    def connection_made(self, transport):
        self.transport, self.sent = transport, time.monotonic()
        transport.write(REQUEST)
    def data_received(self, data):
        global refused
        now = time.monotonic()
        self.buf += data
        if not self.head:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if self.buf.startswith(b"HTTP/1.1 503 "):  # refused at the door: a failure too
                refused += 1
                self.finished = True
                self.transport.close()
                return
            if not self.buf.startswith(b"HTTP/1.1 200 "):  # lost, for the reason given
                self.status = bytes(self.buf[:self.buf.find(b"\r\n")]).decode("latin-1")
                self.transport.close()
                return
            self.head = True
            del self.buf[:end + 4]
        while (start := self.buf.find(b'"t":')) >= 0:
            stop = self.buf.find(b"}", start)
            if stop < 0:
                return
            line = bytes(self.buf[start:stop])
            del self.buf[:stop + 1]
            if not self.got_first:
                first.append(now - self.sent)
                self.got_first = True
            gaps.append(now - float(line[4:line.index(b",")]))
            self.tokens += 1
            if b"true" in line:
                global served
                if self.tokens == TOKENS:
                    served += 1
                    self.finished = True
                else:
                    self.status = f"got {self.tokens} of {TOKENS} tokens"
                self.transport.close()
                return
    def connection_lost(self, exc):
        global lost
        if not self.finished:
            lost += 1
            key = str(exc or self.status)[:160]
            why[key] = why.get(key, 0) + 1
        self.done.set_result(None)
async def one(index):
    global lost
    await asyncio.sleep(ramp * index / streams)
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    try:
        await loop.create_connection(lambda: Stream(done), "127.0.0.1", port)
    except OSError as exc:
        lost += 1
        why[str(exc)[:160]] = why.get(str(exc)[:160], 0) + 1
        return
    await done
async def main():
    await asyncio.gather(*(one(i) for i in range(streams)))
    print(__import__("json").dumps({"first": first, "gaps": gaps, "lost": lost,
                                    "refused": refused, "served": served, "why": why}))
run(main())
'''


def run_streams(port: int, streams: int, ramp: float, tokens: int) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", STREAM_CLIENT, str(port), str(streams),
                           str(ramp), str(tokens)], capture_output=True, text=True,
                          timeout=900, preexec_fn=raise_nofile)
    return dict(json.loads(done.stdout))


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# -- the suite --------------------------------------------------------------------------------


def event_loops() -> list[str]:
    """The loops the balancer is measured on: asyncio's own, and uvloop when installed."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return ["asyncio"]
    return ["asyncio", "uvloop"]


def small_requests(args: argparse.Namespace, workdir: Path, rows: list[list[str]]) -> None:
    nginx = Nginx(workdir) if shutil.which("nginx") else None
    backend_port = nginx.backend_port if nginx else None
    fallback = None
    if backend_port is None:  # no nginx: the stream backend answers /api/version fast
        fallback, backend_port = start_stream_backend(1, 0.0)
    balancers = {loop: Balancer(workdir / loop, "--event-loop", loop) for loop in event_loops()}
    # The same with the server at the default cap (4): 64 clients, 60 of them queued.
    capped = {loop: Balancer(workdir / f"{loop}-capped", "--event-loop", loop)
              for loop in event_loops()}
    try:
        for balancer in balancers.values():
            balancer.add_server(backend_port)
        for balancer in capped.values():
            balancer.add_server(backend_port, max_concurrency=None)
        plan: list[tuple[str, str, int, str, bool, int]] = []
        # /api/version at the root is answered by the balancer itself; the relayed GET is
        # the passthrough to one server.
        # One client as well: the time a request spends in the balancer, with no queue.
        for name, path, relayed, post, clients in (
                ("POST /api/embed", "/api/embed", "/api/embed", True, 64),
                ("GET /api/version", "/api/version", "/servers/ollama/1/api/version", False,
                 64),
                ("POST /api/embed, 1 client", "/api/embed", "/api/embed", True, 1)):
            plan.append((name, "direct", backend_port, path, post, clients))
            if nginx:
                plan.append((name, "nginx", nginx.proxy_port, path, post, clients))
            for loop, balancer in balancers.items():
                plan.append((name, f"balancer ({loop})", balancer.port, relayed, post, clients))
                if relayed != path:
                    plan.append((name, f"balancer ({loop}), own answer", balancer.port, path,
                                 post, clients))
                if clients > 1 and post:
                    plan.append((name, f"balancer ({loop}), queued behind the default cap",
                                 capped[loop].port, relayed, post, clients))
        if not args.quick:  # a warm-up of every target, not counted
            for _, _, port, target, post, clients in plan:
                load(port, target, 1.0, post, clients)
        runs: dict[tuple[str, str], list[Run]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}  # user, system, requests: summed
        for _ in range(args.repeats):  # each round runs every target: drift hits all alike
            for name, label, port, target, post, clients in plan:
                pid = next((b.proc.pid for b in [*balancers.values(), *capped.values()]
                            if b.port == port), None)
                before = cpu_seconds(pid) if pid else (0.0, 0.0)
                run = load(port, target, args.seconds, post, clients)
                runs.setdefault((name, label), []).append(run)
                if pid:
                    after = cpu_seconds(pid)
                    sums = cpu.setdefault((name, label), [0.0, 0.0, 0.0])
                    sums[0] += after[0] - before[0]
                    sums[1] += after[1] - before[1]
                    sums[2] += (run.rate + run.errors / args.seconds) * args.seconds
        for (name, label), measured in runs.items():
            rate, p50, p99 = (statistics.median(getattr(r, f) for r in measured)
                              for f in ("rate", "p50", "p99"))
            direct_p50 = statistics.median(r.p50 for r in runs[(name, "direct")])
            added = "" if label == "direct" else f"{p50 - direct_p50:+.2f}"
            notes = []
            if label.startswith("balancer") and (name, "nginx") in runs:
                nginx_rate = statistics.median(r.rate for r in runs[(name, "nginx")])
                notes.append(f"{rate / nginx_rate:.2f}x nginx")
            if (name, label) in cpu:
                user, system, count = cpu[(name, label)]
                count = max(count, 1)
                notes.append(f"CPU {(user + system) / count * 1e6:.0f} us a request "
                             f"({system / count * 1e6:.0f} in the kernel)")
                uncapped = (name, label.removesuffix(", queued behind the default cap"))
                if uncapped != (name, label) and uncapped in cpu:
                    free = cpu[uncapped]
                    ratio = (user + system) / count / (sum(free[:2]) / max(free[2], 1))
                    notes.append(f"{ratio:.2f}x the uncapped CPU")
            errors = sum(r.errors for r in measured)
            if errors:
                notes.append(f"ERRORS: {errors} answers not 2xx or broken")
            rows.append([f"{name} via {label}", f"{rate:,.0f} req/s {spread(measured, 'rate')}",
                         f"p50 {p50:.2f} ms", f"p99 {p99:.2f} ms",
                         f"added p50 {added} ms" if added else "", ", ".join(notes)])
    finally:
        for balancer in [*balancers.values(), *capped.values()]:
            balancer.stop()
        if nginx:
            nginx.stop()
        if fallback:
            fallback.terminate()


def spread(runs: list[Run], field: str) -> str:
    """The range of a figure over the repeats, as a share of their median."""
    values = [getattr(r, field) for r in runs]
    middle = statistics.median(values)
    if len(values) < 2 or not middle:
        return ""
    return f"(±{(max(values) - min(values)) / 2 / middle * 100:.0f}%)"


def cpu_seconds(pid: int) -> tuple[float, float]:
    """The CPU time a process has used so far: in its own code, and in the kernel's."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_note(before: tuple[float, float], after: tuple[float, float], count: float,
             what: str) -> str:
    """Microseconds of CPU per ``what``, and how many of them the kernel took."""
    user, system = (after[0] - before[0]), (after[1] - before[1])
    count = max(count, 1)
    return (f"CPU {(user + system) / count * 1e6:.0f} us a {what} "
            f"({system / count * 1e6:.0f} in the kernel)")


def streams(args: argparse.Namespace, workdir: Path, rows: list[list[str]], count: int,
            tokens: int, pace: float, label: str) -> None:
    backend, port = start_stream_backend(tokens, pace)
    nginx_chunk = None  # nginx's CPU a chunk, in this run
    try:
        if shutil.which("nginx") and label == "streams":  # the anchor, in the same run
            nginx = Nginx(workdir / "nginx-streams", stream_port=port)
            try:
                before = nginx.cpu()
                through = run_streams(nginx.stream_proxy_port, count, args.ramp, tokens)
                after = nginx.cpu()
            finally:
                nginx.stop()
            gaps = through["gaps"]
            assert isinstance(gaps, list)
            chunks = max(len(gaps), 1)
            user, system = after[0] - before[0], after[1] - before[1]
            nginx_chunk = (user + system) / chunks
            rows.append([f"{label} via nginx: {count} streams x {tokens} tokens",
                         f"nginx CPU {(user + system) / chunks * 1e6:.1f} us a chunk "
                         f"({system / chunks * 1e6:.1f} in the kernel)",
                         f"served {through['served']} of {count}", "", "", ""])
        for loop in event_loops():
            balancer = Balancer(workdir / f"{label}-{loop}", "--upstream-timeout", "600",
                                "--event-loop", loop)
            pairs: list[tuple[dict[str, object], dict[str, object]]] = []
            user = system = 0.0
            chunks = 0
            try:
                balancer.add_server(port)
                for _ in range(args.repeats):  # direct, then through it: drift hits both
                    direct = run_streams(port, count, args.ramp, tokens)
                    before = cpu_seconds(balancer.proc.pid)
                    through = run_streams(balancer.port, count, args.ramp, tokens)
                    after = cpu_seconds(balancer.proc.pid)
                    user, system = user + after[0] - before[0], system + after[1] - before[1]
                    gaps = through["gaps"]
                    assert isinstance(gaps, list)
                    chunks += len(gaps)
                    pairs.append((direct, through))
            finally:
                rss = balancer.stop()
            chunks = max(chunks, 1)
            cpu = (f"CPU {(user + system) / chunks * 1e6:.1f} us a chunk "
                   f"({system / chunks * 1e6:.1f} in the kernel"
                   + (f"; {(user + system) / chunks / nginx_chunk:.2f}x nginx's)"
                      if nginx_chunk else ")"))
            stream_row(rows, f"{label} ({loop}): {count} streams x {tokens} tokens", pairs,
                       rss, cpu)
    finally:
        backend.terminate()


def stream_row(rows: list[list[str]], label: str,
               pairs: list[tuple[dict[str, object], dict[str, object]]], rss: float,
               cpu: str) -> None:
    """Added delays as the median over the repeats (± half their range), and every stream
    that did not get all its tokens: refused at the door and lost apart, both failures."""
    ms = 1000.0
    figures: dict[str, list[float]] = {"ttfb": [], "p50": [], "p99": []}
    served = refused = lost = direct_failed = 0
    for direct, through in pairs:
        first_d, first_b = direct["first"], through["first"]
        gaps_d, gaps_b = direct["gaps"], through["gaps"]
        assert isinstance(first_d, list) and isinstance(first_b, list)
        assert isinstance(gaps_d, list) and isinstance(gaps_b, list)
        figures["ttfb"].append((pct(first_b, 50) - pct(first_d, 50)) * ms)
        figures["p50"].append((pct(gaps_b, 50) - pct(gaps_d, 50)) * ms)
        figures["p99"].append((pct(gaps_b, 99) - pct(gaps_d, 99)) * ms)
        served += int(through["served"])  # type: ignore[call-overload]
        refused += int(through["refused"])  # type: ignore[call-overload]
        lost += int(through["lost"])  # type: ignore[call-overload]
        direct_failed += int(direct["lost"]) + int(direct["refused"])  # type: ignore[call-overload]

    def shown(values: list[float]) -> str:
        middle = statistics.median(values)
        half = (max(values) - min(values)) / 2
        return f"{middle:+.2f} ms" + (f" (±{half:.2f})" if len(values) > 1 else "")

    total = served + refused + lost
    failed = "" if served == total else " FAILED:"
    rows.append([label, f"added TTFB p50 {shown(figures['ttfb'])}",
                 f"added per chunk p50 {shown(figures['p50'])}",
                 f"p99 {shown(figures['p99'])}", f"peak RSS {rss:.0f} MB",
                 f"served {served} of {total}{failed} refused {refused}, lost {lost} (direct: "
                 f"{direct_failed} failed); balancer {cpu}"])


def rss_mb(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def post_bodies(port: int, body: bytes, count: int) -> list[int]:
    """``count`` POST /api/embed of ``body`` at once; their statuses (0: no answer)."""
    import http.client

    statuses: list[int] = []

    def send() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request("POST", "/api/embed", body, {"Content-Type": "application/json"})
            answer = conn.getresponse()
            answer.read()
            statuses.append(answer.status)
        except OSError:
            statuses.append(0)
        finally:
            conn.close()

    senders = [threading.Thread(target=send) for _ in range(count)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(300)
    return statuses


def big_bodies(args: argparse.Namespace, workdir: Path, rows: list[list[str]]) -> None:
    """Many large routed bodies at once: each is read whole before it is sent (to be sent
    again on failover), so without a budget memory grows with every one. A fresh balancer
    each repeat, as peak RSS only grows."""
    count, mib = (6, 8) if args.quick else (20, 60)
    budgets = [("no budget", 2**40),
               ("MAX_BUFFERED_BODIES 512 MiB", ob.MAX_BUFFERED_BODIES)]
    if args.quick:
        budgets[1] = ("MAX_BUFFERED_BODIES 16 MiB", 16 * 1024 * 1024)
    body = json.dumps({"model": "bench", "input": "x" * (mib * 1024 * 1024)}).encode()
    backend, backend_port = start_stream_backend(1, 0.0)
    results: dict[str, tuple[list[float], list[int]]] = {}
    try:
        for repeat in range(args.repeats):
            for label, budget in budgets:
                balancer = Balancer(workdir / f"bodies-{budget}-{repeat}", "--event-loop",
                                    "asyncio", "--max-buffered-bodies", str(budget))
                try:
                    balancer.add_server(backend_port)
                    before = rss_mb(balancer.proc.pid)
                    statuses = post_bodies(balancer.port, body, count)
                finally:
                    peak = balancer.stop()
                growths, seen = results.setdefault(label, ([], []))
                growths.append(peak - before)
                seen.extend(statuses)
    finally:
        backend.terminate()
    for label, (growths, seen) in results.items():
        answered, refused = seen.count(200), seen.count(503)
        middle, half = statistics.median(growths), (max(growths) - min(growths)) / 2
        rows.append([f"{count} bodies of {mib} MiB at once, {label}",
                     f"{answered / args.repeats:g} answered",
                     f"{refused / args.repeats:g} refused (503)",
                     f"{(len(seen) - answered - refused) / args.repeats:g} failed otherwise",
                     f"peak RSS +{middle:,.0f} MB" + (f" (±{half:,.0f})" if half else ""),
                     f"a run: median of {args.repeats}" if args.repeats > 1 else ""])


def tiny_chunks(args: argparse.Namespace, workdir: Path, rows: list[list[str]]) -> None:
    """One client sends a body of 1-byte chunks as fast as the balancer takes it; another
    asks GET /api/version on a keep-alive connection meanwhile, and before it."""
    import http.client
    import socket

    total = (2 if args.quick else 30) * 1024 * 1024
    samples = 30 if args.quick else 200
    block = b"1\r\nx\r\n" * (64 * 1024 // 6)
    balancer = Balancer(workdir / "chunks", "--event-loop", "asyncio")

    def latencies() -> list[float]:
        conn = http.client.HTTPConnection("127.0.0.1", balancer.port, timeout=30)
        times = []
        for _ in range(samples):
            started = time.perf_counter()
            conn.request("GET", "/api/version")
            answer = conn.getresponse()
            answer.read()
            assert answer.status == 200, answer.status
            times.append((time.perf_counter() - started) * 1000)
        conn.close()
        return times

    quiet: list[list[float]] = []
    loud: list[list[float]] = []
    rates: list[float] = []
    cpu_share: list[float] = []
    try:
        latencies()  # warm-up
        for _ in range(args.repeats):
            quiet.append(latencies())
            sent, finished = 0, threading.Event()

            def attack(finished: threading.Event = finished) -> None:
                nonlocal sent
                with socket.create_connection(("127.0.0.1", balancer.port), timeout=60) as sock:
                    sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: a\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")
                    try:
                        while sent < total and not finished.is_set():
                            sock.sendall(block)
                            sent += len(block)
                    except OSError:
                        pass

            attacker = threading.Thread(target=attack, daemon=True)
            started, cpu_before = time.monotonic(), cpu_seconds(balancer.proc.pid)
            attacker.start()
            while sent < min(total, 1024 * 1024) and attacker.is_alive():
                time.sleep(0.01)
            loud.append(latencies())
            elapsed = time.monotonic() - started
            cpu_share.append((sum(cpu_seconds(balancer.proc.pid)) - sum(cpu_before)) / elapsed)
            rates.append(sent / elapsed / 1e6)
            finished.set()
            attacker.join(60)
    finally:
        balancer.stop()

    def shown(runs: list[list[float]], q: int) -> str:
        values = [pct(run, q) for run in runs]
        half = (max(values) - min(values)) / 2
        return f"p{q} {statistics.median(values):.2f} ms" + (f" (±{half:.2f})" if half else "")

    rows.append(["GET /api/version, quiet", shown(quiet, 50), shown(quiet, 99), "", "", ""])
    rows.append([f"GET /api/version, during a {total >> 20} MiB body of 1-byte chunks",
                 shown(loud, 50), shown(loud, 99),
                 f"attack taken at {statistics.median(rates):.1f} MB/s",
                 f"balancer CPU {statistics.median(cpu_share) * 100:.0f}%", ""])


def group_cpu(pid: int) -> float:
    """CPU seconds of a process and of its children alive now (WORKERS=N's workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sum(sum(cpu_seconds(int(p))) for p in [pid, *children])


def workers(args: argparse.Namespace, workdir: Path, rows: list[list[str]]) -> None:
    """Small requests through WORKERS=1 and WORKERS=2, same backend, same load, same run:
    what a second worker process buys on this machine (whose cores also run the load and
    the backend)."""
    nginx = Nginx(workdir) if shutil.which("nginx") else None
    fallback = None
    if nginx:
        backend_port = nginx.backend_port
    else:
        fallback, backend_port = start_stream_backend(1, 0.0)
    for loop in event_loops():
        workers_on(args, workdir, rows, loop, backend_port, nginx)
    if nginx:
        nginx.stop()
    if fallback:
        fallback.terminate()


def workers_on(args: argparse.Namespace, workdir: Path, rows: list[list[str]], loop: str,
               backend_port: int, nginx: Nginx | None) -> None:
    groups = {n: Balancer(workdir / f"workers{n}-{loop}", "--event-loop", loop,
                          "--workers", str(n)) for n in (1, 2)}
    try:
        for balancer in groups.values():
            balancer.add_server(backend_port)
        time.sleep(2.5)  # the other worker learns of the server and takes its share
        for balancer in groups.values():
            load(balancer.port, "/api/embed", 1.0, True)  # warm-up, not counted
        runs: dict[int, list[Run]] = {n: [] for n in groups}
        cpu = dict.fromkeys(groups, 0.0)
        for _ in range(args.repeats):
            for n, balancer in groups.items():
                before = group_cpu(balancer.proc.pid)
                runs[n].append(load(balancer.port, "/api/embed", args.seconds, True))
                cpu[n] += group_cpu(balancer.proc.pid) - before
        nginx_rate = (statistics.median(load(nginx.proxy_port, "/api/embed", args.seconds,
                                             True).rate for _ in range(args.repeats))
                      if nginx else None)
        one = statistics.median(r.rate for r in runs[1])
        for n, measured in runs.items():
            rate, p50, p99 = (statistics.median(getattr(r, f) for r in measured)
                              for f in ("rate", "p50", "p99"))
            count = max(1.0, sum(r.rate for r in measured) * args.seconds)
            notes = [f"{rate / one:.2f}x WORKERS=1",
                     f"CPU {cpu[n] / count * 1e6:.0f} us a request, all workers"]
            if nginx_rate:
                notes.append(f"{rate / nginx_rate:.2f}x nginx")
            if errors := sum(r.errors for r in measured):
                notes.append(f"ERRORS: {errors} answers not 2xx or broken")
            rows.append([f"POST /api/embed via balancer ({loop}), WORKERS={n}",
                         f"{rate:,.0f} req/s {spread(measured, 'rate')}",
                         f"p50 {p50:.2f} ms", f"p99 {p99:.2f} ms", "", ", ".join(notes)])
    finally:
        for balancer in groups.values():
            balancer.stop()


def fleet_scale(args: argparse.Namespace, workdir: Path, rows: list[list[str]]) -> None:
    """A fleet of ``--fleet-size`` simulated servers (one process, a port each): the time
    of an addServer as the fleet grows, the health loop's share of a core once they are
    all in (no traffic), and what the status pages and the dashboard cost then."""
    import http.client

    count = args.fleet_size
    backend = subprocess.Popen([sys.executable, "-c", FLEET_BACKEND, str(count),
                                json.dumps(TAGS)], stdout=subprocess.PIPE, text=True,
                               preexec_fn=raise_nofile)
    balancer = None
    try:
        assert backend.stdout is not None
        ports = json.loads(backend.stdout.readline())
        balancer = Balancer(workdir / "fleet", "--event-loop", "asyncio",
                            "--health-interval", "10")  # the defaults, for the loop's cost
        conn = http.client.HTTPConnection("127.0.0.1", balancer.port, timeout=60)

        def get(path: str) -> tuple[float, int]:
            started = time.perf_counter()
            conn.request("GET", path)
            answer = conn.getresponse()
            size = len(answer.read())
            if answer.status != 200:
                raise RuntimeError(f"{path}: {answer.status}")
            return (time.perf_counter() - started) * 1000, size

        took = []
        for port in ports:
            body = json.dumps({"url": f"http://127.0.0.1:{port}"})
            started = time.perf_counter()
            conn.request("POST", "/servers/addServer", body,
                         {"Content-Type": "application/json"})
            answer = conn.getresponse()
            reply = json.loads(answer.read())
            took.append((time.perf_counter() - started) * 1000)
            if answer.status != 201 or not reply["reachable"]:
                raise RuntimeError(f"could not add server {len(took)}: {reply}")
        span = max(1, count // 100)
        rows.append([f"addServer, servers 1-{span:,}", f"p50 {pct(took[:span], 50):.2f} ms",
                     f"p99 {pct(took[:span], 99):.2f} ms", "", "", ""])
        rows.append([f"addServer, servers {count - span + 1:,}-{count:,}",
                     f"p50 {pct(took[-span:], 50):.2f} ms", f"p99 {pct(took[-span:], 99):.2f} ms",
                     f"the {count:,}th: {took[-1]:.2f} ms", "", ""])
        settle, watch = (2.0, 3.0) if args.quick else (12.0, 30.0)
        time.sleep(settle)  # past the first full round
        before, started = cpu_seconds(balancer.proc.pid), time.monotonic()
        time.sleep(watch)
        after, elapsed = cpu_seconds(balancer.proc.pid), time.monotonic() - started
        share = (sum(after) - sum(before)) / elapsed
        rows.append([f"health loop, {count:,} servers, no traffic",
                     f"{share * 100:.1f}% of a core", f"over {elapsed:.0f} s",
                     "HEALTH_INTERVAL 10 s, HEALTH_CONCURRENCY 64, SYNC_INTERVAL 1 s", "", ""])
        for path in ("/servers/status?limit=100", "/servers/allServers?limit=100",
                     "/dashboard", "/servers/allServers"):
            times, size = zip(*(get(path) for _ in range(5)), strict=True)
            rows.append([f"GET {path}, {count:,} servers", f"{statistics.median(times):.1f} ms",
                         f"{size[0] / 1024:,.0f} KiB", "", "", ""])
        conn.close()
        if shutil.which("chromium"):
            rows.append(dashboard_in_chromium(balancer.port, count, workdir,
                                              1 if args.quick else 3))
    finally:
        if balancer:
            balancer.stop()
        backend.terminate()
        backend.wait(10)


def dashboard_in_chromium(port: int, count: int, workdir: Path, repeats: int) -> list[str]:
    """Chromium (headless) loads the dashboard and runs its script to the page drawn; the
    time to that DOM, of a page of its servers and the cards that count them all."""
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
               f"--user-data-dir={workdir / 'chromium'}", "--dump-dom",
               f"http://127.0.0.1:{port}/dashboard"]
    times, rows_drawn = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        times.append(time.perf_counter() - started)
        rows_drawn = done.stdout.count('<td class="load">')
    return [f"dashboard in Chromium, {count:,} servers", f"{statistics.median(times):.2f} s",
            f"{rows_drawn} rows drawn", "headless, from start to the drawn DOM (--dump-dom)",
            "", ""]


def routing(rows: list[list[str]]) -> None:
    """A decision as a request makes it: pick a server for a model, take the slot, and
    give it back when done (which re-ranks the server), over a fleet of N servers that
    all have the model, the default strategy (least_load)."""
    for count in (10, 100, 1000):
        scheduler = ob.Scheduler(ob.Config(max_concurrency=10**6))
        servers = {i: ob.Server(i, f"h{i}", 11434, reachable=True, models=[
            {"name": f"model{i % 20}:latest"}, {"name": "common:latest"}])
            for i in range(1, count + 1)}

        def decide(scheduler: ob.Scheduler = scheduler,
                   servers: dict[int, ob.Server] = servers) -> None:
            server, _ = scheduler.ranking.pick(servers, "common:latest")
            assert server is not None
            scheduler.release(servers, scheduler.take(server, "common:latest"))

        decide()  # the first decision for a model builds its index
        runs = 2000
        times = [t / runs * 1e6 for t in timeit.repeat(decide, number=runs, repeat=5)]
        half = (max(times) - min(times)) / 2
        rows.append([f"scheduling decision, {count} servers",
                     f"{statistics.median(times):,.1f} us (±{half:.1f})",
                     "pick + take + release", "", "", ""])
        # A chat turn: its conversation's server by rendezvous hashing, over every server
        # that has the model loaded (here all of them: the worst case, a scan).
        for server in servers.values():
            scheduler.release(servers, scheduler.take(server, "common:latest"))
        keys = itertools.count()

        def converse(scheduler: ob.Scheduler = scheduler,
                     servers: dict[int, ob.Server] = servers,
                     keys: Iterator[int] = keys) -> None:
            affinity = ob.Affinity(b"conversation %d" % next(keys), None)
            server, _ = scheduler.ranking.pick(servers, "common:latest", affinity)
            assert server is not None
            scheduler.release(servers, scheduler.take(server, "common:latest"))

        runs = max(100, 20_000 // count)
        times = [t / runs * 1e6 for t in timeit.repeat(converse, number=runs, repeat=5)]
        half = (max(times) - min(times)) / 2
        rows.append([f"scheduling decision, {count} servers, conversation affinity",
                     f"{statistics.median(times):,.1f} us (±{half:.1f})",
                     "pick + take + release, the model loaded on every server", "", "",
                     ""])
    for waiting in (100, 10_000):
        rows.append([f"queue: a slot handed on, {waiting:,} waiting of 100 keys",
                     f"{fair_dispatch(waiting):,.1f} us", "release + dispatch in fair "
                     "order (O(log n))", "", "", ""])


def fair_dispatch(waiting: int) -> float:
    """Microseconds a release costs that hands the one slot to the next of ``waiting``
    requests of 100 keys in fair order (and the granted request's own release, which
    hands it on again), measured over 500 of them."""
    async def scenario() -> float:
        config = ob.Config(num_parallel=1, max_loaded_models=1, max_concurrency=1,
                           max_queue=waiting + 10)
        server = ob.Server(1, "h1", 11434, reachable=True, models=[{"name": "m:latest"}])
        scheduler, servers = ob.Scheduler(config), {1: server}
        slot = scheduler.take(server, "m:latest")
        done: list[asyncio.Future[ob.Slot]] = []
        tasks = [asyncio.ensure_future(scheduler.acquire(
            servers, "m:latest", tenant=ob.Tenant(f"key {i % 100}"))) for i in range(waiting)]
        for task in tasks:
            task.add_done_callback(done.append)
        await asyncio.sleep(0)
        grants = 500 if waiting > 500 else waiting // 2
        spent = 0.0
        for _ in range(grants):
            started = time.perf_counter()
            scheduler.release(servers, slot)  # hands it to the next in fair order
            spent += time.perf_counter() - started
            while not done:
                await asyncio.sleep(0)
            slot = done.pop().result()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return spent / grants * 1e6

    return asyncio.run(scenario())


def instructions(args: argparse.Namespace, workdir: Path, rows: list[list[str]]) -> None:
    """Instructions the balancer's process runs per request, counted by valgrind's
    callgrind: one client, one request at a time, after a warm-up. Unlike a time, the
    count is the same run after run whatever else the machine is doing (to within a
    fraction of a percent here), so it shows what a change to the hot path buys even
    where the noise of a shared machine hides it. It counts the process's own work, not
    the kernel's (the system calls) nor time spent waiting."""
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        rows.append(["instructions a request", "valgrind not installed", "", "", "", ""])
        return
    nginx = Nginx(workdir) if shutil.which("nginx") else None
    fallback = None
    backend_port = nginx.backend_port if nginx else None
    if backend_port is None:
        fallback, backend_port = start_stream_backend(1, 0.0)
    # Tokens 10 ms apart: each arrives on its own, as a model's do. Its model is another,
    # so that the routed requests all go to the first backend.
    streamer, stream_port = start_stream_backend(STREAM_TOKENS, 0.01, {"models": [
        {**TAGS["models"][0], "name": "stream:latest", "model": "stream:latest"}]})
    try:
        for loop in event_loops()[:1] if args.quick else event_loops():
            count_instructions(args, workdir / f"callgrind-{loop}", loop,
                               (backend_port, stream_port), rows)
    finally:
        streamer.terminate()
        if nginx:
            nginx.stop()
        if fallback:
            fallback.terminate()


#: Tokens a stream of the instructions part: its count is per token, the request's own
#: work spread over them.
STREAM_TOKENS = 200


def count_instructions(args: argparse.Namespace, workdir: Path, loop: str,
                       ports: tuple[int, int], rows: list[list[str]]) -> None:
    import http.client

    out = workdir / "callgrind.out"
    balancer = Balancer(workdir, "--event-loop", loop, wrapper=[
        "valgrind", "--tool=callgrind", "--instr-atstart=no",
        f"--callgrind-out-file={out}"], start_timeout=120,
        settings={"HEALTH_INTERVAL": "3600"})  # no health round among the counted requests
    count = 10 if args.quick else 500
    pid = str(balancer.proc.pid)
    try:
        for port in ports:
            balancer.add_server(port)
        conn = http.client.HTTPConnection("127.0.0.1", balancer.port, timeout=60)

        def send(method: str, path: str, times: int, recovery: str) -> None:
            for _ in range(times):
                body = EMBED_BODY if method == "POST" else None
                if path.endswith("/api/chat"):
                    body = json.dumps({"model": "stream", "messages": []})
                conn.request(method, path, body, {"Content-Type": "application/json",
                                                  "X-Recovery": recovery})
                answer = conn.getresponse()
                answer.read()
                if answer.status != 200:
                    raise RuntimeError(f"{path} answered {answer.status}")

        streams = 1 if args.quick else 10
        for name, method, path, times, per, recovery in (
                ("POST /api/embed, routed", "POST", "/api/embed", count, 1, "on"),
                ("GET /api/version, its own answer", "GET", "/api/version", count, 1, "on"),
                ("GET /servers/ollama/1/api/version, relayed", "GET",
                 "/servers/ollama/1/api/version", count, 1, "on"),
                (f"a token of a relayed /api/chat stream ({STREAM_TOKENS} a stream)", "POST",
                 "/servers/ollama/2/api/chat", streams, STREAM_TOKENS, "on"),
                # At the root, kept for a continuation should its server fail (RECOVERY),
                # and with the request's X-Recovery: off, relayed as it comes.
                (f"a token of a routed /api/chat stream ({STREAM_TOKENS} a stream)", "POST",
                 "/api/chat", streams, STREAM_TOKENS, "on"),
                ("the same, X-Recovery: off", "POST", "/api/chat", streams, STREAM_TOKENS,
                 "off")):
            # Warm-up: imports, the index, a pooled connection.
            send(method, path, (10 if args.quick else 50) if per == 1 else 1, recovery)
            for command in ("--zero", "--instr=on"):
                subprocess.run(["callgrind_control", command, pid], capture_output=True,
                               check=True)
            send(method, path, times, recovery)
            for command in ("--instr=off", "--dump"):
                subprocess.run(["callgrind_control", command, pid], capture_output=True,
                               check=True)
            dumps = list(workdir.glob("callgrind.out.*"))
            total = max((int(line.split()[1]) for dump in dumps
                         for line in dump.read_text().splitlines()
                         if line.startswith(("summary:", "totals:"))), default=0)
            for dump in dumps:
                dump.unlink()
            rows.append([f"instructions ({loop}): {name}", f"{total / times / per:,.0f}",
                         f"callgrind, {times} requests, 1 client", "", "", ""])
        conn.close()
    finally:
        balancer.stop()


def run_group(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Runs ``command`` in a process group of its own, killed whole (its children too)
    if it overruns or this script is interrupted."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def fleet(args: argparse.Namespace, rows: list[list[str]]) -> None:
    """The fleet simulator (bench/fleet_sim.py): every strategy on a fleet that must juggle
    models that do not all fit, then the learning scenarios (configured or not,
    heterogeneous servers, conversations with and without affinity)."""
    for scenario in ("strategies", "learning"):
        command = [sys.executable, str(ROOT / "bench" / "fleet_sim.py"), "--scenario", scenario]
        if args.quick:  # a run of each kind of fleet and workload: that they still run
            command += ["--quick", *(["--only", "heterogeneous, unconfigured",
                                      "conversations, affinity"] if scenario == "learning"
                                     else [])]
        done = run_group(command, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"fleet_sim.py failed: {done.stderr[-2000:]}")
        found = re.findall(r"^(\S.*?)\s+p50\s+([0-9.]+) s\s+p95\s+([0-9.]+) s\s+p99\s+([0-9.]+) s"
                           r"\s+TTFT p50\s+([0-9.]+) s.*?(\d+) cold loads\s+(\d+) failed"
                           r"\s+(?:(\d+ of \d+ conversations stayed).*?\s+)?\[(.*)\]$",
                           done.stdout, re.MULTILINE)
        if not found:
            raise RuntimeError(f"fleet_sim.py printed no table: {done.stdout[-2000:]}")
        for name, p50, p95, p99, ttft, loads, failed, stayed, setup in found:
            rows.append([f"fleet simulator, {name}", f"p50 {p50} s", f"p95 {p95} s",
                         f"p99 {p99} s", f"TTFT p50 {ttft} s, {loads} cold loads, "
                         f"{failed} failed" + (f", {stayed}" if stayed else ""), setup])
        rows.extend([line, "", "", "", "", ""] for line in done.stdout.splitlines()
                    if "(aim:" in line)


SECTIONS = ("small", "instructions", "workers", "streams", "scale", "fleet-scale", "attacks",
            "routing", "fleet")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--seconds", type=float, default=5.0, help="per load run")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of every measurement; rows show the median and spread")
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds to open streams")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--idle-streams", type=int, default=10_000)
    parser.add_argument("--fleet-size", type=int, default=10_000,
                        help="simulated servers of the fleet-scale part")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these parts of the suite")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.streams, args.idle_streams, args.ramp = 1.0, 50, 200, 0.2
        args.repeats, args.fleet_size = 1, 200
    raise_nofile()
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as name:
        workdir = Path(name)
        if "small" in args.only:
            small_requests(args, workdir, rows)
        if "instructions" in args.only:
            instructions(args, workdir, rows)
        if "workers" in args.only:
            workers(args, workdir, rows)
        if "streams" in args.only:
            streams(args, workdir, rows, args.streams, 200 if not args.quick else 20, 0.02,
                    "streams")
        if "scale" in args.only:
            streams(args, workdir, rows, args.idle_streams, 3,
                    5.0 if not args.quick else 0.5, "idle streams")
        if "fleet-scale" in args.only:
            fleet_scale(args, workdir, rows)
        if "attacks" in args.only:
            big_bodies(args, workdir, rows)
            tiny_chunks(args, workdir, rows)
    if "routing" in args.only:
        routing(rows)
    if "fleet" in args.only:
        fleet(args, rows)
    print(f"ollamabalancer {ob.__version__}, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cores, load from {'wrk' if shutil.which('wrk') else 'Python'}")
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    fits = ob.connection_cap(10**9, None if hard == resource.RLIM_INFINITY else hard)
    if "scale" in args.only and fits < args.idle_streams:
        print(f"note: the hard limit on open files is {hard}, two a relayed stream: the "
              f"balancer holds {fits} streams at most and refuses the rest (ulimit -Hn)")
    return 0


if __name__ == "__main__":
    threading.stack_size(256 * 1024)
    sys.exit(main())
