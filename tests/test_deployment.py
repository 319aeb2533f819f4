"""Running it as a service: docs/operations.md's systemd unit and the Dockerfile, checked by the
tools that will read them and by starting the balancer with their settings; and the CI
script, which must leave the machine's own services alone."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

from conftest import ROOT, BalancerProcess, call, free_port, unavailable


def shipped_unit() -> str:
    """The unit file the project ships (deploy/ollamabalancer.service)."""
    return (ROOT / "deploy" / "ollamabalancer.service").read_text()


def debian_steps() -> list[str]:
    """The commands docs/operations.md gives for Debian and Ubuntu, as root."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    match = re.search(r"### On Debian 12 and Ubuntu 24\.04.*?```sh\n(.*?)```", doc, re.S)
    assert match, "docs/operations.md gives no Debian steps"
    return [line for line in match.group(1).splitlines() if line.strip()]


def unit_settings(unit: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_the_shipped_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        unavailable("systemd-analyze is not installed (Debian: apt-get install systemd)")
    unit = shipped_unit()
    settings = unit_settings(unit)
    # The single file, by the system's own Python: no pip, no venv (SQLite).
    assert settings["ExecStart"] == ["/usr/bin/python3 /opt/ollamabalancer/ollamabalancer.py"]
    assert settings["DynamicUser"] == ["yes"] and settings["ProtectSystem"] == ["strict"]
    assert settings["StateDirectory"] == ["ollamabalancer"]
    assert sorted(v.split(":")[0] for v in settings["LoadCredential"]) == [
        "admin-token", "secret-key"]
    # The file where this checkout has it: verify checks that the command is executable.
    path = tmp_path / "ollamabalancer.service"
    path.write_text(unit.replace("/opt/ollamabalancer/ollamabalancer.py",
                                 str(ROOT / "ollamabalancer.py")))
    done = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                          timeout=60)
    # verify exits 0 on an unknown key or a bad value ("..., ignoring"): any word is a fault.
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), (
        done.stdout + done.stderr)
    broken = tmp_path / "broken.service"
    broken.write_text(path.read_text().replace("ProtectSystem=strict", "ProtectSystem=yes!"))
    spoiled = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True,
                             timeout=60)
    assert "ProtectSystem" in spoiled.stderr or "protect system" in spoiled.stderr


def test_the_units_settings_start_the_balancer_on_read_only_credentials(
        tmp_path: Path) -> None:
    # As systemd would run it: %S the state directory, %d a directory of 0400 copies.
    state, credentials = tmp_path / "state", tmp_path / "credentials"
    (state / "ollamabalancer").mkdir(parents=True)
    credentials.mkdir()
    (credentials / "secret-key").write_text("ab" * 32 + "\n")
    (credentials / "admin-token").write_text("t" * 32 + "\n")
    for item in credentials.iterdir():
        item.chmod(0o400)
    credentials.chmod(0o500)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
    for line in unit_settings(shipped_unit())["Environment"]:
        for pair in shlex.split(line.replace("%S", str(state)).replace("%d", str(credentials))):
            key, value = pair.split("=", 1)
            env[key] = value
    lb = BalancerProcess(env, [])
    try:
        assert lb.call("GET", "/").status == 200
        assert lb.call("GET", "/servers/allServers").status == 401  # the token is in force
        token = {"Authorization": "Bearer " + "t" * 32}
        assert lb.call("GET", "/servers/allServers", headers=token).status == 200
        assert (state / "ollamabalancer" / "ollamabalancer.db").exists()
        assert not (state / "ollamabalancer" / "ollamabalancer.db.key").exists()
    finally:
        lb.stop()
        credentials.chmod(0o700)


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_dockerfile_runs_unprivileged_with_its_data_on_a_volume(tmp_path: Path) -> None:
    steps = dockerfile()
    image = next(arg for op, arg in steps if op == "FROM")
    assert re.fullmatch(r"python:3\.[0-9]+-slim", image)
    user = [arg for op, arg in steps if op == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert ("VOLUME", '["/data"]') in steps
    copied = next(arg for op, arg in steps if op == "COPY").split()[:-1]
    assert all((ROOT / name).is_file() for name in copied)
    extras = re.search(r"\[([a-z,]+)\]", next(arg for op, arg in steps
                                              if op == "RUN" and "pip install" in arg))
    assert extras, "the image installs the optional packages"
    optional = (ROOT / "pyproject.toml").read_text().split(
        "[project.optional-dependencies]")[1].split("\n[")[0]
    known = re.findall(r"^([a-z]+) = \[", optional, re.M)
    assert set(extras.group(1).split(",")) <= set(known), known
    env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
    for op, arg in steps:
        if op == "ENV":
            for pair in shlex.split(arg):
                key, value = pair.split("=", 1)
                env[key] = value.replace("/data", str(tmp_path))
    assert env["DB_PATH"] == str(tmp_path / "ollamabalancer.db")
    command = next(arg for op, arg in steps if op == "CMD")
    assert command == '["ollamabalancer"]'
    # Its command with its environment: the database and the generated key on the volume.
    lb = BalancerProcess(env, [])
    try:
        assert lb.call("GET", "/").text == "Ollama is running"
    finally:
        lb.stop()
    key = tmp_path / "ollamabalancer.db.key"
    assert key.exists() and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (tmp_path / "ollamabalancer.db").exists()


def test_ci_never_stops_a_process_by_name() -> None:
    # Another nginx or tinyproxy on the machine is not the tests' to kill; the packages'
    # own services are kept from starting at install instead.
    script = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in script.splitlines()
                if line.strip() and not line.strip().startswith("#")]
    assert not [c for c in commands if re.search(r"\b(pkill|killall)\b|kill .*pidof", c)]
    install = next(i for i, c in enumerate(commands) if c.startswith("apt-get install"))
    assert any("exit 101" in c and "policy-rc.d" in " ".join(commands[max(0, i - 3):i + 1])
               for i, c in enumerate(commands[:install]))


