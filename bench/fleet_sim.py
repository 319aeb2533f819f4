#!/usr/bin/env python3
"""Fleet simulator: how much each routing strategy gets out of a fleet of Ollama servers.

Simulated servers behave as Ollama does where it matters for routing:
- each keeps at most ``--resident`` models loaded; a request for another one waits until a
  loaded model is idle, evicts the least recently used, and pays ``--cold-load`` seconds;
- each loaded model runs ``--parallel`` requests at once (OLLAMA_NUM_PARALLEL); the rest
  wait inside the server, where no other server can take them;
- /api/tags lists every model (all are installed everywhere), /api/ps the loaded ones.

A seeded workload (Poisson arrivals, models by a skewed popularity, varied lengths) is sent
through the real balancer, started once per strategy, and the report gives latency
percentiles and makespan for each; a failed request (a 503 from a full queue) counts in
the percentiles at the balancer's queue timeout. Run it as ``python bench/fleet_sim.py``;
``--quick`` runs a few seconds, for CI. It runs on real time, real sockets and a real
balancer, so two runs of one seed differ a little: compare strategies within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ("least_load", "round_robin", "random")


@dataclass
class Resident:
    slots: asyncio.Semaphore
    active: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class SimServer:
    """One simulated Ollama server on 127.0.0.1."""

    def __init__(self, models: list[str], parallel: int, resident: int, cold_load: float
                 ) -> None:
        self.models = models
        self.parallel = parallel
        self.max_resident = resident
        self.cold_load = cold_load
        self.loaded: collections.OrderedDict[str, Resident] = collections.OrderedDict()
        self.changed = asyncio.Condition()
        self.cold_loads = 0
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                body = await reader.readexactly(int(length.group(1))) if length else b""
                status, payload = await self._answer(method, path, body)
                data = json.dumps(payload).encode()
                writer.write(b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (status, len(data), data))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            return  # the benchmark is over; nothing to report
        finally:
            writer.close()

    async def _answer(self, method: str, path: str, body: bytes) -> tuple[int, object]:
        if path == "/api/tags":
            return 200, {"models": [self._tag(m) for m in self.models]}
        if path == "/api/ps":
            return 200, {"models": [self._tag(m) for m in self.loaded]}
        if path == "/api/version":
            return 200, {"version": "0.12.0"}
        request = json.loads(body)
        model, seconds = request["model"], request["options"]["sim_seconds"]
        resident = await self._load(model)
        async with resident.slots:
            await asyncio.sleep(seconds)
        resident.active -= 1
        async with self.changed:
            self.changed.notify_all()
        return 200, {"model": model, "response": "x", "done": True}

    async def _load(self, model: str) -> Resident:
        async with self.changed:
            while True:
                resident = self.loaded.get(model)
                if resident is not None:
                    resident.active += 1
                    self.loaded.move_to_end(model)
                    break
                if len(self.loaded) < self.max_resident:
                    resident = Resident(asyncio.Semaphore(self.parallel), active=1)
                    self.loaded[model] = resident
                    self.cold_loads += 1
                    asyncio.get_running_loop().call_later(self.cold_load, resident.ready.set)
                    break
                idle = next((name for name, r in self.loaded.items() if r.active == 0), None)
                if idle is not None:
                    del self.loaded[idle]  # evict the least recently used idle model
                    continue
                await self.changed.wait()  # every loaded model is busy: Ollama waits too
        await resident.ready.wait()
        return resident

    @staticmethod
    def _tag(name: str) -> dict[str, object]:
        return {"name": name, "model": name, "size": 1, "digest": "0" * 64,
                "modified_at": "2026-11-01T00:00:00Z",
                "details": {"parameter_size": "8.0B", "family": "llama"}}


@dataclass(frozen=True)
class Job:
    at: float
    model: str
    seconds: float


def workload(seed: int, models: list[str], rate: float, duration: float, service: float
             ) -> list[Job]:
    """Poisson arrivals over ``duration``; model popularity falls off as 1/rank."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(models))]
    jobs, now = [], 0.0
    while True:
        now += rng.expovariate(rate)
        if now > duration:
            return jobs
        model = rng.choices(models, weights)[0]
        jobs.append(Job(now, model, service * rng.uniform(0.5, 1.5)))


async def post(port: int, path: str, payload: object) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        data = json.dumps(payload).encode()
        writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (path.encode(), len(data), data))
        await writer.drain()
        answer = await reader.read()
        return int(answer.split(b" ", 2)[1]), answer
    finally:
        writer.close()


#: The balancer's QUEUE_TIMEOUT (its default): what a failed request counts as.
QUEUE_TIMEOUT = 300.0


