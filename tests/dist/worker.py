"""Multi-process checks of nanogrow.parallel, run by tests/test_parallel.py as
``torchrun --standalone --nproc_per_node=N tests/dist/worker.py <mode> [args]`` (gloo, CPU).

Every rank recomputes the one-process reference itself (tiny models, cheap) and asserts; any failed assertion
exits non-zero, which torchrun turns into a failed job. A line "OK <mode>" on rank 0 marks success."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist

torch.set_num_threads(1)

from nanogrow.grow import grow, make_plan  # noqa: E402
from nanogrow.grow.optim import AdamW  # noqa: E402
from nanogrow.grow.testing import batch, tiny_config  # noqa: E402
from nanogrow.model import build_model  # noqa: E402
from tolerance import loss_tol, state_tol  # noqa: E402  (tests/dist/tolerance.py: how each bound is derived)
from nanogrow.parallel import (  # noqa: E402
    broadcast_group_state, candidate_index, candidate_mesh, group_values, grow_parallel, model_and_optimizer_tensors,
    parallelize, reshard, unwrap,
)

GLOBAL_BATCH = 6  # divisible by 1, 2 and 3 processes
LR = 1e-2


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def make_opt(model, ages=False):
    # Two groups as the trainer makes them: decay on matrices, none on gains.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=LR,
                 ages=ages)


def step(model, opt, s: int, cfg, parallel: bool, ramp=None, at=0) -> float:
    """One optimizer step on global batch ``s``; a parallel run takes this rank's rows. Returns the global loss."""
    if ramp is not None:
        ramp.apply(unwrap(model), at)
    x = batch(cfg, 1000 + s, batch_size=GLOBAL_BATCH)
    if parallel:
        n = GLOBAL_BATCH // world()
        x = x[rank() * n:(rank() + 1) * n]
    loss = model(x[:, :-1].contiguous(), x[:, 1:].contiguous())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    val = loss.detach().clone()
    if parallel and world() > 1:
        dist.all_reduce(val)
        val /= world()
    return float(val)


def full(t):
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state(model, opt) -> dict[str, torch.Tensor]:
    """name -> full tensor for every parameter, set buffer and optimizer state entry (a collective)."""
    m = unwrap(model)
    reshard(m)  # after a forward under no_grad the FSDP root holds unsharded params the optimizer does not know
    out = {f"param/{n}": full(p).detach().clone() for n, p in m.named_parameters()}
    out.update({f"buffer/{n}": full(b).clone() for n, b in m.named_buffers()
                if b is not None and not n.startswith("rope")})
    for n, p in m.named_parameters():
        for k, v in sorted(opt.state.get(p, {}).items()):
            out[f"optim/{n}/{k}"] = full(v).clone()
    return out


def compare(a: dict, b: dict, what: str, tol: float = 0.0) -> float:
    assert sorted(a) == sorted(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:6]}"
    worst = 0.0
    for k in a:
        assert a[k].shape == b[k].shape, f"{what}: {k} shape {tuple(a[k].shape)} vs {tuple(b[k].shape)}"
        d = (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0
        assert d <= tol, f"{what}: {k} differs by {d:.3g} (tol {tol})"
        worst = max(worst, d)
    return worst


def plain_copy(cfg, state: dict, ages: bool):
    """A one-process model + optimizer holding exactly ``state`` (full tensors)."""
    model = build_model(cfg, seed=0)
    opt = make_opt(model, ages=ages)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[f"param/{n}"])
            st = {k.rsplit("/", 1)[1]: v.clone() for k, v in state.items() if k.startswith(f"optim/{n}/")}
            if st:
                opt.state[p] = st
    return model, opt


def build(cfg, backend: str):
    """backend: none, ddp, fsdp, or hsdp (FSDP2 on a 2-D mesh: world/2 replicas of 2 shards, or 2 x 1)."""
    torch.manual_seed(0)
    model = build_model(cfg, seed=0)
    if backend == "hsdp":
        model = parallelize(model, "fsdp", replicate=2)
    else:
        model = parallelize(model, backend)
    return model, make_opt(unwrap(model) if backend == "ddp" else model)


