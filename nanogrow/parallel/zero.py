"""DeepSpeed ZeRO (stages 1-3) training and growth through DeepSpeed's full-parameter / optimizer-state API.

ZeRO keeps fp32 master weights and Adam moments in flat partitions, so the plan cannot be applied to its tensors
directly. Growth (``grow_zero``), the route that gave results equal to plain torch in every stage on CPU:
  1. every target of the plan is materialised from full fp32 sources read with
     ``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` (collectives: every rank
     reads the same parameters in the same order, which the plan guarantees), one target at a time;
  2. the grown module is built with the mapped weights BEFORE ``deepspeed.initialize`` (``safe_set_full_fp32_param``
     updates only the master copy, not the weights forward uses, until the next step);
  3. the new engine's optimizer state is created by one zero-learning-rate step on zero gradients, then the
     mapped moments are written with ``safe_set_full_optimizer_state`` and the partitions' step counts set to
     the old step.
Costs: the new model's weights and moments in full on every rank while growing (routes through full tensors).
Per-element ages are not supported under ZeRO (its step count is one per flat partition): policy ``map+age``
raises; use ``map`` or ``reset``. Under bf16 (``ds_config(..., bf16=True)``) ``initialize`` builds the fp32 masters
from the bf16 module, so the mapped fp32 weights are written back into them with ``safe_set_full_fp32_param``.
``set_optimizer_state`` (moments + step into a fresh engine) also starts a ZeRO run from a DCP checkpoint.
The Trainer drives all this through ``nanogrow.backend.ZeroBackend``.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from nanogrow.grow.optim import AdamW, group_key
from nanogrow.grow.fade import set_buffer
from nanogrow.model import Transformer

if TYPE_CHECKING:
    from nanogrow.grow.plan import GrowthPlan


def ds_config(stage: int, micro_batch: int, grad_accum: int = 1, grad_clip: float = 0.0, bf16: bool = False) -> dict:
    """``bf16``: DeepSpeed keeps bf16 weights for forward/backward and fp32 master weights and moments in its
    partitions (use on CUDA; on CPU the tests run fp32)."""
    if stage not in (1, 2, 3):
        raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage!r}")
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,  # DeepSpeed's default is 1.0, not off
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # nanogrow's AdamW (torch's update, as a client optimizer)
        "steps_per_print": 10**9,
    }
    if bf16:
        config["bf16"] = {"enabled": True}
    return config


def _bf16(config: dict) -> bool:
    return bool(config.get("bf16", {}).get("enabled", False))


@dataclass
class ZeroRun:
    """A DeepSpeed engine plus what growth needs that ZeRO does not keep: parameter names -> param group, the
    groups' hyper-parameters, the config."""

    engine: object
    config: dict
    groups: list[dict]  # hyper-parameters of each group (no "params")
    name_group: dict[str, int] = field(default_factory=dict)

    @property
    def module(self) -> Transformer:
        return self.engine.module


def zero_initialize(model: Transformer, groups: list[dict], config: dict) -> ZeroRun:
    """``groups``: torch-style param groups over ``model``'s parameters (each with its hyper-parameters)."""
    import deepspeed

    names = {p: n for n, p in model.named_parameters()}
    name_group = {names[p]: gi for gi, g in enumerate(groups) for p in g["params"]}
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    opt = AdamW([dict(h, params=list(g["params"])) for h, g in zip(hyper, groups)])
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return ZeroRun(engine, config, hyper, name_group)


def inner_optimizer(engine):
    return engine.optimizer.optimizer


def partition_params(engine) -> list[torch.Tensor]:
    zo = engine.optimizer
    if hasattr(zo, "fp32_partitioned_groups_flat"):  # ZeRO 3
        return list(zo.fp32_partitioned_groups_flat)
    return list(zo.single_partition_of_fp32_groups)  # ZeRO 1 / 2


def _relink(run: ZeroRun) -> None:
    """Re-link DeepSpeed's per-parameter views of the optimizer state. ZeRO 1/2 link them once, right after the
    FIRST param group's first step, for all groups: later groups (e.g. the no-weight-decay gains) have no state
    yet and stay unlinked forever, so ``safe_get_full_optimizer_state`` raises "exp_avg not found" for them."""
    zo = run.engine.optimizer
    if hasattr(zo, "_hp_optimizer_states_linked") and hasattr(zo, "_lazy_init_hp_params_optimizer_state"):
        zo._hp_optimizer_states_linked = False
        zo._lazy_init_hp_params_optimizer_state()


def zero_step_count(run: ZeroRun) -> float:
    st = inner_optimizer(run.engine).state
    return max((float(st[p]["step"]) for p in partition_params(run.engine) if p in st and "step" in st[p]),
               default=0.0)


def destroy(run: ZeroRun) -> None:
    """Free an engine (ZeRO 3 keeps the old module alive through module-level references)."""
    run.engine.destroy()
    try:
        from deepspeed.runtime.zero import parameter_offload
        parameter_offload.FWD_MODULE_STACK.clear()
    except Exception:
        pass
    _clear_release_cache()
    run.engine = None
    gc.collect()


