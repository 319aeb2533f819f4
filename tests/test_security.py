"""Secrets at rest, admin and client authentication, and that no secret ever leaks."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    MYSQL,
    ROOT,
    BalancerProcess,
    StoreConfig,
    call,
    drop_database,
    free_port,
    mysql_connect,
    raw_exchange,
    require_module,
    unavailable,
)
from fakeollama import FakeOllama

import ollamabalancer as ob

# -- the construction ---------------------------------------------------------------------

RFC5869 = [  # (IKM, salt, info, L, OKM), RFC 5869 appendix A.1-A.3
    ("0b" * 22, "000102030405060708090a0b0c", "f0f1f2f3f4f5f6f7f8f9", 42,
     "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"),
    (bytes(range(0x00, 0x50)).hex(), bytes(range(0x60, 0xb0)).hex(),
     bytes(range(0xb0, 0x100)).hex(), 82,
     "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c59045a99cac7827271cb41"
     "c65e590e09da3275600c2f09b8367793a9aca3db71cc30c58179ec3e87c14c01d5c1f3434f1d87"),
    ("0b" * 22, "", "", 42,
     "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"),
]


@pytest.mark.parametrize(("ikm", "salt", "info", "length", "okm"), RFC5869)
def test_hkdf_matches_the_rfc_5869_vectors(ikm: str, salt: str, info: str, length: int,
                                           okm: str) -> None:
    assert ob.hkdf_sha256(bytes.fromhex(ikm), bytes.fromhex(salt), bytes.fromhex(info),
                          length).hex() == okm


@pytest.mark.parametrize("plain", ["", "p", "hunter2", "ünïcødé 🔑", "x" * 5000])
def test_secrets_round_trip(plain: str) -> None:
    box = ob.SecretBox(b"a master key of some length")
    sealed = box.encrypt(plain)
    assert sealed.startswith("enc:v1:") and (len(plain) < 4 or plain not in sealed)
    assert box.decrypt(sealed) == plain


def test_the_same_value_encrypts_differently_each_time() -> None:
    box = ob.SecretBox(b"a master key of some length")
    assert len({box.encrypt("same") for _ in range(20)}) == 20


def test_tampering_with_any_byte_is_detected() -> None:
    box = ob.SecretBox(b"a master key of some length")
    sealed = box.encrypt("the proxy password")
    raw = bytearray(base64.urlsafe_b64decode(sealed[7:] + "=" * (-len(sealed[7:]) % 4)))
    for index in range(len(raw)):
        for flip in (0x01, 0x80):
            changed = bytearray(raw)
            changed[index] ^= flip
            token = "enc:v1:" + base64.urlsafe_b64encode(bytes(changed)).decode().rstrip("=")
            with pytest.raises(ob.SecretError):
                box.decrypt(token)
    for broken in ("enc:v1:", "enc:v1:!!!", sealed[:20], "plain", "enc:v2:" + sealed[7:]):
        with pytest.raises(ob.SecretError):
            box.decrypt(broken)


def test_another_key_cannot_decrypt_and_has_another_check_value() -> None:
    one, two = ob.SecretBox(b"first key 0123456789"), ob.SecretBox(b"second key 0123456789")
    with pytest.raises(ob.SecretError):
        two.decrypt(one.encrypt("secret"))
    assert one.check_value() != two.check_value()
    assert one.check_value() == ob.SecretBox(b"first key 0123456789").check_value()


# -- keys and stored secrets ----------------------------------------------------------------


def stored_passwords(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT password FROM proxy")]


def test_key_file_is_generated_0600_and_passwords_are_stored_encrypted(
        start_balancer: Any, sqlite_store: StoreConfig) -> None:
    lb = start_balancer(sqlite_store)
    key_file = Path(str(sqlite_store.path) + ".key")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert f"new key file {key_file}" in lb.log
    lb.add_proxy(name="p", ip="127.0.0.1", port=1, userName="u", password="Tr0ub4dor&3")
    (stored,) = stored_passwords(sqlite_store.path)
    assert stored.startswith("enc:v1:") and "Tr0ub4dor" not in stored
    assert b"Tr0ub4dor" not in sqlite_store.path.read_bytes()
    lb.stop()
    again = start_balancer(sqlite_store)  # the same key file is used again
    assert again.call("GET", "/proxy/allProxies").json()[0]["hasPassword"] is True


def test_a_wrong_key_refuses_to_start_with_one_clear_line(
        start_balancer: Any, sqlite_store: StoreConfig) -> None:
    start_balancer(sqlite_store, env={"SECRET_KEY": "the right key, long enough"}).stop()
    env = {**os.environ, **sqlite_store.env(), "SECRET_KEY": "a wrong key, long enough"}
    done = subprocess.run([sys.executable, str(ROOT / "ollamabalancer.py"), "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "key check failed" in errors[0]
    assert "wrong key" not in done.stderr


def start_once(store: StoreConfig, **env: str) -> subprocess.CompletedProcess[str]:
    """One start of the balancer that is expected to stop at once (a refused setting)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "SECRET_"))}
    return subprocess.run([sys.executable, str(ROOT / "ollamabalancer.py"), "--port", "0",
                           "--ip", "127.0.0.1"], env={**full, **store.env(), **env},
                          capture_output=True, text=True, timeout=60)


