"""The package's layers: every module's imports (those inside functions included) are read from its source, and
the test fails on an import cycle, on an import from a higher layer, and on a function-local import of the
project's own modules (a lazy import of a heavy third-party library inside a function is fine).

The layers, low to high (README, "How the code is organised"); a module may import its own layer and those below.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "variants", "studies", "reports")
LAYERS = [  # (layer name, the packages or modules in it)
    ("errors", ("bench.errors",)),
    ("runtime", ("bench.runtime",)),
    ("diffusion, nets, data", ("bench.diffusion", "bench.nets", "bench.data")),
    ("variants", ("variants",)),
    ("metrics, tracking", ("bench.metrics", "bench.tracking")),
    ("training", ("bench.training",)),
    ("studies, reports, published", ("studies", "reports", "bench.published")),
    ("serve", ("bench.serve",)),
    ("cli", ("bench.cli",)),
    ("the public API", ("bench", "bench.__main__")),  # bench/__init__.py re-exports; nothing in the project imports it
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest package prefix that holds ``module``."""
    best, best_len = None, -1
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if (module == m or module.startswith(m + ".")) and len(m) > best_len:
                best, best_len = i, len(m)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add its package to LAYERS and to the README")
    return best


def _resolve(name: str) -> str | None:
    """The project module an imported name lives in (``bench.tracking.store.client`` → ``bench.tracking.store``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def project_imports(module: str, path: Path | None = None) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import statement of ``module`` (read from
    ``path``, by default its file in the project)."""
    path = path or MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    local = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
             for n in ast.walk(f) if isinstance(n, ast.Import | ast.ImportFrom)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1],
                                 *([base] if base else [])])
            names = [f"{base}.{a.name}" for a in node.names]  # a submodule if it is one, else a name in ``base``
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                found.append((target, node.lineno, id(node) in local))
    return found


GRAPH = {m: project_imports(m) for m in MODULES}


def test_every_module_is_in_a_layer_and_the_layer_table_reads_from_low_to_high():
    assert MODULES, "no modules found"
    for m in MODULES:
        layer_of(m)
    assert layer_of("bench.errors") < layer_of("bench.runtime.dist") < layer_of("bench.diffusion.bound")
    assert layer_of("bench.diffusion.bound") < layer_of("variants.simple") < layer_of("bench.training.config")


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {target} ({LAYERS[layer_of(target)][0]}, above "
              f"{LAYERS[layer_of(m)][0]})"
              for m, edges in GRAPH.items() for target, line, _ in sorted(set(edges)) if layer_of(target) > layer_of(m)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_nothing_in_the_project_imports_the_public_api_facade():
    users = [f"{MODULES[m].relative_to(ROOT)}:{line}" for m, edges in GRAPH.items() for target, line, _ in edges
             if target == "bench" and m != "bench.__main__"]
    assert not users, "import the module that holds the name, not the bench facade: " + ", ".join(users)


def test_no_function_local_import_of_a_project_module():
    local = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {target} inside a function"
             for m, edges in GRAPH.items() for target, line, inside in sorted(set(edges)) if inside]
    assert not local, "move these to the top of the module (a cycle or an upward import is fixed, not dodged):\n" + \
        "\n".join(local)


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module → the modules it imports) as [a, b, …, a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in graph.get(m, []):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_there_is_no_import_cycle():
    cycle = find_cycle({m: sorted({t for t, _, _ in edges}) for m, edges in GRAPH.items()})
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_the_checker_sees_what_it_must_refuse(tmp_path):
    """The checks themselves: a cycle is found, an upward import and a function-local one are told apart."""
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None
    assert layer_of("bench.cli.main") > layer_of("bench.training.run") > layer_of("bench.metrics.fid")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("somewhere.else")
    probe = tmp_path / "probe.py"  # read as a runtime module that imports the trainer, in a function
    probe.write_text("from bench.errors import BenchError\nfrom . import dist\n\n\ndef f():\n"
                     "    from bench.training.run import train\n")
    edges = project_imports("bench.runtime._layers_probe", probe)
    assert ("bench.runtime.dist", 2, False) in edges
    assert ("bench.errors", 1, False) in edges and ("bench.training.run", 6, True) in edges
    assert layer_of("bench.training.run") > layer_of("bench.runtime._layers_probe")


def test_a_lazy_third_party_import_says_why():
    """An import inside a function is kept for a heavy third-party library only, and it says why (a comment),
    so that a reader sees it is deliberate; everything else is imported at the top of its module."""
    unexplained = []
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines), str(path))
        for f in ast.walk(tree):
            if not isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(f):
                if isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0):
                    name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    first = node.lineno  # a group of lazy imports may say why once, on any of its lines
                    while first > 1 and lines[first - 2].strip().startswith(("import ", "from ")):
                        first -= 1
                    said = "#" in "".join(lines[first - 1: node.end_lineno])
                    if name.split(".")[0] not in PACKAGES and not said:
                        unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno} {lines[node.lineno - 1].strip()}")
    assert not unexplained, "say why each is lazy (e.g. `# heavy: …`) or import it at the top:\n" + "\n".join(
        sorted(set(unexplained)))


def test_ruff_finds_nothing():
    """The lint `make test` runs first (line length 120, the broad-except rules the noqa markers name, import
    order), held by the suite so that CI keeps it."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", *PACKAGES, "tests", "benchmarks"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
