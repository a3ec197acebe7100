"""Every public function of the training layer's core (``train``, ``growth``, ``config``, ``parallel/``) has type
hints on all its parameters and its return (issue 28's guard). Read from the source with ``ast``: a public
function is a module-level ``def`` or a method of a public class (``__init__`` included) whose name has no leading
underscore; nested functions are helpers and are not counted.

mypy runs clean on the modules in ``MYPY_CLEAN`` (the config package, the backends' support table, the triggers);
over ``train``, ``growth`` and the rest of ``parallel/`` it still reports ~50 errors, most from torch's typing of
module attributes (``model.layers`` is ``Tensor | Module`` to it), which would take casts or ignores to silence."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "nanogrow"
MYPY_CLEAN = ["nanogrow/config", "nanogrow/parallel/support.py", "nanogrow/triggers.py"]
MODULES = [ROOT / "train.py", ROOT / "growth.py", *sorted((ROOT / "config").glob("*.py")),
           *sorted((ROOT / "parallel").glob("*.py"))]


def public_functions(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for f in node.body:
                if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                        not f.name.startswith("_") or f.name == "__init__"):
                    yield f"{node.name}.{f.name}", f


def missing_hints(f: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = f.args
    params = a.posonlyargs + a.args + a.kwonlyargs + [p for p in (a.vararg, a.kwarg) if p is not None]
    out = [p.arg for p in params if p.annotation is None and p.arg not in ("self", "cls")]
    return out + (["return"] if f.returns is None else [])


def test_public_functions_are_typed():
    bad = []
    for path in MODULES:
        for name, f in public_functions(ast.parse(path.read_text(), str(path))):
            miss = missing_hints(f)
            if miss:
                bad.append(f"{path.relative_to(ROOT.parent)}:{f.lineno} {name}: no hint for {', '.join(miss)}")
    assert not bad, "public functions without type hints:\n" + "\n".join(bad)


def test_the_check_finds_a_missing_hint():
    tree = ast.parse("def f(x, y: int):\n    return x\nclass C:\n    def m(self) -> None: ...\n")
    found = {name: missing_hints(f) for name, f in public_functions(tree)}
    assert found == {"f": ["x", "return"], "C.m": []}


def test_mypy_is_clean_where_it_has_been_made_clean():
    """A type error added to a module mypy already passes fails here (mypy comes with the dev extra)."""
    pytest.importorskip("mypy")
    out = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent",
                          "--no-incremental", *MYPY_CLEAN], cwd=ROOT.parent, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
