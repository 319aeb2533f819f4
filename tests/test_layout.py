"""The module's layout holds: sections in the order its table of contents gives, none too
long; each class and function short enough to read whole; rooms that call only the rooms
below them; and one route table that every route comes from."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import ollamabalancer as ob

SOURCE = Path(ob.__file__).read_text()
TREE = ast.parse(SOURCE)
BANNER = re.compile(r"^# -{20,}\n# (?P<title>.+)\n# -{20,}$", re.MULTILINE)

#: The rooms of the application, lowest first: each may be given only those before it.
ROOMS = [ob.Upstreams, ob.Fleet, ob.Access, ob.Relay, ob.OllamaFront, ob.FanOut,
         ob.Management, ob.Observability, ob.ApiDocs, ob.Balancer]


def sections() -> list[tuple[str, int, int]]:
    """(title, first line, last line) of each banner-led section."""
    found = [(m.group("title"), SOURCE.count("\n", 0, m.start()) + 1)
             for m in BANNER.finditer(SOURCE)]
    ends = [start - 1 for _, start in found[1:]] + [SOURCE.count("\n") + 1]
    return [(title, start, end) for (title, start), end in zip(found, ends, strict=True)]


def test_the_table_of_contents_lists_every_section_in_order() -> None:
    doc = ast.get_docstring(TREE) or ""
    listed = re.findall(r"^    (\S.*?)\s{2,}\S", doc.partition("Sections, in dependency order")[2],
                        re.MULTILINE)
    titles = [title.split(":")[0] for title, _, _ in sections()]
    assert listed == titles


def test_no_section_uses_what_a_later_section_defines() -> None:
    """Dependency order: read top to bottom, every name is known before it is used
    (annotations aside, which are never evaluated)."""
    starts = [start for _, start, _ in sections()]

    def section_of(line: int) -> int:
        return sum(1 for start in starts if start <= line) - 1

    defined: dict[str, int] = {}
    for node in TREE.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined[node.name] = section_of(node.lineno)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    defined[target.id] = section_of(node.lineno)

    class Uses(ast.NodeVisitor):
        def __init__(self) -> None:
            self.names: set[str] = set()

        def visit_Name(self, node: ast.Name) -> None:
            self.names.add(node.id)

        def visit_arg(self, node: ast.arg) -> None:
            pass  # its annotation

        def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
            if node.value is not None:
                self.visit(node.value)

        def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
            for part in (*node.decorator_list, *node.args.defaults, *node.body):
                self.visit(part)

        visit_AsyncFunctionDef = visit_FunctionDef

    later = []
    for node in TREE.body:
        uses = Uses()
        uses.visit(node)
        here = section_of(node.lineno)
        later += [(name, getattr(node, "name", "?")) for name in uses.names
                  if defined.get(name, -1) > here]
    assert not later


def test_no_section_class_or_function_is_too_long_to_read_whole() -> None:
    long_sections = [(t, end - start + 1) for t, start, end in sections() if end - start >= 900]
    assert not long_sections
    long_classes, long_functions = [], []
    for node in ast.walk(TREE):
        size = (getattr(node, "end_lineno", 0) or 0) - getattr(node, "lineno", 0) + 1
        if isinstance(node, ast.ClassDef) and size > 400:
            long_classes.append((node.name, size))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > 90:
            long_functions.append((node.name, size))
    assert not long_classes and not long_functions


def test_each_room_is_given_only_the_rooms_below_it() -> None:
    names = [room.__name__ for room in ROOMS]
    for index, room in enumerate(ROOMS):
        given = [p.annotation for p in inspect.signature(room.__init__).parameters.values()]
        rooms_given = [name for name in names if name in given]
        assert all(names.index(name) < index for name in rooms_given), room
        # Nor does its code name a room above it.
        code = inspect.getsource(room)
        assert not [name for name in names[index + 1:]
                    if re.search(rf"\b{name}\b", code)], room


def test_every_route_comes_from_the_one_table_and_names_a_handler() -> None:
    app = ob.Balancer(ob.Config(), None)  # type: ignore[arg-type]
    assert [route for route, _ in app.routes] == list(ob.ROUTES)
    for route, handler in app.routes:
        assert inspect.iscoroutinefunction(handler), route.handler
        assert route.access in ("open", "client", "admin")
        assert route.summary and route.methods <= {"GET", "HEAD", "POST", "PATCH", "DELETE"}
        # Labels stay bounded: a name, or the path of a route whose paths are fixed.
        assert route.label or "(?P<" not in route.pattern.pattern, route.handler
    # A route is declared once: the same method on the same pattern would never be reached.
    pairs = [(m, r.pattern.pattern) for r in ob.ROUTES for m in r.methods or {"*"}]
    assert len(pairs) == len(set(pairs))
