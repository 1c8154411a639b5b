"""The package's shape, as the README's "Architecture" section states it (issue 19).

Read from the source with ``ast`` (no import), so each check fails on the line that breaks it:
- the import graph of ``perfusion`` has no circle (imports inside functions count; imports under
  ``if TYPE_CHECKING:`` do not, they never run);
- the arrows point down the layers: the command line at the top, the kernels at the bottom; nothing
  below ``perfusion.cli`` imports from it, and the stages never import the layers that compose them;
- library code never prints or exits: only ``perfusion.cli`` writes to the terminal and sets exit codes;
- no function has more than 60 lines of code (signature and docstring not counted) unless its docstring
  says why (a paragraph starting "Long because").
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "perfusion"
MAX_FUNCTION_LINES = 60
LONG_REASON = "Long because"

#: Layers from the bottom up; a module may import from its own layer and those below, never above.
#: "io" is infrastructure shared by every layer above the kernels; "results" holds the typed results the
#: stages fill (it imports no stage at run time).
LAYERS = [
    {"perfusion", "perfusion.errors", "perfusion.units", "perfusion.verdicts", "perfusion._kernels"},
    {"perfusion.io", "perfusion.results"},
    {"perfusion.quantify"},
    {"perfusion.config", "perfusion.pipeline", "perfusion.report"},
    {"perfusion.case", "perfusion.followup", "perfusion.tools"},
    {"perfusion.batch"},
    {"perfusion.cli", "perfusion.__main__"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(name: str) -> set[str]:
    """The perfusion modules ``name`` imports at run time (``from perfusion.x import y`` counts as
    perfusion.x.y when that is a module, else perfusion.x)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if MODULES[name].name == "__init__.py" else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def layer_of(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(name == top or name.startswith(top + ".") for top in layer if top != "perfusion"):
            return i
    if name == "perfusion":
        return 0
    raise AssertionError(f"{name} is in no layer of test_structure.LAYERS: add it where it belongs")


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)


def test_no_import_circle():
    """Depth-first search for a back edge; the circle found is printed whole."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(GRAPH[n]):
            if state.get(m) == 1:
                circle = stack[stack.index(m):] + [m]
                pytest.fail("import circle: " + " -> ".join(circle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(GRAPH):
        if n not in state:
            visit(n)


def test_arrows_point_down_the_layers():
    wrong = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
             for a, targets in GRAPH.items() for b in targets
             if layer_of(b) > layer_of(a) and b != "perfusion"]
    assert not wrong, "\n".join(wrong)


def test_the_graph_is_read():
    """The checks above would pass on an empty graph: the pipeline's known arrows must be seen."""
    assert "perfusion.quantify.deconvolution" in GRAPH["perfusion.pipeline"]
    assert any(m.startswith("perfusion._kernels") for m in GRAPH["perfusion.quantify.deconvolution"])
    assert any(m.startswith("perfusion.case") for m in set().union(*(GRAPH[n] for n in MODULES
                                                                       if n.startswith("perfusion.cli"))))


def _calls(tree: ast.AST) -> set[str]:
    return {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}


@pytest.mark.parametrize("name", [n for n in MODULES if not n.startswith("perfusion.cli") and n != "perfusion.__main__"])
def test_library_code_never_prints_or_exits(name):
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    calls = _calls(tree)
    bad = sorted(c for c in calls if c in {"print", "sys.exit", "exit", "quit", "os._exit"}
                 or c.endswith(("console.print", "typer.echo", ".Exit")))
    assert not bad, f"{name} writes to the terminal or exits: {bad}; return the data and let perfusion.cli print it"
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {"typer", "rich.console"} & imported, f"{name} imports a terminal library"


def _code_start(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """The first line after the signature and the docstring (a docstring is not length to cut)."""
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.end_lineno + 1 if len(node.body) > 1 else first.end_lineno
    return first.lineno


def long_functions() -> list[tuple[str, str, int]]:
    out = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - _code_start(node) + 1
                if lines > MAX_FUNCTION_LINES and LONG_REASON not in (ast.get_docstring(node) or ""):
                    out.append((name, node.name, lines))
    return out


def test_functions_are_short_or_say_why():
    long = long_functions()
    assert not long, "\n".join(f"{m}.{f}: {n} lines; split it or say why in its docstring "
                               f"('{LONG_REASON} ...')" for m, f, n in long)
