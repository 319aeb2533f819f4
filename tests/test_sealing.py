"""Secrets at rest in-process: where the master key comes from, how a database takes its
first key, refuses another, moves a bare passphrase to scrypt, and re-seals on rotation.
The same end to end, through the balancer's process: test_security."""

from __future__ import annotations

import base64
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest

import ollamabalancer as ob

RANDOM = "0123456789abcdef" * 4  # 64 hex digits: what the balancer generates
SPEC = "scrypt:n=1024,r=8,p=1:" + "A" * 22  # cheap, for tests that stretch


def fresh_store(tmp_path: Path) -> ob.SQLiteStore:
    store = ob.SQLiteStore(str(tmp_path / "b.db"))
    store.connect()
    store.migrate()
    return store


def meta(store: ob.Store) -> dict[str, str]:
    return {str(n): str(v) for n, v in store._rows("SELECT name, value FROM balancer_meta")}


def stored_passwords(store: ob.Store) -> list[str]:
    return [str(p) for p, in store._rows("SELECT password FROM proxy ORDER BY id")]


def test_only_64_hex_digits_count_as_a_random_key() -> None:
    assert ob.MasterKey(RANDOM.encode(), "x").random
    assert ob.MasterKey(RANDOM.upper().encode(), "x").random
    for text in (RANDOM[:-1], RANDOM + "0", RANDOM[:-1] + "g", "correct horse battery staple"):
        assert not ob.MasterKey(text.encode(), "x").random, text


def test_stretching_is_scrypt_with_the_stored_salt_and_cost() -> None:
    key = ob.stretch(b"passphrase", SPEC)
    assert len(key) == 32 and key == ob.stretch(b"passphrase", SPEC)
    assert key != ob.stretch(b"passphrase", SPEC.replace("A" * 22, "B" * 22))
    assert key != ob.stretch(b"passphrase", SPEC.replace("n=1024", "n=2048"))
    assert key != ob.stretch(b"Passphrase", SPEC)
    import hashlib
    assert key == hashlib.scrypt(b"passphrase", salt=base64.urlsafe_b64decode("A" * 22 + "=="),
                                 n=1024, r=8, p=1, dklen=32)
    for bad in ("pbkdf2:n=1024,r=8,p=1:" + "A" * 22, "scrypt:n=1000,r=8,p=1:" + "A" * 22,
                "scrypt:n=1,r=8,p=1:" + "A" * 22, "scrypt:n=1024,r=0,p=1:" + "A" * 22,
                "scrypt:n=1024,r=8,p=17:" + "A" * 22, "scrypt:n=8388608,r=8,p=1:" + "A" * 22,
                "scrypt:n=1024,r=8,p=1:short"):
        with pytest.raises(ob.ConfigError):
            ob.stretch(b"passphrase", bad)
    spec = ob.new_kdf_spec()
    assert spec.startswith("scrypt:n=65536,r=8,p=1:") and ob.kdf_spec_re.fullmatch(spec)
    assert spec != ob.new_kdf_spec()  # a salt of its own each time