PLANS = {
    "stack": lambda c: make_plan("stack", c, replace(c, n_layer=4)),
    "zero": lambda c: make_plan("zero", c, replace(c, d_model=48, n_head=6, n_kv_head=3, d_ff=96), seed=1),
    "msg": lambda c: make_plan("msg", c, replace(c, d_model=48, n_head=6, n_kv_head=3, d_ff=96), seed=1,
                               fade_steps=3),
    # d_ff only: attention, norms, embeddings are whole copies (shard to shard), the MLP is gathered.
    "joint": lambda c: make_plan("joint", c, replace(c, n_layer=4, d_ff=96), seed=2),
}


def mode_train(backends: str, steps: int = 4):
    """N steps of DDP / FSDP / HSDP training equal N one-process steps on the same global batch."""
    for backend in backends.split(","):
        _train(backend, steps)


def _train(backend: str, steps: int):
    cfg = tiny_config()
    ref_m, ref_o = build(cfg, "none")
    ref = [step(ref_m, ref_o, s, cfg, parallel=False) for s in range(steps)]
    model, opt = build(cfg, backend)
    got = [step(model, opt, s, cfg, parallel=True) for s in range(steps)]
    diff = max(abs(a - b) for a, b in zip(ref, got))
    assert diff <= loss_tol(steps), f"{backend}: losses differ by {diff:.3g}: {ref} vs {got}"
    w = compare(full_state(model, opt), full_state(ref_m, ref_o), f"{backend} state", tol=state_tol(LR, steps))
    if rank() == 0:
        print(f"OK train {backend}: {steps} steps, max loss diff {diff:.2e}, max state diff {w:.2e}")


