"""Running it as a service: docs/operations.md's systemd unit and the Dockerfile, checked by the
tools that will read them and by starting the balancer with their settings; and the CI
script, which must leave the machine's own services alone."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

from conftest import ROOT, BalancerProcess, unavailable


def readme_unit() -> str:
    """The unit file docs/operations.md gives, as the ini block after its file name."""
    readme = (ROOT / "docs" / "operations.md").read_text()
    match = re.search(r"`/etc/systemd/system/ollamabalancer\.service`:\s*```ini\n(.*?)```",
                      readme, re.S)
    assert match, "docs/operations.md gives no unit file"
    return match.group(1)


def unit_settings(unit: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def console_script() -> str:
    found = shutil.which("ollamabalancer")
    assert found, "the console script is missing: pip install -e '.[test]'"
    return found


def test_the_readme_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        unavailable("systemd-analyze is not installed (Debian: apt-get install systemd)")
    unit = readme_unit()
    settings = unit_settings(unit)
    assert settings["ExecStart"] == ["/usr/local/bin/ollamabalancer"]  # what pip as root makes
    assert settings["DynamicUser"] == ["yes"] and settings["ProtectSystem"] == ["strict"]
    assert settings["StateDirectory"] == ["ollamabalancer"]
    assert sorted(v.split(":")[0] for v in settings["LoadCredential"]) == [
        "admin-token", "secret-key"]
    # The command where this machine has it: verify checks that it is executable.
    path = tmp_path / "ollamabalancer.service"
    path.write_text(unit.replace("/usr/local/bin/ollamabalancer", console_script()))
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
    for line in unit_settings(readme_unit())["Environment"]:
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
