"""DeepSpeed ZeRO (stages 1-3) training and growth from ZeRO's fp32 master partitions.

ZeRO keeps fp32 master weights and Adam moments in flat partitions, so the plan cannot be applied to its tensors
directly. Growth (``grow_zero``), the route that gave results equal to plain torch in every stage on CPU:
  1. the full fp32 weights, then each Adam moment, of every old parameter are read from the master partitions in
     flat buckets (``gather_full``: each rank copies the fragments it owns into a zeroed flat buffer, one
     all-reduce per ``BUCKET_NUMEL`` elements gives every rank the full tensors; the fragments are found the way
     DeepSpeed's ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` find them, which send one
     collective per parameter), and every target of the plan is materialised from them;
  2. the grown module is built with the mapped weights BEFORE ``deepspeed.initialize`` (``safe_set_full_fp32_param``
     updates only the master copy, not the weights forward uses, until the next step);
  3. the new engine's Adam state is created directly on its flat partitions (zero moments, the old step count,
     as a first step would make it), and the mapped moments are copied into this rank's fragments
     (``scatter_full``: local copies, no collective).
The old engine is released without a forced ``gc.collect`` and ``deepspeed.initialize`` runs under ``gc.freeze``
(its many allocations otherwise trigger collections that walk every object in the process).
Costs: the old model's full fp32 tensors of one kind and the new model's weights and moments in full on every
rank while growing. Per-element ages are not supported under ZeRO (its step count is one per flat partition):
policy ``map+age`` raises; use ``map`` or ``reset``. Under bf16 (``ds_config(..., bf16=True)``) ``initialize``
builds the fp32 masters from the bf16 module, so the mapped fp32 weights are written back into them.
``set_optimizer_state`` (moments + step into a fresh engine) also starts a ZeRO run from a DCP checkpoint.
The Trainer drives all this through ``nanogrow.backend.ZeroBackend``.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from nanogrow.grow.execute import build_grown_model, check_model
from nanogrow.grow.optim import AdamW, grown_groups
from nanogrow.model import Transformer

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from nanogrow.grow.plan import GrowthPlan

# Elements per all-reduce when full tensors are gathered from the partitions (32 MiB of fp32): few collectives
# (the bench model's 7.1M parameters take one), each small enough for any backend's buffers.
BUCKET_NUMEL = 8 * 2**20


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
    # initialize allocates many Python objects; freezing the existing ones keeps the collections this triggers
    # from walking the whole process (torch, DeepSpeed, an old engine waiting for the collector).
    gc.freeze()
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    finally:
        gc.unfreeze()
    return ZeroRun(engine, config, hyper, name_group)


def inner_optimizer(engine: DeepSpeedEngine) -> torch.optim.Optimizer:
    return engine.optimizer.optimizer


def partition_params(engine: DeepSpeedEngine) -> list[torch.Tensor]:
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


def _is_zero3(engine) -> bool:
    return hasattr(engine.optimizer, "fp32_partitioned_groups_flat")


def _full_shape(p: torch.Tensor) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape  # ZeRO 3 leaves an empty placeholder in p


def has_state(run: ZeroRun) -> bool:
    """Whether the engine's optimizer holds Adam moments yet (none before the first step). The same on every rank."""
    st = inner_optimizer(run.engine).state
    return all("exp_avg" in st.get(part, {}) for part in partition_params(run.engine))