def mode_nosync(backends: str, accum: int = 3):
    """Gradient accumulation with the reduction skipped on all but the last micro-batch (grad_sync(model, False),
    as the Trainer does) gives the gradients of a reduction on every micro-batch, up to summation order, with
    1/accum of the reductions (DDP: counted through a comm hook; FSDP2: no sharded gradient before the last)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from nanogrow.parallel import grad_sync
    from tolerance import grad_tol

    cfg = tiny_config()
    n = GLOBAL_BATCH // world()
    xs = [batch(cfg, 2000 + m, batch_size=GLOBAL_BATCH)[rank() * n:(rank() + 1) * n] for m in range(accum)]
    # sum over ranks and micro-batches of |g| (the terms both runs add up, in different orders)
    plain = build_model(cfg, seed=0)
    mags = {name: torch.zeros_like(p) for name, p in plain.named_parameters()}
    for x in xs:
        plain.zero_grad(set_to_none=True)
        (plain(x[:, :-1].contiguous(), x[:, 1:].contiguous()) / accum).backward()
        for name, p in plain.named_parameters():
            mags[name] += p.grad.abs()
    for t in mags.values():
        dist.all_reduce(t)
    for backend in backends.split(","):
        grads, reductions = {}, {}
        for mode in ("every", "last"):
            model, _ = build(cfg, backend)
            calls = [0]
            if backend == "ddp":
                model.register_comm_hook(None, lambda state, bucket: (calls.__setitem__(0, calls[0] + 1),
                                                                      allreduce_hook(None, bucket))[1])
            for m, x in enumerate(xs):
                last = m == accum - 1
                with grad_sync(model, mode == "every" or last):
                    (model(x[:, :-1].contiguous(), x[:, 1:].contiguous()) / accum).backward()
                if backend == "fsdp" and mode == "last" and not last:
                    assert all(p.grad is None for p in model.parameters()), "fsdp: reduced before the last micro-batch"
            grads[mode] = {name: full(p.grad).detach().clone() for name, p in unwrap(model).named_parameters()}
            reductions[mode] = calls[0]
        if backend == "ddp":
            assert reductions["every"] == accum * reductions["last"] > 0, reductions
        worst = 0.0
        for name, g in grads["every"].items():
            d = (g.double() - grads["last"][name].double()).abs()
            tol = grad_tol(mags[name].double(), world() * accum, world())
            assert (d <= tol).all(), f"{backend} {name}: differs by {d.max():.3g} (tol {tol.max():.3g})"
            worst = max(worst, d.max().item())
        if rank() == 0:
            counted = f", reductions {reductions['every']} -> {reductions['last']}" if backend == "ddp" else ""
            print(f"OK nosync {backend}: {accum} micro-batches, max grad diff {worst:.2e}{counted}")


def mode_grow(backend: str, ops: str, policy: str = "map+age"):
    """``ops``: comma-separated operator names from PLANS, each optionally ``op:policy``."""
    for spec in ops.split(","):
        op, _, pol = spec.partition(":")
        _grow(backend, op, pol or policy)


def _grow(backend: str, op: str, policy: str = "map+age", before: int = 3, after: int = 4):
    """A growth under FSDP / DDP gives exactly the state ``grow()`` gives on one process from the same state, and
    the next steps' losses match."""
    cfg = tiny_config()
    model, opt = build(cfg, backend)
    for s in range(before):
        step(model, opt, s, cfg, parallel=True)
    if backend in ("fsdp", "hsdp"):  # an eval forward under no_grad leaves the root unsharded: grow must cope
        with torch.no_grad():
            model(batch(cfg, 7)[:, :-1])
    pre = full_state(model, opt)
    plan = PLANS[op](cfg)
    ref_m, ref_o = plain_copy(cfg, pre, ages=False)
    ref_m, ref_o = grow(ref_m, ref_o, plan, policy=policy)
    stats: dict = {}
    t0 = time.perf_counter()
    if backend in ("fsdp", "hsdp"):
        from nanogrow.parallel import grow_sharded
        model, opt = grow_sharded(model, opt, plan, policy=policy, stats=stats)
    else:
        model, opt = grow_parallel(model, opt, plan, policy=policy)
    secs = time.perf_counter() - t0
    w = compare(full_state(model, opt), full_state(ref_m, ref_o), f"{backend} {op} growth", tol=0.0)
    has_age = any(k.endswith("/age") for k in full_state(ref_m, ref_o))
    # stack copies every element (uniform ages: none kept); width ops add fresh elements (age 0)
    assert has_age == (policy == "map+age" and op != "stack"), f"per-element ages kept: {has_age}"
    if backend != "ddp":
        assert stats["shard_copies"] + stats["gathered"] > 0
        if op == "stack":
            assert stats["gathered"] == 0, f"stack gathered something: {stats}"
    ramp = plan.mask_ramp(before)
    ncfg = plan.new_cfg
    ref = [step(ref_m, ref_o, s, ncfg, parallel=False, ramp=ramp, at=s) for s in range(before, before + after)]
    got = [step(model, opt, s, ncfg, parallel=True, ramp=ramp, at=s) for s in range(before, before + after)]
    diff = max(abs(a - b) for a, b in zip(ref, got))
    assert diff <= loss_tol(after), f"{backend} {op}: losses after growth differ by {diff:.3g}: {ref} vs {got}"
    if rank() == 0:
        print(f"OK grow {backend} {op} {policy}: state diff {w:.1e}, loss diff {diff:.1e}, grow {secs * 1e3:.0f} ms, "
              f"{stats}")


