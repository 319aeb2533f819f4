"""Access control in-process, decision by decision: who may manage the balancer, which
browser origins may read it, which credentials are the balancer's own (never sent on),
and what an error may tell. The same rules end to end: test_cross_site, test_security."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import types
from typing import Any

import pytest

import ollamabalancer as ob

TOKEN = "an-admin-token-of-32-characters!"


def request(method: str = "GET", path: str = "/servers/allServers", *,
            peer: str = "127.0.0.1", body: bool = False, **fields: str) -> Any:
    """What the access rules read of a request: its head, peer, method, path, body."""
    headers = ob.Headers(tuple((name.replace("_", "-"), value)
                               for name, value in {"Host": "127.0.0.1:8080", **fields}.items()
                               if value is not None))
    head = ob.RequestHead(method, path, "HTTP/1.1", headers)
    return types.SimpleNamespace(head=head, method=method, path=path, body_done=not body,
                                 wire=types.SimpleNamespace(peer=peer), response_fields=[],
                                 authenticated=False, privileged=False, endpoint="",
                                 client=peer, forwarded=False)


def app(**settings: Any) -> ob.Access:
    return ob.Balancer(ob.Config(**settings), None).access  # type: ignore[arg-type]


def refused(check: Any, *args: Any) -> ob.HTTPError:
    with pytest.raises(ob.HTTPError) as caught:
        check(*args)
    return caught.value


# -- pure helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(("authority", "expected"), [
    ("example.com", ("example.com", None)), ("Example.COM:8080", ("example.com", 8080)),
    ("[::1]:9", ("::1", 9)), ("[::1]", ("::1", None)), ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("", None), ("user@host", None), ("host/path", None), ("host:99999", None),
    ("host:x", None)])
def test_split_authority_reads_host_and_port_or_nothing(
        authority: str, expected: tuple[str, int | None] | None) -> None:
    assert ob.split_authority(authority) == expected


@pytest.mark.parametrize(("origin", "host", "same"), [
    ("http://127.0.0.1:8080", "127.0.0.1:8080", True),
    ("http://LB.example", "lb.example:80", True),
    ("https://lb.example", "lb.example", True),
    ("https://lb.example:443", "lb.example", True),
    ("http://lb.example", "lb.example:8080", False),
    ("https://lb.example", "lb.example:80", False),
    ("http://evil.example", "lb.example", False),
    ("null", "lb.example", False), ("file://", "lb.example", False),
    ("http://lb.example", None, False), ("http://lb.example:bad", "lb.example", False),
    ("http://lb.example", "lb.example:bad", False), ("http://lb.example", "a b/c", False)])
def test_same_origin_compares_scheme_host_and_port(origin: str, host: str | None,
                                                   same: bool) -> None:
    assert ob.same_origin(origin, host) is same


@pytest.mark.parametrize(("peer", "loopback"), [
    ("127.0.0.1", True), ("127.255.0.9", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("unix", True), ("10.0.0.1", False), ("::ffff:10.0.0.1", False), ("fe80::1", False),
    ("localhost", False), ("", False)])
def test_loopback_peers(peer: str, loopback: bool) -> None:
    assert ob.is_loopback(peer) is loopback


def test_origin_patterns_match_whole_origins_with_wildcards() -> None:
    matcher = ob.origin_matcher(("http://localhost:*", "https://*.corp", "app://x"))
    for origin in ("http://localhost:3000", "https://a.corp", "https://a.b.corp", "app://x"):
        assert matcher.fullmatch(origin), origin
    for origin in ("http://localhost", "https://corp", "https://a.corp.evil", "app://xy",
                   "http://localhost.evil:1"):
        assert not matcher.fullmatch(origin), origin
    assert not ob.origin_matcher(()).fullmatch("http://anything")


def test_bearer_tokens_and_basic_passwords_are_read_exactly() -> None:
    def head(value: str | None) -> ob.RequestHead:
        fields = () if value is None else (("Authorization", value),)
        return ob.RequestHead("GET", "/", "HTTP/1.1", ob.Headers(fields))

    assert ob.bearer_token(head("Bearer abc")) == "abc"
    assert ob.bearer_token(head("bearer  abc ")) == "abc"
    for value in (None, "Bearer", "Bearer ", "Basic abc", "Token abc"):
        assert ob.bearer_token(head(value)) is None, value
    basic = "Basic " + base64.b64encode(b"user:pa:ss").decode()
    assert ob.basic_password(head(basic)) == "pa:ss"
    for value in (None, "Basic !!!", "Basic " + base64.b64encode(b"nocolon").decode(),
                  "Basic " + base64.b64encode(b"user:").decode(), "Bearer x",
                  "Basic " + base64.b64encode(b"\xff:\xfe").decode()):
        assert ob.basic_password(head(value)) is None, value


# -- the management endpoints -----------------------------------------------------------------


def test_without_a_token_loopback_clients_naming_the_balancer_may_manage() -> None:
    balancer = app(allowed_hosts=("lb.internal",))
    for host in ("127.0.0.1:8080", "localhost", "LOCALHOST:1", "a.localhost", "[::1]:8080",
                 "10.1.2.3", "lb.internal:80", None):
        balancer.authorize_admin(request(Host=host))  # type: ignore[arg-type]
    for host in ("evil.example", "localhost.evil.example", "lb.internal.evil", "",
                 "bad host"):
        error = refused(balancer.authorize_admin, request(Host=host))
        assert error.status == 403 and "ALLOWED_HOSTS" in error.message, host
    error = refused(balancer.authorize_admin, request(peer="10.0.0.7"))
    assert error.status == 403 and "loopback" in error.message
    anything = app(allowed_hosts=("*",))
    anything.authorize_admin(request(Host="whatever.example"))


def test_cross_site_requests_are_refused_but_a_followed_link_is_a_page_view() -> None:
    balancer = app()
    for fields in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                   {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "Same-Site"},
                   {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}):
        assert refused(balancer.authorize_admin, request(**fields)).status == 403, fields
    post_navigation = request("POST", Sec_Fetch_Site="cross-site", Sec_Fetch_Mode="navigate",
                              Content_Type="application/json", body=True)
    assert refused(balancer.authorize_admin, post_navigation).status == 403
    for fields in ({"Origin": "http://127.0.0.1:8080"}, {"Sec-Fetch-Site": "same-origin"},
                   {"Sec-Fetch-Site": "none"},
                   {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}):
        balancer.authorize_admin(request(**fields))
    balancer.authorize_admin(request("HEAD", Sec_Fetch_Site="cross-site",
                                     Sec_Fetch_Mode="navigate"))


def test_management_bodies_must_be_json() -> None:
    balancer = app()
    for method in ("POST", "PUT", "PATCH"):
        for content_type in (None, "text/plain", "application/x-www-form-urlencoded",
                             "multipart/form-data; boundary=x", "application/jsonx"):
            error = refused(balancer.authorize_admin,
                            request(method, Content_Type=content_type, body=True))
            assert error.status == 415, (method, content_type)
        balancer.authorize_admin(request(method, Content_Type="application/json", body=True))
        balancer.authorize_admin(request(method, Content_Type="Application/JSON; charset=utf-8",
                                         body=True))
    assert refused(balancer.authorize_admin, request("DELETE", body=True)).status == 415
    balancer.authorize_admin(request("DELETE"))  # no body: nothing to check
    balancer.authorize_admin(request("GET"))


def test_with_a_token_only_the_token_manages_from_any_host() -> None:
    balancer = app(admin_token=TOKEN)
    missing = refused(balancer.authorize_admin, request(peer="127.0.0.1"))
    assert missing.status == 401 and "missing admin token" in missing.message
    assert missing.headers == (("WWW-Authenticate", 'Bearer realm="ollamabalancer admin"'),)
    page = refused(balancer.authorize_admin, request(path="/dashboard"))
    assert page.headers == (("WWW-Authenticate", 'Basic realm="ollamabalancer admin"'),
                            ("WWW-Authenticate", 'Bearer realm="ollamabalancer admin"'))
    for value in ("Bearer " + TOKEN[:-1], "Bearer " + TOKEN + "x", "Bearer x",
                  "Basic " + base64.b64encode(b"admin:wrong").decode()):
        error = refused(balancer.authorize_admin, request(Authorization=value))
        assert error.status == 401 and error.message == "invalid admin token", value
    basic = "Basic " + base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    for value in ("Bearer " + TOKEN, basic):
        balancer.authorize_admin(request(Authorization=value, Host="lb.example",
                                         peer="10.0.0.7"))
    forged = request("POST", Authorization="Bearer " + TOKEN, Origin="https://evil.example",
                     Content_Type="application/json", body=True)
    assert refused(balancer.authorize_admin, forged).status == 403


# -- browsers on the Ollama endpoints ----------------------------------------------------------


def test_allowed_origins_get_cors_fields_and_others_403() -> None:
    balancer = app(origins=("https://chat.example.com",))
    for origin in ("http://localhost:5173", "https://127.0.0.1", "http://0.0.0.0:1",
                   "app://obsidian.md", "file://", "tauri://localhost", "vscode-webview://x",
                   "vscode-file://vscode-app", "https://chat.example.com"):
        allowed = request("POST", "/api/chat", Origin=origin)
        assert balancer.allow_origin(allowed) == [
            ("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
            ("Access-Control-Expose-Headers", "X-Request-Id, X-Ollama-Server")], origin
    for origin in ("https://evil.example", "https://chat.example.com.evil", "null",
                   "http://localhost.evil"):
        error = refused(balancer.allow_origin, request("POST", "/api/chat", Origin=origin))
        assert error.status == 403 and "ORIGINS" in error.message
    assert not balancer.allow_origin(request("POST", "/api/chat"))


def test_preflights_are_answered_for_the_ollama_endpoints_only() -> None:
    balancer = app()
    asked = request("OPTIONS", "/api/chat", Origin="http://localhost:3000",
                    Access_Control_Request_Method="POST")
    answer = balancer.preflight(asked, ["client"])
    assert answer.status == 204 and dict(answer.headers)["Access-Control-Max-Age"] == "43200"
    assert ("Access-Control-Allow-Origin", "http://localhost:3000") in answer.headers
    assert "Authorization" in dict(answer.headers)["Access-Control-Allow-Headers"]
    assert refused(balancer.preflight, request("OPTIONS", Origin="http://localhost:3000"),
                   ["admin"]).status == 403
    assert refused(balancer.preflight, request("OPTIONS", Origin="https://evil.example"),
                   ["client", "open"]).status == 403


# -- the balancer's own credentials -------------------------------------------------------------


def with_keys(balancer: ob.Access, *keys: ob.ApiKey) -> ob.Access:
    """The access rules of a fleet that holds ``keys`` (and a store that forgets when a
    key was last used)."""
    known = {key.key_hash: key for key in keys}

    async def touch_key(key: ob.ApiKey) -> None:
        pass

    fleet = balancer.fleet
    fleet.has_keys = lambda: bool(known)  # type: ignore[method-assign]
    fleet.key = known.get  # type: ignore[method-assign]
    fleet.touch_key = touch_key  # type: ignore[method-assign]
    return balancer


def key(key_id: int, secret: str, **limits: Any) -> ob.ApiKey:
    return ob.ApiKey(key_id, f"key{key_id}", hashlib.sha256(secret.encode()).hexdigest(),
                     **limits)


def test_with_no_credentials_configured_nothing_is_checked_or_stripped() -> None:
    balancer = app()
    open_request = request("POST", "/api/chat", Authorization="Bearer the-clients-own")
    assert balancer.authorize_client(open_request) == ob.Grant(None, False, False)


def test_the_admin_token_is_recognised_in_every_mode_and_never_sent_on() -> None:
    for keys in ((), (key(1, "olb-k1"),)):
        balancer = with_keys(app(admin_token=TOKEN), *keys)
        basic = "Basic " + base64.b64encode(f"me:{TOKEN}".encode()).decode()
        for value in ("Bearer " + TOKEN, basic):
            admin = request("POST", "/api/chat", Authorization=value)
            assert balancer.authorize_client(admin) == ob.Grant(None, True, True), (keys,
                                                                                     value)
        other = request("POST", "/api/chat", Authorization="Bearer the-clients-own")
        if keys:
            assert refused(balancer.authorize_client, other).status == 401
        else:
            assert balancer.authorize_client(other) == ob.Grant(None, False, False)


def test_api_keys_are_required_once_one_exists_and_counted_within_their_limits() -> None:
    async def scenario() -> None:
        balancer = with_keys(app(), key(1, "olb-one", requests_per_minute=2),
                             key(2, "olb-two", max_concurrent=1))
        missing = refused(balancer.authorize_client, request("POST", "/api/chat"))
        assert missing.status == 401 and missing.headers[0][0] == "WWW-Authenticate"
        wrong = refused(balancer.authorize_client,
                        request("POST", "/api/chat", Authorization="Bearer olb-nope"))
        assert wrong.status == 401 and wrong.message == "invalid API key"
        first = request("POST", "/api/chat", Authorization="Bearer olb-one")
        grant = balancer.authorize_client(first)
        usage = grant.usage
        assert usage is not None and grant.authenticated and not grant.privileged
        basic = "Basic " + base64.b64encode(b"x:olb-one").decode()
        assert balancer.authorize_client(request(Authorization=basic)).usage is usage
        over = refused(balancer.authorize_client,
                       request(Authorization="Bearer olb-one"))
        assert over.status == 429 and dict(over.headers)["Retry-After"] in {
            str(n) for n in range(55, 61)}
        usage.recent[0] -= 61  # a minute on, one of the two is forgotten
        assert balancer.authorize_client(request(Authorization="Bearer olb-one")).usage is usage
        two = balancer.authorize_client(request(Authorization="Bearer olb-two"))
        assert two.usage is not None and two.concurrency == 1
        two.usage.inflight = 1  # over its maxConcurrent: let through, to wait its turn
        again = balancer.authorize_client(request(Authorization="Bearer olb-two"))
        assert again.usage is two.usage
        await asyncio.sleep(0)  # lastUsedAt written in the background

    asyncio.run(scenario())


def test_require_api_key_closes_the_door_before_any_key_exists() -> None:
    balancer = with_keys(app(require_api_key=True))
    assert refused(balancer.authorize_client, request("POST", "/api/chat")).status == 401
    assert refused(balancer.authorize_client,
                   request("POST", "/api/chat", Authorization="Bearer x")).status == 401


# -- request ids and what errors tell ----------------------------------------------------------


def test_request_ids_are_kept_when_plain_and_made_unique_otherwise() -> None:
    balancer = app()

    def made(**fields: str) -> str:
        return balancer.request_id(request(**fields).head)

    assert made(X_Request_Id="haproxy-1f:2") == "haproxy-1f:2"
    assert made(X_Request_Id="a" * 64) == "a" * 64
    ours = [made(), made(), made(X_Request_Id="a b"), made(X_Request_Id="a" * 65),
            made(X_Request_Id="")]
    # This process's tag (8 hex digits, another for each process) and a count from 1.
    tag = ours[0].partition("-")[0]
    assert re.fullmatch("[0-9a-f]{8}", tag) and tag != app().request_id(request().head)[:8]
    assert ours == [f"{tag}-{n}" for n in range(1, 6)]


def test_upstream_detail_goes_to_admins_and_loopback_and_a_neutral_word_to_others(
        caplog: pytest.LogCaptureFixture) -> None:
    detail = "cannot connect to proxy 'dc' (socks5://10.0.0.5:1080): auth failed"
    open_balancer, guarded = app(), app(admin_token=TOKEN)
    local, remote = request(peer="127.0.0.1"), request(peer="10.9.8.7")
    for req in (local, remote):
        req.id = "abc-1"
    assert open_balancer.public_message(local, 502, detail) == detail
    for balancer, req in ((open_balancer, remote), (guarded, local), (guarded, remote)):
        message = balancer.public_message(req, 502, detail)
        assert message == "the upstream server failed (request id abc-1)"
    local.privileged = True  # the admin token was sent
    assert guarded.public_message(local, 504, detail) == detail
    assert guarded.public_message(remote, 504, detail).startswith("the upstream server did "
                                                                  "not answer in time")
    assert guarded.public_message(None, 599, detail) == ("the upstream request failed "
                                                         "(request id -)")
    # Whatever the client is told, the log keeps the detail under the request id.
    assert caplog.messages[-1] == f"request - failed upstream: {detail}"
    assert caplog.messages[0] == f"request abc-1 failed upstream: {detail}"


# -- the exact words and edges ------------------------------------------------------------------


def test_each_refusal_says_what_is_wrong() -> None:
    """Every refusal's words, whole: what a person reads to fix their request."""
    balancer, guarded = app(), app(admin_token=TOKEN)
    cases: list[tuple[Any, Any, int, str]] = [
        (balancer.authorize_admin, request(Origin="https://evil.example"), 403,
         "management requests from a web page of another origin are refused"),
        (balancer.authorize_admin, request(Sec_Fetch_Site="cross-site"), 403,
         "management requests from another site are refused"),
        (balancer.authorize_admin, request(peer="10.0.0.1"), 403,
         "management endpoints answer only loopback clients while ADMIN_TOKEN is not set"),
        (balancer.authorize_admin, request(Host="evil.example"), 403,
         "Host 'evil.example' does not name this balancer: add it to ALLOWED_HOSTS, or set "
         "ADMIN_TOKEN"),
        (balancer.authorize_admin, request("POST", Content_Type="text/plain", body=True), 415,
         "management requests with a body must be sent as Content-Type: application/json"),
        (guarded.authorize_admin, request(), 401,
         "missing admin token: send Authorization: Bearer <token>"),
        (balancer.allow_origin, request(Origin="https://evil.example/" + "x" * 200), 403,
         f"origin {('https://evil.example/' + 'x' * 200)[:100]!r} is not allowed: add it to "
         "ORIGINS"),
        (balancer.preflight, request("OPTIONS"), 403,
         "management endpoints take no cross-origin requests"),
        (with_keys(app(), key(1, "olb-1")).authorize_client, request(), 401,
         "missing API key: send Authorization: Bearer <key>"),
    ]
    for check, req, status, message in cases:
        args = (req, ["admin"]) if check == balancer.preflight else (req,)
        error = refused(check, *args)
        assert (error.status, error.message) == (status, message)


