"""``train.compile``: the Trainer compiles each block, recompiles after a growth event, and a fade-in's masks
(new values every step) do not force recompiles; losses match eager training to fp32 tolerance.

The compiled training runs in its own pytest process: once inductor has initialised Triton in this process, the
kernel tests' Triton interpreter no longer runs their kernels ("Cannot call @triton.jit'd outside of the scope
of a kernel"), whatever order the test files run in."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanogrow.parallel import compile_blocks
from nanogrow.train import Trainer

from helpers import tiny_run_config, with_stages


def _run(cfg, steps):
    import torch._dynamo  # here, not at import: dynamo loads Triton, before test_kernels can pick its interpreter
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    trainer = Trainer(cfg, log=lambda *_: None)
    losses, new_graphs = [], []  # per turn: graphs compiled by it
    for _ in range(steps):
        before = counters["stats"]["unique_graphs"]
        losses.append(trainer.advance())
        new_graphs.append(counters["stats"]["unique_graphs"] - before)
    return trainer, losses, counters["stats"]["unique_graphs"], new_graphs


IN_CHILD = os.environ.get("NANOGROW_COMPILE_TEST_CHILD") == "1"


def test_compiled_training_matches_eager_through_a_growth_event_and_a_fade_in():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, NANOGROW_COMPILE_TEST_CHILD="1", PYTHONPATH=os.pathsep.join(
        [str(root), os.environ.get("PYTHONPATH", "")]))
    child = f"{__file__}::test_child_compiled_vs_eager"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", child],
                       cwd=root / "tests", env=env, capture_output=True, text=True)
    assert p.returncode == 0 and "1 passed" in p.stdout, p.stdout[-3000:] + p.stderr[-2000:]


@pytest.mark.skipif(not IN_CHILD, reason="run in its own process by the test above")
def test_child_compiled_vs_eager(demo_data, tmp_path):
    stages = [{"at_step": 3, "shape": {"d_ff": 224}, "op": "msg", "options": {"fade_steps": 4}}]
    base = dict(max_steps=9, eval_every=0)
    eager_cfg = with_stages(tiny_run_config(demo_data, tmp_path / "eager", **base), stages, eval_at_growth=False)
    comp_cfg = with_stages(tiny_run_config(demo_data, tmp_path / "compiled", compile=True, **base), stages,
                           eval_at_growth=False)
    eager, eager_losses, _, _ = _run(eager_cfg, 9)
    compiled, losses, graphs, new_graphs = _run(comp_cfg, 9)
    assert all(b is not None for b in losses) and compiled.stage_index == 1
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-4, atol=0)
    # One graph for the first shape (at the start), and at the growth event one for the grown shape with its unit
    # masks and one without them (compiled ahead for the end of the fade-in): none in the fade-in's steps,
    # although every step sets new mask values, nor when the masks are removed.
    assert graphs <= 3 and new_graphs[3] >= 1 and sum(new_graphs) == sum(new_graphs[3:4]), (graphs, new_graphs)
    event = compiled.history[-1]
    assert event["event"] == "grow" and 0 < event["compile_seconds"] <= event["seconds"]
    assert all("forward" in b.__dict__ for b in compiled.model.layers.values())  # the grown blocks are compiled


def test_compile_blocks_keeps_names_and_survives_deepcopy():
    from nanogrow.grow.testing import tiny_config
    from nanogrow.model import build_model

    model = build_model(tiny_config(), seed=0)
    keys = list(model.state_dict())
    assert compile_blocks(model) == 2 and compile_blocks(model) == 0
    assert list(model.state_dict()) == keys
    twin = copy.deepcopy(model)
    assert all(b.forward.__self__ is b for b in twin.layers.values())  # bound to the copy, not the original
