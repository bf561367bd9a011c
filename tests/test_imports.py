"""How mkv's modules import each other: no cycles, and no side effects on import.

The graph is read from the source with `ast`, so nothing is imported to build it. Every
import statement counts wherever it is: at module level, under `if TYPE_CHECKING:`, and
inside functions. An import inside a function runs later, so it cannot fail at start
the way a module-level cycle does, but it is the usual way a cycle is hidden rather than
removed: the two modules still depend on each other, and which one may be imported first
becomes a rule nobody wrote down. Importing a module also runs its packages' __init__, so
an importer depends on the packages of what it imports too (mkv.a.b imports mkv.c.d: an
edge to mkv.c as well).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "mkv"

#: Entry points that read the configuration when imported, by design (gunicorn loads them).
ENTRY_POINTS = {
    "mkv.service.wsgi",
    "mkv.service.gunicorn_conf",
}

Graph = Mapping[str, Iterable[str]]


# --- reading the graph from the source ----------------------------------------------------------


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package, by dotted name; a package is its __init__.py."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def parents(name: str) -> list[str]:
    """The packages whose __init__ runs before `name`: mkv.a.b -> [mkv, mkv.a]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_statements(source: str, module: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """Every import statement anywhere in `source`, as (X, [X.y, ...]): `import X` gives
    (X, []), `from X import y, z` gives (X, [X.y, X.z]), relative names resolved."""
    package = module if is_package else module.rpartition(".")[0]
    statements: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            statements += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level > 1:
                    parts = parts[:-(node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            statements.append((base, [f"{base}.{a.name}" for a in node.names if a.name != "*"]
                               or [f"{base}.*"]))
    return statements


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    """module -> the package's modules its import statements load.

    `from X import y` loads X.y when y is a module, and X itself when y is a name X
    defines. Loading a module runs its packages' __init__ first, so those are edges too,
    except the importer's own packages: they run before the importer whatever it imports.
    """
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for base, names in import_statements(path.read_text("utf-8"), name,
                                             path.name == "__init__.py"):
            loads = [n for n in names if n in modules]
            if base in modules and (not names or len(loads) < len(names)):
                loads.append(base)
            for target in loads:
                targets.add(target)
                targets.update(p for p in parents(target) if p not in parents(name))
        targets.discard(name)
        graph[name] = targets
    return graph


# --- finding cycles -----------------------------------------------------------------------------


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle, as [a, b, ..., a], through each strongly connected component that has
    one (Tarjan's algorithm, iterative; then a shortest path back within the component)."""
    nodes = set(graph) | {t for targets in graph.values() for t in targets}
    succ = {n: sorted(set(graph.get(n, ()))) for n in sorted(nodes)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in succ:
        if root in index:
            continue
        work = [(root, iter(succ[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(succ[child])))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    cycles = []
    for component in components:
        start = component[0]
        if len(component) == 1 and start not in succ[start]:
            continue
        members = set(component)
        # breadth-first from start's successors back to start, inside the component
        previous: dict[str, str] = {}
        frontier = [start]
        found = False
        while frontier and not found:
            nxt = []
            for node in frontier:
                for child in succ[node]:
                    if child not in members or child in previous:
                        continue
                    previous[child] = node
                    if child == start:
                        found = True
                        break
                    nxt.append(child)
                if found:
                    break
            frontier = nxt
        path = [start]
        node = previous[start]
        while node != start:
            path.append(node)
            node = previous[node]
        path.append(start)
        cycles.append(path[::-1])
    return cycles


def describe(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(cycle) for cycle in cycles)


# --- the finder itself --------------------------------------------------------------------------


@pytest.mark.parametrize("graph, expected", [
    ({}, []),
    ({"a": ["b"], "b": ["c"], "c": []}, []),
    ({"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": []}, []),  # a diamond is no cycle
    ({"a": ["a"]}, [["a", "a"]]),
    ({"a": ["b"], "b": ["a"]}, [["a", "b", "a"]]),
    ({"x": ["a"], "a": ["b"], "b": ["c"], "c": ["a", "d"], "d": []}, [["a", "b", "c", "a"]]),
    ({"a": ["b"], "b": ["a"], "c": ["d"], "d": ["e"], "e": ["c"]},
     [["a", "b", "a"], ["c", "d", "e", "c"]]),
    ({"a": ["b"], "b": ["c", "a"], "c": ["a"]}, [["a", "b", "a"]]),  # the shortest way back
])
def test_the_cycle_finder_on_small_graphs(graph: Graph, expected: list[list[str]]) -> None:
    assert sorted(find_cycles(graph)) == expected


def test_the_cycle_finder_on_a_long_chain_does_not_recurse() -> None:
    n = 5000
    chain = {f"m{i}": [f"m{i + 1}"] for i in range(n)}
    assert find_cycles(chain) == []
    chain[f"m{n}"] = ["m0"]
    (cycle,) = find_cycles(chain)
    assert len(cycle) == n + 2 and cycle[0] == cycle[-1]


def test_every_kind_of_import_statement_is_an_edge(tmp_path: Path) -> None:
    pkg = tmp_path / "mkv"
    files = {
        "__init__.py": "",
        "a.py": "",
        "b.py": "",
        "c.py": "",
        "d.py": "",
        "e.py": "",
        "sub/__init__.py": "from . import inner\n",
        "sub/inner.py": "from .. import a\nfrom ..b import thing\n",
        "sub/other.py": "from .inner import x\n",
        "top.py": textwrap.dedent("""\
            from __future__ import annotations
            import os
            from typing import TYPE_CHECKING
            import mkv.c as c
            from mkv import sub
            if TYPE_CHECKING:
                from mkv.d import D
            def later():
                from mkv.e import E
            """),
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    graph = import_graph(module_files(tmp_path, "mkv"))
    assert graph["mkv.top"] == {"mkv.c", "mkv.d", "mkv.e", "mkv.sub"}
    assert graph["mkv.sub"] == {"mkv.sub.inner"}
    assert graph["mkv.sub.inner"] == {"mkv.a", "mkv.b"}
    assert graph["mkv.sub.other"] == {"mkv.sub.inner"}
    assert find_cycles(graph) == []

    # a submodule that imports its package's __init__, which imports it: a cycle
    (pkg / "sub/inner.py").write_text("from mkv.sub import other\n")
    (pkg / "sub/other.py").write_text("import mkv.sub\n")
    cycles = find_cycles(import_graph(module_files(tmp_path, "mkv")))
    assert cycles == [["mkv.sub", "mkv.sub.inner", "mkv.sub.other", "mkv.sub"]], cycles


# --- mkv ----------------------------------------------------------------------------------------


def test_mkv_modules_import_each_other_without_cycles() -> None:
    modules = module_files()
    assert {"mkv.service.app", "mkv.service.store", "mkv.writer.protocol"} <= set(modules)
    graph = import_graph(modules)
    assert "mkv.service.store" in graph["mkv.service.app"]  # the graph is really read
    cycles = find_cycles(graph)
    assert not cycles, "import cycles between mkv modules:\n" + describe(cycles)


IMPORT_ALL = textwrap.dedent("""\
    import importlib, json, os, sys, threading
    before = dict(os.environ)
    for name in sys.argv[1:]:
        importlib.import_module(name)
    after = dict(os.environ)
    print(json.dumps({
        "changed": sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)),
        "threads": [t.name for t in threading.enumerate()],
    }))
    """)


def side_effects_of_importing(names: list[str], path: Path, scratch: Path) -> dict:
    """Import `names` (found on `path`) in a fresh interpreter whose TMPDIR and working
    directory are new, empty directories under `scratch`, without PROMETHEUS_MULTIPROC_DIR.
    What changed: environment variables, threads besides the main one, files made."""
    tmp, cwd = scratch / "tmp", scratch / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(TMPDIR=str(tmp), PYTHONPATH=str(path), PYTHONDONTWRITEBYTECODE="1")
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL, *names], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    return {"environment": report["changed"],
            "threads": [t for t in report["threads"] if t != "MainThread"],
            "files": sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*")
                            if p not in (tmp, cwd))}


def test_side_effects_of_importing_are_seen(tmp_path: Path) -> None:
    """The check below on a module that misbehaves in every way it looks for."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "noisy.py").write_text(textwrap.dedent("""\
        import os, tempfile, threading, time
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="m-")
        open("left-behind", "w").close()
        threading.Thread(target=time.sleep, args=(1,), name="busy", daemon=True).start()
        """))
    (tmp_path / "src" / "quiet.py").write_text("import os, tempfile\n")
    scratch = tmp_path / "quiet"
    scratch.mkdir()
    assert side_effects_of_importing(["quiet"], tmp_path / "src", scratch) == {
        "environment": [], "threads": [], "files": []}
    scratch = tmp_path / "noisy"
    scratch.mkdir()
    seen = side_effects_of_importing(["quiet", "noisy"], tmp_path / "src", scratch)
    assert seen["environment"] == ["PROMETHEUS_MULTIPROC_DIR"]
    assert seen["threads"] == ["busy"]
    assert seen["files"][0] == "cwd/left-behind" and seen["files"][1].startswith("tmp/m-")


def test_importing_any_mkv_module_has_no_side_effects(tmp_path: Path) -> None:
    """No metrics directory, no environment variable, no file, no thread: importing is not
    running. Every module but the entry points, in one fresh interpreter."""
    names = sorted(set(module_files()) - ENTRY_POINTS)
    assert "mkv.service.metrics" in names and "mkv.service.metricsdir" in names
    seen = side_effects_of_importing(names, ROOT, tmp_path)
    assert seen == {"environment": [], "threads": [], "files": []}, seen
