"""Fleet policy: server labels and the requests that ask for them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from conftest import ROOT, BalancerProcess, StoreConfig, chromium
from fakeollama import FakeOllama, tag

import ollamabalancer as ob


@pytest.fixture
def zoned(start_balancer: Any, sqlite_store: StoreConfig, make_backend: Any) -> Any:
    """A balancer and three servers of llama3: eu/a100, eu/l4 and us/a100."""
    lb = start_balancer(sqlite_store, "--health-interval", "600")
    fakes = {}
    for name, labels in (("eu-a100", {"zone": "eu", "gpu": "a100"}),
                         ("eu-l4", {"zone": "eu", "gpu": "l4"}),
                         ("us-a100", {"zone": "us", "gpu": "a100"})):
        fake = make_backend(models=[tag("llama3:latest")])
        lb.add_server(fake.url, name=name, labels=labels)
        fakes[name] = fake
    return lb, fakes


def chat(lb: BalancerProcess, headers: dict[str, str] | None = None) -> Any:
    return lb.call("POST", "/api/chat", {"model": "llama3", "messages": [], "stream": False},
                   headers=headers)


def served(fakes: dict[str, FakeOllama]) -> dict[str, int]:
    return {name: len(fake.model_requests()) for name, fake in fakes.items()}


def test_a_request_goes_only_to_servers_with_all_its_labels(zoned: Any) -> None:
    lb, fakes = zoned
    for _ in range(6):
        assert chat(lb, {"X-Server-Labels": "zone=eu"}).status == 200
    assert served(fakes)["us-a100"] == 0 and sum(served(fakes).values()) == 6
    for _ in range(3):
        reply = chat(lb, {"X-Server-Labels": "zone=eu, gpu=a100"})
        assert reply.status == 200 and reply.headers["X-Ollama-Server"] == "eu-a100"
    refused = chat(lb, {"X-Server-Labels": "zone=ap"})
    assert refused.status == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json() == {"error": "no server with the labels zone=ap can run "
                                       "'llama3:latest' now"}
    for bad in ("zone", "zone=eu;gpu=a100", "=eu", "zone=e u"):
        reply = chat(lb, {"X-Server-Labels": bad})
        assert reply.status == 400 and "X-Server-Labels" in reply.json()["error"]


def test_a_key_s_labels_hold_for_every_request_it_makes(zoned: Any) -> None:
    lb, fakes = zoned
    reply = lb.call("POST", "/keys/addKey", {"name": "eu-team", "labels": {"zone": "eu"}})
    headers = {"Authorization": f"Bearer {reply.json()['key']}"}
    for _ in range(4):
        assert chat(lb, headers).status == 200
    assert served(fakes)["us-a100"] == 0
    narrowed = chat(lb, {**headers, "X-Server-Labels": "gpu=l4"})
    assert narrowed.status == 200 and narrowed.headers["X-Ollama-Server"] == "eu-l4"
    escaped = chat(lb, {**headers, "X-Server-Labels": "zone=us"})
    assert escaped.status == 403 and escaped.json() == {
        "error": "API key 'eu-team' is held to zone=eu"}


def test_labels_are_set_cleared_and_shown(zoned: Any) -> None:
    lb, fakes = zoned
    servers = {s["name"]: s for s in lb.call("GET", "/servers/allServers").json()}
    assert servers["us-a100"]["labels"] == {"gpu": "a100", "zone": "us"}
    moved = lb.call("PATCH", f"/servers/{servers['us-a100']['id']}",
                    {"labels": {"zone": "eu", "gpu": "h100"}})
    assert moved.status == 200 and moved.json()["labels"] == {"gpu": "h100", "zone": "eu"}
    reply = chat(lb, {"X-Server-Labels": "gpu=h100"})
    assert reply.status == 200 and reply.headers["X-Ollama-Server"] == "us-a100"
    dom = chromium("--virtual-time-budget=1500", "--dump-dom",
                   f"http://127.0.0.1:{lb.port}/dashboard")
    assert '<span class="pill label">gpu=h100</span>' in dom
    cleared = lb.call("PATCH", f"/servers/{servers['us-a100']['id']}", {"labels": None})
    assert cleared.json()["labels"] == {}
    for bad in ({"labels": {"zone": "e u"}}, {"labels": ["zone=eu"]},
                {"labels": {"bad name": "x"}}):
        reply = lb.call("PATCH", f"/servers/{servers['eu-l4']['id']}", bad)
        assert reply.status == 400 and "labels" in reply.json()["error"]
    assert fakes  # three servers, as made


# -- the fleet file ----------------------------------------------------------------------


def write_fleet(path: Any, servers: list[dict[str, Any]], models: dict[str, Any] | None = None
                ) -> None:
    path.write_text(json.dumps({"servers": servers, "models": models or {}}))


def by_name(lb: BalancerProcess) -> dict[str, dict[str, Any]]:
    return {s["name"] or s["host"]: s for s in lb.call("GET", "/servers/allServers").json()}


def test_the_fleet_file_makes_its_servers_match_and_leaves_the_api_s_alone(
        start_balancer: Any, sqlite_store: StoreConfig, make_backend: Any,
        tmp_path: Any) -> None:
    first, second, third = (make_backend(models=[tag("llama3:latest")]) for _ in range(3))
    fleet = tmp_path / "fleet.json"
    write_fleet(fleet, [{"name": "gpu1", "url": first.url, "labels": {"zone": "eu"}},
                        {"name": "gpu2", "url": second.url}],
                {"chat": {"alias": ["llama3"]}})
    lb = start_balancer(sqlite_store, "--fleet-file", str(fleet))
    lb.add_server(third.url, name="by-api")
    servers = by_name(lb)
    assert servers["gpu1"]["managedBy"] == "file" and servers["gpu1"]["labels"] == {
        "zone": "eu"}
    assert servers["by-api"]["managedBy"] is None
    refused = lb.call("PATCH", f"/servers/{servers['gpu1']['id']}", {"weight": 3})
    assert refused.status == 409 and str(fleet) in refused.json()["error"]
    assert lb.call("DELETE", f"/servers/{servers['gpu2']['id']}").status == 409
    assert lb.call("POST", "/servers/addServer", {"url": first.url}).status == 409
    # Changed on disk: applied within 2 s. gpu2 goes, gpu1 changes, by-api stays.
    write_fleet(fleet, [{"name": "gpu1", "url": first.url, "weight": 2}],
                {"chat": {"alias": ["llama3"]}})
    lb.wait_for(lambda: set(by_name(lb)) == {"gpu1", "by-api"}, timeout=5)
    assert by_name(lb)["gpu1"]["weight"] == 2 and by_name(lb)["gpu1"]["labels"] == {}
    # A file that does not validate is refused, and the policy in force stays.
    fleet.write_text('{"servers": [{"url": "http://x:1", "weight": -1}]}')
    lb.wait_for(lambda: "refused (it changed): servers[0]: 'weight' must be" in lb.log, 5)
    assert set(by_name(lb)) == {"gpu1", "by-api"}
    models = {m["name"]: m for m in lb.call("GET", "/models").json()}
    assert models["chat:latest"]["policy"]["alias"] == ["llama3:latest"]
    # SIGHUP reads it again, even when its time and size say nothing changed.
    old = json.dumps({"servers": [{"name": "gpu1", "url": first.url, "weight": 2}]})
    new = json.dumps({"servers": [{"name": "gpu1", "url": first.url, "weight": 2},
                                  {"name": "gpu3", "url": second.url}]})
    width = max(len(old), len(new))
    fleet.write_text(old.ljust(width))
    lb.wait_for(lambda: lb.log.rsplit("refused", 1)[-1].count("applied (it changed)") == 1,
                timeout=5)
    seen = fleet.stat()
    fleet.write_text(new.ljust(width))
    os.utime(fleet, ns=(seen.st_atime_ns, seen.st_mtime_ns))  # as the watcher saw it
    time.sleep(1.5)
    assert "gpu3" not in by_name(lb)  # the watcher did not notice
    lb.proc.send_signal(signal.SIGHUP)
    lb.wait_for(lambda: "gpu3" in by_name(lb) and "applied (SIGHUP)" in lb.log, timeout=5)


def test_apply_dry_run_says_what_would_change(sqlite_store: StoreConfig, tmp_path: Any
                                              ) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[servers]]\nname = "gpu1"\nurl = "http://10.0.0.1:11434"\n'
                     '[models.chat]\nalias = ["llama3"]\n')
    env = {**os.environ, **sqlite_store.env()}
    done = subprocess.run([sys.executable, str(ROOT / "ollamabalancer.py"), "apply",
                           str(fleet), "--dry-run"], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert "would add gpu1" in done.stdout and "model chat:latest: alias" in done.stdout
    fleet.write_text("[[servers]]\nurl = 5\n")
    done = subprocess.run([sys.executable, str(ROOT / "ollamabalancer.py"), "apply",
                           str(fleet)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "refused" in done.stderr


# -- aliases, fallbacks, pins ------------------------------------------------------------


@pytest.fixture
def policed(start_balancer: Any, sqlite_store: StoreConfig, make_backend: Any,
            tmp_path: Any) -> Any:
    """Two servers that hold one model under two names, and a third model; a fleet file
    that calls them "chat", falls back from "big" to llama3, and pins llama3's options."""
    quant = make_backend(models=[tag("llama3.1:8b-instruct-q4_K_M"), tag("solo:latest")])
    plain = make_backend(models=[tag("llama3.1:8b"), tag("llama3:latest")])
    fleet = tmp_path / "fleet.json"
    write_fleet(fleet, [{"name": "quant", "url": quant.url, "maxConcurrency": 1},
                        {"name": "plain", "url": plain.url}], {
        "chat": {"alias": ["llama3.1:8b-instruct-q4_K_M", "llama3.1:8b"]},
        "big": {"fallback": ["llama3"]},
        "solo": {"fallback": ["llama3"]},
        "llama3": {"clamp": {"options.num_ctx": 8192, "max_tokens": 100},
                   "set": {"keep_alive": "30m"}, "strip": ["options.num_gpu"]}})
    lb = start_balancer(sqlite_store, "--fleet-file", str(fleet), "--health-interval", "600")
    return lb, quant, plain


