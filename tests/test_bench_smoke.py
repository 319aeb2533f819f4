"""The benchmark suite still runs and prints its table (bench/run.py --quick, seconds).

It measures nothing here: figures come from full runs (see docs/performance.md); this only keeps
the suite, its simulated backends and the fleet simulator working."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.timeout(330)
def test_the_benchmark_suite_runs_and_prints_its_table() -> None:
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "run.py"), "--quick"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its children die with it
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    for row in ("POST /api/embed via direct", "POST /api/embed via balancer (asyncio)",
                "GET /api/version via balancer (asyncio)", "streams (asyncio): 50 streams",
                "idle streams (asyncio): 200 streams", "scheduling decision, 1000 servers",
                "6 bodies of 8 MiB at once, MAX_BUFFERED_BODIES 16 MiB",
                "GET /api/version, during a 2 MiB body of 1-byte chunks",
                "POST /api/embed via balancer (asyncio), WORKERS=2",
                "addServer, servers 199-200", "health loop, 200 servers, no traffic",
                "GET /servers/status?limit=100, 200 servers"):
        assert row in out, out
    assert re.search(r"POST /api/embed via balancer \(asyncio\)\s+[0-9,]+ req/s", out), out
    if shutil.which("valgrind"):
        for row in ("POST /api/embed, routed", "GET /api/version, its own answer",
                    "a token of a relayed /api/chat stream"):
            assert re.search(r"instructions \(asyncio\): " + re.escape(row) +
                             r"[^\n]*\s[1-9][0-9,]{3,}\s", out), out
    else:
        assert re.search(r"instructions a request\s+valgrind not installed", out), out
    streams = re.findall(r"served (\d+) of (\d+) refused (\d+), lost (\d+) \(direct: (\d+) "
                         r"failed\)", out)
    assert len(streams) >= 2, out
    assert all(served == total and refused == lost == direct == "0"
               for served, total, refused, lost, direct in streams), out
    assert "ERRORS" not in out and "FAILED" not in out, out
    fleet = re.findall(r"fleet simulator, (least_load|round_robin|random) .*?(\d+) failed",
                       out)
    assert {strategy for strategy, _ in fleet} == {"least_load", "round_robin", "random"}, out
    assert all(failed == "0" for _, failed in fleet), out
    learning = re.findall(r"fleet simulator, ((?:homogeneous|heterogeneous|conversations), "
                          r"(?:configured|unconfigured|random|affinity|no affinity))\s.*?"
                          r"(\d+) failed", out)
    # --quick runs one of each kind: a heterogeneous fleet, conversations.
    assert {name for name, _ in learning} == {"heterogeneous, unconfigured",
                                              "conversations, affinity"}, out
    assert all(failed == "0" for _, failed in learning), out
    bodies = re.findall(r"(\d+) answered +(\d+) refused \(503\) +(\d+) failed otherwise", out)
    assert len(bodies) == 2 and all(int(a) + int(r) == 6 and f == "0" for a, r, f in bodies)


@pytest.mark.timeout(120)
def test_the_recovery_benchmark_runs_and_every_answer_comes_whole() -> None:
    """bench/recovery.py checks each continued answer against an uninterrupted one
    itself; here, two streams of each kind of failure."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "recovery.py"), "--runs", "2"],
                          capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"^\| (die|crash|stall) \| ([0-9.]+) \|", done.stdout, re.M)
    assert [kind for kind, _ in rows] == ["die", "crash", "stall"], done.stdout
