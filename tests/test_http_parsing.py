"""The sans-IO HTTP/1.1 parser: whole, byte by byte, with trailing data, and its refusals."""

from __future__ import annotations

import inspect
import json
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ollamabalancer as ob

GOOD_HEAD = (
    b"POST /api/chat?x=1 HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json\r\n"
    b"X-Empty:\r\nContent-Length: 2\r\n\r\n"
)


def feed_bytewise(data: bytes) -> tuple[ob.RequestHead | None, bytearray]:
    buf = bytearray()
    head = None
    for index in range(len(data)):
        buf += data[index:index + 1]
        head = ob.maybe_request_head(buf)
        if head is not None:
            buf += data[index + 1:]
            break
    return head, buf


def test_request_head_parses_whole_and_leaves_trailing_bytes_untouched() -> None:
    buf = bytearray(GOOD_HEAD + b"{}GET / HTTP/1.1\r\n")
    head = ob.maybe_request_head(buf)
    assert head is not None
    assert (head.method, head.target, head.version) == ("POST", "/api/chat?x=1", "HTTP/1.1")
    assert head.headers.get("content-type") == "application/json"
    assert head.headers.get("X-EMPTY") == ""
    assert bytes(buf) == b"{}GET / HTTP/1.1\r\n"


def test_request_head_parses_byte_by_byte() -> None:
    head, rest = feed_bytewise(GOOD_HEAD + b"{}")
    assert head is not None and head.headers.get("host") == "lb"
    assert bytes(rest) == b"{}"


def test_incomplete_head_needs_more_data() -> None:
    buf = bytearray(GOOD_HEAD[:-1])
    assert ob.maybe_request_head(buf) is None
    assert bytes(buf) == GOOD_HEAD[:-1]


def test_leading_empty_lines_before_request_line_are_ignored() -> None:
    buf = bytearray(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
    head = ob.maybe_request_head(buf)
    assert head is not None and head.target == "/"


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, "request line too long"),
        (b"GET /" + b"a" * 9000, 414, "request line too long"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: " + b"b" * 70000 + b"\r\n\r\n", 431,
         "request head too large"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: b\r\n" * 100 + b"\r\n", 431,
         "too many header fields"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400,
         "obsolete line folding in header"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\tfolded\r\n\r\n", 400,
         "obsolete line folding in header"),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400, "malformed header line b'Host : a'"),
        (b"GET / HTTP/1.1\r\nBad Name: a\r\nHost: a\r\n\r\n", 400,
         "malformed header line b'Bad Name: a'"),
        (b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n", 400,
         "malformed header line b'Host: a\\x00b'"),
        (b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400,
         "malformed header line b'Host: a\\nX: b'"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: " + b"v" * 50 + b"\x01\r\n\r\n", 400,
         "malformed header line b'X-Long: " + "v" * 32 + "'"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "an HTTP/1.1 request needs exactly one Host header"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400,
         "an HTTP/1.1 request needs exactly one Host header"),
        (b"GET http://evil/ HTTP/1.1\r\nHost: a\r\n\r\n", 400,
         "request target must be an absolute path"),
        (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", 400,
         "request target must be an absolute path"),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400, "malformed request line"),
        (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "malformed request line"),
    ],
    ids=["long-line", "long-line-unfinished", "big-head", "many-headers", "obs-fold",
         "obs-fold-tab", "space-before-colon", "bad-name", "nul", "bare-lf", "quoted-40",
         "no-host", "two-hosts", "absolute-form", "asterisk-form", "http2", "double-space"],
)
def test_malformed_heads_are_refused_with_their_status(data: bytes, status: int,
                                                       message: str) -> None:
    with pytest.raises(ob.ProtocolError) as caught:
        ob.maybe_request_head(bytearray(data))
    assert (caught.value.status, str(caught.value)) == (status, message)
    assert caught.value.close


def refusal(parse: object, data: bytes) -> tuple[int, str]:
    with pytest.raises(ob.ProtocolError) as caught:
        parse(bytearray(data))  # type: ignore[operator]
    return caught.value.status, str(caught.value)