def last_body(fake: FakeOllama) -> dict[str, Any]:
    return dict(json.loads(fake.model_requests()[-1]["body"]))


def test_an_alias_runs_its_real_model_and_answers_under_its_own_name(policed: Any) -> None:
    lb, quant, plain = policed
    streamed = lb.call("POST", "/api/chat", {"model": "chat", "messages": []})
    assert streamed.status == 200
    real = streamed.headers["X-Ollama-Model"]
    assert real in ("llama3.1:8b-instruct-q4_K_M", "llama3.1:8b")
    holder = quant if real.endswith("q4_K_M") else plain
    assert last_body(holder)["model"] == real
    lines = [json.loads(line) for line in streamed.body.splitlines()]
    assert len(lines) > 1 and {line["model"] for line in lines} == {"chat"}
    whole = lb.call("POST", "/api/chat", {"model": "chat", "messages": [], "stream": False})
    assert whole.json()["model"] == "chat"
    openai = lb.call("POST", "/v1/chat/completions", {"model": "chat", "messages": [],
                                                      "stream": True})
    events = [json.loads(e[6:]) for e in openai.body.split(b"\n\n")
              if e.startswith(b"data: {")]
    assert events and {e["model"] for e in events} == {"chat"}
    assert lb.call("POST", "/v1/chat/completions", {"model": "chat", "messages": []}
                   ).json()["model"] == "chat"
    assert "chat:latest" in {m["name"] for m in lb.call("GET", "/api/tags").json()["models"]}
    assert "chat:latest" in {m["id"] for m in lb.call("GET", "/v1/models").json()["data"]}
    assert lb.call("POST", "/api/show", {"model": "chat"}).status == 200


