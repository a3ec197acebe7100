"""DeepSpeed ZeRO checks, run by tests/test_parallel_zero.py under ``torchrun --standalone --nproc_per_node=2``
(gloo, CPU):

* ``zero_worker.py <stage> <ops>``: the growth API of nanogrow.parallel.zero against one process (nanogrow AdamW,
  the same global batch, ``grow(..., policy="map")``);
* ``zero_worker.py trainer <config.toml> <out_dir> <stages>``: the Trainer under ``train.parallel="deepspeed"`` for
  each ZeRO stage: a run with a growth event (checkpoints at the growth and at the end), then a resume from the
  growth checkpoint at the same world size. Prints one JSON line per stage (rank 0) that the test compares with
  the one-process Trainer.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

torch.set_num_threads(1)

import deepspeed  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402

from nanogrow.grow import grow  # noqa: E402
from nanogrow.model import build_model  # noqa: E402
from nanogrow.parallel.zero import ds_config, grow_zero, zero_initialize  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from tolerance import loss_tol, state_tol  # noqa: E402
from worker import GLOBAL_BATCH, LR, PLANS, make_opt, step  # noqa: E402
from nanogrow.grow.testing import batch, tiny_config  # noqa: E402


def groups_of(model):
    return [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1, "lr": LR},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0, "lr": LR}]


def ds_step(run, s: int, cfg) -> float:
    r, w = dist.get_rank(), dist.get_world_size()
    x = batch(cfg, 1000 + s, batch_size=GLOBAL_BATCH)
    n = GLOBAL_BATCH // w
    x = x[r * n:(r + 1) * n]
    loss = run.engine(x[:, :-1].contiguous(), x[:, 1:].contiguous())
    run.engine.backward(loss)
    run.engine.step()
    val = loss.detach().clone()
    dist.all_reduce(val)
    return float(val) / w


def ds_full(run) -> dict:
    from nanogrow.parallel.zero import _relink
    _relink(run)
    out = {}
    for n, p in run.module.named_parameters():
        out[f"param/{n}"] = safe_get_full_fp32_param(p).clone()
        for k in ("exp_avg", "exp_avg_sq"):
            out[f"optim/{n}/{k}"] = safe_get_full_optimizer_state(p, k).clone()
    return out


def ref_full(model, opt) -> dict:
    out = {}
    for n, p in model.named_parameters():
        out[f"param/{n}"] = p.detach().clone()
        for k in ("exp_avg", "exp_avg_sq"):
            out[f"optim/{n}/{k}"] = opt.state[p][k].clone()
    return out


def check(a, b, what, tol):
    worst = 0.0
    for k in b:
        d = (a[k] - b[k]).abs().max().item()
        assert d <= tol, f"{what}: {k} differs by {d:.3g}"
        worst = max(worst, d)
    return worst


def trainer_losses(trainer) -> list[float]:
    """The Trainer's loop (``Trainer.run`` without logging/eval): the training loss of every step, averaged over
    the ranks (``train_step`` returns this rank's share of the global batch)."""
    losses = []
    while trainer.step < trainer.t.max_steps:
        loss = torch.tensor(trainer.advance(), dtype=torch.float64)
        dist.all_reduce(loss)
        losses.append(loss.item() / dist.get_world_size())
    trainer.save()
    return losses


def trainer_mode(config: str, out: str, stages: list[int]) -> None:
    import json

    from nanogrow.config import load_config
    from nanogrow.parallel.zero import destroy
    from nanogrow.offline import consolidate
    from nanogrow.train import Trainer

    def quiet(*args, **kwargs):
        pass

    for stage in stages:
        run_dir = f"{out}/zero{stage}/run"
        cfg = load_config(config, [f"train.zero_stage={stage}", f"train.out_dir='{run_dir}'"])
        trainer = Trainer(cfg, log=quiet)
        assert trainer.zero is not None and trainer.zero.run.engine.zero_optimization_stage() == stage
        losses = trainer_losses(trainer)
        grow_step = next(h["step"] for h in trainer.history if h["event"] == "grow")
        destroy(trainer.zero.run)
        # Resume from the growth checkpoint at the same world size, into another directory.
        cfg = load_config(config, [f"train.zero_stage={stage}", f"train.out_dir='{out}/zero{stage}/resumed'"])
        trainer = Trainer(cfg, resume=f"{run_dir}/ckpt_{grow_step:07d}", log=quiet)
        assert trainer.step == grow_step and trainer.stage_index == 1
        resumed = trainer_losses(trainer)
        destroy(trainer.zero.run)
        # Weights-only restart under ZeRO: consolidate (every rank: the DCP save is a collective), then start a
        # ZeRO run from the DCP checkpoint; its first step's loss is computed before the fresh optimizer acts.
        restart = consolidate(f"{run_dir}/ckpt_{grow_step:07d}", f"{out}/zero{stage}/consolidated", log=quiet)
        cfg = load_config(config, [f"train.zero_stage={stage}", f"train.out_dir='{out}/zero{stage}/restart'"])
        trainer = Trainer(cfg, resume=str(restart), log=quiet)
        assert trainer.step == grow_step and trainer.ramp is not None
        first = torch.tensor(trainer.train_step(), dtype=torch.float64)
        dist.all_reduce(first)
        destroy(trainer.zero.run)
        if dist.get_rank() == 0:
            print(json.dumps({"stage": stage, "grow_step": grow_step, "losses": losses, "resumed": resumed,
                              "restart_first": first.item() / dist.get_world_size()}), flush=True)
    from nanogrow.dist_utils import shutdown_and_exit
    shutdown_and_exit()


def main():
    if sys.argv[1] == "trainer":
        return trainer_mode(sys.argv[2], sys.argv[3], [int(s) for s in sys.argv[4].split(",")])
    stage, ops = int(sys.argv[1]), sys.argv[2].split(",")
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = tiny_config()
    for op in ops:
        plan = PLANS[op](cfg)
        ref_m = build_model(cfg, seed=0)
        ref_o = make_opt(ref_m)
        ref_pre = [step(ref_m, ref_o, s, cfg, parallel=False) for s in range(3)]
        model = build_model(cfg, seed=0)
        run = zero_initialize(model, groups_of(model), ds_config(stage, GLOBAL_BATCH // dist.get_world_size()))
        got_pre = [ds_step(run, s, cfg) for s in range(3)]
        assert max(abs(a - b) for a, b in zip(ref_pre, got_pre)) <= loss_tol(3), (ref_pre, got_pre)
        # The one-process reference takes exactly the ZeRO run's state before growing: growth must then agree
        # bit for bit (training up to here agreed up to reduction order: tests/dist/tolerance.py).
        before = ds_full(run)
        check(before, ref_full(ref_m, ref_o), f"zero{stage} before growth", state_tol(LR, 3))
        with torch.no_grad():
            for n, p in ref_m.named_parameters():
                p.copy_(before[f"param/{n}"])
                for k in ("exp_avg", "exp_avg_sq"):
                    ref_o.state[p][k].copy_(before[f"optim/{n}/{k}"])
        ref_m, ref_o = grow(ref_m, ref_o, plan, policy="map")
        run = grow_zero(run, plan, policy="map")
        after = ds_full(run)
        w = check(after, ref_full(ref_m, ref_o), f"zero{stage} {op} growth", 0.0)
        ramp = plan.mask_ramp(3)
        ref = [step(ref_m, ref_o, s, plan.new_cfg, parallel=False, ramp=ramp, at=s) for s in range(3, 6)]
        got = []
        for s in range(3, 6):
            if ramp is not None:
                ramp.apply(run.module, s)
            got.append(ds_step(run, s, plan.new_cfg))
        diff = max(abs(a - b) for a, b in zip(ref, got))
        assert diff <= loss_tol(3), f"zero{stage} {op}: losses after growth differ by {diff:.3g}: {ref} vs {got}"
        if dist.get_rank() == 0:
            print(f"OK zero{stage} {op}: state vs grow() {w:.1e}, loss diff {diff:.1e}", flush=True)
        run.engine.destroy()
    from nanogrow.dist_utils import shutdown_and_exit
    shutdown_and_exit()  # skips the interpreter teardown where finished gloo jobs sometimes abort


if __name__ == "__main__":
    main()
