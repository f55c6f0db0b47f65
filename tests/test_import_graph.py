"""selm's import graph: no circles, no import that runs back up a layer, no private name imported.

Every module in selm/ is parsed with `ast` (nothing is imported). An edge A -> B is any import of B
in A, at the top of the file AND inside a function: an import deferred into a function body still
ties the two modules together (it only hides the circle until the function runs), so both count.
`from selm.pkg import name` is an edge to selm.pkg.name when that is a module, else to selm.pkg.
"""

from __future__ import annotations

import ast
from pathlib import Path

SELM = Path(__file__).resolve().parents[1] / "selm"

# Lowest first; a module may import from its own layer or any layer below it (selm/__init__.py
# draws the same picture). A prefix names a module or a whole package.
LAYERS = [
    ("selm.io", "selm.stats", "selm.dist", "selm.signals", "selm.precision", "selm.layout", "selm.quiet"),
    ("selm.config", "selm.chat", "selm.environment", "selm.lora", "selm.toy_judges", "selm.hub"),
    ("selm.data", "selm.models", "selm.tiny"),
    ("selm.objective", "selm.engines", "selm.training", "selm.fsdp"),
    ("selm.stages", "selm.run_changes"),
    ("selm.loop",),
    ("selm.studies", "selm.evaluation"),
    ("selm.status",),
    ("selm.cli",),
]

def _modules() -> dict[str, Path]:
    mods = {}
    for path in SELM.rglob("*.py"):
        parts = list(path.relative_to(SELM.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _imports(module: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every selm import in the file, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "selm"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] != "selm":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, "", node.lineno) if sub in mods else (base, a.name, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for target, _, _ in _imports(m, path, mods):
            # `from selm import __version__` reaches selm/__init__.py, which imports nothing: left out.
            if target in mods and target != m and target != "selm":
                graph[m].add(target)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None. Depth-first search with an explicit path."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [])
            if found:
                return found
    return None


def _layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module}: in no layer of tests/test_import_graph.py's LAYERS; add it where it belongs")


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_runs_back_up_a_layer():
    graph = _graph()
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m in sorted(graph) for t in sorted(graph[m]) if _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_private_name_is_imported_from_another_module():
    """A name another module needs is public: `from selm.x import _y` means _y is not private."""
    mods = _modules()
    private = [f"{path.relative_to(SELM.parent)}:{line}: {name} from {target}"
               for m, path in mods.items() for target, name, line in _imports(m, path, mods)
               if name.startswith("_") and not name.startswith("__")]
    assert not private, "\n".join(private)