def _fragments(engine, params: list[torch.Tensor], kind: str | None = None) -> list[tuple[int, torch.Tensor] | None]:
    """Where this rank's fp32 partitions hold each of ``params``: (offset in the flattened full tensor, the 1-D
    fragment itself) or None if this rank holds none of it. ``kind``: None for the master weights, else an
    optimizer-state key ("exp_avg", "exp_avg_sq"; under ZeRO 1/2 only once ``_relink`` has run).
    These are the fragments ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` reduce."""
    zo = engine.optimizer
    out: list[tuple[int, torch.Tensor] | None] = []
    if _is_zero3(engine):  # every parameter split evenly over the ranks (the last partition padded)
        state = zo.optimizer.state
        for p in params:
            group, offset, numel = zo.grad_position[zo.get_param_id(p)]
            flat = zo.fp32_partitioned_groups_flat[group]
            src = flat if kind is None else state[flat][kind]
            start = zo._get_param_partition_rank(p) * numel
            n = min(numel, p.ds_numel - start)
            out.append((start, src.narrow(0, offset, n)) if n > 0 else None)
    else:  # ZeRO 1/2: each group flattened, then split; DeepSpeed's hp mapping says which slice of p is here
        for p in params:
            m = getattr(p, "_hp_mapping", None)
            out.append(None if m is None else (m.lp_fragment_address.start, m.get_hp_fragment(kind)))
    return out


def gather_full(engine: DeepSpeedEngine, params: list[torch.Tensor], kind: str | None = None,
                bucket_numel: int | None = None) -> list[torch.Tensor]:
    """The full fp32 master weights (``kind`` None) or optimizer state ``kind`` of ``params``, identical on every
    rank. A collective (every rank passes the same parameters in the same order): the parameters are laid end to
    end in one flat buffer, each rank writes the fragments it owns into it (zeros elsewhere; every element is
    owned by exactly one rank, so the sums are exact), and one all-reduce per ``bucket_numel`` elements (default
    ``BUCKET_NUMEL``) completes it; a parameter may span buckets. Returns views of that buffer."""
    from deepspeed import comm

    bucket = BUCKET_NUMEL if bucket_numel is None else int(bucket_numel)
    if bucket < 1:
        raise ValueError(f"bucket_numel must be positive, got {bucket}")
    shapes = [_full_shape(p) for p in params]
    sizes = [math.prod(s) for s in shapes]
    flat = torch.zeros(sum(sizes), dtype=torch.float32, device=partition_params(engine)[0].device)
    offset = 0
    for size, frag in zip(sizes, _fragments(engine, params, kind)):
        if frag is not None:
            start, t = frag
            flat.narrow(0, offset + start, t.numel()).copy_(t.detach().reshape(-1))
        offset += size
    group = engine.optimizer.dp_process_group
    for s in range(0, flat.numel(), bucket):
        comm.all_reduce(flat.narrow(0, s, min(bucket, flat.numel() - s)), group=group)
    out, offset = [], 0
    for size, shape in zip(sizes, shapes):
        out.append(flat.narrow(0, offset, size).view(shape))
        offset += size
    return out


def scatter_full(engine: DeepSpeedEngine, params: list[torch.Tensor], values: list[torch.Tensor],
                 kind: str | None = None) -> None:
    """Write full tensors (the same on every rank) into this rank's fragments of the fp32 master weights
    (``kind`` None) or of optimizer state ``kind``: local copies, no collective."""
    for p, value, frag in zip(params, values, _fragments(engine, params, kind)):
        if value.numel() != math.prod(_full_shape(p)):
            raise ValueError(f"scatter_full: {value.numel()} elements for a parameter of shape {_full_shape(p)}")
        if frag is not None:
            start, t = frag
            t.detach().copy_(value.reshape(-1).narrow(0, start, t.numel()).to(device=t.device, dtype=t.dtype))


def _release(run: ZeroRun) -> None:
    """Destroy an engine and drop the module-level references ZeRO 3 keeps to its modules, without collecting:
    what is left in reference cycles goes with the collector's next pass."""
    run.engine.destroy()
    try:
        from deepspeed.runtime.zero import parameter_offload
        parameter_offload.FWD_MODULE_STACK.clear()
    except Exception:
        pass
    _clear_release_cache()
    run.engine = None