def mode_learned(backends: str, fit_steps: int = 4, before: int = 3, after: int = 3):
    """The learned (LiGO-style) operator under FSDP / DDP: each rank fits the maps on its rows of the global
    batches with the gradient averaged over ranks; the maps must be identical on every rank and equal (up to
    float summation order) to one process fitting on the whole global batch; the grown state then matches
    ``grow()`` with the one-process plan, and so do the next losses."""
    from nanogrow.grow.learned import fit

    for backend in backends.split(","):
        cfg = tiny_config()
        model, opt = build(cfg, backend)
        for s in range(before):
            step(model, opt, s, cfg, parallel=True)
        if backend in ("fsdp", "hsdp"):  # an eval forward under no_grad leaves the root unsharded
            with torch.no_grad():
                model(batch(cfg, 7)[:, :-1])
        pre = full_state(model, opt)
        plan = make_plan("learned", cfg, replace(cfg, n_layer=3, d_model=64, n_head=8, n_kv_head=4, d_ff=96),
                         seed=3, steps=fit_steps, lr=2e-2)

        def batches(rows: bool):
            it = iter(range(fit_steps))

            def next_batch():
                x = batch(cfg, 2000 + next(it), batch_size=GLOBAL_BATCH)
                if rows:
                    n = GLOBAL_BATCH // world()
                    x = x[rank() * n:(rank() + 1) * n]
                return x[:, :-1].contiguous(), x[:, 1:].contiguous()
            return next_batch

        def average(flat):
            dist.all_reduce(flat)
            flat.div_(world())

        reshard(unwrap(model))
        old = {n: full(p).detach() for n, p in unwrap(model).named_parameters()}
        mine = fit(plan, old, batches(rows=True), reduce_grads=average if world() > 1 else None)
        ref_plan = fit(plan, {k[len("param/"):]: v for k, v in pre.items() if k.startswith("param/")},
                       batches(rows=False))
        flat = torch.cat([t.reshape(-1) for t in mine.maps.values()])
        everyone = [torch.zeros_like(flat) for _ in range(world())]
        dist.all_gather(everyone, flat)
        assert all(torch.equal(everyone[0], e) for e in everyone), "learned maps differ across ranks"
        # The fit is Adam at lr 2e-2 on all-reduced gradients: the same reduction-order bound as training, far
        # below how far the fit moves the maps (asserted next), so a wrong reduction (or none) still fails.
        m = compare(mine.maps, ref_plan.maps, f"{backend} learned maps", tol=state_tol(2e-2, fit_steps))
        moved = max((ref_plan.maps[k] - plan.maps[k]).abs().max().item() for k in plan.maps)
        assert moved > 1e-2, f"the fit barely moved the maps ({moved:.3g}): the comparison would prove nothing"
        assert mine.fit_record["tokens"] * world() == ref_plan.fit_record["tokens"]
        ref_m, ref_o = plain_copy(cfg, pre, ages=False)
        ref_m, ref_o = grow(ref_m, ref_o, ref_plan, policy="map+age")
        model, opt = grow_parallel(model, opt, mine, policy="map+age")
        # Training before the fit drifted by state_tol(LR, before); the grown weights are products of the maps and
        # the old weights (both O(1)), so their drift is the sum of the two bounds.
        tol = state_tol(LR, before) + state_tol(2e-2, fit_steps)
        w = compare(full_state(model, opt), full_state(ref_m, ref_o), f"{backend} learned growth", tol=tol)
        ncfg = mine.new_cfg
        ref = [step(ref_m, ref_o, s, ncfg, parallel=False) for s in range(before, before + after)]
        got = [step(model, opt, s, ncfg, parallel=True) for s in range(before, before + after)]
        diff = max(abs(a - b) for a, b in zip(ref, got))
        assert diff <= loss_tol(before + fit_steps + after), f"{backend} learned: losses after growth differ by {diff:.3g}: {ref} vs {got}"
        if rank() == 0:
            print(f"OK learned {backend}: map diff {m:.1e}, state diff {w:.1e}, loss diff {diff:.1e}, fit losses "
                  f"{[round(x, 4) for x in mine.fit_record['losses']]}")


def _ref_run(cfg, plan, before, after, extra):
    """One-process reference: ``before`` steps, growth, ``after`` steps (the save point), then ``extra`` steps."""
    m, o = build(cfg, "none")
    for s in range(before):
        step(m, o, s, cfg, parallel=False)
    m, o = grow(m, o, plan, policy="map+age")
    ramp = plan.mask_ramp(before)
    for s in range(before, before + after):
        step(m, o, s, plan.new_cfg, parallel=False, ramp=ramp, at=s)
    saved = full_state(m, o)
    losses = [step(m, o, s, plan.new_cfg, parallel=False, ramp=ramp, at=s)
              for s in range(before + after, before + after + extra)]
    return saved, losses