def test_the_master_key_comes_from_the_setting_the_named_file_or_a_new_one(
        tmp_path: Path) -> None:
    config = ob.Config(db_path=str(tmp_path / "b.db"))
    assert ob.load_master_key(ob.dataclasses.replace(config, secret_key="k" * 16)) == (
        ob.MasterKey(b"k" * 16, "SECRET_KEY"))
    with pytest.raises(ob.ConfigError, match="at least 16"):
        ob.load_master_key(ob.dataclasses.replace(config, secret_key="k" * 15))
    new = ob.load_master_key(config)
    assert new.random and new.new_file == str(tmp_path / "b.db.key")
    assert new.origin == f"new key file {tmp_path / 'b.db.key'}"
    assert not (tmp_path / "b.db.key").exists()  # written only once a database takes it
    named = tmp_path / "named.key"
    with pytest.raises(ob.ConfigError, match="does not exist"):
        ob.load_master_key(ob.dataclasses.replace(config, secret_key_file=str(named)))
    ob.write_key_file(str(named), b"a passphrase in a file")
    assert stat.S_IMODE(named.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        ob.write_key_file(str(named), b"another")
    got = ob.load_master_key(ob.dataclasses.replace(config, secret_key_file=str(named)))
    assert got == ob.MasterKey(b"a passphrase in a file", f"key file {named}")
    for mode in (0o640, 0o604, 0o660):
        named.chmod(mode)
        with pytest.raises(ob.ConfigError, match=f"chmod 600 {named}"):
            ob.load_master_key(ob.dataclasses.replace(config, secret_key_file=str(named)))
    named.chmod(0o400)
    ob.load_master_key(ob.dataclasses.replace(config, secret_key_file=str(named)))
    short = tmp_path / "short.key"
    ob.write_key_file(str(short), b"tooshort")
    with pytest.raises(ob.ConfigError, match="shorter than 16"):
        ob.load_master_key(ob.dataclasses.replace(config, secret_key_file=str(short)))
    binary = tmp_path / "binary.key"
    fd = os.open(binary, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"\xff\xfe" * 20)
    os.close(fd)
    with pytest.raises(ob.ConfigError, match="not UTF-8"):
        ob.load_master_key(ob.dataclasses.replace(config, secret_key_file=str(binary)))
    mysql = ob.Config(db_engine="mysql")
    assert ob.default_key_file(mysql) == "ollamabalancer.key"


def test_a_first_random_key_is_written_and_recorded_without_stretching(
        tmp_path: Path) -> None:
    store = fresh_store(tmp_path)
    path = tmp_path / "new.key"
    master = ob.MasterKey(RANDOM.encode(), f"new key file {path}", str(path))
    assert store.unlock(master) is None
    assert path.read_text() == RANDOM + "\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert meta(store) == {"key_check": ob.SecretBox(RANDOM.encode()).check_value()}
    assert store.box is not None and store.box.decrypt(
        ob.SecretBox(RANDOM.encode()).encrypt("x")) == "x"
    again = fresh_store(tmp_path)  # the next start: the same key opens it
    assert again.unlock(ob.MasterKey(RANDOM.encode(), f"key file {path}")) is None


def test_a_first_passphrase_is_stretched_and_its_salt_and_cost_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ob, "new_kdf_spec", lambda: SPEC)
    store = fresh_store(tmp_path)
    master = ob.MasterKey(b"correct horse battery", "SECRET_KEY")
    store.unlock(master)
    stretched = ob.SecretBox(ob.stretch(b"correct horse battery", SPEC))
    assert meta(store) == {"key_check": stretched.check_value(), "kdf": SPEC}
    with pytest.raises(ob.ConfigError) as wrong:
        fresh_store(tmp_path).unlock(ob.MasterKey(b"correct horse battery!", "SECRET_KEY"))
    assert "key from SECRET_KEY" in str(wrong.value) and "key check failed" in str(wrong.value)
    fresh_store(tmp_path).unlock(master)


def test_another_key_is_refused_and_a_generated_one_never_written(tmp_path: Path) -> None:
    store = fresh_store(tmp_path)
    store.unlock(ob.MasterKey(RANDOM.encode(), "SECRET_KEY"))
    path = tmp_path / "would-be.key"
    generated = ob.MasterKey(("f" * 64).encode(), f"new key file {path}", str(path))
    with pytest.raises(ob.ConfigError) as caught:
        fresh_store(tmp_path).unlock(generated)
    assert f"no key file {path}" in str(caught.value) and not path.exists()
    with pytest.raises(ob.ConfigError, match="key file /x"):
        fresh_store(tmp_path).unlock(ob.MasterKey(("e" * 64).encode(), "key file /x"))


