"""A fake Ollama server for the tests, built on the standard library's http.server.

It is deliberately independent of ollamabalancer's own HTTP code, so a bug there cannot
hide itself. It speaks enough of Ollama's API for the official client (tags, chat,
generate, embed, NDJSON and SSE streaming) plus test-only paths:

    POST /echo             answers the request body byte for byte, headers in X-Echo-*
    ANY  /status/<code>    answers that status with an Ollama-shaped error
    GET  /gated?n=N        streams N chunks, each only after the test calls release()
    GET  /slow             streams a chunk every 50 ms until the client goes away
    GET  /hang             answers nothing, like a cold model load, until the client leaves
    GET  /die              sends two chunks, then drops the connection mid-stream
    GET  /hop              answers with hop-by-hop fields (Connection, Keep-Alive, ...)
    GET  /flood?mib=N      sends N MiB as fast as the socket takes them, counting in
                           ``flood_sent`` what it managed to write

Generation is deterministic, as a real model with a fixed seed: the answer to a
conversation is ``reply_text(prompt_key(messages))``, ``tokens`` words long, one word a
chunk. A chat whose last message is the assistant's is continued from that text (an
assistant prefill: the words after those it has), unless the model is in ``restarts``
(it answers anew, as a model whose template closes the last turn); /api/show says which,
through its template (``show_fields`` overrides it). ``options.num_predict`` and OpenAI's
``max_tokens`` bound the new words. A model in ``thinkers`` asked to ``think`` thinks
two chunks first. ``fault`` breaks the next answers: ``{"after": N, "kind": K,
"times": T}`` lets N chunks out, then ``die`` (the connection drops), ``crash`` (Ollama's
error line when a runner dies; a 500 when not streamed) or ``stall`` (nothing more for
``stall_seconds``); with ``"fresh_only": true`` it spares a continuation (a chat that ends
with an assistant message); ``faults`` counts those that happened.

Knobs: ``fail_status`` makes model requests answer that status; ``pull_error`` makes a pull
fail halfway, ``pull_delay`` start its layer that many seconds late; a body with
``"fake_hold": true`` waits for release(); ``"fake_sleep": s``
sleeps first; ``"fake_die": true`` drops the connection after the first token.
``loaded`` is what /api/ps reports; ``blobs`` what /api/blobs has. ``max_loaded`` and
``parallel`` make chats and generates load their model as Ollama does (the least recently
used idle model evicted when ``max_loaded`` are loaded, a wait while none is idle) and
run ``parallel`` at once per model, the rest waiting for a slot; tokens come
``token_delay`` seconds apart;
``missing_paths`` answer 404 with ``missing_answer`` (by default "404 page not found" in
plain text, as an Ollama too old to have them does).
"""

from __future__ import annotations

import hashlib
import json
import select
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: A chat template that leaves the last assistant message open (the library's templates
#: test ``$last``): a model with it continues a prefill.
CONTINUING_TEMPLATE = (
    "{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 -}}"
    "<|{{ .Role }}|>{{ .Content }}{{ if not $last }}<|end|>{{ end }}{{ end }}"
    "{{ if ne (index .Messages (sub (len .Messages) 1)).Role \"assistant\" }}<|assistant|>"
    "{{ end }}")


def prompt_key(messages: list[dict[str, Any]]) -> str:
    """What an answer depends on: the conversation before a final assistant message."""
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in messages)


def generate_messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    """/api/generate's prompt as the chat Ollama renders it through the same template."""
    messages = [{"role": "system", "content": request["system"]}] if request.get(
        "system") else []
    return [*messages, {"role": "user", "content": request.get("prompt", "")}]


def reply_words(key: str, count: int = 5) -> list[str]:
    """The words a model answers ``key`` with, each a chunk ("abc0 ", "abc1 ", ...)."""
    stem = "".join(chr(97 + b % 26) for b in hashlib.sha256(key.encode()).digest()[:3])
    return [f"{stem}{i} " for i in range(count)]


def reply_text(messages: list[dict[str, Any]], count: int = 5) -> str:
    """The whole answer to a chat of ``messages``, uninterrupted."""
    return "".join(reply_words(prompt_key(messages), count))


