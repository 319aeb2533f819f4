"""Reading a body off a connection, in-process and on a clock the test controls: how long
each wait may be, when a slow body is cut, and what is left for the next request."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import ollamabalancer as ob


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now


class ScriptedWire:
    """What iter_body reads: ``buf``, ``loop.time()`` and ``fill(timeout)``. Each fill
    appends the next scripted piece (None: the peer closed) after ``pace`` seconds."""

    def __init__(self, pieces: list[bytes | None], pace: float = 0.0) -> None:
        self.buf = bytearray()
        self.loop = Clock()
        self.pieces = list(pieces)
        self.pace = pace
        self.waits: list[float] = []

    async def fill(self, timeout: float) -> bool:
        self.waits.append(timeout)
        self.loop.now += self.pace
        piece = self.pieces.pop(0) if self.pieces else None
        if piece is None:
            return False
        self.buf += piece
        return True


def read(wire: ScriptedWire, framing: ob.Framing, **limits: Any) -> list[bytes]:
    async def main() -> list[bytes]:
        return [piece async for piece in ob.iter_body(wire, framing, **limits)]  # type: ignore[arg-type]
    return asyncio.run(main())


def test_without_a_rate_each_wait_gets_the_whole_timeout() -> None:
    wire = ScriptedWire([b"ab", b"cd", b"e"], pace=4.0)
    assert read(wire, ob.Framing("length", 5), timeout=5.0, error_status=400) == [
        b"ab", b"cd", b"e"]
    assert wire.waits == [5.0, 5.0, 5.0]  # 12 s in all, but no wait over 5 s


def test_with_a_rate_the_whole_body_has_its_timeout_plus_a_second_per_rate_received() -> None:
    wire = ScriptedWire([b"x" * 3000, b"x" * 1000, b"x" * 1000], pace=1.5)
    started = wire.loop.now - 1.0  # its head came a second ago
    pieces = read(wire, ob.Framing("length", 5000), timeout=2.0, error_status=400,
                  min_rate=1000.0, started=started)
    assert b"".join(pieces) == b"x" * 5000
    # What is left of 2 s from the start, plus 1 s per 1000 bytes so far.
    assert wire.waits == pytest.approx([1.0, 1.0 - 1.5 + 3.0, 1.0 - 3.0 + 4.0], abs=1e-9)


def test_a_body_slower_than_the_rate_is_cut_when_its_time_is_spent() -> None:
    wire = ScriptedWire([b"x" * 500] * 4, pace=1.0)
    with pytest.raises(asyncio.TimeoutError):
        read(wire, ob.Framing("length", 5000), timeout=1.5, error_status=400,
             min_rate=1000.0)
    # 1.5 s, then 1.5 - 1 + 0.5 = 1 s, then 1.5 - 2 + 1 = 0.5 s, then 1.5 - 3 + 1.5 = 0.
    assert wire.waits == pytest.approx([1.5, 1.0, 0.5], abs=1e-9)


def test_a_body_whose_time_is_spent_exactly_waits_no_more() -> None:
    wire = ScriptedWire([b"x" * 1000], pace=2.0)
    with pytest.raises(asyncio.TimeoutError):
        read(wire, ob.Framing("length", 2000), timeout=1.0, error_status=400,
             min_rate=1000.0)
    assert wire.waits == [1.0]  # then 1 - 2 + 1 = 0 s left: cut, not a wait of nothing


def test_a_body_leaves_what_follows_it_and_says_how_many_bytes_were_missing() -> None:
    wire = ScriptedWire([b"hello", b"wor", b"ld" + b"GET / HTTP/1.1\r\n"])
    assert read(wire, ob.Framing("length", 10), timeout=1.0, error_status=400) == [
        b"hello", b"wor", b"ld"]
    assert bytes(wire.buf) == b"GET / HTTP/1.1\r\n"
    short = ScriptedWire([b"abc", None])
    with pytest.raises(ob.IncompleteBody, match=r"^connection closed with 7 body bytes "
                                                r"missing$"):
        read(short, ob.Framing("length", 10), timeout=1.0, error_status=400)


def test_chunked_and_until_close_bodies_come_as_they_arrive() -> None:
    chunked = ScriptedWire([b"3\r\nabc\r\n", b"2\r\nde\r\n0\r\n\r\nNEXT"])
    assert read(chunked, ob.Framing("chunked"), timeout=1.0, error_status=400) == [
        b"abc", b"de"]
    assert bytes(chunked.buf) == b"NEXT"
    cut = ScriptedWire([b"3\r\nabc\r\n", None])
    with pytest.raises(ob.IncompleteBody, match=r"^connection closed in the middle of a "
                                                r"chunked body$"):
        read(cut, ob.Framing("chunked"), timeout=1.0, error_status=400)
    until_close = ScriptedWire([b"ab", b"c", None])
    assert read(until_close, ob.Framing("close"), timeout=1.0, error_status=502) == [
        b"ab", b"c"]
    assert read(ScriptedWire([]), ob.NO_BODY, timeout=1.0, error_status=400) == []


def test_a_chunked_body_counts_its_bytes_against_the_rate_too() -> None:
    wire = ScriptedWire([b"bb8\r\n" + b"x" * 3000 + b"\r\n", b"3e8\r\n" + b"x" * 1000 + b"\r\n",
                         b"0\r\n\r\n"], pace=1.5)
    pieces = read(wire, ob.Framing("chunked"), timeout=2.0, error_status=400, min_rate=1000.0,
                  started=wire.loop.now - 1.0)
    assert b"".join(pieces) == b"x" * 4000
    assert wire.waits == pytest.approx([1.0, 1.0 - 1.5 + 3.0, 1.0 - 3.0 + 4.0], abs=1e-9)


def test_a_body_of_many_small_chunks_yields_to_other_connections_between_slices(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pauses: list[float] = []
    sleep = asyncio.sleep

    async def pause(delay: float) -> None:
        pauses.append(delay)
        await sleep(0)

    monkeypatch.setattr(ob.asyncio, "sleep", pause)
    count = 2 * ob.CHUNKED_SLICE + 10
    wire = ScriptedWire([b"1\r\nx\r\n" * count + b"0\r\n\r\n"])
    pieces = read(wire, ob.Framing("chunked"), timeout=1.0, error_status=400)
    assert b"".join(pieces) == b"x" * count
    assert pauses == [0, 0]  # after each full slice, only until the loop's next turn


def test_an_until_close_body_counts_its_bytes_against_the_rate_too() -> None:
    wire = ScriptedWire([b"x" * 3000, b"x" * 1000, None], pace=1.5)
    pieces = read(wire, ob.Framing("close"), timeout=2.0, error_status=502, min_rate=1000.0,
                  started=wire.loop.now - 1.0)
    assert b"".join(pieces) == b"x" * 4000
    assert wire.waits == pytest.approx([1.0, 1.0 - 1.5 + 3.0, 1.0 - 3.0 + 4.0], abs=1e-9)


def replay(body: ob.ReplayableBody) -> list[bytes]:
    async def main() -> list[bytes]:
        return [bytes(piece) async for piece in body.chunks()]
    return asyncio.run(main())


def test_a_body_in_memory_is_sent_again_whole_a_slice_at_a_time() -> None:
    assert ob.ReplayableBody.of(b"").size == 0 and replay(ob.ReplayableBody.of(b"")) == []
    data = b"x" * (2 * ob.SEND_SLICE + 1)
    body = ob.ReplayableBody.of(data)
    assert body.size == len(data) and body.replayable
    for _ in range(2):  # and again, for a retry on another server
        assert [len(p) for p in replay(body)] == [ob.SEND_SLICE, ob.SEND_SLICE, 1]


def test_a_streamed_body_may_be_sent_again_while_what_was_read_fits_the_replay_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ob, "REPLAY_LIMIT", 10)

    async def source(*pieces: bytes) -> Any:
        for piece in pieces:
            yield piece

    fits = ob.ReplayableBody(source(b"abcd", b"efghij"))  # 10 bytes: exactly the limit
    assert replay(fits) == [b"abcd", b"efghij"] and fits.replayable and fits.size == 10
    assert replay(fits) == [b"abcd", b"efghij"]
    over = ob.ReplayableBody(source(b"abcd", b"efghijk"))
    assert replay(over) == [b"abcd", b"efghijk"]
    assert not over.replayable and over.size == 0  # nothing kept once it gave up


def test_the_tail_of_a_body_keeps_its_last_bytes_and_no_more() -> None:
    # Pieces of 64 bytes: 8 KiB is 128 of them exactly, the bound's edge.
    tail = ob.Tail()
    pieces = [bytes([i % 251]) * 64 for i in range(1000)]
    for piece in pieces:
        assert tail.add(piece) == 64
        assert tail.size == sum(len(data) for data, _, _ in tail.reads)
        assert tail.size < ob.TAIL_BYTES + 64  # what it holds stays bounded
    assert tail.size == ob.TAIL_BYTES
    assert tail.last() == b"".join(pieces)[-ob.TAIL_BYTES:]
    big = ob.Tail()
    big.add(b"x" * 20_000)  # one piece larger than the tail: kept, and cut when read
    big.add(b"y")
    assert big.last() == (b"x" * 20_000 + b"y")[-ob.TAIL_BYTES:]


def test_the_tail_of_a_chunked_body_is_its_data_without_the_framing() -> None:
    tail = ob.Tail()
    reads = [b"%x\r\n%s\r\n" % (len(line), line)
             for line in (b'{"a":1}\n', b'{"done":true,"eval_count":7}\n')]
    for read in reads:
        assert tail.add(read, [(read.index(b"\r\n") + 2, len(read) - 2)]) == len(read) - 2 - (
            read.index(b"\r\n") + 2)
    assert tail.add(b"0\r\n\r\n", []) == 0  # no data: nothing kept
    assert tail.last() == b'{"a":1}\n{"done":true,"eval_count":7}\n'
    assert ob.eval_count(tail.last()) == (7, None)


@pytest.mark.parametrize("framing", [ob.Framing("length", 5), ob.Framing("close")],
                         ids=["length", "close"])
def test_bytes_that_arrive_while_a_piece_is_handled_are_read_before_waiting_for_more(
        framing: ob.Framing) -> None:
    """The reader of a piece may wait (a relay on its upstream's drain) while the rest of
    the body arrives; those bytes are taken at once, not left in the buffer while the
    body waits for bytes that will never come (a 4 MiB upload hung so, now and then)."""
    async def main() -> tuple[list[bytes], list[float]]:
        wire = ScriptedWire([b"ab", None])  # then nothing more: the peer is done
        pieces = []
        async for piece in ob.iter_body(wire, framing, 5.0, 400):  # type: ignore[arg-type]
            pieces.append(piece)
            if piece == b"ab":
                wire.buf += b"cde"  # arrived meanwhile
        return pieces, wire.waits

    pieces, waits = asyncio.run(main())
    assert b"".join(pieces) == b"abcde"
    assert len(waits) == (1 if framing.kind == "length" else 2)
