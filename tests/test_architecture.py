"""The package's imports run one way. Every module is parsed (never imported) and EVERY import counts: top-level,
inside functions, and under `if TYPE_CHECKING:`. Fails on (a) an import cycle between modules, naming it, (b) a
private name (`_x`) imported from another module, (c) a module importing one of a higher layer (LAYERS), or a
module the table does not place.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "softprompt"
SRC = Path(__file__).resolve().parent.parent / "src" / PACKAGE

# Lower layers never import higher ones; a module may import its own layer (the cycle check keeps that one way).
# A module of a subpackage (softprompt.model.load, softprompt.serve.app) takes its package's place.
LAYERS: list[tuple[str, set[str]]] = [
    ("foundations", {"errors", "progress", "precision", "config", "metrics", "budget", "trackers", "distributed"}),
    ("plain data", {"data", "hf_data", "prompt", "artifact_files", "reparam"}),
    ("model", {"model"}),
    ("scoring / engine / artifacts", {"scoring", "evalset", "engine", "batch_cache", "sampling", "peft_io"}),
    ("commands", {"train", "evaluate", "ensemble", "generate", "distill", "scheduler", "serve", "probe", "vllm_client",
                  "demo"}),
    ("entry points", {"cli", "__main__", "__init__"}),  # __init__: the package itself (`import softprompt`)
]

# Imports (importer, importee) that break the table and are accepted: none. A check fails if an entry is unneeded.
KNOWN_LAYER_EXCEPTIONS: set[tuple[str, str]] = set()


# ---- parsing ---------------------------------------------------------------------------------------------------


def module_sources(root: Path = SRC, package: str = PACKAGE) -> dict[str, str]:
    """{dotted module name: source} for every .py file of the package (a package's __init__ is the package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path.read_text(encoding="utf-8")
    return out


def imports_of(sources: dict[str, str], package: str = PACKAGE) -> dict[str, list[tuple[str, str, int]]]:
    """{module: [(imported module, imported name or '', line)]}: every import of a package module, wherever it sits
    in the file. `from .x import y` is an import of module x.y when that is a module, else of x (name y)."""
    modules = set(sources)
    is_package = {m for m in modules if any(o.startswith(m + ".") for o in modules)} | {package}

    def known(name: str) -> str | None:  # the longest module prefix of a dotted name
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in modules:
                return ".".join(parts[:i])
        return None

    out: dict[str, list[tuple[str, str, int]]] = {}
    for module, source in sources.items():
        here = module if module in is_package else module.rpartition(".")[0]
        found = []
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = known(alias.name)
                    if target:
                        found.append((target, "", node.lineno))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                if known(origin) is None:
                    continue  # not ours
                for alias in node.names:
                    sub = f"{origin}.{alias.name}"
                    found.append((sub, "", node.lineno) if sub in modules else (known(origin), alias.name, node.lineno))
        out[module] = found
    return out


def edges(imports: dict[str, list[tuple[str, str, int]]]) -> dict[str, set[str]]:
    return {m: {t for t, _, _ in found if t != m} for m, found in imports.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def layer_key(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def rank(module: str) -> int | None:
    key = layer_key(module)
    return next((i for i, (_, names) in enumerate(LAYERS) if key in names), None)


# ---- the checks ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def package_imports():
    return imports_of(module_sources())


def test_the_parser_sees_every_kind_of_import():
    """The checks below are only as good as the parser: function-level and TYPE_CHECKING imports count, relative
    imports resolve from packages and modules alike, and a cycle through them is found and named."""
    sources = {
        "pkg": "from .a import A\n",
        "pkg.a": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\nA = 1\n",
        "pkg.b": "def f():\n    from .sub import leaf\n    return leaf\n",
        "pkg.sub": "from . import leaf\n",
        "pkg.sub.leaf": "from ..a import _hidden\nimport pkg.b\n",
    }
    found = imports_of(sources, "pkg")
    assert ("pkg.b", "B", 3) in found["pkg.a"]  # under TYPE_CHECKING
    assert ("pkg.sub.leaf", "", 2) in found["pkg.b"]  # inside a function; `leaf` is a module
    assert ("pkg.sub.leaf", "", 1) in found["pkg.sub"]  # `from . import` in a package's __init__
    assert ("pkg.a", "_hidden", 1) in found["pkg.sub.leaf"] and ("pkg.b", "", 2) in found["pkg.sub.leaf"]
    assert find_cycle(edges(found)) == ["pkg.a", "pkg.b", "pkg.sub.leaf", "pkg.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_no_import_cycles(package_imports):
    cycle = find_cycle(edges(package_imports))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_private_names_imported_across_modules(package_imports):
    bad = [f"{m}:{line} imports {name} from {target}" for m, found in package_imports.items()
           for target, name, line in found
           if target != m and name.startswith("_") and not name.startswith("__")]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_every_module_has_a_layer(package_imports):
    unplaced = sorted(m for m in package_imports if rank(m) is None)
    assert not unplaced, f"modules missing from LAYERS in {__file__}: {unplaced}"


def test_imports_run_down_the_layers(package_imports):
    bad = []
    for m, found in package_imports.items():
        for target, _, line in found:
            low, high = rank(m), rank(target)
            if low is not None and high is not None and high > low and (layer_key(m), layer_key(target)) not in KNOWN_LAYER_EXCEPTIONS:
                bad.append(f"{m}:{line} ({LAYERS[low][0]}) imports {target} ({LAYERS[high][0]})")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_known_exceptions_are_still_needed(package_imports):
    """An exception that no import needs any more is removed from KNOWN_LAYER_EXCEPTIONS (it only ever shrinks)."""
    used = {(layer_key(m), layer_key(t)) for m, found in package_imports.items() for t, _, _ in found}
    stale = sorted(KNOWN_LAYER_EXCEPTIONS - used)
    assert not stale, f"remove from KNOWN_LAYER_EXCEPTIONS: {stale}"
