"""Browsers: a page of another site must not reconfigure the balancer (CSRF, DNS
rebinding), and the Ollama endpoints answer CORS as Ollama does."""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import BalancerProcess, StoreConfig, chromium
from fakeollama import FakeOllama

JSON = {"Content-Type": "application/json"}


def listing(lb: BalancerProcess) -> tuple[list[Any], list[Any]]:
    return (lb.call("GET", "/keys/allKeys").json(), lb.call("GET", "/servers/allServers").json())


def test_forged_management_requests_are_refused(balancer: BalancerProcess) -> None:
    lb = balancer
    key = {"name": "locks-everyone-out"}
    rogue = {"url": "http://rogue.example:11434"}
    attempts = [
        ("POST", "/keys/addKey", {**JSON, "Origin": "https://evil.example"}, 403),
        ("POST", "/keys/addKey", {**JSON, "Origin": "null"}, 403),
        ("POST", "/servers/addServer", {**JSON, "Sec-Fetch-Site": "cross-site"}, 403),
        ("POST", "/servers/addServer", {**JSON, "Sec-Fetch-Site": "same-site"}, 403),
        # What an HTML form or a no-cors fetch can send: never application/json.
        ("POST", "/keys/addKey", {"Content-Type": "text/plain"}, 415),
        ("POST", "/keys/addKey", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
        # DNS rebinding: the page's own name, pointed at 127.0.0.1.
        ("POST", "/keys/addKey", {**JSON, "Host": f"evil.example:{lb.port}"}, 403),
        ("GET", "/keys/allKeys", {"Host": "evil.example"}, 403),
    ]
    for method, path, headers, status in attempts:
        body = key if path == "/keys/addKey" else rogue
        reply = lb.call(method, path, body if method == "POST" else None, headers=headers)
        assert reply.status == status, (headers, reply)
        assert "error" in reply.json()
    assert listing(lb) == ([], [])
    assert lb.call("GET", "/keys/allKeys", headers={"Sec-Fetch-Site": "cross-site",
                                                    "Sec-Fetch-Mode": "cors"}).status == 403
    # A link followed from another site to the dashboard: a person's own page view.
    followed = lb.call("GET", "/dashboard", headers={"Sec-Fetch-Site": "cross-site",
                                                     "Sec-Fetch-Mode": "navigate"})
    assert followed.status == 200
    # The balancer's own page (same origin) and a plain client still manage it.
    own = {**JSON, "Origin": f"http://127.0.0.1:{lb.port}", "Sec-Fetch-Site": "same-origin"}
    assert lb.call("POST", "/keys/addKey", key, headers=own).status == 201
    assert lb.call("GET", "/keys/allKeys", headers={"Host": "localhost"}).status == 200
    assert lb.call("GET", "/keys/allKeys", headers={"Host": "[::1]:1"}).status == 200


def test_allowed_hosts_names_the_balancer(start_balancer: Any,
                                          sqlite_store: StoreConfig) -> None:
    lb = start_balancer(sqlite_store, env={"ALLOWED_HOSTS": "lb.internal, Other.Example"})
    assert lb.call("GET", "/servers/allServers", headers={"Host": "lb.internal:8080"}
                   ).status == 200
    assert lb.call("GET", "/servers/allServers", headers={"Host": "other.example"}
                   ).status == 200
    assert lb.call("GET", "/servers/allServers", headers={"Host": "lb.internal.evil"}
                   ).status == 403


def test_with_an_admin_token_any_host_may_manage_but_never_cross_site(
        start_balancer: Any, sqlite_store: StoreConfig) -> None:
    token = "an-admin-token-of-32-characters!"
    lb = start_balancer(sqlite_store, env={"ADMIN_TOKEN": token})
    admin = {"Authorization": f"Bearer {token}"}
    assert lb.call("GET", "/servers/allServers", headers={**admin, "Host": "lb.example"}
                   ).status == 200
    forged = lb.call("POST", "/keys/addKey", {"name": "x"},
                     headers={**admin, **JSON, "Origin": "https://evil.example"})
    assert forged.status == 403
    assert lb.call("GET", "/keys/allKeys", headers=admin).json() == []


def test_ollama_endpoints_answer_cors_as_ollama_does(
        start_balancer: Any, sqlite_store: StoreConfig, backend: FakeOllama) -> None:
    lb = start_balancer(sqlite_store, env={"ORIGINS": "https://chat.example.com"})
    sid = lb.add_server(backend.url)["id"]
    for origin in ("http://localhost:3000", "http://127.0.0.1", "https://0.0.0.0:8443",
                   "app://obsidian.md", "file://", "tauri://localhost",
                   "vscode-webview://abc", "https://chat.example.com"):
        reply = lb.call("GET", "/api/tags", headers={"Origin": origin})
        assert reply.status == 200, origin
        assert reply.headers["Access-Control-Allow-Origin"] == origin
        assert "Origin" in reply.headers["Vary"]
    relayed = lb.call("POST", f"/servers/ollama/{sid}/echo", raw=b"hi",
                      headers={"Origin": "http://localhost:5173"})
    assert relayed.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    assert "Origin" not in backend.requests[-1]["headers"]  # answered here, not upstream
    for origin in ("https://evil.example", "http://localhost.evil.example",
                   "https://chat.example.com.evil"):
        refused = lb.call("GET", "/api/tags", headers={"Origin": origin})
        assert refused.status == 403 and "Access-Control-Allow-Origin" not in refused.headers
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type,authorization"}
    answer = lb.call("OPTIONS", "/api/chat", headers=preflight)
    assert answer.status == 204
    assert answer.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "POST" in answer.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in answer.headers["Access-Control-Allow-Headers"]
    assert lb.call("OPTIONS", "/v1/chat/completions",
                   headers={**preflight, "Origin": "https://evil.example"}).status == 403
    assert lb.call("OPTIONS", "/keys/addKey", headers=preflight).status == 403


ATTACK_PAGE = """<!doctype html><title>cute cats</title><script>
const lb = "http://127.0.0.1:%d";
const key = JSON.stringify({name: "pwned"});
const rogue = JSON.stringify({url: "http://127.0.0.1:9/rogue"});
Promise.allSettled([
  fetch(lb + "/keys/addKey", {method: "POST", mode: "no-cors", body: key}),
  fetch(lb + "/keys/addKey", {method: "POST", mode: "no-cors", body: key,
                              headers: {"Content-Type": "text/plain"}}),
  fetch(lb + "/servers/addServer", {method: "POST", body: rogue,
                                    headers: {"Content-Type": "application/json"}}),
]).then(() => { document.title = "done"; });
</script>
<form id="f" method="POST" enctype="text/plain" target="sink"
      action="http://127.0.0.1:%d/servers/addServer">
<input name='{"url": "http://127.0.0.1:9/form", "x": "' value='"}'></form>
<iframe name="sink"></iframe><script>document.getElementById("f").submit();</script>
"""


@pytest.fixture
def attack_site(balancer: BalancerProcess) -> Iterator[str]:
    page = (ATTACK_PAGE % (balancer.port, balancer.port)).encode()

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: Any) -> None:
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://localhost:{site.server_address[1]}/"  # another site than 127.0.0.1
    site.shutdown()
    site.server_close()


def test_a_web_page_of_another_site_cannot_reconfigure_the_balancer(
        balancer: BalancerProcess, attack_site: str) -> None:
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", attack_site)
    assert "<title>done</title>" in dom  # the page ran its requests
    keys, servers = listing(balancer)
    assert keys == [] and servers == []
    # They did arrive, and were refused: two posts, the preflight, the form (each access
    # line written once its answer is out).
    balancer.wait_for(lambda: len(re.findall(r"POST +/keys/addKey +403 ", balancer.log)) == 2
                      and re.search(r"OPTIONS +/servers/addServer +403 ", balancer.log)
                      and re.search(r"POST +/servers/addServer +403 ", balancer.log))
