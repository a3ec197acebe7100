"""The package's import graph points down: every module's imports (module-level, function-level and
``TYPE_CHECKING`` ones alike) are parsed, and the test fails on an import cycle or on an import of a higher layer.

    base <- model <- grow <- run plan (config, triggers, lag, schedule) <- parallel <- checkpoint
         <- train (run state, backend, growth, LAG runner, LAG across groups, trainer)
         <- apps (bench, cli, hf, handbook)

A module may import its own layer (without cycles) and any layer below it. The top-level ``kernels/`` and
``data_prep/`` folders are parsed too, under the names they import as (``nanogrow.kernels.*``,
``nanogrow.data_prep.*``: pyproject's ``package-dir``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nanogrow"
# Folders outside nanogrow/ whose files are submodules of a nanogrow package (their front module sets __path__).
MAPPED = {"kernels": "nanogrow.kernels", "data_prep": "nanogrow.data_prep"}

# Lowest first. A module belongs to the first entry that is it or a package above it.
LAYERS = [
    ("base", ["nanogrow", "nanogrow.dist_utils", "nanogrow.errors", "nanogrow.integrity", "nanogrow.kernels",
              "nanogrow.metrics", "nanogrow.safe_dcp", "nanogrow.data", "nanogrow.logs", "nanogrow.tracking",
              "nanogrow.plot", "nanogrow.progress", "nanogrow.frozen"]),
    ("model", ["nanogrow.model"]),
    ("grow", ["nanogrow.grow"]),
    # Sharding, meshes and what each parallelism supports: below the run plan, whose validation asks it.
    ("parallel", ["nanogrow.parallel"]),
    ("run plan", ["nanogrow.schedule", "nanogrow.triggers", "nanogrow.lag", "nanogrow.config"]),
    ("checkpoint", ["nanogrow.checkpoint", "nanogrow.offline", "nanogrow.run_lock"]),
    ("train", ["nanogrow.run_state", "nanogrow.backend", "nanogrow.growth", "nanogrow.lag_runner",
               "nanogrow.lag_parallel", "nanogrow.train"]),
    ("apps", ["nanogrow.bench", "nanogrow.cli", "nanogrow.gpu_check", "nanogrow.hf", "nanogrow.handbook",
              "nanogrow.inference", "nanogrow.sample", "nanogrow.evaluate",
              "nanogrow.data_prep"]),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    for folder, package in MAPPED.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            out[".".join([package] + parts)] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported nanogrow module, line) for every import statement anywhere in the file."""
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from package import submodule`` imports the submodule
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] != "nanogrow":
                continue
            while t not in known and "." in t:
                t = t.rsplit(".", 1)[0]
            if t != name:
                found.append((t, node.lineno))
    return found


def layer_of(name: str) -> int:
    best, best_len = None, -1
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if (name == m or name.startswith(m + ".")) and len(m) > best_len:
                best, best_len = i, len(m)
    assert best is not None, f"{name} is in no layer of tests/test_imports.py: add it to LAYERS"
    return best


def graph() -> dict[str, list[tuple[str, int]]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_imports_point_down():
    upward = []
    for name, deps in graph().items():
        for dep, line in deps:
            if dep == "nanogrow":  # the package itself (its __init__ imports nothing of ours)
                continue
            if layer_of(dep) > layer_of(name):
                upward.append(f"{name}:{line} imports {dep} ({LAYERS[layer_of(name)][0]} -> "
                              f"{LAYERS[layer_of(dep)][0]})")
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    g = {name: sorted({d for d, _ in deps}) for name, deps in graph().items()}
    # A package's __init__ importing its submodules is not a cycle with a submodule importing a sibling through
    # the package: edges to a package are edges to its __init__ file, which is what is parsed.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in g.get(n, []):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_kernels_and_data_prep_are_parsed():
    """The mapped folders are in the graph under their import names, with their relative imports resolved."""
    g = graph()
    assert "nanogrow.kernels.dispatch" in g and "nanogrow.data_prep.prepare" in g
    assert "nanogrow.kernels.ops" in {d for d, _ in g["nanogrow.kernels.dispatch"]}
    assert "nanogrow.data" in {d for d, _ in g["nanogrow.data_prep.prepare"]}


def test_the_checker_sees_function_level_imports(tmp_path):
    """The parser finds an import inside a function body (the way cycles used to hide)."""
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from nanogrow.train import Trainer\n    return Trainer\n")
    assert imports_of("nanogrow.model", src, modules()) == [("nanogrow.train", 2)]