def test_a_fallback_serves_a_model_no_server_has_but_never_a_busy_one(policed: Any) -> None:
    lb, quant, plain = policed
    reply = lb.call("POST", "/api/chat", {"model": "big", "messages": [], "stream": False})
    assert reply.status == 200 and reply.headers["X-Ollama-Model"] == "llama3:latest"
    assert reply.json()["model"] == "big" and last_body(plain)["model"] == "llama3:latest"
    lb.wait_for(lambda: re.search(r"POST +/api/chat +200 plain +llama3:latest", lb.log)
                is not None)
    # "solo" has a server, busy with its one slot: the next request waits for it rather
    # than go to the fallback.
    asked_plain = len(plain.model_requests())
    replies: list[Any] = []
    held = threading.Thread(target=lambda: replies.append(lb.call("POST", "/api/chat", {
        "model": "solo", "messages": [], "stream": False, "fake_hold": True})))
    held.start()
    lb.wait_for(lambda: quant.active == 1)
    waiting = threading.Thread(target=lambda: replies.append(lb.call("POST", "/api/chat", {
        "model": "solo", "messages": [], "stream": False})))
    waiting.start()
    lb.wait_for(lambda: lb.call("GET", "/servers/status").json()["queue"]["depth"] == 1)
    assert len(plain.model_requests()) == asked_plain
    quant.release()
    held.join(10)
    waiting.join(10)
    assert [r.status for r in replies] == [200, 200]
    assert all("X-Ollama-Model" not in r.headers for r in replies)
    assert len(plain.model_requests()) == asked_plain


