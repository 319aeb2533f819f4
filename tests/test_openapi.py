"""The API describes itself: /openapi.json is made from the route table, every path it
gives is served by the route it comes from, /api-docs shows it in a browser, and the
management API is fuzzed from it with schemathesis (no 500, no answer outside its
description, no request that leaves the store inconsistent)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import (
    BalancerProcess,
    StoreConfig,
    chromium,
    drop_database,
    mysql_connect,
    require_module,
)
from fakeollama import FakeOllama, tag

import ollamabalancer as ob

schemathesis = require_module("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import GenerationMode, checks  # noqa: E402

DOCUMENT = ob.openapi_document(ob.ROUTES)
TOKEN = "fuzzing-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SAMPLES = {"id": "7", "model": "llama3:latest", "digest": "sha256:" + "0" * 64,
           "server": "0123456789abcdef0123456789abcdef", "path": "api/tags"}


def test_every_route_is_described_and_every_described_path_reaches_its_route() -> None:
    app = ob.Balancer(ob.Config(), None)  # type: ignore[arg-type]
    for line in ob.ROUTES:
        assert line.paths, line.handler
        for path in line.paths:
            concrete = re.sub(r"\{(\w+)\}", lambda m: SAMPLES[m.group(1)], path)
            methods = sorted(line.methods or ob.ANY_METHODS)
            for method in methods:
                first = next(r for r, _, _ in app.matching_routes(concrete)
                             if not r.methods or method in r.methods)
                assert first is line, (method, path)
                assert DOCUMENT["paths"][path][method.lower()]["summary"] == line.summary
    described = {(m, p) for p, item in DOCUMENT["paths"].items() for m in item}
    assert len(described) == sum(len(r.paths) * len(r.methods or ob.ANY_METHODS)
                                 for r in ob.ROUTES)
    ids = [op["operationId"] for item in DOCUMENT["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_every_schema_and_parameter_the_description_names_is_in_it() -> None:
    text = json.dumps(DOCUMENT)
    for ref in re.findall(r'"#/components/schemas/(\w+)"', text):
        assert ref in DOCUMENT["components"]["schemas"]
    management = DOCUMENT["paths"]["/servers/{id}"]["patch"]
    assert {"400", "401", "403", "404", "409", "415", "503"} <= set(management["responses"])
    assert management["security"] == [{"adminToken": []}, {"adminPassword": []}]
    assert DOCUMENT["paths"]["/api/chat"]["post"]["security"] == [{"apiKey": []}, {}]
    body = DOCUMENT["components"]["schemas"]["NewServer"]
    assert set(body["properties"]) == set(ob.SERVER_BODY_FIELDS)
    assert body["additionalProperties"] is False
    getter = DOCUMENT["paths"]["/servers/getServer"]["get"]
    assert [p["name"] for p in getter["parameters"]] == ["models", "size", "proxy"]


def test_the_description_is_served_and_shown_readably_in_a_browser(
        start_balancer: Any, sqlite_store: StoreConfig) -> None:
    lb: BalancerProcess = start_balancer(sqlite_store, env={"ADMIN_TOKEN": TOKEN})
    served = lb.call("GET", "/openapi.json")  # open: it holds nothing secret
    assert served.status == 200 and served.headers["Content-Type"] == "application/json"
    assert served.json() == json.loads(json.dumps(DOCUMENT))
    page = lb.call("GET", "/api-docs")
    assert page.status == 200 and "default-src 'self'" in page.headers[
        "Content-Security-Policy"]
    assert not re.search(r"""(?:src|href)=["']?https?:""", page.text)  # nothing from a CDN
    dom = chromium("--virtual-time-budget=2000", "--dump-dom",
                   f"http://127.0.0.1:{lb.port}/api-docs")
    assert '<h2>Management</h2>' in dom and '<h2>Ollama API</h2>' in dom
    assert '<span class="path">/servers/getServer</span>' in dom
    assert "an ID for a server that has the models" in dom
    assert "<code>url</code>" in dom and "<code>maxConcurrency</code>" in dom


# -- fuzzing the management API from its description ---------------------------------------


SCHEMA = schemathesis.openapi.from_dict(DOCUMENT).include(
    tag=["Management", "Observability", "Description"])


@pytest.fixture(scope="module", params=["sqlite", "mysql"])
def fuzzed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[BalancerProcess, StoreConfig]]:
    """A balancer with an admin token, a server and a proxy, for every fuzzed call."""
    store = StoreConfig(request.param, tmp_path_factory.mktemp("fuzz"))
    if store.engine == "mysql":
        mysql_connect().close()
    backend = FakeOllama()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "OLLAMA"))}
    env.update(store.env(), ADMIN_TOKEN=TOKEN)
    lb = BalancerProcess(env, ["--health-timeout", "0.5", "--connect-timeout", "0.5",
                               "--health-interval", "600"])
    try:
        assert lb.call("POST", "/servers/addServer", {"url": backend.url, "name": "gpu"},
                       headers=AUTH).status == 201
        assert lb.call("POST", "/proxy/addProxy", {"ip": "127.0.0.1", "port": 1, "name": "p"},
                       headers=AUTH).status == 200
        yield lb, store
        assert lb.proc.poll() is None, lb.log
        assert_consistent(lb, store)
    finally:
        lb.stop()
        backend.close()
        if store.engine == "mysql":
            drop_database(store.database)