def destroy(run: ZeroRun) -> None:
    """Free an engine now (ZeRO 3 keeps the old module alive through module-level references)."""
    _release(run)
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
    if policy == "map+age":
        raise NotImplementedError("grow_zero: per-element ages are not supported under ZeRO (one step count per "
                                  "flat partition); use policy 'map' or 'reset'")
    if policy not in ("map", "reset"):
        raise ValueError(f"unknown optimizer transfer policy {policy!r}")
    old = run.module
    check_model(plan, old)
    _relink(run)
    names, params = zip(*old.named_parameters())
    device = params[0].device

    full = dict(zip(names, gather_full(run.engine, list(params))))

    def fill(new: Transformer) -> None:
        for name, p in new.named_parameters():
            p.copy_(plan.targets[name].materialize(full.__getitem__, "param", device=device, dtype=p.dtype))

    new = build_grown_model(plan, device, fill, old.training)
    del full
    moments: dict[str, dict[str, torch.Tensor]] = {name: {} for name in plan.targets}
    if policy == "map":
        stateful = has_state(run)
        for k in ("exp_avg", "exp_avg_sq"):  # one kind at a time: the old full tensors of one kind at most
            if stateful:
                full = dict(zip(names, gather_full(run.engine, list(params), k)))
            else:  # grown before the first step: zero moments
                full = {n: torch.zeros(_full_shape(p)) for n, p in zip(names, params)}
            for name, target in plan.targets.items():
                moments[name][k] = target.materialize(full.__getitem__, k, device="cpu", dtype=torch.float32)
            del full
    step = zero_step_count(run)
    # Param groups: a target joins its primary source's group, else the same parameter's group in another layer
    # (nanogrow.grow.optim.grow's rule).
    joins = grown_groups(plan, run.name_group)
    groups = [dict(h, params=[]) for h in run.groups]
    for name, p in new.named_parameters():
        groups[joins[name]]["params"].append(p)
    config, hyper = run.config if config is None else config, run.groups
    # Under bf16, initialize casts the module to bf16 and builds the fp32 masters from it: keep the mapped fp32
    # weights to restore the masters' precision afterwards.
    masters = {n: p.detach().to("cpu", copy=True) for n, p in new.named_parameters()} if _bf16(config) else None
    del old, params
    _release(run)
    keep = [i for i, g in enumerate(groups) if g["params"]]
    new_run = zero_initialize(new, [groups[i] for i in keep], config)
    new_run.groups = [hyper[i] for i in keep]
    if masters is not None:
        names_new, params_new = zip(*new_run.module.named_parameters())
        scatter_full(new_run.engine, list(params_new), [masters[n] for n in names_new])
    if policy == "map":
        set_optimizer_state(new_run, moments, step)
    return new_run


def set_optimizer_state(run: ZeroRun, moments: dict[str, dict[str, torch.Tensor]], step: float) -> None:
    """Give a fresh engine's optimizer the full Adam moments ``moments[name] = {"exp_avg", "exp_avg_sq"}`` of
    every parameter and the step count ``step`` (every rank passes the same full tensors; no collective)."""
    _init_state(run, step)
    names, params = zip(*run.module.named_parameters())
    for k in ("exp_avg", "exp_avg_sq"):
        scatter_full(run.engine, list(params), [moments[n][k] for n in names], k)


def _init_state(run: ZeroRun, step: float) -> None:
    """Create the Adam state of every flat partition as the optimizer's first step would (zero moments), with
    step count ``step``, and link DeepSpeed's per-parameter views to it (ZeRO 1/2). Replaces any state."""
    inner = inner_optimizer(run.engine)
    for part in partition_params(run.engine):
        inner.state[part] = {"step": torch.tensor(float(step), dtype=torch.float32),
                             "exp_avg": torch.zeros_like(part, memory_format=torch.preserve_format),
                             "exp_avg_sq": torch.zeros_like(part, memory_format=torch.preserve_format)}
    _relink(run)
