"""Servers, proxies and getServer, on SQLite and on MySQL."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
from conftest import BalancerProcess, StoreConfig, free_port, raw_exchange
from fakeollama import FakeOllama, tag


def test_add_server_by_url_returns_the_checked_server(store: StoreConfig, start_balancer: Any,
                                                      backend: FakeOllama) -> None:
    lb = start_balancer(store)
    server = lb.add_server(backend.url, name="gpu1", location="rack 2", runner="ollama")
    assert server["id"] >= 1
    assert server["host"] == "127.0.0.1" and server["port"] == backend.port
    assert server["scheme"] == "http" and server["enabled"] is True
    assert server["name"] == "gpu1" and server["location"] == "rack 2"
    assert server["proxyId"] is None
    assert server["reachable"] is True
    assert server["models"] == ["llama3:latest"]
    assert server["lastChecked"].endswith("Z")


def test_add_server_by_host_and_port_defaults(store: StoreConfig, start_balancer: Any) -> None:
    lb = start_balancer(store)
    reply = lb.call("POST", "/servers/addServer", {"host": "gpu.invalid"})
    assert reply.status == 201, reply
    server = reply.json()
    assert (server["host"], server["port"], server["scheme"]) == ("gpu.invalid", 11434, "http")
    assert server["reachable"] is False
    assert lb.call("GET", f"/servers/{server['id']}").json()["lastError"]


def test_duplicate_host_and_port_is_409_but_another_port_is_fine(
        store: StoreConfig, start_balancer: Any) -> None:
    lb = start_balancer(store)
    assert lb.call("POST", "/servers/addServer", {"host": "h.invalid", "port": 1}).status == 201
    duplicate = lb.call("POST", "/servers/addServer", {"url": "http://h.invalid:1"})
    assert duplicate.status == 409 and "already exists" in duplicate.json()["error"]
    assert lb.call("POST", "/servers/addServer", {"host": "h.invalid", "port": 2}).status == 201


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "host"),
        ({"host": ""}, "host"),
        ({"host": "a b"}, "host"),
        ({"host": "h", "port": 70000}, "port"),
        ({"host": "h", "port": "x"}, "port"),
        ({"host": "h", "scheme": "ftp"}, "scheme"),
        ({"host": "h", "enabled": "yes"}, "enabled"),
        ({"host": "h", "name": "bad\r\nname"}, "name"),
        ({"host": "h", "proxyId": "²"}, "proxyId"),
        ({"host": "h", "scheme": None}, "scheme"),  # null only where it clears a field
        ({"url": "ftp://h"}, "url"),
        ({"url": "http://h/path"}, "url"),
        ({"url": "http://h:1", "host": "h"}, "url"),
        ({"host": "h", "color": "red"}, "color"),
        ([1, 2], "object"),
    ],
)
def test_invalid_server_bodies_are_400_naming_the_field(
        balancer: BalancerProcess, body: Any, field: str) -> None:
    reply = balancer.call("POST", "/servers/addServer", body)
    assert reply.status == 400, reply
    assert field in reply.json()["error"]


def test_a_well_formed_proxy_id_naming_no_proxy_is_422(balancer: BalancerProcess) -> None:
    reply = balancer.call("POST", "/servers/addServer", {"host": "h", "proxyId": 999})
    assert reply.status == 422 and reply.json() == {"error": "'proxyId' 999 is not a known proxy"}


def test_bad_json_and_missing_body_are_400(balancer: BalancerProcess) -> None:
    broken = balancer.call("POST", "/servers/addServer", raw=b"{not json",
                           headers={"Content-Type": "application/json"})
    assert broken.status == 400 and "JSON" in broken.json()["error"]
    empty = balancer.call("POST", "/proxy/addProxy", raw=b"",
                          headers={"Content-Type": "application/json"})
    assert empty.status == 400


def test_admin_body_over_one_mebibyte_is_413_even_when_chunked(
        balancer: BalancerProcess) -> None:
    big = b"[" + b"1," * 600_000 + b"1]"
    request = (b"POST /servers/addServer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"%x\r\n" % len(big) + big + b"\r\n0\r\n\r\n")
    answer = raw_exchange(balancer.port, request)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert balancer.call("GET", "/servers/allServers").status == 200


def test_list_get_patch_and_delete_a_server(store: StoreConfig, start_balancer: Any,
                                            backend: FakeOllama) -> None:
    lb = start_balancer(store)
    server = lb.add_server(backend.url)
    assert [s["id"] for s in lb.call("GET", "/servers/allServers").json()] == [server["id"]]
    patched = lb.call("PATCH", f"/servers/{server['id']}", {"name": "renamed",
                                                           "enabled": False})
    assert patched.status == 200
    assert patched.json()["name"] == "renamed" and patched.json()["enabled"] is False
    assert patched.json()["reachable"] is False
    assert lb.call("GET", f"/servers/{server['id']}").json()["name"] == "renamed"
    assert lb.call("PATCH", "/servers/9999", {"name": "x"}).status == 404
    assert lb.call("DELETE", f"/servers/{server['id']}").status == 204
    assert lb.call("GET", f"/servers/{server['id']}").status == 404
    assert lb.call("DELETE", f"/servers/{server['id']}").status == 404


def test_add_proxy_returns_true_and_never_shows_the_password(
        store: StoreConfig, start_balancer: Any) -> None:
    lb = start_balancer(store)
    reply = lb.call("POST", "/proxy/addProxy", {"ip": "10.0.0.1", "port": 3128, "name": "p1",
                                                "userName": "bob", "password": "hunter2-pw"})
    assert reply.status == 200 and reply.json() is True
    listing = lb.call("GET", "/proxy/allProxies")
    assert listing.status == 200
    (proxy,) = listing.json()
    assert proxy == {"id": proxy["id"], "ip": "10.0.0.1", "port": 3128, "protocol": "http",
                     "name": "p1", "status": True, "userName": "bob", "hasPassword": True}
    one = lb.call("GET", f"/proxy/{proxy['id']}")
    for answer in (listing, one):
        assert b"hunter2-pw" not in answer.body
    assert "hunter2-pw" not in lb.log


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"port": 1, "name": "n"}, "ip"),
        ({"ip": "1.2.3.4", "name": "n"}, "port"),
        ({"ip": "1.2.3.4", "port": 1}, "name"),
        ({"ip": "1.2.3.4", "port": 1, "name": "n", "protocol": "socks6"}, "protocol"),
        ({"ip": "1.2.3.4", "port": 1, "name": "n", "status": "on"}, "status"),
        ({"ip": "1.2.3.4", "port": 1, "name": "n", "userName": "a\nb"}, "userName"),
    ],
)
def test_invalid_proxy_bodies_are_400_naming_the_field(
        balancer: BalancerProcess, body: dict[str, Any], field: str) -> None:
    reply = balancer.call("POST", "/proxy/addProxy", body)
    assert reply.status == 400, reply
    assert field in reply.json()["error"]


def test_patch_and_delete_a_proxy_and_refuse_deleting_one_in_use(
        store: StoreConfig, start_balancer: Any) -> None:
    lb = start_balancer(store)
    proxy_id = lb.add_proxy(name="p", ip="127.0.0.1", port=1, protocol="socks5")
    patched = lb.call("PATCH", f"/proxy/{proxy_id}", {"status": False, "password": "x1"})
    assert patched.status == 200
    assert patched.json()["status"] is False and patched.json()["hasPassword"] is True
    server = lb.call("POST", "/servers/addServer", {"host": "h.invalid", "proxyId": proxy_id})
    assert server.status == 201
    in_use = lb.call("DELETE", f"/proxy/{proxy_id}")
    assert in_use.status == 409 and str(server.json()["id"]) in in_use.json()["error"]
    lb.call("PATCH", f"/servers/{server.json()['id']}", {"proxyId": None})
    assert lb.call("DELETE", f"/proxy/{proxy_id}").status == 204
    assert lb.call("GET", f"/proxy/{proxy_id}").status == 404


def test_names_with_sql_in_them_are_stored_as_text(store: StoreConfig,
                                                   start_balancer: Any) -> None:
    lb = start_balancer(store)
    name = "'; DROP TABLE proxy; --"
    lb.add_proxy(name=name, ip="127.0.0.1", port=8)
    assert [p["name"] for p in lb.call("GET", "/proxy/allProxies").json()] == [name]


def test_get_server_filters_by_models_in_every_query_form(
        store: StoreConfig, start_balancer: Any, make_backend: Any) -> None:
    lb = start_balancer(store)
    both = make_backend(models=[tag("llama3:latest"), tag("mistral:7b", "7.2B")])
    only_llama = make_backend(models=[tag("llama3:latest")])
    lb.add_server(both.url)
    lb.add_server(only_llama.url)
    for index, query in enumerate(("models=llama3&models=mistral:7b",
                                   "models[]=llama3&models[]=mistral:7b",
                                   "models=llama3,mistral:7b")):
        sid = lb.call("GET", f"/servers/getServer?{query}").text
        version = lb.call("GET", f"/servers/ollama/{sid}/api/version?probe={index}")
        assert version.status == 200
        assert [r["query"] for r in both.requests if r["query"]] == [
            f"probe={i}" for i in range(index + 1)], query
    assert not [r for r in only_llama.requests if r["query"]]  # never the one without
    missing = lb.call("GET", "/servers/getServer?models=phi3")
    assert missing.status == 404
    assert "phi3" in missing.json()["error"]


def test_get_server_size_counts_among_requested_models(
        store: StoreConfig, start_balancer: Any, make_backend: Any) -> None:
    lb = start_balancer(store)
    small = make_backend(models=[tag("tiny:latest", "137M"), tag("big:latest", "70B")])
    lb.add_server(small.url)
    assert lb.call("GET", "/servers/getServer?size=65").status == 200
    assert lb.call("GET", "/servers/getServer?models=tiny&size=0.1").status == 200
    too_big = lb.call("GET", "/servers/getServer?models=tiny&size=1")
    assert too_big.status == 404 and "at least" in too_big.json()["error"]
    assert lb.call("GET", "/servers/getServer?size=abc").status == 400
    assert lb.call("GET", "/servers/getServer?size=-1").status == 400


def test_get_server_picks_uniformly_among_qualifying_servers(
        balancer: BalancerProcess, make_backend: Any) -> None:
    ids = {}
    for _ in range(3):
        fake = make_backend()
        ids[balancer.add_server(fake.url)["id"]] = fake
    picks: Counter[str] = Counter(balancer.call("GET", "/servers/getServer").text
                                  for _ in range(150))
    assert len(picks) == 3
    assert min(picks.values()) > 20  # 50 expected each; 20 is far in the tail


def test_get_server_with_unknown_or_disabled_proxy(store: StoreConfig, start_balancer: Any,
                                                   backend: FakeOllama) -> None:
    lb = start_balancer(store)
    lb.add_server(backend.url)
    assert lb.call("GET", "/servers/getServer?proxy=77").status == 404
    assert lb.call("GET", "/servers/getServer?proxy=x").status == 400
    proxy_id = lb.add_proxy(name="off", ip="127.0.0.1", port=1, status=False)
    disabled = lb.call("GET", f"/servers/getServer?proxy={proxy_id}")
    assert disabled.status == 409 and "disabled" in disabled.json()["error"]


def test_no_match_explains_why(balancer: BalancerProcess) -> None:
    empty = balancer.call("GET", "/servers/getServer")
    assert empty.status == 404 and empty.json()["error"] == "no servers are registered"
    balancer.add_server(f"http://127.0.0.1:{free_port()}")
    down = balancer.call("GET", "/servers/getServer")
    assert down.status == 404 and down.json()["error"] == "no enabled server is reachable"


def test_only_reachable_servers_qualify_and_health_follows_the_server(
        balancer: BalancerProcess, make_backend: Any) -> None:
    fake = make_backend()
    server = balancer.add_server(fake.url)
    assert balancer.call("GET", "/servers/getServer").status == 200
    fake.close()
    balancer.wait_for(lambda: balancer.call("GET", "/servers/getServer").status == 404)
    state = balancer.call("GET", f"/servers/{server['id']}").json()
    assert state["reachable"] is False and state["lastError"]


def test_health_check_refreshes_the_model_list(balancer: BalancerProcess,
                                               backend: FakeOllama) -> None:
    server = balancer.add_server(backend.url)
    backend.models = [tag("llama3:latest"), tag("qwen2:latest")]
    balancer.wait_for(lambda: "qwen2:latest" in balancer.call(
        "GET", f"/servers/{server['id']}").json()["models"])
    assert balancer.call("GET", "/servers/getServer?models=qwen2").status == 200


def test_server_ids_survive_a_restart_and_are_shared_by_instances(
        store: StoreConfig, start_balancer: Any, backend: FakeOllama) -> None:
    first = start_balancer(store)
    first.add_server(backend.url)
    sid = first.server_id()
    second = start_balancer(store)  # another instance on the same database
    assert second.call("GET", f"/servers/ollama/{sid}/api/version").status == 200
    first.stop()
    restarted = start_balancer(store)
    assert restarted.call("GET", f"/servers/ollama/{sid}/api/version").status == 200
    assert restarted.server_id() == sid  # the same (server, proxy) keeps its ID


def test_an_id_made_on_one_instance_works_at_once_on_another_that_runs_already(
        store: StoreConfig, start_balancer: Any, backend: FakeOllama) -> None:
    first = start_balancer(store)
    second = start_balancer(store, "--health-interval", "600")  # no round to wait for
    server = first.add_server(backend.url)
    proxy_id = first.add_proxy(name="p", ip="127.0.0.1", port=1)
    for key in (first.server_id(), str(server["id"])):
        reply = second.call("GET", f"/servers/ollama/{key}/api/version")
        assert reply.status == 200, (key, reply)
    proxied = second.call("GET", f"/servers/ollama/{first.server_id(proxy=str(proxy_id))}"
                                 "/api/version")
    assert proxied.status == 502  # through the new proxy, which nobody listens for
    unknown = second.call("GET", "/servers/ollama/999/api/version")
    assert unknown.status == 404 and unknown.json() == {"error": "unknown server id"}


def test_deleting_the_server_or_proxy_invalidates_its_ids(
        store: StoreConfig, start_balancer: Any, backend: FakeOllama) -> None:
    lb = start_balancer(store)
    server = lb.add_server(backend.url)
    proxy_id = lb.add_proxy(name="p", ip="127.0.0.1", port=1)
    plain, proxied = lb.server_id(), lb.server_id(proxy=str(proxy_id))
    assert plain != proxied
    assert lb.call("DELETE", f"/proxy/{proxy_id}").status == 204
    gone = lb.call("GET", f"/servers/ollama/{proxied}/api/version")
    assert gone.status == 404 and gone.json() == {"error": "unknown server id"}
    assert lb.call("GET", f"/servers/ollama/{plain}/api/version").status == 200
    lb.call("DELETE", f"/servers/{server['id']}")
    assert lb.call("GET", f"/servers/ollama/{plain}/api/version").status == 404


def test_disabled_server_is_not_relayed_to(balancer: BalancerProcess,
                                           backend: FakeOllama) -> None:
    server = balancer.add_server(backend.url)
    sid = balancer.server_id()
    balancer.call("PATCH", f"/servers/{server['id']}", {"enabled": False})
    reply = balancer.call("GET", f"/servers/ollama/{sid}/api/version")
    assert reply.status == 409 and "disabled" in reply.json()["error"]


def test_startup_log_names_the_store_and_address_but_not_the_password(
        store: StoreConfig, start_balancer: Any) -> None:
    lb = start_balancer(store, env={"DB_PASSWORD": ""} if store.engine == "mysql" else None)
    first_lines = lb.log
    if store.engine == "mysql":
        assert f"store mysql root@127.0.0.1:3306/{store.database}" in first_lines
    else:
        assert f"store sqlite {store.path}" in first_lines
    assert f"listening on http://127.0.0.1:{lb.port}" in first_lines


def test_server_added_with_a_dead_port_shows_unreachable_quickly(
        balancer: BalancerProcess) -> None:
    port = free_port()
    server = balancer.add_server(f"http://127.0.0.1:{port}")
    assert server["reachable"] is False  # checked before the answer, not at the next round
    assert "cannot connect" in server["lastError"] and str(port) in server["lastError"]


@pytest.mark.parametrize("raw", [
    b'{"host": "h", "name": "\\ud800"}',          # a lone surrogate: no database keeps it
    b'{"host": "h", "proxyId": "\xc2\xb2"}',       # "2" as a superscript: a digit to isdigit()
    b'{"host": "h", "name": "gpu\\n"}',           # a control character, even at the end
    b'{"host": "h", "port": 80.5}',
])
def test_text_and_numbers_no_store_can_keep_are_400_not_500(
        balancer: BalancerProcess, raw: bytes) -> None:
    reply = balancer.call("POST", "/servers/addServer", raw=raw,
                          headers={"Content-Type": "application/json"})
    assert reply.status == 400, reply
    assert balancer.call("GET", "/servers/allServers").json() == []


def test_a_server_added_or_changed_is_checked_once(
        start_balancer: Any, sqlite_store: StoreConfig, backend: FakeOllama) -> None:
    # The handler checks it, and so does reading the change back: one check serves both.
    balancer = start_balancer(sqlite_store, "--health-interval", "600")
    row = balancer.add_server(backend.url)

    def tags() -> int:
        return sum(1 for r in backend.requests if r["path"] == "/api/tags")

    time.sleep(0.3)
    assert tags() == 1
    balancer.call("PATCH", f"/servers/{row['id']}", {"name": "renamed"})
    time.sleep(0.3)
    assert tags() == 2


def test_an_added_server_is_answered_as_checked_though_the_fleet_was_read_again_meanwhile(
        start_balancer: Any, sqlite_store: StoreConfig, backend: FakeOllama) -> None:
    # A slow check: health rounds and syncs read every row again while it runs, and the
    # answer must show the server as it is now, checked, not the copy read before.
    balancer = start_balancer(sqlite_store, "--health-interval", "0.1", "--sync-interval",
                              "0.1")
    backend.tags_delay = 0.5
    row = balancer.add_server(backend.url)
    assert row["reachable"] is True and row["models"] == ["llama3:latest"], row


def test_health_rounds_read_the_version_once_and_again_when_the_server_comes_back(
        start_balancer: Any, sqlite_store: StoreConfig, backend: FakeOllama) -> None:
    balancer = start_balancer(sqlite_store, "--health-interval", "0.1")

    def asked(path: str) -> int:
        return sum(1 for r in backend.requests if r["path"] == path)

    balancer.add_server(backend.url)
    balancer.wait_for(lambda: asked("/api/ps") >= 5)  # several rounds
    assert asked("/api/version") == 1
    backend.missing_paths.add("/api/tags")  # down, as an upgrade's restart would be
    balancer.wait_for(lambda: not balancer.call("GET", "/servers/1").json()["reachable"])
    backend.version = "0.13.0"
    backend.missing_paths.clear()
    balancer.wait_for(lambda: balancer.call("GET", "/api/version").json()
                      == {"version": "0.13.0"})
    assert asked("/api/version") == 2
