"""The official ollama Python client, pointed at /servers/ollama/<id> on the balancer."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import BalancerProcess, StoreConfig, both_event_loops, require_module
from fakeollama import FakeOllama, reply_text, reply_words

ollama = require_module("ollama")


#: Every test here runs on both event loops.
event_loop_name = pytest.fixture(params=["asyncio", "uvloop"])(both_event_loops)


@pytest.fixture
def client(balancer: BalancerProcess, backend: FakeOllama) -> Any:
    balancer.add_server(backend.url)
    sid = balancer.server_id(models="llama3")
    return ollama.Client(host=f"http://127.0.0.1:{balancer.port}/servers/ollama/{sid}")


def test_chat_streams_token_by_token(client: Any) -> None:
    parts = list(client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}],
                             stream=True))
    assert [p.message.content for p in parts[:-1]] == reply_words("user: hi")
    assert parts[-1].done is True and parts[-1].eval_count == 5


def test_chat_not_streamed(client: Any) -> None:
    reply = client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}],
                        stream=False)
    assert reply.message.content == reply_text([{"role": "user", "content": "hi"}])
    assert reply.done is True


def test_generate_streamed_and_not(client: Any) -> None:
    streamed = "".join(p.response for p in client.generate(model="llama3", prompt="x",
                                                           stream=True))
    whole = client.generate(model="llama3", prompt="x", stream=False).response
    assert streamed == whole == reply_text([{"role": "user", "content": "x"}])


def test_list_and_embed(client: Any) -> None:
    assert [m.model for m in client.list().models] == ["llama3:latest"]
    assert client.embed(model="llama3", input=["a", "b"]).embeddings == [[0.1, 0.2, 0.3]] * 2


def test_unknown_model_raises_the_upstream_404(client: Any) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="nope", messages=[], stream=False)
    assert caught.value.status_code == 404
    assert "not found" in caught.value.error


def test_full_walkthrough_on_each_store_through_socks(
        store: StoreConfig, start_balancer: Any, backend: FakeOllama,
        microsocks: tuple[int, str, str]) -> None:
    """The issue's 'done when': add a server and a SOCKS proxy, get an ID, stream a chat."""
    lb = start_balancer(store)
    port, user, password = microsocks
    lb.add_server(backend.url)
    proxy_id = lb.add_proxy(name="socks", ip="127.0.0.1", port=port, protocol="socks5",
                            userName=user, password=password)
    sid = lb.server_id(models="llama3", proxy=str(proxy_id))
    chat = ollama.Client(host=f"http://127.0.0.1:{lb.port}/servers/ollama/{sid}").chat
    tokens = [p.message.content for p in chat(model="llama3", stream=True,
                                              messages=[{"role": "user", "content": "hi"}])]
    assert tokens[:5] == reply_words("user: hi")
