"""The house rules a newcomer can rely on: no import cycle among valind's modules, no module over
500 lines and no function over 80, imports inside functions only to defer a heavy dependency (with
the reason on the line), and the stage layer, the run context and `evaluation/` type-check strictly."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runner", "evaluation")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
DEFERRED = "# deferred:"  # the marker an import inside a function carries, with its reason


def _modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file, for every module of valind's packages (a package is its __init__)."""
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (they never run)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return ids


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, mods: dict) -> set[str]:
    """The first-party modules an import statement loads (a `from pkg import sub` names the submodule)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in mods}
    if node.level:
        parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join(parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    found = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods}
    if len(found) < len(node.names) and base in mods:
        found.add(base)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the first-party modules it imports, anywhere in it (inside functions too)."""
    mods = _modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        skip = _type_checking_only(tree)
        graph[name] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
                graph[name] |= _targets(name, path.name == "__init__.py", node, mods) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    (tmp_path / "runner").mkdir()
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "runner" / "__init__.py").write_text("")
    (tmp_path / "evaluation" / "__init__.py").write_text("")
    (tmp_path / "runner" / "a.py").write_text("from runner import b\n")
    (tmp_path / "runner" / "b.py").write_text("def f():\n    from .c import x  # deferred: test\n")
    (tmp_path / "runner" / "c.py").write_text("from typing import TYPE_CHECKING\nimport runner.a\n"
                                              "if TYPE_CHECKING:\n    from runner import d\n")
    (tmp_path / "runner" / "d.py").write_text("from runner.c import y\n")
    assert cycles(import_graph(tmp_path)) == [["runner.a", "runner.b", "runner.c"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (each line one strongly connected set of modules):\n" + \
        "\n".join(" ↔ ".join(c) for c in found)


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them along their seams): {long}"


def test_no_function_over_80_lines():
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def deferred_import_problems(path: Path) -> list[str]:
    """Imports inside functions that are not a third-party dependency deferred with `# deferred: why`
    on the import's line or on the comment line above its block of imports."""
    lines = path.read_text(encoding="utf-8").splitlines()
    tree = ast.parse("\n".join(lines))
    problems = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            top = (node.module or "" if isinstance(node, ast.ImportFrom) else node.names[0].name).split(".")[0]
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{node.lineno}"
            if top in sys.stdlib_module_names and not getattr(node, "level", 0):
                problems.append(f"{where}: the standard library's {top!r} belongs at the top of the module")
                continue
            i = node.lineno - 1
            while i > 0 and lines[i - 1].strip().startswith(("import ", "from ")) and DEFERRED not in lines[i]:
                i -= 1
            reason = lines[i] if DEFERRED in lines[i] else lines[i - 1] if i > 0 else ""
            if DEFERRED not in reason or not reason.split(DEFERRED, 1)[1].strip():
                problems.append(f"{where}: an import inside a function needs `{DEFERRED} <why>` "
                                f"(a heavy dependency deferred); otherwise import it at the top")
    return problems


def test_the_deferred_import_rule_catches_a_bare_one(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def ok():\n    # deferred: ray starts a runtime on import\n    import ray\n    import ray.train\n"
                 "def ok2():\n    import torch  # deferred: 2 s to import\n"
                 "def bare():\n    import vllm\n"
                 "def stdlib():\n    import json  # deferred: no\n"
                 "def empty():\n    import vllm  # deferred:\n")
    assert [p.split(": ", 1)[0].rsplit(":", 1)[1] for p in deferred_import_problems(f)] == ["8", "10", "12"]


def test_imports_inside_functions_only_defer_a_heavy_dependency():
    problems = [p for path in _modules().values() for p in deferred_import_problems(path)]
    assert not problems, f"{len(problems)} imports inside functions:\n" + "\n".join(problems)


def test_the_typed_layers_type_check_strictly():
    """mypy --strict (settings in pyproject.toml) on runner/stages, runner/context.py and evaluation/."""
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent))
    if mypy is None:
        pytest.fail("mypy is not installed: `make setup` installs it (the dev extra)")
    out = subprocess.run([mypy, "--no-error-summary"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, f"mypy --strict found errors:\n{out.stdout[-6000:]}{out.stderr[-2000:]}"


def dot(graph: dict[str, set[str]]) -> str:
    """The module graph in Graphviz's language, one box per package (`make module-graph` draws it)."""
    groups: dict[str, list[str]] = {}
    for m in sorted(graph):
        groups.setdefault(m.rsplit(".", 1)[0] if m.count(".") else m, []).append(m)
    out = ["digraph valind {", '  rankdir=TB; ranksep=0.6; node [shape=box, fontsize=10, height=0.2]; edge [color="#00000055"];']
    for i, (pkg, members) in enumerate(sorted(groups.items())):
        out.append(f'  subgraph cluster_{i} {{ label="{pkg}"; style=rounded;')
        out += [f'    "{m}" [label="{m.rsplit(".", 1)[-1]}"];' for m in members]
        out.append("  }")
    out += [f'  "{a}" -> "{b}";' for a in sorted(graph) for b in sorted(graph[a])]
    return "\n".join(out + ["}"])


if __name__ == "__main__":
    print(dot(import_graph()))
