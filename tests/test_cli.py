"""The command line, against the configured store, with no server running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from conftest import ROOT, StoreConfig
from fakeollama import FakeOllama


def cli(store: StoreConfig, *words: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DB_")}, **store.env()}
    return subprocess.run([sys.executable, str(ROOT / "ollamabalancer.py"), *words], env=env,
                          capture_output=True, text=True, timeout=60)


def test_servers_and_proxies_are_managed_from_the_command_line(store: StoreConfig) -> None:
    added = cli(store, "proxies", "add", "socks5://bob:s%40cret-pw@127.0.0.1:1080",
                "--name", "dc")
    assert added.returncode == 0 and "added proxy 1" in added.stdout
    server = cli(store, "servers", "add", "http://gpu1.invalid:11434", "--name", "gpu1",
                 "--proxy", "1", "--weight", "2", "--max-concurrency", "8")
    assert server.returncode == 0, server.stderr
    listing = cli(store, "servers", "list")
    row = listing.stdout.splitlines()[2].split()
    assert row[:7] == ["1", "gpu1", "http://gpu1.invalid:11434", "1", "yes", "2", "8"]
    proxies = cli(store, "proxies", "list")
    assert "socks5" in proxies.stdout and "bob" in proxies.stdout and "set" in proxies.stdout
    assert "s@cret-pw" not in proxies.stdout + proxies.stderr
    in_use = cli(store, "proxies", "remove", "1")
    assert in_use.returncode == 2 and "used by servers 1" in in_use.stderr
    assert cli(store, "servers", "remove", "1").returncode == 0
    assert cli(store, "proxies", "remove", "1").returncode == 0
    assert cli(store, "servers", "list").stdout.count("\n") == 2  # the header only


def test_bad_input_on_the_command_line_is_one_clear_error(sqlite_store: StoreConfig) -> None:
    bad = cli(sqlite_store, "servers", "add", "ftp://x")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: 'url' must look like http://host:11434")
    unknown = cli(sqlite_store, "servers", "remove", "7")
    assert unknown.returncode == 2 and unknown.stderr.strip() == "error: no server with id 7"
    assert cli(sqlite_store, "proxies", "remove", "7").returncode == 2
    assert cli(sqlite_store, "proxies", "add", "socks5://nohost").returncode == 2
    assert cli(sqlite_store, "servers", "add", "http://h.invalid", "--proxy", "4"
               ).returncode == 2


def test_check_prints_reachability_latency_and_models(
        sqlite_store: StoreConfig, backend: FakeOllama) -> None:
    cli(sqlite_store, "servers", "add", backend.url, "--name", "alive")
    cli(sqlite_store, "servers", "add", "http://127.0.0.1:9", "--name", "dead")
    done = cli(sqlite_store, "check")
    assert done.returncode == 1  # one is down
    lines = {line.split()[1]: line for line in done.stdout.splitlines()[2:]}
    assert " yes " in lines["alive"] and "llama3:latest" in lines["alive"]
    assert " ms " in lines["alive"]
    assert " NO " in lines["dead"] and "cannot connect" in lines["dead"]


def test_models_pull_shows_progress_per_server(sqlite_store: StoreConfig,
                                               make_backend: Any) -> None:
    first, second = make_backend(), make_backend()
    cli(sqlite_store, "servers", "add", first.url, "--name", "gpu-a")
    cli(sqlite_store, "servers", "add", second.url, "--name", "gpu-b")
    done = cli(sqlite_store, "models", "pull", "qwen2")
    assert done.returncode == 0, done.stderr
    assert "pulled qwen2 on 2 servers" in done.stdout
    for name in ("gpu-a", "gpu-b"):
        bars = [line for line in done.stdout.splitlines() if line.startswith(name)]
        assert bars and bars[-1].endswith("done") and "100%" in bars[-1]
    assert first.has("qwen2") and second.has("qwen2")
    second.pull_error = "disk full"
    failed = cli(sqlite_store, "models", "pull", "phi3")
    assert failed.returncode == 1 and "gpu-b: disk full" in failed.stderr


def test_a_proxy_password_on_the_command_line_is_warned_about_and_a_file_is_not(
        sqlite_store: StoreConfig, tmp_path: Any) -> None:
    in_url = cli(sqlite_store, "proxies", "add", "socks5://bob:pw-in-url@127.0.0.1:1080")
    assert in_url.returncode == 0
    assert "password was given on the command line" in in_url.stderr
    assert "pw-in-url" not in in_url.stderr
    secret = tmp_path / "proxy-password"
    secret.write_text("pw-from-a-file\n")
    from_file = cli(sqlite_store, "proxies", "add", "socks5://bob@127.0.0.1:1081",
                    "--password-file", str(secret))
    assert from_file.returncode == 0 and "command line" not in from_file.stderr
    import sqlite3

    import ollamabalancer as ob

    store = ob.open_store(ob.load_config([], sqlite_store.env()))
    try:
        assert [p.password for p in store.list_proxies()] == ["pw-in-url", "pw-from-a-file"]
    finally:
        store.close()
    with sqlite3.connect(sqlite_store.path) as conn:
        assert all(row[0].startswith("enc:v1:")
                   for row in conn.execute("SELECT password FROM proxy"))


def test_help_lists_every_subcommand_and_an_unknown_word_names_them(
        sqlite_store: StoreConfig) -> None:
    shown = cli(sqlite_store, "--help")
    assert shown.returncode == 0
    commands = shown.stdout.split("commands:", 1)[1]
    listed = {line.split()[0] for line in commands.splitlines() if line.startswith("  ")}
    assert {"serve", "servers", "proxies", "check", "models", "rotate-secret"} <= listed
    wrong = cli(sqlite_store, "srevers", "list")
    assert wrong.returncode == 2
    assert "unknown command 'srevers'" in wrong.stderr and "servers" in wrong.stderr
    assert "unrecognized arguments" not in wrong.stderr
    assert cli(sqlite_store, "servers", "--help").returncode == 0


def test_adding_an_unreachable_server_adds_it_and_warns(sqlite_store: StoreConfig,
                                                        backend: FakeOllama) -> None:
    dead = cli(sqlite_store, "servers", "add", "http://127.0.0.1:9", "--name", "dead")
    assert dead.returncode == 0
    assert "added server 1" in dead.stdout
    assert "warning: server 1 (dead) is not reachable now: cannot connect" in dead.stderr
    alive = cli(sqlite_store, "servers", "add", backend.url)
    assert alive.returncode == 0 and alive.stderr == ""
    assert len(cli(sqlite_store, "servers", "list").stdout.splitlines()) == 4


def test_status_shows_the_running_balancers_fleet(
        start_balancer: Any, sqlite_store: StoreConfig, make_backend: Any) -> None:
    token = "a-status-token-long-enough"
    lb = start_balancer(sqlite_store, env={"ADMIN_TOKEN": token})
    up = make_backend()
    up.loaded = ["llama3:latest"]
    auth = {"Authorization": f"Bearer {token}"}
    lb.call("POST", "/servers/addServer", {"url": up.url, "name": "gpu-up"}, headers=auth)
    lb.call("POST", "/servers/addServer", {"url": "http://127.0.0.1:1", "name": "gpu-down"},
            headers=auth)
    lb.call("POST", "/servers/addServer", {"url": make_backend().url, "name": "gpu-drained",
                                           "draining": True}, headers=auth)
    env = {"PORT": str(lb.port), "IP": "127.0.0.1", "ADMIN_TOKEN": token}
    shown = subprocess.run([sys.executable, str(ROOT / "ollamabalancer.py"), "status"],
                           env={**os.environ, **env}, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["SERVER", "STATE", "IN", "FLIGHT", "LOADED"]
    assert any(line.startswith("gpu-up") and " up " in line and "llama3:latest" in line
               for line in lines), shown.stdout
    assert any(line.startswith("gpu-down") and "down: " in line for line in lines)
    assert any(line.startswith("gpu-drained") and " up, drained " in line for line in lines)
    assert lines[-1].startswith("2 of 3 servers up;")
    as_json = subprocess.run([sys.executable, str(ROOT / "ollamabalancer.py"), "status",
                              "--json"], env={**os.environ, **env}, capture_output=True,
                             text=True, timeout=60)
    assert {s["name"] for s in json.loads(as_json.stdout)["servers"]} == {
        "gpu-up", "gpu-down", "gpu-drained"}
    refused = subprocess.run([sys.executable, str(ROOT / "ollamabalancer.py"), "status"],
                             env={**os.environ, **env, "ADMIN_TOKEN": "a-wrong-token-long-enough"},
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "401" in refused.stderr
