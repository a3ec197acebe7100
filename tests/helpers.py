"""What several test files share: one runner for torchrun launches (and other subprocesses) and the tiny-run
config builders. Imported as ``from helpers import ...`` (tests/ is on sys.path under pytest)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
WORKER = ROOT / "tests" / "dist" / "worker.py"
ZERO_WORKER = ROOT / "tests" / "dist" / "zero_worker.py"


def run(cmd: list, timeout: float = 240.0, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``cmd`` from the repository root with one thread per process; with ``check``, a non-zero exit fails the
    test with the last lines of its output."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(map(str, cmd[1:]))} failed (exit {proc.returncode}):\n{tail(proc)}"
    return proc


def torchrun(nproc: int, *args, timeout: float = 240.0, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc ARGS`` (gloo on CPU), through ``run``."""
    return run([TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *args], timeout=timeout, env=env, check=check)


def run_worker(nproc: int, *args, timeout: float = 150.0, check: bool = True) -> subprocess.CompletedProcess:
    """``tests/dist/worker.py ARGS`` at ``nproc`` processes; the worker checks against one process on every rank
    and prints ``OK ...``: with ``check``, a non-zero exit or a missing OK line fails the test."""
    proc = torchrun(nproc, WORKER, *args, timeout=timeout, env={"NANOGROW_DIST_TIMEOUT": "60"}, check=check)
    if check:
        assert "OK " in proc.stdout, f"{' '.join(map(str, args))}: no OK line:\n{tail(proc)}"
    return proc


def zero_env() -> dict:
    """DeepSpeed compiles a communication extension on first start (~45 s): keep it in a cached directory."""
    return {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(Path.home() / ".cache" / "nanogrow" / "ext"))}


def tail(proc: subprocess.CompletedProcess, lines: int = 40) -> str:
    return "\n".join((proc.stdout + proc.stderr).splitlines()[-lines:])


def tiny_run_config(data_dir, out_dir, **train):
    """A seeded two-layer model that trains in well under a second per step on CPU."""
    from nanogrow.config import load_config

    overrides = {
        "model.n_layer": 2, "model.d_model": 64, "model.n_head": 4, "model.n_kv_head": 2, "model.vocab_size": 512,
        "model.max_seq_len": 64, "data.dir": f"'{data_dir}'", "data.seq_len": 64, "train.out_dir": f"'{out_dir}'",
        "train.micro_batch": 4, "train.max_steps": 12, "train.warmup_steps": 2, "train.lr": 0.01,
        "train.eval_every": 0, "train.eval_batches": 2, "train.eval_batch_size": 4, "train.log_every": 1000,
    }
    overrides.update({f"train.{k}": (f"'{v}'" if isinstance(v, str) else v) for k, v in train.items()})
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def with_stages(cfg, stages, **growth):
    """``cfg`` with these [[stage]] tables and [growth] values, validated like a TOML file would be."""
    from nanogrow.config import RunConfig, validate

    raw = cfg.to_dict()
    raw["growth"].update(growth)
    raw["stage"] = stages
    cfg = RunConfig.from_dict(raw)
    validate(cfg)
    return cfg


def run_steps(trainer, n):
    """n turns of ``Trainer.advance``: growth whenever the trainer's trigger says so, then a step."""
    return [trainer.advance() for _ in range(n)]


# The [model] and [data] tables of the TOML configs the torchrun tests write ({data}: the data directory).
TINY_MODEL_TOML = """
[model]
n_layer = {n_layer}
d_model = 64
n_head = 4
n_kv_head = 2
vocab_size = 512
max_seq_len = 64

[data]
dir = "{{data}}"
seq_len = 64
"""


def tiny_model_toml(n_layer: int) -> str:
    """TINY_MODEL_TOML for ``n_layer`` layers, still a ``str.format`` template in ``{data}``."""
    return TINY_MODEL_TOML.format(n_layer=n_layer)


# A tiny model shape for forward tests (test_model.py, test_sample.py).
TINY_CACHE_MODEL = dict(n_layer=2, d_model=32, n_head=4, n_kv_head=2, vocab_size=97, max_seq_len=24, init_std=0.1)


def masked_model(**kw):
    """A seeded tiny model (TINY_CACHE_MODEL, ``kw`` changing it) with every kind of growth mask set to values
    strictly between 0 and 1, as in the middle of a fade-in: whatever runs the model must carry them."""
    import torch

    from nanogrow.grow.fade import set_buffer
    from nanogrow.model import ModelConfig, build_model

    model = build_model(ModelConfig(**{**TINY_CACHE_MODEL, **kw}), seed=0)
    c, g = model.config, torch.Generator().manual_seed(1)
    set_buffer(model, "resid_mask", torch.rand(c.d_model, generator=g))
    set_buffer(model, "layers.0.attn.head_mask", torch.rand(c.n_head, generator=g))
    set_buffer(model, "layers.1.mlp.unit_mask", torch.rand(c.d_ff, generator=g))
    set_buffer(model, "layers.1.block_mask", torch.tensor(0.3))
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Imported by a test module, runs its tests on one torch thread (the machine is shared)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