def test_a_failed_first_record_leaves_no_key_file(tmp_path: Path) -> None:
    class Failing(ob.SQLiteStore):
        def _execute(self, sql: str, params: Any = ()) -> Any:
            if sql.startswith("INSERT INTO balancer_meta"):
                raise ob.StoreUnavailable("disk full")
            return super()._execute(sql, params)

    store = Failing(str(tmp_path / "b.db"))
    store.connect()
    store.migrate()
    path = tmp_path / "new.key"
    with pytest.raises(ob.StoreUnavailable):
        store.unlock(ob.MasterKey(RANDOM.encode(), "new", str(path)))
    assert not path.exists() and meta(store) == {}

    class Raced(ob.SQLiteStore):  # another instance recorded its key in between
        def _execute(self, sql: str, params: Any = ()) -> Any:
            if sql.startswith("INSERT INTO balancer_meta") and not meta_rows(self):
                super()._execute("INSERT INTO balancer_meta (name, value) VALUES"
                                 " ('key_check', 'theirs')")
            return super()._execute(sql, params)

    def meta_rows(store: ob.Store) -> list[Any]:
        return list(ob.SQLiteStore._execute(store, "SELECT * FROM balancer_meta").fetchall())  # type: ignore[arg-type]

    raced = Raced(str(tmp_path / "c.db"))
    raced.connect()
    raced.migrate()
    with pytest.raises(ob.ConfigError, match="at the same moment"):
        raced.unlock(ob.MasterKey(RANDOM.encode(), "new", str(path)))
    assert not path.exists()


def test_a_bare_passphrase_database_is_resealed_with_scrypt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ob, "new_kdf_spec", lambda: SPEC)
    store = fresh_store(tmp_path)
    legacy = ob.SecretBox(b"an old passphrase")
    store._execute("INSERT INTO balancer_meta (name, value) VALUES ('key_check', ?)",
                   [legacy.check_value()])
    for name, secret in (("a", "pw-a"), ("b", "pw-b")):
        store._execute("INSERT INTO proxy (name, ip, port, password) VALUES (?, 'h', 1, ?)",
                       [name, legacy.encrypt(secret)])
    with pytest.raises(ob.ConfigError, match="key check failed"):
        fresh_store(tmp_path).unlock(ob.MasterKey(b"not the old passphrase", "SECRET_KEY"))
    assert meta(store) == {"key_check": legacy.check_value()}  # nothing changed
    note = fresh_store(tmp_path).unlock(ob.MasterKey(b"an old passphrase", "SECRET_KEY"))
    assert note == "the passphrase is now stretched with scrypt; 2 secrets re-sealed"
    stretched = ob.SecretBox(ob.stretch(b"an old passphrase", SPEC))
    assert meta(store) == {"key_check": stretched.check_value(), "kdf": SPEC}
    assert [stretched.decrypt(p) for p in stored_passwords(store)] == ["pw-a", "pw-b"]
    assert fresh_store(tmp_path).unlock(ob.MasterKey(b"an old passphrase", "x")) is None


def test_rotation_reseals_everything_and_records_the_new_derivation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = fresh_store(tmp_path)
    store.unlock(ob.MasterKey(RANDOM.encode(), "SECRET_KEY"))
    store.add_proxy({"name": "p", "ip": "h", "port": 1, "password": "pw-1"})
    store.add_server({"host": "h", "port": 2, "upstream_auth": "Bearer t"})
    store._execute("INSERT INTO proxy (name, ip, port, password) VALUES ('plain', 'h', 3,"
                   " 'pw-plain')")  # a seed's plain value, sealed on rotation too
    stretched = ob.SecretBox(ob.stretch(b"a passphrase now", SPEC))
    assert store.rotate_secrets(stretched, SPEC) == 3
    assert meta(store) == {"key_check": stretched.check_value(), "kdf": SPEC}
    sealed = stored_passwords(store)
    assert all(ob.is_encrypted(p) for p in sealed)
    assert [stretched.decrypt(p) for p in sealed] == ["pw-1", "pw-plain"]
    back = ob.SecretBox(RANDOM.encode())
    assert store.rotate_secrets(back, None) == 3
    assert meta(store) == {"key_check": back.check_value()}
    store._execute("UPDATE proxy SET password = 'enc:v1:AAAA' WHERE name = 'p'")
    with pytest.raises(ob.SecretError):
        store.rotate_secrets(stretched, SPEC)
    assert meta(store) == {"key_check": back.check_value()}  # all or nothing