def test_management_writes_are_json_even_without_a_body() -> None:
    balancer = app()
    for method in ("POST", "PUT", "PATCH"):
        assert refused(balancer.authorize_admin, request(method)).status == 415, method
    balancer.authorize_admin(request("DELETE"))


def test_more_than_one_origin_is_refused_and_fields_already_set_are_left_alone() -> None:
    balancer = app()
    twice = request("GET", "/api/tags")
    twice.head = ob.RequestHead("GET", "/api/tags", "HTTP/1.1", ob.Headers(
        (("Origin", "http://localhost"), ("Origin", "http://localhost"))))
    assert refused(balancer.allow_origin, twice).status == 403
    kept = request("GET", "/api/tags", Origin="http://localhost")
    kept.response_fields.append(("X-Request-Id", "r-1"))
    assert len(balancer.allow_origin(kept)) == 3
    assert kept.response_fields == [("X-Request-Id", "r-1")]  # the front adds them


def test_only_http_origins_can_be_the_balancers_own() -> None:
    assert not ob.same_origin("ftp://lb.example", "lb.example")
    assert not ob.same_origin("http://", "lb.example")
    assert not ob.same_origin("http://lb.example", "")


def test_a_lenient_base64_is_no_basic_password() -> None:
    head = ob.RequestHead("GET", "/", "HTTP/1.1", ob.Headers(
        (("Authorization", "Basic dXNlcjpwYXNz!!!"),)))  # "user:pass" with junk after
    assert ob.basic_password(head) is None


