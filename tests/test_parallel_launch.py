"""The launch/ scripts: each prints its usage, and builds the torchrun / srun / deepspeed command it claims
(DRY_RUN=1 prints the command instead of running it). A real 2-process run of launch/torchrun.sh is in
test_torchrun_launcher_trains (slow-ish: ~10 s)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["torchrun.sh", "multinode.sh", "slurm.sbatch", "deepspeed.sh"]


def launch(script: str, *args: str, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS)
def test_launcher_prints_usage(script):
    p = launch(script, "--help")
    assert p.returncode == 0 and "usage:" in p.stdout
    p = launch(script)
    assert p.returncode == 2 and "usage:" in p.stdout


def test_torchrun_launcher_command():
    p = launch("torchrun.sh", "--nproc", "3", "--parallel", "fsdp", "configs/demo.toml", "--set", "train.lr=0.1",
               DRY_RUN="1")
    assert p.returncode == 0, p.stderr
    cmd = p.stderr.strip().splitlines()[-1]
    assert "-m torch.distributed.run --standalone --nproc_per_node=3 -m nanogrow.cli train --config " \
           "configs/demo.toml --set train.parallel=fsdp --set train.lr=0.1" in cmd


def test_multinode_launcher_command():
    p = launch("multinode.sh", "--nnodes", "2", "--nproc", "8", "--endpoint", "node01:29500", "--id", "run42",
               "configs/demo.toml", DRY_RUN="1")
    assert p.returncode == 0, p.stderr
    cmd = p.stderr.strip().splitlines()[-1]
    for part in ("--nnodes=2", "--nproc_per_node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node01:29500",
                 "--rdzv-id=run42", "-m nanogrow.cli train --config configs/demo.toml"):
        assert part in cmd


def test_slurm_script_command():
    p = launch("slurm.sbatch", "configs/demo.toml", "--resume", "auto", DRY_RUN="1", SLURM_JOB_NODELIST="n[1-2]",
               SLURM_NNODES="2", SLURM_JOB_ID="77", SLURM_GPUS_ON_NODE="4", SLURM_SUBMIT_DIR=str(ROOT),
               PATH=f"{ROOT / 'tests' / 'dist' / 'fake_slurm'}:{os.environ['PATH']}")
    assert p.returncode == 0, p.stderr
    cmd = p.stderr.strip().splitlines()[-1]
    for part in ("srun --kill-on-bad-exit=1", "--nnodes=2", "--nproc_per_node=4", "--rdzv-endpoint=n1:29500",
                 "--rdzv-id=77", "--set train.parallel=fsdp --resume auto"):
        assert part in cmd


@pytest.mark.slow
def test_torchrun_launcher_trains(tmp_path, demo_data):
    """Two gloo processes, two steps of the demo config at a tiny shape, through the launcher."""
    data = demo_data
    # model.n_layer: the demo's start depth (its growth's layer order names layers 0-3)
    sets = {"train.max_steps": 2, "train.warmup_steps": 1, "train.out_dir": tmp_path, "model.n_layer": 4,
            "model.d_model": 32, "model.n_head": 2, "model.n_kv_head": 2, "data.dir": data, "train.eval_every": 0,
            "train.eval_batches": 1}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    p = launch("torchrun.sh", "--nproc", "2", "configs/demo.toml", *args, OMP_NUM_THREADS="1")
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "2 process(es)" in p.stdout and "done: 2 steps" in p.stdout
