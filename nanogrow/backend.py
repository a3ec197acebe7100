"""DeepSpeed ZeRO as the Trainer sees it (``train.parallel = "deepspeed"``, ``train.zero_stage = 1 | 2 | 3``).

The Trainer keeps its loop; ``ZeroBackend`` owns the engine and answers the few calls where ZeRO differs from
torch: ``start`` (build the engine, optionally from a checkpoint), ``backward`` / ``step`` (DeepSpeed reduces,
clips and steps; with gradient accumulation the optimizer steps at the accumulation boundary), ``grow``
(``nanogrow.parallel.zero.grow_zero``: a new engine with the mapped weights and moments) and ``save``.

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

from pathlib import Path

import torch

from .checkpoint import (DEEPSPEED_TAG, CheckpointError, atomic_save, check_finite, is_deepspeed, load_checkpoint,
                         restore_rng, verify_tree)
from .grow.optim import AdamW, param_groups
from .grow.fade import MaskRamp
from .grow.plan import GrowthPlan
from .parallel.zero import (ZeroRun, ds_config, grow_zero, inner_optimizer, partition_params, set_optimizer_state,
                            zero_initialize)


class ZeroBackend:
    """One DeepSpeed engine at a time (growth replaces it). ``t``: the TrainConfig."""

    def __init__(self, stage: int, t, device: torch.device):
        self.stage, self.t = stage, t
        # bf16 weights for compute, fp32 masters and moments: DeepSpeed's mixed precision, on CUDA only.
        self.bf16 = device.type == "cuda" and t.dtype in ("auto", "bf16")
        self.run: ZeroRun | None = None

    def config(self, micro_batch: int) -> dict:
        return ds_config(self.stage, micro_batch, self.t.grad_accum, self.t.grad_clip, bf16=self.bf16)

    @property
    def engine(self):
        return self.run.engine

    @property
    def optimizer(self):
        """DeepSpeed's ZeRO optimizer: its ``param_groups`` are where the Trainer sets the learning rate."""
        return self.run.engine.optimizer

    def start(self, model: torch.nn.Module, micro_batch: int, resume: tuple[Path, dict] | None = None):
        """The engine for ``model`` (the Trainer's param groups and AdamW hyper-parameters); with ``resume`` =
        (checkpoint, meta), its state continues from there. Returns the engine (the Trainer's model)."""
        t = self.t
        groups = [dict(g, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps) for g in param_groups(model, t.weight_decay)]
        groups = [g for g in groups if g["params"]]  # DeepSpeed drops empty groups; keep ours aligned
        if resume is None:
            self.run = zero_initialize(model, groups, self.config(micro_batch))
        elif is_deepspeed(resume[1]):
            self._resume_zero(model, groups, micro_batch, *resume)
        else:
            self._resume_dcp(model, groups, micro_batch, *resume)
        return self.engine

    def _resume_zero(self, model, groups, micro_batch, path: Path, meta: dict) -> None:
        if meta.get("ramp"):  # masks exist in the saved module exactly while a ramp is on: create the buffers
            ramp = MaskRamp.from_dict(meta["ramp"])
            ramp.apply(model, ramp.start_step)
        verify_tree(path, meta, DEEPSPEED_TAG)  # DeepSpeed unpickles these files: check them before it opens any
        self.run = zero_initialize(model, groups, self.config(micro_batch))
        loaded, _ = self.engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"checkpoint {str(path)!r}: DeepSpeed could not load {DEEPSPEED_TAG!r}")
        # The config in force wins over the saved hyper-parameters (a resume may change them on purpose);
        # the learning rate is set every step.
        for group, hyper in zip(self.optimizer.param_groups, self.run.groups):
            group.update({k: v for k, v in hyper.items() if k in ("weight_decay", "betas", "eps")})
        restore_rng(path, meta)

    def _resume_dcp(self, model, groups, micro_batch, path: Path, meta: dict) -> None:
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
        self.run = zero_initialize(model, groups, self.config(micro_batch))
        set_optimizer_state(self.run, moments, step)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the Trainer already divides by grad_accum

    def step(self) -> None:
        """Called after every micro-batch: DeepSpeed reduces, clips (``train.grad_clip``), steps the optimizer and
        zeroes gradients at the accumulation boundary only."""
        self.engine.step()

    def grow(self, plan: GrowthPlan, policy: str, micro_batch: int):
        """Grow in place (a collective); returns the new engine."""
        self.run = grow_zero(self.run, plan, policy=policy, config=self.config(micro_batch))
        return self.engine

    def save(self, out_dir: Path, step: int, meta: dict, keep_last: int) -> Path:
        # This rank's fp32 master partitions and Adam moments (the weights forward uses are copies of the masters)
        masters = [(f"fp32 partition {i}", t) for i, t in enumerate(partition_params(self.engine))]
        moments = [(f"optimizer state {i}.{k}", v) for i, st in enumerate(inner_optimizer(self.engine).state.values())
                   for k, v in st.items()]
        check_finite(masters + moments, f"step {step}")  # before anything is written or rotated

        def write(tmp: Path) -> None:
            self.engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, client_state={}, save_latest=False)

        meta = dict(meta, format="deepspeed", zero_stage=self.stage)
        return atomic_save(out_dir, step, write, meta, keep_last)