def test_secrets_are_sealed_on_every_write_and_opened_on_every_read(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = fresh_store(tmp_path)
    store.unlock(ob.MasterKey(RANDOM.encode(), "SECRET_KEY"))
    proxy = store.add_proxy({"name": "p", "ip": "h", "port": 1, "password": "pw-add"})
    server = store.add_server({"host": "h", "port": 2, "upstream_auth": "Bearer add"})
    assert store.update_proxy(proxy, {"password": "pw-patch"})
    assert store.update_server(server, {"upstream_auth": "Bearer patch", "name": "n"})
    raw = sqlite3.connect(tmp_path / "b.db")
    (password,) = raw.execute("SELECT password FROM proxy").fetchone()
    (auth,) = raw.execute("SELECT upstream_auth FROM ollamaServers").fetchone()
    assert ob.is_encrypted(password) and "pw-" not in password
    assert ob.is_encrypted(auth) and "Bearer" not in auth
    assert store.list_proxies()[0].password == "pw-patch"
    assert store.list_servers()[0].authorization == "Bearer patch"
    assert store.update_proxy(proxy, {"password": None, "user_name": "u"})
    assert store.list_proxies()[0].password is None
    raw.execute("UPDATE proxy SET password = 'plain-from-a-seed'")
    raw.commit()
    assert store.list_proxies()[0].password == "plain-from-a-seed"  # until protected
    raw.execute("UPDATE ollamaServers SET upstream_auth = 'Bearer from-a-seed'")
    raw.commit()
    assert store.protect_secrets() == 2 and store.protect_secrets() == 0
    (password,) = raw.execute("SELECT password FROM proxy").fetchone()
    assert ob.is_encrypted(password)
    assert store.list_servers()[0].authorization == "Bearer from-a-seed"
    raw.execute("UPDATE proxy SET password = 'enc:v1:damaged'")
    raw.commit()
    with caplog.at_level("ERROR", "ollamabalancer"):
        assert store.list_proxies()[0].password is None  # unreadable: none, logged
    assert caplog.messages == [f"cannot decrypt proxy {proxy}'s password: truncated encrypted "
                               "value"]
    raw.close()


def test_rotation_seals_with_a_new_key_file_or_the_one_given(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = ob.Config(db_path=str(tmp_path / "b.db"), secret_key=RANDOM)
    store = ob.open_store(config)
    store.add_proxy({"name": "p", "ip": "h", "port": 1, "password": "pw"})
    store.add_server({"host": "h", "port": 2, "upstream_auth": "Bearer b"})
    store.close()
    new = tmp_path / "new.key"
    assert ob.rotate_secret(config, str(new)) == 0
    assert capsys.readouterr().out == (
        f"re-encrypted 2 secrets with the key in {new}; start the balancer with "
        f"SECRET_KEY_FILE={new} from now on\n")
    generated = new.read_text().rstrip("\n")  # written with a newline
    assert ob.random_key_re.fullmatch(generated), generated  # 64 hex digits, used as is
    assert stat.S_IMODE(new.stat().st_mode) == 0o600
    settings = ob.dataclasses.replace(config, secret_key="", secret_key_file=str(new))
    reopened = ob.open_store(settings)  # opens with the new key, or refuses
    assert "kdf" not in meta(reopened)
    assert reopened.list_proxies()[0].password == "pw"
    reopened.close()
    chosen = tmp_path / "passphrase.key"
    ob.write_key_file(str(chosen), b"a passphrase a person chose")
    assert ob.rotate_secret(settings, str(chosen)) == 0
    assert f"re-encrypted 2 secrets with the key in {chosen}" in capsys.readouterr().out
    assert new.read_text() == generated + "\n"
    raw = sqlite3.connect(tmp_path / "b.db")  # as rotation left it, before a start reseals
    recorded = dict(raw.execute("SELECT name, value FROM balancer_meta").fetchall())
    raw.close()
    assert recorded["kdf"].startswith("scrypt:n=65536,r=8,p=1:")  # stretched
    reopened = ob.open_store(ob.dataclasses.replace(settings, secret_key_file=str(chosen)))
    assert reopened.list_servers()[0].authorization == "Bearer b"
    reopened.close()


def test_the_sealing_construction_is_fixed_so_old_databases_still_open(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A known answer, made once: the same key, nonce and text must seal to the same bytes
    in every version, or databases sealed by an earlier one would no longer open."""
    box = ob.SecretBox(b"a master key for the known answer")
    stored = ("enc:v1:AAECAwQFBgcICQoLDA0OD7MYD4ugEh_ADZgGyraYVMYjrqyFCIxi1D25oU-Q9z0DDXdL247"
              "TEvW2c24G20-nPGIyBIZHcLnnpQ")
    assert box.decrypt(stored) == "proxy password ünï 🔑"
    assert box.check_value() == "3b0e69f615e7b0ada3f2ff717c96f7f1"
    monkeypatch.setattr(ob.secrets, "token_bytes", lambda n: bytes(range(n)))
    assert box.encrypt("proxy password ünï 🔑") == stored
    # 33 bytes take a second keystream block, and this text's sealed form ends in "X".
    two_blocks = ("enc:v1:AAECAwQFBgcICQoLDA0OD7cCCYGtS0LVFpkUwOSeDXH6s0MKXAuSYM66vSGWjMJGADlxXAPS"
                  "Jyq5eWgQPKPdDIJ4TkPEHyEvKTExunb2RqqX")
    assert box.encrypt("thirty-three bytes, two blocks006") == two_blocks
    assert box.decrypt(two_blocks) == "thirty-three bytes, two blocks006"
    assert ob.hkdf_sha256(b"k", b"s", b"i", 40).hex() == (
        "02b0929a9d46e9236e23320ea2a8c3b46b410a54f1d138fb3a26f1792fecdf1e5221a02bec21c10d")
    with pytest.raises(ValueError, match=r"^HKDF-SHA256 output is at most 8160 bytes$"):
        ob.hkdf_sha256(b"k", b"s", b"i", 255 * 32 + 1)
    assert len(ob.hkdf_sha256(b"k", b"s", b"i", 255 * 32)) == 255 * 32


def test_what_a_stored_key_derivation_may_ask_for() -> None:
    salt = "A" * 22
    assert ob.kdf_params(f"scrypt:n=2,r=1,p=1:{salt}")[:3] == (2, 1, 1)
    assert ob.kdf_params(f"scrypt:n={2**22},r=64,p=16:{salt}")[:3] == (2**22, 64, 16)
    assert ob.kdf_params(f"scrypt:n=4,r=1,p=1:{salt}")[3] == bytes(16)
    for n, r, p in ((1, 1, 1), (3, 1, 1), (6, 1, 1), (12, 1, 1), (2**23, 1, 1), (2, 0, 1),
                    (2, 65, 1), (2, 1, 0), (2, 1, 17)):
        spec = f"scrypt:n={n},r={r},p={p}:{salt}"
        with pytest.raises(ob.ConfigError) as caught:
            ob.kdf_params(spec)
        assert str(caught.value) == f"the database holds unusable scrypt parameters {spec[:40]!r}"
    odd = "scrypt:n=1024,r=8:" + "A" * 40
    with pytest.raises(ob.ConfigError) as unknown:
        ob.kdf_params(odd)
    assert str(unknown.value) == f"the database holds an unknown key derivation {odd[:40]!r}"
    assert ob.kdf_params("scrypt:n=2,r=1,p=1:" + "A" * 23)[3] == base64.urlsafe_b64decode(
        "A" * 23 + "=")
    no_encoding = "scrypt:n=2,r=1,p=1:" + "A" * 25
    with pytest.raises(ob.ConfigError) as unknown:
        ob.kdf_params(no_encoding)
    assert str(unknown.value) == (
        f"the database holds an unknown key derivation {no_encoding[:40]!r}")


def test_a_new_key_derivation_is_scrypt_with_a_fresh_16_byte_salt(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ob.secrets, "token_bytes", lambda n: bytes(range(n)))
    assert ob.new_kdf_spec() == "scrypt:n=65536,r=8,p=1:AAECAwQFBgcICQoLDA0ODw"


def test_sealed_lengths_are_exact() -> None:
    box = ob.SecretBox(b"k" * 32)
    for size in (0, 1, 2, 3, 100, 1020, 2048):
        assert len(box.encrypt("x" * size)) == ob.sealed_length(size)
    assert ob.sealed_length(0) == 71 and ob.sealed_length(1020) == 1431


def test_unreadable_values_say_why() -> None:
    box = ob.SecretBox(b"k" * 32)
    for stored, message in (("plain", "not an encrypted value"),
                            ("enc:v1:!!", "malformed encrypted value"),
                            ("enc:v1:A", "malformed encrypted value"),
                            ("enc:v1:" + "A" * 63, "truncated encrypted value"),
                            ("enc:v1:" + "A" * 64,
                             "integrity check failed: tampered, or encrypted with another key")):
        with pytest.raises(ob.SecretError) as caught:
            box.decrypt(stored)
        assert str(caught.value) == message, stored
    assert box.decrypt(box.encrypt("")) == ""


def test_key_settings_say_what_is_wrong_in_words(tmp_path: Path) -> None:
    config = ob.Config(db_path=str(tmp_path / "b.db"))
    ob.load_master_key(ob.dataclasses.replace(config, secret_key="k" * 16))  # 16 is enough
    with pytest.raises(ob.ConfigError) as caught:
        ob.load_master_key(ob.dataclasses.replace(config, secret_key="k" * 15))
    assert str(caught.value) == "SECRET_KEY must be at least 16 characters"
    missing = tmp_path / "missing.key"
    with pytest.raises(ob.ConfigError) as caught:
        ob.load_master_key(ob.dataclasses.replace(config, secret_key_file=str(missing)))
    assert str(caught.value) == f"SECRET_KEY_FILE {missing} does not exist"
    exact = tmp_path / "sixteen.key"
    ob.write_key_file(str(exact), b"s" * 16)
    assert ob.load_master_key(ob.dataclasses.replace(
        config, secret_key_file=str(exact))).secret == b"s" * 16
    short = tmp_path / "fifteen.key"
    ob.write_key_file(str(short), b"s" * 15)
    with pytest.raises(ob.ConfigError) as caught:
        ob.load_master_key(ob.dataclasses.replace(config, secret_key_file=str(short)))
    assert str(caught.value) == f"the key in {short} is shorter than 16 characters"
    short.chmod(0o644)
    with pytest.raises(ob.ConfigError) as caught:
        ob.load_master_key(ob.dataclasses.replace(config, secret_key_file=str(short)))
    assert str(caught.value) == (f"the key file {short} can be read by other users: "
                                 f"chmod 600 {short}")
    garbled = tmp_path / "garbled.key"
    ob.write_key_file(str(garbled), b"\xff" * 32)
    with pytest.raises(ob.ConfigError) as caught:
        ob.load_master_key(ob.dataclasses.replace(config, secret_key_file=str(garbled)))
    assert str(caught.value) == f"cannot read the key file {garbled}: not UTF-8 text"
    folder = tmp_path / "a-folder.key"
    folder.mkdir()
    with pytest.raises(ob.ConfigError) as caught:
        ob.load_master_key(ob.dataclasses.replace(config, secret_key_file=str(folder)))
    assert str(caught.value) == f"cannot read the key file {folder}: Is a directory"
    store = fresh_store(tmp_path)
    nowhere = tmp_path / "no-such-dir" / "new.key"
    with pytest.raises(ob.ConfigError) as caught:
        store.unlock(ob.MasterKey(RANDOM.encode(), "new", str(nowhere)))
    assert str(caught.value) == (f"cannot write the key file {nowhere}: No such file or "
                                 "directory")


def test_refusals_of_the_key_say_where_it_came_from(tmp_path: Path) -> None:
    store = fresh_store(tmp_path)
    store.unlock(ob.MasterKey(RANDOM.encode(), "SECRET_KEY"))
    with pytest.raises(ob.ConfigError) as caught:
        fresh_store(tmp_path).unlock(ob.MasterKey(b"e" * 64, "key file /etc/x.key"))
    assert str(caught.value) == (
        "the key from key file /etc/x.key is not the one this database's secrets were sealed "
        "with (key check failed); set SECRET_KEY or SECRET_KEY_FILE to that key")
    with pytest.raises(ob.ConfigError) as caught:
        fresh_store(tmp_path).unlock(ob.MasterKey(b"e" * 64, "new", "/srv/new.key"))
    assert str(caught.value) == (
        "no key file /srv/new.key: this database's secrets were sealed with a key this "
        "instance does not have; copy that key file here (chmod 600) or set SECRET_KEY_FILE "
        "to it. No key file was written")
