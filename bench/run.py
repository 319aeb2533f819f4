#!/usr/bin/env python3
"""Performance suite: the balancer beside nginx and beside going direct, in one run.

    python bench/run.py            # the whole suite, a few minutes
    python bench/run.py --quick    # a few seconds, to check that it runs

Everything starts here on 127.0.0.1 and every figure in the table comes from the same run:

- small requests: req/s and p50/p99 latency of POST /api/embed (model-routed) and GET
  /api/version with 64 keep-alive clients (wrk when installed, else a Python generator),
  direct to a fast backend (nginx ``return 200``, else a minimal asyncio one), through nginx
  (one worker, upstream keep-alive, proxy_buffering off; when installed) and through the
  balancer;
- streams: concurrent /api/chat streams of N tokens at a fixed pace from a simulated backend,
  direct and through the balancer: added time to first byte and added delay per chunk
  (p50, p99), and the balancer's peak RSS;
- scale: many open streams idle between tokens: peak RSS and streams lost;
- routing: time per scheduling decision with 10, 100 and 1,000 servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import timeit
from pathlib import Path

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


class Nginx:
    """nginx as the fast backend (return 200) and, on another port, as a reverse proxy."""

    def __init__(self, workdir: Path) -> None:
        self.backend_port, self.proxy_port = free_port(), free_port()
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
                }}
            }}
            """))
        self.proc = subprocess.Popen([shutil.which("nginx") or "nginx", "-c", str(conf),
                                      "-p", str(workdir)], stderr=subprocess.DEVNULL)
        wait_port(self.backend_port)
        wait_port(self.proxy_port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Balancer:
    def __init__(self, workdir: Path, *extra: str) -> None:
        env = {**os.environ, "DB_ENGINE": "sqlite", "DB_PATH": str(workdir / "bench.db"),
               "LOG_LEVEL": "warning", "HEALTH_INTERVAL": "5", "MAX_CONCURRENCY": "100000",
               "NUM_PARALLEL": "1000", "MAX_QUEUE": "100000"}
        env.pop("DB_HOST", None)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "ollamabalancer.py"), "--ip", "127.0.0.1",
             "--port", str(self.port), *extra], env=env, stderr=subprocess.PIPE, text=True,
            preexec_fn=raise_nofile)
        try:
            wait_port(self.port)
        except RuntimeError:
            self.proc.kill()
            raise RuntimeError("the balancer did not start: "
                               + (self.proc.communicate()[1] or "")[-2000:]) from None
        assert self.proc.stderr is not None  # drained, so a full pipe never stalls it
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()

    def add_server(self, port: int) -> None:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("POST", "/servers/addServer",
                     json.dumps({"url": f"http://127.0.0.1:{port}"}))
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


STREAM_BACKEND = r'''
import asyncio, json, sys, time
TOKENS, PACE = int(sys.argv[2]), float(sys.argv[3])
TAGS = sys.argv[4].encode()
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
            start = time.monotonic()
            for index in range(TOKENS + 1):
                await asyncio.sleep(max(0.0, start + index * PACE - time.monotonic()))
                line = json.dumps({"t": time.monotonic(), "done": index == TOKENS}).encode()
                line += b"\n"
                writer.write(b"%x\r\n%s\r\n" % (len(line), line))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]), backlog=16384)
    async with server:
        await server.serve_forever()
asyncio.run(main())
'''


def start_stream_backend(tokens: int, pace: float) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", STREAM_BACKEND, str(port), str(tokens),
                             str(pace), json.dumps(TAGS)], preexec_fn=raise_nofile)
    wait_port(port)
    return proc, port


# -- load generators --------------------------------------------------------------------------


