"""Backends: how the Trainer builds, steps, grows and saves its model, whatever runs it.

The Trainer keeps one loop and calls the same methods on whichever backend ``make_backend`` picks:
``start`` (build, optionally from a checkpoint; returns model and optimizer), ``autocast``, ``backward``,
``grad_norm``, ``step`` / ``zero_grad``, ``end_wd_hold``, ``grow`` (returns the grown model and optimizer),
``save``, ``wrap``, ``compile``. ``supports(feature)`` says what it can do (skip a non-finite update, re-evaluate
a step for the curvature probe, ...), from the one table config validation asks too (``parallel.support``).

``TorchBackend``: one process, DDP or FSDP2 (applied from outside the model, ``nanogrow.parallel``) with
nanogrow's AdamW; checkpoints are DCP (``checkpoint.save_checkpoint``).

``ZeroBackend``: DeepSpeed ZeRO (``train.parallel = "deepspeed"``, ``train.zero_stage = 1 | 2 | 3``). It owns the
engine: ``backward`` also calls the engine's step (DeepSpeed reduces, clips and steps at the accumulation boundary
only), ``grow`` is ``nanogrow.parallel.zero.grow_zero`` (a new engine with the mapped weights and moments).

Checkpoints: DeepSpeed's own ``save_checkpoint`` writes the partitions into the same atomic ``ckpt_XXXXXXX.tmp``
directory the DCP checkpoints use (``checkpoint.atomic_save``), next to meta.json (``format = "deepspeed"``,
``zero_stage``, ``world_size``). DeepSpeed cannot repartition optimizer state for another world size, so
``checkpoint.check_resume`` refuses that before any engine is built and points at ``offline.consolidate``: a
weights-only DCP checkpoint (``deepspeed.utils.zero_to_fp32`` gathers the fp32 masters; fresh Adam state; data
position, schedule and growth history kept) that any backend at any world size, ``nanogrow grow`` and
``export-hf`` start from.
A ZeRO run can also start from any DCP checkpoint: weights and Adam moments go in through
``safe_set_full_optimizer_state`` (per-element ages cannot: ZeRO keeps one step count per flat partition).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from .checkpoint import (DEEPSPEED_TAG, CheckpointError, atomic_save, check_deepspeed_trusted, check_finite,
                         is_deepspeed, load_checkpoint, restore_rng, save_checkpoint)
from .grow.fade import MaskRamp
from .grow.optim import AdamW, drop_wd_scales, make_optimizer, param_groups
from .grow.plan import GrowthPlan
from .parallel import compile_blocks, grow_parallel, make_mesh, parallelize, unwrap
from .parallel.support import supports
from .parallel.zero import (ZeroRun, ds_config, grow_zero, inner_optimizer, partition_params, set_optimizer_state,
                            zero_initialize)


def make_backend(parallel: str, t, device: torch.device, growth):
    """The backend for ``parallel`` (none | ddp | fsdp | deepspeed, resolved for the world size)."""
    if parallel == "deepspeed":
        return ZeroBackend(t.zero_stage, t, device)
    return TorchBackend(parallel, t, device, growth)


class TorchBackend:
    """One process, DDP or FSDP2. ``t``: the TrainConfig, ``growth``: the GrowthConfig (grow-time options)."""

    def __init__(self, parallel: str, t, device: torch.device, growth):
        self.parallel, self.t, self.device, self.growth = parallel, t, device, growth

    def supports(self, feature: str) -> bool:
        return supports(self.parallel, feature)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP or FSDP2 (per block, then the root), applied from outside the model (nanogrow.parallel)."""
        bf16 = self.device.type == "cuda" and self.t.dtype in ("auto", "bf16")
        mesh = make_mesh(self.parallel, self.t.replicate, self.device.type) if self.parallel == "fsdp" else None
        return parallelize(model, self.parallel, mesh=mesh, mixed_precision=bf16, replicate=self.t.replicate)

    def start(self, model: torch.nn.Module, micro_batch: int, grad_accum: int,
              resume: tuple[Path, dict] | None = None):
        """(model, optimizer) for ``model``, wrapped; with ``resume`` = (checkpoint, meta), loaded from there. The
        batch layout (``micro_batch``, ``grad_accum``) is the engine's business only under DeepSpeed."""
        model = self.wrap(model)
        optimizer = make_optimizer(unwrap(model), self.t)
        if resume is not None:
            path, meta = resume
            if meta.get("stage_index", 0):  # a grown model: the optimizer may track per-element ages
                optimizer = make_optimizer(unwrap(model), self.t, ages=meta.get("optimizer_ages", False))
            load_checkpoint(path, unwrap(model), optimizer)
            apply_optimizer_config(optimizer, self.t)  # a resume may change weight decay, betas or eps on purpose
        return model, optimizer

    def autocast(self):
        dtype = self.t.dtype
        if dtype == "auto":
            dtype = "bf16" if self.device.type == "cuda" else "fp32"
        if dtype == "bf16":
            return lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext

    def compile(self, model, optimizer, batch_shape: tuple[int, int], ramp, step: int, log) -> float:
        """``train.compile``: compile the blocks not compiled yet (all of them at the start, the grown model's after
        a growth event; ``parallel.compile_blocks``) and run one forward and backward on a batch of zeros of
        ``batch_shape`` (micro-batch, seq_len) and the current masks, so that the compile happens now (timed,
        logged, counted in a growth event's time) instead of inside the next step. Nothing is stepped; the
        gradients are dropped. Returns seconds."""
        t0, autocast = time.perf_counter(), self.autocast()
        if compile_blocks(model):
            x = torch.zeros(*batch_shape, dtype=torch.long, device=self.device)
            # A fade-in in progress: also the variant without masks, which the run reaches when the ramp ends.
            ramp_end = [] if ramp is None else [ramp.start_step + ramp.steps]
            for at in [step] + ramp_end:
                if ramp_end:
                    ramp.apply(unwrap(model), at)
                with autocast():
                    loss = model(x, x)
                loss.backward()
                optimizer.zero_grad(set_to_none=True)
            if ramp_end:
                ramp.apply(unwrap(model), step)  # this step's masks again
        seconds = time.perf_counter() - t0
        log(f"compiled {len(unwrap(model).layers)} blocks ({batch_shape[0]} x {batch_shape[1]}): {seconds:.1f} s")
        return seconds

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_norm(self, model: torch.nn.Module) -> float:
        """The global gradient norm, clipped to train.grad_clip when > 0 (clip_grad_norm_ returns the norm before
        clipping). A DTensor norm (FSDP) is reduced over the mesh by full_tensor()."""
        params = [p for p in model.parameters() if p.grad is not None]
        if self.t.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.t.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return float(norm)

    def step(self, optimizer) -> None:
        optimizer.step()

    def zero_grad(self, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def end_wd_hold(self, optimizer) -> None:
        drop_wd_scales(optimizer)

    def grow(self, model, optimizer, plan: GrowthPlan, policy: str, micro_batch: int, grad_accum: int):
        """Grow in place under whatever wrapping ``model`` has; returns (new model, new optimizer)."""
        g = self.growth
        return grow_parallel(model, optimizer, plan, policy=policy, device=self.device,
                             lr_adapt=None if g.lr_adapt == "none" else g.lr_adapt, new_lr_mult=g.new_lr_mult,
                             new_wd_hold=g.new_wd_steps > 0)

    def save(self, out_dir: Path, step: int, model, optimizer, meta: dict, keep_last: int) -> Path:
        return save_checkpoint(out_dir, step, unwrap(model), optimizer, meta, keep_last=keep_last)


def apply_optimizer_config(optimizer, t) -> None:
    """Loading restores the hyper-parameters saved in the checkpoint; the config in force wins."""
    for group in optimizer.param_groups:
        if any(p.dim() >= 2 for p in group["params"]):  # the no-decay group (norm gains) stays at 0
            group["weight_decay"] = t.weight_decay
        group["betas"], group["eps"] = (t.beta1, t.beta2), t.eps


class ZeroBackend:
    """One DeepSpeed engine at a time (growth replaces it). ``t``: the TrainConfig."""

    parallel = "deepspeed"

    def __init__(self, stage: int, t, device: torch.device):
        self.stage, self.t = stage, t
        # bf16 weights for compute, fp32 masters and moments: DeepSpeed's mixed precision, on CUDA only.
        self.bf16 = device.type == "cuda" and t.dtype in ("auto", "bf16")
        self.run: ZeroRun | None = None

    def supports(self, feature: str) -> bool:
        return supports(self.parallel, feature)

    def config(self, micro_batch: int, grad_accum: int) -> dict:
        return ds_config(self.stage, micro_batch, grad_accum, self.t.grad_clip, bf16=self.bf16)

    @property
    def engine(self):
        return self.run.engine

    @property
    def optimizer(self):
        """DeepSpeed's ZeRO optimizer: its ``param_groups`` are where the Trainer sets the learning rate."""
        return self.run.engine.optimizer

    def start(self, model: torch.nn.Module, micro_batch: int, grad_accum: int,
              resume: tuple[Path, dict] | None = None):
        """The engine for ``model`` (the Trainer's param groups and AdamW hyper-parameters); with ``resume`` =
        (checkpoint, meta), its state continues from there. Returns (engine, its optimizer): the engine is the
        Trainer's model."""
        t = self.t
        groups = [dict(g, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps) for g in param_groups(model, t.weight_decay)]
        groups = [g for g in groups if g["params"]]  # DeepSpeed drops empty groups; keep ours aligned
        config = self.config(micro_batch, grad_accum)
        if resume is None:
            self.run = zero_initialize(model, groups, config)
        elif is_deepspeed(resume[1]):
            self._resume_zero(model, groups, config, *resume)
        else:
            self._resume_dcp(model, groups, config, *resume)
        return self.engine, self.optimizer

    def wrap(self, model):
        return model

    def autocast(self):
        return contextlib.nullcontext  # DeepSpeed casts the module itself (bf16 on CUDA)

    def compile(self, model, optimizer, batch_shape, ramp, step: int, log) -> float:
        log("note: train.compile is not applied under DeepSpeed (the engine owns the module)")
        return 0.0

    def _resume_zero(self, model, groups, config: dict, path: Path, meta: dict) -> None:
        if meta.get("ramp"):  # masks exist in the saved module exactly while a ramp is on: create the buffers
            ramp = MaskRamp.from_dict(meta["ramp"])
            ramp.apply(model, ramp.start_step)
        check_deepspeed_trusted(path, meta)  # DeepSpeed unpickles these files: check them before it opens any
        self.run = zero_initialize(model, groups, config)
        loaded, _ = self.engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"checkpoint {str(path)!r}: DeepSpeed could not load {DEEPSPEED_TAG!r}")
        # The config in force wins over the saved hyper-parameters (a resume may change them on purpose);
        # the learning rate is set every step.
        for group, hyper in zip(self.optimizer.param_groups, self.run.groups):
            group.update({k: v for k, v in hyper.items() if k in ("weight_decay", "betas", "eps")})
        restore_rng(path, meta)

    def _resume_dcp(self, model, groups, config: dict, path: Path, meta: dict) -> None:
        """Any DCP checkpoint (one process, DDP, FSDP, consolidated): weights and moments in full on every rank,
        then into the partitions."""
        if meta.get("optimizer_ages"):
            raise CheckpointError(f"checkpoint {str(path)!r} tracks per-element optimizer ages (growth.optimizer="
                                  f"'map+age'), which ZeRO cannot hold; restart from its weights with "
                                  f"`nanogrow consolidate {path} --out DIR`")
        plain = AdamW([dict(g, params=list(g["params"])) for g in groups])
        load_checkpoint(path, model, plain)
        moments, step = {}, 0.0
        for name, p in model.named_parameters():
            st = plain.state.get(p, {})
            moments[name] = {k: st[k].detach().float().cpu() if k in st else torch.zeros(p.shape)
                             for k in ("exp_avg", "exp_avg_sq")}
            step = max(step, float(st.get("step", 0.0)))
        del plain
        self.run = zero_initialize(model, groups, config)
        set_optimizer_state(self.run, moments, step)

    def backward(self, loss: torch.Tensor) -> None:
        """After every micro-batch: DeepSpeed reduces, clips (``train.grad_clip``), steps the optimizer and zeroes
        gradients at the accumulation boundary only."""
        self.engine.backward(loss, scale_wrt_gas=False)  # the Trainer already divides by grad_accum
        self.engine.step()

    def grad_norm(self, model) -> float:
        return float(self.engine.get_global_grad_norm() or 0.0)

    def step(self, optimizer) -> None:
        pass  # DeepSpeed has stepped already (``backward``): a bad step cannot be skipped, only stopped at

    def zero_grad(self, optimizer) -> None:
        pass  # the engine zeroes gradients itself at the accumulation boundary (``engine.step`` in ``backward``)

    def end_wd_hold(self, optimizer) -> None:
        pass  # no hold to end: config validation refuses growth.new_wd_steps with train.parallel = "deepspeed"

    def grow(self, model, optimizer, plan: GrowthPlan, policy: str, micro_batch: int, grad_accum: int):
        """Grow in place (a collective); returns (the new engine, its optimizer)."""
        self.run = grow_zero(self.run, plan, policy=policy, config=self.config(micro_batch, grad_accum))
        return self.engine, self.optimizer

    def save(self, out_dir: Path, step: int, model, optimizer, meta: dict, keep_last: int) -> Path:
        # This rank's fp32 master partitions and Adam moments (the weights forward uses are copies of the masters)
        masters = [(f"fp32 partition {i}", t) for i, t in enumerate(partition_params(self.engine))]
        moments = [(f"optimizer state {i}.{k}", v) for i, st in enumerate(inner_optimizer(self.engine).state.values())
                   for k, v in st.items()]
        check_finite(masters + moments, f"step {step}")  # before anything is written or rotated

        def write(tmp: Path) -> None:
            self.engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, client_state={}, save_latest=False)

        meta = dict(meta, format="deepspeed", zero_stage=self.stage)
        return atomic_save(out_dir, step, write, meta, keep_last)