def _clear_release_cache() -> None:
    """ZeRO 3's parameter coordinator memoises ``__params_to_release`` with a class-level ``functools.lru_cache``
    keyed by (coordinator, submodule): it keeps every destroyed engine's modules alive. The cache sits inside an
    NVTX wrapper without ``__wrapped__``, hence the closure walk; clearing only costs recomputing it."""
    try:
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as C
        fn = C.__dict__["_PartitionedParameterCoordinator__params_to_release"]
    except (ImportError, KeyError):
        return
    for cell in [fn] + [c.cell_contents for c in (fn.__closure__ or ())]:
        if hasattr(cell, "cache_clear"):
            cell.cache_clear()


def grow_zero(run: ZeroRun, plan: GrowthPlan, policy: str = "map", config: dict | None = None) -> ZeroRun:
    """Grow a ZeRO run: returns a new ZeroRun (new engine); the old engine is destroyed. A collective.
    ``config``: the new engine's DeepSpeed config (default: the old one; a stage may change the micro-batch)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if policy == "map+age":
        raise NotImplementedError("grow_zero: per-element ages are not supported under ZeRO (one step count per "
                                  "flat partition); use policy 'map' or 'reset'")
    if policy not in ("map", "reset"):
        raise ValueError(f"unknown optimizer transfer policy {policy!r}")
    old = run.module
    plan.check_model(old)
    _relink(run)
    old_params = dict(old.named_parameters())
    device = next(iter(old_params.values())).device

    def reader(kind):
        def read(name):
            p = old_params[name]
            if kind == "param":
                return safe_get_full_fp32_param(p)
            t = safe_get_full_optimizer_state(p, kind)
            return torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape) if t is None else t
        return read

    with torch.device("meta"):
        new = Transformer(replace(plan.new_cfg))
    new.to_empty(device=device)
    with torch.no_grad():
        for name, p in new.named_parameters():
            p.copy_(plan.targets[name].materialize(reader("param"), "param", device=device, dtype=p.dtype))
    new.reset_rope()
    for name, val in plan.initial_mask_values(device).items():
        set_buffer(new, name, val)
    new.train(old.training)
    moments = {}
    if policy == "map":
        for name in plan.targets:  # full tensors, in the plan's order on every rank
            moments[name] = {k: plan.targets[name].materialize(reader(k), k, device="cpu", dtype=torch.float32)
                             for k in ("exp_avg", "exp_avg_sq")}
    step = zero_step_count(run)
    # Param groups: a target joins its primary source's group, else the same parameter's group in another layer
    # (nanogrow.grow.optim.grow's rule).
    key_group: dict[str, int] = {}
    for n, gi in run.name_group.items():
        key_group.setdefault(group_key(n), gi)
    groups = [dict(h, params=[]) for h in run.groups]
    for name, p in new.named_parameters():
        src = plan.targets[name].primary_source
        gi = run.name_group.get(src) if src is not None else None
        groups[key_group.get(group_key(name), 0) if gi is None else gi]["params"].append(p)
    config, hyper = run.config if config is None else config, run.groups
    # Under bf16, initialize casts the module to bf16 and builds the fp32 masters from it: keep the mapped fp32
    # weights to restore the masters' precision afterwards.
    masters = {n: p.detach().to("cpu", copy=True) for n, p in new.named_parameters()} if _bf16(config) else None
    destroy(run)
    keep = [i for i, g in enumerate(groups) if g["params"]]
    new_run = zero_initialize(new, [groups[i] for i in keep], config)
    new_run.groups = [hyper[i] for i in keep]
    if masters is not None:
        from deepspeed.utils import safe_set_full_fp32_param
        for name, p in new_run.module.named_parameters():
            safe_set_full_fp32_param(p, masters[name].to(device))
    if policy == "map":
        set_optimizer_state(new_run, moments, step)
    return new_run


def set_optimizer_state(run: ZeroRun, moments: dict[str, dict[str, torch.Tensor]], step: float) -> None:
    """Give a fresh engine's optimizer the full Adam moments ``moments[name] = {"exp_avg", "exp_avg_sq"}`` of
    every parameter and the step count ``step`` (a collective: every rank passes the same full tensors)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    device = next(run.module.parameters()).device
    _create_state(run)
    for name, p in run.module.named_parameters():
        for k, v in moments[name].items():
            safe_set_full_optimizer_state(p, v.to(device), k)
    st = inner_optimizer(run.engine).state
    for part in partition_params(run.engine):
        if part in st:
            st[part]["step"] = torch.tensor(step, dtype=torch.float32) if isinstance(st[part]["step"], torch.Tensor) \
                else step


def _create_state(run: ZeroRun) -> None:
    """One step at learning rate 0 on zero gradients: creates the (zero) Adam state without moving weights."""
    eng = run.engine
    saved = [g["lr"] for g in eng.optimizer.param_groups]
    for g in eng.optimizer.param_groups:
        g["lr"] = 0.0
    # A real forward (ZeRO 3 gathers its partitioned parameters only inside one), times 0: zero gradients.
    # With gradient accumulation the optimizer steps only at the accumulation boundary: run a whole step.
    idx = torch.zeros(1, 2, dtype=torch.long, device=next(eng.module.parameters()).device)
    for _ in range(eng.gradient_accumulation_steps()):
        loss = eng(idx, idx) * 0.0
        eng.backward(loss)
        eng.step()
    _relink(run)
    for g, lr in zip(eng.optimizer.param_groups, saved):
        g["lr"] = lr


