"""``train.compile``: the Trainer compiles each block, recompiles after a growth event, and a fade-in's masks
(new values every step) do not force recompiles; losses match eager training to fp32 tolerance."""

import copy

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from nanogrow.parallel import compile_blocks
from nanogrow.train import Trainer

from helpers import run_steps, tiny_run_config, with_stages


def _run(cfg, steps):
    torch._dynamo.reset()
    counters.clear()
    trainer = Trainer(cfg, log=lambda *_: None)
    losses = run_steps(trainer, steps)
    return trainer, losses, counters["stats"]["unique_graphs"]


def test_compiled_training_matches_eager_through_a_growth_event_and_a_fade_in(demo_data, tmp_path):
    stages = [{"at_step": 3, "shape": {"d_ff": 224}, "op": "msg", "options": {"fade_steps": 4}}]
    base = dict(max_steps=9, eval_every=0)
    eager_cfg = with_stages(tiny_run_config(demo_data, tmp_path / "eager", **base), stages, eval_at_growth=False)
    comp_cfg = with_stages(tiny_run_config(demo_data, tmp_path / "compiled", compile=True, **base), stages,
                           eval_at_growth=False)
    eager, eager_losses, _ = _run(eager_cfg, 9)
    compiled, losses, graphs = _run(comp_cfg, 9)
    assert all(b is not None for b in losses) and compiled.stage_index == 1
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-4, atol=0)
    # One graph for the first shape, one for the grown shape with its unit masks, one once the masks are removed:
    # not one per fade-in step, although every step sets new mask values.
    assert graphs <= 3, graphs
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