def test_the_debian_steps_as_written_install_a_balancer_the_system_python_runs(
        tmp_path: Path) -> None:
    """docs/operations.md's steps, run by a shell in a scratch root (/opt and /etc moved
    there, systemctl left out), then the balancer started as the unit starts it: by
    /usr/bin/python3 (Debian's own, without this project's packages), on its settings."""
    python3 = Path("/usr/bin/python3")
    if not python3.exists():
        unavailable("/usr/bin/python3 is missing")
    root = tmp_path / "root"
    for name in ("opt", "etc/systemd/system"):
        (root / name).mkdir(parents=True)
    steps = debian_steps()
    assert steps[0] == "apt-get install -y python3"  # a minimal install lacks it
    # This host has it (below): the package step and systemd's are what is left out.
    script = [line.replace("/opt/", f"{root}/opt/").replace("/etc/", f"{root}/etc/")
              for line in steps[1:] if not line.startswith("systemctl")]
    done = subprocess.run(["sh", "-ec", "\n".join(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    installed = root / "opt" / "ollamabalancer" / "ollamabalancer.py"
    assert installed.read_bytes() == (ROOT / "ollamabalancer.py").read_bytes()
    unit = (root / "etc" / "systemd" / "system" / "ollamabalancer.service").read_text()
    assert unit == shipped_unit()
    documentation = unit_settings(unit)["Documentation"][0]  # what `systemctl help` opens
    assert documentation.startswith("file:///opt/")
    assert (root / documentation.removeprefix("file:///")).is_file()
    secrets_dir = root / "etc" / "ollamabalancer"
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    assert all(stat.S_IMODE((secrets_dir / name).stat().st_mode) == 0o600
               for name in ("secret-key", "admin-token"))
    # As the unit runs it: the system's Python, a clean environment, its settings.
    state = tmp_path / "state" / "ollamabalancer"
    state.mkdir(parents=True)
    env = {"PATH": "/usr/bin:/bin", "IP": "127.0.0.1"}
    for line in unit_settings(unit)["Environment"]:
        for pair in shlex.split(line.replace("%S", str(tmp_path / "state"))
                                .replace("%d", str(secrets_dir))):
            key, value = pair.split("=", 1)
            env[key] = value
    env["PORT"] = "0"
    proc = subprocess.Popen([str(python3), str(installed)], env=env, cwd=state,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = 0
        assert proc.stdout is not None
        for line in proc.stdout:
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found.group(1))
                break
        assert port, "the balancer did not start"
        token = (secrets_dir / "admin-token").read_text().strip()
        assert call(port, "GET", "/").text == "Ollama is running"
        assert call(port, "GET", "/servers/allServers").status == 401
        assert call(port, "GET", "/servers/allServers",
                    headers={"Authorization": f"Bearer {token}"}).status == 200
        assert (state / "ollamabalancer.db").exists()
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_dockerfile_health_check_follows_port(start_balancer: Any,
                                                   sqlite_store: Any) -> None:
    check = next(arg for op, arg in dockerfile() if op == "HEALTHCHECK")
    command = json.loads(check.split("CMD", 1)[1])
    assert command[0] == "python3"
    lb = start_balancer(sqlite_store)
    env = {k: v for k, v in os.environ.items() if k != "PORT"}
    assert subprocess.run(command, env={**env, "PORT": str(lb.port)},
                          timeout=30).returncode == 0
    assert subprocess.run(command, env={**env, "PORT": str(free_port())},
                          capture_output=True, timeout=30).returncode != 0
