"""Mutation testing of the sections where a silent bug costs most, with mutmut.

    python tests/mutate.py secrets          # one section (see SECTIONS); several may follow
    python tests/mutate.py all
    python tests/mutate.py --list secrets   # the functions a section covers, and its tests
    python tests/mutate.py --report secrets # the last run's figures and survivors again

mutmut (pip install ".[test]") changes ollamabalancer.py one mutant at a time and runs the
section's tests; a mutant the tests do not catch "survives". mutmut mutates only the lines
of a patch file: this script writes one that names every line of the section's functions,
so a run takes minutes, not the hours the whole module would.

Each section runs in a copy of the tree, .mutmut/<section>/, as the last commit has it
(--ref for another), so the module being edited is never the one mutated and sections can
run side by side. Its .mutmut-cache keeps the results; a run made after the
tests changed starts again from nothing. At the end the script prints how many mutants
were made, killed and survived, and each survivor. Do not run mutmut's own commands in a
copy while its run goes on: they record the mutated line in the cache and break the run.
Not part of CI: a run takes minutes per section.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE = "ollamabalancer.py"
#: mutmut counts a mutant as caught only when its runner exits with 1, and pytest exits
#: with 2 when the module no longer imports (a mutant that is a syntax error): the runner
#: is this script again (--pytest), turning any failure into 1.
PYTEST = f"{sys.executable} tests/mutate.py --pytest -x -q -p no:cacheprovider -p no:randomly"

#: section: (function patterns, the tests that should catch a change in them)
SECTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "secrets": (
        ("b64url_encode", "b64url_decode", "hkdf_sha256", "SecretBox.*", "is_encrypted",
         "MasterKey.*", "new_kdf_spec", "kdf_params", "stretch", "sealing_box", "new_sealing",
         "load_master_key", "write_key_file",
         "sealed_length", "Store._seal", "Store._open_secret", "Store._sealed", "Store.unlock",
         "Store._record_first_key", "Store.protect_secrets", "Store.rotate_secrets",
         "rotate_secret"),
        "tests/test_sealing.py"
        " tests/test_security.py::test_hkdf_matches_the_rfc_5869_vectors"
        " tests/test_security.py::test_secrets_round_trip"
        " tests/test_security.py::test_the_same_value_encrypts_differently_each_time"
        " tests/test_security.py::test_tampering_with_any_byte_is_detected"
        " tests/test_security.py::test_another_key_cannot_decrypt_and_has_another_check_value"
        " tests/test_security.py::test_rotate_secret_re_encrypts_everything"
        " tests/test_security.py::test_rotation_changes_nothing_when_a_stored_secret_is_damaged"),
    "access": (
        ("Access.*", "bearer_token", "basic_password", "origin_matcher", "split_authority",
         "same_origin", "is_loopback"),
        "tests/test_access_control.py"),
    "parsing": (
        ("_line_too_long", "_split_head", "_parse_fields", "maybe_request_head",
         "maybe_response_head", "_content_length", "request_framing", "response_framing",
         "ChunkedScanner.*", "ChunkedDecoder.*", "decode_json", "has_dot_dot_segment",
         "Headers.*"),
        "tests/test_http_parsing.py"),
    "scheduler": (
        ("Scheduler.*", "Ranking.*"),
        "tests/test_scheduler.py"),
    "relay": (
        ("Upstreams.*", "Exchange.*", "Relay.upstream_head", "Relay.forward",
         "ReplayableBody.*", "iter_body"),
        # The relay's tests on asyncio's loop only: uvloop runs the same code.
        "tests/test_bodies.py tests/test_passthrough.py tests/test_upstreams.py"
        " tests/test_security.py::test_the_admin_token_never_reaches_an_ollama_server"
        " tests/test_security.py::test_upstream_credentials_are_sent_and_never_returned"
        " tests/test_observability.py::test_metrics_count_a_known_sequence_of_requests"
        " -k 'not uvloop'"),
    # The answer's way back, apart: the relay's tests are end to end and slow, and two
    # sections can run side by side.
    "relay-body": (
        ("Relay._response_fields", "Relay._relay_body", "Tail.*"),
        "tests/test_passthrough.py"
        " tests/test_bodies.py::test_the_tail_of_a_body_keeps_its_last_bytes_and_no_more"
        " tests/test_observability.py::test_metrics_count_a_known_sequence_of_requests"
        " -k 'not uvloop'"),
}


def functions(tree: ast.Module) -> dict[str, tuple[int, int]]:
    """Every function and method by qualified name: its first and last line."""
    found: dict[str, tuple[int, int]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = (node.lineno, node.end_lineno or node.lineno)
        elif isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found[f"{node.name}.{member.name}"] = (
                        member.lineno, member.end_lineno or member.lineno)
    return found


def selected(patterns: tuple[str, ...], root: Path = ROOT) -> dict[str, tuple[int, int]]:
    source = (root / MODULE).read_text()
    every = functions(ast.parse(source))
    chosen = {name: span for name, span in every.items()
              if any(fnmatch.fnmatchcase(name, p) for p in patterns)}
    missing = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in every)]
    if missing:
        raise SystemExit(f"no function matches {missing}: update SECTIONS")
    return chosen


def patch_for(spans: dict[str, tuple[int, int]], root: Path = ROOT) -> str:
    """A unified diff that shows the lines of ``spans`` as added: what mutmut mutates."""
    lines = (root / MODULE).read_text().splitlines()
    hunks = [f"--- a/{MODULE}", f"+++ b/{MODULE}"]
    for start, end in sorted(spans.values()):
        hunks.append(f"@@ -0,0 +{start},{end - start + 1} @@")
        hunks += ["+" + line for line in lines[start - 1:end]]
    return "\n".join(hunks) + "\n"


def copy_tree(section: str, ref: str) -> Path:
    """.mutmut/<section>/: the tree as commit ``ref`` has it, the cache of the last run kept."""
    work = ROOT / ".mutmut" / section
    work.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", "--format=tar", ref], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
    (work / f"{MODULE}.bak").unlink(missing_ok=True)
    return work


def report(section: str) -> bool:
    """Prints a section's figures and each surviving mutant; False if it has no results."""
    work = ROOT / ".mutmut" / section
    cache = work / ".mutmut-cache"
    if not cache.exists():
        return False
    with sqlite3.connect(f"file:{cache}?mode=ro", uri=True) as db:
        counts = dict(db.execute("SELECT status, count(*) FROM Mutant GROUP BY status"))
        survivors = [row[0] for row in db.execute(
            "SELECT id FROM Mutant WHERE status = 'bad_survived' ORDER BY id")]
    made = sum(counts.values())
    print(f"== {section}: {made} mutants, {counts.get('ok_killed', 0)} killed, "
          f"{len(survivors)} survived, {counts.get('bad_timeout', 0)} timed out, "
          f"{counts.get('untested', 0)} not run")
    for mutant in survivors:
        shown = subprocess.run(["mutmut", "show", str(mutant)], cwd=work, check=False,
                               capture_output=True, text=True).stdout
        print(f"-- survivor {mutant}")
        print("\n".join(line for line in shown.splitlines()
                        if line[:1] in "-+" and not line.startswith(("---", "+++"))))
    return True


