"""The documentation says what the code does: every setting and every endpoint is in it,
the README stays short, its links lead somewhere, and its first session works as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from typing import Any

import pytest
from conftest import ROOT, StoreConfig, unavailable
from fakeollama import FakeOllama

import ollamabalancer as ob

DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table_with_its_flag() -> None:
    table = (DOCS / "configuration.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(
        r"^\| `([A-Z_]+)` \| `(--[a-z-]+)` \|", table, re.MULTILINE)}
    assert rows == {env: flag for env, flag, *_ in ob.SETTINGS}


def test_every_endpoint_is_in_the_docs() -> None:
    text = "".join(path.read_text() for path in DOCS.glob("*.md"))
    missing = [path for route in ob.ROUTES for path in route.paths
               if path.split("{")[0].rstrip("/") not in text]
    assert missing == []


def test_the_readme_is_short_and_its_links_lead_somewhere() -> None:
    assert len(README.encode()) <= 10 * 1024
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert links and all((ROOT / link).is_file() for link in links), links
    assert {f"docs/{path.name}" for path in DOCS.glob("*.md")} <= set(links)


def test_the_readmes_settings_are_named_with_their_flags_as_the_balancer_takes_them(
        ) -> None:
    flags = {name: flag for name, flag, *_ in ob.SETTINGS}
    rows = re.findall(r"^\| (`[A-Z_]+`(?:, `[A-Z_]+`)*) \| (`--[a-z-]+`(?:, `--[a-z-]+`)*) \|",
                      README, re.MULTILINE)
    assert len(rows) >= 6, rows
    for names, given in rows:
        assert re.findall(r"`--[a-z-]+`", given) == [f"`{flags[n]}`" for n in
                                                    re.findall(r"`([A-Z_]+)`", names)]


def first_session() -> list[str]:
    """The README's first session: its shell lines, a command continued over lines
    joined into one."""
    block = re.search(r"## A first session.*?```sh\n(.*?)```", README, re.S)
    assert block, "the README has no first session"
    commands: list[str] = []
    for line in block.group(1).splitlines():
        if commands and (commands[-1].count("'") % 2):  # inside a quoted argument
            commands[-1] += "\n" + line
        else:
            commands.append(line)
    return commands


def test_the_readme_first_session_works_as_written(
        start_balancer: Any, sqlite_store: StoreConfig, backend: FakeOllama) -> None:
    """Each line, run by a shell as it stands, against a balancer on 8080's stand-in and
    an Ollama at 11434's (the fake): every one succeeds and says what the README says."""
    if shutil.which("curl") is None:
        unavailable("curl is not installed")
    lb = start_balancer(sqlite_store)
    env = {**os.environ, "PORT": str(lb.port), "IP": "127.0.0.1",
           **sqlite_store.env()}
    outputs = []
    for command in first_session():
        command = (command.replace("localhost:8080", f"127.0.0.1:{lb.port}")
                   .replace("http://localhost:11434", backend.url)
                   .replace("python3 ollamabalancer.py",
                            f"{shutil.which('python3') or 'python3'} "
                            f"{ROOT / 'ollamabalancer.py'}"))
        done = subprocess.run(["sh", "-c", "set -e; " + command + " -f" * command.startswith(
            "curl")], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        outputs.append(done.stdout)
    added, pulled, tags, chat, openai, ps, status = outputs
    assert json.loads(added)["reachable"] is True
    assert json.loads(pulled)["status"] == "success"
    assert "qwen2.5:0.5b" in {m["name"] for m in json.loads(tags)["models"]}
    assert json.loads(chat)["message"]["role"] == "assistant"
    assert json.loads(openai)["choices"][0]["message"]["role"] == "assistant"
    assert "models" in json.loads(ps)
    assert "local" in status and " up " in status


@pytest.mark.parametrize("name", sorted(p.name for p in DOCS.glob("*.md")))
def test_each_doc_has_a_title_and_no_dead_links_between_docs(name: str) -> None:
    text = (DOCS / name).read_text()
    assert text.startswith("# ")
    for link in re.findall(r"\]\(([^)#:]+\.md)[^)]*\)", text):
        assert (DOCS / link).is_file(), (name, link)
