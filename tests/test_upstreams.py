"""One way to talk to an upstream: ``async with upstreams.exchange(...)`` gives the
connection back to the pool when the answer's body was read whole, and drops it on every
other way out."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import ollamabalancer as ob

HEAD, BODY = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"hello"


class Upstream:
    """A server on 127.0.0.1 that answers every request with HEAD, then a moment later
    BODY (so that an exchange left early has nothing of the body yet, and its connection
    looks idle), counting its connections and those its peer dropped."""

    def __init__(self) -> None:
        self.connections = 0
        self.dropped = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(HEAD)
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.write(BODY)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.dropped += 1
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def exchanges(body: Any) -> tuple[int, int]:
    """Runs ``body(upstreams, server)`` then one plain exchange more: how many
    connections the server saw, and how many were dropped by the balancer's side."""
    upstream = Upstream()
    await upstream.start()
    upstreams = ob.Upstreams(ob.Config())
    server = ob.Server(1, "127.0.0.1", upstream.port, reachable=True)
    try:
        await body(upstreams, server)
        assert await upstreams.fetch(server, None, "GET", "/") == (200, b"hello")
        await asyncio.sleep(0.05)
        return upstream.connections, upstream.dropped
    finally:
        upstreams.close()
        await upstream.close()


def head() -> bytes:
    return ob.render_head("GET / HTTP/1.1", [("Host", "upstream")])


def test_an_answer_read_whole_gives_its_connection_back_for_the_next() -> None:
    async def body(upstreams: ob.Upstreams, server: ob.Server) -> None:
        async with upstreams.exchange(server, None, head(), ob.ReplayableBody.of(b""),
                                      "GET") as answer:
            assert answer.status == 200 and await answer.read(100) == b"hello"

    assert asyncio.run(exchanges(body)) == (1, 0)


@pytest.mark.parametrize("how", ["unread", "error", "cancelled", "too-large"])
def test_an_answer_not_read_whole_drops_its_connection(how: str) -> None:
    async def body(upstreams: ob.Upstreams, server: ob.Server) -> None:
        async def use() -> None:
            async with upstreams.exchange(server, None, head(), ob.ReplayableBody.of(b""),
                                          "GET") as answer:
                if how == "error":
                    raise ValueError("a handler's own bug")
                if how == "cancelled":
                    await asyncio.sleep(10)
                if how == "too-large":
                    await answer.read(2)

        task = asyncio.ensure_future(use())
        if how == "cancelled":
            await asyncio.sleep(0.05)
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    assert asyncio.run(exchanges(body)) == (2, 1)


def test_localhost_is_this_hosts_loopback_even_where_the_resolver_knows_no_such_name(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A minimal Debian (debootstrap) has no /etc/hosts: "localhost" did not resolve there,
    # and a server added as http://localhost:11434 was down for good.
    async def scenario() -> None:
        upstream = Upstream()
        await upstream.start()
        loop = asyncio.get_running_loop()

        async def no_resolver(*args: Any, **kwargs: Any) -> Any:
            raise OSError(-2, "Name or service not known")

        monkeypatch.setattr(loop, "getaddrinfo", no_resolver)
        server = ob.Server(id=1, host="LocalHost.", port=upstream.port)
        wire = await ob.open_upstream(server, None, 5.0)
        wire.abort()
        with pytest.raises(ob.UpstreamError, match="Name or service not known"):
            await ob.open_upstream(ob.Server(id=2, host="localhost.example",
                                             port=upstream.port), None, 5.0)
        await asyncio.sleep(0.05)
        assert upstream.connections == 1
        await upstream.close()

    asyncio.run(scenario())
    assert [ob.is_localhost(n) for n in ("localhost", "a.LOCALHOST", "localhost.", "mylocalhost",
                                         "localhost.example")] == [True, True, True, False, False]