def test_no_key_or_database_is_tracked_by_git() -> None:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    assert listed, "not a git checkout"
    tracked = [name for name in listed if name.endswith((".key", ".db", ".db-wal", ".db-shm"))]
    assert tracked == []
    ignored = subprocess.run(["git", "check-ignore", "ollamabalancer.key", "x.db.key",
                              "x.db"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert ignored == ["ollamabalancer.key", "x.db.key", "x.db"]


def test_a_key_file_others_can_read_is_refused(sqlite_store: StoreConfig,
                                                tmp_path: Path) -> None:
    key_file = tmp_path / "master.key"
    key_file.write_text("k" * 64 + "\n")
    key_file.chmod(0o644)
    done = start_once(sqlite_store, SECRET_KEY_FILE=str(key_file))
    assert done.returncode == 1
    (error,) = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert str(key_file) in error and f"chmod 600 {key_file}" in error
    key_file.chmod(0o600)
    default = Path(str(sqlite_store.path) + ".key")  # the default file is checked too
    default.write_text("d" * 64 + "\n")
    default.chmod(0o640)
    assert "chmod 600" in start_once(sqlite_store).stderr


def test_a_failed_start_leaves_no_new_key_file_behind(
        start_balancer: Any, store: StoreConfig, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)  # MySQL's default key file is ./ollamabalancer.key
    start_balancer(store, env={"SECRET_KEY": "the passphrase this database uses"}).stop()
    default = Path(str(store.path) + ".key") if store.engine == "sqlite" else (
        tmp_path / "ollamabalancer.key")
    for _ in range(2):  # and the second start says the same, not "key check failed"
        done = subprocess.run(
            [sys.executable, str(ROOT / "ollamabalancer.py"), "--port", "0"], cwd=tmp_path,
            env={k: v for k, v in {**os.environ, **store.env()}.items()
                 if not k.startswith("SECRET_")},
            capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        (error,) = [line for line in done.stderr.splitlines() if "ERROR" in line]
        assert "no key file" in error and default.name in error, error
        assert not default.exists()


def meta(store: StoreConfig) -> dict[str, str]:
    if store.engine == "sqlite":
        with sqlite3.connect(store.path) as conn:
            return dict(conn.execute("SELECT name, value FROM balancer_meta").fetchall())
    conn = mysql_connect(store.database)
    with conn.cursor() as cursor:
        cursor.execute("SELECT name, value FROM balancer_meta")
        rows = dict(cursor.fetchall())
    conn.close()
    return rows


def test_a_passphrase_is_stretched_with_scrypt_and_a_generated_key_is_not(
        start_balancer: Any, store: StoreConfig, tmp_path: Path) -> None:
    passphrase = "correct horse battery staple"
    start_balancer(store, env={"SECRET_KEY": passphrase}).stop()
    values = meta(store)
    assert values["kdf"].startswith("scrypt:n=65536,r=8,p=1:")
    stretched = ob.SecretBox(ob.stretch(passphrase.encode(), values["kdf"]))
    assert values["key_check"] == stretched.check_value()
    assert values["key_check"] != ob.SecretBox(passphrase.encode()).check_value()
    assert start_once(store, SECRET_KEY="not the passphrase at all").returncode == 1
    generated = StoreConfig("sqlite", tmp_path / "other")
    generated.path.parent.mkdir()
    start_balancer(generated).stop()
    key = Path(str(generated.path) + ".key").read_text().strip()
    assert "kdf" not in meta(generated)
    assert meta(generated)["key_check"] == ob.SecretBox(key.encode()).check_value()


def test_a_database_sealed_with_a_bare_passphrase_is_migrated_in_place(
        start_balancer: Any, store: StoreConfig) -> None:
    passphrase = "an old passphrase, before scrypt"
    config = ob.load_config([], store.env())
    old = ob.open_store(dataclasses.replace(config, secret_key="k" * 64))
    old.close()  # the tables; now make them as the version before stretching left them
    legacy = ob.SecretBox(passphrase.encode())
    conn: Any = (sqlite3.connect(store.path, isolation_level=None) if store.engine == "sqlite"
                 else mysql_connect(store.database))
    mark = "?" if store.engine == "sqlite" else "%s"
    sql = [("DELETE FROM balancer_meta", ()),
           (f"INSERT INTO balancer_meta (name, value) VALUES ('key_check', {mark})",
            (legacy.check_value(),)),
           (f"INSERT INTO proxy (name, ip, port, user_name, password) VALUES"
            f" ('p', '127.0.0.1', 1, 'u', {mark})", (legacy.encrypt("the-old-password"),))]
    cursor = conn.cursor()
    for statement, params in sql:
        cursor.execute(statement, params)
    conn.close()
    lb = start_balancer(store, env={"SECRET_KEY": passphrase})
    assert "stretched with scrypt; 1 secrets re-sealed" in lb.log
    assert lb.call("GET", "/proxy/allProxies").json()[0]["hasPassword"] is True
    lb.stop()
    values = meta(store)
    stretched = ob.SecretBox(ob.stretch(passphrase.encode(), values["kdf"]))
    assert values["key_check"] == stretched.check_value()
    if store.engine == "sqlite":
        (sealed,) = stored_passwords(store.path)
    else:
        conn = mysql_connect(store.database)
        with conn.cursor() as cursor:
            cursor.execute("SELECT password FROM proxy")
            (sealed,) = cursor.fetchone()
        conn.close()
    assert stretched.decrypt(sealed) == "the-old-password"
    again = start_balancer(store, env={"SECRET_KEY": passphrase})  # nothing more to do
    assert "stretched" not in again.log


def test_plain_text_passwords_of_a_seed_database_are_encrypted_on_start(
        start_balancer: Any, sqlite_store: StoreConfig) -> None:
    start_balancer(sqlite_store).stop()
    with sqlite3.connect(sqlite_store.path) as conn:
        conn.execute("INSERT INTO proxy (name, ip, port, user_name, password)"
                     " VALUES ('seed', '127.0.0.1', 3128, 'u', 'plain-old-pw')")
    lb = start_balancer(sqlite_store)
    assert "encrypted 1 plain-text secrets" in lb.log
    (stored,) = stored_passwords(sqlite_store.path)
    assert stored.startswith("enc:v1:")
    assert lb.call("GET", "/proxy/allProxies").json()[0]["hasPassword"] is True


def test_rotate_secret_re_encrypts_everything(
        start_balancer: Any, sqlite_store: StoreConfig, backend: FakeOllama,
        microsocks: tuple[int, str, str], tmp_path: Path) -> None:
    port, user, password = microsocks
    lb = start_balancer(sqlite_store)
    lb.add_server(backend.url, authorization="Bearer upstream-token-123")
    lb.add_proxy(name="s", ip="127.0.0.1", port=port, protocol="socks5", userName=user,
                 password=password)
    lb.stop()
    before = stored_passwords(sqlite_store.path)
    new_key = tmp_path / "new.key"
    env = {**os.environ, **sqlite_store.env()}
    done = subprocess.run([sys.executable, str(ROOT / "ollamabalancer.py"), "rotate-secret",
                           "--new-key-file", str(new_key)], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "re-encrypted 2 secrets" in done.stdout
    assert stat.S_IMODE(new_key.stat().st_mode) == 0o600
    assert stored_passwords(sqlite_store.path) != before
    rotated = start_balancer(sqlite_store, env={"SECRET_KEY_FILE": str(new_key)})
    sid = rotated.server_id(proxy="1")
    reply = rotated.call("GET", f"/servers/ollama/{sid}/api/version")
    assert reply.status == 200  # the SOCKS password decrypts with the new key
    assert backend.requests[-1]["headers"]["Authorization"] == "Bearer upstream-token-123"
    old = subprocess.run([sys.executable, str(ROOT / "ollamabalancer.py"), "--port", "0"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert old.returncode == 1 and "key check failed" in old.stderr


# -- admin authentication ----------------------------------------------------------------------

ADMIN = "an-admin-token-of-32-characters!"


def test_admin_token_guards_the_management_endpoints(start_balancer: Any,
                                                     sqlite_store: StoreConfig) -> None:
    lb = start_balancer(sqlite_store, env={"ADMIN_TOKEN": ADMIN})
    assert "management: the admin token" in lb.log
    for path in ("/servers/allServers", "/proxy/allProxies", "/keys/allKeys", "/servers/1"):
        missing = lb.call("GET", path)
        assert missing.status == 401 and "missing admin token" in missing.json()["error"]
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = lb.call("GET", path, headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401 and wrong.json() == {"error": "invalid admin token"}
    ok = lb.call("GET", "/servers/allServers", headers={"Authorization": f"Bearer {ADMIN}"})
    assert ok.status == 200
    # The Ollama endpoints are not management endpoints.
    assert lb.call("GET", "/api/tags").status == 200


def test_admin_token_file_is_read(start_balancer: Any, sqlite_store: StoreConfig,
                                  tmp_path: Path) -> None:
    token_file = tmp_path / "admin"
    token_file.write_text(ADMIN + "\n")
    lb = start_balancer(sqlite_store, env={"ADMIN_TOKEN_FILE": str(token_file)})
    assert lb.call("GET", "/keys/allKeys").status == 401
    assert lb.call("GET", "/keys/allKeys",
                   headers={"Authorization": f"Bearer {ADMIN}"}).status == 200


def test_without_admin_token_only_loopback_may_manage() -> None:
    app = ob.Balancer(ob.Config(), None).access  # type: ignore[arg-type]
    head = ob.RequestHead("GET", "/", "HTTP/1.1", ob.Headers((("Host", "localhost:8080"),)))
    for peer, allowed in (("127.0.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
                          ("127.8.9.10", True), ("10.0.0.1", False), ("192.168.1.9", False),
                          ("2001:db8::1", False)):
        request = types.SimpleNamespace(wire=types.SimpleNamespace(peer=peer), head=head,
                                        method="GET", path="/", body_done=True, client=peer,
                                        forwarded=False)
        if allowed:
            app.authorize_admin(request)  # type: ignore[arg-type]
        else:
            with pytest.raises(ob.HTTPError) as caught:
                app.authorize_admin(request)  # type: ignore[arg-type]
            assert caught.value.status == 403 and "loopback" in caught.value.message


def test_short_admin_token_is_refused() -> None:
    env = {"PATH": "/usr/bin:/bin", "ADMIN_TOKEN": "short"}
    done = subprocess.run([sys.executable, str(ROOT / "ollamabalancer.py")], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "at least 16 characters" in done.stderr


# -- client API keys -----------------------------------------------------------------------------


def add_key(lb: BalancerProcess, **fields: Any) -> dict[str, Any]:
    reply = lb.call("POST", "/keys/addKey", {"name": "team", **fields})
    assert reply.status == 201, reply
    return dict(reply.json())


def test_api_keys_are_shown_once_and_stored_hashed(start_balancer: Any,
                                                   sqlite_store: StoreConfig) -> None:
    lb = start_balancer(sqlite_store)
    created = add_key(lb, requestsPerMinute=10, maxConcurrent=2)
    assert set(created) == {"id", "name", "key"} and created["key"].startswith("olb-")
    listing = lb.call("GET", "/keys/allKeys")
    assert created["key"] not in listing.text
    (entry,) = listing.json()
    assert entry["requestsPerMinute"] == 10 and entry["maxConcurrent"] == 2
    assert entry["createdAt"] and entry["lastUsedAt"] is None
    with sqlite3.connect(sqlite_store.path) as conn:
        (stored,) = conn.execute("SELECT key_hash FROM api_key").fetchone()
    assert created["key"] not in stored and len(stored) == 64
    assert lb.call("POST", "/keys/addKey", {"name": "x", "maxConcurrent": 0}).status == 400
    assert lb.call("DELETE", f"/keys/{created['id']}").status == 204
    assert lb.call("GET", "/keys/allKeys").json() == []


def test_once_a_key_exists_clients_need_one(start_balancer: Any, sqlite_store: StoreConfig,
                                            backend: FakeOllama) -> None:
    lb = start_balancer(sqlite_store)
    lb.add_server(backend.url)
    assert lb.call("GET", "/api/tags").status == 200  # open while no key exists
    key = add_key(lb)["key"]
    missing = lb.call("GET", "/api/tags")
    assert missing.status == 401 and missing.json() == {
        "error": "missing API key: send Authorization: Bearer <key>"}
    wrong = lb.call("POST", "/v1/chat/completions", {"model": "llama3", "messages": []},
                    headers={"Authorization": "Bearer olb-wrong"})
    assert wrong.status == 401 and wrong.json()["error"]["message"] == "invalid API key"
    assert lb.call("GET", "/servers/getServer").status == 401
    assert lb.call("GET", "/servers/ollama/1/api/tags").status == 401
    assert lb.call("GET", "/").status == 200  # the liveness probe stays open
    auth = {"Authorization": f"Bearer {key}"}
    assert lb.call("GET", "/api/tags", headers=auth).status == 200
    reply = lb.call("POST", "/api/chat", {"model": "llama3", "messages": [], "stream": False},
                    headers=auth)
    assert reply.status == 200
    assert "Authorization" not in backend.model_requests()[-1]["headers"]  # not sent on
    sid = lb.call("GET", "/servers/getServer", headers=auth).text
    assert lb.call("GET", f"/servers/ollama/{sid}/api/version", headers=auth).status == 200
    assert "Authorization" not in backend.requests[-1]["headers"]


def test_official_client_sends_its_key_from_ollama_api_key(
        start_balancer: Any, sqlite_store: StoreConfig, backend: FakeOllama,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ollama = require_module("ollama")
    lb = start_balancer(sqlite_store)
    lb.add_server(backend.url)
    key = add_key(lb)["key"]
    monkeypatch.setenv("OLLAMA_API_KEY", key)
    client = ollama.Client(host=f"http://127.0.0.1:{lb.port}")
    assert client.chat(model="llama3", messages=[], stream=False).done
    monkeypatch.setenv("OLLAMA_API_KEY", "olb-not-a-key")
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=f"http://127.0.0.1:{lb.port}").list()
    assert caught.value.status_code == 401


def test_require_api_key_closes_the_endpoints_before_any_key_exists(
        start_balancer: Any, sqlite_store: StoreConfig) -> None:
    lb = start_balancer(sqlite_store, env={"REQUIRE_API_KEY": "1"})
    assert lb.call("GET", "/api/tags").status == 401


def test_a_rate_limit_answers_429_and_a_concurrency_limit_makes_requests_wait_their_turn(
        start_balancer: Any, sqlite_store: StoreConfig, backend: FakeOllama) -> None:
    lb = start_balancer(sqlite_store)
    lb.add_server(backend.url)
    limited = {"Authorization": f"Bearer {add_key(lb, requestsPerMinute=3)['key']}"}
    for _ in range(3):
        assert lb.call("GET", "/api/tags", headers=limited).status == 200
    over = lb.call("GET", "/api/tags", headers=limited)
    assert over.status == 429 and 1 <= int(over.headers["Retry-After"]) <= 60
    assert "3 requests per minute" in over.json()["error"]
    single = {"Authorization": f"Bearer {add_key(lb, maxConcurrent=1)['key']}"}
    holder = threading.Thread(target=lambda: lb.call(
        "POST", "/api/chat", {"model": "llama3", "messages": [], "stream": False,
                              "fake_hold": True}, headers=single), daemon=True)
    holder.start()
    deadline = time.monotonic() + 5
    while not any(b"fake_hold" in r["body"] for r in backend.model_requests()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    statuses: list[int] = []
    waiter = threading.Thread(target=lambda: statuses.append(
        lb.call("GET", "/api/tags", headers=single).status), daemon=True)
    waiter.start()
    time.sleep(0.5)
    assert statuses == []  # waits its turn behind the one in flight, rather than a 429
    backend.release()
    holder.join(10)
    waiter.join(10)
    assert statuses == [200]
    assert lb.call("GET", "/api/tags", headers=single).status == 200


def test_upstream_credentials_are_sent_and_never_returned(
        start_balancer: Any, sqlite_store: StoreConfig, backend: FakeOllama) -> None:
    lb = start_balancer(sqlite_store)
    server = lb.add_server(backend.url, authorization="Basic dXBzdHJlYW06c2VjcmV0LXh5eg==")
    assert server["hasAuthorization"] is True and "authorization" not in server
    tags = [r for r in backend.requests if r["path"] == "/api/tags"]
    assert tags[-1]["headers"]["Authorization"] == "Basic dXBzdHJlYW06c2VjcmV0LXh5eg=="
    lb.call("POST", "/api/chat", {"model": "llama3", "messages": [], "stream": False},
            headers={"Authorization": "Bearer client-side"})
    assert backend.model_requests()[-1]["headers"]["Authorization"] == (
        "Basic dXBzdHJlYW06c2VjcmV0LXh5eg==")
    for path in ("/servers/allServers", f"/servers/{server['id']}"):
        assert b"dXBzdHJlYW06" not in lb.call("GET", path).body
    cleared = lb.call("PATCH", f"/servers/{server['id']}", {"authorization": None})
    assert cleared.json()["hasAuthorization"] is False


# -- nothing leaks -------------------------------------------------------------------------------


def test_no_secret_appears_in_any_log_line_or_admin_response(
        start_balancer: Any, store: StoreConfig, backend: FakeOllama,
        microsocks: tuple[int, str, str], tinyproxy: tuple[int, str, str]) -> None:
    secret_key = "master-key-" + "k" * 20
    lb = start_balancer(store, env={"SECRET_KEY": secret_key, "ADMIN_TOKEN": ADMIN,
                                    "LOG_LEVEL": "debug"})
    admin = {"Authorization": f"Bearer {ADMIN}"}
    socks_port, socks_user, socks_password = microsocks
    http_port, http_user, http_password = tinyproxy
    upstream_auth = "Bearer upstream-credential-" + "u" * 10
    answers = []

    def admin_call(method: str, path: str, body: Any = None) -> Any:
        reply = call(lb.port, method, path, body, headers=admin)
        answers.append(reply.body)
        return reply

    admin_call("POST", "/servers/addServer", {"url": backend.url,
                                              "authorization": upstream_auth})
    for name, port, protocol, user, password in (
            ("socks", socks_port, "socks5", socks_user, socks_password),
            ("http", http_port, "http", http_user, http_password),
            ("bad", http_port, "http", http_user, "wrong-" + http_password)):
        admin_call("POST", "/proxy/addProxy", {"name": name, "ip": "127.0.0.1", "port": port,
                                               "protocol": protocol, "userName": user,
                                               "password": password})
    # The one answer meant to hold a secret: the new key, shown this once.
    key = call(lb.port, "POST", "/keys/addKey", {"name": "k"}, headers=admin).json()["key"]
    client = {"Authorization": f"Bearer {key}"}
    for proxy_id in (1, 2, 3):
        sid = call(lb.port, "GET", f"/servers/getServer?proxy={proxy_id}", headers=client).text
        answers.append(call(lb.port, "GET", f"/servers/ollama/{sid}/api/version",
                            headers=client).body)
    admin_call("PATCH", "/proxy/1", {"password": socks_password + "-2"})
    admin_call("PATCH", "/servers/1", {"authorization": upstream_auth + "-2"})
    for path in ("/servers/allServers", "/proxy/allProxies", "/keys/allKeys", "/servers/1",
                 "/proxy/2"):
        admin_call("GET", path)
    answers.append(call(lb.port, "GET", "/servers/allServers",
                        headers={"Authorization": f"Bearer {key}"}).body)
    lb.stop()
    rows, files = database_text(store)
    everything = b"\n".join(answers) + lb.log.encode() + rows + files
    for secret in (secret_key, ADMIN, key, socks_password, http_password, upstream_auth,
                   "upstream-credential"):
        assert secret.encode() not in everything, secret
    # Three proxy passwords (one patched since) and the server's credentials (patched too).
    assert rows.count(b"'enc:v1:") == 4, rows


def database_text(store: StoreConfig) -> tuple[bytes, bytes]:
    """Every row of every table; and for SQLite the files themselves (old pages too)."""
    if store.engine == "sqlite":
        with sqlite3.connect(store.path) as conn:
            tables = [t for t, in conn.execute("SELECT name FROM sqlite_master"
                                               " WHERE type = 'table'")]
            rows = [repr(row) for table in tables
                    for row in conn.execute(f"SELECT * FROM {table}")]
        files = [Path(str(store.path) + suffix) for suffix in ("", "-wal")]
        raw = b"".join(f.read_bytes() for f in files if f.exists())
        return "\n".join(rows).encode(), raw
    conn = mysql_connect(store.database)
    with conn.cursor() as cursor:
        cursor.execute("SHOW TABLES")
        tables = [t for t, in cursor.fetchall()]
        rows = []
        for table in tables:
            cursor.execute(f"SELECT * FROM `{table}`")
            rows += [repr(row) for row in cursor.fetchall()]
    conn.close()
    return "\n".join(rows).encode(), b""


def test_rotation_changes_nothing_when_a_stored_secret_is_damaged(
        start_balancer: Any, sqlite_store: StoreConfig, tmp_path: Path) -> None:
    lb = start_balancer(sqlite_store)
    lb.add_proxy(name="a", ip="127.0.0.1", port=1, userName="u", password="first-password")
    lb.add_proxy(name="b", ip="127.0.0.1", port=2, userName="u", password="second-password")
    lb.stop()
    with sqlite3.connect(sqlite_store.path) as conn:
        conn.execute("UPDATE proxy SET password = substr(password, 1, 30) || 'AAAA'"
                     " WHERE name = 'b'")
        before = [row for row in conn.execute("SELECT password FROM proxy ORDER BY id")]
    env = {**os.environ, **sqlite_store.env()}
    done = subprocess.run([sys.executable, str(ROOT / "ollamabalancer.py"), "rotate-secret",
                           "--new-key-file", str(tmp_path / "new.key")], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "nothing changed" in done.stderr
    with sqlite3.connect(sqlite_store.path) as conn:
        assert [row for row in conn.execute("SELECT password FROM proxy ORDER BY id")] == before
    assert start_balancer(sqlite_store).call("GET", "/proxy/allProxies").status == 200


def test_the_admin_token_never_reaches_an_ollama_server(
        start_balancer: Any, sqlite_store: StoreConfig, backend: FakeOllama) -> None:
    lb = start_balancer(sqlite_store, env={"ADMIN_TOKEN": ADMIN})  # and no API keys
    admin = {"Authorization": f"Bearer {ADMIN}"}
    sid = call(lb.port, "POST", "/servers/addServer", {"url": backend.url},
               headers=admin).json()["id"]
    basic = "Basic " + base64.b64encode(f"me:{ADMIN}".encode()).decode()
    for authorization in (f"Bearer {ADMIN}", basic):
        headers = {"Authorization": authorization}
        assert call(lb.port, "POST", "/api/chat", {"model": "llama3", "messages": [],
                                                   "stream": False}, headers=headers
                    ).status == 200
        assert call(lb.port, "GET", f"/servers/ollama/{sid}/api/tags", headers=headers
                    ).status == 200
    key = call(lb.port, "POST", "/keys/addKey", {"name": "k"}, headers=admin).json()["key"]
    call(lb.port, "DELETE", "/keys/1", headers=admin)
    # A key deleted on another instance is still not the client's to hand on... but a
    # credential of the client's own (not the balancer's) is.
    own = {"Authorization": "Bearer the-clients-own-ollama-token"}
    assert call(lb.port, "GET", f"/servers/ollama/{sid}/api/tags", headers=own).status == 200
    seen = [r["headers"].get("Authorization") for r in backend.requests]
    assert not any(ADMIN in (value or "") or basic == value for value in seen)
    assert seen[-1] == "Bearer the-clients-own-ollama-token"
    assert key not in str(seen)


def test_clients_get_a_neutral_error_with_a_request_id_and_admins_the_detail(
        start_balancer: Any, sqlite_store: StoreConfig) -> None:
    lb = start_balancer(sqlite_store, "--health-interval", "600",
                        env={"ADMIN_TOKEN": ADMIN, "RETRIES": "0"})
    admin = {"Authorization": f"Bearer {ADMIN}"}
    dead = free_port()
    call(lb.port, "POST", "/proxy/addProxy", {"name": "dc-east-socks", "ip": "127.0.0.1",
                                              "port": dead, "protocol": "socks5",
                                              "userName": "ops", "password": "pw-123456"},
         headers=admin)
    backend = FakeOllama()
    row = call(lb.port, "POST", "/servers/addServer",
               {"url": backend.url, "name": "gpu-secret-7"}, headers=admin).json()
    backend.close()  # the balancer still believes it is up
    through_proxy = call(lb.port, "GET", "/servers/getServer?proxy=1").text
    chat = {"model": "llama3", "messages": [], "stream": False}
    attempts = [("POST", "/api/chat", chat), ("POST", "/v1/chat/completions", chat),
                ("GET", f"/servers/ollama/{row['id']}/api/tags", None),
                ("GET", f"/servers/ollama/{through_proxy}/api/tags", None)]
    for method, path, body in attempts:
        reply = call(lb.port, method, path, body)
        assert reply.status in (502, 503, 504), reply
        text = reply.text
        for secret in ("dc-east-socks", "socks5", "127.0.0.1", str(dead), "gpu-secret",
                       str(backend.port), "refused"):
            assert secret not in text, (secret, text)
        request_id = reply.headers["X-Request-Id"]
        assert f"request id {request_id}" in text
        lb.wait_for(lambda request_id=request_id: any(  # the detail, in the log
            request_id in line and ("gpu-secret-7" in line or "dc-east-socks" in line)
            for line in lb.lines if "WARNING" in line))
    detailed = call(lb.port, "GET", f"/servers/ollama/{through_proxy}/api/tags",
                    headers=admin)
    assert "dc-east-socks" in detailed.json()["error"]


def test_a_request_id_from_a_proxy_in_front_is_kept_and_a_bad_one_replaced(
        balancer: BalancerProcess) -> None:
    kept = balancer.call("GET", "/api/version", headers={"X-Request-Id": "haproxy-0af3:1"})
    assert kept.headers["X-Request-Id"] == "haproxy-0af3:1"
    replaced = balancer.call("GET", "/api/version", headers={"X-Request-Id": "a b\t<c>"})
    assert replaced.headers["X-Request-Id"] not in ("a b\t<c>", "")
    # In the access log line, written once the answer is out (read from its pipe later).
    balancer.wait_for(lambda: "haproxy-0af3:1" in balancer.log)


def test_secrets_given_as_flags_are_warned_about_once_and_never_logged(
        start_balancer: Any, sqlite_store: StoreConfig) -> None:
    lb = start_balancer(sqlite_store, "--admin-token", ADMIN, "--secret-key",
                        "a passphrase on the command line")
    warnings = [line for line in lb.lines if "given on the command line" in line]
    assert len(warnings) == 2
    assert any("--admin-token" in w and "ADMIN_TOKEN_FILE" in w for w in warnings)
    assert any("--secret-key" in w and "SECRET_KEY_FILE" in w for w in warnings)
    assert ADMIN not in lb.log and "a passphrase on the command line" not in lb.log
    quiet = start_balancer(sqlite_store, env={"ADMIN_TOKEN": ADMIN,
                                              "SECRET_KEY": "a passphrase on the command line"})
    assert "command line" not in quiet.log


def test_db_password_file_is_read(tmp_path: Path) -> None:
    mysql = StoreConfig("mysql", tmp_path)
    mysql_connect().close()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DB_")},
           **{k: v for k, v in mysql.env().items() if k != "DB_PASSWORD"}}
    password_file = tmp_path / "db-password"
    password_file.write_text("not-the-password\n")
    env["DB_PASSWORD_FILE"] = str(password_file)
    try:
        done = subprocess.run([sys.executable, str(ROOT / "ollamabalancer.py"), "--port", "0"],
                              env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and "Access denied" in done.stderr  # the file's, used
        assert "not-the-password" not in done.stderr
        password_file.write_text(MYSQL["password"] + "\n")  # root's, empty here; not "root"
        lb = BalancerProcess(env, [])
        try:
            assert lb.call("GET", "/servers/allServers").status == 200
        finally:
            lb.stop()
    finally:
        drop_database(mysql.database)


def test_behind_an_untrusted_proxy_a_loopback_peer_is_not_the_admin(
        start_balancer: Any, sqlite_store: StoreConfig) -> None:
    """A reverse proxy on this host forwards other people: a request that carries
    X-Forwarded-For or Forwarded is not taken for a client on this host."""
    lb = start_balancer(sqlite_store, env={"LOG_FORMAT": "json"})
    assert lb.call("GET", "/servers/allServers").status == 200
    for header in ({"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9"}):
        reply = lb.call("GET", "/servers/allServers", headers=header)
        assert reply.status == 403, reply
        pull = lb.call("POST", "/api/pull", {"model": "llama3"}, headers=header)
        assert pull.status == 403 and "MODEL_MANAGEMENT=open" in pull.json()["error"]


def test_from_a_trusted_proxy_the_client_is_the_right_most_untrusted_hop(
        start_balancer: Any, sqlite_store: StoreConfig) -> None:
    lb = start_balancer(sqlite_store, "--trusted-proxies", "127.0.0.1,10.0.0.0/8",
                        env={"LOG_FORMAT": "json"})
    cases = [({"X-Forwarded-For": "1.2.3.4, 198.51.100.7, 10.1.2.3"}, "198.51.100.7"),
             ({"Forwarded": 'for="[2001:db8::1]:4711";proto=https, for=10.9.9.9'},
              "2001:db8::1"),
             ({"X-Forwarded-For": "127.0.0.1"}, "127.0.0.1")]
    for header, client in cases:
        path = f"/api/version?case={len(lb.lines)}"
        assert lb.call("GET", path, headers=header).status == 200
        lb.wait_for(lambda p=path: any(p in line for line in lb.lines))
        line = next(json.loads(line) for line in lb.lines if path in line)
        assert line["client"] == client, (header, line)
    # A proxied client elsewhere is no admin; one on this host through the proxy is.
    outside = lb.call("GET", "/servers/allServers",
                      headers={"X-Forwarded-For": "198.51.100.7"})
    assert outside.status == 403
    assert lb.call("GET", "/servers/allServers",
                   headers={"X-Forwarded-For": "127.0.0.1"}).status == 200


def test_model_changes_need_the_admin_token_unless_model_management_is_open(
        start_balancer: Any, sqlite_store: StoreConfig, backend: FakeOllama) -> None:
    lb = start_balancer(sqlite_store, env={"ADMIN_TOKEN": ADMIN})
    auth = {"Authorization": f"Bearer {ADMIN}"}
    lb.call("POST", "/servers/addServer", {"url": backend.url}, headers=auth)
    for method, path, body in (("POST", "/api/pull", {"model": "phi3", "stream": False}),
                               ("POST", "/api/copy", {"source": "llama3",
                                                      "destination": "mine"}),
                               ("DELETE", "/api/delete", {"model": "mine"}),
                               ("POST", "/api/push", {"model": "llama3"})):
        refused = lb.call(method, path, body)
        assert refused.status == 403, (path, refused)
        assert "admin token" in refused.json()["error"], refused
    assert lb.call("POST", "/api/pull", {"model": "phi3", "stream": False},
                   headers=auth).status == 200
    assert lb.call("POST", "/api/chat", {"model": "phi3", "messages": [],
                                         "stream": False}).status == 200
    assert lb.call("HEAD", "/api/blobs/sha256:" + "0" * 64).status == 404  # a read
    assert "model changes: the admin token" in lb.log
    open_lb = start_balancer(sqlite_store, "--model-management", "open",
                             env={"ADMIN_TOKEN": ADMIN})
    assert open_lb.call("POST", "/api/copy", {"source": "phi3",
                                              "destination": "theirs"}).status == 200


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl), its file and its key's."""
    if shutil.which("openssl") is None:
        unavailable("openssl is not installed")
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True,
                   capture_output=True, timeout=60)
    return cert, key


def served_certificate(port: int) -> str:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


@pytest.mark.parametrize("event_loop_name", ["asyncio", "uvloop"])
def test_tls_is_served_reloaded_on_sighup_and_plain_http_is_told_to_use_https(
        start_balancer: Any, sqlite_store: StoreConfig, tmp_path: Path,
        event_loop_name: str) -> None:
    """On the standard library's loop plain HTTP to the TLS port is told to use https;
    uvloop reads a connection before it can be looked at, so there it is only dropped."""
    if event_loop_name == "uvloop":
        require_module("uvloop")
    cert, key = make_certificate(tmp_path, "first")
    lb = start_balancer(sqlite_store, "--tls-cert-file", str(cert), "--tls-key-file",
                        str(key))
    assert any("listening on https://" in line for line in lb.lines)
    context = ssl.create_default_context(cafile=str(cert))
    conn = http.client.HTTPSConnection("127.0.0.1", lb.port, timeout=10, context=context)
    conn.request("GET", "/")
    assert conn.getresponse().read() == b"Ollama is running"
    conn.request("GET", "/api/version")  # keep-alive over TLS
    assert json.loads(conn.getresponse().read())["version"]
    conn.close()
    plain = raw_exchange(lb.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    if event_loop_name == "asyncio":
        assert plain.startswith(b"HTTP/1.1 400 ") and b"use https://" in plain
    else:
        assert not plain.startswith(b"HTTP/1.1 200")
    before = served_certificate(lb.port)
    second, second_key = make_certificate(tmp_path, "second")
    cert.write_bytes(second.read_bytes())
    key.write_bytes(second_key.read_bytes())
    lb.proc.send_signal(signal.SIGHUP)
    lb.wait_for(lambda: any("TLS certificate read again" in line for line in lb.lines))
    assert served_certificate(lb.port) != before
    assert lb.proc.poll() is None