def tag(name: str, size: str = "8.0B") -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": "2026-11-01T10:00:00.000000000Z",
        "size": 4661224676,
        "digest": "a" * 64,
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": size,
            "quantization_level": "Q4_0",
        },
    }


class FakeOllama:
    def __init__(self, models: list[dict[str, Any]] | None = None, tokens: int = 5,
                 name: str = "fake") -> None:
        self.models = models if models is not None else [tag("llama3:latest")]
        self.tokens = tokens
        self.name = name
        self.loaded: list[str] = []
        self.blobs: dict[str, bytes] = {}
        self.fail_status: int | None = None
        self.missing_paths: set[str] = set()
        self.active = 0  # model requests being answered now (their knobs, sleep and hold)
        self.most_active = 0
        self.missing_answer = (b"404 page not found", "text/plain")
        self.pull_error: str | None = None
        self.pull_delay = 0.0
        self.tags_delay = 0.0  # seconds /api/tags (the health check) takes to answer
        self.max_loaded: int | None = None  # Ollama's OLLAMA_MAX_LOADED_MODELS, emulated
        self.parallel: int | None = None  # Ollama's OLLAMA_NUM_PARALLEL, emulated
        self.token_delay = 0.005
        self.evictions = 0
        self.running: dict[str, int] = {}  # requests holding a loaded model, by model
        self.scheduling = threading.Condition()
        self.version = "0.12.0"
        self.requests: list[dict[str, Any]] = []
        self.connections = 0
        self.flood_sent = 0
        self.fault: dict[str, Any] | None = None  # see the module's docstring
        self.faults = 0
        self.stall_seconds = 30.0
        self.restarts: set[str] = set()  # models that answer a prefill anew
        self.thinkers: set[str] = set()  # models that think first when asked to
        self.show_fields: dict[str, dict[str, Any]] = {}  # /api/show overrides, by model
        self.open_sockets: set[socket.socket] = set()
        self.gate = threading.Semaphore(0)
        self.disconnected = threading.Event()
        self.lock = threading.Lock()
        fake = self

        class Handler(_Handler):
            owner = fake

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # serve_forever notices shutdown() only between polls: 0.5 s by default, which
        # was most of a test's teardown.
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,),
                                       daemon=True)
        self.thread.start()

    def schedule(self, model: str, work: Any) -> None:
        """Runs ``work`` as Ollama would run a request for ``model``: once the model is
        loaded (evicting the least recently used idle one when ``max_loaded`` are) and
        one of its ``parallel`` slots is free."""
        full = model if ":" in model else f"{model}:latest"
        with self.scheduling:
            while True:
                if full in self.loaded:
                    if self.parallel is None or self.running.get(full, 0) < self.parallel:
                        break
                elif self.max_loaded is None or len(self.loaded) < self.max_loaded:
                    self.loaded.append(full)
                    break
                else:
                    idle = [m for m in self.loaded if not self.running.get(m)]
                    if idle:
                        self.loaded.remove(idle[0])  # the least recently used idle one
                        self.evictions += 1
                        continue
                self.scheduling.wait()
            self.running[full] = self.running.get(full, 0) + 1
            self.loaded.remove(full)
            self.loaded.append(full)  # the most recently used last
        try:
            work()
        finally:
            with self.scheduling:
                self.running[full] -= 1
                self.scheduling.notify_all()

    def release(self, count: int = 1) -> None:
        """Lets /gated send its next chunk, or ``count`` held requests answer."""
        for _ in range(count):
            self.gate.release()

    def model_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] not in ("/api/tags", "/api/ps",
                                                              "/api/version")]

    def has(self, name: str) -> bool:
        names = {m["name"] for m in self.models}
        return name in names or f"{name}:latest" in names

    def close(self) -> None:
        """Stops listening and drops every open connection, as a dying server would."""
        self.httpd.shutdown()
        self.httpd.server_close()
        with self.lock:
            for sock in self.open_sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Handler(BaseHTTPRequestHandler):
    owner: FakeOllama
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.owner.lock:
            self.owner.connections += 1
            self.owner.open_sockets.add(self.connection)

    def finish(self) -> None:
        super().finish()
        with self.owner.lock:
            self.owner.open_sockets.discard(self.connection)

    # -- helpers ---------------------------------------------------------------------

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.read(2)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def send(self, status: int, body: bytes, content_type: str = "application/json",
             headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, payload: Any) -> None:
        self.send(status, json.dumps(payload).encode())

    def start_chunked(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def client_gone(self, wait: float) -> bool:
        readable, _, _ = select.select([self.connection], [], [], wait)
        if not readable:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    # -- dispatch ----------------------------------------------------------------------

    def handle_any(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        body = self.read_body()
        record = {
            "method": self.command,
            "path": parts.path,
            "query": parts.query,
            "headers": dict(self.headers.items()),
            "header_list": list(self.headers.items()),
            "body": body,
            "peer": self.client_address[0],  # 127.0.0.3 or .4: through a test proxy
        }
        with self.owner.lock:
            self.owner.requests.append(record)
        path = parts.path
        if path in self.owner.missing_paths:
            self.send(404, *self.owner.missing_answer)
        elif path == "/" and self.command in ("GET", "HEAD"):
            self.send(200, b"Ollama is running", "text/plain; charset=utf-8")
        elif path == "/api/tags":
            time.sleep(self.owner.tags_delay)
            self.send_json(200, {"models": self.owner.models})
        elif path == "/api/version":
            self.send_json(200, {"version": self.owner.version})
        elif path == "/api/ps":
            expires = time.strftime("%Y-%m-%dT%H:%M:%S.123456789Z",
                                    time.gmtime(time.time() + 300))
            running = [dict(m, size_vram=m["size"], expires_at=expires, context_length=4096)
                       for m in self.owner.models if m["name"] in self.owner.loaded]
            self.send_json(200, {"models": running})
        elif self.model_request_fails(path, body):
            pass
        elif path in ("/api/chat", "/api/generate"):
            self.generate(path, json.loads(body or b"{}"))
        elif path == "/api/show":
            request = json.loads(body or b"{}")
            name = request.get("model") or request.get("name")
            if not self.owner.has(name):
                self.send_json(404, {"error": f"model '{name}' not found"})
            else:
                full = name if ":" in name else f"{name}:latest"
                template = "{{ .Prompt }}" if full in self.owner.restarts else (
                    CONTINUING_TEMPLATE)
                self.send_json(200, {"modelfile": f"FROM {name}", "parameters": "",
                                     "template": template,
                                     "details": tag(name)["details"],
                                     "model_info": {"general.architecture": "llama"},
                                     **self.owner.show_fields.get(full, {})})
        elif path == "/api/pull":
            self.pull(json.loads(body or b"{}"))
        elif path == "/api/create":
            self.create(json.loads(body or b"{}"))
        elif path == "/api/delete":
            name = json.loads(body or b"{}").get("model")
            if not self.owner.has(name):
                self.send_json(404, {"error": f"model '{name}' not found"})
            else:
                self.owner.models = [m for m in self.owner.models
                                     if m["name"] not in (name, f"{name}:latest")]
                self.send(200, b"")
        elif path == "/api/copy":
            request = json.loads(body or b"{}")
            if not self.owner.has(request["source"]):
                self.send_json(404, {"error": f"model '{request['source']}' not found"})
            else:
                self.owner.models.append(tag(request["destination"]))
                self.send(200, b"")
        elif path.startswith("/api/blobs/"):
            digest = path.rsplit("/", 1)[1].replace("-", ":")
            if self.command == "HEAD":
                self.send(200 if digest in self.owner.blobs else 404, b"")
            elif "sha256:" + hashlib.sha256(body).hexdigest() != digest:
                self.send_json(400, {"error": "digest mismatch"})
            else:
                self.owner.blobs[digest] = body
                self.send(201, b"")
        elif path == "/api/embed":
            request = json.loads(body or b"{}")
            count = len(request["input"]) if isinstance(request.get("input"), list) else 1
            self.send_json(200, {"model": request.get("model"),
                                 "embeddings": [[0.1, 0.2, 0.3]] * count})
        elif path == "/v1/chat/completions":
            self.openai_chat(json.loads(body or b"{}"))
        elif path == "/v1/embeddings":
            request = json.loads(body or b"{}")
            self.send_json(200, {"object": "list", "model": request.get("model"), "data": [
                {"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}]})
        elif path == "/echo":
            echoed = {f"X-Echo-{k}": v for k, v in self.headers.items()
                      if k.lower() in ("host", "x-forwarded-for", "x-custom", "connection",
                                       "keep-alive", "content-type")}
            self.send(200, body, "application/octet-stream",
                      {**echoed, "X-Echo-Query": parts.query or "-",
                       "X-Echo-Method": self.command, "X-Upstream": "fake"})
        elif path == "/hop":  # hop-by-hop fields a balancer must not pass on
            self.send(200, b"hop", "text/plain", {
                "Connection": "X-Hop-Only, keep-alive", "X-Hop-Only": "secret-of-this-hop",
                "Keep-Alive": "timeout=5", "Proxy-Authenticate": 'Basic realm="upstream"',
                "Proxy-Connection": "keep-alive", "Trailer": "X-Checksum", "Upgrade": "h2c",
                "TE": "trailers", "X-End-To-End": "kept"})
        elif path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            self.send_json(status, {"error": f"status {status} as asked"})
        elif path == "/gated":
            count = int(urllib.parse.parse_qs(parts.query).get("n", ["3"])[0])
            self.start_chunked("application/x-ndjson")
            for index in range(count):
                if not self.owner.gate.acquire(timeout=10):
                    self.close_connection = True
                    return
                self.chunk(json.dumps({"n": index}).encode() + b"\n")
            self.end_chunked()
        elif path == "/slow":
            self.start_chunked("application/x-ndjson")
            for index in range(400):
                if self.client_gone(0.05):
                    self.owner.disconnected.set()
                    self.close_connection = True
                    return
                try:
                    self.chunk(json.dumps({"n": index}).encode() + b"\n")
                except OSError:
                    self.owner.disconnected.set()
                    self.close_connection = True
                    return
            self.end_chunked()
        elif path == "/hang":  # a cold model load: no byte until the client leaves
            while not self.client_gone(0.05):
                pass
            self.owner.disconnected.set()
            self.close_connection = True
        elif path == "/flood":
            piece = b"x" * 65536
            total = int(urllib.parse.parse_qs(parts.query).get("mib", ["64"])[0]) * 16
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(total * len(piece)))
            self.end_headers()
            try:
                for _ in range(total):
                    self.wfile.write(piece)
                    self.owner.flood_sent += len(piece)
            except OSError:
                self.close_connection = True
        elif path == "/die":
            self.start_chunked("application/x-ndjson")
            self.chunk(b'{"response":"a","done":false}\n')
            self.chunk(b'{"response":"b","done":false}\n')
            self.wfile.flush()
            time.sleep(0.05)
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
        else:
            self.send_json(404, {"error": f"no fake route {path}"})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = handle_any

    def model_request_fails(self, path: str, body: bytes) -> bool:
        """Applies the test's knobs to model requests; True if it answered already."""
        if not path.startswith(("/api/chat", "/api/generate", "/api/embed", "/api/show",
                                "/v1/")):
            return False
        with self.owner.lock:
            self.owner.active += 1
            self.owner.most_active = max(self.owner.most_active, self.owner.active)
        try:
            return self._apply_knobs(body)
        finally:
            with self.owner.lock:
                self.owner.active -= 1

    def _apply_knobs(self, body: bytes) -> bool:
        request = json.loads(body or b"{}")
        if isinstance(request, dict):
            if request.get("fake_sleep"):
                time.sleep(float(request["fake_sleep"]))
            if request.get("fake_hold") and not self.owner.gate.acquire(timeout=30):
                self.send_json(500, {"error": "never released"})
                return True
        if self.owner.fail_status is not None:
            self.send_json(self.owner.fail_status, {"error": "server busy, please try again."
                                                    if self.owner.fail_status == 503 else
                                                    f"failing with {self.owner.fail_status}"})
            return True
        return False

    def pull(self, request: dict[str, Any]) -> None:
        name = request.get("model") or request.get("name")
        self.start_chunked("application/x-ndjson")
        self.chunk(b'{"status":"pulling manifest"}\n')
        time.sleep(self.owner.pull_delay)
        for done in (0, 500, 1000):
            self.chunk(json.dumps({"status": "pulling aaaa", "digest": "sha256:aaaa",
                                   "total": 1000, "completed": done}).encode() + b"\n")
            if done == 500 and self.owner.pull_error:
                self.chunk(json.dumps({"error": self.owner.pull_error}).encode() + b"\n")
                self.end_chunked()
                return
        if not self.owner.has(name):
            self.owner.models.append(tag(name if ":" in name else f"{name}:latest"))
        self.chunk(b'{"status":"success"}\n')
        self.end_chunked()

    def create(self, request: dict[str, Any]) -> None:
        missing = [d for d in (request.get("files") or {}).values() if d not in self.owner.blobs]
        if missing:
            self.send_json(400, {"error": f"blob {missing[0]} not found"})
            return
        self.start_chunked("application/x-ndjson")
        self.chunk(b'{"status":"using existing layer"}\n')
        self.owner.models.append(tag(request["model"]))
        self.chunk(b'{"status":"success"}\n')
        self.end_chunked()

    def generate(self, path: str, request: dict[str, Any]) -> None:
        model = request.get("model", "")
        if not self.owner.has(model):
            self.send_json(404, {"error": f"model '{model}' not found"})
            return
        if self.owner.max_loaded is not None or self.owner.parallel is not None:
            self.owner.schedule(model, lambda: self.answer(path, model, request))
        else:
            self.answer(path, model, request)

    def take_fault(self) -> dict[str, Any] | None:
        """The fault the next answer is to suffer, if any (used up ``times`` answers)."""
        with self.owner.lock:
            fault = self.owner.fault
            if fault is None:
                return None
            if fault.get("times", 1) <= 1:
                self.owner.fault = None
            else:
                fault["times"] -= 1
            return dict(fault)

    def plan(self, model: str, messages: list[dict[str, Any]], limit: Any, think: Any
             ) -> tuple[list[tuple[str, str]], str, int]:
        """An answer as (field, text) chunks, why it stopped, and its prompt's tokens."""
        full = model if ":" in model else f"{model}:latest"
        key = prompt_key(messages)
        words = reply_words(key, self.owner.tokens)
        last = messages[-1] if messages else {}
        prefill = last.get("content") if last.get("role") == "assistant" else None
        start = 0
        if prefill and full not in self.owner.restarts:
            start = min(len(str(prefill).split()), len(words))
        new = words[start:]
        reason = "stop"
        if isinstance(limit, int) and 0 <= limit < len(new):
            new, reason = new[:limit], "length"
        chunks = [("thinking", "hmm "), ("thinking", "yes ")] if (
            think and full in self.owner.thinkers and not start) else []
        return chunks + [("content", word) for word in new], reason, len(key.split())

    def suffer(self, fault: dict[str, Any], streamed: bool, error_line: bytes) -> None:
        """Breaks the answer under way as ``fault`` says."""
        with self.owner.lock:
            self.owner.faults += 1
        kind = fault["kind"]
        if kind == "crash":
            if streamed:
                self.chunk(error_line)
                self.end_chunked()
            else:
                self.send_json(500, {"error": "llama runner process has terminated: "
                                              "exit status 2"})
            return
        self.wfile.flush()
        if kind == "stall":
            deadline = time.monotonic() + self.owner.stall_seconds
            while time.monotonic() < deadline and not self.client_gone(0.05):
                pass
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def answer(self, path: str, model: str, request: dict[str, Any]) -> None:
        chat = path == "/api/chat"
        messages = (request.get("messages") or []) if chat else generate_messages(request)
        chunks, reason, prompt_tokens = self.plan(
            model, messages, (request.get("options") or {}).get("num_predict"),
            request.get("think"))
        prefilled = bool(messages) and messages[-1].get("role") == "assistant"
        fault = {"after": 1, "kind": "die"} if request.get("fake_die") else (
            None if prefilled and (self.owner.fault or {}).get("fresh_only") else
            self.take_fault())
        if fault is not None and fault["after"] > len(chunks):
            fault = None  # the answer ends before it
        content = "".join(text for field, text in chunks if field == "content")
        thinking = "".join(text for field, text in chunks if field == "thinking")

        def shaped(text: str, thought: str = "") -> dict[str, Any]:
            if chat:
                message = {"role": "assistant", "content": text}
                if thought:
                    message["thinking"] = thought
                return {"message": message}
            return {"response": text, **({"thinking": thought} if thought else {})}

        final = {"model": model, "created_at": "2026-11-26T10:00:00Z", **shaped(""),
                 "done": True, "done_reason": reason, "total_duration": 1000,
                 "prompt_eval_count": prompt_tokens, "eval_count": len(chunks)}
        if not chat:
            final["context"] = [1, 2, 3]
        if request.get("stream", True) is False:
            if fault is not None:
                self.suffer(fault, False, b"")
                return
            self.send_json(200, {**final, **shaped(content, thinking)})
            return
        self.start_chunked("application/x-ndjson")
        error_line = b'{"error":"llama runner process has terminated: exit status 2"}\n'
        for index, (field, text) in enumerate(chunks):
            if fault is not None and index == fault["after"]:
                self.suffer(fault, True, error_line)
                return
            line = {"model": model, "created_at": "2026-11-26T10:00:00Z",
                    **(shaped(text) if field == "content" else shaped("", text)),
                    "done": False}
            self.chunk(json.dumps(line).encode() + b"\n")
            time.sleep(self.owner.token_delay)
        if fault is not None:  # after every token, before the final line
            self.suffer(fault, True, error_line)
            return
        self.chunk(json.dumps(final).encode() + b"\n")
        self.end_chunked()

    def openai_chat(self, request: dict[str, Any]) -> None:
        model = request.get("model", "")
        limit = request.get("max_completion_tokens", request.get("max_tokens"))
        chunks, reason, prompt_tokens = self.plan(model, request.get("messages") or [],
                                                  limit, False)
        words = [text for _, text in chunks]
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                 "total_tokens": prompt_tokens + len(words)}
        ident = f"chatcmpl-{self.owner.port}"
        fault = self.take_fault()
        if fault is not None and fault["after"] > len(words):
            fault = None
        if not request.get("stream"):
            if fault is not None:
                self.suffer(fault, False, b"")
                return
            self.send_json(200, {"id": ident, "object": "chat.completion", "created": 1700000000,
                                 "model": model, "system_fingerprint": "fp_ollama",
                                 "choices": [{"index": 0, "finish_reason": reason, "message": {
                                     "role": "assistant", "content": "".join(words)}}],
                                 "usage": usage})
            return

        def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
            payload = {"id": ident, "object": "chat.completion.chunk", "created": 1700000000 +
                       self.owner.port, "model": model, "system_fingerprint": "fp_ollama",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        self.start_chunked("text/event-stream")
        # A runner that dies mid-stream shows as an empty chunk, then the end (Ollama's
        # OpenAI layer reads the error line as an empty answer).
        broken = event({"content": ""})
        for index, word in enumerate(words):
            if fault is not None and index == fault["after"]:
                self.suffer(fault, True, broken)
                return
            self.chunk(event({"role": "assistant", "content": word} if index == 0 else
                             {"content": word}))
            time.sleep(self.owner.token_delay)
        if fault is not None:
            self.suffer(fault, True, broken)
            return
        self.chunk(event({}, reason))
        if (request.get("stream_options") or {}).get("include_usage"):
            payload = {"id": ident, "object": "chat.completion.chunk", "created": 1700000000 +
                       self.owner.port, "model": model, "system_fingerprint": "fp_ollama",
                       "choices": [], "usage": usage}
            self.chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.chunk(b"data: [DONE]\n\n")
        self.end_chunked()
