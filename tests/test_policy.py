"""Fleet policy: server labels and the requests that ask for them."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import BalancerProcess, StoreConfig, chromium
from fakeollama import FakeOllama, tag


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
