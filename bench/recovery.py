#!/usr/bin/env python3
"""The delay a client sees when its answer's server fails halfway and another goes on.

    python bench/recovery.py              # 30 streams per kind of failure
    python bench/recovery.py --runs 3     # a quick look

A balancer in front of two simulated Ollama servers (the tests' fake: deterministic
answers, a token every ``--token-delay`` seconds, continuation after an assistant
prefill). Each stream's server fails after five tokens: its connection dropped (die),
Ollama's error line of a crashed runner (crash), or no byte more (stall, found by
UPSTREAM_TIMEOUT). The client timestamps every line; reported, in milliseconds:

- gap: from the failed server's last token to the continuation's first, as the client
  sees it (it includes the failed server's own pause before failing: one token delay);
- added: the gap less that token delay and less the next server's time to first token
  (measured directly, without the balancer), i.e. what recovery itself costs;
- the balancer's own figure, recovery_gap_seconds (its failure to its first token).

The first stream of a model also asks /api/show once (whether it continues a prefill):
reported apart. Every stream's text is checked against an uninterrupted answer.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fakeollama import FakeOllama, reply_text, tag  # noqa: E402

WORDS = 20
AFTER = 5


def start_balancer(workdir: Path, *args: str) -> tuple[subprocess.Popen[str], int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "OLLAMA"))}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "ollamabalancer.py"), "--ip", "127.0.0.1", "--port", "0",
         "--db-path", str(workdir / "bench.db"), "--health-interval", "600",
         "--breaker-threshold", "1000", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if match:  # its log from now on read and dropped, so that it never blocks
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, int(match.group(1))
    raise RuntimeError("the balancer did not start")


def call(port: int, method: str, path: str, body: object = None) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, None if body is None else json.dumps(body),
                 {"Content-Type": "application/json"})
    data = conn.getresponse().read()
    conn.close()
    return data


def stream(port: int, messages: list[dict[str, str]]) -> list[tuple[float, bytes]]:
    """The lines of one streamed chat, each with when it came."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/api/chat", json.dumps({"model": "bench", "messages": messages}))
    answer = conn.getresponse()
    lines = []
    while line := answer.readline():
        lines.append((time.monotonic(), line))
    conn.close()
    return lines


def first_token(port: int) -> float:
    """A server's own time to its first token, without the balancer."""
    started = time.monotonic()
    lines = stream(port, [{"role": "user", "content": "how fast?"}])
    return lines[0][0] - started


def gap_metric(port: int) -> tuple[float, int]:
    text = call(port, "GET", "/metrics").decode()
    total = re.search(r"^ollamabalancer_recovery_gap_seconds_sum (\S+)$", text, re.M)
    count = re.search(r"^ollamabalancer_recovery_gap_seconds_count (\S+)$", text, re.M)
    return (float(total.group(1)) if total else 0.0), (int(count.group(1)) if count else 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--token-delay", type=float, default=0.02)
    args = parser.parse_args()
    ms = 1000.0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("die", "crash", "stall"):
            fakes = [FakeOllama([tag("bench:latest")], tokens=WORDS, name=n) for n in "ab"]
            for fake in fakes:
                fake.token_delay = args.token_delay
                fake.stall_seconds = 5.0
            workdir = Path(tmp) / kind
            workdir.mkdir()
            proc, port = start_balancer(workdir, "--upstream-timeout", "1")
            try:
                for index, fake in enumerate(fakes):
                    call(port, "POST", "/servers/addServer",
                         {"url": fake.url, "name": "ab"[index]})
                ttfb = statistics.median(first_token(fakes[1].port) for _ in range(5))
                gaps, firsts = [], []
                before = (0.0, 0)
                for run in range(args.runs + 1):
                    for fake in fakes:  # whichever takes it first fails; the other goes on
                        fake.fault = {"after": AFTER, "kind": kind, "fresh_only": True}
                    messages = [{"role": "user", "content": f"story {kind} {run}"}]
                    lines = stream(port, messages)
                    text = "".join(json.loads(line).get("message", {}).get("content", "")
                                   for _, line in lines)
                    assert text == reply_text(messages, WORDS), (kind, run, text)
                    assert sum(f.faults for f in fakes) == run + 1
                    gap = lines[AFTER][0] - lines[AFTER - 1][0]
                    (firsts if run == 0 else gaps).append(gap)
                    if run == 0:  # the balancer's own figure without the first one's
                        before = gap_metric(port)
                after = gap_metric(port)
            finally:
                proc.terminate()
                proc.wait(10)
                for fake in fakes:
                    fake.close()
            # What the failed server itself took to fail after its last token: its pause
            # before the next (die, crash), or UPSTREAM_TIMEOUT from that token (stall).
            wait = 1.0 if kind == "stall" else args.token_delay
            own = (after[0] - before[0]) / max(1, after[1] - before[1])
            rows.append([kind, f"{statistics.median(gaps) * ms:.1f}",
                         f"{sorted(gaps)[int(len(gaps) * 0.95) - 1] * ms:.1f}" if gaps else "",
                         f"{(statistics.median(gaps) - wait - ttfb) * ms:.1f}",
                         f"{ttfb * ms:.1f}", f"{own * ms:.1f}",
                         f"{firsts[0] * ms:.1f}"])
    headers = ["failure", "gap p50", "gap p95", "added p50", "next TTFT", "balancer's own",
               "first (+ /api/show)"]
    print(f"{args.runs} streams a kind, a token every {args.token_delay * ms:.0f} ms, the "
          f"failure after {AFTER} tokens; milliseconds")
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
