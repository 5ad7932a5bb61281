"""The import graph of `amrc_exp`, read statically from the sources (function-level imports
included): no cycle, and no import from a lower layer into a higher one.

Layers, low to high: base (errors, io, math) → library (compress) → data → models →
experiment → report and the console entry (__main__). Importing `a.b.c` also runs the package
`a.b`'s __init__, so it counts as an edge to that package too."""

from __future__ import annotations

import ast
from pathlib import Path

import amrc_exp

PKG = Path(amrc_exp.__file__).resolve().parent
LAYERS = [("amrc_exp", "amrc_exp.errors", "amrc_exp.io", "amrc_exp.math"), ("amrc_exp.compress",),
          ("amrc_exp.data",), ("amrc_exp.models",), ("amrc_exp.experiment",),
          ("amrc_exp.report", "amrc_exp.__main__")]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = ["amrc_exp", *path.relative_to(PKG).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _targets(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The amrc_exp modules `module` imports, each with its parent packages."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(anchor[:len(anchor) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            while name.startswith("amrc_exp."):  # the module and every package (with an __init__) above it run
                if name in known:
                    found.add(name)
                name = name.rpartition(".")[0]
    return found - {module}


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: _targets(m, p, known) for m, p in known.items()}


def _layer(module: str) -> int:
    best = max((prefix for layer in LAYERS for prefix in layer if module == prefix or module.startswith(prefix + ".")),
               key=len)
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path, or None (depth-first search, a package's own submodules excluded:
    `a.b/__init__` importing `a.b.c` is how packages re-export)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if t.startswith(m + ".") or m.startswith(t + "."):
                continue  # a package and its own submodules
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_the_checker_finds_a_cycle():
    """The checker itself can fail: a made-up graph with a three-module loop."""
    graph = {"amrc_exp.a": {"amrc_exp.b"}, "amrc_exp.b": {"amrc_exp.c"}, "amrc_exp.c": {"amrc_exp.a"}}
    assert _cycle(graph) == ["amrc_exp.a", "amrc_exp.b", "amrc_exp.c", "amrc_exp.a"]


def test_imports_point_down_only():
    upward = {(m, t) for m, targets in _graph().items() for t in targets
              if _layer(t) > _layer(m) and not m.startswith(t + ".")}
    assert upward == set(), sorted(upward)


def _third_party(path: Path) -> set[str]:
    """Top-level names of the non-amrc_exp modules a source file imports (function level too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found - {"amrc_exp"}


def test_nothing_below_the_experiment_layer_sees_hydra():
    """Hydra, OmegaConf and W&B belong to the experiment layer: the library, data and models
    take typed settings (a notebook builds them without any of the three)."""
    below = {m: p for m, p in _modules().items() if _layer(m) < _layer("amrc_exp.experiment")}
    assert {"amrc_exp.data", "amrc_exp.models", "amrc_exp.models.train", "amrc_exp.compress"} <= set(below)
    seen = {m: sorted(_third_party(p) & {"hydra", "omegaconf", "wandb"}) for m, p in below.items()}
    assert {m: s for m, s in seen.items() if s} == {}