def wrk(url: str, seconds: float, post: bool) -> tuple[float, float, float]:
    """req/s, p50 ms, p99 ms, with 64 keep-alive connections."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        if post:
            script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(EMBED_BODY)}\n'
                         'wrk.headers["Content-Type"] = "application/json"\n')
    done = subprocess.run(["wrk", "-t1", "-c64", f"-d{seconds:g}s", "--latency", "-s",
                           script.name, url], capture_output=True, text=True, timeout=120)
    os.unlink(script.name)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout).group(1))  # type: ignore[union-attr]

    def percentile(name: str) -> float:
        value, unit = re.search(rf"\s{name}%\s+([\d.]+)(us|ms|s)", done.stdout).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return rate, percentile("50"), percentile("99")


async def python_load(port: int, path: str, seconds: float, post: bool
                      ) -> tuple[float, float, float]:
    """The same measurement as wrk, in Python, for machines without wrk."""
    body = EMBED_BODY.encode() if post else b""
    method = b"POST" if post else b"GET"
    request = (b"%s %s HTTP/1.1\r\nHost: b\r\nContent-Length: %d\r\n\r\n%s"
               % (method, path.encode(), len(body), body))
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < stop:
            sent = time.monotonic()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            latencies.append(time.monotonic() - sent)
        writer.close()

    await asyncio.gather(*(client() for _ in range(64)))
    cuts = statistics.quantiles(latencies, n=100)
    return len(latencies) / seconds, cuts[49] * 1000, cuts[98] * 1000


def load(port: int, path: str, seconds: float, post: bool) -> tuple[float, float, float]:
    if shutil.which("wrk"):
        return wrk(f"http://127.0.0.1:{port}{path}", seconds, post)
    return asyncio.run(python_load(port, path, seconds, post))


STREAM_CLIENT = r'''
import asyncio, json, sys, time
port, streams, ramp = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
first, gaps, lost, refused, why = [], [], 0, 0, {}
async def one(index):
    global lost, refused
    await asyncio.sleep(ramp * index / streams)
    body = b'{"model":"bench","messages":[],"stream":true}'
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sent = time.monotonic()
        writer.write(b"POST /api/chat HTTP/1.1\r\nHost: b\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 503 "):  # refused at the door, cleanly: not lost
            refused += 1
            writer.close()
            return
        got_first = False
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                break
            line = await reader.readexactly(size + 2)
            now = time.monotonic()
            event = json.loads(line)
            if not got_first:
                first.append(now - sent); got_first = True
            gaps.append(now - event["t"])
            if event["done"]:
                await reader.readexactly(5)
                break
        writer.close()
    except Exception as exc:
        lost += 1
        key = (getattr(exc, "partial", b"") or str(exc).encode())[:160].decode("latin-1")
        why[key] = why.get(key, 0) + 1
async def main():
    await asyncio.gather(*(one(i) for i in range(streams)))
    print(json.dumps({"first": first, "gaps": gaps, "lost": lost, "refused": refused,
                      "why": why}))
asyncio.run(main())
'''


def run_streams(port: int, streams: int, ramp: float) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", STREAM_CLIENT, str(port), str(streams),
                           str(ramp)], capture_output=True, text=True, timeout=900,
                          preexec_fn=raise_nofile)
    return dict(json.loads(done.stdout))


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# -- the suite --------------------------------------------------------------------------------


def small_requests(args: argparse.Namespace, workdir: Path, rows: list[list[str]]) -> None:
    nginx = Nginx(workdir) if shutil.which("nginx") else None
    backend_port = nginx.backend_port if nginx else None
    fallback = None
    if backend_port is None:  # no nginx: the stream backend answers /api/version fast
        fallback, backend_port = start_stream_backend(1, 0.0)
    balancer = Balancer(workdir)
    try:
        balancer.add_server(backend_port)
        results = {}
        # /api/version at the root is answered by the balancer itself; the relayed GET is
        # the passthrough to one server.
        for name, path, relayed, post in (
                ("POST /api/embed", "/api/embed", "/api/embed", True),
                ("GET /api/version", "/api/version", "/servers/ollama/1/api/version", False)):
            targets = [("direct", backend_port, path)]
            if nginx:
                targets.append(("nginx", nginx.proxy_port, path))
            targets.append(("balancer", balancer.port, relayed))
            if relayed != path:
                targets.append(("balancer, own answer", balancer.port, path))
            for label, port, target in targets:
                results[(name, label)] = load(port, target, args.seconds, post)
        for (name, label), (rate, p50, p99) in results.items():
            direct_p50 = results[(name, "direct")][1]
            added = "" if label == "direct" else f"{p50 - direct_p50:+.2f}"
            versus = ""
            if label == "balancer" and (name, "nginx") in results:
                versus = f"{rate / results[(name, 'nginx')][0]:.2f}x nginx"
            rows.append([f"{name} via {label}", f"{rate:,.0f} req/s", f"p50 {p50:.2f} ms",
                         f"p99 {p99:.2f} ms", f"added p50 {added} ms" if added else "",
                         versus])
    finally:
        balancer.stop()
        if nginx:
            nginx.stop()
        if fallback:
            fallback.terminate()


def streams(args: argparse.Namespace, workdir: Path, rows: list[list[str]], count: int,
            tokens: int, pace: float, label: str) -> None:
    backend, port = start_stream_backend(tokens, pace)
    balancer = Balancer(workdir, "--upstream-timeout", "600")
    try:
        balancer.add_server(port)
        direct = run_streams(port, count, args.ramp)
        through = run_streams(balancer.port, count, args.ramp)
        rss = balancer.stop()
    finally:
        backend.terminate()
        if balancer.proc.poll() is None:
            balancer.stop()
    ms = 1000.0
    first_d, first_b = direct["first"], through["first"]
    gaps_d, gaps_b = direct["gaps"], through["gaps"]
    assert isinstance(first_d, list) and isinstance(first_b, list)
    assert isinstance(gaps_d, list) and isinstance(gaps_b, list)
    rows.append([f"{label}: {count} streams x {tokens} tokens",
                 f"added TTFB p50 {(pct(first_b, 50) - pct(first_d, 50)) * ms:+.2f} ms",
                 f"added per chunk p50 {(pct(gaps_b, 50) - pct(gaps_d, 50)) * ms:+.2f} ms",
                 f"p99 {(pct(gaps_b, 99) - pct(gaps_d, 99)) * ms:+.2f} ms",
                 f"peak RSS {rss:.0f} MB",
                 f"lost {through['lost']} (direct {direct['lost']}), refused with 503 "
                 f"{through['refused']}"])


def routing(rows: list[list[str]]) -> None:
    for count in (10, 100, 1000):
        scheduler = ob.Scheduler(ob.Config(max_concurrency=10**6))
        servers = {i: ob.Server(i, f"h{i}", 11434, reachable=True, models=[
            {"name": f"model{i % 20}:latest"}, {"name": "common:latest"}])
            for i in range(1, count + 1)}

        def decide(scheduler: ob.Scheduler = scheduler,
                   servers: dict[int, ob.Server] = servers) -> None:
            scheduler.choose(scheduler.candidates(servers.values(), "common:latest"),
                             "common:latest")

        runs = max(50, 20_000 // count)
        seconds = min(timeit.repeat(decide, number=runs, repeat=5)) / runs
        rows.append([f"scheduling decision, {count} servers", f"{seconds * 1e6:,.1f} us", "",
                     "", "", ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--seconds", type=float, default=5.0, help="per load run")
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds to open streams")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--idle-streams", type=int, default=10_000)
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.streams, args.idle_streams, args.ramp = 1.0, 50, 200, 0.2
    raise_nofile()
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as name:
        workdir = Path(name)
        small_requests(args, workdir, rows)
        streams(args, workdir, rows, args.streams, 200 if not args.quick else 20, 0.02,
                "streams")
        streams(args, workdir, rows, args.idle_streams, 3, 5.0 if not args.quick else 0.5,
                "scale (idle)")
    routing(rows)
    print(f"ollamabalancer {ob.__version__}, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cores, load from {'wrk' if shutil.which('wrk') else 'Python'}")
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
    return 0


if __name__ == "__main__":
    threading.stack_size(256 * 1024)
    sys.exit(main())
