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


#: Where a class stops being one thing a reader can hold: the one size rule.
MAX_CLASS_LINES = 700


def test_no_class_is_too_big_to_be_one_room() -> None:
    """Rooms are cut by responsibility, not by size: sizes are printed for whoever works
    here (pytest -s), and only a class past MAX_CLASS_LINES fails."""
    for title, start, end in sections():
        print(f"section {end - start + 1:5d}  {title}")
    classes = sorted(((node.end_lineno or 0) - node.lineno + 1, node.name)
                     for node in TREE.body if isinstance(node, ast.ClassDef))
    for size, name in classes[::-1][:15]:
        print(f"class   {size:5d}  {name}")
    assert [(name, size) for size, name in classes if size > MAX_CLASS_LINES] == []


def imported_modules() -> set[str]:
    names = set()
    for node in TREE.body:
        if isinstance(node, ast.Import):
            names |= {alias.asname or alias.name.split(".")[0] for alias in node.names}
    return names


class Reaches(ast.NodeVisitor):
    """Each attribute reached, with the class whose code reaches it."""

    def __init__(self) -> None:
        self.where: list[str] = []
        self.found: list[tuple[str, ast.Attribute]] = []

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.where.append(node.name)
        self.generic_visit(node)
        self.where.pop()

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.found.append((self.where[-1] if self.where else "", node))
        self.generic_visit(node)


REACHES = Reaches()
REACHES.visit(TREE)


def test_no_object_reaches_into_another_objects_private_members() -> None:
    """``x._name`` only where x is the object itself (self, cls) or a module (os._exit)."""
    modules = imported_modules()
    private = [(where, node.lineno, ast.unparse(node)) for where, node in REACHES.found
               if node.attr.startswith("_") and not node.attr.startswith("__")
               and not (isinstance(node.value, ast.Name)
                        and node.value.id in {"self", "cls", *modules})]
    assert private == []


def test_nothing_outside_the_fleet_touches_its_parts() -> None:
    """The fleet is entered through its methods: whatever ``fleet.name`` names outside
    Fleet is a method of Fleet (never its store, scheduler, tables or their contents)."""
    def fleet(value: ast.expr) -> bool:
        return (isinstance(value, ast.Name) and value.id == "fleet") or (
            isinstance(value, ast.Attribute) and value.attr == "fleet")

    reached = {(where, node.attr) for where, node in REACHES.found
               if where != "Fleet" and fleet(node.value)}
    assert reached, "the check found no use of the fleet at all"
    not_methods = [(where, name) for where, name in sorted(reached)
                   if not callable(inspect.getattr_static(ob.Fleet, name, None))]
    assert not_methods == []


def test_upstreams_are_spoken_to_only_through_the_exchange_context_manager() -> None:
    """Every exchange is entered with ``async with``, which gives its connection back or
    drops it on every way out; nothing else opens, drops or pools one by hand."""
    entered = {id(item.context_expr) for node in ast.walk(TREE)
               if isinstance(node, ast.AsyncWith) for item in node.items}
    calls = [node for node in ast.walk(TREE) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "exchange"]
    assert calls, "the check found no exchange at all"
    assert [node.lineno for node in calls if id(node) not in entered] == []
    # Who drops a connection by hand: the connection itself, the pool, the exchange, and
    # the server refusing a flood of clients.
    wire_keepers = {"Wire", "UpstreamPool", "Exchange", "HTTPServer"}
    by_hand = [(where, node.lineno, node.attr) for where, node in REACHES.found
               if node.attr in ("abort", "__aenter__", "__aexit__")
               and where not in wire_keepers]
    assert by_hand == []


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
        assert route.access in ("open", "client", "models", "admin")
        assert route.summary and route.methods <= {"GET", "HEAD", "POST", "PATCH", "DELETE"}
        # Labels stay bounded: a name, or the path of a route whose paths are fixed.
        assert route.label or "(?P<" not in route.pattern.pattern, route.handler
    # A route is declared once: the same method on the same pattern would never be reached.
    pairs = [(m, r.pattern.pattern) for r in ob.ROUTES for m in r.methods or {"*"}]
    assert len(pairs) == len(set(pairs))
