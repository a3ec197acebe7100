"""ruff over the repository with pyproject's settings (pycodestyle, pyflakes and mccabe's C901 complexity limit),
so that the limit and its listed exceptions are checked by the suite CI runs, not only by hand."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                    reason="ruff is not installed (pyproject's dev extra, which launch/setup.sh installs, has it)")
def test_ruff_is_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