def test_rate_windows_and_retry_after_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(ob.time, "monotonic", lambda: clock[0])
    touched: list[int] = []
    balancer = with_keys(app(), key(1, "olb-one", requests_per_minute=2))
    balancer.fleet.spawn = lambda coro: (coro.close(), touched.append(1))  # type: ignore[method-assign]
    one = {"Authorization": "Bearer olb-one"}
    usage = balancer.authorize_client(request(**one)).usage
    assert usage is not None and touched == [1]  # lastUsedAt: written now
    clock[0] += 30
    balancer.authorize_client(request(**one))
    assert list(usage.recent) == [1000.0, 1030.0] and touched == [1]  # not again this minute
    clock[0] = 1059.5  # the oldest is 59.5 s old: half a second to wait, said as 1
    over = refused(balancer.authorize_client, request(**one))
    assert dict(over.headers)["Retry-After"] == "1"
    assert over.message == "API key 'key1' is over its 2 requests per minute"
    clock[0] = 1060.0  # exactly a minute old: forgotten; lastUsedAt not yet (60 s, not more)
    balancer.authorize_client(request(**one))
    assert list(usage.recent) == [1030.0, 1060.0] and touched == [1]
    clock[0] = 1075.0  # the oldest now 1030: 15 s to wait
    assert dict(refused(balancer.authorize_client, request(**one)).headers)[
        "Retry-After"] == "15"
    clock[0] = 1090.5  # 1030 is 60.5 s old: room again; lastUsedAt written again
    balancer.authorize_client(request(**one))
    assert touched == [1, 1]
    unlimited = with_keys(app(), key(3, "olb-three"))
    unlimited.fleet.spawn = lambda coro: (coro.close(), touched.append(3))  # type: ignore[method-assign]
    three = {"Authorization": "Bearer olb-three"}
    for at, written in ((2000.0, 1), (2060.0, 1), (2060.5, 2)):  # more than a minute: again
        clock[0] = at
        unlimited.authorize_client(request(**three))
        assert touched.count(3) == written, at


