"""nanogrow.parallel on CPU: FSDP2 / DDP / HSDP with gloo under torchrun (2-4 processes, tiny models).

Each multi-process test launches ``torchrun --standalone tests/dist/worker.py <mode>`` with a timeout; the worker
recomputes the one-process reference on every rank and asserts, so a wrong result is a non-zero exit here.
About 7 s of each launch is torchrun / process-group start-up on this machine."""

from __future__ import annotations

import time

import pytest
import torch

from nanogrow.grow import grow, make_plan
from nanogrow.grow.testing import tiny_config, trained_model
from nanogrow.parallel import backend_of, grow_parallel, make_mesh, parallelize

from helpers import run_worker as torchrun

# ---- one process ------------------------------------------------------------------------------------------

def test_parallelize_none_is_the_model_and_bad_backend_names_the_choices():
    model, _ = trained_model(tiny_config(), steps=0)
    assert parallelize(model, "none") is model and backend_of(model) == "none"
    with pytest.raises(ValueError, match="fsdp"):
        parallelize(model, "zero3")
    with pytest.raises(ValueError, match="fsdp"):
        make_mesh("tp")
    with pytest.raises(RuntimeError, match="torchrun"):
        parallelize(model, "fsdp")  # no process group


def test_grow_parallel_without_backend_is_grow():
    cfg = tiny_config()
    model, opt = trained_model(cfg, steps=2)
    plan = make_plan("zero", cfg, cfg.__class__(**{**cfg.__dict__, "d_ff": 96}))
    a, ao = grow(model, opt, plan)
    b, bo = grow_parallel(model, opt, plan)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
        assert all(torch.equal(ao.state[p][k], bo.state[q][k]) for k in ao.state[p])


# ---- torchrun, gloo -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_fsdp_ddp_hsdp_training_matches_single_process():
    out = torchrun(2, "train", "fsdp,ddp,hsdp").stdout
    assert out.count("OK train") == 3


@pytest.mark.slow
def test_no_sync_accumulation_gives_the_synced_gradients():
    """DDP and FSDP2 reduce gradients once per optimizer step (the last micro-batch), and the gradients equal those
    of a reduction on every micro-batch (tests/dist/tolerance.py: grad_tol)."""
    out = torchrun(2, "nosync", "ddp,fsdp").stdout
    assert out.count("OK nosync") == 2


@pytest.mark.slow
def test_fsdp_growth_matches_single_process():
    """stack (whole copies shard to shard), zero / msg width (gathered), joint (both), policies map+age, map, reset:
    exactly grow()'s full weights, moments and ages; the next steps' losses within 1e-5."""
    out = torchrun(2, "grow", "fsdp", "stack,zero,msg,joint,zero:map,msg:reset").stdout
    assert out.count("OK grow") == 6


@pytest.mark.slow
def test_fsdp_growth_at_3_processes_uneven_shards():
    out = torchrun(3, "grow", "fsdp", "zero,joint").stdout
    assert out.count("OK grow") == 2


@pytest.mark.slow
def test_ddp_and_hsdp_growth_match_single_process():
    torchrun(2, "grow", "ddp", "stack,msg")
    torchrun(2, "grow", "hsdp", "zero")


@pytest.mark.slow
def test_fsdp_checkpoint_saved_at_2_resumes_at_1_and_3(tmp_path):
    """Saved after an msg growth (per-element ages, fade-in masks); loaded into a fresh optimizer without ages,
    whose optional state checkpoint.py creates as DTensors laid out like the moments."""
    torchrun(2, "ckpt_save", tmp_path, "msg")
    for n in (1, 3):
        out = torchrun(n, "ckpt_load", tmp_path, "msg").stdout
        assert f"OK ckpt_load at {n} processes" in out


@pytest.mark.slow
def test_candidate_mesh_two_groups_of_two():
    out = torchrun(4, "groups", 2).stdout
    assert "values [1.5, 3.5]" in out


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp"])
def test_killed_rank_ends_the_job_with_an_error_not_a_hang(backend):
    t0 = time.perf_counter()
    proc = torchrun(2, "kill", backend, timeout=90, check=False)
    seconds = time.perf_counter() - t0
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "exitcode: 17" in log, log[-2000:]  # torchrun names the rank that died and its exit code
    assert "survived" not in log
    assert seconds < 60, f"took {seconds:.0f} s to fail"
