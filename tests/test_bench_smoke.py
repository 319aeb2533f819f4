"""The fleet simulator still runs through the real balancer (a few seconds, --quick)."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def test_fleet_simulator_runs_and_prints_its_table() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fleet_sim.py"), "--quick",
         "--strategies", "least_load", "random"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    rows = {m.group(1): m for m in re.finditer(
        r"^(least_load|random)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+(\d+)\s+(\d+)",
        done.stdout, re.MULTILINE)}
    assert set(rows) == {"least_load", "random"}, done.stdout
    assert rows["least_load"].group(7) == "0"  # no request failed
    assert "p95 least_load / random" in done.stdout
