"""The dashboard in a real headless Chromium, against live data from fake backends.

Set DASHBOARD_SCREENSHOT=/path/to/file.png to have a screenshot written for a person.
"""

from __future__ import annotations

import base64
import os
import re
from typing import Any

from conftest import BalancerProcess, StoreConfig, chromium, free_port
from fakeollama import FakeOllama, tag


def test_dashboard_shows_live_fleet_data_in_a_real_browser(
        start_balancer: Any, sqlite_store: StoreConfig, make_backend: Any) -> None:
    lb: BalancerProcess = start_balancer(sqlite_store, "--health-interval", "600")
    fast: FakeOllama = make_backend(models=[tag("llama3:latest"), tag("mistral:7b")])
    lb.add_server(fast.url, name="gpu-alpha", maxConcurrency=6)
    lb.add_server(f"http://127.0.0.1:{free_port()}", name="gpu-broken")
    lb.add_proxy(name="dc-socks", ip="127.0.0.1", port=1080, protocol="socks5",
                 userName="ops", password="never-shown-pw")
    for _ in range(3):
        assert lb.call("POST", "/api/chat", {"model": "llama3", "messages": [],
                                             "stream": False}).status == 200
    assert lb.call("GET", "/servers/ollama/2/api/tags").status == 502  # a recent error
    assert lb.call("PATCH", "/servers/2", {"draining": True}).status == 200
    url = f"http://127.0.0.1:{lb.port}/dashboard"
    dom = chromium("--virtual-time-budget=4000", "--dump-dom", url)
    assert "gpu-alpha" in dom and "gpu-broken" in dom
    assert '<span class="pill loaded">llama3:latest</span>' in dom  # routed there: loaded
    assert '<span class="pill">mistral:7b</span>' in dom
    assert "0 / 6" in dom  # in flight / capacity from the server's own setting
    assert '<div class="value" id="card-up">1 / 2</div>' in dom
    assert re.search(r"id=\"card-rpm\">(\d+)<", dom).group(1) == "4", dom  # type: ignore[union-attr]
    assert "<td>3</td>" in dom  # gpu-alpha's requests in the last minute
    assert "dc-socks" in dom and "ops" in dom and "never-shown-pw" not in dom
    assert "cannot connect to gpu-broken" in dom  # in recent errors
    # Actions on each server, a pull on the fleet, and words a person reads.
    assert dom.count(">Disable</button>") == 2 and "<button>Remove</button>" in dom
    assert dom.count(">Undrain</button>") == 1 and dom.count(">Drain</button>") == 1
    assert '<div class="why">drained: nothing running</div>' in dom
    assert '<form id="pull"' in dom and '<td><span class="dim">no</span></td>' in dom
    favicon = lb.call("GET", "/favicon.ico")
    assert favicon.status == 200 and favicon.headers["Content-Type"] == "image/svg+xml"
    assert re.search(r'<body data-updated="\d{4}-', dom)  # it polled /servers/status
    assert '<span class="meta" id="state"></span>' in dom  # and said nothing was wrong
    screenshot = os.environ.get("DASHBOARD_SCREENSHOT")
    if screenshot:
        chromium("--window-size=1280,900", f"--screenshot={screenshot}", url)
        assert os.path.getsize(screenshot) > 10_000


def test_status_json_and_the_page_are_admin_protected(
        start_balancer: Any, sqlite_store: StoreConfig) -> None:
    token = "dashboard-admin-token-0123"
    lb = start_balancer(sqlite_store, env={"ADMIN_TOKEN": token})
    page = lb.call("GET", "/dashboard")
    assert page.status == 401
    assert page.headers.get_all("WWW-Authenticate")[0].startswith("Basic")  # browser prompt
    basic = base64.b64encode(f"admin:{token}".encode()).decode()
    allowed = lb.call("GET", "/dashboard", headers={"Authorization": f"Basic {basic}"})
    assert allowed.status == 200 and allowed.headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in allowed.headers["Content-Security-Policy"]
    assert lb.call("GET", "/servers/status").status == 401
    status = lb.call("GET", "/servers/status", headers={"Authorization": f"Bearer {token}"})
    assert set(status.json()) >= {"servers", "queue", "proxies", "recentErrors", "strategy"}
    wrong = base64.b64encode(b"admin:wrong").decode()
    assert lb.call("GET", "/dashboard",
                   headers={"Authorization": f"Basic {wrong}"}).status == 401


