"""Prometheus metrics after a known sequence of requests, and the access log."""

from __future__ import annotations

import http.client
import json
import logging
import time
from typing import Any

import pytest
from conftest import BalancerProcess, StoreConfig, free_port, require_module
from fakeollama import FakeOllama, tag

import ollamabalancer as ob

parser = require_module("prometheus_client.parser")


def scrape(lb: BalancerProcess, **headers: str) -> dict[str, dict[tuple[tuple[str, str], ...],
                                                                    float]]:
    reply = lb.call("GET", "/metrics", headers=headers)
    assert reply.status == 200, reply
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in parser.text_string_to_metric_families(reply.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = (
                sample.value)
    return samples


def test_metrics_count_a_known_sequence_of_requests(
        start_balancer: Any, sqlite_store: StoreConfig, make_backend: Any) -> None:
    lb: BalancerProcess = start_balancer(sqlite_store, "--health-interval", "600",
                                         "--breaker-threshold", "5")
    good: FakeOllama = make_backend(models=[tag("llama3:latest")])
    lb.add_server(good.url, name="gpu-good")
    lb.add_server(f"http://127.0.0.1:{free_port()}", name="gpu-down")
    chat = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    for stream in (True, True, False):
        assert lb.call("POST", "/api/chat", {**chat, "stream": stream}).status == 200
    assert lb.call("POST", "/api/chat", {**chat, "model": "nope"}).status == 404
    sid = lb.server_id()
    assert lb.call("GET", f"/servers/ollama/{sid}/api/version").status == 200
    with pytest.raises(http.client.IncompleteRead):  # cut mid-stream
        lb.call("GET", f"/servers/ollama/{sid}/die")
    assert lb.call("GET", "/servers/ollama/2/api/version").status == 502
    metrics = scrape(lb)

    requests = metrics["ollamabalancer_requests_total"]
    ok_chat = (("endpoint", "/api/chat"), ("model", "llama3:latest"), ("server", "gpu-good"),
               ("status", "200"))
    assert requests[ok_chat] == 3
    assert requests[(("endpoint", "/api/chat"), ("model", ""), ("server", ""),
                     ("status", "404"))] == 1
    assert requests[(("endpoint", "passthrough"), ("model", ""), ("server", "gpu-down"),
                     ("status", "502"))] == 1
    tokens = metrics["ollamabalancer_tokens_total"]
    assert tokens[(("model", "llama3:latest"), ("server", "gpu-good"))] == 15  # 3 x 5
    errors = metrics["ollamabalancer_upstream_errors_total"]
    assert errors[(("kind", "cut_stream"), ("server", "gpu-good"))] == 1
    assert errors[(("kind", "connect"), ("server", "gpu-down"))] == 1
    pair = (("model", "llama3:latest"), ("server", "gpu-good"))
    assert metrics["ollamabalancer_ttfb_seconds_count"][pair] == 3
    assert metrics["ollamabalancer_request_duration_seconds_count"][pair] == 3
    durations = metrics["ollamabalancer_request_duration_seconds_bucket"]
    assert durations[(("le", "+Inf"), *pair)] == 3
    assert metrics["ollamabalancer_queue_wait_seconds_count"][()] == 3
    assert metrics["ollamabalancer_server_up"] == {(("server", "gpu-good"),): 1,
                                                  (("server", "gpu-down"),): 0}
    assert metrics["ollamabalancer_circuit_open"][(("server", "gpu-good"),)] == 0
    assert metrics["ollamabalancer_server_draining"] == {(("server", "gpu-good"),): 0,
                                                        (("server", "gpu-down"),): 0}
    assert metrics["ollamabalancer_inflight"][(("server", "gpu-good"),)] == 0
    assert metrics["ollamabalancer_queue_depth"][()] == 0
    # One label scheme across families: a server is its name everywhere it is named.
    servers_named = {value for family in metrics.values() for labels in family
                     for name, value in labels if name == "server"}
    assert servers_named == {"gpu-good", "gpu-down", ""}  # "": answered by no server
    label_names = {name for family in metrics.values() for labels in family
                   for name, _ in labels}
    # (key: an API key's name, "" for a request without one, in key_tokens_total.)
    assert label_names == {"endpoint", "server", "model", "status", "kind", "le", "version",
                           "key"}
    # What operators expect of any service: its version, and the process's own figures.
    assert metrics["ollamabalancer_build_info"] == {(("version", ob.__version__),): 1}
    assert 10e6 < metrics["process_resident_memory_bytes"][()] < 2e9
    assert metrics["process_cpu_seconds_total"][()] > 0
    assert 5 < metrics["process_open_fds"][()] < 10_000
    assert 0 < time.time() - metrics["process_start_time_seconds"][()] < 600


def test_metrics_are_a_management_endpoint(start_balancer: Any,
                                           sqlite_store: StoreConfig) -> None:
    token = "a-metrics-token-long-enough"
    lb = start_balancer(sqlite_store, env={"ADMIN_TOKEN": token})
    assert lb.call("GET", "/metrics").status == 401
    assert "ollamabalancer_queue_depth" in str(scrape(lb, Authorization=f"Bearer {token}"))


def test_access_log_has_one_aligned_line_per_request(balancer: BalancerProcess,
                                                     backend: FakeOllama) -> None:
    balancer.add_server(backend.url, name="gpu1")
    balancer.call("POST", "/api/generate", {"model": "llama3", "prompt": "x",
                                            "stream": False})
    balancer.call("GET", "/nope")
    balancer.stop()
    lines = [line for line in balancer.log.splitlines() if "/api/generate" in line
             or " /nope " in line]
    assert len(lines) == 2
    generate = lines[0].split()
    # time, level, client, method, path, status, server, model, wait, ttfb, duration, bytes
    assert generate[3:10] == ["127.0.0.1", "POST", "/api/generate", "200", "gpu1",
                              "llama3:latest", generate[9]]
    assert float(generate[10]) >= 0 and float(generate[11]) >= float(generate[10])
    assert int(generate[12]) > 100
    assert lines[1].split()[6] == "404"


def test_json_log_format(start_balancer: Any, sqlite_store: StoreConfig,
                         backend: FakeOllama) -> None:
    lb = start_balancer(sqlite_store, env={"LOG_FORMAT": "json"})
    lb.add_server(backend.url, name="gpu1")
    lb.call("POST", "/api/chat", {"model": "llama3", "messages": [], "stream": True})
    lb.stop()
    entries = [json.loads(line) for line in lb.log.splitlines()]
    assert all({"time", "level", "logger"} <= set(e) for e in entries)
    (chat,) = [e for e in entries if e.get("path") == "/api/chat"]
    assert chat["status"] == 200 and chat["server"] == "gpu1"
    assert chat["model"] == "llama3:latest" and chat["bytes_out"] > 0
    assert chat["ttfb"] <= chat["duration"] and chat["queue_wait"] >= 0
    assert any("listening on" in e.get("message", "") for e in entries)


def test_control_characters_in_names_are_escaped_in_log_lines() -> None:
    assert ob.printable("llama3:latest") == "llama3:latest"
    assert ob.printable("evil\n2026-01-01 INFO forged\x1b[2J") == (
        "evil\\n2026-01-01 INFO forged\\x1b[2J")
    record = logging.LogRecord("ollamabalancer", logging.WARNING, __file__, 1,
                               "request %s failed for %s", ("r-1", "m\nforged"), None)
    line = ob.TextFormatter("%(levelname)s %(message)s").format(record)
    assert line == "WARNING request r-1 failed for m\\nforged"
