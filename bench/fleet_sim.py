#!/usr/bin/env python3
"""Fleet simulator: how much the balancer gets out of a fleet of Ollama servers.

Simulated servers behave as Ollama does where it matters for routing:
- each keeps at most its own number of models loaded (OLLAMA_MAX_LOADED_MODELS); a request
  for another one waits until a loaded model is idle, evicts the least recently used, and
  pays ``--cold-load`` seconds;
- each loaded model runs its server's number of requests at once (OLLAMA_NUM_PARALLEL), in
  slots that each keep the prompt of the last request they ran (the KV cache): a request
  reads only the part of its prompt that the best slot has not cached, at ``--prefill``
  seconds a token, before its first token; the rest wait inside the server, where no
  other server can take them; an evicted model loses its caches;
- answers stream a token every ``--token`` seconds, as /api/chat does;
- /api/tags lists every model (all are installed everywhere), /api/ps the loaded ones.

Fleets are homogeneous (``--resident``, ``--parallel``) or given server by server
(``--fleet 1x1,2x1,2x2,3x2``: resident models x parallel). Two workloads, both seeded:
single requests (Poisson arrivals, models by a skewed popularity, varied lengths), and
multi-turn conversations (a long first prompt, then turns that each add a question and
the answer, a pause apart). Each scenario starts the real balancer, as an operator would
configure it (or not), sends the workload through it, and reports latency and time to
first token (p50, p95, p99), cold loads and failures; a failed request (a 503 from a full
queue) counts at the balancer's queue timeout.

    python bench/fleet_sim.py                       # the strategies, as before
    python bench/fleet_sim.py --scenario learning   # the issue's rows (several minutes)
    python bench/fleet_sim.py --quick               # a few seconds, for CI

It runs on real time, real sockets and a real balancer, so two runs of one seed differ a
little: compare rows within one run.
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
class Slot:
    """One of a loaded model's parallel slots, with the prompt its KV cache holds."""

    busy: bool = False
    cached: tuple[str, ...] = ()
    used: float = 0.0  # when it last began a request (monotonic)


@dataclass
class Resident:
    slots: list[Slot]
    active: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)