def start_balancer(strategy: str, db: Path, parallel: int, resident: int
                   ) -> tuple[subprocess.Popen[str], int]:
    """The balancer, told the fleet's Ollama settings as an operator would."""
    cap = parallel * resident
    env = {**os.environ, "STRATEGY": strategy, "MAX_CONCURRENCY": str(cap),
           "NUM_PARALLEL": str(parallel), "MAX_LOADED_MODELS": str(resident),
           "DB_ENGINE": "sqlite", "DB_PATH": str(db), "HEALTH_INTERVAL": "1",
           "LOG_LEVEL": "warning"}
    env.pop("DB_HOST", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "ollamabalancer.py"), "--ip",
                             "127.0.0.1", "--port", "0", "--log-level", "info"],
                            env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if match:
            # Keep reading its log (an access line a request), or a full pipe stalls it.
            threading.Thread(target=collections.deque, args=(proc.stderr, 0),
                             daemon=True).start()
            return proc, int(match.group(1))
    raise RuntimeError("the balancer did not start")


async def run_strategy(strategy: str, args: argparse.Namespace, jobs: list[Job],
                       models: list[str], db: Path) -> dict[str, float]:
    servers = [SimServer(models, args.parallel, args.resident, args.cold_load)
               for _ in range(args.servers)]
    for server in servers:
        await server.start()
    proc, port = start_balancer(strategy, db, args.parallel, args.resident)
    try:
        for server in servers:
            status, _ = await post(port, "/servers/addServer",
                                   {"url": f"http://127.0.0.1:{server.port}"})
            assert status == 201
        for server in servers:  # start cold, as a fleet does after a restart
            server.loaded.clear()
            server.cold_loads = 0
        latencies: list[float] = []
        failures = 0
        start = time.monotonic()
        counted_loads = 0

        async def one(job: Job) -> None:
            nonlocal failures, counted_loads
            await asyncio.sleep(max(0.0, start + job.at - time.monotonic()))
            if job.at >= args.warmup and not counted_loads:
                counted_loads = -sum(s.cold_loads for s in servers)  # loads from here on
            sent = time.monotonic()
            status, _ = await post(port, "/api/generate", {
                "model": job.model, "prompt": "x", "stream": False,
                "options": {"sim_seconds": job.seconds}})
            took = time.monotonic() - sent
            if status != 200:
                failures += 1
                # A refusal is fast, but the user got nothing: it counts as if it had
                # waited the balancer's queue timeout, so failing is never a good figure.
                took = max(took, QUEUE_TIMEOUT)
            if job.at >= args.warmup:  # the fleet's warm-up after a restart is not counted
                latencies.append(took)

        await asyncio.gather(*(one(job) for job in jobs))
        makespan = time.monotonic() - start
    finally:
        proc.terminate()
        proc.wait(10)
        for server in servers:
            await server.close()
        db.unlink(missing_ok=True)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98], "makespan": makespan,
            "cold_loads": counted_loads + sum(s.cold_loads for s in servers),
            "failed": failures,
            "done": len(latencies)}


async def main_async(args: argparse.Namespace) -> int:
    models = [f"model{i}:latest" for i in range(args.models)]
    capacity = args.servers * args.resident * args.parallel / args.service
    rate = capacity * args.load
    jobs = workload(args.seed, models, rate, args.duration, args.service)
    print(f"fleet: {args.servers} servers x {args.resident} resident models x "
          f"{args.parallel} parallel; {args.models} models; cold load {args.cold_load:g} s; "
          f"mean service {args.service:g} s")
    print(f"workload: seed {args.seed}, {len(jobs)} requests in {args.duration:g} s "
          f"({rate:.1f}/s, {args.load:.0%} of a warm fleet's capacity); the first "
          f"{args.warmup:g} s warm the fleet up and are not counted\n")
    results = {}
    db = Path(f"/tmp/fleet_sim_{os.getpid()}.db")
    for strategy in args.strategies:
        results[strategy] = await run_strategy(strategy, args, jobs, models, db)
    print(f"{'strategy':<12} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'makespan s':>11} "
          f"{'cold loads':>11} {'failed':>7}   (cold loads after the warm-up)")
    for strategy, r in results.items():
        print(f"{strategy:<12} {r['p50']:7.2f} {r['p95']:7.2f} {r['p99']:7.2f} "
              f"{r['makespan']:11.2f} {r['cold_loads']:11.0f} {r['failed']:7.0f}")
    if "random" in results and "least_load" in results:
        ratio = results["least_load"]["p95"] / results["random"]["p95"]
        print(f"\np95 least_load / random = {ratio:.2f} (aim: at most 0.50)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--resident", type=int, default=3,
                        help="models loaded at once (OLLAMA_MAX_LOADED_MODELS)")
    parser.add_argument("--parallel", type=int, default=2, help="OLLAMA_NUM_PARALLEL")
    parser.add_argument("--cold-load", type=float, default=2.0, help="seconds")
    parser.add_argument("--service", type=float, default=0.5, help="mean seconds a request")
    parser.add_argument("--load", type=float, default=0.7, help="share of warm capacity")
    parser.add_argument("--duration", type=float, default=50.0, help="seconds of arrivals")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of arrivals not counted")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES),
                        choices=STRATEGIES)
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup, args.cold_load, args.service = 4.0, 1.0, 0.3, 0.1
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
