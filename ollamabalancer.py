#!/usr/bin/env python3
"""ollamabalancer: one endpoint in front of a fleet of Ollama servers.

Run it with nothing but Python >= 3.11:

    python ollamabalancer.py                 # SQLite store in ./ollamabalancer.db
    python ollamabalancer.py --help          # every setting, also read from the environment

It keeps the seed project's API (``/proxy/addProxy``, ``/proxy/allProxies``,
``/servers/getServer``, ``/servers/ollama/<id>/...``), stores servers and proxies in
SQLite or MySQL, checks every server's ``/api/tags`` on a timer, and relays requests
byte for byte, streaming, optionally through an HTTP CONNECT or SOCKS proxy.

Optional dependencies, imported only when used:
    pymysql       when DB_ENGINE=mysql          (pip install pymysql)
    python-socks  for socks4/socks5/socks5h     (pip install python-socks)

Sections, in dependency order (each uses only those above it):

    Limits and constants        every number the balancer lives by, in one place
    Errors                      the exceptions, and the status each one answers
    Configuration               settings from flags, the environment and files
    HTTP/1.1 parsing            heads, framing and chunked bodies, sans-IO (RFC 9112)
    Serialization               heads and whole responses as bytes
    Stream I/O                  Wire: an asyncio protocol with flow control both ways
    Upstream connectors         direct, HTTP CONNECT and SOCKS connections; the pool
    Secrets at rest             sealing proxy passwords and credentials with the master key
    Schema                      the tables in SQLite and MySQL, and their migrations
    Store                       SQLite and MySQL behind one interface, in a worker thread
    Servers and the scheduler   servers, proxies, their load, and the fleet-wide queue
    Metrics                     counters and histograms in Prometheus' text format;
                                WorkerGroup: the counts of every worker (WORKERS=N)
    Requests and responses      Request, Relayed and friends: what handlers take and give
    Request bodies              the fields handlers read, checked
    Upstream exchange           Upstreams: a request to a server, the head of its answer
    Fleet                       Fleet: the store's rows in memory, health checks, catalog
    Fleet file                  FleetFile: servers and model policy declared in a file
    Access control              Access: admin token, browsers, API keys, request ids
    Relay                       Relay: a request forwarded, its answer streamed back
    Recovery                    Recovery: a stream whose server died goes on elsewhere
    The Ollama API              OllamaFront: the fleet as one Ollama, routed by model
    Fan-out                     FanOut: pull, create, delete, copy, blobs on every server
    Management API              Management: proxies, servers, API keys, getServer
    Observability               Observability: access log, /metrics, status, dashboard
    API description             Route, and OpenAPI 3.1 made from the route table; /api-docs
    Application                 Balancer and the route table: dispatch
    HTTP server and lifecycle   HTTPServer: connections, keep-alive, limits; serve();
                                Supervisor: WORKERS=N processes on one port
    CLI                         the command line: serve, servers, proxies, check, models

A request goes HTTPServer -> Balancer.dispatch (route table, Access) -> a handler of
OllamaFront, FanOut, Management, Relay or Observability -> Relay -> Upstreams -> Wire.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import errno
import functools
import hashlib
import heapq
import hmac
import http
import ipaddress
import itertools
import json
import logging
import math
import mmap
import os
import random
import re
import secrets
import select
import signal
import socket
import sqlite3
import ssl
import sys
import tempfile
import time
import urllib.parse
import weakref
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Hashable,
    Iterable,
    Iterator,
    Sequence,
)
from typing import Any, ClassVar, Literal, NamedTuple, TextIO, TypeVar

__version__ = "0.1.0"

log = logging.getLogger("ollamabalancer")
T = TypeVar("T")


# ---------------------------------------------------------------------------
# Limits and constants
# ---------------------------------------------------------------------------

#: Longest request line, in bytes. nginx's large_client_header_buffers default is 8 KiB.
MAX_REQUEST_LINE = 8 * 1024
#: Longest request or response head (start line + fields), in bytes. node allows 80 KiB,
#: nginx 4 x 8 KiB; 64 KiB is generous for Ollama clients.
MAX_HEAD = 64 * 1024
#: Most header fields in one head. Apache's LimitRequestFields default is 100.
MAX_HEADERS = 100
#: Largest JSON body an admin endpoint reads, in bytes. Proxied bodies have no limit.
MAX_ADMIN_BODY = 1024 * 1024
#: Largest body of a model-routed request (/api/chat with images, say), read whole so it
#: can be sent again to another server. 64 MiB, as a dozen large base64 images.
MAX_ROUTED_BODY = 64 * 1024 * 1024
#: Bytes of a chat read for its conversation's fingerprints (conversation_prints): a
#: bound on the work on the event loop (a 62 MiB chat once froze it 5.6 s) and on memory.
FINGERPRINT_BYTES = 1024 * 1024
#: Deepest nesting of JSON arrays and objects read from a peer. Ollama's bodies nest less
#: than 10 deep, tool schemas a few levels more; CPython's parser itself gives up near
#: 1,000 with a RecursionError (and a traceback), so depth is checked before parsing.
MAX_JSON_DEPTH = 128
#: Request bytes all buffered bodies together may hold (routed requests are read whole so
#: they can go to another server): past it a request is refused with 503 and Retry-After
#: rather than memory growing with every concurrent upload. 512 MiB by default.
MAX_BUFFERED_BODIES = 512 * 1024 * 1024
#: Body bytes looked at for a leading "model" field before the rest is read.
MODEL_PEEK = 4096
#: Last bytes of a relayed answer kept to read Ollama's final line (its eval_count).
TAIL_BYTES = 8 * 1024
#: Bytes of a streamed answer kept so that another server can continue it if its own
#: dies (the text so far, as the client saw it): 4 MiB of NDJSON is some 25,000 tokens.
#: They count against MAX_BUFFERED_BODIES; a longer answer, or one the budget has no
#: room for, is relayed as before but not continued.
MAX_RECOVERY_BYTES = 4 * 1024 * 1024
#: Budget taken for those bytes at a time, so that a token costs no call to take it.
RECOVERY_HOLD_STEP = 64 * 1024
#: Largest /api/show answer read to tell whether a model continues a prefill (its
#: template and license make most of it; a tokenizer's vocabulary is not asked for).
MAX_SHOW_BODY = 8 * 1024 * 1024
#: Seconds the access log's lines wait to go out together (at most 64 KiB of them): one
#: write a batch, not one a request, which cost a request served alone 8 % of its
#: instructions. Any other log record writes them first (LogHandler), and so does a stop.
ACCESS_LOG_DELAY = 0.05
#: Largest error body read from an upstream to decide whether to try another server.
MAX_ERROR_BODY = 64 * 1024
#: The change log (Store.changes_since): rows one sync applies at most (past it, a reload),
#: the writes kept for instances that fall behind, and how far back each sync reads
#: again, for writes whose transactions committed after later ones (MySQL).
CHANGE_BATCH = 1000
CHANGE_LOG_KEPT = 10_000
#: Seconds between two prunings of the change log to its last CHANGE_LOG_KEPT rows, by
#: each instance (a DELETE that finds nothing costs one indexed read).
CHANGE_PRUNE_INTERVAL = 60.0
CHANGE_SLACK = 64
#: Change-log kinds whose row_id is a table's numeric id, and what such an id looks like.
ROW_KINDS = frozenset({"server", "proxy", "key", "learned"})
_row_id_re = re.compile(r"[0-9]{1,18}")
#: WORKERS=N: a crashed worker is started again after a pause that doubles, between these
#: bounds in seconds, while workers die young (within WORKER_YOUNG seconds of starting);
#: on SIGTERM the supervisor waits DRAIN_TIMEOUT plus WORKER_GRACE before SIGKILL.
WORKER_RESTART = (0.1, 10.0)
WORKER_YOUNG = 10.0
WORKER_GRACE = 5.0
#: A worker that has not written its counts for this many SYNC_INTERVALs (30 s by
#: default) is stuck, its event loop blocked: the supervisor kills it and starts another.
WORKER_HUNG_BEATS = 30
#: Heartbeats an instance may miss before the others take back its share of each server
#: (it is gone: a crash must not hold capacity), and seconds after which its row goes.
INSTANCE_MISSED_BEATS = 3
INSTANCE_FORGOTTEN = 600
#: Seconds a heartbeat may lie ahead of the database's clock and still count (its clock
#: counts whole seconds): a row further ahead is no live instance's.
BEAT_CLOCK_SLACK = 1
#: The status page's history of each server: requests and errors per HISTORY_STEP seconds
#: over the last HISTORY_POINTS steps (five minutes), so a chart is whole at page load.
HISTORY_STEP = 10
HISTORY_POINTS = 30
#: Seconds between reads of a server's /api/version by its health checks (and whenever it
#: comes back): a version changes with a restart, not every round; 10,000 servers checked
#: every 10 s would otherwise ask 1,000 times a second.
VERSION_RECHECK = 300.0
#: Largest /api/tags (or /api/ps) answer a health check reads, in bytes: a big model
#: library is ~100 KiB; past this the answer is refused, never parsed (parsing 16 MiB of
#: JSON held the event loop).
MAX_HEALTH_BODY = 2 * 1024 * 1024
#: Informational (1xx) answers an upstream may send before its answer: each restarts the
#: wait for it, so an endless stream of "100 Continue" must end somewhere.
MAX_INFORMATIONAL = 16
#: Chunks of a request body taken apart per turn of the event loop. Each costs about
#: 1.5 us whatever its size: a body of 1-byte chunks takes 0.4 ms a turn, then other
#: connections run, while chunks of a useful size still pass 256 at a time.
CHUNKED_SLICE = 256
#: Longest chunk-size line with extensions, in bytes (node allows 16 KiB of extensions in total).
MAX_CHUNK_LINE = 4 * 1024
#: Unread bytes a connection buffers before it stops reading its socket (flow control).
#: Above MAX_HEAD, so a head always fits; a client's pipelined requests wait past it.
BUFFER_HIGH = 256 * 1024
#: Bytes of a body in memory written upstream at once; the next after the transport drained.
SEND_SLICE = 1024 * 1024
#: Request bytes kept so that a request can be sent again on a fresh upstream connection when
#: a pooled one turns out to be dead before it answered. Larger bodies stream without a copy.
REPLAY_LIMIT = 1024 * 1024
#: Idle upstream connections kept per (server, proxy), and for how long, in seconds. It must
#: cover the concurrency a server sees, or each burst closes and reopens connections
#: (measured: 16 made 6,000 connects for 13,600 requests at 64 clients; nginx's keepalive
#: directive is usually 32 to 128 for the same role).
POOL_MAX_IDLE = 256
POOL_IDLE_SECONDS = 30.0
#: Idle upstream connections kept over all servers together: a fleet of 10,000 servers
#: must not hold 10,000 idle sockets, each a file descriptor a client's connection could
#: use. The longest idle go first; fewer under a low open-file limit (pool_cap).
POOL_MAX_IDLE_TOTAL = 1024

#: Seconds a client may take to send a whole request head (slowloris guard); nginx: 60 s.
HEADER_TIMEOUT = 30.0
#: Seconds a connection closed with request bytes unread is still read (and the bytes
#: dropped) so that the client gets the error response rather than a reset; nginx's
#: lingering_timeout is 5 s.
LINGER_SECONDS = 2.0
#: Seconds an idle keep-alive client connection is kept open; nginx: 75 s. A new connection
#: gets HEADER_TIMEOUT for its first request, idle time included.
KEEPALIVE_TIMEOUT = 75.0
#: Seconds a request body may take from its first read (BODY_TIMEOUT), plus one second
#: for every BODY_MIN_RATE bytes that arrived: Apache's mod_reqtimeout (body=N,MinRate=R).
#: An upload at 64 KiB/s or faster always finishes; a trickle is cut, whatever its size.
BODY_TIMEOUT = 60.0
BODY_MIN_RATE = 64 * 1024

#: Hop-by-hop fields (RFC 9110 section 7.6.1), never forwarded. Content-Length and
#: Transfer-Encoding are re-framed by the balancer on each side; Expect is answered here.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "expect",
    }
)

PROXY_PROTOCOLS = ("http", "socks4", "socks5", "socks5h")
STRATEGIES = ("least_load", "round_robin", "random")
#: Seconds after which a queued request is served strictly in arrival order, even if a
#: younger one could use a free slot without a cold model load (see Scheduler.dispatch).
QUEUE_AGING = 5.0
#: Request paths whose matching routes are remembered (all forgotten when full).
ROUTE_MEMO_SIZE = 1024
#: Sessions (X-Session-Id) and conversations (a fingerprint of their messages) remembered
#: for affinity, about 150 bytes each, least recently used dropped first.
MAX_SESSIONS = 100_000
#: The load board of a group of workers (LoadBoard): cells a worker's row has for
#: servers, and cells a server's count may be in from the one its id names.
BOARD_SLOTS = 4096
BOARD_PROBE = 8
#: Seconds between two looks of a worker at the others' counts on the board, to re-rank
#: the servers whose load changed and give their freed slots to its queue.
BOARD_TICK = 0.05
#: Bounded loads for affinity (Ranking.affine): a conversation's server by rendezvous
#: hashing is passed over while it runs more than (1 + this) times its share of the
#: requests on the servers that hold the model loaded.
AFFINITY_SLACK = 0.25
#: Servers holding a model loaded that its conversations are placed among (LoadedIndex):
#: past it, a popular model's conversations go to a fixed few dozen of its servers, and
#: the rest of its requests anywhere.
AFFINITY_POOL = 64
#: What the scheduler assumes of a server's Ollama until it has learned otherwise and
#: nobody said: that it keeps 2 models loaded, or as many as it has shown (a load beyond
#: that counts as one that may evict: Learned.resident); that a loaded model runs 2
#: requests at once, or one more than it has been seen to (Learned.parallel); and a cap
#: of 4 requests in flight (the old MAX_CONCURRENCY default) until anything is learned.
GUESSED_MAX_LOADED_MODELS = 2
GUESSED_NUM_PARALLEL = 2
GUESSED_MAX_CONCURRENCY = 4
SERVER_SCHEMES = ("http", "https")
#: Origins Ollama allows before OLLAMA_ORIGINS adds any (its envconfig), so that browser
#: front ends that work against Ollama work against the balancer.
DEFAULT_ORIGINS = (
    *(f"{scheme}://{host}{port}" for host in ("localhost", "127.0.0.1", "0.0.0.0")
      for scheme in ("http", "https") for port in ("", ":*")),
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*",
)
#: What a CORS preflight is told: Ollama's methods and request headers, with ours.
CORS_PREFLIGHT_FIELDS = (
    ("Access-Control-Allow-Methods", "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"),
    ("Access-Control-Allow-Headers",
     "Authorization, Content-Type, User-Agent, Accept, X-Requested-With, X-Session-Id, "
     "X-Recovery, X-Server-Labels, "
     "X-Stainless-Lang, X-Stainless-Package-Version, X-Stainless-Os, X-Stainless-Arch, "
     "X-Stainless-Retry-Count, X-Stainless-Runtime, X-Stainless-Runtime-Version, "
     "X-Stainless-Async, X-Stainless-Helper-Method, X-Stainless-Poll-Helper, "
     "X-Stainless-Custom-Poll-Interval, X-Stainless-Timeout"),
    ("Access-Control-Max-Age", "43200"),
)
request_id_re = re.compile(r"[A-Za-z0-9._:-]{1,64}")


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class HTTPError(Exception):
    """An error that becomes a JSON response ``{"error": message}`` with ``status``.

    ``close`` says the connection cannot be trusted any more (framing errors) and is
    closed after the response. ``model`` names the request's model in the metrics, when
    the error came once it was known.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        close: bool = False,
        headers: Sequence[tuple[str, str]] = (),
        model: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = tuple(headers)
        self.model = model

    def about(self, model: str | None) -> HTTPError:
        """This error, naming ``model`` unless it names one already."""
        self.model = self.model or model
        return self


class ProtocolError(HTTPError):
    """Malformed HTTP from a peer: the connection is closed after the error response."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message, close=True)


class ModelUnavailable(HTTPError):
    """A model the fleet has whose servers cannot take a request now: down, disabled or
    failing. 503 and not 404, which clients read as "not installed"."""

    def __init__(self, model: str, name: str, retry_after: float,
                 why: str = "its servers are down") -> None:
        super().__init__(503, f"model '{name}' is unavailable: {why}",
                         headers=[("Retry-After", str(max(1, math.ceil(retry_after))))],
                         model=model)


class IncompleteBody(Exception):
    """A peer closed the connection, or stopped sending, in the middle of a body."""


class UpstreamError(Exception):
    """An upstream or its proxy failed before any response byte reached the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UpstreamClosed(Exception):
    """An upstream connection closed under a request. ``answered`` says whether any
    response bytes had come; a request can only be sent again when none had."""

    def __init__(self, message: str, *, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered


class StoreUnavailable(Exception):
    """The database cannot be reached; admin calls answer 503."""


class Conflict(Exception):
    """A write would break a uniqueness rule (duplicate host:port and the like)."""


class ConfigError(Exception):
    """A bad setting; main() prints it on one line and exits non-zero."""


class MissingDependency(Exception):
    """An optional package is needed for what was configured."""

    def __init__(self, package: str, purpose: str) -> None:
        super().__init__(f"{purpose} needs the '{package}' package: pip install {package}")


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    ip: str = "0.0.0.0"
    port: int = 8080
    db_engine: Literal["sqlite", "mysql"] = "sqlite"
    db_host: str = "localhost"
    db_port: int = 3306
    db_username: str = "root"
    db_password: str = dataclasses.field(default="root", repr=False)
    db_password_file: str = ""
    db_database: str = "ollamaServers"
    db_path: str = "ollamabalancer.db"
    db_timeout: float = 5.0
    health_interval: float = 10.0
    health_concurrency: int = 64
    sync_interval: float = 1.0
    health_timeout: float = 5.0
    connect_timeout: float = 10.0
    upstream_timeout: float = 600.0
    client_timeout: float = 60.0
    strategy: Literal["least_load", "round_robin", "random"] = "least_load"
    # None: learned per server (Learned), from the guesses below until it is.
    max_concurrency: int | None = None
    num_parallel: int | None = None
    max_loaded_models: int | None = None
    conversation_affinity: bool = True
    max_queue: int = 1000
    queue_timeout: float = 300.0
    retries: int = 2
    recovery: bool = True
    fleet_file: str = ""
    breaker_threshold: int = 3
    breaker_cooldown: float = 30.0
    secret_key: str = dataclasses.field(default="", repr=False)
    secret_key_file: str = ""
    admin_token: str = dataclasses.field(default="", repr=False)
    admin_token_file: str = ""
    require_api_key: bool = False
    trusted_proxies: tuple[str, ...] = ()
    model_management: str = "admin"
    allowed_hosts: tuple[str, ...] = ()
    origins: tuple[str, ...] = ()
    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    max_connections: int = 10_000
    max_connections_per_client: int = 0  # 0: a quarter of max_connections
    max_buffered_bodies: int = MAX_BUFFERED_BODIES
    drain_timeout: float = 30.0
    tls_cert_file: str = ""
    tls_key_file: str = ""
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    workers: int = 1
    #: Flags that carried a secret on the command line, which every user can read (ps).
    secret_flags: tuple[str, ...] = ()
    #: The fields the user set (by flag or environment), not left at their defaults.
    explicit: frozenset[str] = frozenset()

    def describe_store(self) -> str:
        """The store, for the startup log: never the password."""
        if self.db_engine == "mysql":
            return (
                f"mysql {self.db_username}@{self.db_host}:{self.db_port}"
                f"/{self.db_database}"
            )
        return f"sqlite {os.path.abspath(self.db_path)}"


def _port(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text.strip()) or int(text) > 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not (value > 0 and value < 1e9):
        raise ValueError("must be a positive number of seconds")
    return value


def _engine(text: str) -> str:
    value = text.strip().lower()
    if value not in ("sqlite", "mysql"):
        raise ValueError("must be 'sqlite' or 'mysql'")
    return value


def _count(low: int, high: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        if not re.fullmatch(r"[0-9]{1,9}", text.strip()) or not low <= int(text) <= high:
            raise ValueError(f"must be a whole number from {low} to {high}")
        return int(text)

    return convert


_byte_size_re = re.compile(r"([0-9]{1,15})\s*(?:([KMGT])i?B?)?", re.IGNORECASE)


def _byte_size(text: str) -> int:
    """A size in bytes: 536870912, 512M, 512MiB or 1G (powers of 1024), at least 1 MiB."""
    match = _byte_size_re.fullmatch(text.strip())
    if match is None:
        raise ValueError("must be a size in bytes, such as 536870912, 512M or 1G")
    value: int = int(match.group(1)) << 10 * "_KMGT".index((match.group(2) or "_").upper())
    if not 1024 * 1024 <= value <= 2**50:
        raise ValueError("must be from 1M to 1024T")
    return value


def _strategy(text: str) -> str:
    value = text.strip().lower()
    if value not in STRATEGIES:
        raise ValueError(f"must be one of {', '.join(STRATEGIES)}")
    return value


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError("must be 'text' or 'json'")
    return value


def _event_loop(text: str) -> str:
    value = text.strip().lower()
    if value not in ("auto", "asyncio", "uvloop"):
        raise ValueError("must be 'auto', 'asyncio' or 'uvloop'")
    return value


def _workers(text: str) -> int:
    """WORKERS: a count, or auto for the cores this process may run on."""
    if text.strip().lower() == "auto":
        affinity = getattr(os, "sched_getaffinity", None)
        return max(1, len(affinity(0)) if affinity else os.cpu_count() or 1)
    return _count(1, 1024)(text)


def _level(text: str) -> str:
    value = text.strip().upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be one of debug, info, warning, error")
    return value


def _text(text: str) -> str:
    return text


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip().lower() for name in text.split(",") if name.strip())


def _networks(text: str) -> tuple[str, ...]:
    """Comma-separated addresses and CIDRs (10.0.0.0/8, ::1), each checked."""
    networks = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            try:
                networks.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError:
                raise ValueError(f"{item!r} is not an address or a CIDR") from None
    return tuple(networks)


def _model_management(text: str) -> str:
    value = text.strip().lower()
    if value not in ("admin", "open"):
        raise ValueError("must be admin or open")
    return value


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("0", "1", "true", "false", "yes", "no", "on", "off", ""):
        raise ValueError("must be 1 or 0")
    return value in ("1", "true", "yes", "on")


#: (env var, flag, Config field, parser, help). Flags win over the environment.
SETTINGS: tuple[tuple[str, str, str, Callable[[str], Any], str], ...] = (
    ("IP", "--ip", "ip", _text, "address to listen on (default 0.0.0.0)"),
    ("PORT", "--port", "port", _port, "port to listen on, 0 for any (default 8080)"),
    ("DB_ENGINE", "--db-engine", "db_engine", _engine,
     "sqlite or mysql (default: mysql when DB_HOST is set, else sqlite)"),
    ("DB_HOST", "--db-host", "db_host", _text, "MySQL host (default localhost)"),
    ("DB_PORT", "--db-port", "db_port", _port, "MySQL port (default 3306)"),
    ("DB_USERNAME", "--db-username", "db_username", _text, "MySQL user (default root)"),
    ("DB_PASSWORD", "--db-password", "db_password", _text, "MySQL password (default root)"),
    ("DB_PASSWORD_FILE", "--db-password-file", "db_password_file", _text,
     "file holding DB_PASSWORD"),
    ("DB_DATABASE", "--db-database", "db_database", _text,
     "MySQL database, created when missing (default ollamaServers)"),
    ("DB_PATH", "--db-path", "db_path", _text, "SQLite file (default ollamabalancer.db)"),
    ("DB_TIMEOUT", "--db-timeout", "db_timeout", _seconds,
     "seconds a database call may take (connect, read, write, a locked SQLite file) "
     "before 503 database unavailable (default 5)"),
    ("HEALTH_INTERVAL", "--health-interval", "health_interval", _seconds,
     "seconds between health checks of every server (default 10)"),
    ("HEALTH_CONCURRENCY", "--health-concurrency", "health_concurrency", _count(1, 10_000),
     "health checks at once; a round's checks start spread over half HEALTH_INTERVAL "
     "(default 64)"),
    ("SYNC_INTERVAL", "--sync-interval", "sync_interval", _seconds,
     "seconds between reads of what other instances on the same database wrote "
     "(default 1)"),
    ("HEALTH_TIMEOUT", "--health-timeout", "health_timeout", _seconds,
     "seconds one health check may take (default 5)"),
    ("CONNECT_TIMEOUT", "--connect-timeout", "connect_timeout", _seconds,
     "seconds to connect to a server or proxy before 504 (default 10)"),
    ("CLIENT_TIMEOUT", "--client-timeout", "client_timeout", _seconds,
     "seconds a client may stop reading an answer before it is cut, its server freed and "
     "never blamed (default 60)"),
    ("UPSTREAM_TIMEOUT", "--upstream-timeout", "upstream_timeout", _seconds,
     "seconds to wait for an upstream byte; a cold model load can take minutes (default 600)"),
    ("STRATEGY", "--strategy", "strategy", _strategy,
     "least_load (loaded model first, then least busy; default), round_robin or random"),
    ("MAX_CONCURRENCY", "--max-concurrency", "max_concurrency", _count(1, 100_000),
     "requests in flight per server before requests queue; a server's own value wins "
     f"(default: its models x parallel, as learned; {GUESSED_MAX_CONCURRENCY} before "
     "anything is)"),
    ("NUM_PARALLEL", "--num-parallel", "num_parallel", _count(1, 1000),
     "the fleet's OLLAMA_NUM_PARALLEL: requests one loaded model runs at once (default: "
     f"learned per server, {GUESSED_NUM_PARALLEL} until more is seen)"),
    ("MAX_LOADED_MODELS", "--max-loaded-models", "max_loaded_models", _count(1, 1000),
     "the fleet's OLLAMA_MAX_LOADED_MODELS: models one server keeps loaded (default: "
     f"learned per server, {GUESSED_MAX_LOADED_MODELS} until more is seen)"),
    ("CONVERSATION_AFFINITY", "--conversation-affinity", "conversation_affinity", _flag,
     "send a chat's next turn to the server that has its start cached (default on)"),
    ("MAX_QUEUE", "--max-queue", "max_queue", _count(0, 10_000_000),
     "requests waiting for a free server before 503 (default 1000)"),
    ("QUEUE_TIMEOUT", "--queue-timeout", "queue_timeout", _seconds,
     "seconds a request may wait in the queue before 503 (default 300)"),
    ("RETRIES", "--retries", "retries", _count(0, 100),
     "other servers tried when one fails before answering (default 2)"),
    ("FLEET_FILE", "--fleet-file", "fleet_file", _text,
     "a JSON (or TOML) file declaring servers and model policy, applied at start, on "
     "SIGHUP and when it changes (docs/fleet-file.md); a file that does not validate is "
     "refused and the previous policy stays (default none)"),
    ("RECOVERY", "--recovery", "recovery", _flag,
     "continue a streamed answer on another server when its own fails mid-answer, "
     "where the model continues a prefill (on or off; default on; a request opts out "
     "with X-Recovery: off)"),
    ("BREAKER_THRESHOLD", "--breaker-threshold", "breaker_threshold", _count(1, 1000),
     "consecutive failures that take a server out of rotation (default 3)"),
    ("BREAKER_COOLDOWN", "--breaker-cooldown", "breaker_cooldown", _seconds,
     "seconds before a failed server is probed again (default 30)"),
    ("SECRET_KEY", "--secret-key", "secret_key", _text,
     "master key for secrets at rest (default: SECRET_KEY_FILE, else a generated key file)"),
    ("SECRET_KEY_FILE", "--secret-key-file", "secret_key_file", _text,
     "file holding the master key (default: <DB_PATH>.key, or ./ollamabalancer.key for MySQL)"),
    ("ADMIN_TOKEN", "--admin-token", "admin_token", _text,
     "bearer token for the management endpoints (default: loopback clients only)"),
    ("ADMIN_TOKEN_FILE", "--admin-token-file", "admin_token_file", _text,
     "file holding ADMIN_TOKEN"),
    ("REQUIRE_API_KEY", "--require-api-key", "require_api_key", _flag,
     "1 to require a client API key even before any exists (default 0)"),
    ("TRUSTED_PROXIES", "--trusted-proxies", "trusted_proxies", _networks,
     "comma-separated addresses and CIDRs of reverse proxies in front: from them, the "
     "client's address is read from Forwarded / X-Forwarded-For (default none)"),
    ("MODEL_MANAGEMENT", "--model-management", "model_management", _model_management,
     "who may pull, push, create, copy and delete models on the fleet at the root: admin "
     "(the admin token, or a loopback client without one; default) or open (anyone, as "
     "Ollama)"),
    ("ALLOWED_HOSTS", "--allowed-hosts", "allowed_hosts", _names,
     "comma-separated host names the management API answers to without ADMIN_TOKEN, "
     "besides IP addresses, localhost and this host's name (stops DNS rebinding)"),
    ("ORIGINS", "--origins", "origins", _names,
     "comma-separated browser origins allowed on the Ollama endpoints, as OLLAMA_ORIGINS "
     "(* wildcards); localhost, 127.0.0.1, 0.0.0.0, app://, file://, tauri:// and "
     "vscode-webview:// always are"),
    ("HEADER_TIMEOUT", "--header-timeout", "header_timeout", _seconds,
     "seconds a client may take to send a request head (default 30)"),
    ("BODY_TIMEOUT", "--body-timeout", "body_timeout", _seconds,
     "seconds a request body may take, plus one per 64 KiB received: uploads at 64 KiB/s "
     "or faster always finish (default 60)"),
    ("MAX_CONNECTIONS", "--max-connections", "max_connections", _count(1, 10_000_000),
     "client connections open at once; more are refused (default 10000)"),
    ("MAX_CONNECTIONS_PER_CLIENT", "--max-connections-per-client",
     "max_connections_per_client", _count(0, 10_000_000),
     "connections one client address may hold; more get 429 (default: a quarter of "
     "MAX_CONNECTIONS; behind a reverse proxy, which is one address, raise it)"),
    ("MAX_BUFFERED_BODIES", "--max-buffered-bodies", "max_buffered_bodies", _byte_size,
     "request bodies held in memory at once, over all requests (512M, 2G, in bytes...); "
     "past it 503 with Retry-After (default 512M)"),
    ("TLS_CERT_FILE", "--tls-cert-file", "tls_cert_file", _text,
     "PEM certificate (chain) to serve HTTPS with, read again on SIGHUP (default: HTTP)"),
    ("TLS_KEY_FILE", "--tls-key-file", "tls_key_file", _text,
     "PEM private key of TLS_CERT_FILE"),
    ("DRAIN_TIMEOUT", "--drain-timeout", "drain_timeout", _seconds,
     "seconds requests in flight may take to finish after SIGTERM (default 30)"),
    ("LOG_LEVEL", "--log-level", "log_level", _level,
     "debug, info, warning or error (default info)"),
    ("LOG_FORMAT", "--log-format", "log_format", _log_format,
     "text (aligned, for people; default) or json (one object a line)"),
    ("EVENT_LOOP", "--event-loop", "event_loop", _event_loop,
     "uvloop (faster; pip install ollamabalancer[fast]), asyncio, or auto: uvloop when "
     "installed (default)"),
    ("WORKERS", "--workers", "workers", _workers,
     "serving processes on the one port (Linux: SO_REUSEPORT), each an instance on the "
     "same store, supervised; auto: one per core (default 1)"),
)


def load_config(argv: Sequence[str], environ: dict[str, str]) -> Config:
    """Reads the settings from the environment, then from flags; raises ConfigError."""
    parser = argument_parser()
    args = parser.parse_args(list(argv))
    values: dict[str, Any] = {}
    for env, flag, field, convert, _ in SETTINGS:
        raw = getattr(args, field)
        source = flag
        if raw is None and env in environ:
            raw, source = environ[env], env
        if raw is None:
            continue
        try:
            values[field] = convert(raw)
        except ValueError as exc:
            raise ConfigError(f"{source}={raw!r} {exc}") from None
    values["explicit"] = frozenset(values)
    if "db_engine" not in values:
        values["db_engine"] = "mysql" if ("db_host" in values) else "sqlite"
    values["secret_flags"] = tuple(flag for flag, field in SECRET_FLAGS.items()
                                   if getattr(args, field) is not None)
    if "db_password" not in values and values.get("db_password_file"):
        values["db_password"] = read_secret_file(values["db_password_file"],
                                                 "DB_PASSWORD_FILE")
    return Config(**values)


#: Flags that carry a secret, and the field each sets: given on the command line, they
#: show in ``ps`` to every user of the host, so the balancer says so once at start.
SECRET_FLAGS = {"--admin-token": "admin_token", "--secret-key": "secret_key",
                "--db-password": "db_password"}


def read_secret_file(path: str, setting: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read {setting} {path}: {reason}") from None


def with_admin_token(config: Config) -> Config:
    """Reads ADMIN_TOKEN_FILE into the admin token, when that is how it was given."""
    if config.admin_token and len(config.admin_token) < 16:
        raise ConfigError("ADMIN_TOKEN must be at least 16 characters")
    if config.admin_token or not config.admin_token_file:
        return config
    token = read_secret_file(config.admin_token_file, "ADMIN_TOKEN_FILE")
    if len(token) < 16:
        raise ConfigError("the admin token must be at least 16 characters")
    return dataclasses.replace(config, admin_token=token)


#: The words the program takes first, each with its line in --help; with none, it serves.
COMMANDS = {
    "serve": "run the balancer (what it does with no command); the options above apply",
    "servers": "servers add URL [--name N] | list | remove ID: the servers in the store",
    "proxies": "proxies add URL [--password-file F] | list | remove ID: the proxies",
    "keys": "keys add NAME [--models M ...] [--tokens-per-day N] [--weight W] [--priority "
            "P] | set ID [...] | list | remove ID | usage ID: client API keys",
    "apply": "apply FILE [--dry-run]: make the servers match a fleet file (FLEET_FILE)",
    "check": "try every server through its proxy now; exit 1 if any is down",
    "models": "models pull NAME [--servers ID ...]: pull a model on every server",
    "status": "status [--json]: the running balancer's fleet at a glance (asks IP:PORT)",
    "rotate-secret": "rotate-secret --new-key-file F: seal every stored secret anew",
}


def argument_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:<15} {text}" for name, text in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="ollamabalancer",
        usage="%(prog)s [COMMAND] [options]",
        description="A load balancer for Ollama servers. Every option can also be set by "
        "the environment variable named in its help.",
        epilog=f"commands:\n{commands}\n\n'%(prog)s COMMAND --help' shows a command's own "
        "words;\nthe options apply to every command (the store's, above all).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for env, flag, field, _, text in SETTINGS:
        parser.add_argument(flag, dest=field, metavar=env, help=f"{text} [env {env}]")
    parser.add_argument("--version", action="version", version=f"ollamabalancer {__version__}")
    return parser


# ---------------------------------------------------------------------------
# HTTP/1.1 parsing: sans-IO (RFC 9112)
# ---------------------------------------------------------------------------

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# field-value = *field-content; no CR, LF, NUL or other controls but HTAB (RFC 9110 5.5).
_FIELD_VALUE = rb"[\t\x20-\x7e\x80-\xff]*"
request_line_re = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e\x80-\xff]+) HTTP/(1\.[01])")
status_line_re = re.compile(rb"HTTP/(1\.[01]) ([0-9]{3})(?: (" + _FIELD_VALUE + rb"))?")
# No whitespace between name and colon (RFC 9112 5.1): "Host : x" is rejected.
field_line_re = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _FIELD_VALUE + rb")")
#: All the field lines after a start line at once, each led by its CRLF.
fields_block_re = re.compile(rb"(?:\r\n" + _TOKEN + rb":" + _FIELD_VALUE + rb")*")
# chunk-size in hex, optional extensions (ignored); at most 16 digits so it fits 64 bits.
chunk_size_re = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;" + _FIELD_VALUE + rb")?")
#: The same, with its CRLF: a chunk's whole size line, matched where it starts.
chunk_line_re = re.compile(chunk_size_re.pattern + rb"\r\n")


#: A JSON string (skipped whole, escapes and all) or one bracket.
_json_structure_re = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def decode_json(data: bytes | bytearray) -> Any:
    """``json.loads`` for bytes from a peer: ValueError for anything that is not JSON,
    including nesting deeper than MAX_JSON_DEPTH, which is refused before parsing."""
    # Fewer brackets than that cannot nest too deep (and scanning at exactly that many
    # finds nothing either, so mutation testing leaves the bound alone).
    if data.count(b"[") + data.count(b"{") > MAX_JSON_DEPTH:  # pragma: no mutate
        depth = 0
        for match in _json_structure_re.finditer(data):
            token = match.group()
            if token in (b"[", b"{"):
                depth += 1
                if depth > MAX_JSON_DEPTH:
                    raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
            elif token in (b"]", b"}"):
                depth -= 1
    try:
        return json.loads(data)
    except RecursionError:  # a backstop: the scan above stops this first
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None


class Headers:
    """Header fields in arrival order, names as sent; look-ups ignore case (through an
    index of lower-case names, built once). Read-only once made."""

    __slots__ = ("fields", "index")

    def __init__(self, fields: tuple[tuple[str, str], ...]) -> None:
        self.fields = fields
        index: dict[str, list[str]] = {}
        for key, value in fields:
            key = key.lower()
            if key in index:
                index[key].append(value)
            else:
                index[key] = [value]
        self.index = index

    def __repr__(self) -> str:
        return f"Headers({self.fields!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and other.fields == self.fields

    __hash__ = None  # type: ignore[assignment]

    def get(self, name: str) -> str | None:
        values = self.index.get(name.lower())
        return ", ".join(values) if values else None

    def get_all(self, name: str) -> Sequence[str]:
        return self.index.get(name.lower(), ())

    def tokens(self, name: str) -> list[str]:
        """A comma-separated list field as lower-case tokens (RFC 9110 5.6.1)."""
        values = self.index.get(name.lower())
        if values is None:
            return []
        return [token for value in values for token in (
            part.strip(" \t").lower() for part in value.split(",")) if token]


class RequestHead(NamedTuple):
    method: str
    target: str
    version: str
    headers: Headers


class ResponseHead(NamedTuple):
    version: str
    status: int
    reason: str
    headers: Headers


class Framing(NamedTuple):
    """How a body is delimited: no body, a length, chunked, or until the peer closes.
    (Heads and framings are named tuples: a frozen dataclass's __init__ costs a
    relayed request about 2 % of its CPU.)"""

    kind: Literal["none", "length", "chunked", "close"]
    length: int = 0


NO_BODY = Framing("none")


def _line_too_long(buf: bytearray, start: int, limit: int) -> bool:
    """Whether a line from ``start`` with no CRLF yet is past ``limit`` bytes for sure:
    one byte over is still fine if it is the CR, and the LF may follow."""
    size = len(buf) - start
    return size > limit + 1 or (size == limit + 1 and buf[-1] != 0x0D)


def _split_head(buf: bytearray, start_line_limit: int, *, request: bool) -> bytes | None:
    """Takes a complete head off the front of ``buf``, or returns None if more is needed."""
    if request:
        # RFC 9112 2.2: a server SHOULD ignore empty lines received before the request-line.
        while buf.startswith(b"\r\n"):
            del buf[:2]
    end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
    first_line_end = buf.find(b"\r\n", 0, start_line_limit + 2)
    if first_line_end == -1 and _line_too_long(buf, 0, start_line_limit):
        raise ProtocolError(414 if request else 502, "request line too long" if request
                            else "upstream status line too long")
    if end == -1:
        if len(buf) > MAX_HEAD:
            raise ProtocolError(431 if request else 502, "request head too large" if request
                                else "upstream response head too large")
        return None
    head = bytes(buf[:end])
    del buf[: end + 4]
    return head


def _parse_fields(block: bytes, status: int) -> Headers:
    """The field lines of a head, ``block`` being the bytes after its start line."""
    if not block:
        return Headers(())
    if fields_block_re.fullmatch(block) is not None:
        # Every line is valid: split them without a regex each.
        lines = block[2:].decode("latin-1").split("\r\n")
        if len(lines) > MAX_HEADERS:
            raise ProtocolError(status if status != 400 else 431, "too many header fields")
        return Headers(tuple((name, value.strip(" \t")) for name, _, value in (
            line.partition(":") for line in lines)))
    # Some line is not: find it, to say which.
    raw_lines = block[2:].split(b"\r\n")
    if len(raw_lines) > MAX_HEADERS:
        raise ProtocolError(status if status != 400 else 431, "too many header fields")
    for line in raw_lines:
        if line[:1] in (b" ", b"\t"):
            raise ProtocolError(status, "obsolete line folding in header")
        if field_line_re.fullmatch(line) is None:
            raise ProtocolError(status, f"malformed header line {line[:40]!r}")
    # Unreachable while the two expressions agree; its words are for whoever breaks that.
    raise AssertionError("fields_block_re and field_line_re disagree")  # pragma: no mutate


def maybe_request_head(buf: bytearray) -> RequestHead | None:
    """Parses one request head off ``buf``; None means "need more data".

    Raises ProtocolError for anything RFC 9112 does not allow. Bytes after the head are
    left in ``buf`` untouched.
    """
    raw = _split_head(buf, MAX_REQUEST_LINE, request=True)
    if raw is None:
        return None
    line_end = raw.find(b"\r\n")
    request_line, block = (raw, b"") if line_end == -1 else (raw[:line_end], raw[line_end:])
    match = request_line_re.fullmatch(request_line)  # its length: checked by _split_head
    if match is None:
        raise ProtocolError(400, "malformed request line")
    method, target, version = (part.decode("latin-1") for part in match.groups())
    headers = _parse_fields(block, 400)
    if not target.startswith("/"):
        # absolute-form is for proxies and asterisk-form for server-wide OPTIONS; this is
        # an origin server (RFC 9112 3.2).
        raise ProtocolError(400, "request target must be an absolute path")
    if version == "1.1" and len(headers.get_all("host")) != 1:
        raise ProtocolError(400, "an HTTP/1.1 request needs exactly one Host header")
    return RequestHead(method, target, "HTTP/" + version, headers)


def maybe_response_head(buf: bytearray) -> ResponseHead | None:
    """Parses one upstream response head off ``buf``; None means "need more data"."""
    raw = _split_head(buf, MAX_HEAD, request=False)
    if raw is None:
        return None
    line_end = raw.find(b"\r\n")
    status_line, block = (raw, b"") if line_end == -1 else (raw[:line_end], raw[line_end:])
    match = status_line_re.fullmatch(status_line)
    if match is None:
        raise ProtocolError(502, "malformed upstream status line")
    version, status, reason = match.groups()
    headers = _parse_fields(block, 502)
    return ResponseHead(
        "HTTP/" + version.decode(), int(status), (reason or b"").decode("latin-1"), headers
    )


def _content_length(headers: Headers, status: int) -> int | None:
    values = headers.get_all("content-length")
    if not values:
        return None
    if len(values) > 1:
        raise ProtocolError(status, "more than one Content-Length")
    value = values[0]
    # 1 to 18 ASCII digits (a regex would cost more, on every request).
    if not (value.isascii() and value.isdigit() and len(value) <= 18):
        raise ProtocolError(status, "malformed Content-Length")
    return int(value)


def request_framing(head: RequestHead) -> Framing:
    """The request body's framing (RFC 9112 6.3), refusing what could be read two ways."""
    codings = head.headers.tokens("transfer-encoding")
    if head.headers.get_all("transfer-encoding"):
        if head.headers.get_all("content-length"):
            raise ProtocolError(400, "Content-Length together with Transfer-Encoding")
        if head.version == "HTTP/1.0":
            raise ProtocolError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if not codings or codings[-1] != "chunked" or codings.count("chunked") > 1:
            if "chunked" in codings or not codings:
                raise ProtocolError(400, "chunked must be the last transfer coding, once")
            raise ProtocolError(501, f"unsupported Transfer-Encoding {', '.join(codings)}")
        if len(codings) > 1:
            raise ProtocolError(501, f"unsupported Transfer-Encoding {', '.join(codings)}")
        return Framing("chunked")
    length = _content_length(head.headers, 400)
    return Framing("length", length) if length else NO_BODY


def response_framing(head: ResponseHead, request_method: str) -> Framing:
    """The upstream response body's framing (RFC 9112 6.3)."""
    if request_method == "HEAD" or head.status < 200 or head.status in (204, 304):
        return NO_BODY
    if head.headers.get_all("transfer-encoding"):
        if head.headers.get_all("content-length"):
            raise ProtocolError(502, "upstream sent Content-Length with Transfer-Encoding")
        codings = head.headers.tokens("transfer-encoding")
        if codings == ["chunked"]:
            return Framing("chunked")
        return Framing("close")
    length = _content_length(head.headers, 502)
    if length is None:
        return Framing("close")
    return Framing("length", length) if length else NO_BODY


class EndOfBody:
    """Returned by the chunked decoder once the last chunk and trailers are read."""


END_OF_BODY = EndOfBody()


class ChunkedScanner:
    """Finds where a chunked body ends without taking it apart (RFC 9112 7.1), sans-IO,
    so that a relay can pass one on as it came: chunk sizes, extensions and data go
    through untouched, and the trailer section is checked and dropped.

    ``take(buf)`` removes from ``buf`` the bytes it has checked and returns them, whether
    the body ended (the caller then sends the last chunk itself), and where chunk data
    lies in what it returned (for a caller that wants the last of it). Bytes of an
    incomplete chunk-size line stay in ``buf`` for the next call.
    """

    __slots__ = ("_remaining", "_state", "_trailer_bytes", "error_status")

    def __init__(self, error_status: int = 502) -> None:
        # Mutation testing leaves the next two be: any state but "data", "crlf" and
        # "trailer" reads a size line, which sets the count before it is read.
        self._state: Literal["size", "data", "crlf", "trailer"] = "size"  # pragma: no mutate
        self._remaining = 0  # pragma: no mutate
        self._trailer_bytes = 0
        self.error_status = error_status  # 400 for a client's body, 502 for a server's

    def take(self, buf: bytearray, max_chunks: int = 0
             ) -> tuple[bytes, bool, list[tuple[int, int]]]:
        """``max_chunks``, when given, stops it after that many whole chunks, so that a
        body of tiny chunks is taken a slice per call (see iter_body)."""
        state = self._state
        if state == "trailer":
            return b"", self._trailer(buf), []
        if state == "size":
            # The common case first: the buffer is one whole chunk (a token of a stream).
            match = chunk_line_re.match(buf, 0, MAX_CHUNK_LINE + 2)
            if match is not None:
                start = match.end()
                stop = start + int(match.group(1), 16)
                if stop > start and len(buf) == stop + 2 and buf.endswith(b"\r\n"):
                    checked = bytes(buf)
                    buf.clear()
                    return checked, False, [(start, stop)]
        pos, remaining = 0, self._remaining
        data: list[tuple[int, int]] = []
        end = len(buf)
        chunks_left = max_chunks or math.inf
        ended = False  # pragma: no mutate (None is as false)
        size_line = chunk_line_re.match
        while True:
            if state == "data":
                # The whole rest of the chunk and its CRLF at once; without this shortcut the
                # lines below take the same bytes in two steps (pragma).
                if end - pos >= remaining + 2:  # pragma: no mutate
                    if remaining:
                        data.append((pos, pos + remaining))
                    pos += remaining
                    if buf[pos] != 0x0D or buf[pos + 1] != 0x0A:
                        raise ProtocolError(self.error_status, "chunk data not followed by CRLF")
                    pos += 2
                    # Mutation testing leaves these be: a size line comes next whatever the
                    # state says but "data" or "crlf", and it sets the count.
                    remaining = 0  # pragma: no mutate
                    state = "size"  # pragma: no mutate
                    chunks_left -= 1
                    if not chunks_left:
                        break
                    continue
                n = min(remaining, end - pos)
                if n:
                    data.append((pos, pos + n))
                pos += n
                remaining -= n
                if remaining:
                    break
                state = "crlf"
            elif state == "crlf":
                # Mutation testing leaves this be: with both bytes there, the wait below
                # would end at the next byte, which a chunked body always has.
                if end - pos < 2:  # pragma: no mutate
                    if end > pos and buf[pos] != 0x0D:
                        raise ProtocolError(self.error_status,
                                            "chunk data not followed by CRLF")
                    break
                if buf[pos] != 0x0D or buf[pos + 1] != 0x0A:
                    raise ProtocolError(self.error_status, "chunk data not followed by CRLF")
                pos += 2  # pragma: no mutate (a take() that gets here starts at 0)
                state = "size"  # pragma: no mutate (as above)
            else:
                match = size_line(buf, pos, pos + MAX_CHUNK_LINE + 2)
                if match is None:  # incomplete, or bad: the line decides
                    line_end = buf.find(b"\r\n", pos, pos + MAX_CHUNK_LINE + 2)
                    if line_end == -1:
                        if _line_too_long(buf, pos, MAX_CHUNK_LINE):
                            raise ProtocolError(self.error_status, "chunk size line too long")
                        break
                    raise ProtocolError(self.error_status, "malformed chunk size")
                line_end = match.end() - 2
                remaining = int(match.group(1), 16)
                if not remaining:  # the last chunk: drop its line, then the trailers
                    ended = True
                    break
                pos = line_end + 2
                state = "data"
        checked = bytes(buf[:pos])
        if ended:
            del buf[:line_end + 2]
            self._state = "trailer"
            return checked, self._trailer(buf), data
        del buf[:pos]
        self._state, self._remaining = state, remaining
        return checked, False, data

    @property
    def at_boundary(self) -> bool:
        """Whether what it returned so far ends where a chunk ends."""
        return self._state == "size"

    def _trailer(self, buf: bytearray) -> bool:
        """Checks and drops trailer lines; True once the empty line that ends them came."""
        while True:
            # A line near these bounds is refused either way, a byte sooner or later, for
            # the same reason (mutation testing leaves them be).
            line_end = buf.find(b"\r\n", 0, MAX_HEAD + 2)  # pragma: no mutate
            if line_end == -1:
                if len(buf) > MAX_HEAD:  # pragma: no mutate
                    raise ProtocolError(self.error_status, "trailer section too large")
                return False
            line = bytes(buf[:line_end])
            del buf[:line_end + 2]
            if not line:
                return True
            self._trailer_bytes += len(line) + 2
            if self._trailer_bytes > MAX_HEAD:
                raise ProtocolError(self.error_status, "trailer section too large")
            _parse_fields(b"\r\n" + line, self.error_status)  # validated, then dropped


class ChunkedDecoder:
    """Decodes ``Transfer-Encoding: chunked`` from a buffer, sans-IO: the chunk data that
    ChunkedScanner finds, taken out of the framing.

    ``next_event(buf)`` consumes bytes from ``buf`` and returns body bytes, END_OF_BODY,
    or None when it needs more data.
    """

    __slots__ = ("_ended", "_scanner")

    def __init__(self, error_status: int = 400) -> None:
        self._scanner = ChunkedScanner(error_status)
        self._ended = False  # pragma: no mutate (None is as false)

    def next_event(self, buf: bytearray, max_chunks: int = 0) -> bytes | EndOfBody | None:
        if self._ended:
            return END_OF_BODY
        checked, self._ended, spans = self._scanner.take(buf, max_chunks)
        if spans:
            return b"".join(checked[start:stop] for start, stop in spans)
        return END_OF_BODY if self._ended else None


def has_dot_dot_segment(path: str) -> bool:
    """True if any path segment is ``..``, also once percent-decoded (``%2e%2e``, ``..%2f``)."""
    if ".." not in path and "%" not in path:
        return False
    return ".." in re.split(r"[/\\]", urllib.parse.unquote(path))


# ---------------------------------------------------------------------------
# Serialization
# ---------------------------------------------------------------------------


def reason_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def render_head(
    start_line: str, headers: Iterable[tuple[str, str]]
) -> bytes:
    lines = [start_line]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


#: What a header value may hold as it is: printable ASCII but "%", which escapes the rest.
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def header_text(text: str) -> str:
    """Any text as a header value: control and non-ASCII characters percent-encoded."""
    return urllib.parse.quote(text, safe=_HEADER_SAFE)


def chunk(data: bytes | bytearray | memoryview) -> list[bytes | bytearray | memoryview]:
    """One chunk of a chunked body, as pieces for writelines (no copy of ``data``)."""
    return [b"%x\r\n" % len(data), data, b"\r\n"]


LAST_CHUNK = b"0\r\n\r\n"


@dataclasses.dataclass
class Response:
    """A whole response, body in memory."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: Sequence[tuple[str, str]] = ()
    close: bool = False


def json_response(status: int, payload: Any, **kwargs: Any) -> Response:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(status, body, **kwargs)


#: Ollama's answer for a model it does not have: "model 'x' not found" (and, in older
#: releases, 'model "x" not found, try pulling it first').
MODEL_NOT_FOUND = re.compile(r"""model (['"]).*\1 not found""")
#: How Ollama says a model's runner died under a request (llm/llama_server.go; "llama
#: runner process has terminated" in older versions): a 500 worth another server.
RUNNER_FAILED = re.compile(r"(runner|llama-server)( process)? (has terminated|no longer "
                           r"running|has unexpectedly stopped)|error was encountered while "
                           r"running the model")


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``...), for a log
    line: a name a client or a server chose cannot forge another line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def error_response(status: int, message: str, *, path: str = "", **kwargs: Any) -> Response:
    """An error in the shape its API uses: Ollama's ``{"error": "..."}``, OpenAI's under
    /v1, Anthropic's on /v1/messages."""
    return json_response(status, error_payload(status, message, path), **kwargs)


def error_payload(status: int, message: str, path: str = "") -> Any:
    if path.startswith("/v1/messages"):
        kind = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
                503: "overloaded_error"}.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    if path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)
        if status == 404 and MODEL_NOT_FOUND.match(message):
            code = "model_not_found"  # not for an endpoint an older Ollama lacks
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return {"error": message}


def text_response(status: int, text: str) -> Response:
    return Response(status, text.encode(), "text/plain; charset=utf-8")


# ---------------------------------------------------------------------------
# Stream I/O
# ---------------------------------------------------------------------------


class Wire(asyncio.Protocol):
    """One TCP connection as an asyncio protocol, with flow control both ways.

    Received bytes gather in ``buf``, where the sans-IO parsers read them; past
    BUFFER_HIGH unread bytes the socket stops being read until the owner takes some.
    Writes go straight to the transport, and ``drain`` waits only while the transport
    has asked to pause (its buffer is over the high-water mark). ``on_gone`` is called
    once the peer has finished sending or the connection is lost, whoever is waiting;
    ``on_writable`` when a paused transport can take writes again.

    Two ways to read: ``fill`` waits for the next bytes (a task wakes per arrival), and
    ``pump`` hands each arrival to a callback right in ``data_received``, which is how
    a response body streams through with no task switch per chunk.
    """

    def __init__(self, on_made: Callable[[Wire], None] | None = None) -> None:
        self.buf = bytearray()
        self.peer = "unix"
        self.transport: asyncio.Transport | None = None
        # Its event loop, kept: each asyncio.get_running_loop() is a getpid() system call.
        self.loop = asyncio.get_running_loop()
        self.eof = False  # nothing more will arrive: the peer half-closed, or it is gone
        self.lost = False
        self.on_gone: Callable[[], None] | None = None
        self.on_writable: Callable[[], None] | None = None
        self._on_made = on_made
        self._reader: asyncio.Future[None] | None = None  # fill() or pump() waiting
        self._consume: Callable[[bool], bool] | None = None  # pump()'s callback
        self._timeout = 0.0  # pump()'s limit between arrivals
        self._deadline = 0.0  # when that wait times out
        self._timer: asyncio.TimerHandle | None = None  # fires at or before the deadline
        self._writable: asyncio.Future[None] | None = None  # drain() waiting
        self._write_paused = False
        self._read_paused = False
        #: Bytes written since mark(), and when the first of them was (monotonic): what
        #: a client was sent of one response, for the access log and the metrics.
        self.sent = 0
        self.first_sent: float | None = None

    # -- asyncio.Protocol callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = peer[0]
        if self._on_made is not None:
            self._on_made(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self._consume is not None:
            self._deadline = self.loop.time() + self._timeout
            self._feed(False)
            return
        if len(self.buf) > BUFFER_HIGH:
            self.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        self._feed(True) if self._consume is not None else self._wake_reader()
        self._gone()
        return True  # keep the transport open: a response may still be written

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = self.lost = True
        self._feed(True) if self._consume is not None else self._wake_reader()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("connection lost"))
        self._gone()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.on_writable:
            self.on_writable()

    def _wake_reader(self) -> None:
        waiter, self._reader = self._reader, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _gone(self) -> None:
        callback, self.on_gone = self.on_gone, None
        if callback is not None:
            callback()

    def _feed(self, eof: bool) -> None:
        """Hands the buffer to pump()'s callback; wakes pump() once it is done or fails."""
        consume = self._consume
        assert consume is not None
        try:
            if not consume(eof):
                return
            outcome: BaseException | None = None
        except Exception as exc:
            outcome = exc
        self._consume = None
        waiter, self._reader = self._reader, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None) if outcome is None else waiter.set_exception(outcome)

    # -- what the owner calls ---------------------------------------------------------

    async def fill(self, timeout: float) -> bool:
        """Waits for more bytes in ``buf``; False at end of stream, TimeoutError after
        ``timeout`` seconds without any."""
        self.resume_reading()
        if self.eof:
            return False
        size = len(self.buf)
        await self._wait(timeout)
        return len(self.buf) > size

    async def pump(self, consume: Callable[[bool], bool], timeout: float) -> None:
        """Calls ``consume(eof)`` for the bytes in ``buf`` now and again as more arrive,
        until it returns True (it has what it wanted). ``eof`` says nothing more will
        come: it must then return True or raise. Raises what ``consume`` raises, and
        TimeoutError after ``timeout`` seconds without a byte."""
        if consume(self.eof):
            return
        self.resume_reading()
        self._consume, self._timeout = consume, timeout
        try:
            await self._wait(timeout)
        finally:
            self._consume = None

    async def _wait(self, timeout: float) -> None:
        loop = self.loop
        waiter = self._reader = loop.create_future()
        self._deadline = deadline = loop.time() + timeout
        # Most reads finish long before their timeout, so rather than a timer per read,
        # each connection keeps one, moved earlier when needed and later when it fires.
        if self._timer is None or self._timer.when() > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(deadline, self._time_out)
        try:
            await waiter
        finally:
            self._reader = None

    @property
    def backed_up(self) -> bool:
        """The transport holds more unsent bytes than it likes (drain() would wait)."""
        return self._write_paused

    def pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()

    def _time_out(self) -> None:
        self._timer = None
        waiter = self._reader
        if waiter is None or waiter.done():
            return  # nobody waits: the next read arms a timer again
        loop = self.loop
        if loop.time() >= self._deadline:
            self._reader = self._consume = None
            waiter.set_exception(TimeoutError())
        else:
            self._timer = loop.call_at(self._deadline, self._time_out)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self.transport is not None
        if self.first_sent is None:
            self.first_sent = time.monotonic()
        self.sent += len(data)
        self.transport.write(data)

    def writelines(self, pieces: Iterable[bytes | bytearray | memoryview]) -> None:
        """Writes the pieces as one: one send, one packet (uvloop's own writelines costs
        a call into the transport per piece)."""
        assert self.transport is not None
        data = b"".join(pieces)
        if self.first_sent is None:
            self.first_sent = time.monotonic()
        self.sent += len(data)
        self.transport.write(data)

    def mark(self) -> None:
        """Starts counting what is written (``sent``, ``first_sent``) from nothing."""
        self.sent, self.first_sent = 0, None

    async def drain(self) -> None:
        """Returns at once unless the transport asked to pause; raises ConnectionError
        once the connection is gone."""
        if self.lost or (self.transport is not None and self.transport.is_closing()):
            raise ConnectionResetError("connection lost")
        if self._write_paused:
            waiter = self._writable = self.loop.create_future()
            await waiter

    def abort(self) -> None:
        """Drops the connection at once (RST), so the peer stops whatever it was doing."""
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Closes once what was written has been sent."""
        if self.transport is not None:
            self.transport.close()

    @property
    def usable(self) -> bool:
        return not (self.eof or self.transport is None or self.transport.is_closing())

    async def first_byte(self, timeout: float) -> bytes:
        """The first byte the peer sends, peeked at and left unread (the connection must
        not be read yet: pause_reading() from connection_made); b"" if it closed.
        TimeoutError after ``timeout`` seconds without one."""
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        peeker = socket.socket(fileno=os.dup(sock.fileno()))
        peeker.setblocking(False)
        ready: asyncio.Future[None] = self.loop.create_future()
        fd = peeker.fileno()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        self.loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(ready, timeout)
            return peeker.recv(1, socket.MSG_PEEK)
        finally:
            self.loop.remove_reader(fd)
            peeker.close()

    async def start_tls(self, context: ssl.SSLContext, timeout: float) -> None:
        """Makes the connection TLS, this side the server (after first_byte())."""
        assert self.transport is not None
        transport = await self.loop.start_tls(self.transport, self, context,
                                              server_side=True, ssl_handshake_timeout=timeout)
        assert transport is not None
        self.transport = transport  # an SSL transport
        self._read_paused = False  # the TLS transport reads


async def read_head(
    wire: Wire,
    parse: Callable[[bytearray], T | None],
    deadline: float,
) -> T | None:
    """Reads until ``parse`` returns a head; None if the peer closed before any byte."""
    loop = wire.loop
    while True:
        head = parse(wire.buf)
        if head is not None:
            return head
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError
        had_bytes = bool(wire.buf)
        if not await wire.fill(remaining):
            if had_bytes:
                raise IncompleteBody("connection closed in the middle of a head")
            return None


async def iter_body(wire: Wire, framing: Framing, timeout: float, error_status: int,
                    min_rate: float = 0.0, started: float | None = None
                    ) -> AsyncIterator[bytes]:
    """Yields a body's bytes as they arrive, leaving whatever follows it in ``wire.buf``.

    ``timeout`` bounds each wait for bytes; with ``min_rate`` it bounds the whole body
    instead, extended by a second per ``min_rate`` bytes received (TimeoutError when it
    is over), counted from ``started`` when given. Raises IncompleteBody if the peer
    closes early.
    """
    buf = wire.buf
    loop = wire.loop
    deadline = (loop.time() if started is None else started) + timeout
    received = 0

    async def more() -> bool:
        if not min_rate:
            return await wire.fill(timeout)
        remaining = deadline + received / min_rate - loop.time()
        if remaining <= 0:
            raise TimeoutError
        return await wire.fill(remaining)

    # Whoever takes a piece may wait (a relay, on its upstream's drain) while more bytes
    # arrive: the buffer is looked at again after each piece, before any wait for more.
    if framing.kind == "length":
        remaining = framing.length
        while remaining:
            if not buf and not await more():
                raise IncompleteBody(f"connection closed with {remaining} body bytes missing")
            # All of it in one copy; "<" would take the same bytes the other way (pragma).
            if len(buf) <= remaining:  # pragma: no mutate
                data = bytes(buf)
                buf.clear()
            else:
                data = bytes(buf[:remaining])
                del buf[:remaining]
            remaining -= len(data)
            received += len(data)
            yield data
    elif framing.kind == "chunked":
        decoder = ChunkedDecoder(error_status)
        while True:
            event = decoder.next_event(buf, CHUNKED_SLICE)
            if event is END_OF_BODY:
                return
            if isinstance(event, bytes):
                if event:
                    received += len(event)
                    yield event
                if buf:
                    await asyncio.sleep(0)  # the rest next turn: other connections first
            elif not await more():
                raise IncompleteBody("connection closed in the middle of a chunked body")
    elif framing.kind == "close":
        while buf or await more():
            data = bytes(buf)
            buf.clear()
            received += len(data)
            yield data


class ByteBudget:
    """Bytes the process may hold for one purpose at once (MAX_BUFFERED_BODIES)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


class ReplayableBody:
    """A request body that can be sent again while what was read of it fits REPLAY_LIMIT.

    Iterating it a second time yields the kept bytes, then goes on with the source.
    """

    def __init__(self, source: AsyncIterator[bytes] | None,
                 kept: bytes | bytearray = b"",
                 hold: Callable[[int], bool] | None = None) -> None:
        self._source = source
        self._kept: list[bytes | bytearray] = [kept] if kept else []
        self._kept_size = len(kept)
        #: Asks for room for bytes to keep (MAX_BUFFERED_BODIES); refused, none is kept.
        self._hold = hold
        self.replayable = True

    @classmethod
    def of(cls, data: bytes | bytearray) -> ReplayableBody:
        """A body already in memory: it can always be sent again."""
        return cls(None, data)

    @property
    def size(self) -> int:
        """Bytes kept: the whole body for one made with ``of``."""
        return self._kept_size

    def small(self) -> bytes | bytearray | None:
        """The whole body when it is in memory and goes in one write, else None."""
        if self._source is not None or self._kept_size > SEND_SLICE:
            return None
        return self._kept[0] if self._kept else b""

    async def chunks(self) -> AsyncIterator[bytes | memoryview]:
        for kept in self._kept:
            # Views a slice at a time: a large body is not copied whole into the
            # transport's buffer, and the sender waits (drain) between slices.
            view = memoryview(kept)
            for start in range(0, len(view), SEND_SLICE):
                yield view[start:start + SEND_SLICE]
        if self._source is None:
            return
        async for piece in self._source:
            if self.replayable:
                if self._kept_size + len(piece) <= REPLAY_LIMIT and (
                        self._hold is None or self._hold(len(piece))):
                    self._kept.append(piece)
                    self._kept_size += len(piece)
                else:
                    self.replayable = False  # pragma: no mutate (None: as false)
                    self._kept.clear()
                    self._kept_size = 0
            yield piece
        self._source = None


# ---------------------------------------------------------------------------
# Upstream connectors: direct, HTTP CONNECT, SOCKS
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Proxy:
    id: int
    name: str
    ip: str
    port: int
    protocol: str
    status: bool
    user_name: str | None
    password: str | None = dataclasses.field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ip": self.ip,
            "port": self.port,
            "protocol": self.protocol,
            "name": self.name,
            "status": self.status,
            "userName": self.user_name,
            "hasPassword": bool(self.password),
        }

    @property
    def label(self) -> str:
        return f"proxy {self.name!r} ({self.protocol}://{self.ip}:{self.port})"


def _expiry(value: Any) -> float:
    """An /api/ps ``expires_at`` (RFC 3339, nanoseconds and all) as a Unix time; infinity
    when it cannot be read."""
    if not isinstance(value, str):
        return math.inf
    match = re.fullmatch(r"(.{19})(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", value)
    if match is None:
        return math.inf
    try:
        stamp = datetime.datetime.fromisoformat(
            match[1] + (match[3] if match[3] != "Z" else "+00:00"))
    except ValueError:
        return math.inf
    return stamp.timestamp() + float("0." + (match[2] or "0"))


#: What processes share of a server's Learned: models seen loaded at once, evictions,
#: requests of one model seen running at once, waits seen for a slot, VRAM seen in use,
#: VRAM it could not hold (0: none seen).
Figures = tuple[int, int, int, int, int, int]


def merge_figures(a: Figures, b: Figures) -> Figures:
    """What two processes learned of one server, together: whatever either saw counts,
    never forgotten because the other saw less. The most of each, but waits go with the
    most requests seen running at once (waits behind fewer say nothing of the limit), and
    the least VRAM seen to run out."""
    parallel, waited = max((a[2], a[3]), (b[2], b[3]))
    limits = [x for x in (a[5], b[5]) if x]
    return (max(a[0], b[0]), max(a[1], b[1]), parallel, waited, max(a[4], b[4]),
            min(limits, default=0))


def parse_figures(text: Any) -> Figures | None:
    """Figures as the store holds them (a JSON list of six counts), None if they are not."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    if not (isinstance(value, list) and len(value) == 6 and all(
            type(x) is int and 0 <= x <= most for x, most in zip(value, FIGURE_LIMITS,
                                                                 strict=True))):
        return None
    return (value[0], value[1], value[2], value[3], value[4], value[5])


@dataclasses.dataclass(eq=False)
class Learned:
    """What a server has shown of its Ollama settings, where nobody said them (the
    settings NUM_PARALLEL and MAX_LOADED_MODELS, or the server's own numParallel and
    maxLoadedModels, win over it).

    Models it keeps loaded (OLLAMA_MAX_LOADED_MODELS): the most /api/ps has listed at
    once, which is a floor until an eviction is seen (a model gone from /api/ps before its
    keep-alive ran out while another came in); from then on it is the limit. Requests one
    loaded model runs at once (OLLAMA_NUM_PARALLEL): the most streamed answers of one model
    seen producing tokens at once, which is a floor until requests are seen waiting for
    that many to finish (sent while they ran, first token only after one of them ended,
    having waited a while for that, and sooner after that end than before it): then it
    is the limit. Memory: the
    most VRAM its loaded models took at once, and, from an eviction that the count does
    not explain, how much it could not hold.
    """

    resident_seen: int = 0
    evictions: int = 0
    parallel_seen: int = 0
    waited: int = 0  # requests seen waiting for a slot while parallel_seen ran
    vram_seen: int = 0
    vram_limit: int | None = None  # bytes it could not hold, from an eviction
    #: The last /api/ps: each model's size_vram and when its keep-alive runs out.
    ps: dict[str, tuple[int, float]] | None = None
    generating: dict[str, int] = dataclasses.field(default_factory=dict)
    finished: dict[str, float] = dataclasses.field(default_factory=dict)  # monotonic
    checking: bool = False  # an /api/ps read after a cold load is under way
    #: A rise of parallel_seen by model, (count, when), until HANDOFF has passed: an
    #: answer's first token can be read just before the end of the one whose slot it
    #: took (Ollama starts the next request as one ends), which is no overlap.
    rising: dict[str, tuple[int, float]] = dataclasses.field(default_factory=dict)

    #: Requests seen waiting for a slot before the parallel limit counts as known, and
    #: the least wait that counts (shorter ones are as likely a long prompt's reading,
    #: which an answer that ends meanwhile does not explain).
    SURE_AFTER: ClassVar[int] = 3
    LONG_WAIT: ClassVar[float] = 0.1
    HANDOFF: ClassVar[float] = 0.05

    def resident(self, usual: int | None = None, shown: int = 0) -> tuple[int, str]:
        """Models it keeps loaded at once, and where that figure comes from: "learned"
        (an eviction showed it), "fleet" (the limit the fleet's other servers showed,
        ``usual``, as most fleets are alike), or "guessed": as many as it or another
        server of its fleet has shown (``shown``), and 2 before any has shown two. A load
        past the guess ranks as one that evicts, taken only where a load that must evict
        pays, so a new fleet explores its limit once, where it has to, rather than every
        server loading one model too many at once (and each of them evicting one that a
        request then loads again elsewhere)."""
        if self.evictions:
            return max(1, self.resident_seen), "learned"
        if usual is not None:
            return max(self.resident_seen, usual), "fleet"
        return max(self.resident_seen, shown, GUESSED_MAX_LOADED_MODELS), "guessed"

    def parallel(self, usual: int | None = None) -> tuple[int, str]:
        """Requests one loaded model runs at once, and where that figure comes from, as
        resident(). A guess is one more than seen (and 2 before two are seen), so that one
        more is tried: it runs at once, or it waits and shows the limit. A request that
        waits behind one costs less than a cold load elsewhere, the mistake a guess of 1
        would make. Waits that agree with the fleet's usual limit make it known sooner."""
        seen = self.parallel_seen
        if self.waited >= (1 if usual == seen else self.SURE_AFTER):
            return max(1, seen), "learned"
        if usual is not None:
            return max(seen, usual), "fleet"
        return max(GUESSED_NUM_PARALLEL, seen + 1), "guessed"

    def known(self) -> tuple[int | None, int | None]:
        """Its models kept loaded and parallel limit, each where it showed it (no help
        from the fleet's usual ones), else None: what the fleet's usual ones come from."""
        return (max(1, self.resident_seen) if self.evictions else None,
                max(1, self.parallel_seen) if self.waited >= self.SURE_AFTER else None)

    def from_ps(self, running: Sequence[dict[str, Any]], now: float,
                sizes: dict[str, int] | None = None) -> None:
        """Learns from an /api/ps answer read at Unix time ``now``; the models' sizes in
        memory go into ``sizes`` too (the fleet's, by model)."""
        current = {}
        for entry in running:
            size = entry.get("size_vram")
            current[canonical_model(str(entry.get("name") or entry.get("model") or ""))] = (
                size if isinstance(size, int) and size > 0 else 0,
                _expiry(entry.get("expires_at")))
        if sizes is not None:
            sizes.update((m, size) for m, (size, _) in current.items() if size)
        self.resident_seen = max(self.resident_seen, len(current))
        in_use = sum(size for size, _ in current.values())
        self.vram_seen = max(self.vram_seen, in_use)
        before, self.ps = self.ps, current
        if before is None:
            return
        kept = [m for m, (_, expires) in before.items() if expires > now]  # not expired
        came = [m for m in current if m not in before]
        if came and any(m not in current for m in kept):
            # Unloaded early to make room for what came: an eviction.
            self.evictions += 1
            if len(kept) < self.resident_seen and all(current[m][0] for m in came):
                # Fewer than it has held at once: memory, not the count, was short.
                short = sum(before[m][0] for m in kept) + sum(current[m][0] for m in came)
                if short and (self.vram_limit is None or short < self.vram_limit):
                    self.vram_limit = short

    def first_token(self, model: str, ahead: int, sent: float, now: float) -> None:
        """A streamed answer of ``model`` began producing tokens at ``now`` (monotonic);
        its request went at ``sent``, when ``ahead`` of that model's answers were under
        way on this server."""
        self._settle(model, now)
        running = self.generating.get(model, 0) + 1
        self.generating[model] = running
        if running > self.parallel_seen:
            self.rising[model] = (running, now)  # a new floor, once no handoff
        ended = self.finished.get(model)
        if ahead and ahead >= self.parallel_seen and ended is not None and sent < ended:
            waited = ended - sent  # before a slot freed, then its own prompt after it
            if waited >= self.LONG_WAIT and now - ended < waited / 2:
                self.waited += 1

    def answered(self, model: str, now: float) -> None:
        """A streamed answer of ``model`` that had begun has ended (or was cut)."""
        rising = self.rising.get(model)
        if rising is not None and now - rising[1] < self.HANDOFF:
            del self.rising[model]  # it ended as the last one began: a handoff
        self._settle(model, now)
        left = self.generating.get(model, 1) - 1
        if left > 0:
            self.generating[model] = left
        else:
            self.generating.pop(model, None)
        self.finished[model] = now

    def _settle(self, model: str, now: float) -> None:
        """Makes a rise of parallel_seen that outlived HANDOFF the new floor (its limit
        not known: the waits seen before were for fewer)."""
        rising = self.rising.get(model)
        if rising is not None and now - rising[1] >= self.HANDOFF:
            del self.rising[model]
            if rising[0] > self.parallel_seen:
                self.parallel_seen, self.waited = rising[0], 0

    def figures(self) -> Figures:
        """What it shares with the other workers and instances (the store's ``learned``
        table): the waits only up to SURE_AFTER, past which more change nothing."""
        return (self.resident_seen, self.evictions, self.parallel_seen,
                min(self.waited, self.SURE_AFTER), self.vram_seen, self.vram_limit or 0)

    def absorb(self, figures: Figures) -> bool:
        """Takes in what other processes learned of the same server (merge_figures);
        whether that changed anything here."""
        mine = self.figures()
        merged = merge_figures(mine, figures)
        if merged == mine:
            return False
        (self.resident_seen, self.evictions, parallel, waited, self.vram_seen,
         limit) = merged
        if (parallel, waited) != (self.parallel_seen, min(self.waited, self.SURE_AFTER)):
            self.parallel_seen, self.waited = parallel, waited
        self.vram_limit = limit or None
        return True

    def to_json(self) -> dict[str, Any]:
        return {"maxLoadedModelsSeen": self.resident_seen, "evictions": self.evictions,
                "numParallelSeen": self.parallel_seen, "waitsForASlot": self.waited,
                "vramSeen": self.vram_seen, "vramLimit": self.vram_limit}


#: The most each shared figure can be: MAX_LOADED_MODELS's and NUM_PARALLEL's range, the
#: waits that make a limit known, a petabyte of VRAM. A stored row past them is not the
#: balancer's, and is no figures (parse_figures): it could make a server take thousands
#: of requests at once, or a guess count as known.
FIGURE_LIMITS: Figures = (1000, 1 << 40, 1000, Learned.SURE_AFTER, 1 << 50, 1 << 50)


@dataclasses.dataclass(eq=False)
class ServerLoad:
    """A server's live state, kept in memory and carried across reloads of its row."""

    inflight: int = 0
    by_model: dict[str, int] = dataclasses.field(default_factory=dict)
    #: Models resident on the GPU, with when each was last used (monotonic): /api/ps at the
    #: last check, plus those routed there since, less those Ollama will have evicted.
    loaded: dict[str, float] = dataclasses.field(default_factory=dict)
    running: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # /api/ps
    learned: Learned = dataclasses.field(default_factory=Learned)
    #: Models the balancer has sent a request for here: all that /api/ps is learned from
    #: (a server cannot claim models it was never asked to run, and skew the fleet's
    #: learned limits).
    asked: set[str] = dataclasses.field(default_factory=set)
    version: str | None = None
    version_read: float = -math.inf  # monotonic: when /api/version last answered
    # Circuit breaker: consecutive failures; open until a monotonic time; then half-open,
    # one probe request at a time (``probing`` while one holds a slot).
    failures: int = 0
    open_until: float = 0.0
    breaker_open: bool = False
    probing: int = 0
    #: What the last failure that counted was (Fleet.upstream_failed's kind): a circuit
    #: opened by failures to reach the server closes as soon as it answers again.
    failure_kind: str = ""
    # For the status page: counts, and [step, requests, errors] per HISTORY_STEP seconds
    # (monotonic), the newest last; steps with nothing in them are left out.
    requests: int = 0
    errors: int = 0
    history: collections.deque[list[int]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=HISTORY_POINTS))

    def tally(self, column: int) -> None:
        """Counts a request (column 1) or an error (column 2) in the current step."""
        step = int(time.monotonic() // HISTORY_STEP)
        history = self.history
        if not history or history[-1][0] != step:
            history.append([step, 0, 0])
        history[-1][column] += 1

    def recent(self, points: int = HISTORY_POINTS) -> list[list[int]]:
        """[requests, errors] in each of the last ``points`` steps, the oldest first."""
        return recent_history(self.history, points)

    def per_minute(self) -> tuple[int, int]:
        """Requests and errors in the last minute (whole steps, the current one too)."""
        return per_minute(self.recent(60 // HISTORY_STEP))

    def read_ps(self, payload: Any, sizes: dict[str, int] | None = None) -> None:
        """Takes an /api/ps answer: which models sit on the GPU (what it shows is learned
        from, and the models' sizes in memory go into ``sizes``)."""
        running = payload.get("models") if isinstance(payload, dict) else None
        if not isinstance(running, list):
            return
        self.running = [m for m in running if isinstance(m, dict)]
        now = time.monotonic()
        names = [canonical_model(str(m.get("name") or m.get("model") or ""))
                 for m in self.running]
        resident = {*names, *(m for m, n in self.by_model.items() if n)}
        self.loaded = {m: self.loaded.get(m, now) for m in resident}
        asked = self.asked
        self.learned.from_ps([m for m, name in zip(self.running, names, strict=True)
                              if name in asked], time.time(), sizes)

    def read_version(self, payload: Any) -> None:
        """Takes an /api/version answer."""
        version = payload.get("version") if isinstance(payload, dict) else None
        self.version = version if isinstance(version, str) else None
        self.version_read = time.monotonic()

    def unreachable(self) -> None:
        """What ran there is gone with it, or unknown: nothing counts as loaded but the
        models of requests still in flight."""
        self.running = []
        self.loaded = {m: t for m, t in self.loaded.items() if self.by_model.get(m)}


def recent_history(history: Iterable[Sequence[int]], points: int = HISTORY_POINTS
                   ) -> list[list[int]]:
    """[requests, errors] in each of the last ``points`` steps, the oldest first, from
    [step, requests, errors] entries; entries of one step (from several workers) add up.
    Steps count monotonic time, which every process of a host shares."""
    first = int(time.monotonic() // HISTORY_STEP) - points + 1
    counts = [[0, 0] for _ in range(points)]
    for step, requests, errors in history:
        if 0 <= step - first < points:
            counts[step - first][0] += requests
            counts[step - first][1] += errors
    return counts


def per_minute(points: Sequence[Sequence[int]]) -> tuple[int, int]:
    """Requests and errors in the last minute, of recent_history's points."""
    last = points[-(60 // HISTORY_STEP):]
    return sum(p[0] for p in last), sum(p[1] for p in last)


def canonical_model(name: str) -> str:
    """``llama3`` -> ``llama3:latest``: Ollama's default tag."""
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


@dataclasses.dataclass(eq=False)
class Server:
    id: int
    host: str
    port: int
    scheme: str = "http"
    name: str | None = None
    location: str | None = None
    runner: str | None = None
    enabled: bool = True
    #: Takes no new routed work (its running requests finish; it is still checked, and
    #: reachable by id): how an operator empties a server before maintenance.
    draining: bool = False
    proxy_id: int | None = None
    models: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    last_checked: datetime.datetime | None = None
    weight: float = 1.0
    max_concurrency: int | None = None  # None: the MAX_CONCURRENCY setting, or learned
    # Its OLLAMA_NUM_PARALLEL and OLLAMA_MAX_LOADED_MODELS, when given (else the settings
    # of the same names, else what the balancer learns: ServerLoad).
    num_parallel: int | None = None
    max_loaded_models: int | None = None
    #: Authorization header value for an Ollama behind an authenticating proxy; secret.
    authorization: str | None = dataclasses.field(default=None, repr=False)
    #: Its labels (zone, GPU class...): a request asking for labels goes only where all
    #: of them are (X-Server-Labels, an API key's labels).
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    owner: str | None = None  # "file": the fleet file made it, and only it changes it
    # Live state, kept in memory.
    reachable: bool = False
    last_error: str | None = None
    model_names: frozenset[str] = frozenset()
    load: ServerLoad = dataclasses.field(default_factory=ServerLoad)

    def __post_init__(self) -> None:
        self.set_models(self.models)

    def set_models(self, models: list[dict[str, Any]]) -> None:
        self.models = models
        self.model_names = frozenset(
            canonical_model(str(m.get("name") or m.get("model") or "")) for m in models
        )

    @functools.cached_property
    def authority(self) -> str:
        """host[:port] as a Host field names it (servers are replaced, never changed)."""
        default = 443 if self.scheme == "https" else 80
        host = format_host(self.host)
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def label(self) -> str:
        return self.name or f"{self.scheme}://{format_host(self.host)}:{self.port}"

    @functools.cached_property
    def answered_by(self) -> tuple[str, str]:
        """The header naming it on the answers it gives: its name, else its id (never its
        address), made once (a changed row is a new object)."""
        return ("X-Ollama-Server", header_text(self.name or str(self.id)))

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "host": self.host,
            "port": self.port,
            "scheme": self.scheme,
            "location": self.location,
            "runner": self.runner,
            "enabled": self.enabled,
            "draining": self.draining,
            "proxyId": self.proxy_id,
            "models": [m.get("name") or m.get("model") for m in self.models],
            "lastChecked": iso_time(self.last_checked),
            "reachable": self.reachable,
            "lastError": self.last_error,
            "weight": int(self.weight) if self.weight.is_integer() else self.weight,
            "maxConcurrency": self.max_concurrency,
            "numParallel": self.num_parallel,
            "maxLoadedModels": self.max_loaded_models,
            "labels": self.labels,
            "managedBy": self.owner,
            "hasAuthorization": bool(self.authorization),
            "inflight": self.load.inflight,
            "loadedModels": sorted(self.load.loaded),
            "circuitOpen": self.load.breaker_open,
        }


def server_credentials(server: Server) -> list[tuple[str, str]]:
    """The Authorization an Ollama behind an authenticating proxy wants, if any."""
    return [("Authorization", server.authorization)] if server.authorization else []


def format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def iso_time(value: datetime.datetime | None) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0, tzinfo=None)


def is_localhost(host: str) -> bool:
    """``localhost`` and the names under it, which are this host's loopback whatever the
    resolver says (RFC 6761 6.3; a minimal system may have no /etc/hosts at all)."""
    name = host.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost")


async def _open_tcp_socket(host: str, port: int) -> socket.socket:
    """A connected non-blocking socket, trying every address the name resolves to."""
    loop = asyncio.get_running_loop()
    infos: list[tuple[Any, ...]]
    if is_localhost(host):
        infos = [(socket.AF_INET, socket.SOCK_STREAM, 0, "", ("127.0.0.1", port)),
                 (socket.AF_INET6, socket.SOCK_STREAM, 0, "", ("::1", port))]
    else:
        infos = list(await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    last: OSError = OSError(f"cannot resolve {host}")
    for family, type_, proto, _, address in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    raise last


async def _http_connect(proxy: Proxy, host: str, port: int) -> socket.socket:
    """Opens a tunnel through an HTTP proxy with CONNECT (RFC 9110 9.3.6)."""
    loop = asyncio.get_running_loop()
    try:
        sock = await _open_tcp_socket(proxy.ip, proxy.port)
    except OSError as exc:
        raise UpstreamError(502, f"cannot connect to {proxy.label}: {exc}") from None
    try:
        authority = f"{format_host(host)}:{port}"
        headers = [("Host", authority)]
        if proxy.user_name:
            token = base64.b64encode(f"{proxy.user_name}:{proxy.password or ''}".encode())
            headers.append(("Proxy-Authorization", "Basic " + token.decode()))
        await loop.sock_sendall(sock, render_head(f"CONNECT {authority} HTTP/1.1", headers))
        buf = bytearray()
        while (head := maybe_response_head(buf)) is None:
            data = await loop.sock_recv(sock, 4096)
            if not data:
                raise UpstreamError(502, f"{proxy.label} closed the connection during CONNECT")
            buf += data
        if not 200 <= head.status < 300:
            raise UpstreamError(
                502, f"{proxy.label} refused CONNECT to {authority}: {head.status} {head.reason}"
            )
        if buf:
            raise UpstreamError(502, f"{proxy.label} sent data before the tunnel was used")
        return sock
    except ProtocolError as exc:
        sock.close()
        raise UpstreamError(502, f"{proxy.label} answered CONNECT badly: {exc.message}") from None
    except BaseException:
        sock.close()
        raise


async def _socks_connect(proxy: Proxy, host: str, port: int, timeout: float) -> socket.socket:
    try:
        from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
        from python_socks.async_.asyncio import Proxy as SocksProxy
    except ImportError:
        raise UpstreamError(
            502, str(MissingDependency("python-socks", f"{proxy.label}"))
        ) from None
    proxy_type = ProxyType.SOCKS4 if proxy.protocol == "socks4" else ProxyType.SOCKS5
    client = SocksProxy(
        proxy_type,
        proxy.ip,
        proxy.port,
        username=proxy.user_name or None,
        password=proxy.password if proxy.user_name else None,
        # socks5h and socks4a resolve the name at the proxy; socks5 resolves it here.
        rdns=proxy.protocol == "socks5h",
    )
    try:
        sock: socket.socket = await client.connect(host, port, timeout=timeout)
    except ProxyTimeoutError:
        raise UpstreamError(504, f"{proxy.label} timed out") from None
    except ProxyConnectionError as exc:
        raise UpstreamError(502, f"cannot connect to {proxy.label}: {exc}") from None
    except ProxyError as exc:
        raise UpstreamError(502, f"{proxy.label} refused {host}:{port}: {exc}") from None
    sock.setblocking(False)
    return sock


async def open_upstream(server: Server, proxy: Proxy | None, timeout: float) -> Wire:
    """Connects to ``server``, through ``proxy`` when given, TLS on top for https."""
    tls = ssl.create_default_context() if server.scheme == "https" else None
    hostname = server.host if tls else None
    where = f"{server.label}" + (f" through {proxy.label}" if proxy else "")

    async def connect() -> Wire:
        loop = asyncio.get_running_loop()
        if proxy is None:
            sock = await _open_tcp_socket(server.host, server.port)
        elif proxy.protocol == "http":
            sock = await _http_connect(proxy, server.host, server.port)
        else:
            sock = await _socks_connect(proxy, server.host, server.port, timeout)
        _, wire = await loop.create_connection(Wire, sock=sock, ssl=tls,
                                               server_hostname=hostname)
        return wire

    try:
        wire = await asyncio.wait_for(connect(), timeout)
    except TimeoutError:
        raise UpstreamError(504, f"timed out connecting to {where}") from None
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):  # ours, not the server's fault
            raise HTTPError(503, "the balancer is out of file descriptors; try again",
                            headers=[("Retry-After", "1")]) from None
        raise UpstreamError(502, f"cannot connect to {where}: {exc}") from None
    sock = wire.transport.get_extra_info("socket") if wire.transport else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return wire


PoolKey = tuple[str, str, int, tuple[Any, ...] | None]


def open_files_limit() -> int | None:
    """The soft limit on open files, or None when there is none (or no way to know)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


def pool_cap(file_limit: int | None) -> int:
    """Idle upstream connections the pool keeps at most: POOL_MAX_IDLE_TOTAL, or a tenth
    of the open-file limit when that is less."""
    if file_limit is None:
        return POOL_MAX_IDLE_TOTAL
    return max(1, min(POOL_MAX_IDLE_TOTAL, file_limit // 10))


class UpstreamPool:
    """Idle keep-alive connections, per server and proxy (credentials included, so a
    changed proxy never reuses a tunnel opened with the old one): POOL_MAX_IDLE per server
    and ``max_idle`` over all, the longest idle closed first past either."""

    def __init__(self, max_idle: int = POOL_MAX_IDLE_TOTAL) -> None:
        self._idle: dict[PoolKey, list[tuple[Wire, float]]] = {}
        self.max_idle = max_idle
        self._by_age: collections.OrderedDict[Wire, PoolKey] = collections.OrderedDict()

    @staticmethod
    def key(server: Server, proxy: Proxy | None) -> PoolKey:
        via = None
        if proxy is not None:
            via = (proxy.protocol, proxy.ip, proxy.port, proxy.user_name, proxy.password)
        return (server.scheme, server.host, server.port, via)

    def take(self, key: PoolKey) -> Wire | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            wire, since = idle.pop()
            del self._by_age[wire]
            if now - since < POOL_IDLE_SECONDS and wire.usable:
                return wire
            wire.abort()
        return None

    def put(self, key: PoolKey, wire: Wire) -> None:
        if wire.buf or not wire.usable:
            wire.abort()
            return
        idle = self._idle.setdefault(key, [])
        idle.append((wire, time.monotonic()))
        self._by_age[wire] = key
        if len(idle) > POOL_MAX_IDLE:
            self._drop(idle[0][0], key)
        if len(self._by_age) > self.max_idle:
            self._drop(*next(iter(self._by_age.items())))

    def _drop(self, wire: Wire, key: PoolKey) -> None:
        del self._by_age[wire]
        idle = self._idle[key]
        idle[:] = [entry for entry in idle if entry[0] is not wire]
        if not idle:
            del self._idle[key]
        wire.abort()

    def sweep(self) -> None:
        now = time.monotonic()
        for key, idle in list(self._idle.items()):
            for wire, since in list(idle):
                if not (now - since < POOL_IDLE_SECONDS and wire.usable):
                    self._drop(wire, key)

    def __len__(self) -> int:
        return len(self._by_age)

    def close(self) -> None:
        for wire in self._by_age:
            wire.abort()
        self._idle.clear()
        self._by_age.clear()


# ---------------------------------------------------------------------------
# Secrets at rest: HKDF-SHA256 keys, an HMAC-SHA256 keystream, encrypt-then-MAC
# ---------------------------------------------------------------------------

SECRET_PREFIX = "enc:v1:"
_NONCE_BYTES = 16
_TAG_BYTES = 32


class SecretError(Exception):
    """A stored secret failed its integrity check (tampered, or another key)."""


def b64url_encode(data: bytes) -> str:
    """base64url without padding (RFC 4648 section 5), as sealed values and salts are kept."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    """The inverse of b64url_encode; the decoder ignores padding past what it needs, so
    two "=" always restore it. Raises ValueError for text no encoding can produce."""
    return base64.urlsafe_b64decode(text + "==")


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF (RFC 5869) with SHA-256: extract, then expand to ``length`` bytes.

    An empty salt stands for 32 zero bytes (RFC 5869 section 2.2); HMAC pads its key with
    zeros, so passing the empty salt as it is computes exactly that.
    """
    if length > 255 * 32:
        raise ValueError("HKDF-SHA256 output is at most 8160 bytes")
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


class SecretBox:
    """Encrypts the secrets the balancer must store (proxy passwords, upstream
    credentials) with nothing but hashlib, hmac and secrets.

    Separate encryption and MAC keys come from the master key by HKDF. A value is
    XORed with HMAC-SHA256(enc_key, nonce || counter) blocks under a fresh 16-byte
    nonce, then HMAC-SHA256(mac_key, version || nonce || ciphertext) is appended and
    checked, in constant time, before anything is decrypted. Stored as
    ``enc:v1:<base64url(nonce || ciphertext || tag)>``.
    """

    VERSION = b"v1"

    def __init__(self, master_key: bytes) -> None:
        salt = b"ollamabalancer secrets"
        self._enc_key = hkdf_sha256(master_key, salt, b"encryption v1", 32)
        self._mac_key = hkdf_sha256(master_key, salt, b"authentication v1", 32)
        self._check_key = hkdf_sha256(master_key, salt, b"key check v1", 32)

    def _keystream(self, nonce: bytes, length: int) -> bytes:
        blocks = -(-length // 32)  # rounded up
        return b"".join(
            hmac.new(self._enc_key, nonce + counter.to_bytes(8, "big"), hashlib.sha256).digest()
            for counter in range(blocks)
        )[:length]

    @staticmethod
    def _xor(data: bytes, stream: bytes) -> bytes:
        return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(
            len(data), "big")

    def encrypt(self, plaintext: str) -> str:
        data = plaintext.encode()
        nonce = secrets.token_bytes(_NONCE_BYTES)
        ciphertext = self._xor(data, self._keystream(nonce, len(data)))
        tag = hmac.new(self._mac_key, self.VERSION + nonce + ciphertext, hashlib.sha256)
        return SECRET_PREFIX + b64url_encode(nonce + ciphertext + tag.digest())

    def decrypt(self, stored: str) -> str:
        if not is_encrypted(stored):
            raise SecretError("not an encrypted value")
        text = stored[len(SECRET_PREFIX):]
        if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
            raise SecretError("malformed encrypted value")
        try:
            raw = b64url_decode(text)
        except ValueError:  # binascii.Error: a length no base64 text can have
            raise SecretError("malformed encrypted value") from None
        if len(raw) < _NONCE_BYTES + _TAG_BYTES:
            raise SecretError("truncated encrypted value")
        nonce, ciphertext, tag = raw[:_NONCE_BYTES], raw[_NONCE_BYTES:-_TAG_BYTES], raw[
            -_TAG_BYTES:]
        expected = hmac.new(self._mac_key, self.VERSION + nonce + ciphertext,
                            hashlib.sha256).digest()
        if not hmac.compare_digest(tag, expected):
            raise SecretError("integrity check failed: tampered, or encrypted with another key")
        return self._xor(ciphertext, self._keystream(nonce, len(ciphertext))).decode()

    def check_value(self) -> str:
        """Stored with the data, so a wrong key is noticed at start, not as garbage."""
        return hmac.new(self._check_key, b"ollamabalancer key check", hashlib.sha256
                        ).hexdigest()[:32]


def is_encrypted(value: str | None) -> bool:
    return bool(value) and str(value).startswith(SECRET_PREFIX)


#: A key the balancer generated (or one as strong: 64 hex digits, 256 random bits) is used
#: as it is; anything else is a passphrase a person chose, stretched with scrypt first.
random_key_re = re.compile(r"[0-9a-fA-F]{64}")
#: scrypt's cost for a passphrase: N=2^16, r=8 takes 64 MiB and about 0.1-0.3 s, once at
#: start (RFC 7914; OWASP's floor is N=2^17 with r=8 for passwords checked per login,
#: where this runs once per process). Kept with the salt in the database, so it can grow.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**16, 8, 1
kdf_spec_re = re.compile(
    r"scrypt:n=([0-9]{1,10}),r=([0-9]{1,3}),p=([0-9]{1,3}):([A-Za-z0-9_-]{22,64})")


@dataclasses.dataclass(frozen=True)
class MasterKey:
    """The key the secrets at rest are sealed with, as the user gave it.

    ``origin`` names where it came from for messages (never the key itself); ``new_file``
    is set for a key generated just now, written there only once the database takes it.
    """

    secret: bytes = dataclasses.field(repr=False)
    origin: str
    new_file: str | None = None

    @property
    def random(self) -> bool:
        return random_key_re.fullmatch(self.secret.decode("latin-1")) is not None


def new_kdf_spec() -> str:
    salt = b64url_encode(secrets.token_bytes(16))
    return f"scrypt:n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}:{salt}"


def kdf_params(spec: str) -> tuple[int, int, int, bytes]:
    """scrypt's (N, r, p, salt) from a stored ``spec``, within what is sane to run: N a
    power of two up to 2^22 (512 MiB at r=1), r up to 64, p up to 16."""
    match = kdf_spec_re.fullmatch(spec)
    if match is None:
        raise ConfigError(f"the database holds an unknown key derivation {spec[:40]!r}")
    n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    try:
        salt = b64url_decode(match.group(4))
    except ValueError:  # a length no encoding gives: 4k + 1 characters
        raise ConfigError(f"the database holds an unknown key derivation {spec[:40]!r}"
                          ) from None
    if n < 2 or n.bit_count() != 1 or n > 2**22 or not 1 <= r <= 64 or not 1 <= p <= 16:
        raise ConfigError(f"the database holds unusable scrypt parameters {spec[:40]!r}")
    return n, r, p, salt


def stretch(passphrase: bytes, spec: str) -> bytes:
    """The 32-byte master key scrypt derives from a passphrase with a stored ``spec``."""
    n, r, p, salt = kdf_params(spec)
    # maxmem: what scrypt needs (128 r N p bytes) and room for its own use; more would
    # change nothing (pragma).
    return hashlib.scrypt(passphrase, salt=salt, n=n, r=r, p=p, dklen=32,
                          maxmem=128 * r * n * p + 2**24)  # pragma: no mutate


def sealing_box(master: MasterKey, spec: str | None) -> SecretBox:
    return SecretBox(master.secret if spec is None else stretch(master.secret, spec))


def new_sealing(master: MasterKey) -> tuple[SecretBox, str | None]:
    """The box for a key new to a database, and the key derivation to record with it:
    none for a random key, scrypt with a fresh salt for a passphrase."""
    spec = None if master.random else new_kdf_spec()
    return sealing_box(master, spec), spec


def load_master_key(config: Config) -> MasterKey:
    """SECRET_KEY, else SECRET_KEY_FILE, else the default key file (beside the SQLite
    database, or ./ollamabalancer.key for MySQL), else a new random key for that file.

    A key file others can read is refused, as ssh refuses such a private key.
    """
    if config.secret_key:
        if len(config.secret_key) < 16:
            raise ConfigError("SECRET_KEY must be at least 16 characters")
        return MasterKey(config.secret_key.encode(), "SECRET_KEY")
    path = config.secret_key_file or default_key_file(config)
    try:
        with open(path, encoding="utf-8") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            key = handle.read().strip()
    except FileNotFoundError:
        if config.secret_key_file:
            raise ConfigError(f"SECRET_KEY_FILE {path} does not exist") from None
        return MasterKey(secrets.token_hex(32).encode(), f"new key file {path}", path)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read the key file {path}: {reason}") from None
    if os.name == "posix" and mode & 0o077:
        raise ConfigError(f"the key file {path} can be read by other users: chmod 600 {path}")
    if len(key) < 16:
        raise ConfigError(f"the key in {path} is shorter than 16 characters")
    return MasterKey(key.encode(), f"key file {path}")


def default_key_file(config: Config) -> str:
    if config.db_engine == "sqlite":
        return config.db_path + ".key"
    return "ollamabalancer.key"


def write_key_file(path: str, key: bytes) -> None:
    """Writes a key to a new file only its owner can read; never over an existing one."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key + b"\n")


# ---------------------------------------------------------------------------
# Schema: the tables in SQLite and MySQL, and what migrations add to older ones
# ---------------------------------------------------------------------------

SERVER_COLUMNS = (
    "id, host, port, scheme, name, location, runner, enabled, proxy_id, models, last_checked,"
    " weight, max_concurrency, num_parallel, max_loaded_models, draining, labels, owner,"
    " upstream_auth"
)
KEY_COLUMNS = ("id, name, key_hash, requests_per_minute, max_concurrent, created_at, "
               "last_used_at, models, tokens_per_day, weight, priority, labels")
PROXY_COLUMNS = "id, name, ip, port, protocol, status, user_name, password"

# Columns added to SQLite databases made by earlier versions: (table, column, definition).
SQLITE_ADDED_COLUMNS = (
    ("ollamaServers", "weight", "REAL NOT NULL DEFAULT 1"),
    ("ollamaServers", "max_concurrency", "INTEGER"),
    ("ollamaServers", "upstream_auth", "TEXT"),
    ("ollamaServers", "num_parallel", "INTEGER"),
    ("ollamaServers", "max_loaded_models", "INTEGER"),
    ("ollamaServers", "draining", "INTEGER NOT NULL DEFAULT 0"),
    ("api_key", "models", "TEXT"),
    ("api_key", "tokens_per_day", "INTEGER"),
    ("api_key", "weight", "REAL NOT NULL DEFAULT 1"),
    ("api_key", "priority", "TEXT NOT NULL DEFAULT 'normal'"),
    ("ollamaServers", "labels", "TEXT"),
    ("api_key", "labels", "TEXT"),
    ("ollamaServers", "owner", "TEXT"),
)

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS ollamaServers (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  host TEXT NOT NULL,
  port INTEGER NOT NULL,
  scheme TEXT NOT NULL DEFAULT 'http',
  name TEXT,
  location TEXT,
  runner TEXT,
  enabled INTEGER NOT NULL DEFAULT 1,
  proxy_id INTEGER,
  models TEXT,
  last_checked TEXT,
  created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
  updated_at TEXT DEFAULT CURRENT_TIMESTAMP,
  weight REAL NOT NULL DEFAULT 1,
  max_concurrency INTEGER,
  upstream_auth TEXT,
  num_parallel INTEGER,
  max_loaded_models INTEGER,
  draining INTEGER NOT NULL DEFAULT 0,
  labels TEXT,
  owner TEXT,
  UNIQUE (host, port)
);
CREATE TABLE IF NOT EXISTS proxy (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL,
  ip TEXT NOT NULL,
  port INTEGER NOT NULL,
  user_name TEXT,
  password TEXT,
  protocol TEXT NOT NULL DEFAULT 'http',
  status INTEGER NOT NULL DEFAULT 1,
  created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
  updated_at TEXT DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS server_handle (
  token TEXT PRIMARY KEY,
  server_id INTEGER NOT NULL,
  proxy_id INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
  UNIQUE (server_id, proxy_id)
);
CREATE TABLE IF NOT EXISTS api_key (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL,
  key_hash TEXT NOT NULL UNIQUE,
  requests_per_minute INTEGER,
  max_concurrent INTEGER,
  created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
  last_used_at TEXT,
  models TEXT,
  tokens_per_day INTEGER,
  weight REAL NOT NULL DEFAULT 1,
  priority TEXT NOT NULL DEFAULT 'normal',
  labels TEXT
);
CREATE TABLE IF NOT EXISTS key_usage (
  key_id INTEGER NOT NULL,
  day TEXT NOT NULL,
  model TEXT NOT NULL,
  requests INTEGER NOT NULL DEFAULT 0,
  prompt_tokens INTEGER NOT NULL DEFAULT 0,
  completion_tokens INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (key_id, day, model)
);
CREATE TABLE IF NOT EXISTS usage_applied (
  instance TEXT PRIMARY KEY,
  batch INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS balancer_meta (
  name TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS change_log (
  revision INTEGER PRIMARY KEY AUTOINCREMENT,
  kind TEXT NOT NULL,
  row_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
  id TEXT PRIMARY KEY,
  beat_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
  demand TEXT NOT NULL,
  holding TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS learned (
  server_id INTEGER PRIMARY KEY,
  figures TEXT NOT NULL
);
"""

# The MySQL schema after every migration; schema.sql is this text (a test keeps them equal).
MYSQL_SCHEMA = """\
CREATE TABLE IF NOT EXISTS `ollamaServers` (
  `id` int NOT NULL AUTO_INCREMENT,
  `port` int NOT NULL,
  `host` varchar(255) NOT NULL,
  `location` varchar(255) NULL,
  `runner` varchar(255) NULL,
  `models` json,
  `last_checked` timestamp NULL,
  `created_at` timestamp NOT NULL DEFAULT (now()),
  `updated_at` timestamp DEFAULT (now()) ON UPDATE CURRENT_TIMESTAMP,
  `scheme` varchar(8) NOT NULL DEFAULT 'http',
  `name` varchar(255) NULL,
  `enabled` tinyint NOT NULL DEFAULT 1,
  `proxy_id` int NULL,
  `weight` double NOT NULL DEFAULT 1,
  `max_concurrency` int NULL,
  `upstream_auth` varchar(3072) NULL,
  `num_parallel` int NULL,
  `max_loaded_models` int NULL,
  `draining` tinyint NOT NULL DEFAULT 0,
  `labels` text NULL,
  `owner` varchar(16) NULL,
  PRIMARY KEY (`id`),
  UNIQUE KEY `ollamaServers_host_port` (`host`, `port`)
) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS `proxy` (
  `id` int NOT NULL AUTO_INCREMENT,
  `name` varchar(255) NOT NULL,
  `ip` varchar(255) NOT NULL,
  `port` int NOT NULL,
  `user_name` varchar(255),
  `password` varchar(1536),
  `created_at` timestamp NOT NULL DEFAULT (now()),
  `updated_at` timestamp DEFAULT (now()) ON UPDATE CURRENT_TIMESTAMP,
  `protocol` varchar(255) NOT NULL DEFAULT 'http',
  `status` tinyint NOT NULL DEFAULT 1,
  PRIMARY KEY (`id`)
) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS `server_handle` (
  `token` varchar(64) NOT NULL,
  `server_id` int NOT NULL,
  `proxy_id` int NOT NULL DEFAULT 0,
  `created_at` timestamp NOT NULL DEFAULT (now()),
  PRIMARY KEY (`token`),
  UNIQUE KEY `server_handle_pair` (`server_id`, `proxy_id`)
) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS `api_key` (
  `id` int NOT NULL AUTO_INCREMENT,
  `name` varchar(255) NOT NULL,
  `key_hash` char(64) NOT NULL,
  `requests_per_minute` int NULL,
  `max_concurrent` int NULL,
  `created_at` timestamp NOT NULL DEFAULT (now()),
  `last_used_at` timestamp NULL,
  `models` text NULL,
  `tokens_per_day` bigint NULL,
  `weight` double NOT NULL DEFAULT 1,
  `priority` varchar(8) NOT NULL DEFAULT 'normal',
  `labels` text NULL,
  PRIMARY KEY (`id`),
  UNIQUE KEY `api_key_hash` (`key_hash`)
) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS `key_usage` (
  `key_id` int NOT NULL,
  `day` date NOT NULL,
  `model` varchar(255) NOT NULL,
  `requests` bigint NOT NULL DEFAULT 0,
  `prompt_tokens` bigint NOT NULL DEFAULT 0,
  `completion_tokens` bigint NOT NULL DEFAULT 0,
  PRIMARY KEY (`key_id`, `day`, `model`)
) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS `usage_applied` (
  `instance` varchar(32) NOT NULL,
  `batch` bigint NOT NULL,
  PRIMARY KEY (`instance`)
) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS `balancer_meta` (
  `name` varchar(64) NOT NULL,
  `value` varchar(255) NOT NULL,
  PRIMARY KEY (`name`)
) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS `change_log` (
  `revision` bigint NOT NULL AUTO_INCREMENT,
  `kind` varchar(16) NOT NULL,
  `row_id` varchar(64) NOT NULL,
  PRIMARY KEY (`revision`)
) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS `instances` (
  `id` varchar(32) NOT NULL,
  `beat_at` timestamp NOT NULL DEFAULT CURRENT_TIMESTAMP,
  `demand` mediumtext NOT NULL,
  `holding` mediumtext NOT NULL,
  PRIMARY KEY (`id`)
) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS `learned` (
  `server_id` int NOT NULL,
  `figures` varchar(255) NOT NULL,
  PRIMARY KEY (`server_id`)
) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
"""

# Columns the balancer adds to the seed's tables: (table, column, MySQL definition).
# SQLite databases of earlier versions get the same columns (SQLITE_ADDED_COLUMNS).
MYSQL_ADDED_COLUMNS = (
    ("ollamaServers", "scheme", "varchar(8) NOT NULL DEFAULT 'http'"),
    ("ollamaServers", "name", "varchar(255) NULL"),
    ("ollamaServers", "enabled", "tinyint NOT NULL DEFAULT 1"),
    ("ollamaServers", "proxy_id", "int NULL"),
    ("ollamaServers", "weight", "double NOT NULL DEFAULT 1"),
    ("ollamaServers", "max_concurrency", "int NULL"),
    ("ollamaServers", "upstream_auth", "varchar(3072) NULL"),
    ("ollamaServers", "num_parallel", "int NULL"),
    ("ollamaServers", "max_loaded_models", "int NULL"),
    ("ollamaServers", "draining", "tinyint NOT NULL DEFAULT 0"),
    ("proxy", "protocol", "varchar(255) NOT NULL DEFAULT 'http'"),
    ("proxy", "status", "tinyint NOT NULL DEFAULT 1"),
    ("api_key", "models", "text NULL"),
    ("api_key", "tokens_per_day", "bigint NULL"),
    ("api_key", "weight", "double NOT NULL DEFAULT 1"),
    ("api_key", "priority", "varchar(8) NOT NULL DEFAULT 'normal'"),
    ("ollamaServers", "labels", "text NULL"),
    ("api_key", "labels", "text NULL"),
    ("ollamaServers", "owner", "varchar(16) NULL"),
)

# Seed columns brought in line with MYSQL_SCHEMA: (table, column, definition, and the
# (IS_NULLABLE, default, EXTRA) that information_schema shows once they are).
MYSQL_CONFORMED_COLUMNS = (
    ("ollamaServers", "id", "int NOT NULL AUTO_INCREMENT", ("NO", None, "auto_increment")),
    ("ollamaServers", "location", "varchar(255) NULL", ("YES", None, "")),
    ("ollamaServers", "runner", "varchar(255) NULL", ("YES", None, "")),
    ("proxy", "protocol", "varchar(255) NOT NULL DEFAULT 'http'", ("NO", "http", "")),
    ("proxy", "status", "tinyint NOT NULL DEFAULT 1", ("NO", "1", "")),
)
def sealed_length(plain_bytes: int) -> int:
    """Characters a secret of ``plain_bytes`` UTF-8 bytes takes once sealed: the prefix,
    then unpadded base64 of nonce, ciphertext and tag."""
    return len(SECRET_PREFIX) + math.ceil((_NONCE_BYTES + plain_bytes + _TAG_BYTES) * 4 / 3)


# Sealed secrets are longer than the seed's varchar(255) allowed for a password: room for
# the longest each field takes (255 and 1,024 characters) in the worst case of UTF-8
# (4 bytes a character for a password, 2 for a latin-1 header value), a test checks.
MYSQL_WIDENED_COLUMNS = (("proxy", "password", "varchar(1536)"),
                         ("ollamaServers", "upstream_auth", "varchar(3072)"))
#: Every table's character set: utf8mb4 (any name, any secret) with exact comparisons.
MYSQL_COLLATION = "utf8mb4_bin"


def _sql_default(value: Any) -> str | None:
    """COLUMN_DEFAULT as MySQL (``http``) and MariaDB (``'http'``, ``NULL``) both show it."""
    if value is None or value == "NULL":
        return None
    text = str(value)
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == "'" else text




# ---------------------------------------------------------------------------
# Store: one interface, SQLite (default) and MySQL, called from a worker thread
# ---------------------------------------------------------------------------


class Database:
    """The connection and what every table needs: statements, transactions, the
    change log and the instances' heartbeats. Blocking calls, made on one worker
    thread (see AsyncStore); SQL is written once with ``?`` placeholders, which the
    MySQL subclass rewrites."""

    engine = "sqlite"

    def __init__(self) -> None:
        self._conn: Any = None
        self.box: SecretBox | None = None
        self._in_transaction = False

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All or nothing; a lost connection inside is an error, never a silent retry."""
        self._execute("BEGIN")
        self._in_transaction = True
        try:
            yield
            self._execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                self._execute("ROLLBACK")
            raise
        finally:
            self._in_transaction = False

    # -- engine-specific ---------------------------------------------------

    def connect(self) -> None:
        raise NotImplementedError

    def migrate(self) -> None:
        raise NotImplementedError

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Runs one statement and returns the cursor, reconnecting where the engine can."""
        raise NotImplementedError

    def _is_duplicate(self, exc: Exception) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    # -- rows ----------------------------------------------------------------

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self._execute(sql, params).fetchall())

    # -- the change log: what other instances must read again ---------------------

    def _changed(self, kind: str, row_id: int | str) -> None:
        """Records a write, in the writer's transaction, for every instance to apply."""
        self._execute("INSERT INTO change_log (kind, row_id) VALUES (?, ?)", [kind, str(row_id)])

    def latest_change(self) -> int:
        """The last revision written: one read of the log's primary key."""
        return int(self._rows("SELECT MAX(revision) FROM change_log")[0][0] or 0)

    def change_mark(self, since: int) -> tuple[int, int]:
        """The last revision after ``since`` and how many there are: changed, when a write
        lands, even one committed after later ones."""
        last, count = self._rows(
            "SELECT MAX(revision), COUNT(*) FROM change_log WHERE revision > ?", [since])[0]
        return int(last or since), int(count)

    def changes_since(self, revision: int) -> list[tuple[int, str, str]] | None:
        """The writes after ``revision``, oldest first; None when the log no longer reaches
        that far back (pruned), or holds more than a reload would cost."""
        pruned = self._rows("SELECT value FROM balancer_meta WHERE name = 'changes_pruned'")
        if pruned and revision < int(pruned[0][0]):
            return None
        rows = self._rows("SELECT revision, kind, row_id FROM change_log WHERE revision > ? "
                          "ORDER BY revision LIMIT ?", [revision, CHANGE_BATCH + 1])
        if len(rows) > CHANGE_BATCH:
            return None
        return [(int(r), str(k), str(i)) for r, k, i in rows]

    def prune_changes(self) -> None:
        """Forgets all but the last CHANGE_LOG_KEPT writes: an instance further behind
        reloads everything."""
        horizon = self.latest_change() - CHANGE_LOG_KEPT
        if horizon <= 0:
            return
        with self.transaction():
            self._execute("DELETE FROM change_log WHERE revision <= ?", [horizon])
            self._execute("DELETE FROM balancer_meta WHERE name = 'changes_pruned'")
            self._execute("INSERT INTO balancer_meta (name, value) VALUES "
                          "('changes_pruned', ?)", [str(horizon)])

    # -- instances: who else serves from this database, and what each wants -----------

    #: The engine's SQL for "the database's clock, ? seconds ago" and "? seconds ahead",
    #: and for one beat at a time (SQLite: the first write of a transaction takes the
    #: database's write lock; MySQL: a named lock, lock_beats()).
    AGO = "datetime('now', '-' || ? || ' seconds')"
    AHEAD = "datetime('now', '+' || ? || ' seconds')"
    UPSERT_BEAT = ("INSERT INTO instances (id, demand, holding) VALUES (?, ?, '{}') "
                   "ON CONFLICT (id) DO UPDATE SET demand = excluded.demand, "
                   "beat_at = CURRENT_TIMESTAMP")
    ADD_USAGE = ("INSERT INTO key_usage (key_id, day, model, requests, prompt_tokens, "
                 "completion_tokens) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key_id, day, "
                 "model) DO UPDATE SET requests = requests + excluded.requests, "
                 "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                 "completion_tokens = completion_tokens + excluded.completion_tokens")

    def lock_beats(self) -> bool:
        """Takes the lock that lets one instance beat at a time, where the engine needs
        one; whether there was one to give back. Raises StoreUnavailable."""
        return False

    def unlock_beats(self) -> None:
        """Gives back what lock_beats() took."""

    def beat(self, instance: str, demand: str, live: float,
             decide: Callable[[dict[str, tuple[Any, Any]]], str]) -> list[str]:
        """This instance's heartbeat, one instance at a time: records what it wants of
        each server (JSON), reads every instance that beat within ``live`` seconds (by
        the database's clock; a crashed one drops out, and a row that claims a beat
        still to come is no live instance), and records what ``decide`` makes of their
        (demand, holding): the slots this one holds from now on. Returns the other live
        instances' ids."""
        locked = self.lock_beats()
        try:
            with self.transaction():
                self._execute(self.UPSERT_BEAT, [instance, demand])
                rows = self._rows("SELECT id, demand, holding FROM instances WHERE "
                                  f"beat_at >= {self.AGO} AND beat_at <= {self.AHEAD} "
                                  "AND id <> ?", [math.ceil(live), BEAT_CLOCK_SLACK, instance])
                holding = decide({str(i): (d, h) for i, d, h in rows})
                self._execute("UPDATE instances SET holding = ? WHERE id = ?",
                              [holding, instance])
                self._execute(f"DELETE FROM instances WHERE beat_at < {self.AGO} "
                              f"OR beat_at > {self.AHEAD}",
                              [INSTANCE_FORGOTTEN, INSTANCE_FORGOTTEN])
        finally:
            if locked:
                self.unlock_beats()
        return [str(i) for i, _, _ in rows]

    def leave(self, instance: str) -> None:
        self._execute("DELETE FROM instances WHERE id = ?", [instance])


class Store(Database):
    """The balancer's tables: servers, proxies, API keys, getServer IDs, and the
    secrets sealed in them."""

    def _seal(self, value: Any) -> Any:
        return self.box.encrypt(value) if self.box and isinstance(value, str) and value else value

    def _open_secret(self, value: Any, what: str) -> str | None:
        if not value:
            return None
        if self.box is None or not is_encrypted(value):
            return str(value)  # plain text, until protect_secrets() encrypts it
        try:
            return self.box.decrypt(str(value))
        except SecretError as exc:
            log.error("cannot decrypt %s: %s", what, exc)
            return None

    def _insert(self, table: str, values: dict[str, Any]) -> int:
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        try:
            cursor = self._execute(
                f"INSERT INTO {table} ({columns}) VALUES ({marks})", list(values.values())
            )
        except Exception as exc:
            if self._is_duplicate(exc):
                raise Conflict(str(exc)) from None
            raise
        return int(cursor.lastrowid)

    def _update(self, table: str, key: int, values: dict[str, Any]) -> bool:
        if not values:
            return bool(self._rows(f"SELECT id FROM {table} WHERE id = ?", [key]))
        assignments = ", ".join(f"{column} = ?" for column in values)
        try:
            self._execute(
                f"UPDATE {table} SET {assignments}, updated_at = CURRENT_TIMESTAMP WHERE id = ?",
                [*values.values(), key],
            )
        except Exception as exc:
            if self._is_duplicate(exc):
                raise Conflict(str(exc)) from None
            raise
        return bool(self._rows(f"SELECT id FROM {table} WHERE id = ?", [key]))

    # -- servers -------------------------------------------------------------

    def list_servers(self) -> list[Server]:
        return self._servers(self._rows(
            f"SELECT {SERVER_COLUMNS} FROM ollamaServers ORDER BY id"))

    def _servers(self, rows: list[tuple[Any, ...]]) -> list[Server]:
        servers = []
        for row in rows:
            server = server_from_row(row[:-1])
            server.authorization = self._open_secret(row[-1], f"server {server.id}'s "
                                                     "upstream credentials")
            servers.append(server)
        return servers

    def _sealed(self, values: dict[str, Any], column: str) -> dict[str, Any]:
        """``values`` with its secret ``column``, if present, encrypted."""
        return {**values, column: self._seal(values[column])} if column in values else values

    def servers_by_id(self, ids: Sequence[int]) -> list[Server]:
        return self._servers(self._rows(
            f"SELECT {SERVER_COLUMNS} FROM ollamaServers WHERE id IN ({_marks(ids)})", ids))

    def add_server(self, values: dict[str, Any]) -> int:
        with self.transaction():
            new_id = self._insert("ollamaServers", self._sealed(values, "upstream_auth"))
            self._changed("server", new_id)
        return new_id

    def update_server(self, server_id: int, values: dict[str, Any]) -> bool:
        with self.transaction():
            found = self._update("ollamaServers", server_id,
                                 self._sealed(values, "upstream_auth"))
            self._changed("server", server_id)
        return found

    def delete_server(self, server_id: int) -> bool:
        with self.transaction():
            self._execute("DELETE FROM server_handle WHERE server_id = ?", [server_id])
            self._execute("DELETE FROM learned WHERE server_id = ?", [server_id])
            cursor = self._execute("DELETE FROM ollamaServers WHERE id = ?", [server_id])
            self._changed("server", server_id)
        return bool(cursor.rowcount)

    def record_health_many(self, results: Sequence[tuple[
            int, list[dict[str, Any]] | None, datetime.datetime]]) -> None:
        """Each server's models (None: unreachable, keep the last known) and check time,
        in one transaction: a commit each (a WAL sync on SQLite) took a third of a core
        at 10,000 servers."""
        with self.transaction():
            for server_id, models, checked in results:
                if models is None:
                    self._execute("UPDATE ollamaServers SET last_checked = ? WHERE id = ?",
                                  [checked, server_id])
                else:
                    self._execute(
                        "UPDATE ollamaServers SET models = ?, last_checked = ? WHERE id = ?",
                        [json.dumps(models), checked, server_id])

    # -- proxies -------------------------------------------------------------

    def list_proxies(self, ids: Sequence[int] | None = None) -> list[Proxy]:
        """Every proxy, or those with ``ids``."""
        where = "" if ids is None else f" WHERE id IN ({_marks(ids)})"
        rows = self._rows(f"SELECT {PROXY_COLUMNS} FROM proxy{where} ORDER BY id", ids or ())
        return [
            dataclasses.replace(proxy_from_row(row), password=self._open_secret(
                row[-1], f"proxy {row[0]}'s password"))
            for row in rows
        ]

    def add_proxy(self, values: dict[str, Any]) -> int:
        with self.transaction():
            new_id = self._insert("proxy", self._sealed(values, "password"))
            self._changed("proxy", new_id)
        return new_id

    def update_proxy(self, proxy_id: int, values: dict[str, Any]) -> bool:
        with self.transaction():
            found = self._update("proxy", proxy_id, self._sealed(values, "password"))
            self._changed("proxy", proxy_id)
        return found

    # -- secrets: the key check, first encryption, rotation ------------------------------

    def unlock(self, master: MasterKey) -> str | None:
        """Opens the secrets with ``master``, or refuses a key other than the one they were
        sealed with (ConfigError naming where the key came from). The first key a database
        sees is recorded by a check value and, for a passphrase, scrypt's salt and cost;
        a passphrase recorded before keys were stretched is re-sealed with scrypt now.
        Returns what it did worth a log line, if anything."""
        meta = {str(name): str(value) for name, value in self._rows(
            "SELECT name, value FROM balancer_meta WHERE name IN ('key_check', 'kdf')")}
        check, spec = meta.get("key_check"), meta.get("kdf")
        if check is None:
            box, spec = new_sealing(master)
            self._record_first_key(master, box, spec)
            self.box = box
            return None
        if master.new_file is not None:
            raise ConfigError(
                f"no key file {master.new_file}: this database's secrets were sealed with a "
                "key this instance does not have; copy that key file here (chmod 600) or set "
                "SECRET_KEY_FILE to it. No key file was written")
        mismatch = ConfigError(
            f"the key from {master.origin} is not the one this database's secrets were "
            "sealed with (key check failed); set SECRET_KEY or SECRET_KEY_FILE to that key")
        if spec is None and not master.random:  # a passphrase used as it was: stretch it
            legacy = SecretBox(master.secret)
            if not hmac.compare_digest(check, legacy.check_value()):
                raise mismatch
            self.box = legacy
            spec = new_kdf_spec()
            count = self.rotate_secrets(sealing_box(master, spec), spec)
            return f"the passphrase is now stretched with scrypt; {count} secrets re-sealed"
        box = sealing_box(master, spec)
        if not hmac.compare_digest(check, box.check_value()):
            raise mismatch
        self.box = box
        return None

    def _record_first_key(self, master: MasterKey, box: SecretBox, spec: str | None) -> None:
        """Writes a generated key's file, then its check value: a failure leaves neither,
        so the next start is not stuck with a key nobody wanted."""
        if master.new_file is not None:
            try:
                write_key_file(master.new_file, master.secret)
            except OSError as exc:
                raise ConfigError(f"cannot write the key file {master.new_file}: "
                                  f"{exc.strerror}") from None
        try:
            with self.transaction():
                self._execute("INSERT INTO balancer_meta (name, value) VALUES ('key_check', ?)",
                              [box.check_value()])
                if spec is not None:
                    self._execute("INSERT INTO balancer_meta (name, value) VALUES ('kdf', ?)",
                                  [spec])
        except BaseException as exc:
            if master.new_file is not None:
                with contextlib.suppress(OSError):
                    os.unlink(master.new_file)
            if isinstance(exc, Exception) and self._is_duplicate(exc):
                raise ConfigError("another instance recorded this database's key at the same "
                                  "moment: start again with its key") from None
            raise

    def _secret_cells(self) -> list[tuple[str, str, int, str]]:
        """Every stored secret: (table, column, row id, stored value)."""
        cells = [("proxy", "password", int(i), str(v)) for i, v in self._rows(
            "SELECT id, password FROM proxy WHERE password IS NOT NULL AND password <> ''")]
        cells += [("ollamaServers", "upstream_auth", int(i), str(v)) for i, v in self._rows(
            "SELECT id, upstream_auth FROM ollamaServers WHERE upstream_auth IS NOT NULL"
            " AND upstream_auth <> ''")]
        return cells

    def protect_secrets(self) -> int:
        """Encrypts the plain-text secrets a seed database holds; returns how many."""
        assert self.box is not None
        count = 0
        for table, column, row_id, value in self._secret_cells():
            if not is_encrypted(value):
                self._execute(f"UPDATE {table} SET {column} = ? WHERE id = ?",
                              [self.box.encrypt(value), row_id])
                count += 1
        return count

    def rotate_secrets(self, new_box: SecretBox, spec: str | None) -> int:
        """Re-seals every secret with ``new_box`` and records its check value and key
        derivation ``spec`` (None for a random key); returns how many. Every value is
        opened first, so a bad one stops it before anything changed."""
        assert self.box is not None
        with self.transaction():
            cells = [(t, c, i, self.box.decrypt(v) if is_encrypted(v) else v)
                     for t, c, i, v in self._secret_cells()]
            for table, column, row_id, plain in cells:
                self._execute(f"UPDATE {table} SET {column} = ? WHERE id = ?",
                              [new_box.encrypt(plain), row_id])
            self._execute("UPDATE balancer_meta SET value = ? WHERE name = 'key_check'",
                          [new_box.check_value()])
            self._execute("DELETE FROM balancer_meta WHERE name = 'kdf'")
            if spec is not None:
                self._execute("INSERT INTO balancer_meta (name, value) VALUES ('kdf', ?)",
                              [spec])
        self.box = new_box
        return len(cells)

    # -- client API keys (only their SHA-256 is stored) ------------------------------------

    def list_keys(self, ids: Sequence[int] | None = None) -> list[ApiKey]:
        """Every API key, or those with ``ids``."""
        where = "" if ids is None else f" WHERE id IN ({_marks(ids)})"
        return [api_key_from_row(row) for row in self._rows(
            f"SELECT {KEY_COLUMNS} FROM api_key{where} ORDER BY id", ids or ())]

    def add_key(self, values: dict[str, Any]) -> int:
        with self.transaction():
            new_id = self._insert("api_key", values)
            self._changed("key", new_id)
        return new_id

    def update_key(self, key_id: int, values: dict[str, Any]) -> bool:
        with self.transaction():
            if not self._rows("SELECT id FROM api_key WHERE id = ?", [key_id]):
                return False
            if values:
                assignments = ", ".join(f"{column} = ?" for column in values)
                self._execute(f"UPDATE api_key SET {assignments} WHERE id = ?",
                              [*values.values(), key_id])
                self._changed("key", key_id)
        return True

    def delete_key(self, key_id: int) -> bool:
        with self.transaction():
            found = bool(self._execute("DELETE FROM api_key WHERE id = ?", [key_id]).rowcount)
            self._execute("DELETE FROM key_usage WHERE key_id = ?", [key_id])
            self._changed("key", key_id)
        return found

    # -- what each key used, a row a key, UTC day and model; the database adds up ----------

    def add_usage(self, instance: str, batch: int,
                  rows: Sequence[tuple[int, str, str, int, int, int]], day: str
                  ) -> dict[int, int]:
        """Adds (key id, day, model, requests, prompt tokens, completion tokens) to what
        is counted, once: ``batch``, numbered by ``instance``, is skipped if it was added
        already (a write that timed out here and is tried again may have gone through).
        Every instance adds its own; the sums are the database's. Returns spent_on(day)."""
        with self.transaction():
            done = self._rows("SELECT batch FROM usage_applied WHERE instance = ?",
                              [instance])
            if rows and (not done or int(done[0][0]) < batch):
                for row in rows:
                    self._execute(self.ADD_USAGE, list(row))
                if done:
                    self._execute("UPDATE usage_applied SET batch = ? WHERE instance = ?",
                                  [batch, instance])
                else:
                    self._execute("INSERT INTO usage_applied (instance, batch) VALUES (?, ?)",
                                  [instance, batch])
        return self.spent_on(day)

    def usage_of(self, key_id: int) -> list[tuple[str, str, int, int, int]]:
        """(day, model, requests, prompt, completion) of one key, by day and model."""
        return [(str(day)[:10], str(model), int(requests), int(prompt), int(completion))
                for day, model, requests, prompt, completion in self._rows(
                    "SELECT day, model, requests, prompt_tokens, completion_tokens FROM "
                    "key_usage WHERE key_id = ? ORDER BY day, model", [key_id])]

    def spent_on(self, day: str) -> dict[int, int]:
        """Tokens (prompt and completion) each key used on ``day``."""
        return {int(key_id): int(tokens) for key_id, tokens in self._rows(
            "SELECT key_id, SUM(prompt_tokens + completion_tokens) FROM key_usage "
            "WHERE day = ? GROUP BY key_id", [day])}

    def touch_key(self, key_id: int, when: datetime.datetime) -> None:
        self._execute("UPDATE api_key SET last_used_at = ? WHERE id = ?", [when, key_id])

    def models_changed(self) -> None:
        """Records that models were pulled, created, copied or deleted somewhere in the
        fleet: every instance reads its servers' models again (Fleet._apply)."""
        with self.transaction():
            self._changed("catalog", "models")

    def share_learned(self, figures: dict[int, Figures]) -> dict[int, Figures]:
        """Merges what this process learned of each server into what the store holds
        (merge_figures), telling every instance of each change (the change log); the
        merged figures."""
        ids = sorted(figures)
        with self.transaction():
            stored = self.learned_of(ids)
            for server_id in ids:
                before = stored.get(server_id)
                merged = figures[server_id] if before is None else merge_figures(
                    before, figures[server_id])
                if merged == before:
                    continue
                text = json.dumps(merged, separators=(",", ":"))
                if before is None:  # none, or one that is no figures: replaced whole
                    self._execute("DELETE FROM learned WHERE server_id = ?", [server_id])
                    self._execute("INSERT INTO learned (server_id, figures) VALUES (?, ?)",
                                  [server_id, text])
                else:
                    self._execute("UPDATE learned SET figures = ? WHERE server_id = ?",
                                  [text, server_id])
                self._changed("learned", server_id)
                stored[server_id] = merged
        return stored

    def learned_of(self, ids: Sequence[int] | None = None) -> dict[int, Figures]:
        """What the store holds of the servers ``ids`` (or all); rows that are not
        figures (an outside writer's) are left out."""
        where = "" if ids is None else f" WHERE server_id IN ({_marks(ids)})"
        found = {}
        for server_id, text in self._rows(f"SELECT server_id, figures FROM learned{where}",
                                          ids or ()):
            figures = parse_figures(text)
            if figures is not None and isinstance(server_id, int):
                found[server_id] = figures
        return found

    def delete_proxy(self, proxy_id: int) -> bool:
        with self.transaction():
            self._execute("DELETE FROM server_handle WHERE proxy_id = ?", [proxy_id])
            cursor = self._execute("DELETE FROM proxy WHERE id = ?", [proxy_id])
            self._changed("proxy", proxy_id)
        return bool(cursor.rowcount)

    # -- handles: the IDs that getServer hands out ------------------------------

    def handle_for(self, server_id: int, proxy_id: int | None) -> str:
        """The stable ID for (server, proxy), made on first use and shared by every
        instance on this database."""
        pair = [server_id, proxy_id or 0]
        sql = "SELECT token FROM server_handle WHERE server_id = ? AND proxy_id = ?"
        rows = self._rows(sql, pair)
        if rows:
            return str(rows[0][0])
        token = secrets.token_hex(16)
        try:
            with self.transaction():
                self._execute(
                    "INSERT INTO server_handle (token, server_id, proxy_id) VALUES (?, ?, ?)",
                    [token, *pair],
                )
                self._changed("handle", token)
        except Exception as exc:
            if not self._is_duplicate(exc):
                raise
            rows = self._rows(sql, pair)  # another instance made it first
            return str(rows[0][0])
        return token

    def resolve_handle(self, token: str) -> tuple[int, int | None] | None:
        rows = self._rows(
            "SELECT server_id, proxy_id FROM server_handle WHERE token = ?", [token]
        )
        if not rows:
            return None
        return int(rows[0][0]), (int(rows[0][1]) or None)

    def list_handles(self) -> dict[str, tuple[int, int | None]]:
        rows = self._rows("SELECT token, server_id, proxy_id FROM server_handle")
        return {str(t): (int(s), int(p) or None) for t, s, p in rows}


def _marks(values: Sequence[Any]) -> str:
    """The placeholders of an IN list (never empty: IN () is not SQL)."""
    return ", ".join("?" for _ in values) or "NULL"


def _as_datetime(value: Any) -> datetime.datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime.datetime):
        return value.replace(tzinfo=None)
    with contextlib.suppress(ValueError):
        return datetime.datetime.fromisoformat(str(value)).replace(tzinfo=None)
    return None


def _as_models(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        value = value.decode()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    if isinstance(value, dict):  # a whole /api/tags answer stored by an outside crawler
        value = value.get("models", [])
    if not isinstance(value, list):
        return []
    return [m for m in value if isinstance(m, dict)]


def server_from_row(row: Sequence[Any]) -> Server:
    (id_, host, port, scheme, name, location, runner, enabled, proxy_id, models, checked,
     weight, max_concurrency, num_parallel, max_loaded_models, draining, labels,
     owner) = row
    return Server(
        id=int(id_),
        host=str(host),
        port=int(port),
        scheme=str(scheme or "http"),
        name=name or None,
        location=location or None,
        runner=runner or None,
        enabled=bool(enabled),
        proxy_id=int(proxy_id) if proxy_id else None,
        models=_as_models(models),
        last_checked=_as_datetime(checked),
        weight=float(weight) if weight and float(weight) > 0 else 1.0,
        max_concurrency=int(max_concurrency) if max_concurrency else None,
        num_parallel=int(num_parallel) if num_parallel else None,
        max_loaded_models=int(max_loaded_models) if max_loaded_models else None,
        draining=bool(draining),
        labels=stored_labels(labels),
        owner=str(owner) if owner else None,
    )


def stored_labels(text: Any) -> dict[str, str]:
    """Labels as a column holds them (a JSON object); anything else is none."""
    with contextlib.suppress(ValueError, TypeError):
        labels = json.loads(text) if text else {}
        if isinstance(labels, dict):
            return {str(k): str(v) for k, v in labels.items()}
    return {}


@dataclasses.dataclass(eq=False)
class ApiKey:
    id: int
    name: str
    key_hash: str = dataclasses.field(repr=False)
    requests_per_minute: int | None = None
    max_concurrent: int | None = None
    created_at: datetime.datetime | None = None
    last_used_at: datetime.datetime | None = None
    #: The models it may use (``*`` wildcards), None for all.
    models: tuple[str, ...] | None = None
    tokens_per_day: int | None = None  # prompt and completion tokens a UTC day
    weight: float = 1.0  # its share of a full fleet against other keys
    priority: str = "normal"  # high, normal or low: the queue's lanes
    #: Server labels every request of it asks for (X-Server-Labels adds more).
    labels: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name,
                "requestsPerMinute": self.requests_per_minute,
                "maxConcurrent": self.max_concurrent,
                "models": None if self.models is None else list(self.models),
                "tokensPerDay": self.tokens_per_day,
                "weight": self.weight, "priority": self.priority, "labels": self.labels,
                "createdAt": iso_time(self.created_at),
                "lastUsedAt": iso_time(self.last_used_at)}

    def allows(self, model: str) -> bool:
        """Whether it may use ``model`` (a canonical name)."""
        return self.models is None or models_matcher(self.models).fullmatch(model) is not None

    @property
    def tenant(self) -> Tenant:
        return Tenant(f"key {self.id}", self.weight, PRIORITY_LANES[self.priority])


#: The queue's lanes by a key's priority: a lower lane is served first.
PRIORITY_LANES = {"high": 0, "normal": 1, "low": 2}


class Tenant(NamedTuple):
    """Whom a queued request is for (Scheduler's fair share): its key, or nobody, one
    tenant for all requests without a key; its weight and its priority's lane."""

    name: str = ""
    weight: float = 1.0
    lane: int = 1


NO_TENANT = Tenant()


@functools.lru_cache(maxsize=1024)
def models_matcher(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """One expression for a key's model patterns: ``*`` stands for any characters, and a
    name without a tag means its ``:latest``, as Ollama reads it."""
    parts = []
    for pattern in patterns:
        if "*" not in pattern and ":" not in pattern.rsplit("/", 1)[-1]:
            pattern += ":latest"
        parts.append(".*".join(re.escape(piece) for piece in pattern.split("*")))
    return re.compile("|".join(f"(?:{part})" for part in parts) or "(?!)")


def api_key_from_row(row: Sequence[Any]) -> ApiKey:
    (id_, name, key_hash, rpm, concurrent, created, used, models, per_day, weight,
     priority, labels) = row
    patterns: tuple[str, ...] | None = None
    if models is not None:
        patterns = ()  # unreadable: no model rather than every model
        with contextlib.suppress(ValueError, TypeError):
            listed = json.loads(models)
            if isinstance(listed, list):
                patterns = tuple(str(p) for p in listed)
    return ApiKey(int(id_), str(name), str(key_hash), int(rpm) if rpm else None,
                  int(concurrent) if concurrent else None, _as_datetime(created),
                  _as_datetime(used), patterns, int(per_day) if per_day else None,
                  float(weight) if weight else 1.0,
                  str(priority) if priority in PRIORITY_LANES else "normal",
                  stored_labels(labels))


def proxy_from_row(row: Sequence[Any]) -> Proxy:
    id_, name, ip, port, protocol, status, user_name, password = row
    return Proxy(
        id=int(id_),
        name=str(name),
        ip=str(ip),
        port=int(port),
        protocol=str(protocol or "http").lower(),
        status=bool(status),
        user_name=user_name or None,
        password=password or None,
    )


class SQLiteStore(Store):
    engine = "sqlite"

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        super().__init__()
        self.path = path
        self.timeout = timeout

    def connect(self) -> None:
        try:
            self._conn = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=self.timeout
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite file {self.path}: {exc}") from None

    def migrate(self) -> None:
        self._conn.executescript(SQLITE_SCHEMA)
        for table, column, definition in SQLITE_ADDED_COLUMNS:
            present = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        params = [iso_sql(p) if isinstance(p, datetime.datetime) else p for p in params]
        try:
            return self._conn.execute(sql, params)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(exc)) from None

    def _is_duplicate(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)


def iso_sql(value: datetime.datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S")


class MySQLStore(Store):
    """MySQL or MariaDB through pymysql; reconnects when the server went away."""

    engine = "mysql"
    AGO = "NOW() - INTERVAL ? SECOND"
    AHEAD = "NOW() + INTERVAL ? SECOND"
    UPSERT_BEAT = ("INSERT INTO instances (id, demand, holding) VALUES (?, ?, '{}') "
                   "ON DUPLICATE KEY UPDATE demand = VALUES(demand), "
                   "beat_at = CURRENT_TIMESTAMP")
    ADD_USAGE = ("INSERT INTO key_usage (key_id, day, model, requests, prompt_tokens, "
                 "completion_tokens) VALUES (?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE "
                 "requests = requests + VALUES(requests), "
                 "prompt_tokens = prompt_tokens + VALUES(prompt_tokens), "
                 "completion_tokens = completion_tokens + VALUES(completion_tokens)")

    @functools.cached_property
    def beat_lock(self) -> str:
        """The name of the heartbeat's lock: the database's own (a lock name is the whole
        server's, and other databases on it are other fleets), at most 64 characters."""
        name = f"ollamabalancer.{self.config.db_database}"
        if len(name) > 64:
            name = "ollamabalancer." + hashlib.blake2b(
                self.config.db_database.encode(), digest_size=16).hexdigest()
        return name

    def lock_beats(self) -> bool:
        # A beat holds it for milliseconds: waiting half of DB_TIMEOUT is ample, and the
        # wait must end before the connection's own read timeout does.
        wait = max(1, int(self.config.db_timeout / 2))
        # 1: taken; 0: another instance held it all along; NULL: an error.
        got = self._rows("SELECT GET_LOCK(?, ?)", [self.beat_lock, wait])
        if not got or got[0][0] != 1:
            raise StoreUnavailable(f"could not take the lock {self.beat_lock!r} that "
                                   f"heartbeats take in turn (held elsewhere for {wait} s)")
        return True

    def unlock_beats(self) -> None:
        self._execute("SELECT RELEASE_LOCK(?)", [self.beat_lock])

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        try:
            import pymysql
        except ImportError:
            raise MissingDependency("pymysql", "DB_ENGINE=mysql") from None
        self._pymysql = pymysql

    def _open(self, database: str | None) -> Any:
        return self._pymysql.connect(
            host=self.config.db_host,
            port=self.config.db_port,
            user=self.config.db_username,
            password=self.config.db_password,
            database=database,
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=self.config.db_timeout,
            read_timeout=self.config.db_timeout,
            write_timeout=self.config.db_timeout,
            init_command="SET time_zone = '+00:00'",
        )

    def connect(self) -> None:
        pymysql = self._pymysql
        try:
            try:
                self._conn = self._open(self.config.db_database)
            except pymysql.err.OperationalError as exc:
                if exc.args[0] != 1049:  # ER_BAD_DB_ERROR: unknown database
                    raise
                bootstrap = self._open(None)
                try:
                    with bootstrap.cursor() as cursor:
                        name = self.config.db_database.replace("`", "``")
                        cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER"
                                       f" SET utf8mb4 COLLATE {MYSQL_COLLATION}")
                finally:
                    bootstrap.close()
                self._conn = self._open(self.config.db_database)
        except pymysql.err.MySQLError as exc:
            self._conn = None
            raise StoreUnavailable(f"cannot connect to MySQL: {exc}") from None

    def migrate(self) -> None:
        """Creates the tables, or upgrades the seed's in place. Every step is idempotent."""
        for statement in MYSQL_SCHEMA.split(";\n"):
            if statement.strip():
                self._execute(statement)
        # Tables made on a server or database whose default is latin1 (the seed's, say)
        # cannot hold most names: a 500 for each, until they are utf8mb4.
        for table, in self._rows(
                "SELECT DISTINCT TABLE_NAME FROM information_schema.COLUMNS"
                " WHERE TABLE_SCHEMA = DATABASE() AND COLLATION_NAME <> ?"
                " UNION SELECT TABLE_NAME FROM information_schema.TABLES"
                " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_COLLATION <> ?",
                [MYSQL_COLLATION, MYSQL_COLLATION]):
            if table in ("ollamaServers", "proxy", "server_handle", "api_key", "balancer_meta"):
                self._execute(f"ALTER TABLE `{table}` CONVERT TO CHARACTER SET utf8mb4"
                              f" COLLATE {MYSQL_COLLATION}")
        present = {
            (table, column)
            for table, column in self._rows(
                "SELECT TABLE_NAME, COLUMN_NAME FROM information_schema.COLUMNS"
                " WHERE TABLE_SCHEMA = DATABASE()"
            )
        }
        for table, column, definition in MYSQL_ADDED_COLUMNS:
            if (table, column) not in present:
                self._execute(f"ALTER TABLE `{table}` ADD COLUMN `{column}` {definition}")
        # The seed's columns that differ from ours: ollamaServers.id filled by a crawler
        # (not AUTO_INCREMENT), runner and location NOT NULL, proxy.protocol nullable,
        # proxy.status without a default. NULL protocols become 'http' first.
        self._execute("UPDATE `proxy` SET `protocol` = 'http' WHERE `protocol` IS NULL")
        actual = {
            (table, column): (nullable, _sql_default(default), str(extra).lower())
            for table, column, nullable, default, extra in self._rows(
                "SELECT TABLE_NAME, COLUMN_NAME, IS_NULLABLE, COLUMN_DEFAULT, EXTRA"
                " FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE()"
            )
        }
        for table, column, definition, expected in MYSQL_CONFORMED_COLUMNS:
            if actual.get((table, column)) != expected:
                self._execute(f"ALTER TABLE `{table}` MODIFY `{column}` {definition}")
        types = {
            (table, column): str(kind).lower()
            for table, column, kind in self._rows(
                "SELECT TABLE_NAME, COLUMN_NAME, COLUMN_TYPE FROM information_schema.COLUMNS"
                " WHERE TABLE_SCHEMA = DATABASE()")
        }
        for table, column, definition in MYSQL_WIDENED_COLUMNS:
            if types.get((table, column)) != definition:
                self._execute(f"ALTER TABLE `{table}` MODIFY `{column}` {definition}")
        indexes = {
            str(name)
            for name, in self._rows(
                "SELECT DISTINCT INDEX_NAME FROM information_schema.STATISTICS"
                " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'ollamaServers'"
            )
        }
        if "ollamaServers_host_port" not in indexes:
            self._execute(
                "ALTER TABLE `ollamaServers` ADD UNIQUE KEY `ollamaServers_host_port`"
                " (`host`, `port`)"
            )
        if "ollamaServers_host_unique" in indexes:
            self._execute("ALTER TABLE `ollamaServers` DROP INDEX `ollamaServers_host_unique`")

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        pymysql = self._pymysql
        sql = sql.replace("?", "%s")
        for attempt in (1, 2):
            try:
                if self._conn is None:
                    self.connect()
                cursor = self._conn.cursor()
                cursor.execute(sql, list(params))
                return cursor
            except (pymysql.err.OperationalError, pymysql.err.InterfaceError) as exc:
                code = exc.args[0] if exc.args else 0
                if isinstance(exc, pymysql.err.OperationalError) and code < 2000 and code not in (
                    1927, 4031  # connection killed, idle disconnect (server-side)
                ):
                    raise  # an SQL-level error, not a lost connection
                self.close()
                if attempt == 2 or self._in_transaction:
                    raise StoreUnavailable(f"MySQL unavailable: {exc}") from None
        raise AssertionError("unreachable")

    def _is_duplicate(self, exc: Exception) -> bool:
        return isinstance(exc, self._pymysql.err.IntegrityError) and exc.args[0] == 1062


class AsyncStore:
    """Runs Store calls on one worker thread, so the event loop never waits on the database
    and the connection is only ever used by one thread.

    Each call is given up after ``timeout`` seconds (StoreUnavailable), whatever the
    thread is doing: a database that hangs, rather than refusing, costs each caller its
    timeout, never the sum of those queued before it. A call given up before it started
    never runs; one already running may still complete.
    """

    def __init__(self, store: Store, timeout: float = 5.0) -> None:
        self.store = store
        self.timeout = timeout
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store")

    async def call(self, method: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, functools.partial(method, *args))
        try:
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            raise StoreUnavailable(f"no answer within {self.timeout:g} s") from None

    def shutdown(self) -> None:
        self._executor.submit(self.store.close)
        self._executor.shutdown(wait=True)


def open_store(config: Config) -> Store:
    """Connects, migrates, checks the secret key and encrypts any plain-text secrets."""
    store: Store = MySQLStore(config) if config.db_engine == "mysql" else SQLiteStore(
        config.db_path, config.db_timeout)
    store.connect()
    store.migrate()
    master = load_master_key(config)
    try:
        note = store.unlock(master)
    except BaseException:
        store.close()
        raise
    log.info("secrets at rest sealed with the %s", master.origin)
    if note:
        log.info("%s", note)
    if config.db_engine == "mysql" and not (config.secret_key or config.secret_key_file):
        log.info("every instance sharing this database needs the same key: copy %s or "
                 "set SECRET_KEY_FILE", os.path.abspath(default_key_file(config)))
    protected = store.protect_secrets()
    if protected:
        log.info("encrypted %d plain-text secrets found in the database", protected)
    return store


# ---------------------------------------------------------------------------
# Servers and the scheduler: who can take a request, and who waits
# ---------------------------------------------------------------------------

_size_re = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMBT]?)\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1e-9, "K": 1e-6, "M": 1e-3, "B": 1.0, "T": 1e3}


def parameter_billions(text: Any) -> float | None:
    """``"8.0B"`` -> 8.0, ``"137M"`` -> 0.137; None when it cannot be read."""
    if not isinstance(text, str):
        return None
    match = _size_re.fullmatch(text)
    if match is None:
        return None
    return float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


def server_models(server: Server) -> dict[str, dict[str, Any]]:
    return {
        canonical_model(str(m.get("name") or m.get("model") or "")): m for m in server.models
    }


def server_qualifies(server: Server, models: Sequence[str], size: float | None) -> bool:
    """True if the server has every model in ``models``, and (with ``size``) one of the
    requested models (any model when none is requested) of at least ``size`` billions."""
    wanted = [canonical_model(m) for m in models]
    if any(name not in server.model_names for name in wanted):
        return False
    if size is None:
        return True
    installed = server_models(server)
    pool = [installed[name] for name in wanted] if wanted else list(installed.values())
    for model in pool:
        details = model.get("details")
        billions = parameter_billions(details.get("parameter_size") if isinstance(
            details, dict) else None)
        if billions is not None and billions >= size:
            return True
    return False


def explain_no_match(servers: Sequence[Server], models: Sequence[str], size: float | None) -> str:
    """Why getServer found nothing, in one sentence."""
    enabled = [s for s in servers if s.enabled]
    if not servers:
        return "no servers are registered"
    if not enabled:
        return "no server is enabled"
    if all(s.draining for s in enabled):
        return "every enabled server is draining"
    reachable = [s for s in enabled if s.reachable and not s.draining]
    if not reachable:
        return "no enabled server is reachable"
    wanted = ", ".join(models)
    with_models = [s for s in reachable if server_qualifies(s, models, None)]
    if models and not with_models:
        return f"no reachable server has all of: {wanted}"
    return f"no reachable server has {'a requested' if models else 'a'} model of at least {size}B"


class NoCandidate(Exception):
    """No enabled, reachable, healthy server has the model."""


#: Ranking.tier of a cold load that evicts an idle model.
EVICTS = 3
#: The tier of a server with no free slot: after every tier a request could start in.
FULL = 9
#: The last tier a request may be sent to: any server with a free slot (see tier()).
ANY_FREE = FULL - 1


@dataclasses.dataclass(eq=False)
class RankHeap:
    """Servers that may serve one model, by rank: a heap of (tier, load share, -weight,
    random, stamp, server id). An entry counts while its stamp is the server's latest."""

    entries: list[tuple[int, float, float, float, int, int]] = dataclasses.field(
        default_factory=list)
    latest: dict[int, int] = dataclasses.field(default_factory=dict)


class QueueFull(Exception):
    pass


class QueueTimeout(Exception):
    pass


@dataclasses.dataclass(eq=False)
class Slot:
    """A place on a server for one request; ``cold`` if its model had to be loaded,
    ``probe`` if it is the one request let through a half-open circuit. For learning the
    server's parallel limit: when it was taken, how many answers of its model were under
    way there then (``ahead``), and whether its own answer has begun streaming."""

    server: Server
    model: str | None
    cold: bool = False
    probe: bool = False
    taken: float = 0.0
    ahead: int = 0
    streaming: bool = False


class Affinity(NamedTuple):
    """Where a request would rather go. ``key`` names its session (X-Session-Id) or its
    conversation (its first message's fingerprint) alike in every worker and instance,
    for rendezvous hashing (Ranking.affine); ``hint`` is what this process's own table
    knows it by, if anything: the session, or the longest start of the conversation it
    has seen go somewhere; ``cached``: its server may hold its prompt in cache (a turn
    that continues a conversation, a session), worth waiting there for a slot."""

    key: str | bytes
    hint: str | bytes | None
    cached: bool = True


def rendezvous_order(key: str | bytes, servers: Sequence[Server]) -> Iterator[Server]:
    """``servers`` in ``key``'s order of preference by weighted rendezvous hashing (each
    scores weight / -ln(u), u a 64-bit mix of the key's hash and the server's id, uniform
    in (0, 1)): the same in every process, and a server that comes or goes moves only
    the keys it wins or held. Lazily: all are scored, then taken best first only as far
    as the caller goes (usually one)."""
    seed = int.from_bytes(hashlib.blake2b(
        key.encode() if isinstance(key, str) else key, digest_size=8).digest(), "big")
    mask, log = 0xFFFFFFFFFFFFFFFF, math.log
    scored = []
    for index, server in enumerate(servers):
        x = (seed ^ (server.id * 0x9E3779B97F4A7C15)) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        unit = ((x ^ (x >> 31)) >> 11) * 2.0 ** -53 + 2.0 ** -54  # in (0, 1)
        scored.append((server.weight / log(unit), index))  # negated: a min-heap
    heapq.heapify(scored)
    while scored:
        yield servers[heapq.heappop(scored)[1]]


@functools.lru_cache(maxsize=4096)
def model_cell(server_id: int, model: str) -> int:
    """The board's id for a model's requests on a server: past every server id (2^30 and
    up), from a hash of both, so that workers count each other's slots of a model."""
    digest = hashlib.blake2b(f"{server_id} {model}".encode(), digest_size=4).digest()
    return (1 << 30) | (int.from_bytes(digest, "big") & ((1 << 30) - 1))


class Waiter:
    """A request waiting in the queue for a slot (its future), since when, in which
    place of the arrival order. A plain class: a dataclass's default_factory made each
    queued request pay for a call more."""

    __slots__ = ("affinity", "exclude", "future", "model", "order", "queued", "rank", "since",
                 "tenant")

    def __init__(self, model: str | None, exclude: frozenset[int],
                 affinity: Affinity | None, future: asyncio.Future[Slot],
                 tenant: Tenant = NO_TENANT) -> None:
        self.model = model
        self.exclude = exclude
        self.affinity = affinity
        self.future = future
        self.tenant = tenant
        self.since = time.monotonic()
        self.order = 0  # its place in arrival order (WaitQueue)
        self.rank: tuple[int, float, int] = (0, 0.0, 0)  # its place in its model's queue
        self.queued = False


#: A queued request's place in its model's queue: its priority's lane, its start tag
#: (fair share), its arrival; the waiter last (never compared: arrivals are unique).
QueueEntry = tuple[int, float, int, "Waiter"]


class WaitQueue:
    """The fleet-wide queue, one per model, each served in fair shares of its tenants
    (API keys; requests without one are one tenant): the high lane before the normal
    before the low, and within a lane by start-time fair queuing. A waiter's start tag
    is the later of the queue's virtual time (the tag last served) and its tenant's last
    finish; its finish is that plus 1 / weight. So a tenant that queued a thousand
    requests does not make a newcomer wait behind them: the newcomer's first request
    tags next to the one being served, and a weight of 2 gets two turns for one. One
    tenant's own requests keep their arrival order.

    A freed slot looks only at the models its server can run, and at each of them only
    from its first in that order on (the rest want what it does), through a heap: a
    dispatch costs O(log n) in the requests waiting. A waiter that leaves (its client
    gone, its time up) is marked and dropped when it comes to the top, or when its
    model's heap is mostly such waiters."""

    def __init__(self) -> None:
        self.queues: dict[str | None, list[QueueEntry]] = {}
        self.waiting: collections.Counter[str | None] = collections.Counter()  # by model
        self.size = 0  # the waiting's total, kept: Counter.total() adds them up each time
        self._order = itertools.count()
        self.clock = 0.0  # virtual time: the start tag of the request served last
        self._finish: dict[str, float] = {}  # each tenant's last finish tag
        #: Every waiter in arrival order, for QUEUE_TIMEOUT: as every waiter has the same
        #: time to wait, they run out in this order, and one timer serves them all.
        self.arrivals: collections.deque[Waiter] = collections.deque()

    def __len__(self) -> int:
        return self.size

    def append(self, waiter: Waiter) -> None:
        waiter.order, waiter.queued = next(self._order), True
        tenant = waiter.tenant
        start = max(self.clock, self._finish.get(tenant.name, 0.0))
        self._finish[tenant.name] = start + 1.0 / tenant.weight
        waiter.rank = (tenant.lane, start, waiter.order)
        arrivals = self.arrivals
        while arrivals and not arrivals[0].queued:  # served or gone: no longer kept
            arrivals.popleft()
        arrivals.append(waiter)
        if len(arrivals) > 2 * self.size + 64:  # behind one long wait, mostly gone
            self.arrivals = collections.deque(w for w in arrivals if w.queued)
        heap = self.queues.setdefault(waiter.model, [])
        heapq.heappush(heap, (*waiter.rank, waiter))
        self.waiting[waiter.model] += 1
        self.size += 1
        if len(heap) > 2 * self.waiting[waiter.model] + 64:  # mostly gone: compact
            heap = self.queues[waiter.model] = [e for e in heap if e[3].queued]
            heapq.heapify(heap)

    def discard(self, waiter: Waiter) -> None:
        """Takes ``waiter`` out of the queue (it is left in place, marked)."""
        if waiter.queued:
            waiter.queued = False
            self.size -= 1
            self.waiting[waiter.model] -= 1
            if not self.waiting[waiter.model]:
                del self.waiting[waiter.model]

    def served(self, waiter: Waiter) -> None:
        """Takes out ``waiter``, given a slot: the virtual time moves to its start tag."""
        self.discard(waiter)
        self.clock = max(self.clock, waiter.rank[1])

    def tidy(self, model: str | None) -> None:
        """Drops the waiters that left from the top of ``model``'s queue."""
        heap = self.queues.get(model)
        while heap and not heap[0][3].queued:
            heapq.heappop(heap)
        if not heap:
            self.queues.pop(model, None)

    def expired(self, deadline: float) -> list[Waiter]:
        """Takes out the waiters that came before ``deadline`` (their time is up); the
        waiters that left already are dropped from the arrival order on the way."""
        arrivals, out = self.arrivals, []
        while arrivals and (not arrivals[0].queued or arrivals[0].since <= deadline):
            waiter = arrivals.popleft()
            if waiter.queued:
                self.discard(waiter)
                out.append(waiter)
        return out

    def oldest(self) -> Waiter | None:
        """The waiter that came first of those still queued."""
        arrivals = self.arrivals
        while arrivals and not arrivals[0].queued:
            arrivals.popleft()
        return arrivals[0] if arrivals else None

    def behind(self, waiter: Waiter) -> bool:
        """Whether another waiter of ``waiter``'s model, one that keeps no server out
        (not a retry), comes first in its queue: then ``waiter`` waits for it."""
        self.tidy(waiter.model)
        heap = self.queues.get(waiter.model)
        if not heap:
            return False
        first = heap[0][3]
        return first is not waiter and not first.exclude

    def following(self, model: str | None) -> Iterator[Waiter]:
        """``model``'s waiters in the order they are to be served (dispatch): taken off
        its heap as they are looked at, and those still waiting put back when the
        looking ends."""
        heap = self.queues.get(model)
        if not heap:
            return
        looked: list[QueueEntry] = []
        try:
            while heap:
                entry = heapq.heappop(heap)
                if entry[3].queued:
                    looked.append(entry)
                    yield entry[3]
        finally:
            for entry in looked:
                if entry[3].queued:
                    heapq.heappush(heap, entry)


def _counts(value: Any) -> dict[str, int]:
    """A heartbeat's {server id: count}, whatever another instance wrote."""
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, int) and v >= 0}


def fair_shares(capacity: int, wants: dict[str, int]) -> dict[str, int]:
    """``capacity`` slots shared among instances by what each wants, max-min fair (the
    smallest wants are met first, the rest shared evenly), then what is left over shared
    evenly too, so that an idle instance can start a request at once. The same on every
    instance for the same ``wants``: ties go by name."""
    names = sorted(wants)
    share = dict.fromkeys(names, 0)
    left = capacity
    hungry = [name for name in names if wants[name] > 0]
    while left and hungry:
        each = max(1, left // len(hungry))
        for name in list(hungry):
            give = min(each, wants[name] - share[name], left)
            share[name] += give
            left -= give
            if share[name] >= wants[name]:
                hungry.remove(name)
            if not left:
                break
    for index, name in enumerate(names):
        share[name] += left // len(names) + (index < left % len(names))
    return share


def _instance_hash(instance: str) -> int:
    """A 63-bit hash of an instance id, as the board's headers and siblings() hold it."""
    return int.from_bytes(hashlib.blake2b(instance.encode(), digest_size=8).digest(),
                          "big") >> 1


class SharedCapacity:
    """This instance's slots of each server while other instances share the fleet (none
    while it is alone, when every cap is its own), decided at each heartbeat."""

    def __init__(self) -> None:
        self.shares: dict[int, int] = {}
        self.planned: dict[int, int] = {}
        self.planned_alone = True
        self.instances = 1
        #: Every other live instance is a worker of this group, on its load board: a
        #: server's cap is then the group's, counted on the board, not shared by beats.
        self.siblings_only = True

    def room(self, server_id: int, capacity: int) -> int:
        # Among other instances, a server no heartbeat has shared yet has no room here.
        return self.shares.get(server_id, 0) if self.instances > 1 else capacity

    @staticmethod
    def demand(servers: dict[int, Server], queue: WaitQueue) -> dict[str, int]:
        """What this instance wants of each server: its requests there, and those queued
        that it could take (by server id, as text: the heartbeat's JSON)."""
        waiting = queue.waiting
        wants: dict[str, int] = {}
        for server in servers.values():
            queued = sum(n for model, n in waiting.items()
                         if model is None or model in server.model_names)
            if server.load.inflight or queued:
                wants[str(server.id)] = server.load.inflight + queued
        return wants

    def plan(self, capacity: dict[int, int], inflight: dict[int, int], wants: dict[str, int],
             me: str) -> Callable[[dict[str, tuple[Any, Any]]], str]:
        """How this instance decides its slots of each server in a heartbeat (run by the
        store, one instance at a time): its fair part of the server's cap by what every
        live instance wants, but never more than the others do not hold. Holdings only
        shrink at once and grow into what others gave up, so that the sum of what the
        instances hold, and so of their requests, never exceeds the cap."""
        def decide(others: dict[str, tuple[Any, Any]]) -> str:
            demands, holdings = {}, {}
            for name, (demand, holding) in others.items():
                with contextlib.suppress(ValueError, UnicodeError):
                    demands[name] = _counts(decode_json(str(demand).encode()))
                    holdings[name] = _counts(decode_json(str(holding).encode()))
            self.planned = {}
            for server_id, cap in capacity.items():
                key = str(server_id)
                share = fair_shares(cap, {me: wants.get(key, 0), **{
                    name: want.get(key, 0) for name, want in demands.items()}})[me]
                free = cap - sum(held.get(key, 0) for held in holdings.values())
                self.planned[server_id] = min(share, max(0, free))
            self.planned_alone = not others
            return json.dumps({str(i): max(n, inflight[i]) for i, n in self.planned.items()})

        return decide

    def take(self, others: Sequence[str], siblings: set[int] | None) -> list[int]:
        """Uses the slots the last heartbeat decided, which found ``others`` live (of
        which ``siblings``, by their hashes, share this one's board); the servers that got
        more room."""
        self.instances = len(others) + 1
        self.siblings_only = siblings is not None and all(
            _instance_hash(other) in siblings for other in others)
        before, self.shares = self.shares, {} if self.planned_alone else self.planned
        return [i for i, room in self.shares.items() if room > before.get(i, 0)]


def evicted(load: ServerLoad) -> str | None:
    """The model Ollama unloads to make room for another: its least recently used idle
    one (None if every loaded model is busy)."""
    idle = [m for m in load.loaded if not load.by_model.get(m)]
    return min(idle, key=load.loaded.__getitem__) if idle else None


class LoadedIndex:
    """Which servers hold each model loaded, as the ranking last saw them (changed()),
    and per model the few of them a conversation is placed among (pool()): affinity costs
    a look at those, not a scan of the fleet."""

    def __init__(self) -> None:
        self._servers: dict[str, set[int]] = {}  # model: ids of servers it is loaded on
        self._models: dict[int, frozenset[str]] = {}  # server id: its models, as indexed
        self._pools: dict[str, list[int]] = {}

    def update(self, server: Server) -> None:
        """``server``'s loaded models may have changed."""
        now = frozenset(server.load.loaded)
        before = self._models.get(server.id, frozenset())
        if now == before:
            return
        self._models[server.id] = now
        for model in before - now:
            self._servers[model].discard(server.id)
            self._pools.pop(model, None)
        for model in now - before:
            self._servers.setdefault(model, set()).add(server.id)
            self._pools.pop(model, None)

    def drop(self, servers: dict[int, Server]) -> None:
        """Forgets the servers no longer in the fleet."""
        for server_id in [i for i in self._models if i not in servers]:
            for model in self._models.pop(server_id):
                self._servers[model].discard(server_id)
                self._pools.pop(model, None)

    def pool(self, servers: dict[int, Server], model: str) -> list[Server]:
        """The servers ``model`` is loaded on, at most AFFINITY_POOL of them: those first in
        the model's own rendezvous order (so every process with the same view has the
        same pool), kept until where the model is loaded changes."""
        ids = self._pools.get(model)
        if ids is None:
            holding = [s for i in self._servers.get(model, ()) if (s := servers.get(i))]
            if len(holding) > AFFINITY_POOL:
                holding = list(itertools.islice(rendezvous_order(model, holding),
                                                AFFINITY_POOL))
            ids = self._pools[model] = sorted(s.id for s in holding)
        return [s for i in ids if (s := servers.get(i)) is not None]


class Ranking:
    """Which server a request should go to now: the strategies, Ollama's tiers, and
    least_load's index of servers by rank (a heap per model); what each server's limits
    are, as given or learned. The Scheduler's, which asks it: it reads the fleet and
    changes nothing but its index and what it has learned."""

    def __init__(self, config: Config, board: LoadBoard | None = None) -> None:
        self.config = config
        self.board = board  # the other workers' requests in flight, WORKERS=N
        #: Server ids by session (X-Session-Id, a str) and by conversation (bytes).
        self.sessions: collections.OrderedDict[str | bytes, int] = collections.OrderedDict()
        self._turn = 0
        self._random = random.Random()
        # least_load's index: per model, a heap of servers by rank (see best()). Mutation
        # testing leaves these lines alone: their annotations are never evaluated.
        self._ranked: dict[str | None, RankHeap] = {}  # pragma: no mutate
        self._ranked_fleet: dict[int, Server] | None = None  # pragma: no mutate
        self._stamps = itertools.count()
        self.shared = SharedCapacity()
        self.where_loaded = LoadedIndex()
        #: Each model's size_vram, as /api/ps last showed it loaded on some server.
        self.model_vram: dict[str, int] = {}
        #: Each server's models kept loaded and parallel limit where known (its own
        #: settings, or learned) and the most models it has shown loaded at once; the
        #: fleet's usual limits, and the most models any of its servers has shown:
        #: learned().
        self._known: dict[int, tuple[int | None, int | None, int]] = {}
        self.usual_resident: int | None = None
        self.usual_parallel: int | None = None
        self.fleet_shown = 0

    def remember(self, session: str | bytes, server_id: int) -> None:
        """Keeps a session's or a conversation's server, for the requests that follow."""
        sessions = self.sessions
        sessions[session] = server_id
        sessions.move_to_end(session)
        while len(sessions) > MAX_SESSIONS:
            sessions.popitem(last=False)

    def conversation(self, prints: Sequence[bytes]) -> bytes | None:
        """The longest start of a conversation (``prints``: conversation_prints) that has
        a server, for a turn that continues it."""
        sessions = self.sessions
        return next((key for key in reversed(prints) if key in sessions), None)

    def learned(self, servers: dict[int, Server], server: Server) -> bool:
        """``server`` may have shown more of its limits (Learned): when what is known of
        them changed, the fleet's usual limits (the median of those known among
        ``servers``: most fleets are alike) and the most models one of them has shown
        loaded at once are worked out anew, and so is the ranking they enter. Whether
        they changed."""
        learned = server.load.learned
        shown = learned.known()
        known = (server.max_loaded_models or shown[0], server.num_parallel or shown[1],
                 learned.resident_seen)
        if self._known.get(server.id, (None, None, 0)) == known:
            return False
        self._known[server.id] = known
        self._work_out(servers)
        return True

    def forget(self, servers: dict[int, Server]) -> None:
        """The fleet may have lost servers: what they showed counts no more."""
        self.where_loaded.drop(servers)
        if any(server_id not in servers for server_id in self._known):
            self._work_out(servers)

    def _work_out(self, servers: dict[int, Server]) -> None:
        for gone in [i for i in self._known if i not in servers]:
            del self._known[gone]

        def median(values: list[int]) -> int | None:
            return sorted(values)[(len(values) - 1) // 2] if values else None

        self.usual_resident = median([r for r, _, _ in self._known.values() if r])
        self.usual_parallel = median([p for _, p, _ in self._known.values() if p])
        self.fleet_shown = max((seen for _, _, seen in self._known.values()), default=0)
        self.invalidate()

    def capacity(self, server: Server) -> int:
        """Requests in flight on ``server`` before more wait here: its own maxConcurrency,
        else the setting, else a slot for each request its loaded models run at once (as
        far as known, and one more while that is a guess: Learned.parallel), else 4."""
        given = server.max_concurrency or self.config.max_concurrency
        if given:
            return given
        parallel, parallel_from = self.parallel_known(server)
        resident, resident_from = self.resident_known(server)
        if parallel_from != "guessed":
            return resident * parallel
        if resident_from == "guessed":
            if not server.load.learned.parallel_seen:
                return GUESSED_MAX_CONCURRENCY  # nothing known yet
            resident = max(1, min(resident, len(server.load.loaded)))  # as far as seen
        # While the parallel limit is a guess (one more than seen), one request more than
        # the slots known, not one more per model: at most one waits to find the limit.
        return resident * (parallel - 1) + 1

    def parallel_known(self, server: Server) -> tuple[int, str]:
        """Requests one loaded model runs at once on ``server``, and where that comes
        from: "server" (its numParallel), "setting", or Learned.parallel's."""
        if server.num_parallel:
            return server.num_parallel, "server"
        if self.config.num_parallel:
            return self.config.num_parallel, "setting"
        return server.load.learned.parallel(self.usual_parallel)

    def parallel(self, server: Server) -> int:
        return self.parallel_known(server)[0]

    def resident_known(self, server: Server) -> tuple[int, str]:
        """Models ``server`` keeps loaded at once, and where that comes from, as
        parallel_known()."""
        if server.max_loaded_models:
            return server.max_loaded_models, "server"
        if self.config.max_loaded_models:
            return self.config.max_loaded_models, "setting"
        return server.load.learned.resident(self.usual_resident, self.fleet_shown)

    def resident(self, server: Server) -> int:
        return self.resident_known(server)[0]

    def fits(self, server: Server, model: str) -> bool:
        """Whether ``model`` would load on ``server`` beside what is loaded there now
        without evicting anything, as far as the server has shown its memory."""
        learned = server.load.learned
        if learned.vram_limit is None or learned.ps is None:
            return True
        size = self.model_vram.get(model)
        in_use = sum(learned.ps.get(m, (0, 0.0))[0] for m in server.load.loaded)
        return size is None or in_use + size < learned.vram_limit

    def capacity_report(self, server: Server) -> dict[str, Any]:
        """What the scheduler counts on for ``server``, where each figure comes from,
        and what it has learned (GET /servers/<id>, the dashboard)."""
        parallel, parallel_from = self.parallel_known(server)
        resident, resident_from = self.resident_known(server)
        return {
            "numParallel": parallel,
            "numParallelFrom": parallel_from,
            "maxLoadedModels": resident,
            "maxLoadedModelsFrom": resident_from,
            "maxConcurrency": self.capacity(server),
            "maxConcurrencyFrom": ("server" if server.max_concurrency else "setting"
                                   if self.config.max_concurrency else "learned"),
            "learned": server.load.learned.to_json(),
        }

    def eligible(self, server: Server, model: str | None, now: float) -> bool:
        """Could serve ``model`` at all: enabled and not draining, reachable, has it, and
        its circuit is not open (half-open after the cooldown counts: requests wait for
        the probe)."""
        if not (server.enabled and server.reachable) or server.draining:
            return False
        if server.load.breaker_open and now < server.load.open_until:
            return False
        return model is None or model in server.model_names

    def counted(self, server: Server, model: str | None) -> None:
        """``server``'s requests in flight here (and ``model``'s) changed: on the board,
        for the group's other workers, when there is one."""
        board = self.board
        if board is not None:
            board.publish(server.id, server.load.inflight)
            if model is not None:
                board.publish(model_cell(server.id, model), server.load.by_model.get(model, 0))

    def running(self, server: Server, model: str) -> int:
        """Requests of ``model`` in flight on ``server``: this process's, and its group's
        other workers' when it has a board (whose slots of the model they take too)."""
        board = self.board
        mine = server.load.by_model.get(model, 0)
        return mine + board.others(model_cell(server.id, model)) if board else mine

    def busy(self, server: Server) -> int:
        """Requests in flight on ``server``: this process's, and its group's other
        workers' (the load board) when it has one."""
        board = self.board
        return server.load.inflight + (board.others(server.id) if board else 0)

    def has_room(self, server: Server) -> bool:
        """A free slot: under its cap (this instance's share, or among workers alone on
        the store the group's, on the board), no probe while half-open."""
        load = server.load
        if load.probing:
            return False
        if self.board is not None and self.shared.siblings_only:
            return self.busy(server) < self.capacity(server)
        return load.inflight < self.shared.room(server.id, self.capacity(server))


    def candidates(self, servers: Iterable[Server], model: str | None,
                   exclude: frozenset[int] = frozenset()) -> list[Server]:
        now = time.monotonic()
        return [s for s in servers if s.id not in exclude and self.eligible(s, model, now)]

    def choose(self, candidates: Sequence[Server], model: str | None,
               affinity: Affinity | None = None) -> Server | None:
        """The server to use now among ``candidates``, or None if all are full."""
        ready = [s for s in candidates if self.has_room(s)]
        if not ready:
            return None
        if affinity is not None:
            sticky = self.sessions.get(affinity.hint) if affinity.hint is not None else None
            for server in ready:
                if server.id == sticky:
                    return server
            chosen = self.affine(ready, model, affinity, ANY_FREE)
            if chosen is not None:
                return chosen
        strategy = self.config.strategy
        if strategy == "random":
            return self._random.choice(ready)
        if strategy == "round_robin":
            self._turn += 1
            return sorted(ready, key=lambda s: s.id)[self._turn % len(ready)]
        return min(ready, key=lambda s: self._rank(s, model))

    def _rank(self, server: Server, model: str | None) -> tuple[int, float, float, float]:
        return (self.tier(server, model), self.busy(server) / self.capacity(server)
                / server.weight, -server.weight, self._random.random())

    def _key(self, server: Server, model: str | None, now: float
             ) -> tuple[int, float, float] | None:
        """``_rank`` without its random tie-break, with FULL for a server without a free
        slot; None if the server cannot take ``model`` at all."""
        if not self.eligible(server, model, now):
            return None
        capacity = self.capacity(server)
        tier = self.tier(server, model) if self.has_room(server) else FULL
        return (tier, self.busy(server) / capacity / server.weight, -server.weight)

    def _heap(self, servers: dict[int, Server], model: str | None) -> RankHeap:
        if servers is not self._ranked_fleet:
            self.invalidate()
            self._ranked_fleet = servers
        heap = self._ranked.get(model)
        if heap is None:
            heap = self._ranked[model] = RankHeap()
            now = time.monotonic()
            for server in servers.values():
                self._push(heap, server, model, now)
        return heap

    def _push(self, heap: RankHeap, server: Server, model: str | None, now: float) -> None:
        key = self._key(server, model, now)
        if key is None:
            heap.latest.pop(server.id, None)
            return
        stamp = next(self._stamps)
        heap.latest[server.id] = stamp
        heapq.heappush(heap.entries, (*key, self._random.random(), stamp, server.id))
        if len(heap.entries) > 2 * len(heap.latest) + 64:  # mostly stale: compact
            heap.entries = [e for e in heap.entries if heap.latest.get(e[5]) == e[4]]
            heapq.heapify(heap.entries)

    def invalidate(self) -> None:
        """Forgets the ranking: servers, their models or their health changed."""
        self._ranked.clear()

    def loaded(self, server: Server, model: str) -> None:
        """``model`` is being loaded on ``server``: better for that model there (worse for
        others, which is found out lazily)."""
        self.where_loaded.update(server)
        heap = self._ranked.get(model)
        if heap is not None:
            self._push(heap, server, model, time.monotonic())

    def least_busy(self, candidates: Sequence[Server], model: str | None) -> Server:
        """The best ranked of ``candidates``, full or not (getServer holds no slot)."""
        return min(candidates, key=lambda s: self._rank(s, model))

    def changed(self, server: Server) -> None:
        """Re-ranks ``server`` after it got better (a slot freed, its circuit closed);
        worse is found out lazily, when it comes to the top."""
        self.where_loaded.update(server)
        now = time.monotonic()
        for model, heap in self._ranked.items():
            if model is None or model in server.model_names:
                self._push(heap, server, model, now)

    def runnable(self, servers: dict[int, Server], model: str) -> bool:
        """Whether any server could serve ``model`` now, slots aside: least_load's index
        asked for its first eligible entry, not its best one (no re-ranking). Servers
        found unable are dropped from the index on the way, as best() drops them."""
        heap = self._heap(servers, model)
        now = time.monotonic()
        unable = []
        found = False
        for server_id in heap.latest:
            server = servers.get(server_id)
            if server is not None and self.eligible(server, model, now):
                found = True
                break
            unable.append(server_id)
        for server_id in unable:
            del heap.latest[server_id]
        return found

    def best(self, servers: dict[int, Server], model: str | None,
             exclude: frozenset[int] = frozenset(), max_tier: int = ANY_FREE
             ) -> tuple[Server | None, bool]:
        """least_load's choice, from a heap per model instead of a scan of the fleet: the
        top entry is checked against the server's state now and pushed again when it
        has changed, so a decision costs O(log n). Returns the server (None when none
        has a free slot in a tier up to ``max_tier``) and whether any could serve
        ``model`` at all."""
        heap = self._heap(servers, model)
        entries, latest = heap.entries, heap.latest
        now = time.monotonic()
        aside = []
        found: Server | None = None  # pragma: no mutate (an annotation, never evaluated)
        tier = FULL  # pragma: no mutate (read only once found is set, and set with it)
        while entries:
            top = entries[0]
            server = servers.get(top[5])
            if server is None or latest.get(top[5]) != top[4]:
                heapq.heappop(entries)  # superseded by a newer entry, or gone
                continue
            key = self._key(server, model, now)
            if key is None:
                heapq.heappop(entries)
                del latest[server.id]
                continue
            if key != top[:3]:
                heapq.heappop(entries)
                self._push(heap, server, model, now)
                continue
            if server.id in exclude:
                aside.append(heapq.heappop(entries))
                continue
            found, tier = server, key[0]
            break
        for entry in aside:
            heapq.heappush(entries, entry)
        if found is None:
            return None, False
        if tier > max_tier:
            return None, True
        if tier == EVICTS and model is not None:
            found = self._kindest_eviction(servers, model, exclude) or found
        return found, True

    def pick(self, servers: dict[int, Server], model: str | None,
             affinity: Affinity | None = None, exclude: frozenset[int] = frozenset(),
             max_tier: int = ANY_FREE) -> tuple[Server | None, bool]:
        """The server for a request now, by the configured strategy (None when every
        candidate is full, or past ``max_tier``), and whether any could serve it. With
        an ``affinity``: where this process sent an earlier turn, if that can take it
        without a load (it may wait there behind the model's running requests: its
        cache is worth it), which keeps a conversation whose own server was passed over
        where its cache is; else its own server by rendezvous hashing, which every
        process finds alike (affine()); else as any other request."""
        if self.config.strategy != "least_load":
            candidates = self.candidates(servers.values(), model, exclude)
            return self.choose(candidates, model, affinity), bool(candidates)
        if affinity is not None:
            now = time.monotonic()
            if affinity.hint is not None:  # where this process sent an earlier turn
                sticky = servers.get(self.sessions.get(affinity.hint, -1))
                if sticky is not None and sticky.id not in exclude:
                    key = self._key(sticky, model, now)
                    if key is not None and key[0] <= max_tier:
                        return sticky, True
            # Among the servers that hold the model loaded, a few at most; loaded nowhere
            # (a cold load is coming anyway), among every one that could load it.
            candidates = [s for s in self.where_loaded.pool(servers, model) if s.id not in
                          exclude and self.eligible(s, model, now)] if model else []
            if candidates or (candidates := self.candidates(servers.values(), model, exclude)):
                chosen = self.affine(candidates, model, affinity, max_tier)
                if chosen is not None:
                    return chosen, True
        return self.best(servers, model, exclude, max_tier)

    def affine(self, candidates: Sequence[Server], model: str | None, affinity: Affinity,
               max_tier: int) -> Server | None:
        """The affinity's server among ``candidates``, by rendezvous hashing of its key
        with bounded loads (consistent hashing with bounded loads, Mirrokni et al.): the
        first in the key's order, among those that hold the model loaded when any does,
        that runs at most (1 + AFFINITY_SLACK) times its share, by capacity, of their
        requests (or fewer than its model surely runs at once), and can take this one: at
        once (a slot of its model surely free, or, loaded nowhere, memory free to load it
        without evicting), or, the first such server when its prompt may be cached there
        (``affinity.cached``), behind the model's running requests. None when none can.
        Every process walks the same order; they may differ for a while on where a model
        was just loaded (each learns it from its own requests, and from /api/ps)."""
        if model is not None:
            candidates = [s for s in candidates if model in s.load.loaded] or candidates
        shares: tuple[int, int] | None = None  # the candidates' requests and capacity
        patient = affinity.cached
        for server in rendezvous_order(affinity.key, candidates):
            # What its model surely runs at once there: while the limit is a guess (one
            # more than seen), what was seen. A conversation goes where it runs at once
            # for sure; past that, the ranking decides (this process still keeps it
            # where it went before, if it can wait there: pick()'s hint).
            parallel, source = self.parallel_known(server)
            sure = parallel - 1 if source == "guessed" else parallel
            busy = self.busy(server)
            # Within that, a server is never passed over (bounds at a light load would be
            # one request a server, and move conversations for nothing); past it, not
            # past (1 + AFFINITY_SLACK) times its share.
            if busy >= sure:
                if shares is None:
                    shares = (sum(self.busy(s) for s in candidates) + 1,
                              sum(self.capacity(s) for s in candidates))
                total, room = shares
                if busy + 1 > math.ceil((1 + AFFINITY_SLACK) * total
                                        * self.capacity(server) / room):
                    continue  # a hot key's overflow goes on down its order
            if not self.has_room(server):
                continue
            tier = self.tier(server, model)
            if tier > max_tier:
                continue
            # Its own server, where its prompt may be cached: worth a wait for a slot.
            home, patient = patient, False
            if tier == 1 or (home and tier == 2):
                return server
            if tier == 0 and (model is None or home or self.running(server, model) < sure):
                return server
        return None

    def _kindest_eviction(self, servers: dict[int, Server], model: str,
                          exclude: frozenset[int]) -> Server | None:
        """Where to load ``model`` when each server that could would evict an idle model
        (EVICTS): the least busy of those whose evicted model (Ollama's least recently
        used idle one) another server holds too, else the least busy; and among either,
        first one that may hold another model (its limit not yet seen): the load then
        evicts nothing, or shows the limit. Evicting a model's last copy makes its next
        request load it again elsewhere, evicting another, and the cold loads cascade. A
        scan of the fleet, for the rare decision that costs a load anyway."""
        now = time.monotonic()
        copies = collections.Counter(m for s in servers.values()
                                     if self.eligible(s, None, now) for m in s.load.loaded)

        def last_copy(server: Server) -> bool:
            victim = evicted(server.load)
            return victim is None or copies[victim] <= 1

        def surely_evicts(server: Server) -> bool:  # its limit known, or memory short
            return self.resident_known(server)[1] not in ("guessed", "fleet") or not (
                self.fits(server, model))

        return min((s for s in servers.values()
                    if s.id not in exclude and self.eligible(s, model, now)
                    and self.has_room(s) and self.tier(s, model) == EVICTS),
                   key=lambda s: (last_copy(s), surely_evicts(s), self._rank(s, model)),
                   default=None)

    def tier(self, server: Server, model: str | None) -> int:
        """How soon ``model`` would run on ``server``, from Ollama's own scheduling
        (OLLAMA_NUM_PARALLEL requests per loaded model, OLLAMA_MAX_LOADED_MODELS models,
        only an idle model can be evicted):

        0. loaded, with a free slot: runs at once;
        1. not loaded, memory free: a cold load, but nothing evicted, and one more server
           holds the model for what follows;
        2. loaded, every slot taken: waits behind this model's running requests;
        3. not loaded, an idle model to evict: a cold load, and someone's model is gone;
        4. not loaded, every loaded model busy: waits for one to drain, then loads.

        Within a tier: the smallest share of capacity in use per unit of weight, then
        the heavier server (the bigger GPU), then at random, so equal servers share work.
        """
        if model is None:
            return 0
        load = server.load
        if model in load.loaded:
            return 0 if self.running(server, model) < self.parallel(server) else 2
        if len(load.loaded) < self.resident(server) and self.fits(server, model):
            return 1
        return EVICTS if any(not self.running(server, m) for m in load.loaded) else 4


class Scheduler:
    """Hands out slots on servers, each picked by its Ranking, and holds requests in one
    fleet-wide queue while every candidate is at its maxConcurrency; keeps each server's
    breaker.

    Ollama runs OLLAMA_NUM_PARALLEL requests per loaded model and queues the rest on that
    server, where a free GPU elsewhere cannot take them; a cold load costs seconds. So the
    balancer prefers servers that have the model loaded, then the least busy, and keeps
    overflow here, where the first slot to free up anywhere serves it."""

    def __init__(self, config: Config, board: LoadBoard | None = None) -> None:
        self.config = config
        self.ranking = Ranking(config, board)
        self.queue = WaitQueue()
        self._expiry: asyncio.TimerHandle | None = None  # QUEUE_TIMEOUT of the oldest
        # Moving averages, in seconds, of what the fleet's requests take: a warm one whole,
        # a warm one's first byte, and the extra first-byte wait of a cold model load.
        self.service_seconds = 1.0
        self.first_byte_seconds = 0.1
        self.load_seconds = 5.0
        #: The worst tier a request takes as it arrives, with least_load: one that does
        #: not evict a model; past that it is dispatched as the queued are (_pass_tier):
        #: it waits here for a slot of its model instead, while that takes less than a
        #: load.
        self._arriving = EVICTS - 1 if config.strategy == "least_load" else ANY_FREE

    # -- slots and the queue -------------------------------------------------------

    def waiting(self) -> int:
        """Requests in the queue."""
        return len(self.queue)

    def demand(self, servers: dict[int, Server]) -> dict[str, int]:
        """What this instance wants of each server (SharedCapacity.demand)."""
        return self.ranking.shared.demand(servers, self.queue)

    async def acquire(self, servers: dict[int, Server], model: str | None,
                      affinity: Affinity | None = None, exclude: frozenset[int] = frozenset(),
                      tenant: Tenant = NO_TENANT) -> Slot:
        """A server with a free slot for ``model``, waiting in the queue if need be.

        Raises NoCandidate, QueueFull or QueueTimeout. Cancelling the caller (its client
        went away) takes it out of the queue at once.
        """
        if self.queue and model is not None and not exclude:
            # Others wait: it waits behind them (FIFO), so whether it can be served at
            # all is all there is to know, and the index tells that without ranking.
            server, possible = None, self.ranking.runnable(servers, model)
        else:
            server, possible = self.ranking.pick(servers, model, affinity, exclude,
                                                 self._arriving)
        if not possible:
            raise NoCandidate(model)
        if server is None and not self.queue:
            # Its model's servers are full: past its own tier rule (loaded nowhere, or a
            # backlog that a load pays for), it is loaded elsewhere.
            max_tier = self._pass_tier(servers, model, "any", True, time.monotonic())
            if max_tier > self._arriving:
                server, _ = self.ranking.pick(servers, model, affinity, exclude, max_tier)
        if server is not None and not self.queue:  # FIFO: nobody passes those waiting
            slot = self.claim(server, model, affinity)
            if slot is not None:
                return slot
        if len(self.queue) >= self.config.max_queue:
            raise QueueFull
        loop = asyncio.get_running_loop()
        waiter = Waiter(model, exclude, affinity, loop.create_future(), tenant)
        self.queue.append(waiter)
        # A slot may be free for this one but not for those ahead (of other models); not
        # when one of its model is ahead: that one could not be served at the last
        # dispatch, and every change that makes room dispatches again.
        if not self.queue.behind(waiter):
            self.dispatch(servers, joined=waiter)
        if self._expiry is None:  # one timer for the queue, at its oldest's deadline
            self._expiry = loop.call_later(self.config.queue_timeout, self._expire)
        # Awaited as it is, neither shielded nor under wait_for: a grant that lands as the
        # caller is cancelled must come back here to be given back (wait_for on 3.11
        # would hand it to a task that was told to stop).
        try:
            return await waiter.future
        except BaseException:
            granted = waiter.future
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                self.release(servers, granted.result())  # granted late: given back
            else:
                granted.cancel()
                self.queue.discard(waiter)
            raise

    def _expire(self) -> None:
        """QUEUE_TIMEOUT: the waiters whose time is up get QueueTimeout; the timer is set
        again for the oldest left, if any."""
        self._expiry = None
        timeout = self.config.queue_timeout
        for waiter in self.queue.expired(time.monotonic() - timeout):
            if not waiter.future.done():
                waiter.future.set_exception(QueueTimeout())
        oldest = self.queue.oldest()
        if oldest is not None:
            self._expiry = asyncio.get_running_loop().call_later(
                max(0.0, oldest.since + timeout - time.monotonic()), self._expire)

    def claim(self, server: Server, model: str | None, affinity: Affinity | None = None
              ) -> Slot | None:
        """take(), on a server the ranking found room on: among workers sharing a cap on
        their board, under its lock and only while the room is still there (another
        worker may have taken it since); None when it is not."""
        board = self.ranking.board
        if board is None or not self.ranking.shared.siblings_only:
            return self.take(server, model, affinity)
        with board.locked():
            if not self.ranking.has_room(server):
                return None
            return self.take(server, model, affinity)

    def take(self, server: Server, model: str | None, affinity: Affinity | None = None
             ) -> Slot:
        """A slot on ``server``, room or not (a request that chose its server itself)."""
        load = server.load
        cold = model is not None and model not in load.loaded
        load.inflight += 1
        load.requests += 1
        load.tally(1)
        if model is not None:
            load.asked.add(model)
            if model not in load.loaded and len(load.loaded) >= self.ranking.resident(server):
                victim = evicted(load)
                if victim is not None:
                    del load.loaded[victim]
            load.by_model[model] = load.by_model.get(model, 0) + 1
            load.loaded[model] = time.monotonic()
        self.ranking.counted(server, model)
        probe = load.breaker_open
        if probe:
            load.probing += 1  # half-open: this request is the probe
        if affinity is not None and affinity.hint is not None:
            self.ranking.remember(affinity.hint, server.id)
        if cold and model is not None:  # now loaded: better for this model, worse for others
            self.ranking.loaded(server, model)
        ahead = load.learned.generating.get(model, 0) if model is not None else 0
        return Slot(server, model, cold, probe, time.monotonic(), ahead)

    def first_token(self, servers: dict[int, Server], slot: Slot) -> None:
        """The answer ``slot`` holds has begun streaming (its first token came)."""
        if slot.model is not None and not slot.streaming:
            slot.streaming = True
            slot.server.load.learned.first_token(slot.model, slot.ahead, slot.taken,
                                                 time.monotonic())
            if self.ranking.learned(servers, slot.server):  # more room, perhaps
                self.dispatch(servers)

    def release(self, servers: dict[int, Server], slot: Slot) -> None:
        """Gives a slot back, on every path: answered, failed, or abandoned (its client
        left, its grant came too late). A probe that ended without a verdict (record())
        leaves the circuit half-open, so the next request probes again."""
        server, model = slot.server, slot.model
        load = server.load
        if slot.probe:
            load.probing -= 1
        if slot.streaming and model is not None:
            slot.streaming = False
            load.learned.answered(model, time.monotonic())
        load.inflight -= 1
        if model is not None:
            left = load.by_model.get(model, 1) - 1
            if left:
                load.by_model[model] = left
            else:
                load.by_model.pop(model, None)
        self.ranking.counted(server, model)
        self.ranking.changed(server)
        self.dispatch(servers, server)

    def dispatch(self, servers: dict[int, Server], freed: Server | None = None,
                 joined: Waiter | None = None) -> None:
        """Hands free slots to queued requests: to those ``freed`` can run when only that
        server has room anew, to those of ``joined``'s model when only it is new, else to
        all (what else changed since the last dispatch could not serve them).

        With least_load, oldest first, but a busy fleet must not thrash: a freed slot goes
        first to the oldest request that can run there at once (its model loaded, a slot
        of it free); a request whose model is loaded somewhere waits for a slot of it
        rather than evict another model (seconds of GPU time, and a model someone is about
        to want gone), unless more wait for that model than the fleet has slots of it. A
        request that has waited QUEUE_AGING seconds is served before the rest, in arrival
        order, by the same rule, so nobody starves.
        """
        queue = self.queue
        if not queue:
            return
        if joined is not None:
            models = [joined.model]
        else:
            models = [m for m in queue.waiting
                      if freed is None or m is None or m in freed.model_names]
        now = time.monotonic()
        # round_robin and random keep their plain meaning here too: strict FIFO.
        passes: tuple[str, ...] = ("any",)
        if self.config.strategy == "least_load":
            oldest = queue.oldest()
            aged = oldest is not None and now - oldest.since >= QUEUE_AGING
            passes = ("aged", "ready", "any") if aged else ("ready", "any")
        choosy = self.config.strategy == "least_load"
        for pass_ in passes:
            self._serve(servers, models, pass_, choosy, now)
            if freed is not None and not self.ranking.has_room(freed):
                break  # the one server with new room has none left: nothing more to give
        for name in models:
            queue.tidy(name)

    def _serve(self, servers: dict[int, Server], models: list[str | None], pass_: str,
               choosy: bool, now: float) -> None:
        """One pass of dispatch: the oldest waiter of every model first, and so on in
        arrival order, each up to the tier ``pass_`` allows its model; a model none of
        whose servers has room at that tier is left for the pass (its later waiters want
        the same), unless the waiter kept some servers out (a retry) or has left."""
        queue = self.queue
        aged = pass_ == "aged"
        heads = []
        for model in models:
            waiters = queue.following(model)
            first = next(waiters, None)
            # The aged pass passes over a model whose oldest is young (the rest are too).
            if first is not None and not (aged and now - first.since < QUEUE_AGING
                                          and not first.future.done()):
                heads.append((first.rank, waiters, first))
        heapq.heapify(heads)  # by place: ``rank`` is unique, nothing else is compared
        tiers: dict[str | None, int] = {}  # each model's, worked out when first needed
        while heads:
            _, waiters, waiter = heapq.heappop(heads)
            model = waiter.model
            if waiter.future.done():  # cancelled, its task not yet back to discard it
                queue.discard(waiter)
            elif aged and now - waiter.since < QUEUE_AGING:
                continue  # its model's first is young: its turn comes in the later passes
            else:
                max_tier = tiers.get(model)
                if max_tier is None:
                    max_tier = tiers[model] = self._pass_tier(servers, model, pass_, choosy,
                                                              now)
                server, possible = self.ranking.pick(servers, model, waiter.affinity,
                                                     waiter.exclude, max_tier)
                if not possible:  # its servers went away while it waited (a failed probe)
                    queue.discard(waiter)
                    waiter.future.set_exception(NoCandidate(model))
                elif server is not None and (
                        slot := self.claim(server, model, waiter.affinity)) is not None:
                    queue.served(waiter)
                    waiter.future.set_result(slot)
                elif not waiter.exclude:
                    continue
            following = next(waiters, None)
            if following is not None:
                heapq.heappush(heads, (following.rank, waiters, following))

    def _pass_tier(self, servers: dict[int, Server], model: str | None, pass_: str,
                   choosy: bool, now: float) -> int:
        """The worst tier a pass lets ``model``'s waiters take (see Scheduler.tier)."""
        if pass_ == "ready":
            return 0
        if choosy:
            # Its model loaded somewhere and enough slots of it for those waiting: wait
            # for one rather than evict another model here. Past that, the model is short
            # of servers and a load pays for itself: when the wait for a slot, backlog /
            # slots requests long, exceeds the load itself (both measured, observe()).
            # Not a load that waits for a busy model to drain first, though (tier 4): that
            # model's requests would be the next short of slots.
            slots = sum(self.ranking.parallel(s) for s in servers.values()
                        if model in s.load.loaded and self.ranking.eligible(s, model, now))
            worth = self.load_seconds / max(self.service_seconds, 1e-3)
            if slots:
                return 1 if self.queue.waiting[model] <= slots * worth else EVICTS
        return ANY_FREE

    def observe(self, cold: bool, first_byte: float, total: float) -> None:
        """Learns from a finished request how long requests and model loads take."""
        alpha = 0.1
        if cold:
            extra = max(0.0, first_byte - self.first_byte_seconds)
            self.load_seconds += alpha * (extra - self.load_seconds)
        else:
            self.first_byte_seconds += alpha * (first_byte - self.first_byte_seconds)
            self.service_seconds += alpha * (total - self.service_seconds)

    # -- circuit breaker -------------------------------------------------------------

    def record(self, servers: dict[int, Server], server: Server, ok: bool,
               kind: str = "") -> None:
        """Counts a request's outcome (a failure of ``kind``); N failures in a row open the
        circuit for a while, after which one probe request closes it again or reopens it."""
        load = server.load
        if ok:
            self.close_circuit(server, "a request succeeded")
            load.failures = 0
            return
        load.failure_kind = kind
        load.errors += 1
        load.tally(2)
        load.failures += 1
        if load.breaker_open or load.failures >= self.config.breaker_threshold:
            if not load.breaker_open:
                log.warning("circuit of %s opened after %d failures", server.label,
                            load.failures)
            load.breaker_open = True
            load.open_until = time.monotonic() + self.config.breaker_cooldown
            loop = asyncio.get_running_loop()
            loop.call_later(self.config.breaker_cooldown + 0.01, self._cooled, servers, server)

    def close_circuit(self, server: Server, why: str) -> None:
        if server.load.breaker_open:
            server.load.breaker_open = False
            server.load.failures = 0
            log.info("circuit of %s closed: %s", server.label, why)
            self.ranking.changed(server)

    def _cooled(self, servers: dict[int, Server], server: Server) -> None:
        """A circuit's cooldown is over: the server may take a probe request."""
        self.ranking.changed(server)
        self.dispatch(servers)


# ---------------------------------------------------------------------------
# Metrics: the Prometheus text exposition format, by hand
# ---------------------------------------------------------------------------

#: Histogram buckets in seconds, from a cached embedding to a cold 70B load and a long answer.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0, 300.0, 600.0)

Labels = tuple[tuple[str, str], ...]


def _label_text(labels: Labels) -> str:
    if not labels:
        return ""
    escaped = (value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
               for _, value in labels)
    return "{" + ",".join(f'{name}="{value}"' for (name, _), value in zip(
        labels, escaped, strict=True)) + "}"


class Histogram:
    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * len(LATENCY_BUCKETS)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        index = bisect.bisect_left(LATENCY_BUCKETS, value)
        if index < len(self.counts):  # past the last bound: counted in +Inf only
            self.counts[index] += 1


#: A sample's label values, in the order of its family's label names (Metrics.FAMILIES);
#: the names are put to them only when scraped.
LabelValues = tuple[Any, ...]


class Metrics:
    """Counters and histograms of this instance, prefixed ``ollamabalancer_``, each
    sample keyed by its label values alone. Gauges are read from the fleet when
    scraped."""

    PREFIX = "ollamabalancer_"
    FAMILIES: ClassVar[dict[str, tuple[str, tuple[str, ...], str]]] = {
        "requests_total": ("counter", ("endpoint", "server", "model", "status"),
                           "Requests answered, by endpoint, server, model, status."),
        "upstream_errors_total": ("counter", ("server", "kind"),
                                  "Upstream failures: connect, timeout, http_5xx, "
                                  "cut_stream."),
        "tokens_total": ("counter", ("server", "model"),
                         "Tokens generated (eval_count of Ollama's last line)."),
        "recoveries_total": ("counter", ("outcome",),
                             "Streamed answers whose server failed mid-answer, by what "
                             "became of them: continued on another server, or not (failed, "
                             "no_server, not_resumable, over_limit, restarts, unverified, "
                             "off)."),
        "key_tokens_total": ("counter", ("key", "model", "kind"),
                             "Tokens by API key (its name; \"\" without one), model and kind "
                             "(prompt, completion), from each answer's final counts."),
        "queue_wait_seconds": ("histogram", (), "Time requests waited in the fleet queue."),
        "recovery_gap_seconds": ("histogram", (),
                                 "Time from a stream's failure to the continuation's first "
                                 "token."),
        "ttfb_seconds": ("histogram", ("server", "model"), "Time to the first response byte."),
        "request_duration_seconds": ("histogram", ("server", "model"),
                                     "Time to the last response byte."),
    }

    def __init__(self) -> None:
        self.counters: dict[str, dict[LabelValues, float]] = {
            name: {} for name, (kind, _, _) in self.FAMILIES.items() if kind == "counter"}
        self.histograms: dict[str, dict[LabelValues, Histogram]] = {
            name: {} for name, (kind, _, _) in self.FAMILIES.items() if kind == "histogram"}

    def count(self, name: str, values: LabelValues, amount: float = 1.0) -> None:
        family = self.counters[name]
        family[values] = family.get(values, 0.0) + amount

    def observe(self, name: str, values: LabelValues, value: float) -> None:
        family = self.histograms[name]
        histogram = family.get(values)
        if histogram is None:
            histogram = family[values] = Histogram()
        histogram.observe(value)

    def render(self, gauges: dict[str, tuple[str, list[tuple[Labels, float]]]]) -> str:
        lines: list[str] = []

        def header(name: str, kind: str, text: str) -> None:
            lines.append(f"# HELP {self.PREFIX}{name} {text}")
            lines.append(f"# TYPE {self.PREFIX}{name} {kind}")

        for name, (kind, names, text) in self.FAMILIES.items():
            header(name, kind, text)
            if kind == "counter":
                for values, value in sorted(self.counters[name].items(), key=_text_key):
                    shown = _label_text(tuple(zip(names, map(str, values), strict=True)))
                    lines.append(f"{self.PREFIX}{name}{shown} {value:g}")
                continue
            for values, histogram in sorted(self.histograms[name].items(), key=_text_key):
                pairs = tuple(zip(names, map(str, values), strict=True))
                cumulative = 0
                for bound, count in zip(LATENCY_BUCKETS, histogram.counts, strict=True):
                    cumulative += count
                    lines.append(f"{self.PREFIX}{name}_bucket"
                                 f"{_label_text((*pairs, ('le', f'{bound:g}')))} {cumulative}")
                lines.append(f"{self.PREFIX}{name}_bucket"
                             f"{_label_text((*pairs, ('le', '+Inf')))} {histogram.count}")
                lines.append(f"{self.PREFIX}{name}_sum{_label_text(pairs)} {histogram.sum:g}")
                lines.append(f"{self.PREFIX}{name}_count{_label_text(pairs)} "
                             f"{histogram.count}")
        for name, (text, samples) in gauges.items():
            header(name, "gauge", text)
            for labels, value in samples:
                lines.append(f"{self.PREFIX}{name}{_label_text(labels)} {value:g}")
        return "\n".join(lines) + "\n"

    def snapshot(self) -> dict[str, Any]:
        """The counts, as JSON for the other workers of a group (WorkerGroup)."""
        return {"counters": {name: list(family.items())
                             for name, family in self.counters.items()},
                "histograms": {name: [(values, h.counts, h.count, h.sum)
                                      for values, h in family.items()]
                               for name, family in self.histograms.items()}}

    def absorb(self, snapshot: dict[str, Any]) -> None:
        """Adds another worker's counts, as its snapshot() gave them, to these. Raises
        ValueError (or TypeError, KeyError) for anything else, leaving these whole."""
        counters = [(name, self._values(name, values), float(value))
                    for name, family in snapshot["counters"].items()
                    for values, value in family]
        histograms = [(name, self._values(name, values), [int(n) for n in counts],
                       int(count), float(total))
                      for name, family in snapshot["histograms"].items()
                      for values, counts, count, total in family]
        if any(len(counts) != len(LATENCY_BUCKETS) for _, _, counts, _, _ in histograms):
            raise ValueError("histogram buckets differ")
        for name, values, value in counters:
            self.count(name, values, value)
        for name, values, counts, count, total in histograms:
            histogram = self.histograms[name].setdefault(values, Histogram())
            histogram.counts = [a + b for a, b in zip(histogram.counts, counts, strict=True)]
            histogram.count += count
            histogram.sum += total

    def _values(self, name: str, values: Sequence[Any]) -> LabelValues:
        """Label values read back from JSON, checked against the family's names."""
        if len(values) != len(self.FAMILIES[name][1]):
            raise ValueError(f"{name}: {len(values)} label values")
        return tuple(str(value) for value in values)


def _text_key(item: tuple[LabelValues, Any]) -> tuple[str, ...]:
    return tuple(map(str, item[0]))


class WorkerGroup:
    """The workers of one supervisor (WORKERS=N), as each of them sees the group.

    Prometheus' multiprocess mode, in JSON files: every worker writes what it counts to
    a file of its own in a directory private to the group, every SYNC_INTERVAL and again
    before it answers /metrics, and reads the others' files to answer for them all. A
    dead worker's file stays, so the group's counters never go back when a worker is
    replaced (what it counted in its last second is lost with it); what is in flight or
    queued counts only from files written within the last few beats (``live``).
    """

    def __init__(self, directory: str, parent: int, stale_after: float, index: int = 0,
                 ready_fd: int = -1, workers: int = 0) -> None:
        self.directory = directory
        #: In-flight counts shared with the other workers (None without a board made by
        #: a supervisor of ``workers``).
        self.board = LoadBoard(board_path(directory), workers, index) if workers else None
        self.parent = parent  # the supervisor: a worker that outlives it drains and exits
        self.stale_after = stale_after
        self.index = index
        self.ready_fd = ready_fd
        # Named for this process and start: a new worker that gets a dead one's pid must
        # not write over what the dead one counted.
        self.own = f"worker-{os.getpid()}-{secrets.token_hex(4)}.json"

    def announce(self) -> None:
        """Tells the supervisor this worker is listening."""
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, b".")

    def orphaned(self) -> bool:
        return os.getppid() != self.parent

    def publish(self, snapshot: dict[str, Any]) -> None:
        """Writes this worker's file whole: a reader sees the last one or this one."""
        path = os.path.join(self.directory, self.own)
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(snapshot, handle, separators=(",", ":"))
        os.replace(path + ".tmp", path)

    def snapshots(self, *, others_only: bool = False) -> list[dict[str, Any]]:
        """Every worker's last file (or the others' only), each marked ``live``, and
        ``own`` for this worker's."""
        found = []
        with contextlib.suppress(OSError):
            names = sorted(os.listdir(self.directory))
            for name in names:
                if not (name.startswith("worker-") and name.endswith(".json")) or (
                        others_only and name == self.own):
                    continue
                try:
                    with open(os.path.join(self.directory, name), "rb") as handle:
                        snapshot = json.loads(handle.read())
                    snapshot["live"] = time.time() - float(snapshot["time"]) <= self.stale_after
                    snapshot["own"] = name == self.own
                except (OSError, ValueError, TypeError, KeyError):
                    continue  # gone, or a worker that died mid-write (its .tmp is skipped)
                found.append(snapshot)
        return found


class LoadBoard:
    """The requests each worker of a group (WORKERS=N) has in flight on each server, in
    memory the workers share (a file in the group's directory, mapped by each): every
    worker sees the others' within the instant, where the store's heartbeats take a
    second or two, so a server's cap and the ranking hold for the group as for one
    process.

    A row per worker, which only that worker writes: a header (the hash of its instance
    id, its pid) and BOARD_SLOTS cells of (server id, count), a server's cell found from
    its id within BOARD_PROBE cells (a count of 0 frees a cell for another server). A
    32-bit store is one write that readers see whole. Taking the last slot of a server
    is done under an advisory lock on the file (claim()), so two workers never both take
    it; readers read without one."""

    HEADER = 4  # ints: instance hash (2), pid, unused

    def __init__(self, path: str, workers: int, index: int) -> None:
        import fcntl  # POSIX only, as workers are

        self._lockf = fcntl.flock
        self._exclusive, self._unlock = fcntl.LOCK_EX, fcntl.LOCK_UN
        self.workers, self.index = workers, index
        self._row = self.HEADER + 2 * BOARD_SLOTS
        self._fd = os.open(path, os.O_RDWR)  # its own: flock excludes open files, not pids
        self._map = mmap.mmap(self._fd, workers * self._row * 4)
        self._cells = memoryview(self._map).cast("i")
        self._own = index * self._row

    @classmethod
    def create(cls, path: str, workers: int) -> None:
        """Makes the board, every row empty (the supervisor, before the first fork)."""
        with open(path, "wb") as handle:
            handle.truncate(workers * (cls.HEADER + 2 * BOARD_SLOTS) * 4)

    @classmethod
    def clear(cls, path: str, workers: int, index: int) -> None:
        """Empties worker ``index``'s row: it died, and what it had in flight is gone."""
        with contextlib.suppress(OSError):
            board = cls(path, workers, index)
            board.join("")
            board.close()

    def join(self, instance: str) -> None:
        """Starts this worker's row anew, as ``instance`` on the store."""
        own = self._own
        self._cells[own:own + self._row] = memoryview(bytes(self._row * 4)).cast("i")
        hashed = _instance_hash(instance) if instance else 0
        low = hashed & 0xFFFFFFFF
        self._cells[own] = hashed >> 32  # 31 bits: the hash has 63
        self._cells[own + 1] = low - (1 << 32) if low >= 1 << 31 else low  # as int32
        self._cells[own + 2] = os.getpid()

    def siblings(self) -> set[int]:
        """The instance hashes of the group's other workers."""
        cells, found = self._cells, set()
        for row in range(self.workers):
            base = row * self._row
            if row != self.index and (cells[base] or cells[base + 1]):
                found.add((cells[base] << 32) | (cells[base + 1] & 0xFFFFFFFF))
        return found

    def publish(self, server_id: int, count: int) -> None:
        """This worker's requests in flight on ``server_id`` are ``count`` now."""
        cells, base = self._cells, self._own + self.HEADER
        start = server_id % BOARD_SLOTS
        free = -1
        for step in range(BOARD_PROBE):
            cell = base + 2 * ((start + step) % BOARD_SLOTS)
            if cells[cell] == server_id:
                cells[cell + 1] = count
                return
            if free < 0 and cells[cell + 1] == 0:
                free = cell
        if free >= 0 and count:
            cells[free] = server_id
            cells[free + 1] = count
        # else: its neighbourhood is full of other busy servers: it goes unseen by the
        # others (a count too low) until one of them is idle again.

    def others(self, server_id: int) -> int:
        """The other workers' requests in flight on ``server_id``."""
        cells, total = self._cells, 0
        start = server_id % BOARD_SLOTS
        for row in range(self.workers):
            if row == self.index:
                continue
            base = row * self._row + self.HEADER
            for step in range(BOARD_PROBE):
                cell = base + 2 * ((start + step) % BOARD_SLOTS)
                if cells[cell] == server_id:
                    total += cells[cell + 1]
                    break
        return total

    def view(self) -> bytes:
        """The board as it is now: compare two to see whether anything changed."""
        return self._map[:]

    def changed_servers(self, before: bytes, after: bytes) -> set[int]:
        """The servers whose counts by other workers differ between two views."""
        old, new = memoryview(before).cast("i"), memoryview(after).cast("i")
        changed: set[int] = set()
        block = 256  # ints, 128 cells: compared whole (in C), and looked into if they differ
        for row in range(self.workers):
            if row == self.index:
                continue
            base = row * self._row + self.HEADER
            for start in range(base, base + 2 * BOARD_SLOTS, block):
                if old[start:start + block] == new[start:start + block]:
                    continue
                for cell in range(start, start + block, 2):
                    if old[cell + 1] != new[cell + 1] or old[cell] != new[cell]:
                        changed.update(i for i in (old[cell], new[cell]) if i)
        return changed

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held while a worker checks a server's room and takes a slot of it."""
        self._lockf(self._fd, self._exclusive)
        try:
            yield
        finally:
            self._lockf(self._fd, self._unlock)

    def close(self) -> None:
        self._cells.release()
        self._map.close()
        os.close(self._fd)


def board_path(directory: str) -> str:
    return os.path.join(directory, "load-board")


#: The counts an answer ends with: Ollama's final object (its metrics come after the
#: message, in Go's field order), OpenAI's and Anthropic's usage. A JSON string cannot
#: hold a bare quote, so a match is a key, never text of the answer.
_PROMPT_COUNTS = (b'"prompt_eval_count"', b'"prompt_tokens"', b'"input_tokens"')
_COMPLETION_COUNTS = (b'"eval_count"', b'"completion_tokens"', b'"output_tokens"')
_count_value_re = re.compile(rb"\s*:\s*([0-9]{1,15})")


def _last_count(tail: bytes, keys: Sequence[bytes]) -> int | None:
    """The value of the last of ``keys`` in ``tail`` that has a number, searched from
    the end (a stream's counts are in its last line: a scan of the whole tail cost a
    streamed answer 22 us)."""
    found, value = -1, None
    for key in keys:
        end = len(tail)
        while (at := tail.rfind(key, 0, end)) > found:
            match = _count_value_re.match(tail, at + len(key))
            if match is not None:
                found, value = at, int(match.group(1))
                break
            end = at
    return value


def answer_tokens(tail: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the last counts in an answer's last bytes (a
    stream's final line, or a whole answer's end), None when it says none. Found by
    search, not by parsing: the last line of a long answer may begin before ``tail``."""
    completion = _last_count(tail, _COMPLETION_COUNTS)
    if completion is None:
        return None
    return _last_count(tail, _PROMPT_COUNTS) or 0, completion


def eval_count(tail: bytes) -> tuple[int, str | None] | None:
    """(eval_count, model) from the last JSON line of an Ollama answer, if it has one."""
    if b'"eval_count"' not in tail:
        return None
    end = len(tail)
    while not (line := tail[(start := tail.rfind(b"\n", 0, end) + 1):end]).strip():
        if not start:
            return None
        end = start - 1  # the last line that is not blank, without splitting them all
    try:
        last = decode_json(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(last, dict) and isinstance(last.get("eval_count"), int):
        model = last.get("model")
        return last["eval_count"], model if isinstance(model, str) else None
    return None


# ---------------------------------------------------------------------------
# Requests and responses: what every handler is given and returns
# ---------------------------------------------------------------------------


class Request:
    """One request on a client connection: what came (its head, its body, read through
    it at most once), and the means to answer it. What the rooms did with it comes back
    from them as values (Relayed); what was written to the client is counted by its
    connection (Wire.sent). The front (Balancer.dispatch) names it and says who sent it:
    ``id``, ``endpoint``, ``authenticated``, ``privileged`` and ``response_fields``."""

    def __init__(self, wire: Wire, head: RequestHead, body_timeout: float = BODY_TIMEOUT,
                 budget: ByteBudget | None = None) -> None:
        self.wire = wire
        self.head = head
        self.body_timeout = body_timeout
        self.budget = budget  # what buffered bodies may hold, shared by every request
        self.held = 0  # bytes of it this request holds, given back by close()
        self.body_clock: float | None = None  # when its body was first waited for
        self.method = head.method
        path, _, self.query = head.target.partition("?")
        self.path = path
        self.framing = request_framing(head)
        self.body_done = self.framing.kind == "none"
        self.body_started = False
        #: Called when the body has been read whole while the client has gone already.
        self._on_body_done: Callable[[], None] | None = None
        #: The client's address: its connection's peer, or, from a trusted proxy, what the
        #: proxy says (Access.client_of); ``forwarded``: it carried the word of a proxy
        #: this balancer does not trust, so it is not taken for a client on this host.
        self.client = wire.peer
        self.forwarded = False
        self.authenticated = False  # its Authorization was the balancer's: not sent on
        self.privileged = False  # the admin token's: errors about upstreams keep their detail
        self.key: ApiKey | None = None  # the client API key it came with
        #: (the model name the client asked for, as it sent it; the real model sent on)
        #: when the fleet file's policy put another name upstream (an alias, a fallback).
        self.renamed: tuple[str, str] | None = None
        self.id = ""  # X-Request-Id, in the response and the access log
        self.endpoint = "unmatched"  # the route's label, for the metrics
        #: Fields every response to it carries (X-Request-Id, CORS), whoever writes it.
        self.response_fields: list[tuple[str, str]] = []
        self.started = time.monotonic()
        wire.mark()  # what it is sent is counted from here

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may serve another request after this one's answer."""
        return self.body_done and not client_wants_close(self.head)

    async def send(self, response: Response) -> Relayed:
        """Writes a whole response (with ``response_fields``)."""
        response.headers = (*response.headers, *self.response_fields)
        await send_response(self.wire, response, self.head)
        return Relayed(not response.close, response.status)

    async def send_error(self, status: int, message: str,
                         headers: Sequence[tuple[str, str]] = ()) -> Relayed:
        """An error, for a handler that writes its own response (one that streams)."""
        return await self.send(error_response(status, message, path=self.path,
                                              close=not self.keep_alive, headers=headers))

    async def _send_continue(self) -> None:
        # RFC 9110 10.1.1: answer "Expect: 100-continue" before reading the body.
        if self.head.version == "HTTP/1.1" and "100-continue" in self.head.headers.tokens(
            "expect"
        ):
            self.wire.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await self.wire.drain()
            self.wire.mark()  # the response proper is still to come

    async def body_chunks(self) -> AsyncIterator[bytes]:
        if self.body_done or self.body_started:
            return
        self.body_started = True
        await self._send_continue()
        try:
            async for piece in iter_body(self.wire, self.framing, self.body_timeout, 400,
                                         BODY_MIN_RATE, self.body_clock):
                yield piece
        except TimeoutError:
            raise HTTPError(408, f"request body not received in time ({self.body_timeout:g} s,"
                                 f" then at least {BODY_MIN_RATE // 1024} KiB/s)",
                            close=True) from None
        self.body_done = True
        if self.wire.eof and self._on_body_done is not None:
            self._on_body_done()

    async def read_body(self, limit: int) -> bytes | bytearray:
        """The whole body, refused with 413 past ``limit`` bytes, and with 503 when the
        buffered bodies of all requests would pass MAX_BUFFERED_BODIES: a known length
        is counted before a byte is read, a chunked body as it arrives. A known length
        is read into one buffer of that size: the body is in memory once, not twice."""
        if self.framing.kind == "length":
            length = self.framing.length
            if length > limit:
                raise HTTPError(413, f"body larger than {limit} bytes", close=True)
            self._hold(length)
            buf = self.wire.buf
            if length <= len(buf) and not (self.body_started or self.body_done
                                           or "expect" in self.head.headers.index):
                # Here whole already, as a small body comes with its head: taken at once,
                # without the reading machinery (an async generator costs microseconds).
                self.body_started = self.body_done = True
                body = buf[:length]
                del buf[:length]
                if self.wire.eof and self._on_body_done is not None:
                    self._on_body_done()
                return body
            body = bytearray(length)
            view, filled = memoryview(body), 0
            async for piece in self.body_chunks():
                view[filled:filled + len(piece)] = piece
                filled += len(piece)
            view.release()
            return body
        pieces: list[bytes] = []
        size = 0
        async for piece in self.body_chunks():
            pieces.append(piece)
            size += len(piece)
            if size > limit:
                raise HTTPError(413, f"body larger than {limit} bytes", close=True)
            self._hold(len(piece))
        return b"".join(pieces)

    def _hold(self, size: int) -> None:
        if not self.hold(size):
            raise HTTPError(503, "the balancer holds as many request bodies as it may right "
                                 "now (MAX_BUFFERED_BODIES); try again",
                            close=True, headers=[("Retry-After", "1")])

    def hold(self, size: int) -> bool:
        """Takes ``size`` bytes of the budget of buffered bodies for this request, until
        close(); False when they are not to be had."""
        if self.budget is None:
            return True
        if not self.budget.take(size):
            return False
        self.held += size
        return True

    def skip_body(self) -> bool:
        """Drops a body that is here whole and was not read (a request refused before its
        body mattered), so that the connection can serve the next request; whether the
        body is done with now."""
        if self.body_done:
            return True
        if not self._peekable() or len(self.wire.buf) < self.framing.length:
            return False
        del self.wire.buf[:self.framing.length]
        self.body_started = self.body_done = True
        return True

    def close(self) -> None:
        """Gives back what its body held of the budget; once the request is over."""
        if self.budget is not None and self.held:
            self.budget.give(self.held)
            self.held = 0

    def peeked(self, size: int) -> bytes:
        """peek_body()'s answer when the bytes are here already (a small body comes with
        its head), without a coroutine; b"" when they are not."""
        want = min(size, self.framing.length)
        buf = self.wire.buf
        if len(buf) < want or not self._peekable():
            return b""
        self.body_clock = self.wire.loop.time()
        return bytes(buf[:want])

    def _peekable(self) -> bool:
        """A Content-Length body not read yet, whose client is not waiting for 100."""
        return (self.framing.kind == "length" and not self.body_started
                and "expect" not in self.head.headers.index)

    async def peek_body(self, size: int) -> bytes:
        """Up to ``size`` first bytes of a Content-Length body, left unread; b"" where
        that cannot be done cheaply (chunked, or a client waiting for 100 Continue)."""
        if not self._peekable():
            return b""
        want = min(size, self.framing.length)
        wire = self.wire
        self.body_clock = wire.loop.time()  # the body's deadline runs from now on
        deadline = self.body_clock + self.body_timeout
        with contextlib.suppress(asyncio.TimeoutError):  # the whole read will say so
            while len(wire.buf) < want:
                remaining = deadline - wire.loop.time()
                if remaining <= 0 or not await wire.fill(remaining):
                    break
        return bytes(wire.buf[:want])

    async def read_json(self, limit: int = MAX_ADMIN_BODY) -> Any:
        body = await self.read_body(limit)
        if not body.strip():
            raise HTTPError(400, "a JSON body is required")
        try:
            return decode_json(body)
        except ValueError as exc:  # UnicodeDecodeError is one
            raise HTTPError(400, f"body is not valid JSON: {exc}") from None

    def query_values(self, *names: str) -> list[str]:
        pairs = urllib.parse.parse_qsl(self.query, keep_blank_values=True)
        return [value for key, value in pairs if key in names]

    async def watched(self, work: Coroutine[Any, Any, T]) -> T | None:
        """Runs ``work`` in this task; returns None, with ``work`` cancelled, if the client
        goes away once the body is read.

        Ollama stops generating, and even loading a model, when its connection closes, so
        the balancer must notice its own client leaving at any point: the client's
        connection calls back when it ends, and the callback cancels this task. Bytes of
        a pipelined next request that arrive meanwhile stay in the buffer.
        """
        client = self.wire
        task = asyncio.current_task(client.loop)
        assert task is not None
        left = False

        def leave() -> None:
            nonlocal left
            if self.body_done and not left:
                left = True
                task.cancel()

        if client.eof and self.body_done:
            work.close()
            return None
        self._on_body_done = client.on_gone = leave
        try:
            return await work
        except asyncio.CancelledError:
            uncancel = getattr(task, "uncancel", None)  # Python 3.11 counts cancellations
            if not left or (uncancel is not None and uncancel() > 0):
                raise  # cancelled for another reason too: shutting down
            return None
        finally:
            work.close()  # never started when the client had already left
            client.on_gone = self._on_body_done = None


Handler = Callable[[Request, "re.Match[str]"], Awaitable["Response | Relayed"]]

@dataclasses.dataclass(frozen=True)
class Failure:
    """Why one try on one server failed, and whether the words are Ollama's own (safe for
    any client) rather than the balancer's about its upstreams (for admins only)."""

    status: int
    detail: str
    from_ollama: bool

#: What clients other than admins are told of an upstream failure, by status.
UPSTREAM_FAILURES = {
    502: "the upstream server failed",
    503: "the upstream server is unavailable",
    504: "the upstream server did not answer in time",
}

class Relayed:
    """What a handler returns when it wrote its response to the client itself: whether the
    connection may go on, and what the access log and the metrics tell of it (the status
    it answered, 0 for none; the server that answered; the model, as the metrics name it;
    the seconds it waited in the queue). Made once a request and never changed: a plain
    class, as a frozen dataclass costs a request several calls to make."""

    __slots__ = ("chain", "cut", "keep_alive", "model", "queue_wait", "server", "status",
                 "tokens")

    def __init__(self, keep_alive: bool, status: int = 0, server: Server | None = None,
                 model: str | None = None, queue_wait: float | None = None,
                 cut: bool = False, chain: tuple[str, ...] = (),
                 tokens: tuple[int, int] | None = None) -> None:
        self.keep_alive = keep_alive
        self.status = status
        self.server = server
        self.model = model
        self.queue_wait = queue_wait
        self.cut = cut  # the answer broke off upstream: its client has part of it
        #: The servers that took part in order, when more than one did: the answer broke
        #: off on the first and went on on the next (Recovery).
        self.chain = chain
        self.tokens = tokens  # (prompt, completion), as the answer's end counted them

    def by(self, server: Server) -> Relayed:
        """This outcome, answered by ``server``."""
        return Relayed(self.keep_alive, self.status, server, self.model, self.queue_wait,
                       self.cut, self.chain, self.tokens)

    def routed(self, model: str, queue_wait: float | None) -> Relayed:
        """This outcome, of a request for ``model`` that waited ``queue_wait`` seconds."""
        return Relayed(self.keep_alive, self.status, self.server, model, queue_wait,
                       self.cut, self.chain, self.tokens)

async def send_response(wire: Wire, response: Response, request_head: RequestHead | None,
                        ) -> int:
    """Writes a whole response; returns the bytes written."""
    fields = list(response.headers)
    if response.status != 204 and not (100 <= response.status < 200) and response.status != 304:
        if response.content_type and response.body:
            fields.insert(0, ("Content-Type", response.content_type))
        fields.append(("Content-Length", str(len(response.body))))
    if response.close:
        fields.append(("Connection", "close"))
    head = render_head(f"HTTP/1.1 {response.status} {reason_phrase(response.status)}", fields)
    body = b"" if request_head is not None and request_head.method == "HEAD" else response.body
    wire.writelines((head, body))
    await wire.drain()
    return len(head) + len(body)

def client_wants_close(head: RequestHead) -> bool:
    """HTTP/1.0 closes unless told otherwise; we only keep HTTP/1.1 connections alive."""
    return head.version != "HTTP/1.1" or "close" in head.headers.tokens("connection")


# ---------------------------------------------------------------------------
# Request bodies: the fields handlers read, checked
# ---------------------------------------------------------------------------


# Each field's JSON Schema, as the API's description (/openapi.json) gives it, is made of
# the same patterns and bounds as the code that checks the field: what the description
# allows is what is accepted, and what it does not is a 400 naming the field.

#: Text: no control characters. (Nor lone surrogates, which no database can keep and
#: I-JSON, RFC 7493, forbids: checked apart, as tools that read the schema choke on them.)
_TEXT = r"[^\x00-\x1f\x7f]"
#: An HTTP field value (RFC 9110 5.5): visible ASCII and spaces, or obs-text bytes.
_HEADER_VALUE = r"[ -~\x80-\xff]"
_HOST = r"[A-Za-z0-9._\-]{1,253}|\[?[0-9A-Fa-f:.]{2,45}\]?"
#: A port number from 1 to 65535, as decimal text.
_PORT = r"[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]"
#: An id in a path or a body: what MySQL's INT and the paths' nine digits both hold.
MAX_ID = 999_999_999


def _any_case(word: str) -> str:
    """A pattern for ``word`` in any letter case, without the (?i) flag JSON Schema lacks."""
    return "".join(f"[{c.upper()}{c}]" if c.isalpha() else re.escape(c) for c in word)


_URL = (rf"(?P<scheme>{_any_case('https')}|{_any_case('http')})://"
        rf"(?P<host>[A-Za-z0-9._\-]{{1,253}}|\[[0-9A-Fa-f:.]{{2,45}}\])"
        rf"(?::(?P<port>{_PORT}))?/?")
_text_re = re.compile(f"{_TEXT}*")
_name_re = re.compile(rf"{_TEXT}*[^\s\x00-\x1f\x7f]{_TEXT}*")
_surrogate_re = re.compile(r"[\ud800-\udfff]")
_header_value_re = re.compile(f"{_HEADER_VALUE}*")
_hostname_re = re.compile(_HOST)
_port_re = re.compile(_PORT)
_url_re = re.compile(_URL)


def _string(pattern: re.Pattern[str], max_length: int, description: str, *,
            min_length: int = 0) -> dict[str, Any]:
    # Without Python's named groups, which JSON Schema's (ECMA 262) patterns do not have.
    portable = re.sub(r"\(\?P<\w+>", "(?:", pattern.pattern)
    return {"type": "string", "pattern": f"^(?:{portable})$", "maxLength": max_length,
            "minLength": min_length, "description": description}


def _integer(low: int, high: int, digits: str = "") -> dict[str, Any]:
    """An integer from ``low`` to ``high``, or, with ``digits``, also text matching it."""
    number = {"type": "integer", "minimum": low, "maximum": high}
    return {"anyOf": [number, {"type": "string", "pattern": f"^(?:{digits})$"}]} if (
        digits) else number


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


TEXT_SCHEMA = _string(_text_re, 255, "text without control characters")
NAME_SCHEMA = _string(_name_re, 255, "text with something in it, without control characters",
                      min_length=1)
HOST_SCHEMA = _string(_hostname_re, 255, "a host name or IP address", min_length=1)
PORT_SCHEMA = _integer(1, 65535, _PORT)
ID_SCHEMA = _integer(1, MAX_ID, "[1-9][0-9]{0,8}")
FLAG_SCHEMA = {"enum": [True, False, 0, 1]}


def _choice_schema(choices: Sequence[str]) -> dict[str, Any]:
    return {"type": "string", "pattern": f"^(?:{'|'.join(map(_any_case, choices))})$",
            "description": f"one of {', '.join(choices)}, in any case"}


def _field_text(body: dict[str, Any], name: str, *, required: bool = False,
                max_length: int = 255) -> str | None:
    """Text as TEXT_SCHEMA (NAME_SCHEMA if ``required``) says, without its outer spaces."""
    value = body.get(name)
    if value is None:
        if required:
            raise HTTPError(400, f"'{name}' is required")
        return None
    if not isinstance(value, str):
        raise HTTPError(400, f"'{name}' must be a string")
    if len(value) > max_length:
        raise HTTPError(400, f"'{name}' is longer than {max_length} characters")
    if not _text_re.fullmatch(value) or _surrogate_re.search(value):
        raise HTTPError(400, f"'{name}' contains control characters or broken Unicode")
    if required and not value.strip():
        raise HTTPError(400, f"'{name}' must not be empty")
    return value.strip()


def _field_header_value(body: dict[str, Any], name: str, *, max_length: int) -> str | None:
    """Text sent as an HTTP field value: latin-1 (RFC 9110 5.5: visible ASCII, and
    obs-text bytes at most), else a 400 here rather than a 500 on every request later."""
    value = _field_text(body, name, max_length=max_length)
    if value is not None and not _header_value_re.fullmatch(value):
        raise HTTPError(400, f"'{name}' must be a valid header value: ASCII (or "
                             "latin-1) characters only")
    return value


def _field_host(body: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = _field_text(body, name, required=required)
    if value is None:
        return None
    if not _hostname_re.fullmatch(body[name]):
        raise HTTPError(400, f"'{name}' is not a host name or IP address")
    return value.strip("[]")


def _integral(value: Any) -> int | None:
    """A JSON number with no fraction (5 or 5.0, as JSON Schema's integer), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) else None


def _field_port(body: dict[str, Any], name: str, default: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, str) and _port_re.fullmatch(value):
        value = int(value)
    number = _integral(value)
    if number is None or not 1 <= number <= 65535:
        raise HTTPError(400, f"'{name}' must be a port number from 1 to 65535")
    return number


def _field_bool(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    raise HTTPError(400, f"'{name}' must be true or false")


def _field_choice(body: dict[str, Any], name: str, choices: Sequence[str]) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in choices or not value.isascii():
        raise HTTPError(400, f"'{name}' must be one of {', '.join(choices)}")
    return value.lower()


def _field_id(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, str) and re.fullmatch(r"[1-9][0-9]{0,8}", value):
        value = int(value)
    number = _integral(value)
    if number is None or not 1 <= number <= MAX_ID:
        raise HTTPError(400, f"'{name}' must be a positive integer id")
    return number


def _field_number(body: dict[str, Any], name: str, low: float, high: float, *,
                  integer: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    number = _integral(value) if integer else value
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not (
            low <= number <= high):
        what = "an integer" if integer else "a number"
        raise HTTPError(400, f"'{name}' must be {what} from {low:g} to {high:g}")
    return float(number)


def _json_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise HTTPError(400, "the body must be a JSON object")
    return body


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _unknown_fields(body: dict[str, Any], allowed: Iterable[str], *,
                    nullable: Iterable[str] = ()) -> None:
    """A 400 for a field the body may not have, or a null where it means nothing."""
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise HTTPError(400, f"unknown field '{unknown[0]}'")
    nulls = sorted(k for k, v in body.items() if v is None and k not in set(nullable))
    if nulls:
        raise HTTPError(400, f"'{nulls[0]}' must not be null")


#: A label's name and value (zone=eu, gpu=a100): what X-Server-Labels can carry.
_label_name_re = re.compile(r"[A-Za-z0-9_.-]{1,63}")
_label_value_re = re.compile(r"[A-Za-z0-9_.:/-]{0,63}")
#: Most labels a server or a key carries.
MAX_LABELS = 32
LABELS_SCHEMA = {"type": "object", "maxProperties": MAX_LABELS,
                 "propertyNames": {"pattern": f"^{_label_name_re.pattern}$"},
                 "additionalProperties": _string(_label_value_re, 63, "a label's value")}


def _field_labels(body: dict[str, Any], name: str) -> str | None:
    """A labels object as its column holds it (JSON), None when not given."""
    labels = body.get(name)
    if labels is None:
        return None
    if not (isinstance(labels, dict) and len(labels) <= MAX_LABELS and all(
            isinstance(k, str) and _label_name_re.fullmatch(k) and isinstance(v, str)
            and _label_value_re.fullmatch(v) for k, v in labels.items())):
        raise HTTPError(400, f"'{name}' must be an object of at most {MAX_LABELS} labels, "
                             "name: value (letters, digits, _ . - ; values also : /)")
    return json.dumps(dict(sorted(labels.items())))


def parse_labels(text: str) -> dict[str, str]:
    """X-Server-Labels: ``zone=eu,gpu=a100``; 400 for anything else."""
    labels: dict[str, str] = {}
    for item in text.split(","):
        name, equals, value = item.strip().partition("=")
        if not (equals and _label_name_re.fullmatch(name) and _label_value_re.fullmatch(value)):
            raise HTTPError(400, "X-Server-Labels must be name=value pairs separated by "
                                 "commas (zone=eu,gpu=a100)")
        labels[name] = value
    if len(labels) > MAX_LABELS:
        raise HTTPError(400, f"X-Server-Labels has more than {MAX_LABELS} labels")
    return labels


def label_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


#: The fields of a server's body, each with its schema. PATCH may set to null those that
#: can be cleared (SERVER_CLEARABLE); addServer takes either "url" or "host"/"port"/"scheme".
SERVER_FIELDS: dict[str, dict[str, Any]] = {
    "url": _string(_url_re, 2048, "http(s)://host[:port], the port 11434 when left out"),
    "host": HOST_SCHEMA,
    "port": PORT_SCHEMA,
    "scheme": _choice_schema(SERVER_SCHEMES),
    "name": TEXT_SCHEMA,
    "location": TEXT_SCHEMA,
    "runner": TEXT_SCHEMA,
    "enabled": FLAG_SCHEMA,
    "draining": FLAG_SCHEMA,
    "proxyId": ID_SCHEMA,
    "weight": {"type": "number", "minimum": 0.001, "maximum": 1000},
    "maxConcurrency": _integer(1, 100_000),
    "numParallel": _integer(1, 1000),
    "maxLoadedModels": _integer(1, 1000),
    "authorization": _string(_header_value_re, 1024, "the Authorization header value the "
                             "server wants (an authenticating proxy in front of it)"),
    "labels": LABELS_SCHEMA,
}
SERVER_CLEARABLE = ("name", "location", "runner", "proxyId", "maxConcurrency",
                    "numParallel", "maxLoadedModels", "authorization", "labels")
SERVER_BODY_FIELDS = tuple(SERVER_FIELDS)

PROXY_FIELDS: dict[str, dict[str, Any]] = {
    "ip": HOST_SCHEMA,
    "port": PORT_SCHEMA,
    "protocol": _choice_schema(PROXY_PROTOCOLS),
    "name": NAME_SCHEMA,
    "status": FLAG_SCHEMA,
    "userName": TEXT_SCHEMA,
    "password": TEXT_SCHEMA,
}
PROXY_CLEARABLE = ("userName", "password")
PROXY_BODY_FIELDS = tuple(PROXY_FIELDS)


#: A model name a key may use, ``*`` standing for any characters ("llama3*", "*:8b").
_model_pattern_re = re.compile(r"[A-Za-z0-9_.:/*-]{1,255}")
#: Most model patterns one key lists.
MAX_KEY_MODELS = 100

KEY_FIELDS: dict[str, dict[str, Any]] = {
    "name": NAME_SCHEMA,
    "requestsPerMinute": _integer(1, 1_000_000_000),
    "maxConcurrent": _integer(1, 1_000_000_000),
    "models": {"type": "array", "maxItems": MAX_KEY_MODELS, "items": _string(
        _model_pattern_re, 255, "a model name, * standing for any characters")},
    "tokensPerDay": _integer(1, 10**15),
    "weight": {"type": "number", "minimum": 0.001, "maximum": 1000},
    "priority": _choice_schema(tuple(PRIORITY_LANES)),
    "labels": LABELS_SCHEMA,
}
KEY_CLEARABLE = ("requestsPerMinute", "maxConcurrent", "models",
                 "tokensPerDay", "labels")  # null: no limit


def new_api_key() -> tuple[str, str]:
    """A new client API key, and the SHA-256 (hex) that is all the store keeps of it."""
    key = "olb-" + secrets.token_urlsafe(32)
    return key, hashlib.sha256(key.encode()).hexdigest()


def parse_key_body(body: dict[str, Any], *, partial: bool) -> dict[str, Any]:
    """Validated store columns from an addKey or PATCH body (a PATCH's null clears)."""
    _unknown_fields(body, KEY_FIELDS, nullable=KEY_CLEARABLE)
    values: dict[str, Any] = {}
    if "name" in body or not partial:
        values["name"] = _field_text(body, "name", required=True)
    for field, column in (("requestsPerMinute", "requests_per_minute"),
                          ("maxConcurrent", "max_concurrent")):
        if field in body:
            number = _field_number(body, field, 1, 1e9, integer=True)
            values[column] = None if number is None else int(number)
    if "tokensPerDay" in body:
        number = _field_number(body, "tokensPerDay", 1, 1e15, integer=True)
        values["tokens_per_day"] = None if number is None else int(number)
    if "weight" in body:
        values["weight"] = _field_number(body, "weight", 0.001, 1000)
    if "priority" in body:
        values["priority"] = _field_choice(body, "priority", tuple(PRIORITY_LANES))
    if "labels" in body:
        values["labels"] = _field_labels(body, "labels")
    if "models" in body:
        models = body["models"]
        if models is not None and not (
                isinstance(models, list) and len(models) <= MAX_KEY_MODELS and all(
                    isinstance(m, str) and _model_pattern_re.fullmatch(m) for m in models)):
            raise HTTPError(400, f"'models' must be a list of at most {MAX_KEY_MODELS} model "
                                 "names (letters, digits, _ . : / - and * for any)")
        values["models"] = None if models is None else json.dumps(models)
    return values


def body_schema(fields: dict[str, dict[str, Any]], clearable: Sequence[str],
                required: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON Schema of a body made of ``fields``."""
    return {"type": "object", "additionalProperties": False, "required": list(required),
            "properties": {name: _nullable(schema) if name in clearable else schema
                           for name, schema in fields.items()}}


def parse_server_body(body: dict[str, Any], *, partial: bool) -> dict[str, Any]:
    """Validated store columns from an addServer or PATCH body."""
    _unknown_fields(body, SERVER_BODY_FIELDS, nullable=SERVER_CLEARABLE)
    values: dict[str, Any] = {}
    if "url" in body:
        if "host" in body or "port" in body or "scheme" in body:
            raise HTTPError(400, "give either 'url' or 'host'/'port'/'scheme', not both")
        url = body["url"]
        match = _url_re.fullmatch(url) if isinstance(url, str) and len(url) <= 2048 else None
        if match is None:
            raise HTTPError(400, "'url' must look like http://host:11434")
        values.update(scheme=match["scheme"].lower(), host=match["host"].strip("[]"),
                      port=int(match["port"] or 11434))
    else:
        values["host"] = _field_host(body, "host", required=not partial)
        values["port"] = _field_port(body, "port", None if partial else 11434)
        values["scheme"] = _field_choice(body, "scheme", SERVER_SCHEMES) or (
            None if partial else "http"
        )
    values["name"] = _field_text(body, "name")
    values["location"] = _field_text(body, "location")
    values["runner"] = _field_text(body, "runner")
    values["enabled"] = _field_bool(body, "enabled")
    values["draining"] = _field_bool(body, "draining")
    values["proxy_id"] = _field_id(body, "proxyId")
    values["weight"] = _field_number(body, "weight", 0.001, 1000.0)
    values["upstream_auth"] = _field_header_value(body, "authorization", max_length=1024)
    values["labels"] = _field_labels(body, "labels")
    for json_name, column, high in (("maxConcurrency", "max_concurrency", 100_000),
                                    ("numParallel", "num_parallel", 1000),
                                    ("maxLoadedModels", "max_loaded_models", 1000)):
        number = _field_number(body, json_name, 1, high, integer=True)
        values[column] = None if number is None else int(number)
    if not partial and values["enabled"] is None:
        values["enabled"] = True
    result = _drop_none(values)
    if partial:
        # PATCH may clear these by sending null explicitly.
        for json_name, column in (("proxyId", "proxy_id"), ("name", "name"),
                                  ("location", "location"), ("runner", "runner"),
                                  ("maxConcurrency", "max_concurrency"),
                                  ("numParallel", "num_parallel"),
                                  ("maxLoadedModels", "max_loaded_models"),
                                  ("authorization", "upstream_auth"), ("labels", "labels")):
            if json_name in body and body[json_name] is None:
                result[column] = None
    for flag in ("enabled", "draining"):
        if flag in result:
            result[flag] = int(result[flag])
    return result


def parse_proxy_body(body: dict[str, Any], *, partial: bool) -> dict[str, Any]:
    """Validated store columns from an addProxy or PATCH body."""
    _unknown_fields(body, PROXY_BODY_FIELDS, nullable=PROXY_CLEARABLE)
    values = {
        "ip": _field_host(body, "ip", required=not partial),
        "port": _field_port(body, "port") if partial else _field_port(body, "port", -1),
        "protocol": _field_choice(body, "protocol", PROXY_PROTOCOLS),
        "name": _field_text(body, "name", required="name" in body or not partial),
        "status": _field_bool(body, "status"),
        "user_name": _field_text(body, "userName"),
        "password": _field_text(body, "password", max_length=255),
    }
    if not partial:
        values["protocol"] = values["protocol"] or "http"
        values["status"] = True if values["status"] is None else values["status"]
    result = _drop_none(values)
    if partial:
        for json_name, column in (("userName", "user_name"), ("password", "password")):
            if json_name in body and body[json_name] is None:
                result[column] = None
    if "status" in result:
        result["status"] = int(result["status"])
    return result


def _path_id(match: re.Match[str]) -> int:
    return int(match.group("id"))

#: Endpoints routed by their body's model to one server (Ollama's and its OpenAI- and
#: Anthropic-compatible ones).
ROUTED_PATHS = (
    "/api/generate", "/api/chat", "/api/embed", "/api/embeddings",
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
    "/v1/messages",
)

#: The version /api/version reports when no server has said its own.
FALLBACK_OLLAMA_VERSION = "0.0.0"

def model_field(body: bytes | bytearray) -> str:
    """The model a request names (``model``, or legacy ``name``), or a 400."""
    try:
        payload = decode_json(body)
    except ValueError as exc:
        raise HTTPError(400, f"invalid JSON body: {exc}") from None
    if not isinstance(payload, dict):
        raise HTTPError(400, "the body must be a JSON object")
    name = payload.get("model") or payload.get("name")
    if not isinstance(name, str) or not name.strip():
        raise HTTPError(400, "model is required")
    return name.strip()

#: A body whose first field is its model, as the official clients send it: a top-level
#: field for sure, being the first after the brace (and ``model`` wins over ``name``).
_json_control_re = re.compile(rb"[\x00-\x1f]")
_leading_model_re = re.compile(rb'\s*\{\s*"model"\s*:\s*("(?:[^"\\]|\\.){1,1024}")')

def leading_model(prefix: bytes) -> str | None:
    """The model a body names in its first field, read from its first bytes; None when it
    does not start so (the whole body decides then)."""
    match = _leading_model_re.match(prefix)
    if match is None:
        return None
    quoted = match.group(1)
    try:
        if b"\\" in quoted or not quoted.isascii():
            name = json.loads(quoted)  # escapes, or bytes that must be valid UTF-8
        elif _json_control_re.search(quoted):
            return None  # a raw control character: not JSON
        else:
            name = quoted[1:-1].decode("ascii")  # as it stands: most names
    except ValueError:
        return None
    return name.strip() if isinstance(name, str) and name.strip() else None

#: Paths whose body holds a conversation, its messages in "messages": where a turn that
#: continues one is sent to the server that has its start in its cache.
CHAT_PATHS = frozenset({"/api/chat", "/v1/chat/completions", "/v1/messages"})
#: A message an assistant wrote, in a chat's raw body: the chat continues a conversation.
_assistant_re = re.compile(rb'"role"\s*:\s*"assistant"')
#: A chat that opens with a system prompt, as clients write messages (their role first):
#: most of an application's conversations share that prompt, so each is named by it and
#: its first user message together.
_system_first_re = re.compile(rb'"messages"\s*:\s*\[\s*\{\s*"role"\s*:\s*"system"')


#: Longest X-Session-Id kept as it is; a longer one is kept as its hash, so that the
#: affinity table (MAX_SESSIONS entries) is bounded in bytes too, not only in count.
MAX_SESSION_ID = 64


def session_key(session_id: str | None) -> str | None:
    """What an X-Session-Id is remembered by: itself, or a hash of it when long."""
    if session_id is None or len(session_id) <= MAX_SESSION_ID:
        return session_id
    return "#" + hashlib.blake2b(session_id.encode(), digest_size=16).hexdigest()


def conversation_prints(body: bytes | bytearray, model: str) -> list[bytes]:
    """Fingerprints of a chat's leading messages: the i-th covers ``model``, a top-level
    "system" string (/v1/messages) and the first i messages, byte for byte as the client
    sent them (a client sends the same messages the same way turn after turn). Read off
    the body's first FINGERPRINT_BYTES, neither parsed nor serialised again, nor copied;
    [] when it has no such list. A conversation longer than that keeps the prints of its
    start, which is what its next turn is found by."""
    seed = hashlib.blake2b(model.encode(), digest_size=16)
    prints: list[bytes] = []
    depth, element, value_of = 0, -1, b""  # value_of: the depth-1 key just read
    in_messages = False
    view = memoryview(body)
    for match in _json_structure_re.finditer(body, 0, FINGERPRINT_BYTES):
        token = match.group()
        if token[:1] == b'"':
            if depth == 1:
                if value_of == b'"system"' and not in_messages:
                    seed.update(token)
                value_of = token
            continue
        if token in (b"[", b"{"):
            if depth == 1 and token == b"[" and value_of == b'"messages"':
                in_messages = True
            elif depth == 2 and in_messages and token == b"{":
                element = match.start()
            depth += 1
        else:
            depth -= 1
            if depth == 2 and in_messages and element >= 0:
                seed.update(view[element:match.end()])
                prints.append(seed.copy().digest())
                element = -1
            elif depth == 1 and in_messages:
                return prints
            value_of = b""
    # Cut short by FINGERPRINT_BYTES (not by the body's end): the prints of its start.
    return prints if in_messages and len(body) > FINGERPRINT_BYTES else []




def upstream_error_message(body: bytes) -> str | None:
    """The message of an Ollama or OpenAI-shaped error body, or of one short line of plain
    text (Go's "404 page not found"); None for anything else (an HTML page, say)."""
    try:
        payload = decode_json(body)
    except (ValueError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace").strip()
        return text if 0 < len(text) <= 200 and text.isprintable() and "<" not in text else (
            None)
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return error if isinstance(error, str) else None

def version_key(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"[0-9]+", text)[:3])


# ---------------------------------------------------------------------------
# Upstream exchange: HTTP/1.1 to Ollama servers over pooled connections
# ---------------------------------------------------------------------------


class Exchange:
    """One request to a server and the head of its answer, used as
    ``async with upstreams.exchange(...) as answer:``, the only way the balancer talks to
    an upstream.

    Entering sends the request and reads the answer's head: a pooled connection that the
    server closed while it idled is tried once more on a fresh one, as long as the body
    sent so far could be kept (REPLAY_LIMIT); errors of the client's own body
    (IncompleteBody, ProtocolError) pass through untouched. Leaving gives the connection
    back to the pool when the answer's body was read whole, and drops it on every other
    way out: an exception, a cancellation, a client gone, a body left unread.
    """

    __slots__ = ("_body", "_chunked", "_config", "_head", "_key", "_pool", "_proxy",
                 "_whole", "method", "response", "server", "wire")

    def __init__(self, pool: UpstreamPool, config: Config, server: Server,
                 proxy: Proxy | None, head: bytes, body: ReplayableBody, method: str,
                 chunked: bool) -> None:
        self._pool, self._config = pool, config
        self.server, self._proxy = server, proxy
        self._head, self._body, self.method, self._chunked = head, body, method, chunked
        self._key = pool.key(server, proxy)
        self._whole = False

    async def __aenter__(self) -> Exchange:
        while True:
            wire = self._pool.take(self._key)
            reused = wire is not None
            if wire is None:
                wire = await open_upstream(self.server, self._proxy,
                                           self._config.connect_timeout)
            try:
                await self._send(wire)
                self.response = await self._read_head(wire)
                self.wire = wire
                return self
            except UpstreamClosed as exc:
                wire.abort()
                if reused and self._body.replayable and not exc.answered:
                    continue
                raise UpstreamError(502, f"{self.server.label} closed the connection: "
                                         f"{exc}") from None
            except BaseException:
                wire.abort()
                raise

    async def __aexit__(self, *exc_info: object) -> None:
        response = self.response
        if self._whole and not ("close" in response.headers.tokens("connection")
                                or response.version == "HTTP/1.0"):
            self._pool.put(self._key, self.wire)
        else:
            self.wire.abort()

    async def _send(self, wire: Wire) -> None:
        body, chunked = self._body, self._chunked
        pending = self._head  # sent with the first piece of body: one write, one packet
        try:
            small = body.small()
            if small is not None:  # most requests: head and body in one write, at once
                wire.writelines(([pending, *chunk(small), LAST_CHUNK] if small else
                                 [pending, LAST_CHUNK]) if chunked else [pending, small])
                await wire.drain()
                return
            async for piece in body.chunks():  # the client's errors come from here
                wire.writelines([pending, *chunk(piece)] if chunked else [pending, piece])
                pending = b""
                await wire.drain()
            wire.writelines([pending, LAST_CHUNK] if chunked else [pending])
            await wire.drain()
        except ConnectionError as exc:
            # No mutation: the detail of a reset (its words, or its name) says the same.
            raise UpstreamClosed(str(exc) or type(exc).__name__) from None  # pragma: no mutate

    async def _read_head(self, wire: Wire) -> ResponseHead:
        loop, timeout = wire.loop, self._config.upstream_timeout
        for _ in range(MAX_INFORMATIONAL + 1):
            deadline = loop.time() + timeout
            try:
                response = await read_head(wire, maybe_response_head, deadline)
            except TimeoutError:
                raise UpstreamError(504, f"{self.server.label} did not answer within "
                                         f"{timeout:g} s") from None
            except ProtocolError as exc:
                raise UpstreamError(502, f"{self.server.label}: {exc.message}") from None
            except IncompleteBody as exc:
                raise UpstreamClosed(str(exc), answered=True) from None
            except ConnectionError as exc:
                raise UpstreamClosed(str(exc), answered=bool(wire.buf)) from None
            if response is None:
                raise UpstreamClosed("closed before answering")
            if response.status == 101:
                raise UpstreamError(502, f"{self.server.label} switched protocols")
            if response.status >= 200:
                return response
        raise UpstreamError(502, f"{self.server.label} sent more than {MAX_INFORMATIONAL} "
                                 "informational (1xx) answers")

    @property
    def status(self) -> int:
        return self.response.status

    def framing(self) -> Framing:
        """How the answer's body is delimited; ProtocolError when that cannot be told."""
        return response_framing(self.response, self.method)

    def finished(self) -> None:
        """Says the body was read whole, by whoever read it off ``wire`` (a forwarder):
        the connection may carry another request."""
        self._whole = True

    def drop(self) -> None:
        """Drops the connection now (its client left: Ollama stops generating), which
        ends any read of it under way."""
        self._whole = False
        self.wire.abort()

    async def pieces(self, timeout: float | None = None) -> AsyncIterator[bytes]:
        """The answer's body as it arrives, each wait for bytes within ``timeout``
        (UPSTREAM_TIMEOUT when not given)."""
        async for piece in iter_body(self.wire, self.framing(),
                                     timeout or self._config.upstream_timeout, 502):
            yield piece
        self._whole = True

    async def read(self, limit: int, timeout: float | None = None) -> bytes:
        """The whole body; UpstreamError past ``limit`` bytes."""
        body = bytearray()
        async for piece in self.pieces(timeout):
            body += piece
            if len(body) > limit:
                raise UpstreamError(502, f"{self.server.label}: answer larger than "
                                         f"{limit} bytes")
        return bytes(body)

    async def error_message(self) -> str | None:
        """The message of a small error answer (Ollama's ``{"error": ...}``, or its text),
        as much of it as came when the answer breaks off; None past MAX_ERROR_BODY."""
        body = bytearray()
        try:
            async for piece in self.pieces():
                body += piece
                if len(body) > MAX_ERROR_BODY:
                    return None
        except (TimeoutError, IncompleteBody, ProtocolError, ConnectionError):
            pass
        return upstream_error_message(bytes(body))


class Upstreams:
    """Speaks HTTP/1.1 to Ollama servers, directly or through their proxies, over pooled
    keep-alive connections: an Exchange (a request out, its answer's head back), or a
    small request of the balancer's own read whole (fetch)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._pool = UpstreamPool(pool_cap(open_files_limit()))

    def sweep(self) -> None:
        """Closes pooled connections idle too long; called on the health loop's timer."""
        self._pool.sweep()

    def close(self) -> None:
        self._pool.close()

    def exchange(self, server: Server, proxy: Proxy | None, head: bytes,
                 body: ReplayableBody, method: str, chunked: bool = False) -> Exchange:
        """``head`` (and ``body``, chunked when ``chunked``) to ``server`` through
        ``proxy``: ``async with`` it to send it and read the answer's head."""
        return Exchange(self._pool, self.config, server, proxy, head, body, method, chunked)

    async def fetch(self, server: Server, proxy: Proxy | None, method: str, path: str,
                    body: bytes = b"", *, limit: int = MAX_HEALTH_BODY,
                    timeout: float | None = None) -> tuple[int, bytes]:
        """A small request of the balancer's own (health checks, fan-out calls): its
        status and whole body, at most ``limit`` bytes, each read within ``timeout``."""
        fields = [("Host", server.authority), ("Accept", "application/json"),
                  ("User-Agent", f"ollamabalancer/{__version__}"), *server_credentials(server)]
        if body:
            fields += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        head = render_head(f"{method} {path} HTTP/1.1", fields)
        async with self.exchange(server, proxy, head, ReplayableBody.of(body),
                                 method) as answer:
            return answer.status, await answer.read(limit, timeout or
                                                    self.config.health_timeout)


# ---------------------------------------------------------------------------
# Fleet: servers, proxies and keys in memory, health checks, catalog
# ---------------------------------------------------------------------------


#: Failures that say a server could not be reached: a circuit they opened closes as soon
#: as a health check of the server passes.
REPAIRABLE = frozenset({"connect", "timeout"})


def carried(old: Server | None, server: Server) -> Server:
    """``server`` as just read from the store, with the live state of ``old``, the object
    it replaces: its load always, its health while its address is the same."""
    if old is None:
        return server
    server.load = old.load  # in-flight counts outlive a reload of the row
    if (old.host, old.port, old.scheme, old.proxy_id) == (
            server.host, server.port, server.scheme, server.proxy_id):
        server.reachable, server.last_error = old.reachable, old.last_error
        if old.last_checked and (
            server.last_checked is None or old.last_checked > server.last_checked
        ):
            server.set_models(old.models)
            server.last_checked = old.last_checked
    return server


class Once:
    """One run at a time per key: a caller that comes while a run goes on waits for that
    run rather than start another (and its leaving does not stop the run). A ``fresh``
    caller needs a run that started after it came (what it must see may have happened
    after the run under way began): it waits for that one to end, then takes the next."""

    def __init__(self) -> None:
        self._running: dict[Hashable, tuple[asyncio.Future[None], int]] = {}
        self._clock = itertools.count()

    def pending(self) -> list[asyncio.Future[None]]:
        return [future for future, _ in self._running.values()]

    async def run(self, key: Hashable, start: Callable[[], Awaitable[None]],
                  fresh: bool = False) -> None:
        arrived = next(self._clock)
        while True:
            entry = self._running.get(key)
            # A run that has ended, its end not yet told (_ended comes a step later), is
            # none: waiting for it would not yield, and a fresh caller would spin on it.
            if entry is None or entry[0].done():
                entry = (asyncio.ensure_future(start()), next(self._clock))
                self._running[key] = entry
                entry[0].add_done_callback(functools.partial(self._ended, key, entry))
            running, began = entry
            if not fresh or began > arrived:
                await asyncio.shield(running)
                return
            with contextlib.suppress(Exception):  # its own caller hears of its failure
                await asyncio.shield(running)

    def _ended(self, key: Hashable, entry: tuple[asyncio.Future[None], int],
               _: object) -> None:
        if self._running.get(key) is entry:
            del self._running[key]


async def spread_out(work: Sequence[Callable[[], Awaitable[None]]], at_once: int,
                     over: float) -> None:
    """Runs ``work``, at most ``at_once`` at a time, their starts spread evenly over
    ``over`` seconds: a round of checks of 10,000 servers is not 10,000 sockets at once."""
    gate = asyncio.Semaphore(at_once)
    gap = over / len(work) if work else 0.0

    async def one(index: int, job: Callable[[], Awaitable[None]]) -> None:
        await asyncio.sleep(index * gap)
        async with gate:
            await job()

    await asyncio.gather(*(one(index, job) for index, job in enumerate(work)))


def paged(items: dict[int, T], page: tuple[int | None, int]) -> tuple[list[T], int | None]:
    """The items of ``page``, by id, and the id to ask the next page after (None: none)."""
    limit, after = page
    ids = sorted(i for i in items if i > after)
    if limit is None or len(ids) <= limit:
        return [items[i] for i in ids], None
    return [items[i] for i in ids[:limit]], ids[limit - 1]


def fleet_models(servers: Iterable[Server]) -> dict[str, dict[str, list[Server]]]:
    """Every model of ``servers``: each digest it has, and the servers that hold it so.
    Two digests of one name (pulled before and after the tag moved, or another
    quantization) are a drift: the same name answers differently from server to server."""
    found: dict[str, dict[str, list[Server]]] = {}
    for server in servers:
        for model in server.models:
            name = canonical_model(str(model.get("name") or model.get("model") or ""))
            digest = str(model.get("digest") or "")
            found.setdefault(name, {}).setdefault(digest, []).append(server)
    return found


def drifted(models: dict[str, dict[str, list[Server]]]) -> list[str]:
    """The models held under more than one digest (fleet_models)."""
    return sorted(name for name, digests in models.items() if len(digests) > 1)


class DriftWatch:
    """Says once when a model's servers come to hold it under different digests."""

    def __init__(self) -> None:
        self._told: set[str] = set()

    def notice(self, models: dict[str, dict[str, list[Server]]]) -> None:
        now = set(drifted(models))
        for name in sorted(now - self._told):
            log.warning("model %s differs between servers (%s): `ollamabalancer models "
                        "pull %s` brings them together", name, "; ".join(
                            f"{digest[:12] or '?'} on {', '.join(s.label for s in servers)}"
                            for digest, servers in models[name].items()), name)
        self._told = now


class Handles:
    """getServer's IDs in memory, each with the (server, proxy) pair it names and back:
    the store makes them, so every instance hands out and resolves the same ones."""

    def __init__(self, pairs: dict[str, tuple[int, int | None]] | None = None) -> None:
        self._pairs = dict(pairs or {})
        self._tokens = {pair: token for token, pair in self._pairs.items()}

    def pair(self, token: str) -> tuple[int, int | None] | None:
        return self._pairs.get(token)

    def token(self, pair: tuple[int, int | None]) -> str | None:
        return self._tokens.get(pair)

    def remember(self, token: str, pair: tuple[int, int | None]) -> None:
        self._pairs[token] = pair
        self._tokens[pair] = token

    def forget(self, gone: Callable[[tuple[int, int | None]], bool]) -> None:
        """Drops the IDs of the (server, proxy) pairs that are ``gone``."""
        for token, pair in list(self._pairs.items()):
            if gone(pair):
                del self._pairs[token]
                self._tokens.pop(pair, None)


#: Seconds a request waits for the change log to be read (Fleet.up_to_date) before it is
#: answered from memory: a database that hangs costs a catalog request no more.
UP_TO_DATE_WAIT = 1.0


def _quietly(future: asyncio.Future[Any]) -> None:
    """Retrieves a background future's exception (its waiters were told, or gave up)."""
    if not future.cancelled():
        future.exception()


def _through_proxy(proxy_id: int, pair: tuple[int, int | None]) -> bool:
    return pair[1] == proxy_id


async def read_tags(upstreams: Upstreams, server: Server, proxy: Proxy | None,
                    timeout: float) -> tuple[list[dict[str, Any]], str | None]:
    """A health check's first read: the server's models (/api/tags), or why not."""
    try:
        status, body = await asyncio.wait_for(
            upstreams.fetch(server, proxy, "GET", "/api/tags"), timeout)
        if status != 200:
            return [], f"/api/tags answered {status}"
        payload = decode_json(body)
        listed = payload.get("models") if isinstance(payload, dict) else None
        if not isinstance(listed, list):
            return [], "/api/tags did not list models"
        return [m for m in listed if isinstance(m, dict)], None
    except TimeoutError:
        return [], "health check timed out"
    except UpstreamError as exc:
        return [], exc.message
    except (ValueError, IncompleteBody, OSError, ProtocolError) as exc:
        return [], f"bad /api/tags answer: {exc}"


async def read_running(upstreams: Upstreams, server: Server, proxy: Proxy | None,
                       timeout: float, model_vram: dict[str, int],
                       with_version: bool = True) -> None:
    """Reads /api/version now and then (VERSION_RECHECK), then /api/ps into the server's
    load: last, so that the caller takes in what it shows (the ranking, where models are
    loaded) with no wait between, when no other request can see it half taken in. A
    server that does not answer them keeps what it had."""
    load = server.load
    errors = (TimeoutError, UpstreamError, ValueError, AttributeError, IncompleteBody,
              OSError, ProtocolError)
    if with_version and time.monotonic() - load.version_read >= VERSION_RECHECK:
        try:
            status, body = await asyncio.wait_for(
                upstreams.fetch(server, proxy, "GET", "/api/version"), timeout)
            payload = decode_json(body) if status == 200 else {}
            if not isinstance(payload, dict):
                raise ValueError("/api/version did not answer an object")
            load.read_version(payload)
        except errors as exc:
            log.debug("no /api/version from %s: %s", server.label, exc)
    try:
        status, body = await asyncio.wait_for(
            upstreams.fetch(server, proxy, "GET", "/api/ps"), timeout)
        load.read_ps(decode_json(body) if status == 200 else {}, model_vram)
    except errors as exc:
        log.debug("no /api/ps from %s: %s", server.label, exc)


class LearnedShare:
    """What this process last knew the store to hold of each server's Learned: only what
    it learned since goes out, once a beat at most (Fleet.sync_loop)."""

    NOTHING: ClassVar[Figures] = (0, 0, 0, 0, 0, 0)

    def __init__(self) -> None:
        self._known: dict[int, Figures] = {}

    def news(self, servers: Iterable[Server]) -> dict[int, Figures]:
        """The servers whose figures here differ from the store's, as far as known."""
        return {s.id: figures for s in servers if (figures := s.load.learned.figures())
                != self._known.get(s.id, self.NOTHING)}

    def stored(self, figures: dict[int, Figures]) -> None:
        self._known.update(figures)


class HealthLog:
    """Health results on their way to the store: gathered as checks end, written in one
    store call per batch behind them; when the store is down they are dropped (the next
    round has its own)."""

    def __init__(self, store: AsyncStore) -> None:
        self._store = store
        self._dirty: dict[int, tuple[list[dict[str, Any]] | None, datetime.datetime]] = {}
        self._writing: asyncio.Future[None] | None = None

    def record(self, server: Server) -> None:
        """The server's models (None while unreachable) and the time it was checked."""
        assert server.last_checked is not None
        self._dirty[server.id] = (server.models if server.reachable else None,
                                  server.last_checked)
        if self._writing is None or self._writing.done():
            self._writing = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        while self._dirty:
            batch, self._dirty = self._dirty, {}
            with contextlib.suppress(StoreUnavailable):
                await self._store.call(self._store.store.record_health_many,
                                       [(i, m, c) for i, (m, c) in batch.items()])

    async def close(self, timeout: float) -> None:
        """Waits up to ``timeout`` for what is being written, then stops."""
        if self._writing is not None:
            with contextlib.suppress(asyncio.TimeoutError, StoreUnavailable):
                await asyncio.wait_for(asyncio.shield(self._writing), timeout)
            self._writing.cancel()


class Fleet:
    """The servers, proxies, getServer IDs and API keys the store holds, in memory, kept
    current by the change log and health checks, with the scheduler that shares the
    servers out and their failures' record. The one door to all of that: handlers ask it
    for what they want (a slot for a model, the catalog, a server added), and never touch
    its store, scheduler or tables. It knows nothing of them."""

    def __init__(self, config: Config, store: AsyncStore, upstreams: Upstreams,
                 metrics: Metrics, board: LoadBoard | None = None) -> None:
        self.config = config
        self._store = store
        self._upstreams = upstreams
        self._metrics = metrics
        self._scheduler = Scheduler(config, board)
        self._ranking = self._scheduler.ranking
        self._servers: dict[int, Server] = {}
        self._proxies: dict[int, Proxy] = {}
        self._handles = Handles()
        self._keys: dict[str, ApiKey] = {}  # by the SHA-256 of the key
        self._errors: collections.deque[dict[str, Any]] = collections.deque(maxlen=50)
        self._drift = DriftWatch()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._store_down_logged = False
        self._catalog_refresh: asyncio.Future[None] | None = None
        self._catalog_refreshed_at = -1e9
        self._health_log = HealthLog(store)
        self._learned = LearnedShare()
        self._syncing: asyncio.Future[None] | None = None
        self._catching_up: asyncio.Future[None] | None = None  # up_to_date()'s read
        self._rereading: asyncio.Future[None] | None = None  # a catalog change's checks
        self._checks = Once()
        self.instance = secrets.token_hex(8)  # this process among the store's (beat())
        if board is not None:
            board.join(self.instance)
        self.revision = 0  # the change log's last applied here, and its mark when read:
        self._change_mark: tuple[int, int] | None = None

    @property
    def _tables(self) -> Store:
        """The store's tables, whose methods run through ``_store.call``."""
        return self._store.store

    async def _db(self, method: Callable[..., T], *args: Any) -> T:
        """A store call a request waits on: a 503 for it when the database is down."""
        return await self.or_503(self._store.call(method, *args))

    @staticmethod
    async def or_503(work: Awaitable[T]) -> T:
        try:
            return await work
        except StoreUnavailable as exc:
            log.warning("database unavailable: %s", exc)
            raise HTTPError(503, "database unavailable") from None

    async def reload(self) -> None:
        """Reads servers, proxies and handles from the store into memory, keeping live state.

        Other instances and outside crawlers write the same tables, so this runs on every
        health round. When the store is down the in-memory copy keeps serving.
        """
        store, tables = self._store, self._tables
        revision = await store.call(tables.latest_change)  # first: nothing is missed
        servers = await store.call(tables.list_servers)
        proxies = await store.call(tables.list_proxies)
        handles = await store.call(tables.list_handles)
        keys = await store.call(tables.list_keys)
        learned = await store.call(tables.learned_of)
        old = self._servers
        self._servers = {server.id: carried(old.get(server.id), server) for server in servers}
        self._ranking.forget(self._servers)
        self._absorb(learned)
        self._proxies = {proxy.id: proxy for proxy in proxies}
        self._handles = Handles(handles)
        self._keys = {key.key_hash: key for key in keys}
        self.revision, self._change_mark = max(self.revision, revision), None

    async def sync(self) -> None:
        """Applies what was written since the last sync, by this instance or another, row
        by row from the store's change log (all of it again when too far behind). Cheap
        when nothing changed: one read of the log's last entries. Raises StoreUnavailable."""
        base = max(0, self.revision - CHANGE_SLACK)  # again: late commits land there
        mark = await self._store.call(self._tables.change_mark, base)
        if mark == self._change_mark:
            return
        changes = await self._store.call(self._tables.changes_since, base)
        if changes is None:
            await self.reload()
            return
        await self._apply(changes)
        self.revision = max([self.revision, *(revision for revision, _, _ in changes)])
        self._change_mark = mark if base == max(0, self.revision - CHANGE_SLACK) else None

    async def sync_loop(self) -> None:
        """Notices what other instances write within SYNC_INTERVAL (a server disabled there
        gets no more traffic from here within about that), and beats with them; keeps the
        change log to its last CHANGE_LOG_KEPT rows (CHANGE_PRUNE_INTERVAL)."""
        loop = asyncio.get_running_loop()
        pruned = loop.time()
        while True:
            await asyncio.sleep(self.config.sync_interval)
            with contextlib.suppress(StoreUnavailable):  # the health loop says so
                await self.sync()
                await self.beat()
                if news := self._learned.news(self._servers.values()):
                    self._learned.stored(await self._store.call(self._tables.share_learned,
                                                                news))
                if loop.time() - pruned >= CHANGE_PRUNE_INTERVAL:
                    pruned = loop.time()
                    await self._store.call(self._tables.prune_changes)

    async def beat(self) -> None:
        """Tells the store what this instance wants of each server, and takes its share
        of them (SharedCapacity.plan). Raises StoreUnavailable."""
        scheduler, ranking, servers = self._scheduler, self._ranking, self._servers
        shared, wants = ranking.shared, scheduler.demand(servers)
        decide = shared.plan({i: ranking.capacity(s) for i, s in servers.items()},
                             {i: s.load.inflight for i, s in servers.items()}, wants,
                             self.instance)
        others = await self._store.call(self._tables.beat, self.instance,
                                        json.dumps(wants, separators=(",", ":")),
                                        INSTANCE_MISSED_BEATS * self.config.sync_interval + 1,
                                        decide)
        board = ranking.board
        for server_id in shared.take(others, None if board is None else board.siblings()):
            if server_id in servers:
                ranking.changed(servers[server_id])
        scheduler.dispatch(servers)

    async def _apply(self, changes: Iterable[tuple[int, str, str]]) -> None:
        """Reads again the rows ``changes`` name, and puts them in memory (or takes them
        out, when gone)."""
        named: dict[str, set[str]] = collections.defaultdict(set)
        for revision, kind, row_id in changes:
            if kind in ROW_KINDS and not _row_id_re.fullmatch(str(row_id)):
                # Not a row any balancer writes (a hand-made or damaged one): skipped,
                # or it would stop every instance's sync and answer 500 to every read.
                log.warning("change log revision %s names %s %r, not a row id: skipped",
                            revision, printable(str(kind)), printable(str(row_id))[:64])
                continue
            named[str(kind)].add(str(row_id))
        store, tables = self._store, self._tables
        if server_ids := sorted(int(i) for i in named["server"]):
            read = {s.id: s for s in await store.call(tables.servers_by_id, server_ids)}
            for server_id in server_ids:
                self._put_server(server_id, read.get(server_id))
        if proxy_ids := sorted(int(i) for i in named["proxy"]):
            read_proxies = {p.id: p for p in await store.call(tables.list_proxies,
                                                               proxy_ids)}
            for proxy_id in proxy_ids:
                proxy = read_proxies.get(proxy_id)
                if proxy is None:
                    self._proxies.pop(proxy_id, None)
                    self._handles.forget(functools.partial(_through_proxy, proxy_id))
                else:
                    self._proxies[proxy_id] = proxy
                self.recheck(s for s in self._servers.values() if s.proxy_id == proxy_id)
        if learned_ids := sorted(int(i) for i in named["learned"]):
            self._absorb(await store.call(tables.learned_of, learned_ids))
        if key_ids := {int(i) for i in named["key"]}:
            self._keys = {h: k for h, k in self._keys.items() if k.id not in key_ids}
            for key in await store.call(tables.list_keys, sorted(key_ids)):
                self._keys[key.key_hash] = key
        for token in named["handle"]:
            if self._handles.pair(token) is None:
                pair = await store.call(tables.resolve_handle, token)
                if pair is not None:
                    self._handles.remember(token, pair)
        if named["catalog"]:  # models pulled, created, copied or deleted elsewhere
            self._rereading = asyncio.ensure_future(self.check_all(fresh=True))
            self._rereading.add_done_callback(_quietly)
            await asyncio.shield(self._rereading)
        self._scheduler.dispatch(self._servers)  # a new or changed server may take the queue

    def _absorb(self, figures: dict[int, Figures]) -> None:
        """What the store holds of what every process learned of the servers."""
        more = False
        for server_id, theirs in figures.items():
            server = self._servers.get(server_id)
            if server is not None and server.load.learned.absorb(theirs):
                more = self._ranking.learned(self._servers, server) or more
        self._learned.stored(figures)
        if more:  # room for queued requests, perhaps
            self._scheduler.dispatch(self._servers)

    def _put_server(self, server_id: int, server: Server | None) -> None:
        old = self._servers.get(server_id)
        if server is None:
            if self._servers.pop(server_id, None) is not None:
                self._handles.forget(lambda pair: pair[0] == server_id)
                self._ranking.forget(self._servers)
            return
        moved = old is None or (old.host, old.port, old.scheme, old.proxy_id) != (
            server.host, server.port, server.scheme, server.proxy_id)
        server = self._servers[server_id] = carried(old, server)
        if not server.enabled:
            server.reachable, server.last_error = False, "disabled"
        elif moved or (old is not None and not old.enabled):
            self.spawn(self.check_server(server))  # new here, at a new address, or back
        self._ranking.changed(server)

    async def _look_up(self, server_id: int, proxy_id: int | None) -> None:
        """Reads a server (and proxy) unknown here from the store, where another instance
        or an outside tool may have just written it (a store down changes nothing)."""
        with contextlib.suppress(StoreUnavailable):
            await self.sync()
            missing = [(0, "server", str(server_id))] if server_id not in self._servers else []
            if proxy_id is not None and proxy_id not in self._proxies:
                missing.append((0, "proxy", str(proxy_id)))
            await self._apply(missing)

    def proxy_of(self, server: Server) -> Proxy | None:
        if server.proxy_id is None:
            return None
        proxy = self._proxies.get(server.proxy_id)
        if proxy is None:
            raise UpstreamError(502, f"server {server.id} names proxy {server.proxy_id}, "
                                     "which does not exist")
        return proxy

    async def handle_for(self, pair: tuple[int, int | None]) -> str:
        """The getServer ID of a (server, proxy) pair: the one known, else one made in the
        store and shared by every instance. A 503 when the store is down."""
        token = self._handles.token(pair)
        if token is None:
            token = await self._db(self._tables.handle_for, *pair)
            self._handles.remember(token, pair)
        return token

    async def _resolve_handle(self, token: str) -> tuple[int, int | None] | None:
        """The (server, proxy) a getServer ID names, looked up in the store when another
        instance made it since the last reload; None for an ID nobody made."""
        pair = self._handles.pair(token)
        if pair is None and re.fullmatch(r"[0-9a-f]{32}", token):
            pair = await self._db(self._tables.resolve_handle, token)
            if pair is not None:
                self._handles.remember(token, pair)
        return pair

    async def target(self, key: str) -> tuple[Server, Proxy | None]:
        """The server and proxy a getServer ID, or a server's numeric id, names for the
        seed's relay; what this instance does not know is looked for in the store before
        a 404."""
        if re.fullmatch(r"[0-9]{1,9}", key):
            pair: tuple[int, int | None] | None = (int(key), None)
        else:
            pair = await self._resolve_handle(key)
        if pair is None:
            raise HTTPError(404, "unknown server id")
        server_id, proxy_id = pair
        if server_id not in self._servers or (proxy_id is not None and
                                              proxy_id not in self._proxies):
            await self._look_up(server_id, proxy_id)
        server = self._servers.get(server_id)
        if server is None:
            raise HTTPError(404, "unknown server id")
        if proxy_id is None:
            return server, self.proxy_of(server)
        proxy = self._proxies.get(proxy_id)
        if proxy is None:
            raise HTTPError(404, "unknown server id")
        return server, proxy

    async def touch_key(self, key: ApiKey) -> None:
        """Records an API key's use (lastUsedAt); a store that is down loses only that."""
        key.last_used_at = utc_now()
        with contextlib.suppress(StoreUnavailable):
            await self._store.call(self._tables.touch_key, key.id, key.last_used_at)

    async def check_server(self, server: Server, fresh: bool = False) -> None:
        """Reads the server's /api/tags through its proxy and updates memory; the store
        learns of it later (HealthLog), so a slow database never holds up a check.
        One check at a time per server and address: who asks meanwhile waits for it, or,
        ``fresh``, for one that starts after it asked (a model was just pulled there)."""
        await self._checks.run((server.id, server.host, server.port, server.scheme,
                                server.proxy_id), functools.partial(self._check, server),
                               fresh)

    async def _check(self, server: Server) -> None:
        proxy: Proxy | None = None
        try:
            proxy = self.proxy_of(server)
            if proxy is not None and not proxy.status:
                raise UpstreamError(502, f"{proxy.label} is disabled")
            models, error = await read_tags(self._upstreams, server, proxy,
                                            self.config.health_timeout)
        except UpstreamError as exc:
            models, error = [], exc.message
        current = self._current(server)
        if current is None:
            return  # deleted, or moved to another address, while it was being checked
        server = current
        if error is not None:
            self._mark(server, False, error)
            server.load.version_read = -math.inf  # back, it may run another version
        else:
            server.set_models(models)
            back = not server.reachable
            self._mark(server, True, None)
            if not server.load.probing and (back or server.load.failure_kind in REPAIRABLE
                                            or server.load.open_until <= time.monotonic()):
                # A server that could not be reached (or was down) and answers again is
                # repaired: back within a health round, not at the end of its cooldown.
                # One that answered its requests with errors waits out the cooldown (its
                # health check says nothing of them); past it, a check is a probe.
                self._scheduler.close_circuit(server, "its health check passed")
            await read_running(self._upstreams, server, proxy, self.config.health_timeout,
                               self._ranking.model_vram)
            self._ranking.learned(self._servers, server)
        server.last_checked = utc_now()
        self._ranking.changed(server)  # its models, health or resident models may differ
        self._health_log.record(server)

    def _current(self, checked: Server) -> Server | None:
        """The server's object now: a reload may have replaced the one that was checked
        (the result holds if the address is the same)."""
        server = self._servers.get(checked.id)
        if server is None or server is checked:
            return server
        address = (checked.host, checked.port, checked.scheme, checked.proxy_id)
        return server if (server.host, server.port, server.scheme,
                          server.proxy_id) == address else None

    def _mark(self, server: Server, reachable: bool, error: str | None) -> None:
        if reachable != server.reachable or error != server.last_error:
            if reachable:
                log.info("server %s is reachable (%d models)", server.label, len(server.models))
            else:
                log.warning("server %s is unreachable: %s", server.label, error)
                self._errors.appendleft({
                    "time": iso_time(utc_now()), "server": server.label, "kind": "health",
                    "message": f"health check failed: {error}"})
        if not reachable:
            server.load.unreachable()
        server.reachable, server.last_error = reachable, error

    async def check_all(self, over: float = 0.0, fresh: bool = False) -> None:
        work = [functools.partial(self.check_server, s, fresh) for s in self._servers.values()
                if s.enabled]
        await spread_out(work, self.config.health_concurrency, over)
        for server in self._servers.values():
            if not server.enabled:
                server.reachable, server.last_error = False, "disabled"
        self._scheduler.dispatch(self._servers)  # servers that came back take queued work
        self._drift.notice(self.models())

    def recheck(self, servers: Iterable[Server]) -> None:
        for server in servers:
            self.spawn(self.check_server(server))

    async def models_changed(self, servers: Iterable[Server]) -> None:
        """Reads again the models of the servers a fan-out changed, and tells every other
        instance to (the change log): once the fan-out has answered, the next request,
        here or anywhere, sees the change."""
        await asyncio.gather(*(self.check_server(s, fresh=True) for s in servers))
        with contextlib.suppress(StoreUnavailable):  # the others then see it a round on
            await self._store.call(self._tables.models_changed)

    async def up_to_date(self) -> None:
        """Applies what the change log holds now (one indexed read when nothing changed):
        a model another instance or worker has just pulled or deleted is seen here. One
        read for all who ask at once, waited for UP_TO_DATE_WAIT at most: a database that
        hangs or is down leaves what memory holds, and the read goes on behind."""
        if self._catching_up is None or self._catching_up.done():
            self._catching_up = asyncio.ensure_future(self.sync())
            self._catching_up.add_done_callback(_quietly)
        with contextlib.suppress(StoreUnavailable, TimeoutError):
            try:
                await asyncio.wait_for(asyncio.shield(self._catching_up), UP_TO_DATE_WAIT)
            except TimeoutError:
                rereading = self._rereading
                if rereading is None or rereading.done():
                    raise  # the database is slow: what memory holds
                # The database answered, and a change of models is being read from the
                # servers (each check within HEALTH_TIMEOUT): that is what was asked.
                await asyncio.shield(rereading)

    async def refresh_catalog(self) -> None:
        """Reads what the store's change log holds first (a model another instance or
        worker pulled is read from its servers at once), then checks every server, once
        for all concurrent callers and at most once a second (a model nobody has should
        not make each request scan the fleet)."""
        await self.up_to_date()
        loop = asyncio.get_running_loop()
        if self._catalog_refresh is None or (
            self._catalog_refresh.done() and loop.time() - self._catalog_refreshed_at > 1.0
        ):
            self._catalog_refreshed_at = loop.time()
            self._catalog_refresh = asyncio.ensure_future(self.check_all())
        await asyncio.shield(self._catalog_refresh)

    async def health_loop(self) -> None:
        """Checks the fleet on a timer. What other instances wrote is read beside it, never
        before it: a database that hangs must not stop servers being checked."""
        while True:
            # Jittered, so that instances sharing a fleet do not check it in lockstep.
            await asyncio.sleep(self.config.health_interval * random.uniform(0.9, 1.1))
            if self._syncing is None or self._syncing.done():
                self._syncing = asyncio.ensure_future(self._sync())
            await self.check_all(over=self.config.health_interval / 2)
            self._upstreams.sweep()

    async def board_loop(self) -> None:
        """Looks at the other workers' counts every BOARD_TICK (a worker alone returns):
        servers they freed are ranked again, and their slots go to this one's queue."""
        board = self._ranking.board
        if board is None:
            return
        seen = board.view()
        while True:
            await asyncio.sleep(BOARD_TICK)
            now = board.view()
            if now == seen:
                continue
            for server_id in board.changed_servers(seen, now):
                if (server := self._servers.get(server_id)) is not None:
                    self._ranking.changed(server)
            seen = now
            self._scheduler.dispatch(self._servers)

    async def _sync(self) -> None:
        try:
            await self.reload()
            if self._store_down_logged:
                log.info("database is back")
            self._store_down_logged = False
        except StoreUnavailable as exc:
            if not self._store_down_logged:
                log.warning("database unavailable, serving from memory: %s", exc)
                self._store_down_logged = True

    async def close(self) -> None:
        """Writes the last health results (as long as the store answers in time), gives
        back this instance's shares, stops what runs in the background."""
        with contextlib.suppress(StoreUnavailable):
            await self._store.call(self._tables.leave, self.instance)
        await self._health_log.close(self.config.db_timeout)
        pending = [t for t in (self._syncing, self._catching_up,
                               self._rereading, *self._tasks, *self._checks.pending())
                   if t is not None]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def spawn(self, coro: Awaitable[Any]) -> None:
        (task := asyncio.ensure_future(coro)).add_done_callback(self._tasks.discard)
        self._tasks.add(task)

    def upstream_failed(self, server: Server, kind: str, message: str = "") -> None:
        """A failure that counts against the server: for the breaker, the metrics and the
        status page."""
        self._scheduler.record(self._servers, server, False, kind)
        self._metrics.count("upstream_errors_total", (server.label, kind))
        self._errors.appendleft({"time": iso_time(utc_now()), "server": server.label,
                                 "kind": kind, "message": message or kind})

    # -- what handlers read ---------------------------------------------------------

    def server(self, server_id: int) -> Server | None:
        return self._servers.get(server_id)

    def every_server(self) -> list[Server]:
        return list(self._servers.values())

    def server_page(self, page: tuple[int | None, int]) -> tuple[list[Server], int | None]:
        """The servers of ``page`` (paged()), and the id the next page starts after."""
        return paged(self._servers, page)

    def serving(self) -> list[Server]:
        return [s for s in self._servers.values() if s.enabled and s.reachable]

    def proxy(self, proxy_id: int) -> Proxy | None:
        return self._proxies.get(proxy_id)

    def every_proxy(self) -> list[Proxy]:
        return list(self._proxies.values())

    def has_keys(self) -> bool:
        return bool(self._keys)

    def key(self, key_hash: str) -> ApiKey | None:
        """The API key whose SHA-256 is ``key_hash``."""
        return self._keys.get(key_hash)

    def every_key(self) -> list[ApiKey]:
        return list(self._keys.values())

    def recent_errors(self) -> list[dict[str, Any]]:
        """The last failures, the newest first: health checks' and requests'."""
        return list(self._errors)

    def catalog(self) -> dict[str, dict[str, Any]]:
        """Every model in the fleet once, as the first serving server lists it."""
        catalog: dict[str, dict[str, Any]] = {}
        for server in self.serving():
            for model in server.models:
                name = str(model.get("name") or model.get("model") or "")
                catalog.setdefault(name, model)
        return catalog

    def models(self) -> dict[str, dict[str, list[Server]]]:
        """Every model of the serving servers: each digest, and the servers holding it."""
        return fleet_models(self.serving())

    def drifted(self) -> list[str]:
        """The models whose servers hold them under more than one digest."""
        return drifted(self.models())

    def capacity(self, server: Server) -> int:
        """Requests in flight on ``server`` before more wait here."""
        return self._ranking.capacity(server)

    def capacity_report(self, server: Server) -> dict[str, Any]:
        """What the scheduler counts on for ``server``, and whence (Ranking)."""
        return self._ranking.capacity_report(server)

    def share(self, server_id: int) -> int | None:
        """This instance's slots of the server while others share the fleet."""
        return self._ranking.shared.shares.get(server_id)

    def instances(self) -> int:
        """Instances serving from the store, as the last heartbeat counted them."""
        return self._ranking.shared.instances

    def queue_depth(self) -> int:
        return self._scheduler.waiting()

    # -- routing: slots, outcomes, what answers show ----------------------------------

    def runnable(self, model: str) -> bool:
        """Whether some server could run ``model`` now, slots aside."""
        if self.config.strategy == "least_load":  # the index knows, without a scan
            return self._ranking.runnable(self._servers, model)
        now = time.monotonic()
        return any(self._ranking.eligible(s, model, now) for s in self._servers.values())

    def holders(self, model: str) -> list[Server]:
        """The servers that could serve ``model`` now, slots aside, the least busy first
        (for what takes no slot: /api/show)."""
        servers = self._ranking.candidates(self._servers.values(), model)
        return sorted(servers, key=lambda s: s.load.inflight / self._ranking.capacity(s))

    def unavailable(self, model: str, name: str) -> HTTPError:
        """Why no server takes ``model``: not found, or its servers are down (with when
        to try again: the soonest circuit to half-open, else the next health round)."""
        having = [s for s in self._servers.values() if model in s.model_names]
        if not having:
            return HTTPError(404, f"model '{name}' not found")
        enabled = [s for s in having if s.enabled]
        if enabled and all(s.draining for s in enabled):
            return ModelUnavailable(model, name, self.config.health_interval,
                                    "its servers are draining")
        now = time.monotonic()
        reopening = [s.load.open_until - now for s in having
                     if s.enabled and s.reachable and s.load.open_until > now]
        return ModelUnavailable(model, name, min(reopening, default=self.config.health_interval))

    def acquire(self, model: str, affinity: Affinity | None = None,
                exclude: frozenset[int] = frozenset(), tenant: Tenant = NO_TENANT
                ) -> Awaitable[Slot]:
        """A slot for ``model`` on the best server, waiting in the queue if need be, in
        ``tenant``'s fair share (Scheduler.acquire); give it back with release(). (Its
        coroutine, as it is: not one more wrapped around it, on every routed request.)"""
        return self._scheduler.acquire(self._servers, model, affinity, exclude, tenant)

    def take(self, server: Server) -> Slot:
        """A slot on ``server`` for a request that chose it itself; release() it."""
        return self._scheduler.take(server, None)

    def release(self, slot: Slot) -> None:
        self._scheduler.release(self._servers, slot)

    def record(self, server: Server, ok: bool) -> None:
        """A request's outcome, for the server's breaker."""
        self._scheduler.record(self._servers, server, ok)

    def observe(self, cold: bool, first_byte: float, total: float) -> None:
        """How long a finished request took, for the scheduler's estimates."""
        self._scheduler.observe(cold, first_byte, total)

    def conversation(self, prints: Sequence[bytes]) -> bytes | None:
        """The longest start of a conversation that has a server (Ranking.conversation)."""
        return self._ranking.conversation(prints)

    def remember(self, key: str | bytes, server: Server) -> None:
        """Keeps a session's or a conversation's server for the requests that follow."""
        self._ranking.remember(key, server.id)

    def answer_began(self, slot: Slot, proxy: Proxy | None, streamed: bool) -> None:
        """What an answer's start shows of its server: a streamed answer's first token
        (its parallel limit), and, after a cold load, what /api/ps shows now (an
        eviction, if the load made room for itself)."""
        if streamed:
            self._scheduler.first_token(self._servers, slot)
        learned = slot.server.load.learned
        if slot.cold and not learned.checking:
            learned.checking = True
            self.spawn(self._after_load(slot.server, proxy))

    async def _after_load(self, server: Server, proxy: Proxy | None) -> None:
        try:
            await read_running(self._upstreams, server, proxy, self.config.health_timeout,
                               self._ranking.model_vram, with_version=False)
            more = self._ranking.learned(self._servers, server)
            self._ranking.changed(server)
            if more:
                self._scheduler.dispatch(self._servers)
        finally:
            server.load.learned.checking = False

    def model_gone(self, server: Server, model: str) -> None:
        """``server`` said it lacks ``model``, which the catalog gave it: forgotten there
        now, and the server checked again."""
        server.set_models([m for m in server.models if canonical_model(
            str(m.get("name") or m.get("model") or "")) != model])
        self.spawn(self.check_server(server))

    def choose(self, models: Sequence[str], size: float | None) -> Server:
        """getServer's choice among the healthy servers that have ``models`` (and
        ``size``): the configured strategy's, holding no slot, so that a full fleet still
        answers (the least loaded); a 404 saying why when none has."""
        servers = list(self._servers.values())
        healthy = self._ranking.candidates(servers, None)
        candidates = [s for s in healthy if server_qualifies(s, models, size)]
        if not candidates:
            raise HTTPError(404, explain_no_match(servers, models, size))
        first_model = canonical_model(models[0]) if models else None
        return self._ranking.choose(candidates, first_model) or self._ranking.least_busy(
            candidates, first_model)

    # -- what management writes, through the store and its change log -----------------

    async def refresh(self) -> None:
        """Reads everything again (a list reads its table whole, as outside tools may
        write it too); a 503 when the store is down."""
        await self.or_503(self.reload())

    async def catch_up(self) -> None:
        """Applies what the change log holds since the last sync; a 503 when the store is
        down."""
        await self.or_503(self.sync())

    async def _write(self, method: Callable[..., T], *args: Any) -> T:
        """A write to the store (which logs it in its change log), then applied here: the
        next request sees it. A 503 when the store is down."""
        result = await self._db(method, *args)
        await self.catch_up()
        return result

    async def add_proxy(self, values: dict[str, Any]) -> int:
        return await self._write(self._tables.add_proxy, values)

    async def update_proxy(self, proxy_id: int, values: dict[str, Any]) -> Proxy | None:
        """The proxy changed, None if there is none; its servers are checked again."""
        if not await self._write(self._tables.update_proxy, proxy_id, values):
            return None
        self.recheck(s for s in self._servers.values() if s.proxy_id == proxy_id)
        return self._proxies.get(proxy_id)

    async def delete_proxy(self, proxy_id: int) -> bool:
        """False if there is no such proxy; Conflict while servers use it."""
        users = sorted(s.id for s in self._servers.values() if s.proxy_id == proxy_id)
        if users:
            raise Conflict(f"proxy {proxy_id} is used by servers "
                           f"{', '.join(map(str, users))}; change them first")
        return await self._write(self._tables.delete_proxy, proxy_id)

    async def add_server(self, values: dict[str, Any]) -> Server:
        """The server added and checked (Conflict: one at that address exists already)."""
        server_id = await self._write(self._tables.add_server, values)
        server = self._servers[server_id]
        log.info("added server %d %s", server_id, server.label)
        if server.enabled:
            await self.check_server(server)
        # As it is now: a health round or sync may have read its row again meanwhile.
        return self._servers.get(server_id, server)

    async def update_server(self, server_id: int, values: dict[str, Any]) -> Server | None:
        """The server changed and checked again in full, None if there is none (Conflict:
        another server has its new address)."""
        if not await self._write(self._tables.update_server, server_id, values):
            return None
        server = self._servers[server_id]
        if server.enabled:
            server.load.version_read = -math.inf  # checked in full, version too
            await self.check_server(server)
        else:
            server.reachable, server.last_error = False, "disabled"
        return self._servers.get(server_id, server)

    async def delete_server(self, server_id: int) -> bool:
        return await self._write(self._tables.delete_server, server_id)

    async def add_key(self, values: dict[str, Any]) -> int:
        return await self._write(self._tables.add_key, values)

    async def update_key(self, key_id: int, values: dict[str, Any]) -> bool:
        return await self._write(self._tables.update_key, key_id, values)

    async def delete_key(self, key_id: int) -> bool:
        return await self._write(self._tables.delete_key, key_id)


# ---------------------------------------------------------------------------
# Fleet file: servers and model policy declared in a file, applied live
# ---------------------------------------------------------------------------


#: A field of a request body named by its dotted path: ``options.num_ctx``, ``keep_alive``.
_body_path_re = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}(?:\.[A-Za-z_][A-Za-z0-9_]{0,63}){0,7}")
#: What a model's entry in the fleet file may say.
MODEL_POLICY_FIELDS = ("alias", "fallback", "clamp", "set", "strip")
#: Seconds between two looks at the fleet file's size and time (a change applies within 2).
FLEET_FILE_POLL = 1.0
#: The columns a server of the file has when the file does not say them: a file states a
#: server whole, so what it leaves out is the default, not what the API set before.
FILE_SERVER_DEFAULTS: dict[str, Any] = {
    "scheme": "http", "name": None, "location": None, "runner": None, "enabled": 1,
    "draining": 0, "proxy_id": None, "weight": 1.0, "max_concurrency": None,
    "num_parallel": None, "max_loaded_models": None, "upstream_auth": None, "labels": None,
    "owner": "file"}


class ModelPolicy(NamedTuple):
    """What the fleet file says of one model name (or alias)."""

    alias: tuple[str, ...] = ()  # the real names it stands for, in order
    fallback: tuple[str, ...] = ()  # names to use, in order, when no server can run it
    clamp: tuple[tuple[str, float], ...] = ()  # a field's greatest value
    set: tuple[tuple[str, Any], ...] = ()  # a field's value, whatever was sent
    strip: tuple[str, ...] = ()  # fields taken out

    def to_json(self) -> dict[str, Any]:
        return {"alias": list(self.alias), "fallback": list(self.fallback),
                "clamp": dict(self.clamp), "set": dict(self.set), "strip": list(self.strip)}


class FleetPolicy(NamedTuple):
    """A fleet file, validated: its servers (store columns) and model policy."""

    servers: tuple[dict[str, Any], ...] = ()
    models: dict[str, ModelPolicy] = {}  # noqa: RUF012 (a NamedTuple default, never changed)


def _names_list(value: Any, where: str) -> tuple[str, ...]:
    if not (isinstance(value, list) and value and all(
            isinstance(v, str) and _model_pattern_re.fullmatch(v) and "*" not in v
            for v in value)):
        raise ConfigError(f"{where}: must be a list of model names")
    return tuple(canonical_model(v) for v in value)


def _paths(value: Any, where: str) -> None:
    if not all(isinstance(p, str) and _body_path_re.fullmatch(p) for p in value):
        raise ConfigError(f"{where}: fields are named by dotted paths (options.num_ctx)")


def parse_model_policy(name: str, entry: Any) -> ModelPolicy:
    where = f"models.{name}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be an object")
    unknown = sorted(set(entry) - set(MODEL_POLICY_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field '{unknown[0]}' (alias, fallback, clamp, "
                          "set, strip)")
    alias = _names_list(entry["alias"], f"{where}.alias") if "alias" in entry else ()
    fallback = _names_list(entry["fallback"], f"{where}.fallback") if (
        "fallback" in entry) else ()
    clamp, fixed = entry.get("clamp", {}), entry.get("set", {})
    if not isinstance(clamp, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in clamp.values()):
        raise ConfigError(f"{where}.clamp: must map fields to numbers")
    if not isinstance(fixed, dict):
        raise ConfigError(f"{where}.set: must map fields to values")
    strip = entry.get("strip", [])
    if not isinstance(strip, list):
        raise ConfigError(f"{where}.strip: must be a list of fields")
    for part, fields in (("clamp", clamp), ("set", fixed), ("strip", strip)):
        _paths(fields, f"{where}.{part}")
    return ModelPolicy(alias, fallback, tuple(clamp.items()), tuple(fixed.items()),
                       tuple(strip))


def parse_fleet(data: Any) -> FleetPolicy:
    """A fleet file's content, validated; ConfigError naming the first problem."""
    if not isinstance(data, dict):
        raise ConfigError("it must hold an object with 'servers' and 'models'")
    unknown = sorted(set(data) - {"servers", "models"})
    if unknown:
        raise ConfigError(f"unknown field '{unknown[0]}' (servers, models)")
    servers, seen = [], set()
    listed = data.get("servers", [])
    if not isinstance(listed, list):
        raise ConfigError("servers: must be a list")
    for index, entry in enumerate(listed):
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            raise ConfigError(f"servers[{index}]: must be an object with a 'url'")
        try:
            values = parse_server_body(entry, partial=False)
        except HTTPError as exc:
            raise ConfigError(f"servers[{index}]: {exc.message}") from None
        address = (values["host"], values["port"])
        if address in seen:
            raise ConfigError(f"servers[{index}]: {entry['url']} is listed twice")
        seen.add(address)
        servers.append({**FILE_SERVER_DEFAULTS, **values})
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError("models: must be an object of model names")
    policies = {}
    for name, entry in models.items():
        if not (isinstance(name, str) and _model_pattern_re.fullmatch(name) and "*" not in name):
            raise ConfigError(f"models: {name!r} is not a model name")
        policies[canonical_model(name)] = parse_model_policy(name, entry)
    return FleetPolicy(tuple(servers), policies)


def read_fleet_file(path: str) -> FleetPolicy:
    """The fleet file at ``path`` (JSON; TOML when it ends in .toml), validated."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_ADMIN_BODY + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read it: {exc.strerror or exc}") from None
    if len(raw) > MAX_ADMIN_BODY:
        raise ConfigError(f"it is larger than {MAX_ADMIN_BODY} bytes")
    try:
        if path.endswith(".toml"):
            import tomllib  # Python 3.11+, imported where used
            data = tomllib.loads(raw.decode("utf-8"))
        else:
            data = decode_json(raw)
    except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError is one
        raise ConfigError(f"it does not parse: {exc}") from None
    return parse_fleet(data)


def _server_state(server: Server) -> dict[str, Any]:
    """A server's columns as a fleet file entry states them, to see what would change."""
    return {"scheme": server.scheme, "name": server.name, "location": server.location,
            "runner": server.runner, "enabled": int(server.enabled),
            "draining": int(server.draining), "proxy_id": server.proxy_id,
            "weight": server.weight, "max_concurrency": server.max_concurrency,
            "num_parallel": server.num_parallel, "max_loaded_models": server.max_loaded_models,
            "upstream_auth": server.authorization,
            "labels": json.dumps(dict(sorted(server.labels.items()))) if server.labels
            else None, "owner": server.owner}


class ServerChange(NamedTuple):
    """One step to make the servers match a fleet file: add, change or remove."""

    action: Literal["add", "change", "remove"]
    server_id: int | None
    values: dict[str, Any]
    label: str

    def __str__(self) -> str:
        changed = f" ({', '.join(sorted(self.values))})" if self.action == "change" else ""
        return f"{self.action} {self.label}{changed}"


def plan_servers(policy: FleetPolicy, servers: Iterable[Server]) -> list[ServerChange]:
    """What makes ``servers`` match ``policy``: its servers added, or changed where they
    differ (by address; one the API added becomes the file's), and the file's servers it
    no longer lists removed. Servers the API added, and the file does not list, stay."""
    by_address = {(s.host, s.port): s for s in servers}
    changes, listed = [], set()
    for values in policy.servers:
        address = (values["host"], values["port"])
        listed.add(address)
        url = f"{values['scheme']}://{format_host(values['host'])}:{values['port']}"
        label = values["name"] or url
        server = by_address.get(address)
        if server is None:
            changes.append(ServerChange("add", None, values, label))
            continue
        state = _server_state(server)
        differ = {k: v for k, v in values.items() if k in state and state[k] != v}
        if differ:
            changes.append(ServerChange("change", server.id, differ, label))
    for address, server in sorted(by_address.items(), key=lambda item: item[1].id):
        if server.owner == "file" and address not in listed:
            changes.append(ServerChange("remove", server.id, {}, server.label))
    return changes


@functools.lru_cache(maxsize=256)
def _renaming(real: str, asked: str) -> tuple[re.Pattern[bytes], bytes]:
    """The expression that finds ``"model": "<real>"``, and what it becomes: made once,
    not for each line of a stream."""
    return (re.compile(rb'"model"\s*:\s*"' + re.escape(json.dumps(real)[1:-1].encode()) +
                       rb'"'), b'"model":' + json.dumps(asked).encode())


def rename_model(data: bytes, real: str, asked: str) -> bytes:
    """``data`` (JSON of an answer) with its ``"model": "<real>"`` fields naming ``asked``."""
    pattern, named = _renaming(real, asked)
    return pattern.sub(named, data)


def _pin(body: dict[str, Any], path: str, make: bool = False
         ) -> tuple[dict[str, Any], str] | None:
    """The object that holds ``path``'s last field in ``body``, and that field's name;
    None when something on the way is not an object, or is missing (made, with
    ``make``)."""
    *parents, field = path.split(".")
    node = body
    for part in parents:
        child = node.setdefault(part, {}) if make else node.get(part)
        if not isinstance(child, dict):
            return None
        node = child
    return node, field


def apply_pins(body: dict[str, Any], policy: ModelPolicy) -> None:
    """A model's pinned parameters on a request body: fields stripped, set, clamped."""
    for path in policy.strip:
        if (found := _pin(body, path)) is not None:
            found[0].pop(found[1], None)
    for path, value in policy.set:
        if (found := _pin(body, path, make=True)) is not None:
            found[0][found[1]] = value
    for path, limit in policy.clamp:
        if (found := _pin(body, path)) is not None:
            node, field = found
            value = node.get(field)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > limit:
                node[field] = int(limit) if float(limit).is_integer() else limit


class FleetFile:
    """The fleet file (FLEET_FILE) in force: read at start, on SIGHUP and when it changes
    on disk (looked at every FLEET_FILE_POLL seconds); its servers made to match through
    the fleet (so the store, and every instance, see them), its model policy kept for the
    rooms that route. A file that does not read or validate is refused with a log line
    naming the problem, and the policy in force stays."""

    def __init__(self, config: Config, fleet: Fleet) -> None:
        self.path = config.fleet_file
        self.fleet = fleet
        self.policy = FleetPolicy()
        self._seen: tuple[int, int] | None = None  # the file's (mtime_ns, size) applied
        self._applying = asyncio.Lock()

    def owns(self, server: Server) -> bool:
        return bool(self.path) and server.owner == "file"

    def model(self, name: str) -> ModelPolicy | None:
        return self.policy.models.get(name)

    async def apply(self, why: str) -> bool:
        """Reads the file and applies it; whether it was (False: refused, kept as was)."""
        if not self.path:
            return False
        async with self._applying:
            loop = asyncio.get_running_loop()
            with contextlib.suppress(OSError):
                stat = os.stat(self.path)
                self._seen = (stat.st_mtime_ns, stat.st_size)
            try:
                policy = await loop.run_in_executor(None, read_fleet_file, self.path)
            except ConfigError as exc:
                log.error("fleet file %s refused (%s): %s; the policy in force stays",
                          self.path, why, exc)
                return False
            changes = plan_servers(policy, self.fleet.every_server())
            done = []
            for change in changes:
                try:
                    if change.action == "add":
                        await self.fleet.add_server(change.values)
                    elif change.action == "change" and change.server_id is not None:
                        await self.fleet.update_server(change.server_id, change.values)
                    elif change.server_id is not None:
                        await self.fleet.delete_server(change.server_id)
                    done.append(str(change))
                except (Conflict, StoreUnavailable) as exc:
                    log.error("fleet file %s: cannot %s: %s", self.path, change, exc)
            self.policy = policy
            log.info("fleet file %s applied (%s): %d servers, %d model policies; %s",
                     self.path, why, len(policy.servers), len(policy.models),
                     "; ".join(done) or "no server changed")
            return True

    async def watch_loop(self) -> None:
        """Applies the file again when its time or size changes."""
        while self.path:
            await asyncio.sleep(FLEET_FILE_POLL)
            try:
                stat = os.stat(self.path)
                now: tuple[int, int] | None = (stat.st_mtime_ns, stat.st_size)
            except OSError:
                now = None
            if now is not None and now != self._seen:
                await self.apply("it changed")


# ---------------------------------------------------------------------------
# Access control: the admin token, browsers, API keys
# ---------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class KeyUsage:
    """One API key's use on this instance: in flight, waiting for a turn (first come,
    first served), and request times in the last minute."""

    inflight: int = 0
    recent: collections.deque[float] = dataclasses.field(default_factory=collections.deque)
    touched: float = -1e9
    turns: collections.deque[asyncio.Future[None]] = dataclasses.field(
        default_factory=collections.deque)

@dataclasses.dataclass(frozen=True)
class Grant:
    """Access.authorize_client's verdict on a request it lets through: the API key's
    usage to count it against (None: no key counts), whether its Authorization was the
    balancer's own (then not sent on), and whether it was the admin token's."""

    usage: KeyUsage | None
    authenticated: bool
    privileged: bool
    concurrency: int | None = None  # the key's maxConcurrent
    key: ApiKey | None = None  # the API key it came with


NO_GRANT = Grant(None, False, False)


def utc_day(when: float) -> str:
    """The UTC day of Unix time ``when``, as YYYY-MM-DD: what budgets and usage count by."""
    return datetime.datetime.fromtimestamp(when, datetime.UTC).date().isoformat()


class Tenants:
    """What each API key may use and has used: its models (``models``), its usage
    (requests, prompt and completion tokens, by model and UTC day, read from each
    answer's final counts), and its day's budget (``tokensPerDay``).

    Usage is counted here and added to the store's sums every SYNC_INTERVAL in one
    transaction, once (a batch that timed out is tried again, and skipped if it went
    through), so every instance and every restart sees the same sums; a budget is checked
    against the day's sums of every instance as last read, plus what is not written yet."""

    def __init__(self, config: Config, store: AsyncStore, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._store = store
        self.metrics = metrics
        self.clock = clock  # Unix time: the tests move it to the next day
        self._instance = secrets.token_hex(8)
        self._batches = itertools.count(1)
        #: Counts not written yet: (key id, day, model) -> [requests, prompt, completion].
        self._pending: dict[tuple[int, str, str], list[int]] = {}
        #: The batch being written, kept as it is until the store says it is in.
        self._sending: tuple[int, list[tuple[int, str, str, int, int, int]]] | None = None
        self._day = utc_day(clock())
        self._spent: dict[int, int] = {}  # the store's sums for _day, as last read
        self._today: tuple[float, float, str] = (0.0, 0.0, "")  # a UTC day: start, end

    # -- what a key may do ----------------------------------------------------------------

    @staticmethod
    def permit(key: ApiKey | None, model: str) -> None:
        """403 when ``key`` may not use ``model``."""
        if key is not None and not key.allows(model):
            raise HTTPError(403, f"API key '{key.name}' may not use model '{model}'")

    @staticmethod
    def unrestricted(key: ApiKey | None, what: str) -> None:
        """403 for a key held to some models on what names no model it could be checked
        by (a server chosen by id)."""
        if key is not None and key.models is not None:
            raise HTTPError(403, f"API key '{key.name}' may use only some models: {what} "
                                 "is not open to it; use the root endpoints")

    def check_budget(self, key: ApiKey) -> None:
        """429 with Retry-After (the next UTC midnight) once ``key`` has spent its day."""
        if key.tokens_per_day is None:
            return
        now = self.clock()
        if self.spent_today(key.id, now) >= key.tokens_per_day:
            midnight = datetime.datetime.fromtimestamp(now, datetime.UTC).replace(
                hour=0, minute=0, second=0, microsecond=0) + datetime.timedelta(days=1)
            wait = max(1, math.ceil(midnight.timestamp() - now))
            raise HTTPError(429, f"API key '{key.name}' has spent its {key.tokens_per_day} "
                                 "tokens for today; its budget renews at 00:00 UTC",
                            headers=[("Retry-After", str(wait))])

    def today(self, now: float | None = None) -> str:
        """The UTC day of ``now`` (the clock's), worked out once a day, not a request."""
        now = self.clock() if now is None else now
        start, end, day = self._today
        if not start <= now < end:
            day = utc_day(now)
            midnight = datetime.datetime.fromisoformat(day).replace(
                tzinfo=datetime.UTC).timestamp()
            self._today = (midnight, midnight + 86400, day)
        return day

    def spent_today(self, key_id: int, now: float | None = None) -> int:
        """Tokens ``key_id`` used today (UTC), every instance's as last read and this
        one's not written yet."""
        day = self.today(now)
        spent = self._spent.get(key_id, 0) if day == self._day else 0
        for (pending_key, pending_day, _), counts in self._pending.items():
            if pending_key == key_id and pending_day == day:
                spent += counts[1] + counts[2]
        if self._sending is not None:
            spent += sum(p + c for k, d, _, _, p, c in self._sending[1]
                         if k == key_id and d == day)
        return spent

    # -- what a key used ------------------------------------------------------------------

    def record(self, key: ApiKey | None, model: str, tokens: tuple[int, int] | None) -> None:
        """One answered request of ``key`` for ``model``, with its (prompt, completion)
        tokens when its answer said them."""
        prompt, completion = tokens or (0, 0)
        name = key.name if key is not None else ""
        if tokens is not None:
            self.metrics.count("key_tokens_total", (name, model, "prompt"), prompt)
            self.metrics.count("key_tokens_total", (name, model, "completion"), completion)
        if key is None:
            return
        counts = self._pending.setdefault((key.id, self.today(), model), [0, 0, 0])
        counts[0] += 1
        counts[1] += prompt
        counts[2] += completion

    async def flush(self) -> None:
        """Writes what was counted since the last flush and reads the day's sums."""
        if self._sending is None and self._pending:
            self._sending = (next(self._batches), [
                (key_id, day, model, requests, prompt, completion)
                for (key_id, day, model), (requests, prompt, completion)
                in self._pending.items()])
            self._pending = {}
        day = self.today()
        batch, rows = self._sending or (0, [])
        spent = await self._store.call(self._store.store.add_usage, self._instance, batch,
                                       rows, day)
        self._sending = None
        self._day, self._spent = day, spent

    async def usage_loop(self) -> None:
        """Flushes every SYNC_INTERVAL; a store that does not answer keeps the counts
        for the next time."""
        while True:
            await asyncio.sleep(self.config.sync_interval)
            try:
                await self.flush()
            except StoreUnavailable as exc:
                log.warning("cannot write the API keys' usage: %s; kept for the next try",
                            exc)

    async def usage(self, key: ApiKey) -> dict[str, Any]:
        """What ``key`` used: in all, today (against its budget), by model, by day."""
        with contextlib.suppress(StoreUnavailable):
            await self.flush()
        rows = await self._store.call(self._store.store.usage_of, key.id)
        counted: dict[tuple[str, str], list[int]] = {}
        for day, model, *counts in rows:
            counted[(day, model)] = list(counts)
        unsent = [*self._pending.items(), *(
            ((k, d, m), [r, p, c]) for k, d, m, r, p, c in (self._sending or (0, []))[1])]
        for (key_id, day, model), counts in unsent:
            if key_id == key.id:
                mine = counted.setdefault((day, model), [0, 0, 0])
                for index, count in enumerate(counts):
                    mine[index] += count

        def shown(counts: Iterable[Sequence[int]]) -> dict[str, int]:
            totals = [sum(column) for column in zip(*counts, strict=True)] or [0, 0, 0]
            return {"requests": totals[0], "promptTokens": totals[1],
                    "completionTokens": totals[2]}

        days = sorted({day for day, _ in counted})
        models = sorted({model for _, model in counted})
        today = self.today()
        return {
            "total": shown(counted.values()),
            "today": {**shown(c for (d, _), c in counted.items() if d == today),
                      "tokensPerDay": key.tokens_per_day},
            "models": [{"model": m, **shown(c for (_, mm), c in counted.items() if mm == m)}
                       for m in models],
            "days": [{"day": d, **shown(c for (dd, _), c in counted.items() if dd == d),
                      "models": [{"model": m, **shown([c])} for (dd, m), c in
                                 sorted(counted.items()) if dd == d]} for d in days]}

def bearer_token(head: RequestHead) -> str | None:
    value = head.headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None

def basic_password(head: RequestHead) -> str | None:
    """The password of ``Authorization: Basic`` (any user name): how a browser sends the
    admin token to the dashboard."""
    value = head.headers.get("authorization")
    if value is None or not value.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(value[6:].strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2] or None

def origin_matcher(patterns: Iterable[str]) -> re.Pattern[str]:
    """One regex for origins as OLLAMA_ORIGINS gives them: each whole, ``*`` any run."""
    parts = [re.escape(pattern).replace(r"\*", ".*") for pattern in patterns]
    # With no pattern, one that never matches (any such is as good: pragma).
    return re.compile("|".join(parts) or "(?!)", re.IGNORECASE)  # pragma: no mutate

def split_authority(authority: str) -> tuple[str, int | None] | None:
    """(host, port) of a Host field or an origin's authority, lower-cased and without
    IPv6 brackets, the port None when not given; None when it is not an authority."""
    try:
        parts = urllib.parse.urlsplit("//" + authority)
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.username is not None or parts.path:
        return None
    return parts.hostname.lower(), port

def same_origin(origin: str, host: str | None) -> bool:
    """Whether a browser's ``Origin`` is the balancer's own, as the request's Host names it."""
    try:
        parts = urllib.parse.urlsplit(origin)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname or host is None:
        return False
    named = split_authority(host)
    if named is None:
        return False
    default = 443 if parts.scheme == "https" else 80
    return (named[0], named[1] or default) == (parts.hostname.lower(), port or default)

#: A ``for=`` of a Forwarded element (RFC 7239 4): a token, or a quoted string.
_forwarded_for_re = re.compile(r'(?:^|[;,])\s*for\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]+)',
                               re.IGNORECASE)
#: The longest hop kept from a proxy's header: anything longer is no address.
MAX_HOP = 64


def forwarded_hops(headers: Headers) -> list[str]:
    """The client addresses a request's proxies wrote, the first (left-most) first: from
    Forwarded (RFC 7239), else X-Forwarded-For; each without its port or brackets."""
    values = headers.get_all("forwarded")
    if values:
        hops = [m.group(1).strip('"') for value in values
                for m in _forwarded_for_re.finditer(value)]
    else:
        hops = [hop.strip() for value in headers.get_all("x-forwarded-for")
                for hop in value.split(",")]
    found = []
    for hop in hops:
        if hop.startswith("["):  # "[2001:db8::1]:4711"
            hop = hop[1:hop.find("]")] if "]" in hop else hop[1:]
        elif hop.count(":") == 1:  # "192.0.2.1:80"
            hop = hop.partition(":")[0]
        if hop:
            found.append(hop[:MAX_HOP])
    return found


def is_loopback(peer: str) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return peer == "unix"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class Access:
    """Who may call what. The management endpoints need the admin token (or, without one,
    a loopback client whose Host names the balancer) and never take a request from a page
    of another site; the Ollama endpoints answer CORS as Ollama does and, once keys exist,
    need an API key within its limits. It also names each request, and says how much of
    an upstream's failure a client may be told."""

    def __init__(self, config: Config, fleet: Fleet, tenants: Tenants) -> None:
        self.config = config
        self.fleet = fleet
        self.tenants = tenants
        self.admin_token = config.admin_token
        self._origins = origin_matcher((*DEFAULT_ORIGINS, *config.origins))
        self._own_names = frozenset({socket.gethostname().lower(), *config.allowed_hosts})
        self._id_prefix = secrets.token_hex(4) + "-"
        self._id_counter = itertools.count(1)
        self.key_usage: dict[int, KeyUsage] = {}
        self._trusted = [ipaddress.ip_network(n) for n in config.trusted_proxies]

    def request_id(self, head: RequestHead) -> str:
        """The client's X-Request-Id when it is a plain token (a proxy in front set it),
        else one of ours: this process's tag and a counter."""
        given = head.headers.index.get("x-request-id")
        if given is not None and len(given) == 1 and request_id_re.fullmatch(given[0]):
            return given[0]
        return f"{self._id_prefix}{next(self._id_counter):x}"

    def names_this_balancer(self, host: str | None) -> bool:
        """Whether a Host field names the balancer itself: an IP address (a browser sends
        one only for a page of that address), localhost, this host's name, or a name in
        ALLOWED_HOSTS. A name an attacker's DNS points here (rebinding) is none of these."""
        if host is None:
            return True  # HTTP/1.0 without Host: no browser sends that
        parsed = split_authority(host)
        if parsed is None:
            return False
        name = parsed[0]
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(name)
            return True
        return (name == "localhost" or name.endswith(".localhost")
                or name in self._own_names or "*" in self._own_names)

    def authorize_admin(self, request: Request) -> None:
        """The management endpoints: never for a web page of another origin (CSRF), bodies
        only as JSON (no HTML form can send that), then ADMIN_TOKEN as a bearer token,
        compared in constant time; without one, loopback clients whose Host names the
        balancer."""
        headers = request.head.headers
        origin = headers.get("origin")
        if origin is not None and not same_origin(origin, headers.get("host")):
            raise HTTPError(403, "management requests from a web page of another origin "
                                 "are refused")
        site = headers.tokens("sec-fetch-site")
        if ("cross-site" in site or "same-site" in site) and not (
                request.method in ("GET", "HEAD") and "navigate" in headers.tokens(
                    "sec-fetch-mode")):
            # A link followed to the dashboard is a person's own page view; anything a
            # page of another site sends by itself is refused.
            raise HTTPError(403, "management requests from another site are refused")
        if not self.admin_token:
            if not self.on_this_host(request):
                raise HTTPError(403, "management endpoints answer only loopback clients "
                                     "while ADMIN_TOKEN is not set")
            if not self.names_this_balancer(headers.get("host")):
                raise HTTPError(403, f"Host {headers.get('host')!r} does not name this "
                                     "balancer: add it to ALLOWED_HOSTS, or set ADMIN_TOKEN")
        else:
            token = bearer_token(request.head) or basic_password(request.head)
            challenge = [("WWW-Authenticate", 'Bearer realm="ollamabalancer admin"')]
            if request.path == "/dashboard":  # a browser asks for it as a password
                challenge.insert(0, ("WWW-Authenticate", 'Basic realm="ollamabalancer admin"'))
            if token is None:
                raise HTTPError(401, "missing admin token: send Authorization: Bearer <token>",
                                headers=challenge)
            if not hmac.compare_digest(token.encode(), self.admin_token.encode()):
                raise HTTPError(401, "invalid admin token", headers=challenge)
        if request.method in ("POST", "PUT", "PATCH") or not request.body_done:
            content_type = headers.get("content-type")
            media = content_type.partition(";")[0].strip().lower() if content_type else None
            if media != "application/json":
                raise HTTPError(415, "management requests with a body must be sent as "
                                     "Content-Type: application/json")

    def trusts(self, address: str) -> bool:
        """Whether ``address`` is a reverse proxy of TRUSTED_PROXIES."""
        if not self._trusted:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._trusted)

    def client_of(self, request: Request) -> tuple[str, bool]:
        """The client's address, and whether the request carries a proxy's word that is
        not taken (Forwarded / X-Forwarded-For from a peer not in TRUSTED_PROXIES: then
        the peer is the client, and never counts as a client on this host). From a
        trusted peer, the right-most hop that is not a trusted proxy is the client
        (those to its left are what the client itself may have written)."""
        peer = request.wire.peer
        hops = forwarded_hops(request.head.headers)
        if not hops:
            return peer, False
        if not self.trusts(peer):
            return peer, True
        for hop in reversed(hops):
            if not self.trusts(hop):
                return hop, False
        return hops[0], False

    def on_this_host(self, request: Request) -> bool:
        """A client on this host, in its own name: loopback, and no proxy's word about
        someone else (a reverse proxy on this host forwards others)."""
        return not request.forwarded and is_loopback(request.client)

    def authorize_model_change(self, request: Request) -> None:
        """Pulling, pushing, creating, copying and deleting models change every server:
        the admin token, or without one a client on this host (MODEL_MANAGEMENT=admin)."""
        token = bearer_token(request.head) or basic_password(request.head)
        if self.admin_token:
            if token and hmac.compare_digest(token.encode(), self.admin_token.encode()):
                return
        elif self.on_this_host(request):
            return
        raise HTTPError(403, "changing the fleet's models (pull, push, create, copy, delete, "
                             "blob uploads) needs the admin token (Authorization: Bearer "
                             "<ADMIN_TOKEN>)" + ("" if self.admin_token else
                                                 " or, without one, a client on this host")
                        + "; MODEL_MANAGEMENT=open allows every client, as Ollama does")

    def allow_origin(self, request: Request) -> Sequence[tuple[str, str]]:
        """CORS on the Ollama endpoints, as Ollama answers it: a browser page of an allowed
        origin (ORIGINS, and Ollama's defaults) may read the answer, with the fields this
        returns; another gets 403."""
        origins = request.head.headers.index.get("origin")
        if origins is None:
            return ()
        origin = origins[0]
        if len(origins) > 1 or not self._origins.fullmatch(origin):  # a browser sends one
            raise HTTPError(403, f"origin {origin[:100]!r} is not allowed: add it to ORIGINS")
        return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
                ("Access-Control-Expose-Headers", "X-Request-Id, X-Ollama-Server")]

    def preflight(self, request: Request, accesses: list[str]) -> Response:
        """A CORS preflight (OPTIONS with Access-Control-Request-Method): 204 with what
        Ollama allows, for an allowed origin on the Ollama endpoints only."""
        if "admin" in accesses:
            raise HTTPError(403, "management endpoints take no cross-origin requests")
        return Response(204, headers=[*CORS_PREFLIGHT_FIELDS, *self.allow_origin(request)])

    def authorize_client(self, request: Request) -> Grant:
        """Once any API key exists (or REQUIRE_API_KEY=1), a valid key within its limits.

        The key is compared through its SHA-256, so timing reveals nothing of it. The
        balancer's own credentials, an API key or the admin token, are recognised in
        every mode and never sent upstream. Returns whose credential it was, and the
        key's usage to count the request against (None when no key is needed or the
        admin token was used).
        """
        keys = self.fleet.has_keys()
        if not (self.admin_token or keys or self.config.require_api_key):
            return NO_GRANT  # no credential of the balancer's exists to recognise
        token = bearer_token(request.head) or basic_password(request.head)
        is_admin = bool(token and self.admin_token and hmac.compare_digest(
            token.encode(), self.admin_token.encode()))
        key = self.fleet.key(hashlib.sha256(token.encode()).hexdigest()) if (
            token and keys and not is_admin) else None
        grant = Grant(None, is_admin or key is not None, is_admin)
        if not (keys or self.config.require_api_key):
            return grant
        challenge = [("WWW-Authenticate", 'Bearer realm="ollamabalancer"')]
        if token is None:
            raise HTTPError(401, "missing API key: send Authorization: Bearer <key>",
                            headers=challenge)
        if is_admin:
            return grant
        if key is None:
            raise HTTPError(401, "invalid API key", headers=challenge)
        usage = self.key_usage.setdefault(key.id, KeyUsage())
        now = time.monotonic()
        if key.requests_per_minute is not None:
            recent = usage.recent
            while recent and now - recent[0] >= 60:
                recent.popleft()
            if len(recent) >= key.requests_per_minute:
                wait = max(1, math.ceil(60 - (now - recent[0])))
                raise HTTPError(429, f"API key '{key.name}' is over its "
                                     f"{key.requests_per_minute} requests per minute",
                                headers=[("Retry-After", str(wait))])
            recent.append(now)
        if now - usage.touched > 60:  # lastUsedAt, written at most once a minute
            usage.touched = now
            self.fleet.spawn(self.fleet.touch_key(key))
        return Grant(usage, True, False, key.max_concurrent, key)

    def check_budget(self, key: ApiKey) -> None:
        """429 once ``key`` has spent its day's tokens (Tenants.check_budget)."""
        self.tenants.check_budget(key)

    async def enter(self, grant: Grant) -> None:
        """Counts a request against its key's maxConcurrent: at once while the key has
        room, else after those that came first, as the fleet's queue does, for up to
        QUEUE_TIMEOUT (then 503). Each enter() is followed by a leave(), on every path."""
        usage, limit = grant.usage, grant.concurrency
        assert usage is not None
        if limit is None or (usage.inflight < limit and not usage.turns):
            usage.inflight += 1
            return
        if len(usage.turns) >= self.config.max_queue:
            raise HTTPError(503, "server busy, please try again.  maximum pending requests "
                                 "exceeded", headers=[("Retry-After", "1")])
        loop = asyncio.get_running_loop()
        turn = loop.create_future()
        usage.turns.append(turn)
        timer = loop.call_later(self.config.queue_timeout, turn.cancel)
        try:
            await turn  # given by leave(): the request that ended handed its place on
        except BaseException:
            if turn.done() and not turn.cancelled():
                self.leave(usage)  # handed a turn as it left: passed on
            else:
                with contextlib.suppress(ValueError):
                    usage.turns.remove(turn)
                if not timer.cancelled() and loop.time() >= timer.when():
                    raise HTTPError(503, f"none of the API key's {limit} requests in flight "
                                         "ended in time (QUEUE_TIMEOUT)",
                                    headers=[("Retry-After", "1")]) from None
            raise
        finally:
            timer.cancel()

    @staticmethod
    def leave(usage: KeyUsage) -> None:
        """A request of the key is over: its place goes to the first that waits, if any."""
        while usage.turns:
            turn = usage.turns.popleft()
            if not turn.done():
                turn.set_result(None)  # in flight in its stead: the count stays
                return
        usage.inflight -= 1

    def public_message(self, request: Request | None, status: int, detail: str) -> str:
        """What a client is told of an upstream's or a proxy's failure: the detail (names,
        addresses, a proxy's reasons) for an admin; for anyone else a neutral message and
        the request id, under which the log keeps the detail."""
        request_id = request.id if request is not None else "-"
        log.warning("request %s failed upstream: %s", request_id, detail)
        if request is not None and (request.privileged or (
                not self.admin_token and self.on_this_host(request))):
            return detail
        what = UPSTREAM_FAILURES.get(status, "the upstream request failed")
        return f"{what} (request id {request_id})"


# ---------------------------------------------------------------------------
# Relay: one request to one server, its answer streamed back
# ---------------------------------------------------------------------------


class Tail:
    """The last TAIL_BYTES of a body (or a read more), kept as reads arrive without
    copying them: where Ollama's last line, with the token count, is found. A read is
    kept whole, with where its body bytes lie in it (a chunked body's framing aside),
    and cut into them only at the end."""

    __slots__ = ("reads", "size")

    def __init__(self) -> None:
        self.reads: collections.deque[tuple[bytes, Sequence[tuple[int, int]], int]] = (
            collections.deque())
        self.size = 0

    def add(self, data: bytes, spans: Sequence[tuple[int, int]] | None = None) -> int:
        """Keeps ``data``, whose body bytes are ``spans`` (all of it when None); returns
        how many body bytes it holds."""
        if spans is None:
            spans = ((0, len(data)),)
        size = sum(stop - start for start, stop in spans)
        if size:
            reads = self.reads
            reads.append((data, spans, size))
            self.size += size
            while self.size - reads[0][2] >= TAIL_BYTES:
                self.size -= reads.popleft()[2]
        return size

    def last(self) -> bytes:
        return b"".join(data[start:stop] for data, spans, _ in self.reads
                        for start, stop in spans)[-TAIL_BYTES:]


class Transcript:
    """Every body byte of a streamed answer so far, in one buffer (no object a token),
    while they fit MAX_RECOVERY_BYTES and the budget of buffered bytes (``hold``, taken
    a step at a time) has room: ``whole`` until then; past it, a plain Tail."""

    __slots__ = ("data", "granted", "hold", "tail", "whole")

    def __init__(self, hold: Callable[[int], bool] | None = None) -> None:
        self.data = bytearray()
        self.hold = hold
        self.granted = 0  # bytes of the budget taken
        self.whole = True
        self.tail: Tail | None = None

    def add(self, data: bytes, spans: Sequence[tuple[int, int]] | None = None) -> None:
        """Keeps the body bytes ``spans`` of ``data`` (all of it when None)."""
        if self.tail is not None:
            self.tail.add(data, spans)
            return
        kept = self.data
        if spans is None:
            kept += data
        else:
            for start, stop in spans:
                kept += data[start:stop]
        if len(kept) > self.granted:
            step = max(RECOVERY_HOLD_STEP, len(kept) - self.granted)
            if len(kept) <= MAX_RECOVERY_BYTES and (self.hold is None or self.hold(step)):
                self.granted += step
            else:  # no room to keep it all: the last of it, from now on
                self.forgo()

    def forgo(self) -> None:
        """Keeps no more than a plain tail from now on: the answer will not be continued."""
        if self.tail is None:
            self.whole, self.tail = False, Tail()
            self.tail.add(bytes(self.data[-TAIL_BYTES:]))
            self.data = bytearray()

    def keep(self, data: bytes, start: int, stop: int) -> None:
        """add() of one span, the common case (a token), in fewer steps."""
        kept = self.data
        if self.tail is None and len(kept) + stop - start <= self.granted:
            kept += data[start:stop]
        else:
            self.add(data, ((start, stop),))

    def last(self) -> bytes:
        return self.tail.last() if self.tail is not None else bytes(self.data[-TAIL_BYTES:])

    def text(self) -> bytes:
        """Every body byte, while ``whole``."""
        return bytes(self.data)


#: How a line of a stream that broke off says why, when its server's runner failed:
#: Ollama's error line (NDJSON) or an event carrying it (SSE).
ERROR_LINE_STARTS = (b'{"error"', b'data: {"error"')


class Lines:
    """A streamed answer relayed in whole lines (NDJSON) or events (SSE), so that if its
    server fails halfway, the client holds whole lines only and another server can go on
    where they end (Recovery). Sans-IO: take() is given what the upstream sent and says
    what goes to the client.

    The common read, a whole chunk of whole lines, goes on as it came (checked with a
    byte search, not parsed); a line split over reads waits for its end; an error line
    (a runner that failed) is held back with whatever follows it, and written only if
    the answer cannot be continued. The transcript keeps what the client got."""

    __slots__ = ("complete", "held", "last", "pending", "recoverable", "rename", "sep",
                 "transcript")

    def __init__(self, sse: bool, hold: Callable[[int], bool] | None,
                 recoverable: bool = True) -> None:
        self.sep = b"\n\n" if sse else b"\n"
        self.recoverable = recoverable  # kept for Recovery, not only relayed in lines
        #: (the name the client asked for, the model sent on): its lines name the former.
        self.rename: tuple[str, str] | None = None
        self.transcript = Transcript(hold)
        #: Where the last lines sent lie (data, start, stop): the last of them is the
        #: final one, however long (a generate's ``context`` can pass TAIL_BYTES).
        self.last: tuple[bytes, int, int] = (b"", 0, 0)
        self.pending = bytearray()  # the start of a line still to come whole
        self.held = b""  # an error line and what followed it
        self.complete = False  # its final line or event came

    def take(self, checked: bytes, spans: Sequence[tuple[int, int]], aligned: bool,
             chunked_out: bool) -> list[bytes | bytearray | memoryview]:
        """What goes to the client of the chunk data ``spans`` of ``checked`` (a chunked
        body's bytes as they came); ``aligned``: ``checked`` starts and ends on chunk
        boundaries, so that a chunked client can be given it as it is."""
        sep = self.sep
        if aligned and len(spans) == 1 and not (self.pending or self.held or self.rename):
            start, stop = spans[0]
            if checked.endswith(sep, start, stop) and b'{"error"' not in checked:
                self.transcript.keep(checked, start, stop)
                self.last = (checked, start, stop)
                return [checked] if chunked_out else [checked[start:stop]]
        pending = self.pending
        searched = max(0, len(pending) - len(sep) + 1)  # no line ended before
        for start, stop in spans:
            pending += checked[start:stop]
        if self.held:  # what follows an error line: its first bytes, for the record
            if len(self.held) < MAX_ERROR_BODY:
                self.held += pending
            pending.clear()
            return []
        end = pending.rfind(sep, searched)
        if end < 0:
            if len(pending) <= MAX_RECOVERY_BYTES:
                return []
            # No end of line in sight: relayed as it comes, and never continued.
            self.transcript.forgo()
            end = len(pending) - len(sep)
        whole = bytes(pending[:end + len(sep)])
        del pending[:end + len(sep)]
        error = self._error_at(whole)
        if error >= 0:
            whole, self.held = whole[:error], whole[error:] + pending
            pending.clear()
        return self._out(whole, chunked_out)

    def finish(self, chunked_out: bool) -> list[bytes | bytearray | memoryview]:
        """At the body's end: what is left to send, and whether the answer was whole
        (``complete``): its last line Ollama's ``done``, or OpenAI's ``[DONE]``."""
        out = [] if self.held else self._out(bytes(self.pending), chunked_out)
        self.pending.clear()
        last = self.last_line()
        if self.sep == b"\n\n":
            self.complete = last == b"data: [DONE]"
        else:
            with contextlib.suppress(ValueError):
                final = decode_json(last)
                self.complete = isinstance(final, dict) and final.get("done") is True
        return out

    def last_line(self) -> bytes:
        """The last line (or event) the client was sent, stripped."""
        data, start, stop = self.last
        lines = data[start:stop].rstrip()
        return lines[lines.rfind(b"\n") + 1:]

    def why(self) -> str:
        """What the held error line says ("" for none)."""
        line = self.held.split(b"\n", 1)[0].removeprefix(b"data: ")
        return (upstream_error_message(line) or "") if line else ""

    def _error_at(self, whole: bytes) -> int:
        """Where the first error line of ``whole`` starts, or -1."""
        if b'{"error"' not in whole:
            return -1
        start = 0
        for line in whole.split(b"\n"):
            if line.startswith(ERROR_LINE_STARTS):
                return start
            start += len(line) + 1
        return -1

    def _out(self, whole: bytes, chunked_out: bool
             ) -> list[bytes | bytearray | memoryview]:
        if not whole:
            return []
        if self.rename is not None:
            whole = rename_model(whole, self.rename[1], self.rename[0])
        self.transcript.add(whole)
        self.last = (whole, 0, len(whole))
        return chunk(whole) if chunked_out else [whole]


#: Request fields not sent upstream as they came: hop-by-hop ones, those the balancer
#: writes itself, and Origin (the balancer answers CORS itself, and an Ollama with other
#: ORIGINS would refuse what the balancer allowed).
NOT_FORWARDED = HOP_BY_HOP | {"host", "x-forwarded-for", "origin"}
NOT_FORWARDED_NOR_AUTHORIZATION = NOT_FORWARDED | {"authorization"}
#: Fields every passthrough answer carries: whatever a server sends (an HTML page of its
#: own, or of whoever answers at its address) runs sandboxed, without the balancer's
#: origin, and is never sniffed into a type it did not say.
PASSTHROUGH_FIELDS = (("Content-Security-Policy", "sandbox"),
                      ("X-Content-Type-Options", "nosniff"))


class Relay:
    """Forwards a request to one server and copies the answer back as it arrives, byte
    for byte, with flow control both ways, and counts how it went against the server;
    the seed's /servers/ollama/<id>/... endpoint is that and nothing more. Its forward()
    is the one way an upstream's answer reaches a client, from whichever room."""

    def __init__(self, config: Config, fleet: Fleet, upstreams: Upstreams, access: Access,
                 metrics: Metrics) -> None:
        self.config = config
        self.fleet = fleet
        self.upstreams = upstreams
        self.access = access
        self.metrics = metrics

    async def passthrough(self, request: Request, match: re.Match[str]) -> Response | Relayed:
        Tenants.unrestricted(request.key, "a server chosen by its id")
        if request.key is not None:
            self.access.check_budget(request.key)
        rest = match.group("rest") or "/"
        query_pairs = request.query.split("&") if request.query else []
        server_ids = [
            urllib.parse.unquote_plus(p.partition("=")[2])
            for p in query_pairs
            if urllib.parse.unquote_plus(p.partition("=")[0]) == "serverId"
        ]
        if server_ids:
            key, path = server_ids[-1], rest
            query_pairs = [
                p for p in query_pairs
                if urllib.parse.unquote_plus(p.partition("=")[0]) != "serverId"
            ]
        else:
            key, _, path = rest[1:].partition("/")
            path = "/" + path
            if not key:
                raise HTTPError(404, "no server id in the path: /servers/ollama/<id>/<path>")
        if has_dot_dot_segment(path):
            raise HTTPError(400, "'..' is not allowed in the path")
        server, proxy = await self.fleet.target(key)
        if not server.enabled:
            raise HTTPError(409, f"server {server.id} is disabled")
        if proxy is not None and not proxy.status:
            raise HTTPError(409, f"proxy {proxy.id} is disabled")
        target = path + ("?" + "&".join(query_pairs) if query_pairs else "")
        return await self.relay(request, server, proxy, target)

    async def relay(self, request: Request, server: Server, proxy: Proxy | None,
                    target: str) -> Relayed:
        """Streams the request to the server and its response back, byte for byte.

        From the end of the request body on, the client is watched: if it goes away, even
        while Ollama is still loading the model, the upstream connection is dropped at once.
        The request counts toward the server's load, though it chose its server itself.
        """
        head, chunked = self.upstream_head(request, server, target)
        body = ReplayableBody(request.body_chunks(), hold=request.hold)
        slot = self.fleet.take(server)
        try:
            outcome = await request.watched(
                self._forward(request, server, proxy, head, chunked, body))
        finally:
            self.fleet.release(slot)
        return Relayed(False) if outcome is None else outcome

    async def _forward(self, request: Request, server: Server, proxy: Proxy | None,
                       head: bytes, chunked: bool, body: ReplayableBody) -> Relayed:
        try:
            async with self.upstreams.exchange(server, proxy, head, body, request.method,
                                               chunked) as answer:
                relayed, ok = await self.forward(request, answer, fields=PASSTHROUGH_FIELDS)
        except UpstreamError as exc:
            self.fleet.upstream_failed(server, "timeout" if exc.status == 504 else "connect",
                                       exc.message)
            error = await self.send_upstream_error(request, exc.status, exc.message)
            return error.by(server)
        if ok:
            self.fleet.record(server, True)
        return relayed

    def upstream_head(self, request: Request, server: Server, target: str,
                      body_length: int | None = None) -> tuple[bytes, bool]:
        """The request head sent upstream, and whether its body goes chunked.
        ``body_length`` is given when the balancer has read the whole body itself."""
        headers = request.head.headers
        dropped = NOT_FORWARDED
        if request.authenticated or server.authorization:
            dropped = NOT_FORWARDED_NOR_AUTHORIZATION  # the balancer's key, or the server's
        if "connection" in headers.index:
            dropped = dropped.union(headers.tokens("connection"))
        fields = [("Host", server.authority)]
        fields += [(n, v) for n, v in headers.fields if n.lower() not in dropped]
        fields += server_credentials(server)
        forwarded = headers.get("x-forwarded-for")
        fields.append(("X-Forwarded-For", f"{forwarded}, {request.wire.peer}" if forwarded
                       else request.wire.peer))
        chunked = body_length is None and request.framing.kind == "chunked"
        if chunked:
            fields.append(("Transfer-Encoding", "chunked"))
        elif body_length is not None:
            fields.append(("Content-Length", str(body_length)))
        elif request.framing.kind == "length":
            fields.append(("Content-Length", str(request.framing.length)))
        return render_head(f"{request.method} {target} HTTP/1.1", fields), chunked

    async def send_upstream_error(self, request: Request, status: int, detail: str
                                  ) -> Relayed:
        return await request.send_error(status,
                                        self.access.public_message(request, status, detail))

    async def forward(self, request: Request, answer: Exchange, model: str | None = None,
                      fields: Sequence[tuple[str, str]] = (),
                      queue_wait: float | None = None,
                      lines: Lines | None = None) -> tuple[Relayed, bool]:
        """Relays an upstream's answer to the client, with ``fields`` added to its head;
        the flag is False when it was a 5xx or cut short, which counts against the server,
        or when the client left before its end. ``model`` names the request's model in the
        token count (else the answer's own); it and ``queue_wait`` go into the outcome.
        ``lines``, for a streamed answer that another server may have to continue:
        relayed in whole lines, kept, and cut (``Relayed.cut``) where its final line is
        missing, with no last chunk and the connection left open for the rest."""
        server = answer.server
        try:
            framing = answer.framing()
        except ProtocolError as exc:
            message = f"{server.label}: {exc.message}"
            self.fleet.upstream_failed(server, "protocol", message)
            return await self.send_upstream_error(request, 502, message), False
        response = answer.response
        keep_alive = request.keep_alive
        out_fields, chunked_out = self._response_fields(response, framing, request)
        out_fields += request.response_fields
        out_fields += fields
        if chunked_out is None:
            # An HTTP/1.0 client reads the body until we close.
            keep_alive = False  # pragma: no mutate (None: as false)
        if not keep_alive:
            out_fields.append(("Connection", "close"))
        renamed = request.renamed
        if renamed is not None:  # an alias's or a fallback's: the model that answered
            out_fields.append(("X-Ollama-Model", header_text(renamed[1])))
        reason = response.reason or reason_phrase(response.status)
        head = render_head(f"HTTP/1.1 {response.status} {reason}", out_fields)
        failed = response.status >= 500
        if failed:  # now: whether its client stays for the body or not
            self.fleet.upstream_failed(server, "http_5xx", f"answered {response.status}")
        if lines is not None and (framing.kind != "chunked" or response.status != 200):
            lines = None  # not a stream: relayed as it comes
        if renamed is not None and response.status == 200:  # the name the client asked for
            if framing.kind == "length":
                return await self._forward_renamed(request, answer, out_fields, keep_alive,
                                                   model, queue_wait, renamed)
            if framing.kind == "chunked":
                sse = "text/event-stream" in (response.headers.get("content-type") or "")
                lines = lines or Lines(sse, request.hold, recoverable=False)
                lines.rename = renamed
        try:
            tail = await self._relay_body(answer, framing, request, head, bool(chunked_out),
                                          lines)
        except ConnectionError:  # the client left mid-answer: the upstream is dropped
            return Relayed(False, response.status, server, model, queue_wait), False
        if isinstance(tail, Exception):
            why = lines.why() if lines is not None else ""
            log.warning("request %s: the answer of %s%s broke off after %d bytes: %s",
                        request.id, server.label, f" for {model}" if model else "",
                        request.wire.sent, why or tail or type(tail).__name__)
            if not failed:
                self.fleet.upstream_failed(server, "cut_stream", why or
                                           "the stream broke off mid-answer")
            return Relayed(False, response.status, server, model, queue_wait, True), False
        counts = None
        if response.status == 200:
            model, counts = self._counted(server, model, tail)
        return Relayed(keep_alive, response.status, server, model, queue_wait,
                       tokens=counts), not failed

    def _counted(self, server: Server, model: str | None, tail: bytes
                 ) -> tuple[str | None, tuple[int, int] | None]:
        """What a whole answer's last bytes count: its tokens by server (tokens_total,
        from Ollama's eval_count), and its (prompt, completion) for its key's usage; the
        model, as the answer names it when the request did not."""
        if (counted := eval_count(tail)) is not None:
            tokens, named = counted
            model = model or (canonical_model(named) if named else None)
            self.metrics.count("tokens_total", (server.label, model or ""), tokens)
        return model, answer_tokens(tail) if (b"_tokens" in tail or b"eval_count" in tail
                                              ) else None

    async def _forward_renamed(self, request: Request, answer: Exchange,
                               out_fields: list[tuple[str, str]], keep_alive: bool,
                               model: str | None, queue_wait: float | None,
                               renamed: tuple[str, str]) -> tuple[Relayed, bool]:
        """A whole answer (Content-Length) to a request the fleet file sent on under
        another name: read, its model named as the client asked, sent at its new length."""
        server, response = answer.server, answer.response
        try:
            data = await answer.read(MAX_ROUTED_BODY)
        except (UpstreamError, TimeoutError, IncompleteBody, ProtocolError) as exc:
            message = f"{server.label}: {getattr(exc, 'message', exc) or type(exc).__name__}"
            self.fleet.upstream_failed(server, "cut_stream", message)
            return await self.send_upstream_error(request, 502, message), False
        data = rename_model(data, renamed[1], renamed[0])
        fields = [(n, v) for n, v in out_fields if n.lower() != "content-length"]
        fields.append(("Content-Length", str(len(data))))
        reason = response.reason or reason_phrase(response.status)
        request.wire.writelines([render_head(f"HTTP/1.1 {response.status} {reason}", fields),
                                 data])
        try:
            await request.wire.drain()
        except ConnectionError:
            return Relayed(False, response.status, server, model, queue_wait), False
        model, counts = self._counted(server, model, data[-TAIL_BYTES:])
        return Relayed(keep_alive, response.status, server, model, queue_wait,
                       tokens=counts), True

    @staticmethod
    def _response_fields(response: ResponseHead, framing: Framing, request: Request
                         ) -> tuple[list[tuple[str, str]], bool | None]:
        """End-to-end response fields plus the client-side framing; the flag says whether
        the body goes chunked (None: until close, for an HTTP/1.0 client)."""
        headers = response.headers
        dropped = HOP_BY_HOP | set(headers.tokens("connection"))
        fields = [(n, v) for n, v in headers.fields if n.lower() not in dropped]
        if framing.kind == "length":
            fields.append(("Content-Length", str(framing.length)))
        elif framing.kind == "none":
            lengths = headers.get_all("content-length")
            if request.method == "HEAD" or response.status == 304:
                fields.extend(("Content-Length", v) for v in lengths[:1])
            elif response.status >= 200 and response.status != 204:
                fields.append(("Content-Length", "0"))
        elif request.head.version == "HTTP/1.1":
            fields.append(("Transfer-Encoding", "chunked"))
            return fields, True
        else:
            return fields, None
        return fields, False

    async def _relay_body(self, answer: Exchange, framing: Framing, request: Request,
                          head: bytes, chunked_out: bool, lines: Lines | None
                          ) -> bytes | Exception:
        """Copies the response body to the client as it arrives, after ``head`` (in the
        same write as the first bytes, or at once when none came with it: a model may take
        long to load). Returns its last bytes (where Ollama's final line holds the token
        count), or why it broke off; ConnectionError when the client left.

        The copying happens in the upstream connection's ``data_received``: a token of
        a stream costs one callback, not a task switch. While the client reads slower
        than the server writes, the upstream socket is not read (backpressure). A client
        that leaves drops the upstream connection (Ollama stops generating), which ends
        the copying with the answer's account kept, rather than a cancellation."""
        client, upstream = request.wire, answer.wire
        # A chunked answer to a chunked client goes as it came; else it is taken apart.
        scanner = ChunkedScanner() if framing.kind == "chunked" else None
        remaining = framing.length
        tail = Tail()

        loop = client.loop
        stall: asyncio.TimerHandle | None = None  # runs while the client reads nothing
        stopped = False  # it ran out: the client stopped reading

        def stalled() -> None:  # CLIENT_TIMEOUT without the client taking a byte
            nonlocal stall, stopped
            stall, stopped = None, True
            answer.drop()

        def writable() -> None:
            nonlocal stall
            if stall is not None:
                stall.cancel()
                stall = None
            upstream.resume_reading()

        def consume(eof: bool) -> bool:
            nonlocal head, remaining, stall
            if client.lost or (eof and client.eof):
                raise ConnectionResetError("client gone")  # pragma: no mutate (words)
            if stopped:
                raise ConnectionResetError("client stopped reading")
            buf = upstream.buf
            pieces: list[bytes] = []  # the body's own bytes that arrived
            out: list[bytes | bytearray | memoryview]  # what goes to the client
            if lines is not None and scanner is not None:  # to be continued if cut
                aligned = scanner.at_boundary
                checked, done, spans = scanner.take(buf)
                out = [head, *lines.take(checked, spans, aligned and scanner.at_boundary,
                                         chunked_out)]
                if done:
                    out += lines.finish(chunked_out)
                    if not lines.complete:  # no final line: the rest is to come elsewhere
                        client.writelines(out)
                        head = b""
                        raise IncompleteBody("the stream ended without its final line")
            elif scanner is not None:
                checked, done, spans = scanner.take(buf)
                tail.add(checked, spans)
                # To a chunked client as it came; else its data, out of the framing.
                out = [head, checked] if chunked_out else [
                    head, *(checked[start:stop] for start, stop in spans)]
            else:
                if framing.kind == "length":
                    if buf:
                        pieces.append(bytes(buf[:remaining]))
                        del buf[:remaining]
                        remaining -= len(pieces[0])
                    done = not remaining
                elif framing.kind == "close":
                    if buf:
                        pieces.append(bytes(buf))
                        buf.clear()
                    done = eof
                else:
                    done = True
                out = [head]
                for piece in pieces:
                    out += chunk(piece) if chunked_out else (piece,)
            if done and chunked_out:
                out.append(LAST_CHUNK)
            if any(out):
                client.writelines(out)
            head = b""
            for piece in pieces:
                tail.add(piece)
            if done:
                return True
            if eof:
                raise IncompleteBody("upstream closed in the middle of the body")
            if client.backed_up:
                upstream.pause_reading()  # until the client catches up
                if stall is None:
                    stall = loop.call_later(self.config.client_timeout, stalled)
            return False

        watching, client.on_gone = client.on_gone, answer.drop
        client.on_writable = writable
        try:
            await upstream.pump(consume, self.config.upstream_timeout)
        except (TimeoutError, IncompleteBody, ProtocolError) as exc:
            if client.backed_up:  # the upstream waited on the client: not its failure
                raise ConnectionResetError("client stopped reading") from None
            # No final chunk: the client must not mistake a cut stream for a whole one.
            client.write(head)
            return exc
        finally:
            if stall is not None:
                stall.cancel()
            client.on_writable = None  # pragma: no mutate (any false value: not called)
            if client.on_gone == answer.drop:  # still here: watched as before
                client.on_gone = watching
            upstream.resume_reading()
        answer.finished()  # read whole: the connection may serve another request
        if not client.backed_up:
            await client.drain()  # at once; ConnectionError if the client is gone
        else:  # its last bytes wait on the client: as long as a client may take
            try:
                await asyncio.wait_for(client.drain(), self.config.client_timeout)
            except TimeoutError:
                raise ConnectionResetError("client stopped reading") from None
        return (tail if lines is None else lines.transcript).last()


# ---------------------------------------------------------------------------
# Recovery: a streamed answer goes on elsewhere when its server dies
# ---------------------------------------------------------------------------


#: The endpoints whose streamed answers another server can continue.
RECOVERABLE_PATHS = frozenset({"/api/chat", "/api/generate", "/v1/chat/completions"})
#: Request fields whose answers a prefill cannot continue: a grammar (format,
#: response_format), tools, a raw prompt or a template of the request's own, fill in the
#: middle (suffix), an old generate context.
UNCONTINUABLE_FIELDS = ("format", "response_format", "tools", "functions", "raw", "suffix",
                        "template", "context")
#: Renderers (Ollama's Go code that writes a model's prompt, /api/show "renderer") that
#: leave a final assistant message open, read in ollama/ollama's model/renderers: qwen3.5
#: and those built on it, qwen3-coder, qwen3-vl, cohere, laguna, lfm2 and olmo3 test for
#: it. The others (gemma4, deepseek3.1, cogito, glm-4.7, nemotron, olmo3-think,
#: poolside-v1...) close the last turn, and a renderer not named here is not trusted.
CONTINUING_RENDERERS = frozenset({
    "qwen3.5", "qwen3.8", "ornith", "qwen3-coder", "qwen3-vl-instruct", "qwen3-vl-thinking",
    "cohere", "laguna", "lfm2", "lfm2-thinking", "olmo3", "olmo3.1"})
#: Output parsers (/api/show "parser") that read a continuation right: those that look at
#: the prefill (Init's last message) or have no thinking phase to start in. qwen3-thinking,
#: for one, starts every answer in its thinking phase whatever came before.
PREFILL_PARSERS = frozenset({
    "passthrough", "harmony", "ministral", "qwen3", "qwen3.5", "ornith", "qwen3-coder",
    "qwen3-vl-instruct", "qwen3-vl-thinking", "cohere", "laguna", "lfm2", "lfm2-thinking",
    "olmo3"})
#: A template's test that keeps the last message open ("{{ if not $last }}<|eot_id|>").
_open_last_re = re.compile(r"not\s+\$last\b")


def prefill_verdict(show: Any) -> tuple[bool, str]:
    """Whether a model continues a final assistant message rather than answer anew,
    from what /api/show says of it, and why. Ollama renders a chat through a Go renderer
    when the model names one, else through its template: one written with .Messages
    leaves the last message open only where it tests $last; one written with .Prompt
    and .Response is cut after .Response, which continues it; one with .Prompt alone
    drops it (template/template.go)."""
    if not isinstance(show, dict):
        return False, "/api/show did not describe it"
    renderer, parser = str(show.get("renderer") or ""), str(show.get("parser") or "")
    if renderer:
        if renderer not in CONTINUING_RENDERERS:
            return False, f"its renderer {renderer!r} starts a new turn"
    else:
        template = str(show.get("template") or "")
        if ".Messages" in template:
            if _open_last_re.search(template) is None:
                return False, "its template closes the last message"
        elif ".Response" not in template:
            return False, "its template renders only the prompt"
    if parser and parser not in PREFILL_PARSERS:
        return False, f"its parser {parser!r} does not read a continuation"
    return True, "continues a final assistant message"


class Unresumable(Exception):
    """Why an answer that broke off is not continued: ``outcome`` names it in the
    metrics (not_resumable, over_limit, restarts, off...)."""

    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


class Broken(Exception):
    """A continuation's line that says its server failed too (an error line)."""


def compact_json(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _int_field(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Resumption:
    """A streamed answer that broke off, and how another server goes on with it: what
    the client was sent (its text, and the tokens that made it: a chunk each), the
    request that continues it (the text so far as the final assistant message, the
    token budget less what was spent), and each line of the continuation made into the
    rest of the client's stream: the same id and times for OpenAI's chunks, no second
    role, generate's shape for a generate continued as a chat, and final counts that
    cover the whole answer. Sans-IO: bytes in, bytes out."""

    def __init__(self, path: str, request: dict[str, Any], sse: bool) -> None:
        self.path = path
        self.request = request
        self.sse = sse
        self.openai = path.startswith("/v1/")
        self.generate = path == "/api/generate"
        self.text = ""  # the answer's text so far
        self.thinking = ""
        self.produced = 0  # tokens of it, as chunks
        self.base = 0  # tokens before the part under way
        self.finished = False  # its final line was sent
        self.ident: Any = None  # OpenAI: the stream's id and time, kept for the rest
        self.created: Any = None
        self.held = b""  # the last error line a server sent, for a client told at the end
        self.part_tokens: int | None = None  # what the part under way counted at its end
        self.part_prompt = 0  # and its prompt

    @classmethod
    def of(cls, path: str, body: bytes | bytearray, lines: Lines) -> Resumption:
        """What ``lines`` sent of the answer to ``body``; Unresumable when it cannot go on."""
        if not lines.transcript.whole:
            raise Unresumable("over_limit", f"the answer passed {MAX_RECOVERY_BYTES} bytes "
                                            "kept for a continuation")
        try:
            request = decode_json(body)
        except ValueError:
            raise Unresumable("not_resumable", "its body is not JSON") from None
        if not isinstance(request, dict):
            raise Unresumable("not_resumable", "its body is not a JSON object")
        for name in UNCONTINUABLE_FIELDS:
            value = request.get(name)
            if value not in (None, False, "", [], {}) and not (
                    name == "response_format" and isinstance(value, dict)
                    and value.get("type") == "text"):
                raise Unresumable("not_resumable", f"it has {name!r}")
        if path != "/api/generate":
            messages = request.get("messages")
            if not isinstance(messages, list) or not all(isinstance(m, dict)
                                                         for m in messages):
                raise Unresumable("not_resumable", "its messages are not a list of objects")
            if messages and messages[-1].get("role") == "assistant" and not isinstance(
                    messages[-1].get("content") or "", str):
                raise Unresumable("not_resumable", "its final assistant message is not text")
        resumption = cls(path, request, lines.sep == b"\n\n")
        for line in lines.transcript.text().split(lines.sep):
            if line.strip():
                resumption.observe(line)
        if resumption.thinking and not resumption.text:
            raise Unresumable("not_resumable", "it was thinking")
        return resumption

    def observe(self, line: bytes) -> None:
        """Counts one line of the answer as the client got it."""
        try:
            if self.sse:
                if line.strip() == b"data: [DONE]":
                    self.finished = True
                    return
                event = decode_json(line.removeprefix(b"data: "))
            else:
                event = decode_json(line)
        except ValueError:
            raise Unresumable("not_resumable", "a line of it is not JSON") from None
        if not isinstance(event, dict):
            raise Unresumable("not_resumable", "a line of it is not a JSON object")
        self._count(event)

    def _count(self, event: dict[str, Any]) -> None:
        if self.openai:
            if self.ident is None:
                self.ident, self.created = event.get("id"), event.get("created")
            for choice in event.get("choices") or ():
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if isinstance(delta, dict):
                    self._add(delta.get("content"),
                              delta.get("reasoning") or delta.get("reasoning_content"),
                              delta.get("tool_calls"))
            return
        if self.generate and "message" not in event:
            self._add(event.get("response"), event.get("thinking"), None)
        else:
            message = event.get("message")
            if isinstance(message, dict):
                self._add(message.get("content"), message.get("thinking"),
                          message.get("tool_calls") or message.get("images"))
        if event.get("done") is True:
            self.finished = True

    def _add(self, content: Any, thinking: Any, other: Any) -> None:
        if other:
            raise Unresumable("not_resumable", "it holds more than text (tool calls)")
        if isinstance(content, str) and content:
            self.text += content
        elif isinstance(thinking, str) and thinking:
            self.thinking += thinking
        else:
            return
        self.produced += 1

    @property
    def tokens(self) -> tuple[int, int]:
        """(prompt, completion) of the whole answer: the last part's prompt, and every
        part's tokens."""
        if self.part_tokens is None:
            return self.part_prompt, self.produced
        return self.part_prompt, self.base + self.part_tokens

    @property
    def model_name(self) -> str:
        return canonical_model(str(self.request.get("model") or ""))

    def continuation(self) -> tuple[str, bytes] | None:
        """The path and body that continue the answer; None when its token budget is
        spent already (the answer is whole as asked)."""
        self.base, self.part_tokens = self.produced, None
        request = dict(self.request)
        if self.openai:
            for name in ("max_completion_tokens", "max_tokens"):
                limit = _int_field(request.get(name))
                if limit is not None:
                    if limit - self.produced <= 0:
                        return None
                    request[name] = limit - self.produced
            request["messages"] = self._prefilled(request["messages"])
            return "/v1/chat/completions", compact_json(request)
        options = request.get("options")
        limit = _int_field(options.get("num_predict")) if isinstance(options, dict) else None
        if isinstance(options, dict) and limit is not None and limit >= 0:
            if limit - self.produced <= 0:
                return None
            request["options"] = {**options, "num_predict": limit - self.produced}
        if not self.generate:
            request["messages"] = self._prefilled(request["messages"])
            return "/api/chat", compact_json(request)
        # /api/generate renders as a chat of its system and prompt: continued as one.
        system = request.get("system")
        user: dict[str, Any] = {"role": "user", "content": request.get("prompt") or ""}
        if request.get("images"):
            user["images"] = request["images"]
        chat: dict[str, Any] = {name: request[name] for name in (
            "model", "options", "keep_alive", "think",
                                                 "logprobs", "top_logprobs")
                if name in request}
        chat["messages"] = self._prefilled(
            [{"role": "system", "content": system}, user] if system else [user])
        chat["stream"] = True
        return "/api/chat", compact_json(chat)

    def _prefilled(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``messages`` with the text so far as the assistant's final message: the
        client's own final assistant message extended (Ollama would join two with a
        blank line), else one more. Nothing said yet: as they were (a retry)."""
        if not self.text:
            return messages
        said = {"content": self.text, **({"thinking": self.thinking} if self.thinking else {})}
        last = messages[-1] if messages else {}
        if last.get("role") != "assistant":
            return [*messages, {"role": "assistant", **said}]
        extended = dict(last)
        for name, value in said.items():
            extended[name] = str(last.get(name) or "") + value
        return [*messages[:-1], extended]

    def translate(self, line: bytes) -> bytes:
        """One line (or event) of the continuation as the rest of the client's stream,
        with its separator; Broken when it is an error line."""
        if self.sse:
            if line.strip() == b"data: [DONE]":
                self.finished = True
                return b"data: [DONE]\n\n"
            event = self._event(line.removeprefix(b"data: "))
            if self.ident is not None:
                event["id"] = self.ident
            if self.created is not None:
                event["created"] = self.created
            for choice in event.get("choices") or ():
                if self.ident is not None and isinstance(choice, dict) and isinstance(
                        choice.get("delta"), dict):
                    choice["delta"].pop("role", None)  # said once, at the start
            self._count(event)
            usage = event.get("usage")
            if isinstance(usage, dict):
                self.part_tokens = _int_field(usage.get("completion_tokens")) or 0
                self.part_prompt = _int_field(usage.get("prompt_tokens")) or 0
                completion = self.part_tokens + self.base
                usage["completion_tokens"] = completion
                usage["total_tokens"] = (_int_field(usage.get("prompt_tokens")) or 0) + completion
            return b"data: " + compact_json(event) + b"\n\n"
        event = self._event(line)
        self._count(event)
        done = event.get("done") is True
        if done:
            self.part_tokens = _int_field(event.get("eval_count")) or 0
            self.part_prompt = _int_field(event.get("prompt_eval_count")) or 0
            event["eval_count"] = self.part_tokens + self.base
        if self.generate:
            message = event.pop("message", None)
            message = message if isinstance(message, dict) else {}
            shaped = {"model": event.pop("model", None),
                      "created_at": event.pop("created_at", None),
                      "response": message.get("content") or ""}
            if message.get("thinking"):
                shaped["thinking"] = message["thinking"]
            event = {**shaped, **event}
        elif not done:
            return line + b"\n"  # as it came
        return compact_json(event) + b"\n"

    def _event(self, data: bytes) -> dict[str, Any]:
        try:
            event = decode_json(data)
        except ValueError:
            raise Broken("a line of the continuation is not JSON") from None
        if not isinstance(event, dict):
            raise Broken("a line of the continuation is not a JSON object")
        if "error" in event:
            self.held = (data if not self.sse else b"data: " + data) + (
                b"\n\n" if self.sse else b"\n")
            message = event["error"]
            if isinstance(message, dict):
                message = message.get("message")
            raise Broken(str(message))
        return event

    def closing(self) -> bytes:
        """The final line(s) of an answer whose token budget was spent when its server
        failed: it ends there, for its length, as the server would have ended it."""
        model = self.request.get("model")
        if self.openai:
            finish = {"id": self.ident, "object": "chat.completion.chunk",
                      "created": self.created, "model": model,
                      "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
            lines = [b"data: " + compact_json(finish) + b"\n\n"]
            options = self.request.get("stream_options")
            if isinstance(options, dict) and options.get("include_usage"):
                usage = {**finish, "choices": [], "usage": {
                    "prompt_tokens": 0, "completion_tokens": self.produced,
                    "total_tokens": self.produced}}
                lines.append(b"data: " + compact_json(usage) + b"\n\n")
            return b"".join([*lines, b"data: [DONE]\n\n"])
        now = utc_now().isoformat().replace("+00:00", "Z")
        said = {"response": ""} if self.generate else {
            "message": {"role": "assistant", "content": ""}}
        return compact_json({"model": model, "created_at": now, **said, "done": True,
                             "done_reason": "length", "eval_count": self.produced}) + b"\n"


class Cut(NamedTuple):
    """A streamed answer that broke off: its outcome so far, and its lines."""

    relayed: Relayed
    lines: Lines


class Recovery:
    """Continues a streamed answer whose server failed halfway on another server that
    holds the same model (the same digest), so that its client reads one whole answer:
    the text so far goes as the final assistant message, which the model continues
    (Resumption), where the model does continue a prefill (prefill_verdict, asked of
    /api/show once per model and digest). Where it must not, the stream ends as it
    would have: cut, or with the server's error line; never with a false end."""

    def __init__(self, config: Config, fleet: Fleet, upstreams: Upstreams, relay: Relay,
                 metrics: Metrics) -> None:
        self.config = config
        self.fleet = fleet
        self.upstreams = upstreams
        self.relay = relay
        self.metrics = metrics
        self._verdicts: dict[tuple[str, str], tuple[bool, str]] = {}

    def refused(self, request: Request) -> bool:
        """Whether recovery is off, for every request or by this one's X-Recovery."""
        return not self.config.recovery or (request.head.headers.get("x-recovery") or ""
                                            ).strip().lower() in ("off", "0", "no", "false")

    def count_off(self, request: Request) -> None:
        """A stream of a recoverable endpoint broke off, relayed as it came: recovery was
        off for it."""
        if self.refused(request):
            self.metrics.count("recoveries_total", ("off",))

    def lines_for(self, request: Request, answer: Exchange) -> Lines | None:
        """Lines to relay ``answer`` by when another server could continue it: on a
        recoverable endpoint, with recovery on."""
        if request.path not in RECOVERABLE_PATHS or self.refused(request):
            return None
        sse = "text/event-stream" in (answer.response.headers.get("content-type") or "")
        return Lines(sse, request.hold)

    # -- whether a model continues a prefill, per model and digest -----------------------

    def known_verdict(self, model: str, digest: str | None) -> tuple[bool, str] | None:
        return self._verdicts.get((model, digest or ""))

    async def verdict(self, model: str, digest: str | None, servers: Sequence[Server]
                      ) -> tuple[bool, str] | None:
        """Whether ``model`` under ``digest`` continues a prefill, asked of the first of
        ``servers`` (holding it) that answers /api/show; None when none could tell."""
        key = (model, digest or "")
        known = self._verdicts.get(key)
        if known is not None:
            return known
        body = compact_json({"model": model})
        for server in servers[:self.config.retries + 1]:
            try:
                status, answer = await self.upstreams.fetch(
                    server, self.fleet.proxy_of(server), "POST", "/api/show", body,
                    limit=MAX_SHOW_BODY)
                if status == 200:
                    verdict = self._verdicts[key] = prefill_verdict(decode_json(answer))
                    return verdict
            except (UpstreamError, IncompleteBody, ProtocolError, ValueError, OSError,
                    TimeoutError) as exc:
                log.info("cannot tell whether %s continues a prefill: %s: %s", model,
                         server.label, exc)
        return None

    async def verdicts(self, models: dict[str, dict[str, list[Server]]]) -> None:
        """Asks every model and digest of ``models`` not known yet (the models view)."""
        asked = [(name, digest, servers) for name, digests in models.items()
                 for digest, servers in digests.items()
                 if (name, digest or "") not in self._verdicts]

        async def ask(name: str, digest: str | None, servers: list[Server]) -> None:
            await self.verdict(name, digest, servers)

        await spread_out([functools.partial(ask, name, digest, servers)
                          for name, digest, servers in asked], 8, 0.0)

    # -- going on elsewhere --------------------------------------------------------------

    async def resume(self, request: Request, body: bytes | bytearray, model: str, cut: Cut,
                     tried: set[int], queue_wait: float | None) -> Relayed:
        """Continues the answer ``cut`` broke off, on servers not ``tried``, at most
        RETRIES times; what the client was sent stays, and the rest follows it."""
        failed = cut.relayed.server
        assert failed is not None
        chain = [failed.label]
        try:
            return await self._resume(request, body, model, cut, tried, queue_wait, chain)
        except ConnectionError:  # its client left: the answer is over
            return Relayed(False, 200, cut.relayed.server, model, queue_wait,
                           chain=tuple(chain))

    async def _resume(self, request: Request, body: bytes | bytearray, model: str, cut: Cut,
                      tried: set[int], queue_wait: float | None, chain: list[str]
                      ) -> Relayed:
        failed = cut.relayed.server
        assert failed is not None
        broke = time.monotonic()
        try:
            resumption = Resumption.of(request.path, body, cut.lines)
        except Unresumable as exc:
            return await self._give_up(request, cut, None, exc, chain)
        # Its tokens so far are the failed server's, which sent no count of them.
        self.metrics.count("tokens_total", (failed.label, model), resumption.produced)
        if resumption.finished:  # its final line came; only the end of the body did not
            await self._send(request, [], end=True)
            return Relayed(request.keep_alive, 200, failed, model, queue_wait)
        digest = self._digest(failed, model)
        same = [s for s in self.fleet.holders(model) if s.id not in tried
                and self._digest(s, model) == digest]
        verdict = await self.verdict(model, digest, same) if same else None
        outcome = Unresumable("no_server", "no other server holds it")
        if same and verdict is None:
            outcome = Unresumable("unverified", f"whether {model} continues a prefill "
                                                "could not be told")
        elif verdict is not None and not verdict[0]:
            outcome = Unresumable("restarts", f"{model}: {verdict[1]}")
        for _ in range(self.config.retries if verdict and verdict[0] else 0):
            plan = resumption.continuation()
            if plan is None:  # the answer reached its length as it broke off
                await self._send(request, [resumption.closing()], end=True)
                self.metrics.count("recoveries_total", ("continued",))
                return Relayed(request.keep_alive, 200, failed, model, queue_wait,
                               tokens=resumption.tokens)
            other = frozenset(tried | {s.id for s in self.fleet.holders(model)
                                       if self._digest(s, model) != digest})
            try:
                slot = await self.fleet.acquire(model, None, other)
            except (NoCandidate, QueueFull, QueueTimeout):
                break
            server = slot.server
            tried.add(server.id)
            chain.append(server.label)
            try:
                why = await self._continue(request, slot, plan, resumption, broke)
            finally:
                self.fleet.release(slot)
            if why is None:
                self.metrics.count("recoveries_total", ("continued",))
                log.info("request %s: the answer of %s for %s continued on %s", request.id,
                         " then ".join(chain[:-1]), model, server.label)
                return Relayed(request.keep_alive, 200, server, model, queue_wait,
                               chain=tuple(chain), tokens=resumption.tokens)
            log.warning("request %s: the continuation on %s for %s failed: %s", request.id,
                        server.label, model, why)
            outcome = Unresumable("failed", why)
            broke = time.monotonic()
        return await self._give_up(request, cut, resumption, outcome, chain)

    @staticmethod
    def _digest(server: Server, model: str) -> str | None:
        digest = server_models(server).get(model, {}).get("digest")
        return str(digest) if digest else None

    async def _continue(self, request: Request, slot: Slot, plan: tuple[str, bytes],
                        resumption: Resumption, broke: float) -> str | None:
        """Streams the continuation ``plan`` from ``slot``'s server into the client's
        answer; None when the answer ended whole, else why it did not."""
        server = slot.server
        path, body = plan
        proxy = self.fleet.proxy_of(server)
        head, _ = self.relay.upstream_head(request, server, path, body_length=len(body))
        sep = b"\n\n" if resumption.sse else b"\n"
        try:
            async with self.upstreams.exchange(server, proxy, head, ReplayableBody.of(body),
                                               "POST") as answer:
                if answer.status != 200:
                    message = await answer.error_message() or f"answered {answer.status}"
                    if answer.status >= 500:
                        self.fleet.upstream_failed(server, "http_5xx", message)
                    return message
                self.fleet.answer_began(slot, proxy, True)
                pending, first = bytearray(), True
                async for piece in answer.pieces():
                    searched = max(0, len(pending) - len(sep) + 1)
                    pending += piece
                    end = pending.rfind(sep, searched)
                    if end < 0:
                        if len(pending) > MAX_RECOVERY_BYTES:
                            raise Broken(f"a line of the continuation passed "
                                         f"{MAX_RECOVERY_BYTES} bytes")
                        continue
                    data = bytes(pending[:end])
                    del pending[:end + len(sep)]
                    out, broken = [], None
                    for line in data.split(sep):
                        try:
                            if line.strip():
                                out.append(resumption.translate(line))
                        except Broken as exc:  # what came before it is the client's
                            broken = exc
                            break
                    if first and out:
                        first = False
                        self.metrics.observe("recovery_gap_seconds", (),
                                             time.monotonic() - broke)
                    await self._send(request, out)
                    if broken is not None:
                        raise broken
                if not resumption.finished:
                    raise IncompleteBody("the stream ended without its final line")
                await self._send(request, [], end=True)
                self.fleet.record(server, True)
                own = resumption.part_tokens  # its count, else its chunks
                self.metrics.count("tokens_total", (server.label, resumption.model_name),
                                   resumption.produced - resumption.base if own is None
                                   else own)
                return None
        except UpstreamError as exc:
            self.fleet.upstream_failed(server, "timeout" if exc.status == 504 else "connect",
                                       exc.message)
            return exc.message
        except (TimeoutError, IncompleteBody, ProtocolError, Broken) as exc:
            why = str(exc) or type(exc).__name__
            self.fleet.upstream_failed(server, "cut_stream", why)
            return why

    async def _send(self, request: Request, lines: list[bytes], end: bool = False) -> None:
        """Writes ``lines`` to the client in its answer's framing (and the last chunk at
        the ``end``), waiting for a client that reads slowly at most CLIENT_TIMEOUT."""
        client = request.wire
        chunked = request.head.version == "HTTP/1.1"  # as Relay.forward framed it
        data = b"".join(lines)
        if request.renamed is not None and data:  # named as the client asked
            data = rename_model(data, request.renamed[1], request.renamed[0])
        out: list[bytes | bytearray | memoryview] = chunk(data) if (data and chunked) else (
            [data] if data else [])
        if end and chunked:
            out.append(LAST_CHUNK)
        if not out:
            return
        client.writelines(out)
        try:
            await asyncio.wait_for(client.drain(), self.config.client_timeout)
        except TimeoutError:
            raise ConnectionResetError("client stopped reading") from None

    async def _give_up(self, request: Request, cut: Cut, resumption: Resumption | None,
                       why: Unresumable, chain: list[str]) -> Relayed:
        """Ends the answer as its server ended it: with the last error line a server
        sent, else cut (no last chunk: the client must not take it for whole)."""
        self.metrics.count("recoveries_total", (why.outcome,))
        log.warning("request %s: the answer was not continued: %s", request.id, why.reason)
        held = (resumption.held if resumption is not None else b"") or cut.lines.held
        relayed = cut.relayed
        if held:
            with contextlib.suppress(ConnectionError):
                await self._send(request, [held.split(cut.lines.sep)[0] + cut.lines.sep],
                                 end=True)
                return Relayed(request.keep_alive, relayed.status, relayed.server,
                               relayed.model, relayed.queue_wait,
                               chain=tuple(chain))
        return Relayed(False, relayed.status, relayed.server, relayed.model,
                       relayed.queue_wait, True, chain=tuple(chain))


# ---------------------------------------------------------------------------
# The Ollama API: the fleet as one Ollama
# ---------------------------------------------------------------------------


class Waits:
    """The seconds one routed request has spent in the queue, over all its tries: kept
    where its handler reads them even when the client leaves before an answer."""

    __slots__ = ("total",)

    def __init__(self) -> None:
        self.total: float | None = None

    def add(self, seconds: float) -> None:
        self.total = (self.total or 0.0) + seconds


class OllamaFront:
    """The fleet as one Ollama at the root: its merged catalog (/api/tags, /api/ps,
    /v1/models), and each request for a model routed to the best server that has it,
    queued while the fleet is full, and tried on another server when one fails."""

    def __init__(self, config: Config, fleet: Fleet, upstreams: Upstreams,
                 relay: Relay, recovery: Recovery, tenants: Tenants,
                 fleet_file: FleetFile) -> None:
        self.config = config
        self.fleet = fleet
        self.upstreams = upstreams
        self.relay = relay
        self.recovery = recovery
        self.tenants = tenants
        self.fleet_file = fleet_file

    async def root(self, request: Request, match: re.Match[str]) -> Response:
        return text_response(200, "Ollama is running")

    async def api_version(self, request: Request, match: re.Match[str]) -> Response:
        # The oldest version in the fleet: what every server can be relied on to support.
        versions = [s.load.version for s in self.fleet.serving() if s.load.version]
        version = min(versions, key=version_key) if versions else FALLBACK_OLLAMA_VERSION
        return json_response(200, {"version": version})

    def _catalog(self, request: Request) -> dict[str, dict[str, Any]]:
        """The fleet's catalog with the fleet file's aliases (each as the first of its
        models that some server has), as much of it as the request's API key may use."""
        catalog = self.fleet.catalog()
        for alias, policy in self.fleet_file.policy.models.items():
            first = next((catalog[m] for m in policy.alias if m in catalog), None)
            if first is not None and alias not in catalog:
                catalog[alias] = {**first, "name": alias, "model": alias}
        key = request.key
        if key is None or key.models is None:
            return catalog
        return {name: m for name, m in catalog.items() if key.allows(canonical_model(name))}

    async def api_tags(self, request: Request, match: re.Match[str]) -> Response:
        await self.fleet.up_to_date()  # a model changed through another instance too
        return json_response(200, {"models": list(self._catalog(request).values())})

    async def api_ps(self, request: Request, match: re.Match[str]) -> Response:
        await self.fleet.up_to_date()
        running: dict[str, dict[str, Any]] = {}
        key = request.key
        for server in self.fleet.serving():
            for model in server.load.running:
                name = str(model.get("name") or model.get("model"))
                if key is None or key.allows(canonical_model(name)):
                    running.setdefault(name, model)
        return json_response(200, {"models": list(running.values())})

    @staticmethod
    def _openai_model(name: str, model: dict[str, Any]) -> dict[str, Any]:
        created = 0
        with contextlib.suppress(ValueError, TypeError):
            stamp = str(model.get("modified_at", ""))[:19]
            created = int(datetime.datetime.fromisoformat(stamp).replace(
                tzinfo=datetime.UTC).timestamp())
        owner = name.rsplit("/", 1)[0] if "/" in name else "library"
        return {"id": name, "object": "model", "created": created, "owned_by": owner}

    async def v1_models(self, request: Request, match: re.Match[str]) -> Response:
        await self.fleet.up_to_date()
        data = [self._openai_model(n, m) for n, m in self._catalog(request).items()]
        return json_response(200, {"object": "list", "data": data})

    async def v1_model(self, request: Request, match: re.Match[str]) -> Response:
        name = urllib.parse.unquote(match.group("model"))
        await self.fleet.up_to_date()
        catalog = self._catalog(request)
        model = catalog.get(name) or catalog.get(canonical_model(name))
        if model is None:
            raise HTTPError(404, f"model '{name}' not found")
        return json_response(200, self._openai_model(name, model))

    async def routed(self, request: Request, match: re.Match[str]) -> Response | Relayed:
        """A request for one model, sent to the best server that has it, queued while the
        fleet is full, and tried on another server if the first fails before answering.

        The body is read whole (to be sent again on failover), but where it starts with
        its model, as Ollama's clients send it, an unknown model is refused first."""
        if request.key is not None:  # a spent key lists models still, but runs none
            self.tenants.check_budget(request.key)
        model, body = await self._model_and_body(request)
        session = session_key(request.head.headers.get("x-session-id"))
        affinity = None if session is None else Affinity(session, session)
        # (round_robin and random keep their plain meaning: X-Session-Id only.)
        prints = (conversation_prints(body, model) if session is None and
                  self.config.conversation_affinity and request.path in CHAT_PATHS
                  and self.config.strategy == "least_load" else [])
        if prints:  # a turn of a conversation: named by its start, in every process alike
            opening = 1 if len(prints) > 1 and _system_first_re.search(
                body, 0, FINGERPRINT_BYTES) else 0
            affinity = Affinity(prints[opening], self.fleet.conversation(prints),
                                _assistant_re.search(body, 0, FINGERPRINT_BYTES) is not None)
        waits = Waits()
        outside = self._outside_labels(request, model)
        outcome = await request.watched(self._route(request, body, model, affinity,
                                                    prints[-1:], waits, outside))
        if outcome is None:  # the client left before an answer began
            return Relayed(False, model=model, queue_wait=waits.total)
        if outcome.model is None:  # an answer of its own (a 503, a 404 of Ollama's)
            return outcome.routed(model, waits.total)
        return outcome

    async def _model_and_body(self, request: Request) -> tuple[str, bytes | bytearray]:
        """The model a request names, one some server can run, and its body read whole;
        where the body starts with its model, as Ollama's clients send it, an unknown
        model is refused before the body is read."""
        leading = leading_model(request.peeked(MODEL_PEEK)
                                or await request.peek_body(MODEL_PEEK))
        model: str | None = None
        key = request.key
        try:
            if leading is not None:
                if key is not None:  # a model it may not use: refused before its body
                    self.tenants.permit(key, canonical_model(leading))
                model = await self._routable(leading)
            body = await request.read_body(MAX_ROUTED_BODY)
            # The leading model is the model when no other "model" follows; then the body
            # is not parsed here (Ollama answers bad JSON itself): a copy and time saved.
            asked = leading
            if model is None or body.count(b'"model"') != 1:
                asked = model_field(body)
                if key is not None:
                    self.tenants.permit(key, canonical_model(asked))
                model = await self._routable(asked)
        except HTTPError as exc:
            raise exc.about(model) from None
        if self.fleet_file.policy.models and asked is not None:
            body = self._policed(request, body, asked, model)
        return model, body

    def _policed(self, request: Request, body: bytes | bytearray, asked: str, model: str
                 ) -> bytes | bytearray:
        """``body`` as the fleet file wants it sent: the real model named (an alias's, a
        fallback's), and the pinned parameters of the name asked for and of the model
        run applied. The client's answers will name what it asked for (request.renamed)."""
        wanted = canonical_model(asked)
        policies = [p for p in (self.fleet_file.model(wanted), self.fleet_file.model(model))
                    if p is not None and (p.clamp or p.set or p.strip)]
        if model == wanted and not policies:
            return body
        try:
            payload = decode_json(body)
        except ValueError:
            return body  # Ollama answers bad JSON itself
        if not isinstance(payload, dict):
            return body
        if model != wanted:
            payload["model" if "model" in payload or "name" not in payload else "name"] = model
            request.renamed = (asked, model)
        for policy in policies:
            apply_pins(payload, policy)
        return json.dumps(payload).encode()

    async def show(self, request: Request, match: re.Match[str]) -> Response | Relayed:
        """/api/show: what a server that has the model says of it. Metadata, not a
        generation: it takes no slot and never waits in the queue (as a real Ollama answers
        it at once, however busy), and goes to the least busy server that has the model,
        then the next if that one cannot answer."""
        model, body = await self._model_and_body(request)
        outcome = await request.watched(self._show(request, body, model))
        return Relayed(False, model=model) if outcome is None else outcome

    async def _show(self, request: Request, body: bytes | bytearray, model: str
                    ) -> Relayed:
        replay = ReplayableBody.of(body)
        failure = Failure(503, f"no server that has '{model}' answered", False)
        for server in self.fleet.holders(model)[:self.config.retries + 1]:
            try:
                proxy = self.fleet.proxy_of(server)
                head, _ = self.relay.upstream_head(request, server, request.head.target,
                                                   body_length=replay.size)
                async with self.upstreams.exchange(server, proxy, head, replay,
                                                   request.method) as answer:
                    if answer.status not in (502, 503):
                        relayed, _ = await self.relay.forward(request, answer, model,
                                                              [server.answered_by])
                        return relayed
                    own = await answer.error_message()
                    failure = Failure(answer.status, own or f"{server.label} answered "
                                      f"{answer.status}", own is not None)
            except UpstreamError as exc:
                self.fleet.upstream_failed(server, "timeout" if exc.status == 504 else
                                           "connect", exc.message)
                failure = Failure(exc.status, exc.message, False)
        if failure.from_ollama:
            return (await request.send_error(failure.status, failure.detail)).routed(model,
                                                                                    None)
        error = await self.relay.send_upstream_error(request, failure.status, failure.detail)
        return error.routed(model, None)

    def _resolve(self, model: str) -> str | None:
        """The model to run for ``model`` by the fleet file: itself, or for an alias the
        first of its names some server can run that has a free slot (else the first some
        server can run); when none can run (down, not when busy), its fallbacks in turn.
        None when nothing can."""
        names, seen = [model], {model}
        for name in names:
            policy = self.fleet_file.model(name)
            members = policy.alias if policy is not None and policy.alias else (name,)
            runnable = [m for m in members if self.fleet.runnable(m)]
            if runnable:
                return next((m for m in runnable if any(
                    s.load.inflight < self.fleet.capacity(s) for s in self.fleet.holders(m))),
                    runnable[0])
            for fallback in policy.fallback if policy is not None else ():
                if fallback not in seen:
                    seen.add(fallback)
                    names.append(fallback)
        return None

    async def _routable(self, name: str) -> str:
        """The canonical name of a model some server can run now (by the fleet file's
        policy: an alias's model, or a fallback). Else a 404 when no server has it (not
        named in the metrics: any client could make any number of labels), or
        ModelUnavailable when those that have it cannot take it."""
        model = canonical_model(name)
        if self.fleet_file.policy.models:
            resolved = self._resolve(model)
            if resolved is None:
                await self.fleet.refresh_catalog()
                resolved = self._resolve(model)
            if resolved is not None:
                return resolved
            policy = self.fleet_file.model(model)
            if policy is not None and policy.alias:  # why its first model cannot run
                raise self.fleet.unavailable(policy.alias[0], name)
        if not self.fleet.runnable(model):
            await self.fleet.refresh_catalog()  # pulled since the last check, perhaps
            if not self.fleet.runnable(model):
                raise self.fleet.unavailable(model, name)
        return model

    def _outside_labels(self, request: Request, model: str) -> set[int]:
        """The servers a request may not use for the labels it asks for (X-Server-Labels,
        and its API key's, which the header may add to but not change); 503 naming them
        when no server with all of them could run ``model``."""
        key = request.key
        wanted = dict(key.labels) if key is not None else {}
        asked = request.head.headers.get("x-server-labels")
        if asked:
            for name, value in parse_labels(asked).items():
                if wanted.get(name, value) != value:
                    raise HTTPError(403, f"API key '{key.name if key else ''}' is held to "
                                         f"{name}={wanted[name]}")
                wanted[name] = value
        if not wanted:
            return set()
        items = wanted.items()
        outside = {s.id for s in self.fleet.every_server() if not items <= s.labels.items()}
        holders = self.fleet.holders(model)  # none: the usual 503 says why, further on
        if holders and all(s.id in outside for s in holders):
            raise HTTPError(503, f"no server with the labels {label_text(wanted)} can run "
                                 f"'{model}' now", headers=[("Retry-After", "1")])
        return outside

    async def _route(self, request: Request, body: bytes | bytearray, model: str,
                     affinity: Affinity | None, keep: Sequence[bytes], waits: Waits,
                     outside: set[int]) -> Relayed:
        """Sends the request to a server, queued while none has room, tried on another
        when one fails; ``keep``: what to remember the server by when it answers (the
        conversation this turn makes, for its next turn); ``waits``: the time spent in
        the queue, told as it adds up."""
        replay = ReplayableBody.of(body)
        tried: set[int] = set(outside)  # and never those without the labels asked for
        failure: Failure | None = None
        busy = [("Retry-After", "1")]
        tenant = NO_TENANT if request.key is None else request.key.tenant
        for _ in range(self.config.retries + 1):
            waited = time.monotonic()
            try:
                slot = await self.fleet.acquire(model, affinity, frozenset(tried), tenant)
                waits.add(time.monotonic() - waited)
            except NoCandidate:
                if failure is None:  # its servers went down since _routable()
                    error = self.fleet.unavailable(model, model)
                    return await request.send_error(error.status, error.message,
                                                    error.headers)
                break
            except QueueFull:
                return await request.send_error(503, "server busy, please try again."
                                                "  maximum pending requests exceeded", busy)
            except QueueTimeout:
                return await request.send_error(503, "server busy, please try again."
                                                "  no server was free in time", busy)
            server = slot.server
            tried.add(server.id)
            try:
                outcome = await self._attempt(request, slot, replay, model, waits.total)
            finally:
                self.fleet.release(slot)
            if isinstance(outcome, Cut):  # a stream broke off: another server goes on
                outcome = await self.recovery.resume(request, body, model, outcome, tried,
                                                     waits.total)
                server = outcome.server or server
            if isinstance(outcome, Relayed):
                for key in keep:
                    self.fleet.remember(key, server)
                return outcome
            failure = outcome
            log.warning("request %s: %s failed for %s: %s", request.id, server.label, model,
                        failure.detail)
        assert failure is not None  # the loop ran at least once, and broke with one
        if failure.from_ollama:
            return await request.send_error(failure.status, failure.detail)
        return await self.relay.send_upstream_error(request, failure.status, failure.detail)

    async def _attempt(self, request: Request, slot: Slot, body: ReplayableBody,
                       model: str, queue_wait: float | None) -> Relayed | Failure | Cut:
        """One try on one server: the relayed response, or why another server should try,
        or a stream that broke off (Cut), for another server to continue.

        Worth another server: no connection, a timeout, 502/503 (Ollama's "server busy"),
        a 500 of a generation (a runner that died), or a 404 for a model the catalog said
        this server has. Nothing is sent again once a byte has gone to the client.
        """
        server = slot.server
        started = time.monotonic()
        try:
            proxy = self.fleet.proxy_of(server)
            if proxy is not None and not proxy.status:
                raise UpstreamError(502, f"{proxy.label} is disabled")
            head, _ = self.relay.upstream_head(request, server, request.head.target,
                                               body_length=body.size)
            async with self.upstreams.exchange(server, proxy, head, body,
                                               request.method) as answer:
                status = answer.status
                if status not in (404, 500, 502, 503):
                    first_byte = time.monotonic() - started
                    lines = None
                    if status == 200:
                        streamed = "chunked" in answer.response.headers.tokens(
                            "transfer-encoding")
                        self.fleet.answer_began(slot, proxy, streamed)
                        if streamed:
                            lines = self.recovery.lines_for(request, answer)
                    relayed, ok = await self.relay.forward(request, answer, model,
                                                           [server.answered_by], queue_wait,
                                                           lines)
                    if ok:
                        self.fleet.record(server, True)
                        self.fleet.observe(slot.cold, first_byte,
                                           time.monotonic() - started)
                    elif relayed.cut:
                        if lines is not None:
                            return Cut(relayed, lines)
                        if status == 200 and request.path in RECOVERABLE_PATHS:
                            self.recovery.count_off(request)
                    return relayed
                own = await answer.error_message()
        except UpstreamError as exc:
            self.fleet.upstream_failed(server, "timeout" if exc.status == 504 else "connect",
                                       exc.message)
            return Failure(exc.status, exc.message, False)
        message = own or f"{server.label} answered {status}"
        if status == 404:
            if not MODEL_NOT_FOUND.match(message):  # Ollama's own 404: not a stale catalog
                return await request.send_error(404, message, [server.answered_by])
            self.fleet.model_gone(server, model)  # the catalog was stale
            return Failure(404, message, own is not None)
        self.fleet.upstream_failed(server, "http_5xx", message)
        if status == 500 and not RUNNER_FAILED.search(message):
            # The request's own error, not its server's death: said as it came.
            error = await (request.send_error(500, message, [server.answered_by]) if own
                           else self.relay.send_upstream_error(request, 500, message))
            return error.by(server)
        return Failure(status, message, own is not None)


# ---------------------------------------------------------------------------
# Fan-out: pull, create, delete, copy and blobs on every server
# ---------------------------------------------------------------------------


def _drain(queue: asyncio.Queue[Any], _: object = None) -> None:
    """Empties a queue whose consumer is gone, so that a producer waiting on it goes on."""
    while not queue.empty():
        queue.get_nowait()


class FanOut:
    """The requests that change what models a server has (pull, create, delete, copy,
    blob uploads), sent to every server at once, or to those a request names, with their
    answers merged into one: one progress stream, one verdict naming who failed."""

    def __init__(self, config: Config, fleet: Fleet, upstreams: Upstreams,
                 relay: Relay) -> None:
        self.config = config
        self.fleet = fleet
        self.upstreams = upstreams
        self.relay = relay

    def targets(self, payload: dict[str, Any]) -> list[Server]:
        """Every serving server, or those named (by id or name) in an optional ``servers``
        field, which is the balancer's and is not sent on."""
        serving = self.fleet.serving()
        wanted = payload.pop("servers", None)
        if wanted is None:
            targets = serving
        else:
            if not isinstance(wanted, list) or not all(
                    isinstance(w, (str, int)) and not isinstance(w, bool) for w in wanted):
                raise HTTPError(400, "'servers' must be a list of server ids or names")
            keys = {str(w) for w in wanted}
            targets = [s for s in self.fleet.every_server()
                       if str(s.id) in keys or s.name in keys]
            unknown = keys - {str(s.id) for s in targets} - {s.name for s in targets if s.name}
            if unknown:
                raise HTTPError(404, f"no server {sorted(unknown)[0]!r}")
            down = [s.label for s in targets if s not in serving]
            if down:
                raise HTTPError(503, f"server {down[0]} is not reachable")
        if not targets:
            raise HTTPError(503, "no server is reachable")
        return targets

    async def _call(self, server: Server, method: str, path: str, body: bytes
                    ) -> tuple[int, str | None]:
        """A fan-out call to one server: its status and error message, if any."""
        try:
            status, answer = await self.upstreams.fetch(
                server, self.fleet.proxy_of(server), method, path, body, limit=MAX_ERROR_BODY,
                timeout=self.config.upstream_timeout)
        except UpstreamError as exc:
            return exc.status, exc.message
        except (TimeoutError, IncompleteBody, ProtocolError, ConnectionError) as exc:
            return 502, f"{server.label}: the answer broke off: {exc or type(exc).__name__}"
        return status, upstream_error_message(answer) if answer else None

    @staticmethod
    def _summary(results: list[tuple[Server, int, str | None]], what: str) -> str | None:
        failed = [f"{s.label}: {error or status}" for s, status, error in results
                  if not 200 <= status < 300]
        return f"{what} failed on {'; '.join(failed)}" if failed else None

    def _fan_out_response(self, results: list[tuple[Server, int, str | None]], what: str,
                          model: str) -> Response:
        """200 when every server did it; 404 when none had the model; else 502 naming
        the servers that failed."""
        error = self._summary(results, what)
        if error is None:
            return Response(200)
        if all(status == 404 and MODEL_NOT_FOUND.match(error or "")
               for _, status, error in results):
            return error_response(404, f"model '{model}' not found")
        return error_response(502, error)

    async def delete(self, request: Request, match: re.Match[str]) -> Response:
        payload = _json_object(await request.read_json())
        name = model_field(json.dumps(payload).encode())
        Tenants.permit(request.key, canonical_model(name))
        # Every server, not only those the catalog says have it: one may have pulled it
        # since its last check. Those that do not have it say so, and that is no failure
        # as long as one had it.
        targets = self.targets(payload)
        body = json.dumps(payload).encode()
        results = [(s, *result) for s, result in zip(targets, await asyncio.gather(
            *(self._call(s, "DELETE", "/api/delete", body) for s in targets)), strict=True)]
        await self.fleet.models_changed(targets)
        if any(200 <= status < 300 for _, status, _ in results):
            results = [r for r in results
                       if not (r[1] == 404 and MODEL_NOT_FOUND.match(r[2] or ""))]
        return self._fan_out_response(results, f"deleting '{name}'", name)

    async def copy(self, request: Request, match: re.Match[str]) -> Response:
        payload = _json_object(await request.read_json())
        if not isinstance(payload.get("source"), str) or not isinstance(
                payload.get("destination"), str):
            raise HTTPError(400, "'source' and 'destination' are required")
        for name in (payload["source"], payload["destination"]):
            Tenants.permit(request.key, canonical_model(name))
        targets = self.targets(payload)
        body = json.dumps(payload).encode()
        results = [(s, *r) for s, r in zip(targets, await asyncio.gather(
            *(self._call(s, "POST", "/api/copy", body) for s in targets)), strict=True)]
        await self.fleet.models_changed(targets)
        return self._fan_out_response(results, f"copying '{payload['source']}'",
                                      payload["source"])

    async def progress(self, request: Request, match: re.Match[str]
                               ) -> Response | Relayed:
        """/api/pull and /api/create on every server at once, their NDJSON progress merged
        into one stream: each line names its server, and byte counts are summed per layer
        over the fleet, so one progress bar per layer fills as the slowest server does."""
        payload = _json_object(await request.read_json(MAX_ROUTED_BODY))
        name = model_field(json.dumps(payload).encode())
        Tenants.permit(request.key, canonical_model(name))
        skipped = self.skipped(payload)  # before targets() takes "servers" out
        targets = self.targets(payload)
        stream = payload.get("stream", True) is not False
        body = json.dumps({**payload, "stream": True}).encode()
        outcome = await request.watched(
            self._merge_progress(request, targets, body, stream, name, skipped))
        if outcome is None:  # the client left: mid-stream, its answer had begun
            return Relayed(False, 200 if stream and request.wire.sent else 0)
        return outcome

    async def _merge_progress(self, request: Request, targets: list[Server], body: bytes,
                              stream: bool, name: str, skipped: list[str]) -> Relayed:
        client = request.wire
        keep = request.keep_alive
        if stream:
            fields = [("Content-Type", "application/x-ndjson"), *request.response_fields]
            fields.append(("Transfer-Encoding", "chunked") if keep else ("Connection", "close"))
            client.write(render_head("HTTP/1.1 200 OK", fields))
        final: dict[str, Any] = {}
        try:
            async for line in self.merged_progress(targets, request.path, body, name,
                                                   skipped):
                if stream or "server" not in line:
                    data = json.dumps(line).encode() + b"\n"
                    if not stream:
                        final = line
                        break
                    client.writelines(chunk(data) if keep else [data])
                    await client.drain()
            if not stream:
                return await request.send(json_response(502 if "error" in final else 200,
                                                        final, close=not keep))
            if keep:
                client.write(LAST_CHUNK)
                await client.drain()
        except ConnectionError:  # the client left mid-stream
            return Relayed(False, 200 if stream else 0)
        return Relayed(keep, 200)

    async def merged_progress(self, targets: list[Server], path: str, body: bytes, name: str,
                              skipped: Sequence[str] = ()) -> AsyncIterator[dict[str, Any]]:
        """The progress of one pull (or create) on many servers, as one stream of lines.

        Each line names its ``server`` and carries that server's own ``server_total`` and
        ``server_completed``; ``total`` and ``completed`` are the layer's over the fleet
        (see _fleet_layer), and neither ever goes back. A server's end is a line with its
        ``outcome``, done or failed (and the ``reason``), and no ``error`` key: a client
        such as Ollama's own stops at the first line with one, and the other servers'
        progress goes on. The last line, without a ``server``, is ``{"status": "success"}``
        or one error naming every failure; either names the ``skipped`` servers (down).
        """
        events: asyncio.Queue[tuple[Server, dict[str, Any] | None, str | None]] = (
            asyncio.Queue())
        tasks = [asyncio.ensure_future(self._progress_of(s, path, body, events))
                 for s in targets]
        layers: dict[str, dict[int, tuple[int, int]]] = {}
        shown: dict[str, tuple[int, int]] = {}
        running = {s.id for s in targets}
        failures: list[str] = []
        try:
            while running:
                server, line, error = await events.get()
                if line is None:  # this server is done
                    running.discard(server.id)
                    outcome = "failed" if error is not None else "done"
                    line = {"status": f"{server.label}: {outcome}", "server": server.label,
                            "outcome": outcome}
                    if error is not None:
                        failures.append(f"{server.label}: {error}")
                        line.update(status=f"{server.label}: failed: {error}", reason=error)
                else:
                    line = dict(line, server=server.label)
                    digest = line.get("digest")
                    if isinstance(digest, str) and isinstance(line.get("total"), int):
                        layer = layers.setdefault(digest, {})
                        own = (line["total"], int(line.get("completed") or 0))
                        layer[server.id] = own
                        line["server_total"], line["server_completed"] = own
                        line["total"], line["completed"] = shown[digest] = self._fleet_layer(
                            layer, len(running - layer.keys()), shown.get(digest, (0, 0)))
                yield line
        finally:
            for task in tasks:
                task.cancel()
            if running:  # left before its end (its client went): some layers may have
                self.fleet.recheck(targets)  # landed, read in the background
        # The last line only once the catalog shows what the servers hold now.
        await self.fleet.models_changed(targets)
        down = f"; skipped, being down: {', '.join(skipped)}" if skipped else ""
        if failures:
            yield {"error": f"{name}: failed on {'; '.join(failures)}{down}"}
        else:
            yield {"status": "success", **({"skipped": list(skipped)} if skipped else {})}

    @staticmethod
    def _fleet_layer(layer: dict[int, tuple[int, int]], unreported: int,
                     before: tuple[int, int]) -> tuple[int, int]:
        """A layer's (total, completed) over the fleet. Servers still pulling that have not
        reported the layer yet count at its size from the start, so that the total does not
        grow as they join (a bar at 100 % would fall back to 50 %); and what was shown
        before is a floor to both: a server that fails leaves the bar short, not lower."""
        size = max(total for total, _ in layer.values())
        total = max(before[0], sum(t for t, _ in layer.values()) + unreported * size)
        completed = max(before[1], min(total, sum(c for _, c in layer.values())))
        return total, completed

    def skipped(self, payload: dict[str, Any]) -> list[str]:
        """The enabled servers a fan-out to the whole fleet leaves out, being down."""
        if "servers" in payload:
            return []
        return [s.label for s in self.fleet.every_server() if s.enabled and not s.reachable]

    async def _progress_of(self, server: Server, path: str, body: bytes,
                           events: asyncio.Queue[tuple[Server, dict[str, Any] | None,
                                                       str | None]]) -> None:
        """Feeds one server's progress lines into ``events``, then (server, None, error)."""
        error: str | None = None
        try:
            proxy = self.fleet.proxy_of(server)
            head = render_head(f"POST {path} HTTP/1.1", [
                ("Host", server.authority), ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))), *server_credentials(server)])
            async with self.upstreams.exchange(server, proxy, head, ReplayableBody.of(body),
                                               "POST") as answer:
                if answer.status != 200:
                    error = await answer.error_message() or f"status {answer.status}"
                    return
                pending = bytearray()
                async for piece in answer.pieces():
                    pending += piece
                    *lines, rest = pending.split(b"\n")
                    pending = bytearray(rest)
                    for raw in lines:
                        if not raw.strip():
                            continue
                        line = decode_json(raw)
                        if isinstance(line, dict) and "error" in line:
                            error = str(line["error"])
                        elif isinstance(line, dict) and line.get("status") != "success":
                            await events.put((server, line, None))
        except UpstreamError as exc:
            error = exc.message
        except (TimeoutError, IncompleteBody, ProtocolError, ConnectionError, ValueError) as exc:
            error = f"progress stream broke off: {exc or type(exc).__name__}"
        finally:
            events.put_nowait((server, None, error))

    async def blobs(self, request: Request, match: re.Match[str]) -> Response | Relayed:
        """HEAD: 200 only if every server has the blob. POST: the upload streams to every
        server at once (each keeps its own pace; the slowest sets the client's), so that
        the /api/create that follows works wherever it lands."""
        path = f"/api/blobs/{match.group('digest')}"
        targets = self.targets({})
        if request.method == "HEAD":
            results = await asyncio.gather(*(self._call(s, "HEAD", path, b"") for s in targets))
            return Response(200 if all(status == 200 for status, _ in results) else 404)
        feeds = [asyncio.Queue[bytes | None](maxsize=4) for _ in targets]
        uploads = [asyncio.ensure_future(self._upload(server, request, path, feed))
                   for server, feed in zip(targets, feeds, strict=True)]
        for upload, feed in zip(uploads, feeds, strict=True):
            upload.add_done_callback(functools.partial(_drain, feed))
        try:
            async for piece in request.body_chunks():
                for upload, feed in zip(uploads, feeds, strict=True):
                    if not upload.done():
                        await feed.put(piece)
            for upload, feed in zip(uploads, feeds, strict=True):
                if not upload.done():
                    await feed.put(None)
            results = await asyncio.gather(*uploads)
        finally:
            for upload in uploads:
                upload.cancel()
        error = self._summary([(s, *r) for s, r in zip(targets, results, strict=True)], "upload")
        if error:
            return await request.send_error(502, error)
        return await request.send(Response(201, close=not request.keep_alive))

    async def _upload(self, server: Server, request: Request, path: str,
                      feed: asyncio.Queue[bytes | None]) -> tuple[int, str | None]:
        async def pieces() -> AsyncIterator[bytes]:
            while (piece := await feed.get()) is not None:
                yield piece

        try:
            proxy = self.fleet.proxy_of(server)
            head, chunked = self.relay.upstream_head(request, server, path)
            async with self.upstreams.exchange(server, proxy, head, ReplayableBody(pieces()),
                                               "POST", chunked) as answer:
                return answer.status, await answer.error_message()
        except UpstreamError as exc:
            return exc.status, exc.message


# ---------------------------------------------------------------------------
# Management API: proxies, servers, API keys, getServer
# ---------------------------------------------------------------------------


#: A page of a list: ``limit`` items at most, those with an id above ``after``.
LIMIT_QUERY_RE = re.compile(r"[1-9][0-9]{0,2}|[1-4][0-9]{3}|5000")
AFTER_QUERY_RE = re.compile(r"[0-9]{1,9}")
MAX_PAGE = 5000


def page_of(request: Request) -> tuple[int | None, int]:
    """The page a list request asks for: (limit or None for all, the id to start after)."""
    limit = request.query_values("limit")
    after = request.query_values("after")
    if limit and not LIMIT_QUERY_RE.fullmatch(limit[-1]):
        raise HTTPError(400, f"'limit' must be a number from 1 to {MAX_PAGE}")
    if after and not AFTER_QUERY_RE.fullmatch(after[-1]):
        raise HTTPError(400, "'after' must be an id")
    return (int(limit[-1]) if limit else None), (int(after[-1]) if after else 0)


#: getServer's ``size`` and ``proxy``: a number (below a million) or an id, or blank.
SIZE_QUERY_RE = re.compile(r"\s*(?:[0-9]{1,6}(?:\.[0-9]*)?|\.[0-9]+)?\s*")
PROXY_QUERY_RE = re.compile(r"\s*(?:[0-9]{1,9})?\s*")


class Management:
    """The seed's endpoints and the ones it lacked: proxies, servers and API keys, each
    written through the fleet to the store (and its change log, for other instances),
    and getServer's ID for a server (and proxy) that qualifies."""

    def __init__(self, config: Config, fleet: Fleet, recovery: Recovery, tenants: Tenants,
                 fleet_file: FleetFile) -> None:
        self.config = config
        self.fleet = fleet
        self.recovery = recovery
        self.tenants = tenants
        self.fleet_file = fleet_file

    @staticmethod
    def _check_socks(values: dict[str, Any]) -> None:
        """A SOCKS proxy works only with python-socks: refused without it, rather than
        stored to fail every request later."""
        if str(values.get("protocol") or "").startswith("socks"):
            try:
                import python_socks  # noqa: F401 (only whether it is there)
            except ImportError:
                raise HTTPError(400, "SOCKS proxies need the python-socks package on the "
                                     "balancer's host: pip install python-socks") from None

    async def add_proxy(self, request: Request, match: re.Match[str]) -> Response:
        values = parse_proxy_body(_json_object(await request.read_json()), partial=False)
        self._check_socks(values)
        new_id = await self.fleet.add_proxy(values)
        log.info("added proxy %d (%s://%s:%d)", new_id, values["protocol"], values["ip"],
                 values["port"])
        return json_response(200, True)

    async def all_proxies(self, request: Request, match: re.Match[str]) -> Response:
        await self.fleet.refresh()
        return json_response(200, [p.to_json() for p in self.fleet.every_proxy()])

    async def one_proxy(self, request: Request, match: re.Match[str]) -> Response:
        proxy_id = _path_id(match)
        await self.fleet.catch_up()
        proxy = self.fleet.proxy(proxy_id)
        if request.method == "PATCH":
            values = parse_proxy_body(_json_object(await request.read_json()), partial=True)
            self._check_socks(values)
            proxy = await self.fleet.update_proxy(proxy_id, values)
        elif request.method == "DELETE":
            try:
                deleted = await self.fleet.delete_proxy(proxy_id)
            except Conflict as exc:
                raise HTTPError(409, str(exc)) from None
            if deleted:
                return Response(204)
            proxy = None
        if proxy is None:
            raise HTTPError(404, f"no proxy with id {proxy_id}")
        return json_response(200, proxy.to_json())

    def _check_proxy_reference(self, values: dict[str, Any]) -> None:
        proxy_id = values.get("proxy_id")
        if proxy_id is not None and self.fleet.proxy(proxy_id) is None:
            # Well formed, but naming nothing: 422, as the body's schema cannot say this.
            raise HTTPError(422, f"'proxyId' {proxy_id} is not a known proxy")

    async def add_server(self, request: Request, match: re.Match[str]) -> Response:
        values = parse_server_body(_json_object(await request.read_json()), partial=False)
        await self.fleet.catch_up()
        self._check_proxy_reference(values)
        try:
            server = await self.fleet.add_server(values)
        except Conflict:
            raise HTTPError(409, f"a server at {values['host']}:{values['port']} "
                                 "already exists") from None
        return json_response(201, self._server_json(server))

    def _server_json(self, server: Server) -> dict[str, Any]:
        """A server as the API shows it alone: with what the scheduler counts on for it
        and what it has learned of it."""
        return {**server.to_json(), "capacity": self.fleet.capacity_report(server)}

    async def all_servers(self, request: Request, match: re.Match[str]) -> Response:
        """Every server; with ``limit`` (and ``after``), a page of them and a Link to the
        next, read through the change log rather than whole (fleets of thousands)."""
        page = page_of(request)
        if page[0] is None:
            await self.fleet.refresh()
        else:
            await self.fleet.catch_up()
        servers, following = self.fleet.server_page(page)
        link = [] if following is None else [
            ("Link", f'</servers/allServers?limit={page[0]}&after={following}>; rel="next"')]
        return json_response(200, [s.to_json() for s in servers], headers=link)

    async def one_server(self, request: Request, match: re.Match[str]) -> Response:
        server_id = _path_id(match)
        await self.fleet.catch_up()
        server = self.fleet.server(server_id)
        if request.method != "GET" and server is not None and self.fleet_file.owns(server):
            raise HTTPError(409, f"server {server_id} is managed by the fleet file "
                                 f"{self.fleet_file.path}: change it there")
        if request.method == "PATCH":
            values = parse_server_body(_json_object(await request.read_json()), partial=True)
            self._check_proxy_reference(values)
            try:
                server = await self.fleet.update_server(server_id, values)
            except Conflict:
                raise HTTPError(409, "another server has that host and port") from None
        elif request.method == "DELETE":
            if await self.fleet.delete_server(server_id):
                return Response(204)
            server = None
        if server is None:
            raise HTTPError(404, f"no server with id {server_id}")
        return json_response(200, self._server_json(server))

    async def get_server(self, request: Request, match: re.Match[str]) -> Response:
        # Its ID is for /servers/ollama/<id>, which a key held to some models may not use.
        Tenants.unrestricted(request.key, "getServer")
        models = [
            name.strip()
            for value in request.query_values("models", "models[]")
            for name in value.split(",")
            if name.strip()
        ]
        # The seed's clients send every parameter, empty when unused: blank is left out.
        size: float | None = None
        size_values = [v for v in request.query_values("size") if v.strip()]
        if size_values:
            if not SIZE_QUERY_RE.fullmatch(size_values[-1]):
                raise HTTPError(400, "'size' must be a number of billions of parameters")
            size = float(size_values[-1])
        proxy: Proxy | None = None
        proxy_values = [v for v in request.query_values("proxy") if v.strip()]
        if proxy_values:
            if not PROXY_QUERY_RE.fullmatch(proxy_values[-1]):
                raise HTTPError(400, "'proxy' must be the id of a proxy")
            proxy_id = int(proxy_values[-1])
            if self.fleet.proxy(proxy_id) is None:
                with contextlib.suppress(StoreUnavailable):
                    await self.fleet.reload()  # perhaps added by another instance
            proxy = self.fleet.proxy(proxy_id)
            if proxy is None:
                raise HTTPError(404, f"no proxy with id {proxy_values[-1].strip()}")
            if not proxy.status:
                raise HTTPError(409, f"proxy {proxy.id} is disabled")
        chosen = self.fleet.choose(models, size)
        token = await self.fleet.handle_for((chosen.id, proxy.id if proxy else None))
        return text_response(200, token)

    async def models(self, request: Request, match: re.Match[str]) -> Response:
        """Every model of the fleet, each digest with the servers that hold it, and
        ``drift`` when there is more than one (``ollamabalancer models pull NAME`` brings
        them together); and whether each digest continues an answer another server began
        (``continues``, asked of /api/show; null while no server could tell)."""
        models = self.fleet.models()
        await self.recovery.verdicts(models)
        policies = self.fleet_file.policy.models
        entries = {name: {"name": name, "drift": len(digests) > 1,
                          "digests": [{"digest": digest or None,
                                       "servers": [{"id": s.id, "name": s.name,
                                                    "label": s.label} for s in servers],
                                       **self._continues(name, digest)}
                                      for digest, servers in sorted(digests.items())]}
                   for name, digests in models.items()}
        for name, policy in policies.items():  # the fleet file's aliases, fallbacks, pins
            entry = entries.setdefault(name, {"name": name, "drift": False, "digests": []})
            entry["policy"] = policy.to_json()
        return json_response(200, [entries[name] for name in sorted(entries)])

    def _continues(self, model: str, digest: str) -> dict[str, Any]:
        verdict = self.recovery.known_verdict(model, digest)
        return {"continues": None if verdict is None else verdict[0],
                "continuesWhy": None if verdict is None else verdict[1]}

    async def add_key(self, request: Request, match: re.Match[str]) -> Response:
        values = parse_key_body(_json_object(await request.read_json()), partial=False)
        key, values["key_hash"] = new_api_key()
        key_id = await self.fleet.add_key(values)
        log.info("added API key %d (%s)", key_id, values["name"])
        return json_response(201, {"id": key_id, "name": values["name"], "key": key})

    async def one_key(self, request: Request, match: re.Match[str]) -> Response:
        """GET, PATCH (any field; null clears a limit) or DELETE one API key."""
        key_id = _path_id(match)
        if request.method == "DELETE":
            if not await self.fleet.delete_key(key_id):
                raise HTTPError(404, f"no API key with id {key_id}")
            return Response(204)
        if request.method == "PATCH":
            values = parse_key_body(_json_object(await request.read_json()), partial=True)
            if not await self.fleet.update_key(key_id, values):
                raise HTTPError(404, f"no API key with id {key_id}")
            log.info("changed API key %d: %s", key_id, ", ".join(sorted(values)) or "nothing")
        else:
            await self.fleet.refresh()
        return json_response(200, self._key(key_id).to_json())

    def _key(self, key_id: int) -> ApiKey:
        """The API key with ``key_id``, as the fleet holds it; 404 when there is none."""
        key = next((k for k in self.fleet.every_key() if k.id == key_id), None)
        if key is None:
            raise HTTPError(404, f"no API key with id {key_id}")
        return key

    async def key_usage(self, request: Request, match: re.Match[str]) -> Response:
        """What one key used: in all, by model, and by UTC day (and model)."""
        await self.fleet.refresh()
        key = self._key(_path_id(match))
        return json_response(200, {"id": key.id, "name": key.name,
                                   **await self.tenants.usage(key)})

    async def all_keys(self, request: Request, match: re.Match[str]) -> Response:
        await self.fleet.refresh()
        return json_response(200, [k.to_json() for k in self.fleet.every_key()])



# ---------------------------------------------------------------------------
# Observability: access log, metrics, status and dashboard
# ---------------------------------------------------------------------------


def _secs(value: float | None) -> str:
    return "      -" if value is None else f"{value:7.3f}"

#: Servers on one page of the dashboard (the cards count them all).
DASHBOARD_PAGE = 100

#: The dashboard: one self-contained page (no CDN, no build step, fine on an air-gapped
#: host). Data goes into the page with textContent only, never as HTML.
DASHBOARD_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ollamabalancer</title>
<link rel="icon" href="/favicon.ico" type="image/svg+xml">
<style>
  :root { --bg: #0f1419; --panel: #171d24; --line: #273039; --text: #d7dde3;
          --dim: #8593a0; --ok: #3fb950; --bad: #f85149; --warn: #d29922; --accent: #58a6ff; }
  * { box-sizing: border-box; }
  body { margin: 0; background: var(--bg); color: var(--text);
         font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; }
  header { display: flex; align-items: baseline; gap: 16px; padding: 16px 24px;
           border-bottom: 1px solid var(--line); }
  header h1 { margin: 0; font-size: 18px; }
  header .meta { color: var(--dim); }
  main { padding: 20px 24px; display: grid; gap: 20px; }
  .cards { display: grid; gap: 12px;
           grid-template-columns: repeat(auto-fit, minmax(160px, 1fr)); }
  .card { background: var(--panel); border: 1px solid var(--line); border-radius: 8px;
          padding: 12px 16px; }
  .card .value { font-size: 26px; font-weight: 600; }
  .card .label { color: var(--dim); }
  section { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; }
  section h2 { margin: 0; padding: 12px 16px; font-size: 15px;
               border-bottom: 1px solid var(--line); }
  table { width: 100%; border-collapse: collapse; }
  th, td { text-align: left; padding: 8px 16px; border-bottom: 1px solid var(--line);
           vertical-align: middle; }
  th { color: var(--dim); font-weight: 500; }
  tr:last-child td { border-bottom: 0; }
  .up { color: var(--ok); } .down { color: var(--bad); } .open { color: var(--warn); }
  .pill { display: inline-block; padding: 1px 8px; border-radius: 10px; margin: 1px 2px;
          background: #1f2a36; font-size: 12px; }
  .pill.loaded { background: #1b3a26; color: var(--ok); }
  .pill.drift { outline: 1px solid var(--warn); }
  .bar { width: 90px; height: 8px; background: #0b0f13; border-radius: 4px; overflow: hidden;
         display: inline-block; vertical-align: middle; margin-right: 6px; }
  .bar > span { display: block; height: 100%; background: var(--accent); }
  .dim { color: var(--dim); }
  .why { color: var(--dim); font-size: 12px; max-width: 28em; }
  td.load { white-space: nowrap; }
  .empty { padding: 12px 16px; color: var(--dim); }
  svg { display: block; }
  button, input { background: #1f2a36; color: var(--text); border: 1px solid var(--line);
                  border-radius: 4px; padding: 2px 8px; font: inherit; }
  button { cursor: pointer; } button:hover { border-color: var(--accent); }
  .actions button { margin: 1px 4px 1px 0; }
  form.actions { padding: 12px 16px; }
</style>
</head>
<body>
<header>
  <h1>ollamabalancer</h1>
  <span class="meta" id="meta"></span>
  <span class="meta" id="state"></span>
</header>
<main>
  <div class="cards">
    <div class="card"><div class="value" id="card-up"></div>
      <div class="label">servers up</div></div>
    <div class="card"><div class="value" id="card-inflight"></div>
      <div class="label">requests in flight</div></div>
    <div class="card"><div class="value" id="card-queue"></div>
      <div class="label">waiting in the queue</div></div>
    <div class="card"><div class="value" id="card-rpm"></div>
      <div class="label">requests per minute</div></div>
    <div class="card" id="recoveries"><div class="value" id="card-recovered"></div>
      <div class="label">answers continued when their server failed</div></div>
  </div>
  <section>
    <h2>Servers <span class="dim" id="page"></span>
      <button id="previous" hidden>&lsaquo; previous</button>
      <button id="next" hidden>next &rsaquo;</button></h2>
    <table>
      <thead><tr><th>Server</th><th>Health</th><th>Failing</th><th>Models (loaded in green)</th>
        <th>Busy</th><th>Req/min</th><th>Err/min</th><th>Last 5 min</th><th></th></tr></thead>
      <tbody id="servers"></tbody>
    </table>
    <form id="pull" class="actions">Pull a model on every server:
      <input name="model" placeholder="llama3.2" required>
      <button type="submit">Pull</button> <span class="dim" id="pulled"></span></form>
  </section>
  <section>
    <h2>Proxies</h2>
    <table>
      <thead><tr><th>Name</th><th>Protocol</th><th>Address</th><th>User</th>
        <th>Enabled</th></tr></thead>
      <tbody id="proxies"></tbody>
    </table>
  </section>
  <section>
    <h2>API keys</h2>
    <table>
      <thead><tr><th>Name</th><th>Models</th><th>Tokens today (UTC)</th><th>Budget</th>
        <th>Weight</th><th>Priority</th></tr></thead>
      <tbody id="keys"></tbody>
    </table>
  </section>
  <section>
    <h2>Recent errors</h2>
    <table>
      <thead><tr><th>Time</th><th>Server</th><th>Kind</th><th>Message</th></tr></thead>
      <tbody id="errors"></tbody>
    </table>
  </section>
</main>
<script>
"use strict";
const initial = /*INITIAL*/null;
const PAGE = /*PAGE*/100;
const pages = [0];  // the id each page seen starts after; the last is the one shown

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell ?? "-";
    tr.appendChild(td);
  }
  return tr;
}
function fill(id, rows, columns, emptyText) {
  const body = document.getElementById(id);
  body.replaceChildren(...rows);
  if (!rows.length) {
    const td = el("td", emptyText, "empty"); td.colSpan = columns;
    const tr = document.createElement("tr"); tr.appendChild(td); body.appendChild(tr);
  }
}
function chart(points) {
  const ns = "http://www.w3.org/2000/svg", width = 120, height = 28;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  const top = Math.max(1, ...points.map(p => Math.max(p[0], p[1])));
  for (const [index, color] of [[0, "#58a6ff"], [1, "#f85149"]]) {
    const line = document.createElementNS(ns, "polyline");
    const step = points.length > 1 ? width / (points.length - 1) : width;
    line.setAttribute("points", points.map((p, i) =>
      `${(i * step).toFixed(1)},${(height - 2 - (p[index] / top) * (height - 4)).toFixed(1)}`
    ).join(" "));
    line.setAttribute("fill", "none"); line.setAttribute("stroke", color);
    line.setAttribute("stroke-width", "1.5");
    svg.appendChild(line);
  }
  return svg;
}
function button(text, title, onclick) {
  const node = el("button", text);
  if (title) node.title = title;
  node.onclick = onclick;
  return node;
}
// The same API a script would call, from this page's origin, as JSON: the management
// endpoints' cross-site protections hold for the page as for anyone.
async function act(method, path, body) {
  const answer = await fetch(path, {method, credentials: "same-origin", headers:
    {"Content-Type": "application/json"}, body: body === undefined ? undefined
    : JSON.stringify(body)});
  const text = answer.ok ? "" : (await answer.json().catch(() => ({}))).error || answer.status;
  document.getElementById("state").textContent = text ? `· ${text}` : "";
  refresh();
  return answer;
}
document.addEventListener("submit", async event => {
  if (event.target.id !== "pull") return;
  event.preventDefault();
  const model = event.target.elements.model.value.trim();
  document.getElementById("pulled").textContent = `pulling ${model}...`;
  const answer = await act("POST", "/api/pull", {model, stream: false});
  document.getElementById("pulled").textContent = answer.ok ? `${model}: pulled` : "";
});
function render(data) {
  const servers = data.servers;
  const proxyNames = new Map(data.proxies.map(p => [p.id, p.name]));
  const drifted = new Set(data.drifted || []);
  document.getElementById("meta").textContent =
    `v${data.version} · strategy ${data.strategy}` +
    (data.workers.length > 1 ? ` · ${data.workers.length} workers` : "") +
    (data.instances > data.workers.length ? ` · ${data.instances} instances` : "") +
    ` · ${data.time}`;
  const totals = data.totals;
  document.getElementById("card-up").textContent = `${totals.up} / ${totals.servers}`;
  document.getElementById("card-inflight").textContent = totals.inflight;
  document.getElementById("card-queue").textContent = `${data.queue.depth}`;
  document.getElementById("card-rpm").textContent = totals.requestsPerMinute;
  // Streams whose server failed mid-answer: continued elsewhere, or why not.
  const recoveries = data.recoveries || {};
  const notContinued = Object.entries(recoveries).filter(([k]) => k !== "continued");
  document.getElementById("card-recovered").textContent = recoveries.continued || 0;
  document.getElementById("recoveries").title = notContinued.length ? "not continued: " +
    notContinued.map(([k, n]) => `${k} ${n}`).join(", ") : "none that could not be";
  document.getElementById("page").textContent = totals.servers > servers.length
    ? `(${servers.length} of ${totals.servers})` : "";
  document.getElementById("next").hidden = data.next === null;
  document.getElementById("next").dataset.after = data.next ?? "";
  document.getElementById("previous").hidden = pages.length < 2;
  fill("servers", servers.map(s => {
    const name = el("div"); name.appendChild(el("div", s.name || s.host));
    name.appendChild(el("div", `${s.scheme}://${s.host}:${s.port}` +
      (s.proxyId ? ` via ${proxyNames.get(s.proxyId) || "proxy " + s.proxyId}` : ""), "dim"));
    for (const [label, value] of Object.entries(s.labels || {}))  // zone=eu, gpu=a100
      name.appendChild(el("span", `${label}=${value}`, "pill label"));
    const health = el("div");
    health.appendChild(!s.enabled ? el("span", "disabled", "dim")
      : s.reachable ? el("span", "up", "up") : el("span", "down", "down"));
    if (s.enabled && !s.reachable && s.lastError) health.appendChild(el("div", s.lastError, "why"));
    if (s.enabled && s.draining) health.appendChild(el("div", s.inflight
      ? `draining: ${s.inflight} still running` : "drained: nothing running", "why"));
    const models = el("div");
    for (const model of s.models) {
      const loaded = s.reachable && s.loadedModels.includes(model);
      const pill = el("span", model, loaded ? "pill loaded" : "pill");
      if (drifted.has(model) || drifted.has(model + ":latest")) {
        pill.classList.add("drift");  // the same name, another digest elsewhere
        pill.title = "differs between servers: ollamabalancer models pull " + model;
      }
      models.appendChild(pill);
    }
    const load = el("div");
    const bar = el("span", null, "bar"), fillBar = el("span");
    fillBar.style.width = `${Math.min(100, 100 * s.inflight / s.capacity)}%`;
    bar.appendChild(fillBar); load.appendChild(bar);
    load.appendChild(el("span", `${s.inflight} / ${s.capacity}`));
    const sched = s.scheduling;  // what the scheduler counts on, and whence
    load.appendChild(el("div", `holds ${sched.maxLoadedModels} models, ${sched.numParallel} ` +
      `requests each (${sched.numParallelFrom === "server" ? "as set" : sched.numParallelFrom})`,
      "dim"));
    const circuit = s.circuitOpen ? el("span", "paused after failures", "open")
                                  : el("span", "no", "dim");
    const actions = el("div", null, "actions");
    actions.appendChild(button(s.enabled ? "Disable" : "Enable",
      s.enabled ? "new requests go elsewhere; those running finish" : "",
      () => act("PATCH", `/servers/${s.id}`, {enabled: !s.enabled})));
    if (s.enabled) actions.appendChild(button(s.draining ? "Undrain" : "Drain",
      s.draining ? "takes new requests again"
                 : "takes no new requests, finishes those running, stays checked",
      () => act("PATCH", `/servers/${s.id}`, {draining: !s.draining})));
    actions.appendChild(button("Remove", "", () =>
      confirm(`Remove ${s.name || s.host}?`) && act("DELETE", `/servers/${s.id}`)));
    const tr = row([name, health, circuit, models, load, String(s.requestsPerMinute),
                    String(s.errorsPerMinute), chart(s.history), actions]);
    tr.children[4].className = "load";
    return tr;
  }), 9, "No servers yet: POST /servers/addServer or `ollamabalancer servers add URL`.");
  fill("proxies", data.proxies.map(p => row([p.name, p.protocol, `${p.ip}:${p.port}`,
      p.userName || "-", p.status ? "yes" : "no"])), 5, "No proxies.");
  fill("keys", (data.keys || []).map(k => row([k.name, k.models ? k.models.join(", ")
      : "all", String(k.tokensToday), k.tokensPerDay === null ? "-" : String(k.tokensPerDay),
      String(k.weight), k.priority])), 6,
      "No API keys: the Ollama endpoints answer anyone (POST /keys/addKey).");
  fill("errors", data.recentErrors.map(e => row([e.time, e.server, e.kind, e.message])), 4,
       "No errors.");
}
async function refresh() {
  try {
    const after = pages[pages.length - 1];
    const answer = await fetch(`/servers/status?limit=${PAGE}&after=${after}`,
                               {credentials: "same-origin", cache: "no-store"});
    if (!answer.ok) throw new Error(`status ${answer.status}`);
    const data = await answer.json();
    render(data);
    document.getElementById("state").textContent = "";
    document.body.dataset.updated = data.time;  // the last successful poll
  } catch (error) {
    document.getElementById("state").textContent = `· not updating: ${error.message}`;
  }
}
document.getElementById("next").onclick = event => {
  pages.push(Number(event.target.dataset.after));
  refresh();
};
document.getElementById("previous").onclick = () => { pages.pop(); refresh(); };
render(initial);
setInterval(refresh, 3000);
</script>
</body>
</html>
"""


class AccessLog:
    """The access log: a line per request, formatted here and written to stderr once per
    turn of the event loop (or per 64 KiB), not through ``logging``, whose record,
    formatter, handler and lock per line cost a relayed request about 8 % of its CPU.
    Lines look as logging's own would (LOG_FORMAT text or json), and go out before any
    other log record (log_to_stderr), so the order on stderr is the order of events."""

    def __init__(self, config: Config, worker: int | None = None,
                 stream: TextIO | None = None) -> None:
        self.enabled = logging.getLevelName(config.log_level) <= logging.INFO
        self.json = config.log_format == "json"
        self.mark = "" if worker is None else f"[{worker}] "
        self.worker = {} if worker is None else {"worker": worker}
        self.stream = stream
        self.pending: list[str] = []
        self.size = 0
        self._second = -1
        self._stamp = ""
        ACCESS_LOGS.add(self)

    def stamp(self, now: float) -> str:
        """``now`` as logging writes it (text: local time; json: UTC), per second once."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = (datetime.datetime.fromtimestamp(second, datetime.UTC)
                           .strftime("%Y-%m-%dT%H:%M:%S") if self.json else
                           time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)))
        millis = int((now - second) * 1000)
        return (f"{self._stamp}.{millis:03d}+00:00" if self.json
                else f"{self._stamp},{millis:03d}")

    def write(self, request: Request, outcome: Relayed, server: str, first_byte: float | None,
              duration: float, bytes_out: int) -> None:
        now = time.time()
        model, status, queue_wait = outcome.model or "", outcome.status, outcome.queue_wait
        if self.json:
            line = json.dumps({
                "time": self.stamp(now), "level": "info", "logger": "ollamabalancer.access",
                **self.worker, "request_id": request.id or None,
                "client": request.client, "method": request.method,
                "path": request.head.target, "status": status,
                "server": server or None, "model": model or None,
                **({"servers": list(outcome.chain)} if outcome.chain else {}),
                "queue_wait": queue_wait, "ttfb": first_byte,
                "duration": duration, "bytes_out": bytes_out, "cut": outcome.cut},
                ensure_ascii=False)
        else:
            client, target = request.client, request.head.target[:200]
            if outcome.chain:  # the servers an answer that broke off went through
                server = ">".join(outcome.chain)
            if not (client + target + server + model).isprintable():  # one check, most often
                client, target = printable(client), printable(target)
                server, model = printable(server), printable(model)
            # %-formatting: half the time of the same f-string with its alignments.
            line = "%s INFO    %s%-15s %-6s %-32s %3d %-20s %-24s %s %s %7.3f %9d %s%s" % (  # noqa: UP031
                self.stamp(now), self.mark, client, request.method, target, status,
                server or "-", model or "-", _secs(queue_wait), _secs(first_byte),
                duration, bytes_out, request.id or "-", " cut" if outcome.cut else "")
        self.pending.append(line)
        self.size += len(line)
        if self.size > 65536:
            self.flush()
        elif len(self.pending) == 1:
            with contextlib.suppress(RuntimeError):  # no loop: the next flush() takes it
                asyncio.get_running_loop().call_later(ACCESS_LOG_DELAY, self.flush)

    def flush(self) -> None:
        if not self.pending:
            return
        lines, self.pending, self.size = self.pending, [], 0
        stream = self.stream or sys.stderr
        with contextlib.suppress(OSError, ValueError):  # stderr closed: nowhere to say so
            stream.write("\n".join(lines) + "\n")
            stream.flush()


#: The dashboard's icon: a small fleet, three boxes behind one.
FAVICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
           b'<rect width="32" height="32" rx="6" fill="#0f1419"/>'
           b'<g fill="#58a6ff"><rect x="5" y="6" width="6" height="6" rx="1"/>'
           b'<rect x="13" y="6" width="6" height="6" rx="1"/>'
           b'<rect x="21" y="6" width="6" height="6" rx="1"/></g>'
           b'<path d="M8 12v5h16v-5M16 17v5" stroke="#58a6ff" stroke-width="2" fill="none"/>'
           b'<rect x="9" y="22" width="14" height="5" rx="1.5" fill="#3fb950"/></svg>')

#: Every AccessLog of this process, flushed before any other log record goes out.
ACCESS_LOGS: weakref.WeakSet[AccessLog] = weakref.WeakSet()


#: When this process started (Unix time): process_start_time_seconds.
PROCESS_STARTED = time.time()


def process_metrics() -> str:
    """The process's own metrics, under the names every Prometheus client library gives
    them: resident memory, CPU seconds, open descriptors, start time (Linux's /proc;
    a figure that cannot be read is left out)."""
    samples: list[tuple[str, str, str, float]] = [
        ("process_cpu_seconds_total", "counter", "User and system CPU time, in seconds.",
         time.process_time()),
        ("process_start_time_seconds", "gauge", "When the process started, in Unix time.",
         PROCESS_STARTED)]
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        samples.append(("process_resident_memory_bytes", "gauge",
                        "Resident memory, in bytes.", pages * os.sysconf("SC_PAGE_SIZE")))
    with contextlib.suppress(OSError):
        samples.append(("process_open_fds", "gauge", "Open file descriptors.",
                        len(os.listdir("/proc/self/fd"))))
    return "".join(f"# HELP {name} {text}\n# TYPE {name} {kind}\n{name} {value:.17g}\n"
                   for name, kind, text, value in samples)


class Observability:
    """What the balancer says about itself: an access-log line and the metrics of each
    finished request, /metrics, the status JSON and the dashboard page."""

    def __init__(self, config: Config, fleet: Fleet, metrics: Metrics, tenants: Tenants,
                 group: WorkerGroup | None = None) -> None:
        self.config = config
        self.fleet = fleet
        self.metrics = metrics
        self.tenants = tenants
        self.group = group  # WORKERS=N: status and metrics are the whole group's
        self.access = AccessLog(config, group.index if group else None)

    def finished(self, request: Request, outcome: Relayed) -> None:
        """Counts a finished request and writes its access-log line: ``outcome`` is what
        its handler (or the front, for an error) said of it, and its connection counted
        what was sent."""
        now = time.monotonic()
        duration = now - request.started
        sent = request.wire.first_sent
        first_byte = None if sent is None else sent - request.started
        server = outcome.server.label if outcome.server is not None else ""
        model = outcome.model or ""
        metrics = self.metrics
        metrics.count("requests_total", (request.endpoint, server, model, outcome.status))
        if outcome.server is not None:
            pair = (server, model)
            if first_byte is not None:
                metrics.observe("ttfb_seconds", pair, first_byte)
            metrics.observe("request_duration_seconds", pair, duration)
        if outcome.queue_wait is not None:
            metrics.observe("queue_wait_seconds", (), outcome.queue_wait)
        if outcome.server is not None and outcome.model:
            self.tenants.record(request.key, outcome.model, outcome.tokens)
        if self.access.enabled:
            self.access.write(request, outcome, server, first_byte, duration,
                              request.wire.sent)

    def status_payload(self, page: tuple[int | None, int] = (None, 0)) -> dict[str, Any]:
        """What the dashboard shows: the fleet (its totals, and the servers of ``page``),
        the queue, the proxies, recent errors; of every worker of a group (WORKERS=N)."""
        fleet = self.fleet
        everyone = fleet.every_server()
        shown, following = fleet.server_page(page)
        others = [o for o in self.group.snapshots(others_only=True) if o["live"]] if (
            self.group) else []
        servers = []
        for server in shown:
            entry = server.to_json()
            theirs = [o["servers"][key] for o in others if (key := str(server.id)) in
                      o["servers"]]
            history = recent_history(itertools.chain(server.load.history,
                                                     *(their[2] for their in theirs)))
            minute = per_minute(history)
            entry.update(inflight=server.load.inflight + sum(their[0] for their in theirs),
                         circuitOpen=server.load.breaker_open or any(t[1] for t in theirs),
                         requestsPerMinute=minute[0], errorsPerMinute=minute[1],
                         history=history, capacity=fleet.capacity(server),
                         scheduling=fleet.capacity_report(server),
                         share=fleet.share(server.id),
                         version=server.load.version)
            servers.append(entry)
        workers = [self.snapshot(servers=False), *others]
        totals = {"servers": len(everyone),
                  "up": sum(1 for s in everyone if s.enabled and s.reachable),
                  "inflight": sum(w["inflight"] for w in workers),
                  "requestsPerMinute": sum(w["perMinute"] for w in workers)}
        # Health is checked by every worker, so its failures are this one's to tell.
        errors = sorted([*fleet.recent_errors(), *(e for o in others for e in o["errors"])],
                        key=lambda e: str(e["time"]), reverse=True)
        recoveries: collections.Counter[str] = collections.Counter()
        for families in [self.metrics.snapshot()["counters"],
                         *(o.get("counters", {}) for o in others)]:
            for values, count in families.get("recoveries_total", ()):
                recoveries[str(values[0])] += int(count)
        return {
            "version": __version__, "time": iso_time(utc_now()),
            "strategy": self.config.strategy,
            "queue": {"depth": sum(w["queue"] for w in workers), "max": self.config.max_queue},
            "instances": fleet.instances(),
            "workers": [{"pid": w["pid"], "worker": w["worker"], "inflight": w["inflight"],
                         "queued": w["queue"], "requests": w["requests"]} for w in workers],
            "totals": totals, "next": following,
            "servers": servers,
            "proxies": [p.to_json() for p in fleet.every_proxy()],
            "drifted": fleet.drifted(),
            "recoveries": dict(sorted(recoveries.items())),
            "keys": [{"id": k.id, "name": k.name, "models": None if k.models is None
                      else list(k.models), "tokensToday": self.tenants.spent_today(k.id),
                      "tokensPerDay": k.tokens_per_day, "weight": k.weight,
                      "priority": k.priority} for k in fleet.every_key()],
            "recentErrors": errors[:20],
        }

    def snapshot(self, *, servers: bool = True) -> dict[str, Any]:
        """This worker's part of the group's status and metrics (WorkerGroup)."""
        fleet = self.fleet
        everyone = fleet.every_server()
        active = {str(s.id): (s.load.inflight, s.load.breaker_open, list(s.load.history))
                  for s in everyone
                  if servers and (s.load.inflight or s.load.history or s.load.breaker_open)}
        counts = self.metrics.snapshot() if servers else {}
        requests = self.metrics.counters["requests_total"]
        return {
            "pid": os.getpid(), "worker": self.group.index if self.group else 0,
            "time": time.time(), "queue": fleet.queue_depth(),
            "inflight": sum(s.load.inflight for s in everyone),
            "perMinute": sum(s.load.per_minute()[0] for s in everyone if s.load.history),
            "requests": int(sum(requests.values())), "servers": active,
            "errors": [e for e in fleet.recent_errors() if e["kind"] != "health"][:20],
            **counts,
        }

    async def publish_loop(self, stop: asyncio.Event) -> None:
        """WORKERS=N: writes this worker's part every SYNC_INTERVAL; stops the worker
        when its supervisor is gone (killed outright, it could not drain the group)."""
        group = self.group
        assert group is not None
        failing = False
        while not stop.is_set():
            try:
                group.publish(self.snapshot())
            except OSError as exc:
                if not failing:  # once, not every second
                    log.warning("cannot write this worker's counts to %s: %s; the group's "
                                "status and metrics miss them", group.directory, exc)
                failing = True
            else:
                failing = False
            if group.orphaned():
                log.warning("the supervisor is gone: this worker drains and exits")
                stop.set()
            await asyncio.sleep(self.config.sync_interval)

    async def status(self, request: Request, match: re.Match[str]) -> Response:
        return json_response(200, self.status_payload(page_of(request)))

    async def dashboard(self, request: Request, match: re.Match[str]) -> Response:
        # The first view is drawn from data embedded in the page; then it polls.
        data = json.dumps(self.status_payload((DASHBOARD_PAGE, 0))).replace("<", "\\u003c")
        page = DASHBOARD_HTML.replace("/*INITIAL*/null", data).replace(
            "/*PAGE*/100", str(DASHBOARD_PAGE))
        return Response(200, page.encode(), "text/html; charset=utf-8",
                        headers=[("Cache-Control", "no-store"),
                                 ("Content-Security-Policy",
                                  "default-src 'self'; script-src 'unsafe-inline'; "
                                  "style-src 'unsafe-inline'")])

    async def favicon(self, request: Request, match: re.Match[str]) -> Response:
        return Response(200, FAVICON, "image/svg+xml",
                        headers=[("Cache-Control", "max-age=86400")])

    async def metrics_page(self, request: Request, match: re.Match[str]) -> Response:
        servers = self.fleet.every_server()
        metrics = self.metrics
        others: list[dict[str, Any]] = []  # the other workers' files, those still written
        inflight = {s.label: s.load.inflight for s in servers}
        circuit = {s.label: s.load.breaker_open for s in servers}
        queued = self.fleet.queue_depth()
        if self.group is not None:
            # This worker's file first, then every file: each only ever grows, so the
            # group's counters never go back, whichever worker a scrape reaches.
            with contextlib.suppress(OSError):  # publish_loop says so
                self.group.publish(self.snapshot())
            metrics = Metrics()
            for snapshot in self.group.snapshots():
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    metrics.absorb(snapshot)
                if snapshot["live"] and not snapshot["own"]:
                    others.append(snapshot)
        labels = {str(s.id): s.label for s in servers}
        for other in others:
            queued += other["queue"]
            for key, (count, is_open, _) in other["servers"].items():
                if key in labels:
                    inflight[labels[key]] += count
                    circuit[labels[key]] = circuit[labels[key]] or is_open
        gauges: dict[str, tuple[str, list[tuple[Labels, float]]]] = {
            "inflight": ("Requests in flight per server.",
                         [((("server", label),), count) for label, count in inflight.items()]),
            "queue_depth": ("Requests waiting in the fleet queue.", [((), queued)]),
            "server_up": ("1 if the server is enabled and answered its last health check.",
                          [((("server", s.label),), int(s.enabled and s.reachable))
                           for s in servers]),
            "server_draining": ("1 while the server is draining (takes no new requests).",
                                [((("server", s.label),), int(s.draining)) for s in servers]),
            "circuit_open": ("1 while the server's circuit breaker is open.",
                             [((("server", label),), int(is_open))
                              for label, is_open in circuit.items()]),
            "workers": ("Serving processes whose counts these are (WORKERS).",
                        [((), 1 + len(others))]),
            "models_drifted": ("Models whose servers hold them under different digests.",
                               [((), len(self.fleet.drifted()))]),
            "build_info": ("The balancer's version (always 1).",
                           [((("version", __version__),), 1)]),
        }
        return Response(200, (metrics.render(gauges) + process_metrics()).encode(),
                        "text/plain; version=0.0.4; charset=utf-8")


# ---------------------------------------------------------------------------
# API description: the route table's lines, and OpenAPI 3.1 made from them
# ---------------------------------------------------------------------------


#: What a route's answer holds: a schema of API_SCHEMAS by name, a media type ("text/plain"),
#: several media types, or None for no body.
Answer = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True, eq=False)
class Route:
    """One line of the route table: what it matches, who may call it ("open" to anyone,
    "client" with an API key once keys exist, "admin" with ADMIN_TOKEN or, without one,
    from loopback, "models" as "admin" for changing the fleet's models unless
    MODEL_MANAGEMENT=open, then as "client"), the handler ("room.method" on the
    application), and what it takes and answers, for people and for the description at
    /openapi.json."""

    methods: frozenset[str]  # empty: any method
    pattern: re.Pattern[str]
    handler: str
    access: Literal["open", "client", "models", "admin"]
    summary: str
    #: The endpoint label of the metrics and the access log: the path itself where the
    #: route's paths are few and fixed (""), else a name, so that labels stay bounded.
    label: str = ""
    #: The paths it serves as OpenAPI writes them ("/proxy/{id}"); each is checked to match
    #: ``pattern`` (tests/test_openapi.py). Names in braces and ``query`` are API_PARAMETERS.
    paths: tuple[str, ...] = ()
    query: tuple[str, ...] = ()
    body: str | None = None  # the JSON body's schema in API_SCHEMAS
    answers: dict[int, Answer] = dataclasses.field(default_factory=dict)


def route(methods: str, path: str | tuple[str, ...], handler: str,
          access: Literal["open", "client", "models", "admin"], summary: str, *, label: str = "",
          pattern: str = "", query: tuple[str, ...] = (), body: str | None = None,
          answers: dict[int, Answer] | None = None, errors: tuple[int, ...] = ()) -> Route:
    """A line of the route table. ``path`` is one path or several, fixed or with {names};
    ``pattern`` the regular expression that matches them, when they are not fixed;
    ``errors`` the statuses of its own refusals (those of its access come with it)."""
    paths = (path,) if isinstance(path, str) else path
    regex = pattern or "|".join(map(re.escape, paths))
    answered = {**(answers or {200: "application/json"}), **dict.fromkeys(errors, "Error")}
    return Route(frozenset(methods.split()), re.compile(regex), handler, access, summary,
                 label, paths, query, body, answered)


#: The methods a route for any method is described with.
ANY_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")

_SERVER_ID = {"type": "integer", "minimum": 0, "maximum": MAX_ID}
#: Parameters by name: where they go, their schema, what they mean.
API_PARAMETERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "id": ("path", _SERVER_ID, "the id the list gives"),
    "model": ("path", {"type": "string"}, "a model name, as llama3:latest"),
    "digest": ("path", {"type": "string", "pattern": "^sha256[:-][0-9a-fA-F]{64}$"},
               "the blob's SHA-256"),
    "server": ("path", {"type": "string", "pattern": "^(?:[0-9a-f]{32}|[0-9]{1,9})$"},
               "a getServer ID, or a server's numeric id"),
    "path": ("path", {"type": "string"}, "the rest of the path, sent on as it is"),
    "models": ("query", {"type": "array", "items": {"type": "string"}},
               "models the server must have: repeated, as models[]=, or comma-separated"),
    "size": ("query", {"type": "string", "pattern": f"^(?:{SIZE_QUERY_RE.pattern})$"},
             "billions of parameters a requested model must have at least (blank: any)"),
    "proxy": ("query", {"type": "string", "pattern": f"^(?:{PROXY_QUERY_RE.pattern})$"},
              "the id of a proxy to reach the server through (blank: its own, if any)"),
    "limit": ("query", {"type": "string", "pattern": f"^(?:{LIMIT_QUERY_RE.pattern})$"},
              f"at most this many (up to {MAX_PAGE}); a Link header names the next page"),
    "after": ("query", {"type": "string", "pattern": f"^(?:{AFTER_QUERY_RE.pattern})$"},
              "only those with a greater id: the last id of the page before"),
    "X-Session-Id": ("header", {"type": "string"},
                     "keeps a conversation on one server while it can take it"),
    "X-Server-Labels": ("header", {"type": "string", "pattern": "^[A-Za-z0-9_.=:/,-]*$"},
                        "only servers with all these labels: zone=eu,gpu=a100"),
    "X-Recovery": ("header", {"type": "string", "enum": ["on", "off"]},
                   "off: a streamed answer whose server fails mid-answer is not continued on "
                   "another server (RECOVERY)"),
}

_STRINGS = {"type": "array", "items": {"type": "string"}}
_NULLABLE_TEXT = {"type": ["string", "null"]}


def _with_optional(record: dict[str, Any], **properties: Any) -> dict[str, Any]:
    """``record`` with more properties that are there only sometimes."""
    return {**record, "properties": {**record["properties"], **properties}}


def _record(**properties: Any) -> dict[str, Any]:
    """An object schema whose every property is always there."""
    return {"type": "object", "required": list(properties), "properties": properties}


SERVER_SCHEMA = _record(
    id={"type": "integer"}, name=_NULLABLE_TEXT, host={"type": "string"},
    port={"type": "integer"}, scheme={"enum": list(SERVER_SCHEMES)},
    location=_NULLABLE_TEXT, runner=_NULLABLE_TEXT, enabled={"type": "boolean"},
    draining={"type": "boolean"}, proxyId={"type": ["integer", "null"]}, models=_STRINGS,
    lastChecked=_NULLABLE_TEXT,
    reachable={"type": "boolean"}, lastError=_NULLABLE_TEXT, weight={"type": "number"},
    maxConcurrency={"type": ["integer", "null"]}, numParallel={"type": ["integer", "null"]},
    maxLoadedModels={"type": ["integer", "null"]}, hasAuthorization={"type": "boolean"},
    labels=LABELS_SCHEMA, managedBy={"enum": ["file", None], "description":
                                     "file: the fleet file (FLEET_FILE) made it"},
    inflight={"type": "integer"}, loadedModels=_STRINGS, circuitOpen={"type": "boolean"})
#: What the scheduler counts on for a server, and whence (GET /servers/<id>, addServer).
SERVER_SCHEMA["properties"]["capacity"] = {
    "type": "object", "description": "numParallel, maxLoadedModels and maxConcurrency as the "
    "scheduler uses them, each with where it comes from (server, setting, learned, "
    "fleet: the usual limit of the other servers, or guessed), and what was learned "
    "(learned)"}
PROXY_SCHEMA = _record(
    id={"type": "integer"}, ip={"type": "string"}, port={"type": "integer"},
    protocol={"enum": list(PROXY_PROTOCOLS)}, name={"type": "string"},
    status={"type": "boolean"}, userName=_NULLABLE_TEXT, hasPassword={"type": "boolean"})
_ONE_KEY = r"/keys/(?P<id>[0-9]{1,9})"
KEY_SCHEMA = _record(
    id={"type": "integer"}, name={"type": "string"}, labels=LABELS_SCHEMA,
    requestsPerMinute={"type": ["integer", "null"]}, maxConcurrent={"type": ["integer", "null"]},
    models={"type": ["array", "null"], "items": {"type": "string"}},
    tokensPerDay={"type": ["integer", "null"]}, weight={"type": "number"},
    priority={"enum": list(PRIORITY_LANES)},
    createdAt=_NULLABLE_TEXT, lastUsedAt=_NULLABLE_TEXT)
_USAGE_COUNTS = {"requests": {"type": "integer"}, "promptTokens": {"type": "integer"},
                 "completionTokens": {"type": "integer"}}
KEY_USAGE_SCHEMA = _record(
    id={"type": "integer"}, name={"type": "string"}, total=_record(**_USAGE_COUNTS),
    today=_record(**_USAGE_COUNTS, tokensPerDay={"type": ["integer", "null"]}),
    models={"type": "array", "items": _record(model={"type": "string"}, **_USAGE_COUNTS)},
    days={"type": "array", "items": _record(day={"type": "string"}, **_USAGE_COUNTS, models={
        "type": "array", "items": _record(model={"type": "string"}, **_USAGE_COUNTS)})})
_ONE_OF_URL_OR_HOST = {
    "dependentSchemas": {"url": {"not": {"anyOf": [
        {"required": ["host"]}, {"required": ["port"]}, {"required": ["scheme"]}]}}}}
_FAN_OUT_TARGETS = {"type": "array", "items": {"type": ["string", "integer"]},
                    "description": "only these servers, by id or name (the balancer's own "
                                   "field, not sent on)"}
_OLLAMA_BODY = {"type": "object", "description": "Ollama's (or OpenAI's) request, with its "
                "model; sent on as it is", "anyOf": [{"required": ["model"]},
                                                     {"required": ["name"]}]}

_ANY = {"description": "as the Ollama (or OpenAI, Anthropic) API takes it"}
_MESSAGES = {"type": "array", "items": {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string"}, "content": _ANY, "images": _ANY, "tool_calls": _ANY}}}


def _request(example: dict[str, Any], required: tuple[str, ...] = ("model",),
             **fields: Any) -> dict[str, Any]:
    """A routed endpoint's request as its API documents it (other fields are sent on as
    they are), with an example that works as it stands against a fleet with the model."""
    return {"type": "object", "required": list(required), "additionalProperties": True,
            "properties": {"model": {"type": "string"}, **fields}, "examples": [example]}


#: The request body of each routed endpoint, with an example (/api-docs tries it as is).
ROUTED_BODIES: dict[str, dict[str, Any]] = {
    "/api/generate": _request(
        {"model": "llama3.2", "prompt": "Why is the sky blue?", "stream": False},
        prompt={"type": "string"}, suffix={"type": "string"}, system={"type": "string"},
        images=_ANY, format=_ANY, options=_ANY, stream={"type": "boolean"},
        raw={"type": "boolean"}, keep_alive=_ANY, think=_ANY),
    "/api/chat": _request(
        {"model": "llama3.2", "messages": [{"role": "user", "content": "Why is the sky "
                                            "blue?"}], "stream": False},
        messages=_MESSAGES, tools=_ANY, format=_ANY, options=_ANY,
        stream={"type": "boolean"}, keep_alive=_ANY, think=_ANY),
    "/api/embed": _request({"model": "all-minilm", "input": "Why is the sky blue?"},
                           input=_ANY, truncate={"type": "boolean"}, options=_ANY,
                           keep_alive=_ANY),
    "/api/embeddings": _request({"model": "all-minilm", "prompt": "Why is the sky blue?"},
                                prompt={"type": "string"}, options=_ANY, keep_alive=_ANY),
    "/api/show": _request({"model": "llama3.2"}, verbose={"type": "boolean"}),
    "/api/push": _request({"model": "me/llama3.2:mine", "stream": False},
                          insecure={"type": "boolean"}, stream={"type": "boolean"}),
    "/v1/chat/completions": _request(
        {"model": "llama3.2", "messages": [{"role": "user", "content": "Why is the sky "
                                            "blue?"}]},
        messages=_MESSAGES, stream={"type": "boolean"}, temperature={"type": "number"},
        max_tokens={"type": "integer"}, tools=_ANY),
    "/v1/completions": _request({"model": "llama3.2", "prompt": "Why is the sky blue?"},
                                prompt=_ANY, stream={"type": "boolean"},
                                max_tokens={"type": "integer"}),
    "/v1/embeddings": _request({"model": "all-minilm", "input": "Why is the sky blue?"},
                               input=_ANY),
    "/v1/responses": _request({"model": "llama3.2", "input": "Why is the sky blue?"},
                              input=_ANY, stream={"type": "boolean"}),
    "/v1/messages": _request(
        {"model": "llama3.2", "max_tokens": 256,
         "messages": [{"role": "user", "content": "Why is the sky blue?"}]},
        ("model", "messages", "max_tokens"), messages=_MESSAGES,
        max_tokens={"type": "integer"}, system=_ANY, stream={"type": "boolean"}),
}


def _body_name(path: str) -> str:
    """The name of a routed endpoint's request schema: /api/chat -> ApiChatRequest."""
    return "".join(part.capitalize() for part in re.split(r"[/_]", path) if part) + "Request"

#: The schemas the route table names, and the error every refusal carries.
API_SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {"type": "object", "required": ["error"], "properties": {
        "error": {"type": ["string", "object"],
                  "description": "what went wrong (OpenAI's and Anthropic's shape under "
                                 "/v1)"}}},
    "Proxy": PROXY_SCHEMA,
    "Proxies": {"type": "array", "items": {"$ref": "#/components/schemas/Proxy"}},
    "NewProxy": body_schema(PROXY_FIELDS, PROXY_CLEARABLE, ("ip", "port", "name")),
    "ProxyChange": body_schema(PROXY_FIELDS, PROXY_CLEARABLE),
    "Server": SERVER_SCHEMA,
    "Servers": {"type": "array", "items": {"$ref": "#/components/schemas/Server"}},
    "NewServer": {**body_schema(SERVER_FIELDS, SERVER_CLEARABLE), **_ONE_OF_URL_OR_HOST,
                  "oneOf": [{"required": ["url"]}, {"required": ["host"]}]},
    "ServerChange": {**body_schema(SERVER_FIELDS, SERVER_CLEARABLE), **_ONE_OF_URL_OR_HOST},
    "ApiKey": KEY_SCHEMA,
    "ApiKeys": {"type": "array", "items": {"$ref": "#/components/schemas/ApiKey"}},
    "FleetModels": {"type": "array", "items": _with_optional(_record(
        name={"type": "string"}, drift={"type": "boolean"},
        digests={"type": "array", "items": _record(
            digest={"type": ["string", "null"]},
            servers={"type": "array", "items": _record(
                id={"type": "integer"}, name=_NULLABLE_TEXT, label={"type": "string"})},
            continues={"type": ["boolean", "null"], "description":
                       "whether it continues an answer another server began (null: "
                       "no server could tell yet)"},
            continuesWhy=_NULLABLE_TEXT)}), policy=_record(
        alias=_STRINGS, fallback=_STRINGS, clamp={"type": "object"}, set={"type": "object"},
        strip=_STRINGS))},
    "NewApiKey": body_schema(KEY_FIELDS, KEY_CLEARABLE, ("name",)),
    "ApiKeyChange": body_schema(KEY_FIELDS, KEY_CLEARABLE),
    "ApiKeyUsage": KEY_USAGE_SCHEMA,
    "CreatedApiKey": _record(id={"type": "integer"}, name={"type": "string"},
                             key={"type": "string", "description": "shown this once"}),
    "True": {"const": True},
    "Status": {"type": "object", "required": [
        "version", "time", "strategy", "queue", "totals", "next", "servers", "proxies",
        "drifted", "recoveries", "recentErrors"]},
    **{_body_name(path): body for path, body in ROUTED_BODIES.items()},
    "FanOutRequest": {**_OLLAMA_BODY, "properties": {
        "servers": _FAN_OUT_TARGETS, "stream": {"type": "boolean"}}},
    "CopyRequest": {"type": "object", "required": ["source", "destination"], "properties": {
        "source": {"type": "string"}, "destination": {"type": "string"},
        "servers": _FAN_OUT_TARGETS}},
}

#: What an Ollama server answers, relayed as it is: JSON, NDJSON or server-sent events.
OLLAMA_ANSWER = ("application/json", "application/x-ndjson", "text/event-stream")
ROOM_TAGS = {"front": "Ollama API", "fan_out": "Ollama API: every server",
             "relay": "Passthrough", "management": "Management",
             "observability": "Observability", "docs": "Description"}


def _common_answers(route: Route, method: str) -> dict[int, Answer]:
    """The refusals any call of the route may get, besides its own answers."""
    found: dict[int, Answer] = {}
    if route.body is not None:
        found.update({400: "Error", 408: "Error", 413: "Error"})
    if route.access in ("client", "models"):
        found.update({401: "Error", 403: "Error", 429: "Error"})
    elif route.access == "admin":
        found.update({401: "Error", 403: "Error", 503: "Error"})
        if method in ("POST", "PATCH", "PUT"):
            found[415] = "Error"
    return found


def _content(answer: Answer) -> dict[str, Any]:
    if answer is None:
        return {}
    if isinstance(answer, tuple):
        return {media: {} for media in answer}
    if "/" in answer:
        return {answer: {}}
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{answer}"}}}


def _operation(route: Route, path: str, method: str) -> dict[str, Any]:
    parameters = []
    for name in [*re.findall(r"\{(\w+)\}", path), *route.query]:
        where, schema, description = API_PARAMETERS[name]
        parameters.append({"name": name, "in": where, "required": where == "path",
                           "schema": schema, "description": description})
    answers = {**_common_answers(route, method), **route.answers}
    responses = {}
    for status, answer in sorted(answers.items()):
        reason = http.HTTPStatus(status).phrase
        content = _content("Error" if status >= 400 and answer is None else answer)
        responses[str(status)] = {"description": reason, **(
            {"content": content} if content and method != "HEAD" else {})}
    operation: dict[str, Any] = {
        "operationId": re.sub(r"[^A-Za-z0-9]+", "_", f"{method}{path}").strip("_").lower(),
        "summary": route.summary, "tags": [ROOM_TAGS[route.handler.split(".")[0]]],
        "parameters": parameters, "responses": responses,
        "security": API_SECURITY[route.access]}
    if route.body is not None and method not in ("GET", "HEAD", "DELETE"):
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{route.body}"}}}}
    return operation


API_SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "open": [],
    "client": [{"apiKey": []}, {}],  # {}: without one until the first key is made
    "admin": [{"adminToken": []}, {"adminPassword": []}],
    # MODEL_MANAGEMENT=admin (the default): the admin token; open: as "client".
    "models": [{"adminToken": []}, {"apiKey": []}, {}],
}
SECURITY_SCHEMES = {
    "adminToken": {"type": "http", "scheme": "bearer", "description":
                   "ADMIN_TOKEN. Without one set, only loopback clients may manage."},
    "adminPassword": {"type": "http", "scheme": "basic", "description":
                      "ADMIN_TOKEN as the password (any user name), as a browser asks"},
    "apiKey": {"type": "http", "scheme": "bearer", "description":
               "an API key from /keys/addKey (or the admin token); needed once a key exists, "
               "or always with REQUIRE_API_KEY"},
}


def openapi_document(routes: Sequence[Route]) -> dict[str, Any]:
    """OpenAPI 3.1 for ``routes``: every path of every route with its parameters, body,
    answers, refusals and authentication, in the table's order."""
    paths: dict[str, dict[str, Any]] = {}
    for line in routes:
        for path in line.paths:
            item = paths.setdefault(path, {})
            for method in sorted(line.methods or ANY_METHODS, key=ANY_METHODS.index):
                item[method.lower()] = _operation(line, path, method)
    return {
        "openapi": "3.1.0",
        "info": {"title": "ollamabalancer", "version": __version__, "description":
                 "One endpoint in front of a fleet of Ollama servers: the fleet as one "
                 "Ollama at the root, the seed project's proxy and server API, and the "
                 "management of servers, proxies and API keys."},
        "paths": paths,
        "components": {"schemas": API_SCHEMAS, "securitySchemes": SECURITY_SCHEMES},
    }


#: /api-docs: the description, readable in a browser. One self-contained page, as the
#: dashboard (no CDN, the same CSP); data goes in with textContent only, never as HTML.
API_DOCS_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ollamabalancer API</title>
<style>
  body { margin: 0 auto; max-width: 980px; padding: 16px 24px; color: #1f2328;
         font: 14px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; }
  h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
  .intro, .dim { color: #59636e; }
  details { border: 1px solid #d1d9e0; border-radius: 6px; margin: 6px 0; }
  summary { cursor: pointer; padding: 6px 10px; list-style: none; }
  summary::-webkit-details-marker { display: none; }
  .method { display: inline-block; min-width: 58px; font: 600 12px ui-monospace, monospace;
            text-align: center; border-radius: 4px; padding: 1px 6px; color: #fff;
            background: #59636e; margin-right: 8px; }
  .GET, .HEAD { background: #0969da; } .POST { background: #1a7f37; }
  .PATCH, .PUT { background: #9a6700; } .DELETE { background: #cf222e; }
  .path { font-family: ui-monospace, monospace; }
  .body { padding: 4px 12px 10px; border-top: 1px solid #d1d9e0; }
  table { border-collapse: collapse; width: 100%; margin: 4px 0 8px; }
  th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid #eef1f4;
           vertical-align: top; }
  code { font-family: ui-monospace, monospace; font-size: 12px; }
</style>
</head>
<body>
<h1>ollamabalancer API <span class="dim" id="version"></span></h1>
<p class="intro" id="intro"></p>
<p class="dim">The same description as JSON: <a href="/openapi.json">/openapi.json</a>
(OpenAPI 3.1), for code generators and API tools.</p>
<div id="api"></div>
<script>
"use strict";
const doc = /*DOCUMENT*/null;
function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
function resolve(schema) {
  const ref = schema && schema.$ref;
  return ref ? doc.components.schemas[ref.split("/").pop()] : schema || {};
}
function describe(schema) {
  schema = resolve(schema);
  const options = schema.anyOf || schema.oneOf;
  if (options) return options.map(describe).join(" or ");
  if (schema.enum) return schema.enum.map(v => JSON.stringify(v)).join(" | ");
  if (schema.const !== undefined) return JSON.stringify(schema.const);
  let text = [].concat(schema.type || "any").join(" or ");
  if (schema.type === "array" && schema.items) text += " of " + describe(schema.items);
  if (schema.minimum !== undefined) text += `, ${schema.minimum} to ${schema.maximum}`;
  if (schema.maxLength) text += `, at most ${schema.maxLength} characters`;
  if (schema.description) text += ` (${schema.description})`;
  return text;
}
function table(head, rows) {
  const t = el("table"), tr = el("tr");
  head.forEach(h => tr.appendChild(el("th", h)));
  t.appendChild(tr);
  rows.forEach(cells => {
    const row = el("tr");
    cells.forEach(c => {
      const td = el("td");
      td.appendChild(el("code", c));
      row.appendChild(td);
    });
    t.appendChild(row);
  });
  return t;
}
function operation(path, method, op) {
  const box = el("details"), line = el("summary");
  line.appendChild(el("span", method.toUpperCase(), "method " + method.toUpperCase()));
  line.appendChild(el("span", path, "path"));
  line.appendChild(el("span", "  " + op.summary, "dim"));
  box.appendChild(line);
  const body = el("div", null, "body");
  const auth = op.security.map(s => Object.keys(s)[0] || "none").join(" or ");
  body.appendChild(el("p", "Authentication: " + (auth || "none")));
  if (op.parameters.length) body.appendChild(table(["parameter", "in", "schema"],
    op.parameters.map(p => [p.name, p.in, describe(p.schema) + " - " + p.description])));
  const request = op.requestBody && resolve(op.requestBody.content["application/json"].schema);
  if (request) {
    const required = request.required || [];
    body.appendChild(el("p", "JSON body" + (request.additionalProperties === false
                                             ? ", no other fields:" : ":")));
    body.appendChild(table(["field", "schema"], Object.entries(request.properties || {})
      .map(([name, schema]) => [name + (required.includes(name) ? " (required)" : ""),
                                describe(schema)])));
  }
  body.appendChild(table(["status", "answer"], Object.entries(op.responses).map(
    ([status, r]) => [status, r.description + (r.content ? ": " + Object.entries(r.content)
      .map(([media, c]) => c.schema ? describe(c.schema) : media).join(", ") : "")])));
  box.appendChild(body);
  return box;
}
document.getElementById("version").textContent = doc.info.version;
document.getElementById("intro").textContent = doc.info.description;
const groups = new Map();
for (const [path, item] of Object.entries(doc.paths))
  for (const [method, op] of Object.entries(item)) {
    const tag = op.tags[0];
    if (!groups.has(tag)) groups.set(tag, []);
    groups.get(tag).push(operation(path, method, op));
  }
const api = document.getElementById("api");
for (const [tag, ops] of groups) {
  api.appendChild(el("h2", tag));
  ops.forEach(o => api.appendChild(o));
}
</script>
</body>
</html>
"""


class ApiDocs:
    """The API's description: /openapi.json made once from the route table, and
    /api-docs, the page that shows it."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.document = openapi_document(routes)
        self.json = json.dumps(self.document, separators=(",", ":")).encode()
        embedded = json.dumps(self.document).replace("<", "\\u003c")
        self.html = API_DOCS_HTML.replace("/*DOCUMENT*/null", embedded).encode()

    async def openapi(self, request: Request, match: re.Match[str]) -> Response:
        return Response(200, self.json, "application/json")

    async def page(self, request: Request, match: re.Match[str]) -> Response:
        return Response(200, self.html, "text/html; charset=utf-8", headers=[
            ("Cache-Control", "no-store"),
            ("Content-Security-Policy",
             "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'")])



# ---------------------------------------------------------------------------
# Application: the route table, and dispatch through it
# ---------------------------------------------------------------------------


_ONE_PROXY = r"/proxy/(?P<id>[0-9]{1,9})"
_ONE_SERVER = r"/servers/(?P<id>[0-9]{1,9})"

#: Every endpoint, in the order they are tried. Dispatch, 405's Allow, the metrics'
#: endpoint label, authentication and the API's description all read this table and
#: nothing else.
ROUTES: tuple[Route, ...] = (
    # The Ollama API at the root.
    route("GET HEAD", "/", "front.root", "open", "liveness: 'Ollama is running'",
          answers={200: "text/plain"}),
    route("GET", "/api/version", "front.api_version", "client",
          "the oldest Ollama version among the serving servers"),
    route("GET", "/api/tags", "front.api_tags", "client",
          "every model of the serving servers, once"),
    route("GET", "/api/ps", "front.api_ps", "client", "the models loaded on the serving servers"),
    route("GET", "/v1/models", "front.v1_models", "client",
          "the catalog as OpenAI lists models"),
    route("GET", "/v1/models/{model}", "front.v1_model", "client",
          "one model as OpenAI describes it", label="v1_model",
          pattern=r"/v1/models/(?P<model>.+)", errors=(404,)),
    route("POST", "/api/show", "front.show", "client",
          "a model's details, from a server that has it: never queued behind generations",
          body=_body_name("/api/show"), errors=(404, 502, 503, 504)),
    route("POST", "/api/push", "front.routed", "models",
          "pushes a model from the server that has it (changes the registry: management)",
          body=_body_name("/api/push"), answers={200: OLLAMA_ANSWER},
          errors=(404, 502, 503, 504)),
    *(route("POST", path, "front.routed", "client",
            "routed by its body's model to the best server, queued while the fleet is full",
            body=_body_name(path), query=("X-Session-Id", "X-Recovery", "X-Server-Labels"),
            answers={200: OLLAMA_ANSWER},
            errors=(404, 502, 503, 504)) for path in ROUTED_PATHS),
    route("POST", ("/api/pull", "/api/create"), "fan_out.progress", "models",
          "on every server (or those in 'servers'), progress merged into one stream",
          body="FanOutRequest", answers={200: ("application/x-ndjson", "application/json")},
          errors=(404, 502, 503)),
    route("DELETE", "/api/delete", "fan_out.delete", "models",
          "deletes a model on every server that has it", body="FanOutRequest",
          answers={200: None}, errors=(404, 502, 503)),
    route("POST", "/api/copy", "fan_out.copy", "models", "copies a model on every server",
          body="CopyRequest", answers={200: None}, errors=(404, 502, 503)),
    route("HEAD", "/api/blobs/{digest}", "fan_out.blobs", "client",
          "does every server have the blob", label="blobs",
          pattern=r"/api/blobs/(?P<digest>sha256[:-][0-9a-fA-F]{64})",
          answers={200: None}, errors=(404, 502, 503)),
    route("POST", "/api/blobs/{digest}", "fan_out.blobs", "models",
          "uploads the blob to every server", label="blobs",
          pattern=r"/api/blobs/(?P<digest>sha256[:-][0-9a-fA-F]{64})",
          answers={201: None}, errors=(502, 503)),
    # The seed's API and its management.
    route("POST", "/proxy/addProxy", "management.add_proxy", "admin", "adds a proxy",
          label="add_proxy", body="NewProxy", answers={200: "True"}),
    route("GET", "/proxy/allProxies", "management.all_proxies", "admin",
          "every proxy, passwords left out", label="all_proxies", answers={200: "Proxies"}),
    route("GET", "/proxy/{id}", "management.one_proxy", "admin", "one proxy",
          label="one_proxy", pattern=_ONE_PROXY, answers={200: "Proxy"}, errors=(404,)),
    route("PATCH", "/proxy/{id}", "management.one_proxy", "admin",
          "changes a proxy (null clears userName or password)", label="one_proxy",
          pattern=_ONE_PROXY, body="ProxyChange", answers={200: "Proxy"}, errors=(404,)),
    route("DELETE", "/proxy/{id}", "management.one_proxy", "admin",
          "deletes a proxy no server uses", label="one_proxy", pattern=_ONE_PROXY,
          answers={204: None}, errors=(404, 409)),
    route("GET", "/servers/getServer", "management.get_server", "client",
          "an ID for a server that has the models (and size), through the proxy",
          label="get_server", query=("models", "size", "proxy"),
          answers={200: "text/plain"}, errors=(400, 404, 409, 503)),
    route("POST", "/servers/addServer", "management.add_server", "admin", "adds a server",
          label="add_server", body="NewServer", answers={201: "Server"}, errors=(409, 422)),
    route("GET", "/servers/allServers", "management.all_servers", "admin",
          "every server with its health and models (a page of them, with limit)",
          label="all_servers", query=("limit", "after"), answers={200: "Servers"},
          errors=(400,)),
    route("GET", "/servers/{id}", "management.one_server", "admin", "one server",
          label="one_server", pattern=_ONE_SERVER, answers={200: "Server"}, errors=(404,)),
    route("PATCH", "/servers/{id}", "management.one_server", "admin",
          "changes a server (null clears name, proxyId, maxConcurrency...)",
          label="one_server", pattern=_ONE_SERVER, body="ServerChange",
          answers={200: "Server"}, errors=(404, 409, 422)),
    route("DELETE", "/servers/{id}", "management.one_server", "admin", "deletes a server",
          label="one_server", pattern=_ONE_SERVER, answers={204: None}, errors=(404,)),
    route("", "/servers/ollama/{server}/{path}", "relay.passthrough", "client",
          "relayed as it is to the server a getServer ID (or server id) names; "
          "/servers/ollama/<path>?serverId=<id> works too",
          label="passthrough", pattern=r"/servers/ollama(?P<rest>/.*)?",
          answers={200: OLLAMA_ANSWER}, errors=(400, 404, 409, 502, 503, 504)),
    route("GET", "/models", "management.models", "admin",
          "every model of the fleet, each digest with its servers; drift: more than one; "
          "the fleet file's aliases, fallbacks and pins (policy)",
          label="models", answers={200: "FleetModels"}),
    route("POST", "/keys/addKey", "management.add_key", "admin",
          "makes an API key, shown this once", label="add_key", body="NewApiKey",
          answers={201: "CreatedApiKey"}),
    route("GET", "/keys/allKeys", "management.all_keys", "admin", "every API key, not the key",
          label="all_keys", answers={200: "ApiKeys"}),
    route("GET", "/keys/{id}", "management.one_key", "admin", "one API key, not the key",
          label="one_key", pattern=_ONE_KEY, answers={200: "ApiKey"}, errors=(404,)),
    route("PATCH", "/keys/{id}", "management.one_key", "admin",
          "changes an API key (null clears requestsPerMinute, maxConcurrent, models, "
          "tokensPerDay)", label="one_key", pattern=_ONE_KEY, body="ApiKeyChange",
          answers={200: "ApiKey"}, errors=(404,)),
    route("DELETE", "/keys/{id}", "management.one_key", "admin", "deletes an API key",
          label="one_key", pattern=_ONE_KEY, answers={204: None}, errors=(404,)),
    route("GET", "/keys/{id}/usage", "management.key_usage", "admin",
          "the tokens and requests of an API key: in all, by model, by UTC day",
          label="key_usage", pattern=r"/keys/(?P<id>[0-9]{1,9})/usage",
          answers={200: "ApiKeyUsage"}, errors=(404,)),
    # Observability and the description.
    route("GET", "/metrics", "observability.metrics_page", "admin",
          "Prometheus text exposition", label="metrics_page", answers={200: "text/plain"}),
    route("GET", "/servers/status", "observability.status", "admin",
          "what the dashboard shows, as JSON (its servers a page at a time, with limit)",
          label="status", query=("limit", "after"), answers={200: "Status"}, errors=(400,)),
    route("GET", "/dashboard", "observability.dashboard", "admin", "the dashboard page",
          label="dashboard", answers={200: "text/html"}),
    route("GET", "/favicon.ico", "observability.favicon", "open", "the dashboard's icon",
          label="favicon", answers={200: "image/svg+xml"}),
    route("GET", "/openapi.json", "docs.openapi", "open",
          "this description, as OpenAPI 3.1", label="openapi"),
    route("GET", "/api-docs", "docs.page", "open", "this description, as a page",
          label="api_docs", answers={200: "text/html"}),
)


class Balancer:
    """The application: makes the rooms, each given only the ones below it, and sends
    each request through the route table to its handler with the access the route asks.

    Rooms, lowest first: Upstreams (HTTP to servers), Fleet (what the store holds, health,
    the scheduler), Access (who may call what), Relay (one request to one server),
    OllamaFront, FanOut and Management (the endpoints), Observability (what it says of
    itself). A room calls only rooms listed before it.
    """

    def __init__(self, config: Config, store: AsyncStore, group: WorkerGroup | None = None
                 ) -> None:
        self.config = config
        self.metrics = Metrics()
        self.upstreams = Upstreams(config)
        self.fleet = Fleet(config, store, self.upstreams, self.metrics,
                           group.board if group else None)
        self.tenants = Tenants(config, store, self.metrics)
        self.fleet_file = FleetFile(config, self.fleet)
        self.access = Access(config, self.fleet, self.tenants)
        self.relay = Relay(config, self.fleet, self.upstreams, self.access, self.metrics)
        self.recovery = Recovery(config, self.fleet, self.upstreams, self.relay, self.metrics)
        self.front = OllamaFront(config, self.fleet, self.upstreams, self.relay,
                                 self.recovery, self.tenants, self.fleet_file)
        self.fan_out = FanOut(config, self.fleet, self.upstreams, self.relay)
        self.management = Management(config, self.fleet, self.recovery, self.tenants,
                                     self.fleet_file)
        self.observability = Observability(config, self.fleet, self.metrics, self.tenants,
                                           group)
        self.docs = ApiDocs(ROUTES)
        self.body_budget = ByteBudget(config.max_buffered_bodies)
        self.routes = [(r, self._handler(r.handler)) for r in ROUTES]
        self._route_memo: dict[str, list[tuple[Route, re.Match[str], Handler]]] = {}

    def _handler(self, name: str) -> Handler:
        room, _, method = name.partition(".")
        handler: Handler = getattr(getattr(self, room), method)
        return handler

    async def start(self) -> None:
        """Reads the store, applies the fleet file and checks every server once, before
        the first request."""
        await self.fleet.reload()
        await self.fleet_file.apply("start")
        await self.fleet.check_all()
        with contextlib.suppress(StoreUnavailable):  # its share, before the first request
            await self.fleet.beat()

    async def close(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.tenants.flush()  # the last counts, before the store goes
        await self.fleet.close()
        self.upstreams.close()
        self.observability.access.flush()

    def matching_routes(self, path: str) -> list[tuple[Route, re.Match[str], Handler]]:
        """The routes whose pattern matches ``path``, in order; remembered per path, as
        the same few paths come again and again."""
        found = self._route_memo.get(path)
        if found is None:
            found = [(r, match, handler) for r, handler in self.routes
                     if (match := r.pattern.fullmatch(path)) is not None]
            if len(self._route_memo) >= ROUTE_MEMO_SIZE:
                self._route_memo.clear()
            self._route_memo[path] = found
        return found

    async def dispatch(self, request: Request) -> Response | Relayed:
        path = request.path
        allowed: set[str] = set()
        access = self.access
        request.id = access.request_id(request.head)
        if self.config.trusted_proxies or "x-forwarded-for" in request.head.headers.index or (
                "forwarded" in request.head.headers.index):
            request.client, request.forwarded = access.client_of(request)
        request.response_fields.append(("X-Request-Id", request.id))
        routes = self.matching_routes(path)
        if request.method == "OPTIONS" and routes and (
                "access-control-request-method" in request.head.headers.index):
            request.endpoint = "preflight"
            return access.preflight(request, [r.access for r, *_ in routes])
        for found, match, handler in routes:
            if found.methods and request.method not in found.methods:
                allowed |= found.methods
                continue
            request.endpoint = found.label or path
            if found.access == "admin":
                access.authorize_admin(request)
                request.privileged = True
                return await handler(request, match)
            if found.access == "models" and self.config.model_management != "open":
                access.authorize_model_change(request)
            if cors := access.allow_origin(request):
                request.response_fields += cors
            if found.access == "open":
                return await handler(request, match)
            grant = access.authorize_client(request)
            if grant is not NO_GRANT:
                request.authenticated, request.privileged = (grant.authenticated,
                                                             grant.privileged)
                request.key = grant.key
            usage = grant.usage
            if usage is None:
                return await handler(request, match)
            await access.enter(grant)
            try:
                return await handler(request, match)
            finally:
                access.leave(usage)
        if allowed:
            raise HTTPError(405, f"{request.method} is not allowed on {path}",
                            headers=[("Allow", ", ".join(sorted(allowed)))])
        raise HTTPError(404, f"no route for {request.method} {path}")

    def finished(self, request: Request, outcome: Relayed) -> None:
        self.observability.finished(request, outcome)

    def public_message(self, request: Request | None, status: int, detail: str) -> str:
        return self.access.public_message(request, status, detail)


# ---------------------------------------------------------------------------
# HTTP server and lifecycle
# ---------------------------------------------------------------------------


#: The share of MAX_CONNECTIONS past which an address that holds its fair part already
#: gets no more (HTTPServer.accept): the last tenth is for those that hold few.
CROWDED = 0.9


def client_group(peer: str) -> str:
    """What connections are counted by: an IPv4 address (an IPv4-mapped one as such), or
    an IPv6 address's /64, all of which one host may use."""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return peer


class HTTPServer:
    """Accepts connections and runs requests on each in order (keep-alive, pipelining)."""

    def __init__(self, app: Balancer, max_connections: int, per_client: int = 0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.tls = tls  # TLS_CERT_FILE: every connection is HTTPS
        self.max_connections = max_connections
        #: Connections one address may hold, so that one peer cannot take every slot.
        self.per_client = per_client or max(1, max_connections // 4)
        self.by_peer: collections.Counter[str] = collections.Counter()
        self.connections: set[asyncio.Task[Any]] = set()
        self.busy: set[asyncio.Task[Any]] = set()  # serving a request right now
        self.refusing: set[asyncio.Task[None]] = set()  # answering 503, over the limit
        self.draining = False

    async def drain(self, timeout: float) -> None:
        """Closes idle connections now and lets busy ones finish their request, for up to
        ``timeout`` seconds; what is left then is cut."""
        self.draining = True
        for task in self.connections - self.busy:
            task.cancel()
        deadline = asyncio.get_running_loop().time() + timeout
        while self.busy and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if self.busy:
            log.warning("drain timeout: cutting %d unfinished requests", len(self.busy))
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)

    async def start_tls(self, wire: Wire, context: ssl.SSLContext) -> bool:
        """TLS for a connection that opens with a TLS handshake; plain HTTP to the TLS
        port gets a clear 400 in plain HTTP (saying to use https), and False."""
        timeout = self.app.config.header_timeout
        try:
            first = await wire.first_byte(timeout)
            if first == b"\x16":  # a TLS record: the handshake
                await wire.start_tls(context, timeout)
                return True
        except (OSError, TimeoutError, ssl.SSLError):
            return False
        if first:
            body = (b'{"error":"this port speaks HTTPS: use https:// (TLS_CERT_FILE is '
                    b'set)"}')
            wire.resume_reading()
            wire.write(render_head("HTTP/1.1 400 Bad Request", [
                ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                ("Connection", "close")]) + body)
            await self.linger(wire)
        return False

    def accept(self, wire: Wire) -> None:
        """Each new client connection is served by a task of its own; over
        MAX_CONNECTIONS it gets a short 503 instead, and over its address's share
        (MAX_CONNECTIONS_PER_CLIENT) a 429. An address is an IPv6 client's /64 (one host
        has a whole /64 to pick from). Near the limit (CROWDED of it), an address that
        holds its fair part already (an equal part for each address, one more counted)
        is refused too, so that the last connections go to those that hold few."""
        peer = client_group(wire.peer)
        held = self.by_peer[peer]
        if self.app.access.trusts(wire.peer):  # a proxy in front carries many clients
            held = 0
        crowded = held >= self.per_client or (
            len(self.connections) >= self.max_connections * CROWDED
            and held >= self.max_connections // (len(self.by_peer) + 1))
        if len(self.connections) < self.max_connections and not crowded:
            if self.tls is not None:
                wire.pause_reading()  # its first byte says TLS or not (start_tls)
            self.by_peer[peer] += 1
            task = asyncio.ensure_future(self.serve_connection(wire))
            self.connections.add(task)
            task.add_done_callback(functools.partial(self._closed, peer))
            return
        if len(self.refusing) >= FD_RESERVE // 2:
            wire.abort()  # a flood: no descriptors to spare for a polite answer
            return
        full = len(self.connections) >= self.max_connections
        task = asyncio.ensure_future(self.refuse(wire, 503 if full else 429))
        self.refusing.add(task)
        task.add_done_callback(self.refusing.discard)

    def _closed(self, peer: str, task: asyncio.Task[Any]) -> None:
        self.connections.discard(task)
        left = self.by_peer[peer] - 1
        if left:
            self.by_peer[peer] = left
        else:
            del self.by_peer[peer]

    @staticmethod
    async def refuse(wire: Wire, status: int) -> None:
        body = (b'{"error":"too many open connections"}' if status == 503 else
                b'{"error":"too many open connections from your address"}')
        wire.write(render_head(f"HTTP/1.1 {status} {reason_phrase(status)}", [
            ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
            ("Retry-After", "1"), ("Connection", "close")]) + body)
        # Closing with the request unread would send a reset that can destroy the 503
        # before the client reads it: wait for the request (briefly), then close at once,
        # as the file descriptor is what is short.
        with contextlib.suppress(Exception):
            await wire.fill(0.5)
        wire.close()

    async def serve_connection(self, wire: Wire) -> None:
        # A new connection has HEADER_TIMEOUT for its first request, idle time included.
        idle_until, first = wire.loop.time() + self.app.config.header_timeout, True
        try:
            if self.tls is not None and not await self.start_tls(wire, self.tls):
                return
            while True:
                keep_alive, unread = await self.serve_one(wire, idle_until, first)
                if not keep_alive or self.draining:
                    break
                idle_until, first = wire.loop.time() + KEEPALIVE_TIMEOUT, False
            if unread or wire.buf:
                await self.linger(wire)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("unexpected error on a client connection")
        finally:
            wire.close()

    @staticmethod
    async def linger(wire: Wire) -> None:
        """Half-closes, then reads and drops what the client still sends for up to
        LINGER_SECONDS before the close: closing with unread bytes sends a reset, which
        can destroy the error response the client has not read yet (nginx's
        lingering_close does the same)."""
        transport = wire.transport
        if wire.eof or transport is None or transport.is_closing() or (
                not transport.can_write_eof()):
            return
        transport.write_eof()
        deadline = wire.loop.time() + LINGER_SECONDS
        with contextlib.suppress(asyncio.TimeoutError):
            while (remaining := deadline - wire.loop.time()) > 0:
                wire.buf.clear()
                if not await wire.fill(remaining):
                    return

    async def serve_one(self, wire: Wire, idle_until: float, first: bool
                        ) -> tuple[bool, bool]:
        """Serves one request: whether the connection may serve another, and whether the
        request's body was left unread (then the connection lingers before it closes)."""
        task = asyncio.current_task(wire.loop)
        try:
            request = await self._next_request(wire, idle_until, first, task)
            if request is None:
                return False, False
            outcome = Relayed(False)  # what is told of it if it goes no further
            try:
                outcome = await self._answer(request)
            finally:
                request.close()
                self.app.finished(request, outcome)
            return outcome.keep_alive, not request.body_done
        finally:
            if task is not None:
                self.busy.discard(task)

    async def _next_request(self, wire: Wire, idle_until: float, first: bool,
                            task: asyncio.Task[Any] | None) -> Request | None:
        """The next request, its head read; None when the connection should close (idle
        too long, closed, or a head refused, whose error this has answered)."""
        loop, config = wire.loop, self.app.config
        head: RequestHead | None = None
        try:
            # Idle: wait for the first byte of the next request.
            if not wire.buf and not await wire.fill(idle_until - loop.time()):
                return None
            if task is not None:
                self.busy.add(task)  # from its first byte on, a request may finish
            # HEADER_TIMEOUT from the head's first byte, and for a new connection's first
            # request no later than HEADER_TIMEOUT after it opened (idle_until then).
            head = await read_head(wire, maybe_request_head,
                                   min(loop.time() + config.header_timeout, idle_until)
                                   if first else loop.time() + config.header_timeout)
            if head is None:
                return None
            return Request(wire, head, config.body_timeout, self.app.body_budget)
        except TimeoutError:
            if wire.buf:
                await self._try_send(wire, error_response(408, "request head not received "
                                                          "in time", close=True), None)
            return None
        except IncompleteBody:
            return None
        except HTTPError as exc:  # a head, or a body's framing, that cannot be trusted
            await self._try_send(wire, error_response(
                exc.status, exc.message, close=True, headers=exc.headers,
                path=head.target if head is not None else ""), head)
            return None

    async def _answer(self, request: Request) -> Relayed:
        """Dispatches the request and answers what it returns, or the error it raises."""
        wire, head = request.wire, request.head
        try:
            result = await self.app.dispatch(request)
        except TimeoutError:
            return Relayed(False)
        except IncompleteBody:
            return Relayed(False)
        except HTTPError as exc:
            response = error_response(exc.status, exc.message, path=head.target,
                                      headers=[*exc.headers, *request.response_fields])
            # A quick refusal (404, 429, 503) keeps the connection when the body is here.
            response.close = exc.close or not (request.skip_body() and request.keep_alive)
            await self._try_send(wire, response, head)
            return Relayed(not response.close, exc.status, model=exc.model)
        except UpstreamError as exc:
            message = self.app.public_message(request, exc.status, exc.message)
            await self._try_send(wire, error_response(
                exc.status, message, close=True, path=head.target,
                headers=request.response_fields), head)
            return Relayed(False, exc.status)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("unexpected error answering %s", head.target)
            if wire.sent:  # part of an answer went out: nothing can follow it
                return Relayed(False)
            await self._try_send(wire, error_response(500, "internal error", close=True),
                                 head)
            return Relayed(False, 500)
        if isinstance(result, Relayed):
            return result
        if not request.keep_alive:
            result.close = True
        try:
            return await request.send(result)
        except ConnectionError:  # the client left before its answer was out
            return Relayed(False, result.status)

    async def _try_send(self, wire: Wire, response: Response, head: RequestHead | None
                        ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
            await asyncio.wait_for(send_response(wire, response, head), 5.0)

class TextFormatter(logging.Formatter):
    """LOG_FORMAT=text: a line a record, control characters escaped (a traceback after
    it keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


class JsonFormatter(logging.Formatter):
    """LOG_FORMAT=json: one JSON object a line (AccessLog writes its own the same way)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = {} if worker is None else {"worker": worker}

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, Any] = {"time": stamp.isoformat(timespec="milliseconds"),
                                 "level": record.levelname.lower(), "logger": record.name,
                                 **self.worker, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)

#: File descriptors kept apart from client and upstream sockets: the listener, the
#: database, log files, health checks, and connections over the limit while they get
#: their 503 (at most half of these at once; more are reset). The idle pool's are apart
#: too (pool_cap).
FD_RESERVE = 100

def raise_file_limit(connections: int) -> int | None:
    """Lifts the soft limit on open files toward the hard one, up to two per connection
    (its client side and its upstream); 1024 is a common default. Returns the limit now
    in force, or None when there is none (or no way to know)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * connections + FD_RESERVE + POOL_MAX_IDLE_TOTAL
    target = hard if hard == resource.RLIM_INFINITY else min(hard, max(soft, wanted))
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return None if soft == resource.RLIM_INFINITY else int(soft)

def connection_cap(configured: int, file_limit: int | None) -> int:
    """MAX_CONNECTIONS, lowered to what the open-file limit can hold with an upstream
    connection each, beside the reserve and the idle pool: past it a client gets a clean
    503 at once, rather than a 502 when its upstream connection cannot be opened
    (measured: 10 of 10,000 streams lost so at a 20,000 limit)."""
    if file_limit is None:
        return configured
    return max(1, min(configured, (file_limit - FD_RESERVE - pool_cap(file_limit)) // 2))

def tls_context(config: Config) -> ssl.SSLContext | None:
    """HTTPS for every connection, when TLS_CERT_FILE (and TLS_KEY_FILE) are set."""
    if not (config.tls_cert_file or config.tls_key_file):
        return None
    if not (config.tls_cert_file and config.tls_key_file):
        raise ConfigError("TLS_CERT_FILE and TLS_KEY_FILE go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot use TLS_CERT_FILE/TLS_KEY_FILE: {exc}") from None
    return context


def reload_tls(context: ssl.SSLContext, config: Config) -> None:
    """SIGHUP: the certificate and key read again (a renewal), for the connections that
    follow; files that do not load leave the ones in use."""
    try:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
        log.info("TLS certificate read again from %s", config.tls_cert_file)
    except (OSError, ssl.SSLError) as exc:
        log.error("TLS certificate not read again, the one in use stays: %s", exc)


def log_start(config: Config, fleet: Fleet, url: str) -> None:
    """One line that says what is running, where, on what, and who may do what; then a
    line for each thing that needs the operator's action, and nothing more."""
    servers = fleet.every_server()
    up = sum(1 for s in servers if s.enabled and s.reachable)
    admin = "the admin token" if config.admin_token else "clients on this host"
    models = "anyone" if config.model_management == "open" else admin
    clients = ("an API key" if fleet.has_keys() or config.require_api_key else "anyone")
    loop = type(asyncio.get_running_loop()).__module__.partition(".")[0]
    log.info("ollamabalancer %s listening on %s (%s); store %s; %d servers (%d up), "
             "%d proxies, %d API keys; management: %s; model changes: %s; Ollama endpoints: "
             "%s%s", __version__, url, loop, config.describe_store(), len(servers), up,
             len(fleet.every_proxy()), len(fleet.every_key()), admin, models, clients,
             f"; client addresses from {', '.join(config.trusted_proxies)}"
             if config.trusted_proxies else "")
    exposed = not is_loopback(config.ip)
    if clients == "anyone" and exposed:
        log.warning("the Ollama endpoints answer anyone who reaches %s: make an API key "
                    "(POST /keys/addKey) or set REQUIRE_API_KEY=1", url)
    if config.model_management == "open":
        log.warning("MODEL_MANAGEMENT=open: anyone may pull, push, create, copy and delete "
                    "models on every server")


async def serve(config: Config, ready: Callable[[str, int], None] | None = None,
                group: WorkerGroup | None = None) -> None:
    """Opens the store, checks the fleet once, then serves until SIGTERM or SIGINT; as
    one worker of a group (WORKERS=N) when ``group`` is given."""
    loop = asyncio.get_running_loop()
    file_limit = raise_file_limit(config.max_connections)
    max_connections = connection_cap(config.max_connections, file_limit)
    if max_connections < config.max_connections and "max_connections" in config.explicit:
        # An alarm only for a number the user chose; the default is a ceiling, not a need.
        log.warning("open files are limited to %s: at most %d client connections (not "
                    "MAX_CONNECTIONS=%d), each with its upstream; raise the hard limit "
                    "(ulimit -Hn) to allow more", file_limit, max_connections,
                    config.max_connections)
    store = AsyncStore(await loop.run_in_executor(None, open_store, config), config.db_timeout)
    app = Balancer(config, store, group)
    await app.start()
    tls = tls_context(config)
    # The standard library's loop lets a connection be looked at before its TLS begins, so
    # plain HTTP to the TLS port is told to use https; uvloop reads a connection at once,
    # so there the listener itself speaks TLS (and plain HTTP is only dropped).
    listener_tls = tls if tls is not None and type(loop).__module__.startswith("uvloop") else None
    http_server = HTTPServer(app, max_connections, config.max_connections_per_client,
                             tls if listener_tls is None else None)
    # A group's workers each listen on the port; the kernel spreads connections over them.
    server = await loop.create_server(
        functools.partial(Wire, http_server.accept), config.ip, config.port,
        reuse_address=True, reuse_port=group is not None, backlog=1024, ssl=listener_tls,
    )
    host, port = server.sockets[0].getsockname()[:2]
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    def hangup() -> None:  # SIGHUP: the TLS certificate and the fleet file, read again
        if tls is not None:
            reload_tls(tls, config)
        if config.fleet_file:
            app.fleet.spawn(app.fleet_file.apply("SIGHUP"))

    if tls is not None or config.fleet_file:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, hangup)
    loops = [app.fleet.health_loop(), app.fleet.sync_loop(), app.fleet.board_loop(),
             app.tenants.usage_loop(), app.fleet_file.watch_loop()]
    if group is None:
        log_start(config, app.fleet, f"{'https' if tls else 'http'}://{format_host(host)}"
                                     f":{port}")
    else:
        log.info("worker %d (pid %d) serving", group.index, os.getpid())
        loops.append(app.observability.publish_loop(stop))
        group.announce()
    if ready is not None:
        ready(host, port)
    health = asyncio.gather(*loops)
    try:
        await stop.wait()
        log.info("draining: no new connections; %d requests in flight get up to %g s",
                 len(http_server.busy), config.drain_timeout)
        server.close()
        await http_server.drain(config.drain_timeout)
    finally:
        log.info("shutting down")
        health.cancel()
        server.close()
        for task in list(http_server.connections):
            task.cancel()
        await asyncio.gather(*http_server.connections, health, return_exceptions=True)
        await app.close()
        await loop.run_in_executor(None, store.shutdown)


def run(work: Coroutine[Any, Any, None], event_loop: str) -> None:
    """Runs ``work`` on uvloop when asked for or (auto) installed, else on asyncio's own
    loop. uvloop is optional: the balancer needs nothing outside the standard library."""
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                work.close()
                raise MissingDependency("uvloop", "EVENT_LOOP=uvloop") from None
        else:
            uvloop.run(work)
            return
    asyncio.run(work)


class LogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr, after the access-log lines of events before this record."""

    def emit(self, record: logging.LogRecord) -> None:
        for access in list(ACCESS_LOGS):
            access.flush()
        super().emit(record)


def log_to_stderr(config: Config, worker: int | None = None) -> None:
    """One line a record on stderr, each a worker's marked with its number (WORKERS=N)."""
    handler = LogHandler(sys.stderr)
    mark = "" if worker is None else f"[{worker}] "
    handler.setFormatter(JsonFormatter(worker) if config.log_format == "json" else
                         TextFormatter(f"%(asctime)s %(levelname)-7s {mark}%(message)s"))
    logging.basicConfig(level=config.log_level, handlers=[handler], force=True)


def serve_until_stopped(config: Config, group: WorkerGroup | None = None) -> int:
    """Runs serve() to its end: the exit status of the program, or of one worker."""
    try:
        run(serve(config, group=group), config.event_loop)
    except (StoreUnavailable, MissingDependency, ConfigError) as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.ip, config.port, exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


class Supervisor:
    """WORKERS=N: N worker processes serve one port (SO_REUSEPORT: the kernel spreads
    connections over them), each an instance on the one store (so they share each
    server's cap and learn each other's writes as separate instances do). The supervisor
    only forks and waits: it starts a worker again when one dies, and on SIGTERM or
    SIGINT passes SIGTERM on and waits while they drain."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # pid: (index, when it started: monotonic)
        self.workers: dict[int, tuple[int, float]] = {}
        #: pid: its files as last seen (names and mtimes, a token of change only), and
        #: when they were seen to change (monotonic: None before it ever wrote). A worker
        #: is judged on the supervisor's monotonic clock, never on file times, so that the
        #: wall clock jumping (an NTP step, a VM resumed) kills no worker.
        self.written: dict[int, tuple[frozenset[tuple[str, float]], float | None]] = {}
        self.hung: set[int] = set()  # killed for not writing: no word of them again
        self.due: dict[int, float] = {}  # index: when to start it again
        self.pause: dict[int, float] = {}  # index: the pause before its next start
        self.stopping_until: float | None = None  # SIGKILL what is left then
        self.ready = 0
        self.directory = ""

    def run(self) -> int:
        config = self.config
        if not (hasattr(os, "fork") and hasattr(socket, "SO_REUSEPORT")
                and sys.platform.startswith("linux")):
            raise ConfigError("WORKERS above 1 needs Linux (fork, and SO_REUSEPORT to "
                              "spread connections); run one process per port instead")
        log.info("ollamabalancer %s: store %s, %d workers", __version__,
                 config.describe_store(), config.workers)
        # Held (bound, never listening) while the group lives: PORT=0 gets one port for
        # every worker, and a worker started again finds its port still the group's.
        family, kind, _, _, address = socket.getaddrinfo(
            config.ip or None, config.port, type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind) as holder:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            holder.bind(address)
            self.config = config = dataclasses.replace(config,
                                                       port=holder.getsockname()[1])
            # The schema, its migrations and a new master key file, once, before any
            # worker could race another to them.
            open_store(config).close()
            try:
                group_directory = tempfile.TemporaryDirectory(prefix="ollamabalancer-")
            except OSError as exc:
                raise ConfigError(f"cannot make the workers' directory in "
                                  f"{tempfile.gettempdir()} (TMPDIR): {exc}") from None
            with group_directory as directory:
                return self.supervise(directory, holder)

    def supervise(self, directory: str, holder: socket.socket) -> int:
        self.directory = directory
        LoadBoard.create(board_path(directory), self.config.workers)
        wake_read, wake_write = os.pipe()
        ready_read, ready_write = os.pipe()
        os.set_blocking(wake_write, False)
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
        previous = {signum: signal.signal(signum, lambda *_: None) for signum in handled}
        old_wakeup = signal.set_wakeup_fd(wake_write)
        fds = (wake_read, wake_write, ready_read, ready_write, holder.fileno())

        def start(index: int) -> None:
            pid = os.fork()
            if pid:
                self.watch(pid, index)
                return
            status = 1
            try:  # the worker: none of the supervisor's plumbing but its ready pipe
                signal.set_wakeup_fd(-1)
                for signum, action in previous.items():
                    signal.signal(signum, action)
                for fd in fds:
                    if fd != ready_write:
                        os.close(fd)
                log_to_stderr(self.config, index)
                group = WorkerGroup(directory, os.getppid(), INSTANCE_MISSED_BEATS *
                                    self.config.sync_interval + 1, index, ready_write,
                                    self.config.workers)
                status = serve_until_stopped(self.config, group)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(status)

        try:
            for index in range(self.config.workers):
                start(index)
            while self.workers or self.stopping_until is None:
                self.wait(wake_read, ready_read)
                for index in [i for i, when in self.due.items() if when <= time.monotonic()]:
                    del self.due[index]
                    start(index)
            return 0
        finally:
            for pid in self.workers:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
            signal.set_wakeup_fd(old_wakeup)
            for signum, action in previous.items():
                signal.signal(signum, action)
            for fd in fds[:4]:
                os.close(fd)


    def wait(self, wake: int, ready: int) -> None:
        """Sleeps until a signal, a worker's word or a restart's time, and acts on it."""
        deadlines = [*self.due.values(), *filter(None, [self.stopping_until])]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 1.0
        readable, _, _ = select.select([wake, ready], [], [], min(timeout, 1.0))
        if ready in readable:
            before, self.ready = self.ready, self.ready + len(os.read(ready, 4096))
            if before < self.config.workers <= self.ready:
                log.info("listening on http://%s:%d (%d workers)", format_host(self.config.ip),
                         self.config.port, self.config.workers)
        if wake in readable:
            signals = os.read(wake, 4096)
            if self.stopping_until is None and (signal.SIGTERM in signals
                                                or signal.SIGINT in signals):
                log.info("draining: %d workers get up to %g s", len(self.workers),
                         self.config.drain_timeout)
                self.due.clear()
                self.stopping_until = time.monotonic() + self.config.drain_timeout + WORKER_GRACE
                self.kill(signal.SIGTERM)
        self.reap()
        if self.stopping_until is None:
            self.kill_hung()
        if self.stopping_until is not None and time.monotonic() >= self.stopping_until:
            log.warning("%d workers did not finish draining: killed", len(self.workers))
            self.kill(signal.SIGKILL)
            self.stopping_until = math.inf

    def watch(self, pid: int, index: int) -> None:
        """Counts ``pid`` as worker ``index``, started now."""
        self.workers[pid] = (index, time.monotonic())
        # A dead worker's file with the same pid is no word from this one.
        self.written[pid] = (self.file_marks().get(pid, frozenset()), None)

    def file_marks(self) -> dict[int, frozenset[tuple[str, float]]]:
        """Each running worker's files (its counts, written every beat), as names and
        modification times: they change when it writes."""
        marks: dict[int, set[tuple[str, float]]] = collections.defaultdict(set)
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.directory):
                match = re.fullmatch(r"worker-([0-9]+)-[0-9a-f]+\.json", entry.name)
                if match and int(match.group(1)) in self.workers:
                    with contextlib.suppress(OSError):
                        marks[int(match.group(1))].add((entry.name, entry.stat().st_mtime))
        return {pid: frozenset(found) for pid, found in marks.items()}

    def kill_hung(self) -> None:
        """Kills a worker whose file, once it wrote one, has not been written again for
        WORKER_HUNG_BEATS beats: alive but stuck. reap() then starts another."""
        limit, now = WORKER_HUNG_BEATS * self.config.sync_interval, time.monotonic()
        for pid, mark in self.file_marks().items():
            last, since = self.written.get(pid, (frozenset(), None))
            if mark != last:  # written since last seen (or for the first time)
                self.written[pid] = (mark, now)
            elif since is not None and now - since > limit and pid not in self.hung:
                log.error("worker %d (pid %d) has not written its counts for %.0f s: "
                          "stuck, killed", self.workers[pid][0], pid, now - since)
                self.hung.add(pid)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def kill(self, signum: int) -> None:
        for pid in self.workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signum)

    def restart_pause(self, index: int, lived: float) -> float:
        """The pause before worker ``index`` starts again, having lived ``lived`` seconds:
        twice the last one while it keeps dying young (WORKER_YOUNG), up to the most of
        WORKER_RESTART; the least again once it lived long."""
        least, most = WORKER_RESTART
        young = lived < WORKER_YOUNG
        pause = min(2 * self.pause.get(index, least / 2), most) if young else least
        self.pause[index] = pause
        return pause

    def reap(self) -> None:
        """Collects the workers that ended; outside a drain, each is started again after
        a pause that doubles while it keeps dying young."""
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            index, started = self.workers.pop(pid)
            self.hung.discard(pid)
            self.written.pop(pid, None)
            # What it had in flight is gone with it (its successor starts the row anew).
            LoadBoard.clear(board_path(self.directory), self.config.workers, index)
            if self.stopping_until is not None:
                continue
            pause = self.restart_pause(index, time.monotonic() - started)
            self.due[index] = time.monotonic() + pause
            code = os.waitstatus_to_exitcode(status)
            how = (f"was killed by {signal.Signals(-code).name}" if code < 0 else
                   f"exited with status {code}")
            log.warning("worker %d (pid %d) %s: starting it again in %g s", index, pid, how,
                        pause)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def rotate_secret(config: Config, new_key_file: str) -> int:
    """``rotate-secret --new-key-file F``: re-encrypts every stored secret with the key in
    F (made, 0600, if F does not exist), then checks that it reads back."""
    store = open_store(config)
    try:
        if not os.path.exists(new_key_file):
            write_key_file(new_key_file, secrets.token_hex(32).encode())
        master = load_master_key(dataclasses.replace(config, secret_key="",
                                                     secret_key_file=new_key_file))
        count = store.rotate_secrets(*new_sealing(master))
        store.unlock(master)
        store.list_proxies()
        store.list_servers()
    finally:
        store.close()
    print(f"re-encrypted {count} secrets with the key in {new_key_file}; start the balancer "
          f"with SECRET_KEY_FILE={new_key_file} from now on")
    return 0


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r]
                                          for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


def cli_servers(config: Config, store: Store, args: argparse.Namespace) -> int:
    if args.action == "add":
        body = _drop_none({"url": args.url, "name": args.name, "proxyId": args.proxy,
                           "weight": args.weight, "maxConcurrency": args.max_concurrency})
        values = parse_server_body(body, partial=False)
        if values.get("proxy_id") and values["proxy_id"] not in {
                p.id for p in store.list_proxies()}:
            raise HTTPError(400, f"no proxy with id {values['proxy_id']}")
        try:
            server_id = store.add_server(values)
        except Conflict:
            raise HTTPError(409, f"a server at {values['host']}:{values['port']} "
                                 "already exists") from None
        print(f"added server {server_id}; a running balancer picks it up at its next check")
        sys.stdout.flush()
        problem = asyncio.run(cli_reach(config, server_id))
        if problem is not None:
            print(f"warning: {problem}", file=sys.stderr)
    elif args.action == "remove":
        if not store.delete_server(args.id):
            raise HTTPError(404, f"no server with id {args.id}")
        print(f"removed server {args.id}")
    else:
        print_table(("ID", "NAME", "URL", "PROXY", "ENABLED", "WEIGHT", "CAP", "MODELS",
                     "LAST CHECKED"),
                    [(s.id, s.name, f"{s.scheme}://{format_host(s.host)}:{s.port}",
                      s.proxy_id, "yes" if s.enabled else "no", f"{s.weight:g}",
                      s.max_concurrency, len(s.models), iso_time(s.last_checked))
                     for s in store.list_servers()])
    return 0


def cli_proxies(config: Config, store: Store, args: argparse.Namespace) -> int:
    if args.action == "add":
        parts = urllib.parse.urlsplit(args.url)
        try:
            port = parts.port
        except ValueError:
            raise HTTPError(400, "the proxy URL has a bad port") from None
        if not parts.hostname or port is None:
            raise HTTPError(400, "give the proxy as protocol://[user:password@]host:port")
        password = urllib.parse.unquote(parts.password) if parts.password else None
        if password is not None:
            log.warning("the proxy password was given on the command line, where every "
                        "user of this host can read it (ps): use --password-file instead")
        if args.password_file:
            password = read_secret_file(args.password_file, "--password-file")
        body = _drop_none({
            "ip": parts.hostname, "port": port, "protocol": parts.scheme,
            "name": args.name or f"{parts.hostname}:{port}",
            "userName": urllib.parse.unquote(parts.username) if parts.username else None,
            "password": password})
        proxy_id = store.add_proxy(parse_proxy_body(body, partial=False))
        print(f"added proxy {proxy_id}")
    elif args.action == "remove":
        users = [s.id for s in store.list_servers() if s.proxy_id == args.id]
        if users:
            raise HTTPError(409, f"proxy {args.id} is used by servers "
                                 f"{', '.join(map(str, users))}")
        if not store.delete_proxy(args.id):
            raise HTTPError(404, f"no proxy with id {args.id}")
        print(f"removed proxy {args.id}")
    else:
        print_table(("ID", "NAME", "PROTOCOL", "ADDRESS", "USER", "PASSWORD", "ENABLED"),
                    [(p.id, p.name, p.protocol, f"{format_host(p.ip)}:{p.port}", p.user_name,
                      "set" if p.password else None, "yes" if p.status else "no")
                     for p in store.list_proxies()])
    return 0


def cli_apply(config: Config, store: Store, args: argparse.Namespace) -> int:
    """``apply FILE [--dry-run]``: what a fleet file changes in the store's servers (and
    its model policy), done unless --dry-run; exit 2 when the file is refused."""
    try:
        policy = read_fleet_file(args.file)
    except ConfigError as exc:
        raise HTTPError(400, f"{args.file} refused: {exc}") from None
    changes = plan_servers(policy, store.list_servers())
    for change in changes:
        print(f"{'would ' if args.dry_run else ''}{change}")
        if args.dry_run:
            continue
        if change.action == "add":
            store.add_server(change.values)
        elif change.action == "change" and change.server_id is not None:
            store.update_server(change.server_id, change.values)
        elif change.server_id is not None:
            store.delete_server(change.server_id)
    if not changes:
        print("no server changes")
    for name, model in sorted(policy.models.items()):
        print(f"model {name}: " + ", ".join(f"{k} {v}" for k, v in model.to_json().items()
                                             if v))
    return 0


def cli_keys(config: Config, store: Store, args: argparse.Namespace) -> int:
    """``keys add|list|set|remove|usage``: client API keys, on the store itself (a running
    balancer sees a change within SYNC_INTERVAL, as one made through the API)."""
    if args.action in ("add", "set"):
        body: dict[str, Any] = _drop_none({
            "name": args.name, "requestsPerMinute": args.requests_per_minute,
            "maxConcurrent": args.max_concurrent, "tokensPerDay": args.tokens_per_day,
            "weight": args.weight, "priority": args.priority, "models": args.models})
        if args.action == "set" and args.all_models:
            body["models"] = None
        values = parse_key_body(body, partial=args.action == "set")
        if args.action == "add":
            key, values["key_hash"] = new_api_key()
            key_id = store.add_key(values)
            print(f"added API key {key_id}: {key}\n(shown this once: only its hash is kept)")
        elif not store.update_key(args.id, values):
            raise HTTPError(404, f"no API key with id {args.id}")
        else:
            print(f"changed API key {args.id}")
    elif args.action == "remove":
        if not store.delete_key(args.id):
            raise HTTPError(404, f"no API key with id {args.id}")
        print(f"removed API key {args.id}")
    elif args.action == "usage":
        if not store.list_keys([args.id]):
            raise HTTPError(404, f"no API key with id {args.id}")
        print_table(("DAY (UTC)", "MODEL", "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS"),
                    store.usage_of(args.id))
    else:
        print_table(("ID", "NAME", "MODELS", "TOKENS/DAY", "WEIGHT", "PRIORITY", "REQ/MIN",
                     "CONCURRENT", "LAST USED"),
                    [(k.id, k.name, "all" if k.models is None else ", ".join(k.models),
                      k.tokens_per_day, f"{k.weight:g}", k.priority, k.requests_per_minute,
                      k.max_concurrent, iso_time(k.last_used_at)) for k in store.list_keys()])
    return 0


@contextlib.asynccontextmanager
async def balancer_once(config: Config) -> AsyncIterator[Balancer]:
    """The balancer's own machinery over the store, for one command, without serving."""
    loop = asyncio.get_running_loop()
    store = AsyncStore(await loop.run_in_executor(None, open_store, config), config.db_timeout)
    app = Balancer(config, store)
    try:
        await app.fleet.reload()
        yield app
    finally:
        await app.close()
        await loop.run_in_executor(None, store.shutdown)


async def cli_reach(config: Config, server_id: int) -> str | None:
    """Why the server cannot be reached now, through its proxy; None if it answers."""
    async with balancer_once(config) as app:
        server = app.fleet.server(server_id)
        assert server is not None  # the command found it in the store
        await app.fleet.check_server(server)
        return None if server.reachable else (
            f"server {server.id} ({server.label}) is not reachable now: {server.last_error}")


async def cli_fleet(config: Config, args: argparse.Namespace) -> int:
    """``check`` and ``models pull``: the balancer's own machinery, run once."""
    async with balancer_once(config) as app:
        fleet = app.fleet
        if args.command == "check":
            rows = []
            for server in fleet.every_server():
                started = time.monotonic()
                await fleet.check_server(server)
                rows.append((server.id, server.name, f"{server.scheme}://"
                             f"{format_host(server.host)}:{server.port}", server.proxy_id,
                             "yes" if server.reachable else "NO",
                             f"{(time.monotonic() - started) * 1000:.0f} ms",
                             ", ".join(sorted(server.model_names)) if server.reachable
                             else server.last_error))
            print_table(("ID", "NAME", "URL", "PROXY", "UP", "LATENCY", "MODELS / ERROR"), rows)
            return 0 if all(row[4] == "yes" for row in rows) else 1
        await fleet.check_all()
        payload: dict[str, Any] = {"model": args.name}
        if args.servers:
            payload["servers"] = args.servers
        skipped = app.fan_out.skipped(payload)
        targets = app.fan_out.targets(payload)
        body = json.dumps({**payload, "stream": True}).encode()
        bars = ProgressBars([s.label for s in targets])
        final: dict[str, Any] = {}
        async for line in app.fan_out.merged_progress(targets, "/api/pull", body, args.name,
                                                      skipped):
            if "server" in line:
                bars.update(line)
            else:
                final = line
        bars.close()
        if "error" in final:
            print(f"error: {final['error']}", file=sys.stderr)
            return 1
        print(f"pulled {args.name} on {len(targets)} servers")
        if skipped:
            print(f"warning: skipped, being down: {', '.join(skipped)}", file=sys.stderr)
        return 0


class ProgressBars:
    """One progress bar per server, redrawn in place on a terminal; elsewhere a line each
    time a server's status changes."""

    WIDTH = 30

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.state = {label: ("waiting", 0, 0) for label in labels}
        self.tty = sys.stdout.isatty()
        self.drawn = False
        self.pad = max(len(label) for label in labels) if labels else 0

    def update(self, line: dict[str, Any]) -> None:
        label = str(line["server"])
        status = str(line.get("outcome") or line.get("status") or "")
        if line.get("reason"):
            status = f"{status}: {line['reason']}"
        done = int(line.get("server_completed") or 0)
        total = int(line.get("server_total") or 0)
        previous = self.state.get(label, ("", 0, 0))
        if "outcome" in line or not total:
            done, total = previous[1], previous[2]
        self.state[label] = (status, done, total)
        if self.tty:
            self.draw()
        elif status != previous[0]:
            print(self.render(label), flush=True)

    def render(self, label: str) -> str:
        status, done, total = self.state[label]
        share = done / total if total else (1.0 if status == "done" else 0.0)
        filled = int(share * self.WIDTH)
        return (f"{label.ljust(self.pad)}  [{'#' * filled}{'-' * (self.WIDTH - filled)}] "
                f"{share:4.0%}  {status}")

    def draw(self) -> None:
        if self.drawn:
            sys.stdout.write(f"\x1b[{len(self.labels)}F")
        for label in self.labels:
            sys.stdout.write("\x1b[2K" + self.render(label) + "\n")
        sys.stdout.flush()
        self.drawn = True

    def close(self) -> None:
        if self.tty:
            self.draw()


def cli_status(config: Config, args: argparse.Namespace) -> int:
    """``status``: what the running balancer at IP:PORT says of its fleet, as ``ollama ps``
    shows a server's: each server, up or down and why, its models loaded, in flight; the
    queue. With ADMIN_TOKEN when one is set."""
    import urllib.error
    import urllib.request

    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(config.ip, config.ip)
    url = f"http://{format_host(host)}:{config.port}/servers/status"
    ask = urllib.request.Request(url, headers={"Accept": "application/json"})
    if config.admin_token:
        ask.add_header("Authorization", f"Bearer {config.admin_token}")
    try:
        with urllib.request.urlopen(ask, timeout=10) as answer:
            status = json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        error = upstream_error_message(exc.read()) or exc.reason
        print(f"error: {url} answered {exc.code}: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: no balancer answers at {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    rows = [("SERVER", "STATE", "IN FLIGHT", "LOADED")]
    for server in status["servers"]:
        state = ("disabled" if not server["enabled"] else "up" if server["reachable"]
                 else f"down: {server.get('lastError') or 'unreachable'}")
        if server.get("circuitOpen"):
            state += " (circuit open)"
        if server["enabled"] and server.get("draining"):
            state += ", draining" if server["inflight"] else ", drained"
        rows.append((server.get("name") or server["host"], state,
                     f"{server['inflight']}/{server['capacity']}",
                     ", ".join(server.get("loadedModels") or []) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
              + "  " + row[3])
    totals, queue = status["totals"], status["queue"]
    print(f"{totals['up']} of {totals['servers']} servers up; {totals['inflight']} in flight;"
          f" {queue['depth']} waiting (at most {queue['max']})")
    return 0


def run_cli(config: Config, args: argparse.Namespace) -> int:
    """The subcommands that work on the configured store without a running server."""
    try:
        if args.command == "status":
            return cli_status(config, args)
        if args.command in ("check", "models"):
            return asyncio.run(cli_fleet(config, args))
        store = open_store(config)
        try:
            command = {"servers": cli_servers, "proxies": cli_proxies, "keys": cli_keys,
                       "apply": cli_apply}[args.command]
            return command(config, store, args)
        finally:
            store.close()
    except HTTPError as exc:  # bad input (a 4xx) exits 2, as argparse does
        print(f"error: {exc.message}", file=sys.stderr)
        return 2 if exc.status < 500 else 1


def cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ollamabalancer", add_help=False)
    commands = parser.add_subparsers(dest="command", required=True)
    servers = commands.add_parser("servers", help="add, list or remove servers")
    server_actions = servers.add_subparsers(dest="action", required=True)
    add = server_actions.add_parser("add", help="add a server: servers add http://gpu1:11434")
    add.add_argument("url")
    add.add_argument("--name")
    add.add_argument("--proxy", type=int, help="the id of the proxy to reach it through")
    add.add_argument("--weight", type=float)
    add.add_argument("--max-concurrency", type=int)
    server_actions.add_parser("list", help="a table of the servers")
    remove = server_actions.add_parser("remove", help="remove a server by id")
    remove.add_argument("id", type=int)
    proxies = commands.add_parser("proxies", help="add, list or remove proxies")
    proxy_actions = proxies.add_subparsers(dest="action", required=True)
    add = proxy_actions.add_parser(
        "add", help="proxies add socks5://user@host:1080 --password-file FILE")
    add.add_argument("url")
    add.add_argument("--name")
    add.add_argument("--password-file", help="file holding the proxy's password (a password "
                     "in the URL shows in ps to every user of the host)")
    proxy_actions.add_parser("list", help="a table of the proxies (never their passwords)")
    remove = proxy_actions.add_parser("remove", help="remove a proxy by id")
    remove.add_argument("id", type=int)
    keys = commands.add_parser("keys", help="add, list, change or remove client API keys, "
                               "or see one's usage")
    key_actions = keys.add_subparsers(dest="action", required=True)
    for action, text in (("add", "keys add NAME [--models 'llama3*' ...]: a new key, shown "
                                 "once"), ("set", "keys set ID [...]: change a key")):
        key = key_actions.add_parser(action, help=text)
        key.add_argument("name" if action == "add" else "id",
                         type=str if action == "add" else int)
        if action == "set":
            key.add_argument("--name")
            key.add_argument("--all-models", action="store_true",
                             help="every model (clears --models)")
        key.add_argument("--models", nargs="+", help="the models it may use (* for any "
                         "characters); every model when left out")
        key.add_argument("--tokens-per-day", type=int, help="its UTC day's budget of tokens")
        key.add_argument("--weight", type=float, help="its share of a full fleet (default 1)")
        key.add_argument("--priority", choices=tuple(PRIORITY_LANES))
        key.add_argument("--requests-per-minute", type=int)
        key.add_argument("--max-concurrent", type=int)
    key_actions.add_parser("list", help="a table of the keys (never the keys)")
    for action, text in (("remove", "remove a key by id"),
                         ("usage", "a key's requests and tokens by UTC day and model")):
        key_actions.add_parser(action, help=text).add_argument("id", type=int)
    apply = commands.add_parser("apply", help="apply FILE [--dry-run]: make the servers "
                                "match a fleet file (say what would change)")
    apply.add_argument("file")
    apply.add_argument("--dry-run", action="store_true", help="say, do nothing")
    commands.add_parser("check", help="try every server through its proxy now")
    models = commands.add_parser("models", help="models pull NAME: on every server")
    model_actions = models.add_subparsers(dest="action", required=True)
    pull = model_actions.add_parser("pull", help="pull a model on every reachable server")
    pull.add_argument("name")
    pull.add_argument("--servers", nargs="+", help="only these server ids or names")
    status = commands.add_parser("status", help="the running balancer's fleet at a glance")
    status.add_argument("--json", action="store_true", help="its /servers/status, as JSON")
    return parser


CLI_COMMANDS = ("servers", "proxies", "keys", "apply", "check", "models", "status")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        print(f"ollamabalancer: error: unknown command {argv[0]!r}; the commands are "
              f"{', '.join(COMMANDS)} (see --help)", file=sys.stderr)
        return 2
    command = argv.pop(0) if argv and argv[0] in ("serve", "rotate-secret") else "serve"
    new_key_file = ""
    cli_args: argparse.Namespace | None = None
    if argv and argv[0] in CLI_COMMANDS:
        command = "cli"
        # The subcommand's own words come first; settings flags may follow them.
        cli_args, argv = cli_parser().parse_known_args(argv)
    if command == "rotate-secret":
        sub = argparse.ArgumentParser(prog="ollamabalancer rotate-secret", add_help=True)
        sub.add_argument("--new-key-file", required=True)
        known, argv = sub.parse_known_args(argv)
        new_key_file = known.new_key_file
    try:
        config = load_config(argv, dict(os.environ))
        config = with_admin_token(config)
    except ConfigError as exc:
        print(f"ollamabalancer: error: {exc}", file=sys.stderr)
        return 2
    log_to_stderr(config)
    for flag in config.secret_flags:
        setting = flag[2:].upper().replace("-", "_")
        log.warning("%s was given on the command line, where every user of this host can "
                    "read it (ps): use the %s environment variable or %s_FILE instead",
                    flag, setting, setting)
    if cli_args is not None:
        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
        try:
            return run_cli(config, cli_args)
        except (StoreUnavailable, MissingDependency, ConfigError) as exc:
            log.error("%s", exc)
            return 1
    if command == "rotate-secret":
        try:
            return rotate_secret(config, new_key_file)
        except (StoreUnavailable, MissingDependency, ConfigError, SecretError, OSError) as exc:
            log.error("rotation failed, nothing changed: %s", exc)
            return 1
    if config.workers == 1:
        return serve_until_stopped(config)
    try:
        return Supervisor(config).run()
    except (StoreUnavailable, MissingDependency, ConfigError) as exc:
        log.error("%s", exc)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.ip, config.port, exc)
    return 1


if __name__ == "__main__":
    sys.exit(main())
