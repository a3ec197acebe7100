"""DeepSpeed ZeRO 1-3 growth (nanogrow.parallel.zero) on CPU with gloo, 2 processes: before growing, the ZeRO run
matches one-process training; the growth gives bit for bit the weights and moments ``grow(policy="map")`` gives
from the same state; the next steps' losses match. Skipped without deepspeed. The first DeepSpeed start compiles a
communication extension (~45 s) into TORCH_EXTENSIONS_DIR (default here: ~/.cache/nanogrow/ext)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_growth_matches_single_process(stage):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "nanogrow" / "ext"))
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(ROOT / "tests" / "dist" / "zero_worker.py"),
           str(stage), "stack,zero,msg"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    tail = "\n".join((p.stdout + p.stderr).splitlines()[-40:])
    assert p.returncode == 0, tail
    assert p.stdout.count(f"OK zero{stage}") == 3, tail


def test_zero_refuses_per_element_ages():
    from nanogrow.parallel.zero import ds_config, grow_zero

    with pytest.raises(ValueError, match="stage"):
        ds_config(4, 1)
    with pytest.raises(NotImplementedError, match="ages"):
        grow_zero(None, None, policy="map+age")