def test_each_limit_takes_exactly_its_size_and_refuses_one_byte_more() -> None:
    """MAX_REQUEST_LINE, MAX_HEAD and MAX_HEADERS at the edge, finished or still arriving."""
    def request_line(size: int) -> bytes:
        line = b"GET /" + b"a" * (size - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
        assert len(line) == size
        return line

    longest = request_line(ob.MAX_REQUEST_LINE)
    assert ob.maybe_request_head(bytearray(longest + b"\r\nHost: a\r\n\r\n")) is not None
    assert ob.maybe_request_head(bytearray(longest)) is None  # may still end in time
    assert ob.maybe_request_head(bytearray(longest + b"\r\n")) is None
    assert ob.maybe_request_head(bytearray(longest + b"\r")) is None  # the LF may follow
    too_long = request_line(ob.MAX_REQUEST_LINE + 1)
    for data in (too_long, too_long + b"\r\n", too_long + b"\r\nHost: a\r\n\r\n"):
        assert refusal(ob.maybe_request_head, data) == (414, "request line too long")

    def head(size: int, *, response: bool = False) -> bytes:
        start = b"HTTP/1.1 200 OK\r\nX: " if response else b"GET / HTTP/1.1\r\nHost: a\r\nX: "
        data = start + b"v" * (size - len(start))
        assert len(data) == size
        return data

    assert ob.maybe_request_head(bytearray(head(ob.MAX_HEAD) + b"\r\n\r\n")) is not None
    assert ob.maybe_request_head(bytearray(head(ob.MAX_HEAD))) is None
    assert refusal(ob.maybe_request_head, head(ob.MAX_HEAD + 1)) == (
        431, "request head too large")
    assert refusal(ob.maybe_request_head, head(ob.MAX_HEAD + 1) + b"\r\n\r\n") == (
        431, "request head too large")
    assert ob.maybe_response_head(bytearray(head(ob.MAX_HEAD, response=True) + b"\r\n\r\n"))
    assert ob.maybe_response_head(bytearray(head(ob.MAX_HEAD, response=True))) is None
    assert refusal(ob.maybe_response_head, head(ob.MAX_HEAD + 1, response=True)) == (
        502, "upstream response head too large")

    fields = b"GET / HTTP/1.1\r\n" + b"Host: a\r\n" + b"X: b\r\n" * (ob.MAX_HEADERS - 1)
    parsed = ob.maybe_request_head(bytearray(fields + b"\r\n"))
    assert parsed is not None and len(parsed.headers.fields) == ob.MAX_HEADERS
    assert refusal(ob.maybe_request_head, fields + b"X: b\r\n\r\n") == (
        431, "too many header fields")
    # With a bad line among them, the count is still what is refused first...
    assert refusal(ob.maybe_request_head, fields + b"X : b\r\n\r\n") == (
        431, "too many header fields")
    # ...and within the count, the bad line is.
    assert refusal(ob.maybe_request_head, fields[:-6] + b"X : b\r\n\r\n") == (
        400, "malformed header line b'X : b'")
    answer = b"HTTP/1.1 200 OK\r\n" + b"X: b\r\n" * (ob.MAX_HEADERS + 1) + b"\r\n"
    assert refusal(ob.maybe_response_head, answer) == (502, "too many header fields")
    assert refusal(ob.maybe_response_head, answer.replace(b"X: b\r\n\r\n", b"X :b\r\n\r\n")
                   ) == (502, "too many header fields")


def test_an_upstream_head_is_refused_in_its_own_words() -> None:
    for data, message in (
            (b"\r\n\r\n", "malformed upstream status line"),
            (b"HTTP/1.1 2000 OK\r\n\r\n", "malformed upstream status line"),
            (b"HTTP/1.1 200 OK\r\n folded\r\n\r\n", "obsolete line folding in header"),
            (b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", "malformed header line b'Bad Name: x'"),
            (b"HTTP/1.1 200 " + b"r" * ob.MAX_HEAD, "upstream status line too long"),
            (b"\r\n" + b"r" * ob.MAX_HEAD, "upstream response head too large")):
        assert refusal(ob.maybe_response_head, data) == (502, message), data[:30]


def test_a_head_without_fields_is_its_start_line_alone() -> None:
    request = ob.maybe_request_head(bytearray(b"GET /x HTTP/1.0\r\n\r\nrest"))
    assert request == ob.RequestHead("GET", "/x", "HTTP/1.0", ob.Headers(()))
    answer = ob.maybe_response_head(bytearray(b"HTTP/1.0 204\r\n\r\n"))
    assert answer == ob.ResponseHead("HTTP/1.0", 204, "", ob.Headers(()))


def test_fields_keep_their_order_names_and_values_without_surrounding_whitespace() -> None:
    head = ob.maybe_request_head(bytearray(
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Ray: \tXylophone X \t\r\nx-ray:second\r\n"
        b"Connection: X-Trace , close,,\r\n\r\n"))
    assert head is not None
    assert head.headers.fields == (("Host", "a"), ("X-Ray", "Xylophone X"),
                                   ("x-ray", "second"), ("Connection", "X-Trace , close,,"))
    assert head.headers.get("X-RAY") == "Xylophone X, second"
    assert head.headers.get_all("x-ray") == ["Xylophone X", "second"]
    assert head.headers.get("missing") is None and head.headers.get_all("missing") == ()
    assert head.headers.tokens("connection") == ["x-trace", "close"]
    assert head.headers.tokens("missing") == []
    assert head.headers == ob.Headers(head.headers.fields)
    assert head.headers != ob.Headers(head.headers.fields[:-1])
    assert head.headers != head.headers.fields  # only Headers equal Headers
    assert repr(ob.Headers((("A", "1"),))) == "Headers((('A', '1'),))"


def test_json_may_nest_128_levels_and_no_deeper() -> None:
    deepest = b"[" * ob.MAX_JSON_DEPTH + b"]" * ob.MAX_JSON_DEPTH
    assert ob.decode_json(deepest) == json.loads(deepest)
    mixed = b'{"a":' * 64 + b"[" * 64 + b"]" * 64 + b"}" * 64
    assert ob.decode_json(mixed) == json.loads(mixed)
    for deeper in (b"[" * 129 + b"]" * 129, b'{"a":' * 129 + b"1" + b"}" * 129,
                   b"[" * 129, b"{" * 129, b"[" * 200_000):
        with pytest.raises(ValueError) as caught:
            ob.decode_json(deeper)
        assert str(caught.value) == "nested deeper than 128 levels"
    # Deep enough only with what follows closings counted right, past a shallow count.
    exact = b"[[]," + b"[" * 127 + b"]" * 127 + b"]"  # 128 deep, 129 brackets
    assert ob.decode_json(exact) == json.loads(exact)
    for deeper in (b"[" + b"[]," * 10 + b"[" * 128 + b"]" * 128 + b"]",
                   b"[[" + b"[[]]" + b"," + b"[" * 127 + b"]" * 127 + b"]]"):
        with pytest.raises(ValueError, match=r"^nested deeper than 128 levels$"):
            ob.decode_json(deeper)
    # Many brackets, none deep: siblings, and brackets inside strings (escapes and all).
    siblings = b"[" + b",".join([b"[]", b"{}"] * 200) + b"]"
    assert ob.decode_json(siblings) == json.loads(siblings)
    quoted = json.dumps(["[" * 300, '\\"{' * 300, {"k": "}" * 10}]).encode()
    assert ob.decode_json(quoted) == json.loads(quoted)


def test_json_nesting_past_the_interpreter_stack_is_refused_in_words() -> None:
    """The backstop: json.loads running out of stack (shallower than 128 here)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 40)
    try:
        with pytest.raises(ValueError) as caught:
            ob.decode_json(b"[" * 100 + b"]" * 100)
    finally:
        sys.setrecursionlimit(limit)
    assert str(caught.value) == "nested deeper than 128 levels"


def head_with(*fields: str, version: str = "1.1") -> ob.RequestHead:
    lines = "".join(f"{f}\r\n" for f in fields)
    head = ob.maybe_request_head(bytearray(f"POST / HTTP/{version}\r\nHost: a\r\n{lines}\r\n"
                                           .encode()))
    assert head is not None
    return head


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        (["Content-Length: 3", "Transfer-Encoding: chunked"], 400,
         "Content-Length together with Transfer-Encoding"),
        (["Content-Length: 3", "Content-Length: 4"], 400, "more than one Content-Length"),
        (["Content-Length: 3", "Content-Length: 3"], 400, "more than one Content-Length"),
        (["Content-Length: 3, 3"], 400, "malformed Content-Length"),
        (["Content-Length: -1"], 400, "malformed Content-Length"),
        (["Content-Length: +5"], 400, "malformed Content-Length"),
        (["Content-Length: 9999999999999999999999"], 400, "malformed Content-Length"),
        (["Transfer-Encoding: gzip"], 501, "unsupported Transfer-Encoding gzip"),
        (["Transfer-Encoding: gzip, deflate"], 501,
         "unsupported Transfer-Encoding gzip, deflate"),
        (["Transfer-Encoding: gzip, chunked"], 501,
         "unsupported Transfer-Encoding gzip, chunked"),
        (["Transfer-Encoding: chunked, gzip"], 400,
         "chunked must be the last transfer coding, once"),
        (["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"], 400,
         "chunked must be the last transfer coding, once"),
        (["Transfer-Encoding: ,"], 400, "chunked must be the last transfer coding, once"),
    ],
)
def test_ambiguous_framing_is_refused(fields: list[str], status: int, message: str) -> None:
    with pytest.raises(ob.ProtocolError) as caught:
        ob.request_framing(head_with(*fields))
    assert (caught.value.status, str(caught.value)) == (status, message)


def test_transfer_encoding_in_http10_is_refused() -> None:
    with pytest.raises(ob.ProtocolError) as caught:
        ob.request_framing(head_with("Transfer-Encoding: chunked", version="1.0"))
    assert (caught.value.status, str(caught.value)) == (
        400, "Transfer-Encoding in an HTTP/1.0 request")


def test_framing_of_good_requests() -> None:
    assert ob.request_framing(head_with("Content-Length: 12")) == ob.Framing("length", 12)
    assert ob.request_framing(head_with("Transfer-Encoding: Chunked")) == ob.Framing("chunked")
    assert ob.request_framing(head_with()) == ob.NO_BODY


def decode_all(data: bytes, *, bytewise: bool) -> tuple[bytes, bytearray]:
    decoder = ob.ChunkedDecoder()
    buf = bytearray()
    body = bytearray()
    pieces = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
    for piece in pieces:
        buf += piece
        while True:
            event = decoder.next_event(buf)
            if event is ob.END_OF_BODY:
                return bytes(body), buf
            if event is None:
                break
            assert isinstance(event, bytes)
            body += event
    raise AssertionError("body not finished")


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "byte-by-byte"])
def test_chunked_body_decodes_and_leaves_the_next_request(bytewise: bool) -> None:
    data = b"4\r\nWiki\r\n5;name=val\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\nNEXT"
    if bytewise:
        decoder = ob.ChunkedDecoder()
        buf = bytearray()
        body = bytearray()
        done = False
        for index in range(len(data)):
            buf += data[index:index + 1]
            while not done:
                event = decoder.next_event(buf)
                if event is ob.END_OF_BODY:
                    done = True
                    buf += data[index + 1:]
                elif isinstance(event, bytes):
                    body += event
                else:
                    break
            if done:
                break
        assert bytes(body) == b"Wikipedia in\r\n\r\nchunks."
        assert bytes(buf) == b"NEXT"
    else:
        body, rest = decode_all(data, bytewise=False)
        assert body == b"Wikipedia in\r\n\r\nchunks."
        assert bytes(rest) == b"NEXT"


def test_response_head_and_framing() -> None:
    buf = bytearray(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n")
    head = ob.maybe_response_head(buf)
    assert head is not None and head.status == 200
    assert ob.response_framing(head, "GET") == ob.Framing("chunked")
    assert ob.response_framing(head, "HEAD") == ob.NO_BODY
    assert bytes(buf) == b"5\r\n"
    no_length = ob.maybe_response_head(bytearray(b"HTTP/1.0 200\r\n\r\n"))
    assert no_length is not None and no_length.reason == ""
    assert ob.response_framing(no_length, "GET") == ob.Framing("close")


@pytest.mark.parametrize(("status_line", "fields", "method", "framing"), [
    ("HTTP/1.1 200 OK", ["Content-Length: 10"], "GET", ob.Framing("length", 10)),
    ("HTTP/1.1 200 OK", ["Content-Length: 0"], "GET", ob.NO_BODY),
    ("HTTP/1.1 200 OK", [], "GET", ob.Framing("close")),
    ("HTTP/1.1 200 OK", ["Transfer-Encoding: gzip"], "GET", ob.Framing("close")),
    ("HTTP/1.1 200 OK", ["Transfer-Encoding: gzip, chunked"], "GET", ob.Framing("close")),
    ("HTTP/1.1 200 OK", ["Transfer-Encoding: Chunked"], "POST", ob.Framing("chunked")),
    ("HTTP/1.1 200 OK", ["Content-Length: 10"], "HEAD", ob.NO_BODY),
    ("HTTP/1.1 103 Early Hints", ["Content-Length: 10"], "GET", ob.NO_BODY),
    ("HTTP/1.1 204 No Content", ["Content-Length: 10"], "GET", ob.NO_BODY),
    ("HTTP/1.1 304 Not Modified", ["Content-Length: 10"], "GET", ob.NO_BODY),
    # Their neighbours have bodies.
    ("HTTP/1.1 205 Reset Content", ["Content-Length: 10"], "GET", ob.Framing("length", 10)),
    ("HTTP/1.1 305 Use Proxy", ["Content-Length: 10"], "GET", ob.Framing("length", 10)),
    ("HTTP/1.1 200 OK", ["content-length: 7"], "GET", ob.Framing("length", 7)),
])
def test_an_upstream_answer_is_framed_as_rfc_9112_says(
        status_line: str, fields: list[str], method: str, framing: ob.Framing) -> None:
    head = ob.maybe_response_head(bytearray(
        (status_line + "\r\n" + "".join(f + "\r\n" for f in fields) + "\r\n").encode()))
    assert head is not None
    assert ob.response_framing(head, method) == framing


@pytest.mark.parametrize(("fields", "message"), [
    (["Content-Length: 1", "Transfer-Encoding: chunked"],
     "upstream sent Content-Length with Transfer-Encoding"),
    (["Content-Length: 1", "Content-Length: 2"], "more than one Content-Length"),
    (["Content-Length: x"], "malformed Content-Length"),
])
def test_an_upstream_answer_framed_two_ways_is_refused(fields: list[str], message: str) -> None:
    head = ob.maybe_response_head(bytearray(
        ("HTTP/1.1 200 OK\r\n" + "".join(f + "\r\n" for f in fields) + "\r\n").encode()))
    assert head is not None
    with pytest.raises(ob.ProtocolError) as caught:
        ob.response_framing(head, "GET")
    assert (caught.value.status, str(caught.value)) == (502, message)


@pytest.mark.parametrize(
    ("path", "bad"),
    [("/api/tags", False), ("/a/../b", True), ("/a/%2e%2e/b", True), ("/a/%2E%2e", True),
     ("/a/..%2fb", True), ("/a/..%5cb", True), ("/a/...", False), ("/a/..b", False),
     ("/%252e%252e/", False)],
)
def test_dot_dot_segments_are_found_also_percent_encoded(path: str, bad: bool) -> None:
    assert ob.has_dot_dot_segment(path) is bad


@pytest.mark.parametrize(
    ("text", "billions"),
    [("8.0B", 8.0), ("137M", 0.137), ("70B", 70.0), ("1.5T", 1500.0), ("22.5k", 22.5e-6),
     ("", None), ("big", None), (None, None)],
)
def test_parameter_size_is_read_in_billions(text: object, billions: float | None) -> None:
    result = ob.parameter_billions(text)
    if billions is None:
        assert result is None
    else:
        assert result == pytest.approx(billions)


def test_model_names_default_to_latest_tag() -> None:
    assert ob.canonical_model("llama3") == "llama3:latest"
    assert ob.canonical_model("llama3:8b") == "llama3:8b"
    assert ob.canonical_model("registry:5000/ns/model") == "registry:5000/ns/model:latest"


def test_server_qualifies_needs_every_model_and_the_size_among_them() -> None:
    from fakeollama import tag

    server = ob.Server(1, "h", 1, models=[tag("llama3:latest", "8.0B"),
                                          tag("tiny:latest", "137M")])
    assert ob.server_qualifies(server, ["llama3"], None)
    assert ob.server_qualifies(server, ["llama3", "tiny:latest"], None)
    assert not ob.server_qualifies(server, ["llama3", "mistral"], None)
    assert ob.server_qualifies(server, [], 8)
    assert not ob.server_qualifies(server, [], 9)
    assert ob.server_qualifies(server, ["tiny"], 0.1)
    assert not ob.server_qualifies(server, ["tiny"], 1)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=40), max_size=6), st.booleans(),
       st.booleans(), st.lists(st.integers(1, 9), min_size=1, max_size=60))
def test_a_chunked_body_relayed_as_it_came_keeps_its_bytes_however_it_arrives(
        pieces: list[bytes], extensions: bool, trailer: bool, splits: list[int]) -> None:
    """The relay's scanner passes chunks through untouched (extensions too), finds the
    last chunk, drops the trailers and leaves what follows the body in the buffer."""
    body = b"".join(b"%x%s\r\n%s\r\n" % (len(p), b";a=b" if extensions else b"", p)
                    for p in pieces)
    wire = body + b"0\r\n" + (b"X-Trailer: 1\r\n" if trailer else b"") + b"\r\nNEXT"
    scanner, buf, out, data = ob.ChunkedScanner(), bytearray(), bytearray(), bytearray()
    sent, ended, step = 0, False, 0
    while not ended:
        size = splits[step % len(splits)]
        step += 1
        buf += wire[sent:sent + size]
        sent += size
        checked, ended, spans = scanner.take(buf)
        out += checked
        for start, stop in spans:
            data += checked[start:stop]
        assert ended or sent < len(wire)
    assert bytes(out) == body
    assert bytes(data) == b"".join(pieces)
    assert bytes(buf) + wire[sent:] == b"NEXT"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=6), st.booleans())
def test_a_stream_whose_reads_are_whole_chunks_is_relayed_a_chunk_a_read(
        pieces: list[bytes], extensions: bool) -> None:
    """A token of a stream arrives as one whole chunk a read (the scanner's shortcut):
    each read goes on at once, whole, with its data found, and the body ends as one
    that came any other way."""
    chunks = [b"%x%s\r\n%s\r\n" % (len(p), b";a=b" if extensions else b"", p)
              for p in pieces]
    scanner, buf = ob.ChunkedScanner(), bytearray()
    for piece, one in zip(pieces, chunks, strict=True):
        buf += one
        checked, ended, spans = scanner.take(buf)
        assert (checked, ended, buf) == (one, False, bytearray())
        assert [checked[start:stop] for start, stop in spans] == [piece]
    buf += b"0\r\n\r\nNEXT"
    assert scanner.take(buf) == (b"", True, [])
    assert buf == bytearray(b"NEXT")


@pytest.mark.parametrize(("wire", "message"), [
    (b"zz\r\n", "malformed chunk size"),
    (b"3\r\nabcX", "chunk data not followed by CRLF"),
    (b"3\r\nabc\rX", "chunk data not followed by CRLF"),
    (b"3\r\nabcX\n", "chunk data not followed by CRLF"),
    (b"1\r\na\r\n0\r\nBad Trailer\r\n\r\n", "malformed header line b'Bad Trailer'"),
    (b"1" * (ob.MAX_CHUNK_LINE + 10), "chunk size line too long")])
def test_the_relay_scanner_refuses_a_broken_chunked_body(wire: bytes, message: str) -> None:
    with pytest.raises(ob.ProtocolError) as caught:
        ob.ChunkedScanner().take(bytearray(wire))
    assert (caught.value.status, str(caught.value)) == (502, message)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"0x3\r\nabc\r\n0\r\n\r\n", "malformed chunk size"),
        (b"+3\r\nabc\r\n0\r\n\r\n", "malformed chunk size"),
        (b"1_0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n", "malformed chunk size"),
        (b"-3\r\nabc\r\n0\r\n\r\n", "malformed chunk size"),
        (b"00000000000000000003\r\nabc\r\n0\r\n\r\n", "malformed chunk size"),
        (b" 3\r\nabc\r\n0\r\n\r\n", "malformed chunk size"),
        # proxy.py's bug: the CRLF after data unchecked
        (b"3\r\nxxx__1\r\na\r\n0\r\n\r\n", "chunk data not followed by CRLF"),
        (b"3\nabc\r\n0\r\n\r\n", "malformed chunk size"),
        (b"3\r\nabc\n0\r\n\r\n", "chunk data not followed by CRLF"),
        (b"3\r\nabc\rX0\r\n\r\n", "chunk data not followed by CRLF"),
        (b"\r\n", "malformed chunk size"),
        (b"3\r\nabc\r\n0\r\nBad Trailer\r\n\r\n", "malformed header line b'Bad Trailer'"),
        (b"3\r\nabc\r\n0\r\nX: " + b"t" * ob.MAX_HEAD, "trailer section too large"),
    ],
    ids=["0x", "plus", "underscore", "negative", "20-digits", "leading-space",
         "no-crlf-after-data", "bare-lf-size", "bare-lf-data", "cr-then-junk", "empty-size",
         "bad-trailer", "endless-trailer"],
)
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "byte-by-byte"])
def test_malformed_chunked_bodies_are_refused(data: bytes, message: str,
                                              bytewise: bool) -> None:
    with pytest.raises(ob.ProtocolError) as caught:
        decode_all(data, bytewise=bytewise)
    assert (caught.value.status, str(caught.value)) == (400, message)


def test_a_chunk_size_line_may_take_max_chunk_line_bytes_and_no_more() -> None:
    longest = b"1;" + b"e" * (ob.MAX_CHUNK_LINE - 2)  # a size and an extension
    checked, ended, spans = ob.ChunkedScanner().take(bytearray(longest + b"\r\nx\r\n0\r\n\r\n"))
    assert ended and [checked[a:b] for a, b in spans] == [b"x"]
    assert ob.ChunkedScanner().take(bytearray(longest)) == (b"", False, [])  # may end yet
    # Counted from where the line starts, after what came before it in the buffer.
    after_a_chunk = bytearray(b"1\r\na\r\n" + longest)
    checked, ended, _ = ob.ChunkedScanner().take(after_a_chunk)
    assert (checked, ended, bytes(after_a_chunk)) == (b"1\r\na\r\n", False, longest)
    # Its CR may come alone, the LF in the next read.
    assert ob.ChunkedScanner().take(bytearray(longest + b"\r")) == (b"", False, [])
    bad = b"z" * ob.MAX_CHUNK_LINE  # as long as may be, and no size: bad, not unfinished
    with pytest.raises(ob.ProtocolError, match=r"^malformed chunk size$"):
        ob.ChunkedScanner().take(bytearray(bad + b"\r\n"))
    for data in (longest + b"e", longest + b"\re", longest + b"e\r\nx\r\n0\r\n\r\n"):
        with pytest.raises(ob.ProtocolError) as caught:
            ob.ChunkedScanner().take(bytearray(data))
        assert str(caught.value) == "chunk size line too long"


def test_a_trailer_section_may_take_max_head_bytes_and_no_more() -> None:
    def trailers(size: int) -> bytes:
        lines, left = [], size
        while left:
            line = b"X: " + b"t" * min(1000, left - 5)  # and its CRLF: left - 5 + 5
            lines.append(line + b"\r\n")
            left -= len(line) + 2
        assert sum(map(len, lines)) == size
        return b"".join(lines)

    exact = trailers(ob.MAX_HEAD)
    body = b"1\r\na\r\n0\r\n"
    assert decode_all(body + exact + b"\r\nNEXT", bytewise=False) == (b"a", bytearray(b"NEXT"))
    over = exact[:-2] + b"t\r\n"
    with pytest.raises(ob.ProtocolError) as caught:
        decode_all(body + over + b"\r\n", bytewise=False)
    assert str(caught.value) == "trailer section too large"


def test_a_body_of_many_chunks_is_taken_a_slice_at_a_time() -> None:
    chunks = b"".join(b"1\r\n%c\r\n" % letter for letter in b"abcde")
    buf = bytearray(chunks + b"0\r\n\r\n")
    scanner = ob.ChunkedScanner()
    checked, ended, spans = scanner.take(buf, max_chunks=2)
    assert (checked, ended) == (b"1\r\na\r\n1\r\nb\r\n", False)
    assert [checked[a:b] for a, b in spans] == [b"a", b"b"]
    checked, ended, _ = scanner.take(buf)  # no limit: the rest at once
    assert (checked, ended, bytes(buf)) == (b"1\r\nc\r\n1\r\nd\r\n1\r\ne\r\n", True, b"")
    assert ob.ChunkedDecoder().next_event(bytearray(chunks + b"0\r\n\r\n")) == b"abcde"
    decoder = ob.ChunkedDecoder()
    buf = bytearray(chunks + b"0\r\n\r\n")
    assert decoder.next_event(buf, 3) == b"abc"
    assert decoder.next_event(buf, 3) == b"de"
    assert decoder.next_event(buf, 3) is ob.END_OF_BODY