def test_names_are_shown_as_text_never_as_html(start_balancer: Any,
                                              sqlite_store: StoreConfig) -> None:
    lb: BalancerProcess = start_balancer(sqlite_store)
    lb.add_server("http://127.0.0.1:9", name="<img src=x onerror=alert(1)></script>")
    dom = chromium("--virtual-time-budget=1000", "--dump-dom",
                   f"http://127.0.0.1:{lb.port}/dashboard")
    assert "&lt;img src=x onerror=alert(1)&gt;&lt;/script&gt;" in dom
    assert "<img src" not in dom


def test_a_dead_server_shows_why_and_the_last_minutes_are_drawn_at_page_load(
        start_balancer: Any, sqlite_store: StoreConfig, make_backend: Any) -> None:
    lb: BalancerProcess = start_balancer(sqlite_store, "--health-interval", "600")
    doomed: FakeOllama = make_backend(models=[tag("llama3:latest")])
    doomed.loaded = ["llama3:latest"]
    row = lb.add_server(doomed.url, name="gpu-doomed")
    for _ in range(4):
        reply = lb.call("POST", "/api/chat", {"model": "llama3", "messages": [],
                                              "stream": False})
        assert reply.status == 200 and reply.headers["X-Ollama-Server"] == "gpu-doomed"
    doomed.close()
    lb.call("PATCH", f"/servers/{row['id']}", {"weight": 1})  # checked again: down
    lb.wait_for(lambda: not lb.call("GET", f"/servers/{row['id']}").json()["reachable"])
    status = lb.call("GET", "/servers/status").json()
    server = status["servers"][0]
    assert server["loadedModels"] == []  # nothing is known to be loaded on a dead server
    assert len(server["history"]) == 30 and sum(p[0] for p in server["history"]) == 4
    health = [e for e in status["recentErrors"] if e["kind"] == "health"]
    assert [e["server"] for e in health] == ["gpu-doomed"]
    assert "cannot connect" in health[0]["message"]
    assert '"weight":1,' in lb.call("GET", "/servers/allServers").text  # 1, not 1.0
    dom = chromium("--virtual-time-budget=1000", "--dump-dom",
                   f"http://127.0.0.1:{lb.port}/dashboard")
    assert '<span class="pill">llama3:latest</span>' in dom  # not green
    cell = re.search(r'<span class="down">down</span><div class="why">([^<]*)</div>', dom)
    assert cell and "cannot connect" in cell.group(1), dom  # said, not hidden in a tooltip
    assert re.search(r"<td>health</td><td>health check failed: cannot connect", dom), dom
    # The chart is drawn from the balancer's own history, not from this page's polls.
    line = re.search(r'<polyline points="([^"]+)"', dom)
    assert line, dom
    ys = {point.split(",")[1] for point in line.group(1).split()}
    assert len(line.group(1).split()) == 30 and len(ys) > 1
    assert re.search(r'<td class="load">', dom)
    assert "td.load { white-space: nowrap; }" in dom


def test_a_fleet_of_many_servers_is_listed_and_shown_a_page_at_a_time(
        start_balancer: Any, sqlite_store: StoreConfig) -> None:
    lb: BalancerProcess = start_balancer(sqlite_store, "--health-interval", "600")
    for index in range(105):  # disabled: never checked
        lb.add_server(f"http://10.0.{index // 250}.{index % 250 + 1}:11434", enabled=False)
    ids: list[int] = []
    path = "/servers/allServers?limit=40"
    while path:
        reply = lb.call("GET", path)
        assert reply.status == 200 and len(reply.json()) <= 40
        ids += [server["id"] for server in reply.json()]
        link = reply.headers.get("Link")
        path = re.match(r"<([^>]+)>; rel=\"next\"", link).group(1) if link else ""  # type: ignore[union-attr]
    assert ids == sorted(ids) and len(ids) == 105
    assert len(lb.call("GET", "/servers/allServers").json()) == 105  # no limit: all, as ever
    for bad in ("limit=0", "limit=5001", "limit=x", "after=-1"):
        assert lb.call("GET", f"/servers/allServers?{bad}").status == 400, bad
    status = lb.call("GET", f"/servers/status?limit=10&after={ids[99]}").json()
    assert [s["id"] for s in status["servers"]] == ids[100:] and status["next"] is None
    assert status["totals"]["servers"] == 105 and status["totals"]["up"] == 0
    dom = chromium("--virtual-time-budget=1000", "--dump-dom",
                   f"http://127.0.0.1:{lb.port}/dashboard")
    assert '<div class="value" id="card-up">0 / 105</div>' in dom
    assert '<span class="dim" id="page">(100 of 105)</span>' in dom
    assert dom.count('<span class="down">') + dom.count(">disabled<") == 100  # one page
    assert re.search(r'<button id="next" data-after="\d+">', dom)  # shown, not hidden
