"""The package layering, read from the source (every import statement, at module level or inside
a function): the algorithm never imports the orchestration, a lower subpackage of `saev_core`
never imports a higher one, no module imports another one's private names, and modules import
each other in no cycle. (And rules of the same kind: no module is over 500 lines, no dict literal
repeats a key.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
CORE = ROOT / "saev_core"

# a subpackage may import only subpackages of a lower layer
# (`refusal`, the one exception type of every refusal, is a leaf module below them all)
LAYERS = {"refusal": -1, "data": 0, "model": 1, "sae": 2, "toyworld": 2, "pipeline": 3, "interp": 4}
ORCHESTRATION = ("prefect", "prefect_dask", "flows", "tasks")
# module cycles known and owned elsewhere; delete an entry when its cycle is gone
KNOWN_CYCLES: list[set[str]] = []
# a module holds one job, which fits in this many lines; the toy world's generator and training
# script are each one recipe read top to bottom, and stay whole
MAX_MODULE_LINES = 500
LONG_MODULES = {"saev_core/toyworld/generator.py", "saev_core/toyworld/train_model.py"}
# modules over the limit whose split is owned elsewhere; delete an entry when its module is split
KNOWN_LONG_MODULES: set[str] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(CORE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module `name` imports (absolute names; `from pkg import sub` names the submodule only)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names} & known
            out.update(subs)
            if len(subs) < len(node.names):  # a name defined in `base` itself
                out.add(base)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "saev_core" and len(parts) > 1 else None


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_subpackage_has_a_layer():
    packages = {p.name for p in CORE.iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in CORE.glob("*.py") if p.name != "__init__.py"}
    assert packages | modules == set(LAYERS)


def test_saev_core_never_imports_the_orchestration():
    bad = sorted(f"{m} imports {i}" for m, imports in _graph().items() for i in imports
                 if i.split(".")[0] in ORCHESTRATION)
    assert not bad, "saev_core is the algorithm, Prefect stays in tasks/ and flows/:\n" + "\n".join(bad)


def test_no_subpackage_imports_a_higher_one():
    bad = []
    for module, imports in _graph().items():
        own = _subpackage(module)
        for target in imports:
            other = _subpackage(target)
            if own and other and other != own and LAYERS[other] >= LAYERS[own]:
                bad.append(f"{module} ({own}, layer {LAYERS[own]}) imports {target} ({other}, layer {LAYERS[other]})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles_but_the_known_ones():
    cycles = _cycles(_graph())
    assert [c for c in cycles if c not in KNOWN_CYCLES] == []
    for known in KNOWN_CYCLES:  # a fixed cycle is deleted from the list, not left to hide a new one
        assert known in cycles, f"{sorted(known)} no longer import each other: delete it from KNOWN_CYCLES"


def test_no_module_imports_another_ones_private_names():
    bad = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                bad += [f"{name}: from {'.' * node.level}{node.module or ''} import {a.name}"
                        for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "a private name is its module's own; make it public where it belongs:\n" + "\n".join(bad)


def test_no_module_is_longer_than_the_limit():
    lengths = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in sorted(CORE.rglob("*.py"))}
    over = {path for path, n in lengths.items() if n > MAX_MODULE_LINES}
    bad = sorted(f"{path}: {lengths[path]} lines" for path in over - LONG_MODULES - KNOWN_LONG_MODULES)
    assert not bad, f"over {MAX_MODULE_LINES} lines: split each along a seam that names one job\n" + "\n".join(bad)
    for path in LONG_MODULES | KNOWN_LONG_MODULES:  # a listed module that is gone or short leaves the list
        assert path in lengths, f"{path} no longer exists: delete it from the list"
    for path in KNOWN_LONG_MODULES:
        assert path in over, f"{path} is {lengths[path]} lines now: delete it from KNOWN_LONG_MODULES"


def test_no_dict_literal_repeats_a_key():
    """`{"a": 1, "a": 2}` silently drops the first value (a test's parameters once did)."""
    bad = []
    for folder in ("saev_core", "tasks", "flows", "tests", "benchmarks", "infra", "deployments"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Dict):
                    keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
                    bad += [f"{path.relative_to(ROOT)}:{node.lineno}: {k!r}" for k in sorted(
                        {k for k in keys if keys.count(k) > 1}, key=repr)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source, expected", [
    ("from saev_core.data import storage", {"saev_core.data.storage"}),
    ("from saev_core.sae import encode, weights", {"saev_core.sae", "saev_core.sae.weights"}),
    ("from .training import encode", {"saev_core.sae.training"}),
    ("def f():\n    import prefect", {"prefect"}),
])
def test_the_reader_sees_every_kind_of_import(tmp_path, source, expected):
    path = tmp_path / "x.py"
    path.write_text(source)
    assert _imports("saev_core.sae.x", path, set(_modules())) == expected
