"""Issue #28's boundary, as a ratchet: which modules outside ``train.py`` write attributes of the Trainer.

The goal is none (growth as a function of explicit state, a LAG candidate as its own ``RunState``). Until then the
writes that exist are listed here, by module and attribute, and the test fails on a new one (a module that starts
reaching into the Trainer) and on a listed one that is gone (take it off the list: the ratchet only tightens).
A write is an assignment (plain, augmented, annotated, or an element of a tuple target) to ``NAME.attr`` where NAME
is ``tr`` or ``trainer`` (how the modules name their Trainer) or ``self.trainer``; writes into the Trainer's own
mutable parts (``tr.batch.max_steps``: the batch layout, ``run_state.BatchLayout``) are not writes of its attributes.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nanogrow"
TRAINER_NAMES = {"tr", "trainer"}

# (module, attribute) written today; shrink it as the growth and LAG code moves to explicit state.
KNOWN = {
    ("growth.py", "model"), ("growth.py", "optimizer"), ("growth.py", "model_config"), ("growth.py", "ramp"),
    ("growth.py", "compile_seconds"), ("growth.py", "stage_index"), ("growth.py", "trigger"),
    ("lag_runner.py", "model"), ("lag_runner.py", "optimizer"),
    ("lag_parallel.py", "loader"), ("lag_parallel.py", "world"), ("lag_parallel.py", "groups"),
    ("lag_parallel.py", "dp_group"), ("lag_parallel.py", "model"), ("lag_parallel.py", "optimizer"),
    ("run_state.py", "step"), ("run_state.py", "stage_index"), ("run_state.py", "model_config"),
    ("run_state.py", "history"), ("run_state.py", "growth_lr"), ("run_state.py", "ramp"), ("run_state.py", "trigger"),
}


def is_trainer(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id in TRAINER_NAMES) or (
        isinstance(node, ast.Attribute) and node.attr == "trainer" and isinstance(node.value, ast.Name)
        and node.value.id == "self")


def targets(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        out = list(node.targets)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        out = [node.target]
    else:
        return []
    flat = []
    while out:
        t = out.pop()
        if isinstance(t, (ast.Tuple, ast.List)):
            out.extend(t.elts)
        else:
            flat.append(t)
    return flat


def trainer_writes(package: Path = PACKAGE) -> set[tuple[str, str]]:
    found = set()
    for path in package.rglob("*.py"):
        rel = path.relative_to(package).as_posix()
        if rel == "train.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for t in targets(node):
                if isinstance(t, ast.Attribute) and is_trainer(t.value):
                    found.add((rel, t.attr))
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                    and node.args and is_trainer(node.args[0])):
                found.add((rel, "<setattr>"))
    return found


def test_no_new_module_writes_trainer_attributes():
    found = trainer_writes()
    new = sorted(found - KNOWN)
    assert not new, (f"modules outside train.py now write Trainer attributes {new}: pass the value back to the "
                     f"Trainer (or keep it in RunState / the batch layout) instead")
    gone = sorted(KNOWN - found)
    assert not gone, f"no longer written outside train.py: {gone}; remove them from KNOWN (the ratchet tightens)"


def test_the_check_sees_writes(tmp_path):
    """The scanner finds plain, tuple and augmented writes through tr / trainer / self.trainer, and not writes into
    the Trainer's parts."""
    pkg = tmp_path / "nanogrow"
    pkg.mkdir()
    (pkg / "train.py").write_text("tr.ignored = 1\n")
    (pkg / "x.py").write_text("tr.a = 1\ntrainer.b, c = 1, 2\nself.trainer.d += 1\ntr.batch.e = 3\n"
                              "setattr(trainer, 'f', 1)\n")
    assert trainer_writes(pkg) == {("x.py", "a"), ("x.py", "b"), ("x.py", "d"), ("x.py", "<setattr>")}