def common_prefix(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class SimServer:
    """One simulated Ollama server on 127.0.0.1."""

    def __init__(self, models: list[str], parallel: int, resident: int,
                 args: argparse.Namespace) -> None:
        self.models = models
        self.parallel = parallel
        self.max_resident = resident
        self.cold_load = args.cold_load
        self.prefill = args.prefill
        self.token = args.token
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
                _, path, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                body = await reader.readexactly(int(length.group(1))) if length else b""
                if path == "/api/chat":
                    await self._chat(json.loads(body), writer)
                    continue
                payload = self._answer(path)
                data = json.dumps(payload).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            return  # the benchmark is over; nothing to report
        finally:
            writer.close()

    def _answer(self, path: str) -> object:
        if path == "/api/tags":
            return {"models": [self._tag(m) for m in self.models]}
        if path == "/api/ps":
            return {"models": [self._tag(m) for m in self.loaded]}
        return {"version": "0.12.0"}

    async def _chat(self, request: dict[str, object], writer: asyncio.StreamWriter) -> None:
        model = str(request["model"])
        messages = request["messages"]
        assert isinstance(messages, list)
        prompt = tuple(json.dumps(m, sort_keys=True) for m in messages)
        sizes = [len(str(m.get("content", ""))) // 4 + 1 for m in messages]
        options = request["options"]
        assert isinstance(options, dict)
        tokens = int(options["sim_tokens"])
        resident = await self._load(model)
        async with self.changed:
            while True:
                free = [s for s in resident.slots if not s.busy]
                if free:
                    break
                await self.changed.wait()  # every slot busy: Ollama queues it here
            # As Ollama's runner: the free slot with the longest common prefix, else the
            # least recently used one.
            slot = max(free, key=lambda s: (common_prefix(s.cached, prompt), -s.used))
            slot.busy, slot.used = True, time.monotonic()
        try:
            cached = common_prefix(slot.cached, prompt)
            await asyncio.sleep(sum(sizes[cached:]) * self.prefill)
            slot.cached = prompt
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            for index in range(tokens):
                last = index == tokens - 1
                line = json.dumps({"model": model, "message": {"role": "assistant",
                                   "content": "tok "}, "done": last}).encode() + b"\n"
                writer.write(b"%x\r\n%s\r\n" % (len(line), line))
                await writer.drain()
                if not last:
                    await asyncio.sleep(self.token)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            async with self.changed:
                slot.busy = False
                resident.active -= 1
                self.changed.notify_all()

    async def _load(self, model: str) -> Resident:
        async with self.changed:
            while True:
                resident = self.loaded.get(model)
                if resident is not None:
                    resident.active += 1
                    self.loaded.move_to_end(model)
                    break
                if len(self.loaded) < self.max_resident:
                    resident = Resident([Slot() for _ in range(self.parallel)], active=1)
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
                "modified_at": "2026-11-01T00:00:00Z", "size_vram": 1,
                "details": {"parameter_size": "8.0B", "family": "llama"}}


# -- workloads --------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One request: when it may go (after the previous turn's answer, a pause later),
    what it adds to its conversation, and how many tokens it answers."""

    pause: float
    words: int
    tokens: int


@dataclass(frozen=True)
class Conversation:
    at: float
    model: str
    turns: tuple[Turn, ...]


def single_requests(seed: int, models: list[str], rate: float, duration: float,
                    tokens: int) -> list[Conversation]:
    """Poisson arrivals over ``duration``; model popularity falls off as 1/rank."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(models))]
    jobs, now = [], 0.0
    while True:
        now += rng.expovariate(rate)
        if now > duration:
            return jobs
        model = rng.choices(models, weights)[0]
        jobs.append(Conversation(now, model, (
            Turn(0.0, rng.randint(20, 200), max(1, round(tokens * rng.uniform(0.5, 1.5)))),)))


def conversations(seed: int, models: list[str], count: int, duration: float, turns: int,
                  context: int, tokens: int) -> list[Conversation]:
    """``count`` chats started over ``duration``: a first prompt of about ``context``
    words (a document, a long system prompt), then ``turns`` - 1 follow-ups of a short
    question each, a few seconds apart."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(models))]
    chats = []
    for _ in range(count):
        first = Turn(0.0, round(context * rng.uniform(0.5, 1.5)), tokens)
        rest = tuple(Turn(rng.uniform(1.0, 4.0), rng.randint(10, 60),
                          max(1, round(tokens * rng.uniform(0.5, 1.5))))
                     for _ in range(turns - 1))
        chats.append(Conversation(rng.uniform(0, duration), rng.choices(models, weights)[0],
                                  (first, *rest)))
    return sorted(chats, key=lambda c: c.at)


# -- the client -------------------------------------------------------------------------


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


async def chat(port: int, payload: dict[str, object]) -> tuple[int, float, float, str]:
    """Status, seconds to the first token and to the end of a streamed /api/chat, and the
    server that answered (X-Ollama-Server)."""
    sent = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        data = json.dumps(payload).encode()
        writer.write(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (len(data), data))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        found = re.search(rb"(?im)^x-ollama-server: *(\S+)", head)
        first = await reader.read(65536)
        ttft = time.monotonic() - sent
        while first:
            first = await reader.read(65536)
        return status, ttft, time.monotonic() - sent, found[1].decode() if found else ""
    except (ConnectionError, asyncio.IncompleteReadError):
        return 0, time.monotonic() - sent, time.monotonic() - sent, ""
    finally:
        writer.close()


#: The balancer's QUEUE_TIMEOUT (its default): what a failed request counts as.
QUEUE_TIMEOUT = 300.0


@dataclass(frozen=True)
class Scenario:
    name: str
    strategy: str = "least_load"
    fleet: tuple[tuple[int, int], ...] = ((3, 2),) * 4  # (resident, parallel) a server
    configured: bool = True  # the balancer told each server's true settings
    affinity: bool = True
    workload: str = "single"  # or "chats"


def start_balancer(scenario: Scenario, db: Path, workers: int = 1
                   ) -> tuple[subprocess.Popen[str], int]:
    """The balancer, told the fleet's Ollama settings as an operator would, or not."""
    env = {**os.environ, "STRATEGY": scenario.strategy, "DB_ENGINE": "sqlite",
           "DB_PATH": str(db), "HEALTH_INTERVAL": "1", "LOG_LEVEL": "warning",
           "WORKERS": str(workers),
           "CONVERSATION_AFFINITY": "on" if scenario.affinity else "off"}
    for name in ("NUM_PARALLEL", "MAX_LOADED_MODELS", "MAX_CONCURRENCY", "DB_HOST"):
        env.pop(name, None)
    if scenario.configured and len(set(scenario.fleet)) == 1:
        resident, parallel = scenario.fleet[0]
        env.update(NUM_PARALLEL=str(parallel), MAX_LOADED_MODELS=str(resident),
                   MAX_CONCURRENCY=str(parallel * resident))
    proc = subprocess.Popen([sys.executable, str(ROOT / "ollamabalancer.py"), "--ip",
                             "127.0.0.1", "--port", "0", "--log-level", "info"],
                            env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if match and workers > 1 and "workers)" not in line:
            continue  # a worker's own line: the group listens once every worker does
        if match:
            # Keep reading its log (an access line a request), or a full pipe stalls it.
            threading.Thread(target=collections.deque, args=(proc.stderr, 0),
                             daemon=True).start()
            return proc, int(match.group(1))
    raise RuntimeError("the balancer did not start")


async def run_scenario(scenario: Scenario, args: argparse.Namespace,
                       work: list[Conversation], models: list[str], db: Path
                       ) -> dict[str, float]:
    servers = [SimServer(models, parallel, resident, args)
               for resident, parallel in scenario.fleet]
    for server in servers:
        await server.start()
    proc, port = start_balancer(scenario, db, args.workers)
    try:
        for server, (resident, parallel) in zip(servers, scenario.fleet, strict=True):
            body: dict[str, object] = {"url": f"http://127.0.0.1:{server.port}"}
            if scenario.configured and len(set(scenario.fleet)) > 1:
                body.update(numParallel=parallel, maxLoadedModels=resident,
                            maxConcurrency=parallel * resident)
            status, answer = await post(port, "/servers/addServer", body)
            assert status == 201, answer
        for server in servers:  # start cold, as a fleet does after a restart
            server.loaded.clear()
            server.cold_loads = 0
        latencies: list[float] = []
        ttfts: list[float] = []
        later_ttfts: list[float] = []  # of follow-up turns, where a cache can help
        homes: list[tuple[int, int]] = []  # a conversation's later turns, and those at home
        failures = 0
        start = time.monotonic()
        counted_loads = 0

        async def one(conversation: Conversation) -> None:
            nonlocal failures, counted_loads
            await asyncio.sleep(max(0.0, start + conversation.at - time.monotonic()))
            counted = conversation.at >= args.warmup
            if counted and not counted_loads:
                counted_loads = -sum(s.cold_loads for s in servers)  # loads from here on
            messages: list[dict[str, str]] = []
            home, later, at_home = "", 0, 0
            for index, turn in enumerate(conversation.turns):
                await asyncio.sleep(turn.pause)
                messages.append({"role": "user", "content": "word " * turn.words})
                status, ttft, took, server = await chat(port, {
                    "model": conversation.model, "messages": messages, "stream": True,
                    "options": {"sim_tokens": turn.tokens}})
                if index == 0:
                    home = server
                elif status == 200:
                    later += 1
                    at_home += server == home
                if status != 200:
                    failures += 1
                    # A refusal is fast, but the user got nothing: it counts as if it had
                    # waited the balancer's queue timeout, so failing is never a good figure.
                    took = ttft = max(took, QUEUE_TIMEOUT)
                if counted:  # the fleet's warm-up after a restart is not counted
                    latencies.append(took)
                    ttfts.append(ttft)
                    if index:
                        later_ttfts.append(ttft)
                if status != 200:
                    break
                messages.append({"role": "assistant", "content": "tok " * turn.tokens})
            if len(conversation.turns) > 1 and counted:
                homes.append((later, at_home))

        await asyncio.gather(*(one(c) for c in work))
        makespan = time.monotonic() - start
    finally:
        proc.terminate()
        proc.wait(10)
        for server in servers:
            await server.close()
        db.unlink(missing_ok=True)

    def cut(values: list[float], q: int) -> float:
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(
            values) > 1 else (values[0] if values else 0.0)

    return {"p50": cut(latencies, 50), "p95": cut(latencies, 95), "p99": cut(latencies, 99),
            "ttft50": cut(ttfts, 50), "ttft95": cut(ttfts, 95),
            "later_ttft50": cut(later_ttfts, 50), "makespan": makespan,
            "cold_loads": counted_loads + sum(s.cold_loads for s in servers),
            "failed": failures, "done": len(latencies),
            # Conversations whose every later turn reached the server of their first, and
            # later turns that did (of the conversations counted).
            "stayed": sum(1 for later, home in homes if later == home),
            "conversations": len(homes), "at_home": sum(h for _, h in homes),
            "later": sum(n for n, _ in homes)}


def parse_fleet(text: str) -> tuple[tuple[int, int], ...]:
    """"1x1,2x1,2x2,3x2": each server's resident models x parallel requests."""
    try:
        return tuple((int(r), int(p)) for r, p in (part.split("x") for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a fleet: {text!r} (as 1x1,2x1,2x2)") from None


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    homogeneous = ((args.resident, args.parallel),) * args.servers
    if args.scenario == "strategies":
        fleet = args.fleet or homogeneous
        return [Scenario(s, s, fleet) for s in args.strategies]
    same = ((2, 2),) * 4 if args.fleet is None else args.fleet
    mixed = ((1, 1), (2, 1), (2, 2), (3, 2)) if args.fleet is None else args.fleet
    return [
        Scenario("homogeneous, configured", fleet=same, configured=True),
        Scenario("homogeneous, unconfigured", fleet=same, configured=False),
        Scenario("heterogeneous, configured", fleet=mixed, configured=True),
        Scenario("heterogeneous, unconfigured", fleet=mixed, configured=False),
        Scenario("heterogeneous, random", "random", fleet=mixed, configured=False),
        Scenario("conversations, affinity", fleet=same, configured=False, workload="chats"),
        Scenario("conversations, no affinity", fleet=same, configured=False,
                 affinity=False, workload="chats"),
    ]


def describe(fleet: tuple[tuple[int, int], ...]) -> str:
    if len(set(fleet)) == 1:
        return f"{len(fleet)} servers x {fleet[0][0]} resident x {fleet[0][1]} parallel"
    return "servers " + ", ".join(f"{r}x{p}" for r, p in fleet) + " (resident x parallel)"


async def main_async(args: argparse.Namespace) -> int:
    models = [f"model{i}:latest" for i in range(args.models)]
    service = args.tokens * args.token
    print(f"models {args.models}; cold load {args.cold_load:g} s; a token every "
          f"{args.token * 1000:g} ms, {args.tokens} an answer on average; prefill "
          f"{args.prefill * 1000:g} ms a cached-less prompt token; seed {args.seed}; "
          f"WORKERS={args.workers}")
    results = []
    db = Path(f"/tmp/fleet_sim_{os.getpid()}.db")
    for scenario in scenarios(args):
        if args.only and scenario.name not in args.only:
            continue
        slots = sum(r * p for r, p in scenario.fleet)
        if scenario.workload == "chats":
            work = conversations(args.seed, models[:max(2, args.models // 2)], args.chats,
                                 args.duration, args.turns, args.context, args.tokens)
        else:
            rate = slots / service * args.load
            work = single_requests(args.seed, models, rate, args.duration, args.tokens)
        runs = [await run_scenario(scenario, args, work, models, db)
                for _ in range(args.repeats)]
        # Each figure's median over the runs (one run: that run's); the p95s of each run
        # are listed too, as a fleet tips into a backlog of cold loads in some runs only.
        result = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        results.append((scenario, result))
        if args.repeats > 1:
            print(f"{scenario.name:<30} p95 of each run: " + ", ".join(
                f"{run['p95']:.2f} s ({run['cold_loads']:.0f} cold loads)" for run in runs))
        print(f"{scenario.name:<30} p50 {result['p50']:6.2f} s  p95 {result['p95']:6.2f} s  "
              f"p99 {result['p99']:6.2f} s  TTFT p50 {result['ttft50']:6.2f} s  "
              f"p95 {result['ttft95']:6.2f} s  later turns' TTFT p50 "
              f"{result['later_ttft50']:6.2f} s  {result['cold_loads']:4.0f} cold loads  "
              f"{result['failed']:3.0f} failed  "
              + (f"{result['stayed']:.0f} of {result['conversations']:.0f} conversations "
                 f"stayed, {result['at_home']:.0f} of {result['later']:.0f} later turns at "
                 "home  " if scenario.workload == "chats" else "")
              + f"[{describe(scenario.fleet)}; "
              f"{scenario.strategy}, {'configured' if scenario.configured else 'unconfigured'}"
              f"{'' if scenario.affinity else ', no affinity'}, "
              f"{len(work)} {'chats' if scenario.workload == 'chats' else 'requests'}]",
              flush=True)
    named = {s.name: r for s, r in results}

    def ratio(a: str, b: str, key: str) -> float | None:
        return named[a][key] / named[b][key] if a in named and b in named and named[b][
            key] else None

    print()
    if (r := ratio("homogeneous, unconfigured", "homogeneous, configured", "p95")) is not None:
        print(f"p95 unconfigured / configured, homogeneous = {r:.2f} (aim: at most 1.10)")
    if (r := ratio("heterogeneous, unconfigured", "heterogeneous, configured", "p95")
            ) is not None:
        print(f"p95 unconfigured / configured, heterogeneous = {r:.2f} (aim: at most 1.15)")
    if (r := ratio("heterogeneous, unconfigured", "heterogeneous, random", "p95")) is not None:
        print(f"p95 heterogeneous unconfigured / random = {r:.2f} (aim: at most 0.40)")
    if (r := ratio("conversations, affinity", "conversations, no affinity", "ttft50")
            ) is not None:
        print(f"TTFT p50 with affinity / without = {r:.2f} (aim: at most 0.70)")
    if (r := ratio("least_load", "random", "p95")) is not None:
        print(f"p95 least_load / random = {r:.2f} (aim: at most 0.50)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("strategies", "learning"),
                        default="strategies")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--models", type=int, default=None,
                        help="models in the workload (default: 6; 4 for learning, whose "
                        "fleets of 2 resident models hold 8)")
    parser.add_argument("--resident", type=int, default=3,
                        help="models loaded at once (OLLAMA_MAX_LOADED_MODELS)")
    parser.add_argument("--parallel", type=int, default=2, help="OLLAMA_NUM_PARALLEL")
    parser.add_argument("--fleet", type=parse_fleet, default=None,
                        help="server by server, resident x parallel: 1x1,2x1,2x2,3x2")
    parser.add_argument("--cold-load", type=float, default=2.0, help="seconds")
    parser.add_argument("--token", type=float, default=0.02, help="seconds a token")
    parser.add_argument("--tokens", type=int, default=25, help="tokens an answer, mean")
    parser.add_argument("--prefill", type=float, default=0.0002,
                        help="seconds a prompt token not in the cache")
    parser.add_argument("--load", type=float, default=None,
                        help="share of warm capacity (default 0.7; 0.5 for learning: at 0.7 "
                        "its fleets of 2 resident models tip into a backlog of cold loads, "
                        "configured or not, one run in two)")
    parser.add_argument("--duration", type=float, default=50.0, help="seconds of arrivals")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of arrivals not counted")
    parser.add_argument("--chats", type=int, default=12,
                        help="conversations, fewer than the fleet's KV cache slots for "
                        "their models (4 servers x 2 parallel x 2 models)")
    parser.add_argument("--turns", type=int, default=6, help="turns a conversation")
    parser.add_argument("--context", type=int, default=4000,
                        help="words of a conversation's first prompt, on average")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES),
                        choices=STRATEGIES)
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only the scenarios of these names")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each scenario; rows show each figure's median")
    parser.add_argument("--workers", type=int, default=1,
                        help="the balancer's WORKERS: its serving processes")
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    args = parser.parse_args()
    if args.models is None:
        args.models = 4 if args.scenario == "learning" else 6
    if args.load is None:
        args.load = 0.5 if args.scenario == "learning" else 0.7
    if args.quick:
        args.duration, args.warmup, args.cold_load, args.tokens = 2.5, 0.5, 0.3, 5
        args.chats, args.turns = 4, 2
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