def main() -> int:
    if sys.argv[1:2] == ["--pytest"]:  # the runner mutmut calls: see PYTEST
        # In this process, so that mutmut's timeout stops the tests with it; the copy's
        # module first on the path, as "python -m pytest" would put it.
        sys.path.insert(0, str(Path.cwd()))
        import pytest

        return 1 if pytest.main(sys.argv[2:]) else 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sections", nargs="+", choices=[*SECTIONS, "all"])
    parser.add_argument("--list", action="store_true", help="show what would be mutated")
    parser.add_argument("--report", action="store_true", help="show the last run's results")
    parser.add_argument("--ref", default="HEAD", help="the commit to mutate (default HEAD)")
    args = parser.parse_args()
    names = list(SECTIONS) if "all" in args.sections else args.sections
    for name in names:
        patterns, tests = SECTIONS[name]
        if args.report:
            if not report(name):
                print(f"== {name}: not run yet")
            continue
        spans = selected(patterns)
        if args.list:
            print(f"{name}: {len(spans)} functions, {sum(e - s + 1 for s, e in spans.values())}"
                  f" lines; tests: {tests}")
            for function in sorted(spans):
                print(f"  {function}")
            continue
        work = copy_tree(name, args.ref)
        patch = work / ".mutate.patch"
        patch.write_text(patch_for(selected(patterns, work), work))
        print(f"== {name}: {len(spans)} functions in {work}; runner: pytest {tests}",
              flush=True)
        subprocess.run(["mutmut", "run", "--paths-to-mutate", MODULE, "--use-patch-file",
                        patch.name, "--runner", f"{PYTEST} {tests}", "--no-progress",
                        "--simple-output"], cwd=work, check=False, stdout=subprocess.DEVNULL)
        report(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