def rows(store: StoreConfig, query: str) -> list[tuple[Any, ...]]:
    if store.engine == "sqlite":
        with sqlite3.connect(store.path) as db:
            return db.execute(query).fetchall()
    db = mysql_connect(store.database)
    try:
        with db.cursor() as cursor:
            cursor.execute(query)
            return list(cursor.fetchall())
    finally:
        db.close()


def assert_consistent(lb: BalancerProcess, store: StoreConfig) -> None:
    """What the API lists is what the database holds, and the database is whole: every
    reference points at a row, every secret is sealed."""
    proxies = {r[0]: r for r in rows(store, "SELECT id, name, password FROM proxy")}
    servers = {r[0]: r for r in rows(
        store, "SELECT id, host, port, proxy_id, upstream_auth FROM ollamaServers")}
    listed = lb.call("GET", "/servers/allServers", headers=AUTH).json()
    assert {s["id"]: (s["host"], s["port"], s["proxyId"]) for s in listed} == {
        i: (r[1], r[2], r[3]) for i, r in servers.items()}
    assert {p["id"] for p in lb.call("GET", "/proxy/allProxies", headers=AUTH).json()} == set(
        proxies)
    assert all(r[3] is None or r[3] in proxies for r in servers.values())
    for token, server_id, proxy_id in rows(
            store, "SELECT token, server_id, proxy_id FROM server_handle"):
        assert server_id in servers and (not proxy_id or proxy_id in proxies), token
    secrets = [r[2] for r in proxies.values()] + [r[4] for r in servers.values()]
    assert all(not s or s.startswith("enc:v1:") for s in secrets)  # "": nothing to hide
    keys = lb.call("GET", "/keys/allKeys", headers=AUTH).json()
    assert {k["id"] for k in keys} == {r[0] for r in rows(store, "SELECT id FROM api_key")}


@schemathesis.check
def valid_data_is_never_refused_as_bad(ctx: Any, response: Any, case: Any) -> bool:
    """A 400 for a request the description allows: the description and the code disagree
    (schemathesis's positive_data_acceptance wants a 2xx, where 404 and 409 are right)."""
    positive = case.meta is not None and case.meta.generation.mode == GenerationMode.POSITIVE
    if positive and response.status_code == 400:
        raise AssertionError(f"a request the description allows got 400: {response.text}")
    return True


FUZZ_CHECKS = [checks.not_a_server_error, checks.status_code_conformance,
               checks.content_type_conformance, checks.response_schema_conformance,
               checks.negative_data_rejection, checks.ignored_auth,
               checks.unsupported_method, valid_data_is_never_refused_as_bad]
#: Examples per operation: few enough for every run of the suite, the same ones each time
#: (OLLAMABALANCER_FUZZ_EXAMPLES=N for a deeper, random run by hand).
EXAMPLES = int(os.environ.get("OLLAMABALANCER_FUZZ_EXAMPLES", "0")) or None


@SCHEMA.parametrize()
@settings(max_examples=EXAMPLES or 40, derandomize=EXAMPLES is None, deadline=None,
          database=None, suppress_health_check=list(HealthCheck))
def test_the_management_api_keeps_to_its_description(
        case: Any, fuzzed: tuple[BalancerProcess, StoreConfig]) -> None:
    lb, _ = fuzzed
    case.call_and_validate(base_url=f"http://127.0.0.1:{lb.port}", headers=AUTH,
                           checks=FUZZ_CHECKS, timeout=10)
    assert lb.proc.poll() is None, lb.log  # still serving



def test_each_ollama_and_openai_endpoint_describes_its_body_with_an_example_that_works(
        start_balancer: Any, sqlite_store: StoreConfig, make_backend: Any) -> None:
    lb = start_balancer(sqlite_store)
    fake = make_backend(models=[tag("llama3.2:latest"), tag("all-minilm:latest")])
    lb.add_server(fake.url)
    document = lb.call("GET", "/openapi.json").json()
    tried = []
    # The endpoints the fake Ollama answers (it lacks the legacy and the newest ones).
    answered = ("/api/generate", "/api/chat", "/api/embed", "/api/show",
                "/v1/chat/completions", "/v1/embeddings")
    for path in [*ob.ROUTED_PATHS, "/api/show"]:
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        schema = document["components"]["schemas"][body["schema"]["$ref"].rsplit("/", 1)[1]]
        assert "model" in schema["properties"] and schema["examples"], path
        if path in answered:
            reply = lb.call("POST", path, schema["examples"][0])
            assert reply.status == 200, (path, reply)
            tried.append(path)
    assert sorted(tried) == sorted(answered)