def test_a_key_over_its_concurrency_waits_its_turn_first_come_first_served() -> None:
    """maxConcurrent 2: the third and fourth wait, and get their turns in the order they
    came as the first two end; a waiter that leaves passes its turn on; past QUEUE_TIMEOUT
    a waiter is told so (503)."""
    async def scenario() -> None:
        balancer = with_keys(app(queue_timeout=0.3), key(2, "olb-two", max_concurrent=2))
        balancer.fleet.spawn = lambda coro: coro.close()  # type: ignore[method-assign]
        grant = balancer.authorize_client(request(Authorization="Bearer olb-two"))
        usage = grant.usage
        assert usage is not None
        await balancer.enter(grant)
        await balancer.enter(grant)
        order: list[str] = []

        async def third(name: str) -> None:
            await balancer.enter(grant)
            order.append(name)

        waiting = [asyncio.ensure_future(third(n)) for n in ("c", "d", "e")]
        await asyncio.sleep(0.01)
        assert order == [] and usage.inflight == 2
        waiting[1].cancel()  # "d" leaves before its turn
        balancer.leave(usage)
        await asyncio.sleep(0.01)
        assert order == ["c"] and usage.inflight == 2
        balancer.leave(usage)
        await asyncio.sleep(0.01)
        assert order == ["c", "e"] and usage.inflight == 2
        late = asyncio.ensure_future(balancer.enter(grant))
        with pytest.raises(ob.HTTPError) as caught:
            await late
        assert caught.value.status == 503 and "QUEUE_TIMEOUT" in caught.value.message
        for _ in range(2):
            balancer.leave(usage)
        assert usage.inflight == 0 and not usage.turns

    asyncio.run(scenario())


def test_a_key_over_its_rate_or_unknown_is_told_so() -> None:
    balancer = with_keys(app(), key(2, "olb-two", max_concurrent=3))
    challenge = refused(balancer.authorize_client, request(Authorization="Bearer nope"))
    assert challenge.headers == (("WWW-Authenticate", 'Bearer realm="ollamabalancer"'),)