def test_pinned_parameters_are_clamped_set_and_stripped(policed: Any) -> None:
    lb, _, plain = policed
    assert lb.call("POST", "/api/chat", {
        "model": "llama3", "messages": [], "stream": False, "keep_alive": "5m",
        "options": {"num_ctx": 131072, "num_gpu": 99, "temperature": 0.2}}).status == 200
    sent = last_body(plain)
    assert sent["options"] == {"num_ctx": 8192, "temperature": 0.2}
    assert sent["keep_alive"] == "30m" and sent["model"] == "llama3"
    assert lb.call("POST", "/api/chat", {"model": "llama3", "messages": [], "stream": False,
                                         "options": {"num_ctx": 4096}}).status == 200
    assert last_body(plain)["options"] == {"num_ctx": 4096}  # under the cap: as sent
    assert lb.call("POST", "/v1/chat/completions", {"model": "llama3", "messages": [],
                                                    "max_tokens": 5000}).status == 200
    assert last_body(plain)["max_tokens"] == 100
    policy = {m["name"]: m for m in lb.call("GET", "/models").json()}["llama3:latest"]["policy"]
    assert policy["clamp"] == {"options.num_ctx": 8192, "max_tokens": 100}


def test_the_fleet_file_examples_in_the_docs_validate(tmp_path: Any) -> None:
    text = (ROOT / "docs" / "fleet-file.md").read_text()
    blocks = re.findall(r"```(json|toml)\n(.*?)```", text, re.S)
    assert [kind for kind, _ in blocks] == ["json", "toml"]
    for kind, block in blocks:
        path = tmp_path / f"fleet.{kind}"
        path.write_text(block)
        policy = ob.read_fleet_file(str(path))
        assert policy.servers and policy.models["chat:latest"].alias == (
            "llama3.1:8b-instruct-q4_K_M", "llama3.1:8b")
        assert dict(policy.models["llama3.1:8b"].clamp)["options.num_ctx"] == 8192