def mode_ckpt_save(out: str, op: str = "zero", before: int = 2, after: int = 2, extra: int = 3):
    """FSDP at this world size: train, grow, train, save_checkpoint (DCP) to ``out``; rank 0 also writes the full
    state it saved (``out/saved.safetensors``) and the losses of ``extra`` further steps (``out/losses.json``)."""
    import json
    from safetensors.torch import save_file
    from nanogrow.checkpoint import save_checkpoint

    cfg = tiny_config()
    plan = PLANS[op](cfg)
    model, opt = build(cfg, "fsdp")
    for s in range(before):
        step(model, opt, s, cfg, parallel=True)
    model, opt = grow_parallel(model, opt, plan, policy="map+age")
    ramp = plan.mask_ramp(before)
    for s in range(before, before + after):
        step(model, opt, s, plan.new_cfg, parallel=True, ramp=ramp, at=s)
    path = save_checkpoint(out, before + after, model, opt, {"step": before + after, "model_config": {},
                                                              "run_config": {}})
    mine = full_state(model, opt)
    saved, ref_losses = _ref_run(cfg, plan, before, after, extra)
    # Against an independent one-process run: equal up to reduction order (tolerance.py).
    w = compare(mine, saved, "state at save vs one-process reference", tol=state_tol(LR, before + after))
    losses = [step(model, opt, s, plan.new_cfg, parallel=True, ramp=ramp, at=s)
              for s in range(before + after, before + after + extra)]
    diff = max(abs(a - b) for a, b in zip(ref_losses, losses))
    assert diff <= loss_tol(before + after + extra), f"losses differ from the one-process reference by {diff:.3g}"
    if rank() == 0:
        save_file({k: v.contiguous() for k, v in mine.items()}, os.path.join(out, "saved.safetensors"))
        with open(os.path.join(out, "losses.json"), "w") as f:
            json.dump(losses, f)
        print(f"OK ckpt_save {path} at {world()} processes, state vs one-process reference {w:.1e}")


def mode_ckpt_load(out: str, op: str = "zero", before: int = 2, after: int = 2, extra: int = 3):
    """Load the checkpoint at this world size into a freshly built grown FSDP model: exactly the full state the
    saver had (optional state such as ages loads straight into DTensors, nothing left to repair), and training
    continues with the saver's losses."""
    import json
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor
    import nanogrow.checkpoint as ckpt
    from nanogrow.parallel.state import shard_plain_state

    cfg = tiny_config()
    plan = PLANS[op](cfg)
    model, opt = build(plan.new_cfg, "fsdp")
    ckpt.load_checkpoint(ckpt.latest_checkpoint(out), model, opt)
    repaired = shard_plain_state(model, opt)
    assert repaired == 0, f"{repaired} plain (unsharded) optimizer state tensors after load"
    assert all(isinstance(v, DTensor) for st in opt.state.values() for k, v in st.items() if k != "step")
    saved = load_file(os.path.join(out, "saved.safetensors"))
    with open(os.path.join(out, "losses.json")) as f:
        want = json.load(f)
    ramp = plan.mask_ramp(before)
    w = compare(full_state(model, opt), saved, f"state loaded at {world()} processes", tol=0.0)
    got = [step(model, opt, s, plan.new_cfg, parallel=True, ramp=ramp, at=s)
           for s in range(before + after, before + after + extra)]
    diff = max(abs(a - b) for a, b in zip(want, got))
    # The saver's own continuation at another world size: only the reduction order of these steps differs.
    assert diff <= loss_tol(extra), f"losses after resume differ by {diff:.3g}: {want} vs {got}"
    if rank() == 0:
        print(f"OK ckpt_load at {world()} processes: state diff {w:.1e}, loss diff {diff:.1e}")


