"""Import hygiene: every third-party module the code imports is a declared dependency, and the
`evaluation` package never pulls in Ray or the runner."""
from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runner", "evaluation")  # first party: never looked up


def _norm(name: str) -> str:
    """A distribution name normalised (PEP 503): lower case, runs of -, _ and . equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    """"ray[default,tune]==2.60.0 ; python_version<'3.13'" -> "ray" (extras, versions, markers dropped)."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    assert m, f"pyproject.toml: cannot read the requirement {req!r}"
    return _norm(m.group(1))


def declared_distributions() -> set[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {_requirement_name(r) for r in reqs}


def imported_modules() -> dict[str, set[str]]:
    """Top-level module -> files importing it (module level and inside functions), for every
    absolute import under runner/ and evaluation/."""
    found: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_imported_third_party_modules_are_declared():
    declared = declared_distributions()
    dists_of = importlib.metadata.packages_distributions()
    problems = []
    for module, files in sorted(imported_modules().items()):
        if module in sys.stdlib_module_names or module in PACKAGES:
            continue
        # A module not installed here is looked up by its own name (e.g. an optional backend).
        dists = dists_of.get(module) or [module]
        if not any(_norm(d) in declared for d in dists):
            problems.append(f"{module} (distribution {', '.join(sorted(set(dists)))}) imported by "
                            f"{', '.join(sorted(files)[:3])}{' …' if len(files) > 3 else ''}")
    assert not problems, "undeclared in pyproject.toml (dependencies or optional-dependencies):\n" + \
        "\n".join(problems)


def test_requirement_names_are_normalised():
    assert _requirement_name("ray[default,tune,train]==2.60.0") == "ray"
    assert _requirement_name("lm_eval==0.4.13") == _norm("lm-eval") == "lm-eval"
    assert _requirement_name("scikit-learn>=1.4 ; python_version >= '3.10'") == "scikit-learn"
    assert _norm("PyYAML") == _norm("pyyaml") and _norm("zope.interface") == _norm("zope_interface")


_PROBE = r"""
import importlib, json, pkgutil, sys
import evaluation
failed = {}
def unwalkable(name):
    failed[name] = "walk_packages could not import it"
for m in pkgutil.walk_packages(evaluation.__path__, "evaluation.", onerror=unwalkable):
    try:
        importlib.import_module(m.name)
    except Exception as e:
        failed[m.name] = f"{type(e).__name__}: {e}"
imported = sorted(n for n in sys.modules if n.startswith("evaluation"))
leaked = sorted(n for n in sys.modules if n.split(".")[0] in ("ray", "runner"))
print(json.dumps({"imported": imported, "leaked": leaked, "failed": failed}))
"""


def test_evaluation_imports_neither_ray_nor_runner():
    r = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not out["failed"], out["failed"]
    assert "evaluation.judges.values" in out["imported"] and "evaluation.errors" in out["imported"]
    assert not out["leaked"], f"importing evaluation loaded {out['leaked'][:10]}"