def mode_groups(n_groups: int):
    """candidate_mesh: groups are contiguous rank blocks, per-group values all-gathered, winner broadcast."""
    mesh = candidate_mesh(n_groups)
    g, per = candidate_index(mesh), world() // n_groups
    assert g == rank() // per, f"rank {rank()} in group {g}"
    # Each rank contributes rank + 1; a group's value is the mean over its ranks.
    vals = group_values(rank() + 1.0, mesh)
    want = [sum(range(k * per + 1, (k + 1) * per + 1)) / per for k in range(n_groups)]
    assert vals == want, f"group values {vals} != {want}"
    # One candidate model per group, different seeds; FSDP inside the group; then all take group 1's state.
    cfg = tiny_config()
    model = parallelize(build_model(cfg, seed=g), "fsdp", mesh["dp"])
    opt = make_opt(model)
    loss = step_group(model, opt, cfg, mesh)
    losses = group_values(loss, mesh)
    best = min(range(n_groups), key=lambda k: losses[k])
    broadcast_group_state(best, mesh, model_and_optimizer_tensors(model, opt))
    mine = torch.cat([full(t).reshape(-1) for t in model_and_optimizer_tensors(model, opt)])
    everyone = [torch.zeros_like(mine) for _ in range(world())]
    dist.all_gather(everyone, mine)
    assert all(torch.equal(everyone[0], e) for e in everyone), "state differs after broadcast"
    if rank() == 0:
        print(f"OK groups {n_groups}x{per}: values {vals}, losses {[round(x, 4) for x in losses]}, best {best}")


def step_group(model, opt, cfg, mesh) -> float:
    per, d = mesh.size(1), mesh.get_local_rank("dp")
    x = batch(cfg, 5, batch_size=2 * per)[2 * d:2 * d + 2]
    loss = model(x[:, :-1].contiguous(), x[:, 1:].contiguous())
    loss.backward()
    opt.step()
    return float(loss)


def mode_lag_train(config: str, out: str):
    """Train a run whose stage does LAG across process groups (nanogrow.lag_parallel) with the real Trainer; then
    every rank must hold exactly the same model and optimizer state. Rank 0 writes it to ``out/state.safetensors``
    for the test to compare with the one-process LAG."""
    from safetensors.torch import save_file
    from nanogrow.config import load_config
    from nanogrow.train import Trainer

    trainer = Trainer(load_config(config))
    trainer.run()
    state = full_state(trainer.model, trainer.optimizer)
    mine = torch.cat([v.double().reshape(-1) for _, v in sorted(state.items())])
    everyone = [torch.zeros_like(mine) for _ in range(world())]
    dist.all_gather(everyone, mine)
    differ = [r for r in range(world()) if not torch.equal(everyone[0], everyone[r])]
    assert not differ, f"ranks {differ} hold another state than rank 0 after LAG across groups"
    if rank() == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, "state.safetensors"))
        print(f"OK lag_train at {world()} processes: {len(state)} tensors identical on every rank")


def mode_kill(backend: str, victim: int = 1, at: int = 2, steps: int = 50):
    """Rank ``victim`` dies abruptly at step ``at``; the others must fail, not hang (measured by the test)."""
    cfg = tiny_config()
    model, opt = build(cfg, backend)
    for s in range(steps):
        if s == at and rank() == victim:
            os._exit(17)
        step(model, opt, s, cfg, parallel=True)
    print("survived?!")


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    from datetime import timedelta
    dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ.get("NANOGROW_DIST_TIMEOUT", 60))))
    fn = globals()[f"mode_{mode}"]
    fn(*[int(a) if a.isdigit() else a for a in args])  # an exception exits non-zero: torchrun fails the job
    from nanogrow.dist_utils import shutdown_and_exit
    shutdown_and_exit()  # skips the interpreter teardown where finished gloo jobs sometimes abort


if __name__ == "__main__":
    main()
