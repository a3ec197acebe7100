"""DeepSpeed ZeRO as the Trainer sees it (``train.parallel = "deepspeed"``, ``train.zero_stage = 1 | 2 | 3``).

The Trainer keeps its loop; ``ZeroBackend`` owns the engine and answers the few calls where ZeRO differs from
torch: ``start`` (build the engine, optionally from a checkpoint), ``backward`` / ``step`` (DeepSpeed reduces,
clips and steps; with gradient accumulation the optimizer steps at the accumulation boundary), ``grow``
(``nanogrow.parallel.zero.grow_zero``: a new engine with the mapped weights and moments) and ``save``.

Checkpoints: DeepSpeed's own ``save_checkpoint`` writes the partitions into the same atomic ``ckpt_XXXXXXX.tmp``
directory the DCP checkpoints use (``nanogrow.checkpoint.atomic_save``), next to meta.json (``format =
"deepspeed"``, ``zero_stage``, ``world_size``). DeepSpeed cannot repartition optimizer state for another world size,
so ``check_resume`` refuses that before any engine is built and points at ``consolidate``: a weights-only DCP
checkpoint (``deepspeed.utils.zero_to_fp32`` gathers the fp32 masters; fresh Adam state; data position, schedule
and growth history kept) that any backend at any world size, ``nanogrow grow`` and ``export-hf`` start from.
A ZeRO run can also start from any DCP checkpoint: weights and Adam moments go in through
``safe_set_full_optimizer_state`` (per-element ages cannot: ZeRO keeps one step count per flat partition).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from nanogrow.checkpoint import (DEEPSPEED_TAG, CheckpointError, atomic_save, check_finite, is_deepspeed,
                                 load_checkpoint, read_meta, restore_rng, save_checkpoint, verify_tree)
from nanogrow.grow.optim import AdamW
from nanogrow.grow.plan import GrowthPlan, MaskRamp, set_buffer

from .zero import (ZeroRun, _inner_optimizer, _partition_params, ds_config, grow_zero, set_optimizer_state,
                   zero_initialize)


def check_resume(meta: dict, path: Path, parallel: str, world: int, stage: int) -> None:
    """A ZeRO checkpoint resumes only under ZeRO, at the stage and world size that wrote it; say so, and how to
    restart from its weights, before anything is built."""
    if not is_deepspeed(meta):
        return
    saved_world, saved_stage = meta.get("world_size"), meta.get("zero_stage")
    if parallel == "deepspeed" and world == saved_world and stage == saved_stage:
        return
    here = f"ZeRO-{stage}" if parallel == "deepspeed" else f"train.parallel={parallel!r}"
    raise CheckpointError(
        f"checkpoint {str(path)!r} was written by DeepSpeed ZeRO-{saved_stage} at world size {saved_world}; this "
        f"run is {here} at world size {world}. DeepSpeed cannot repartition its optimizer state for another world "
        f"size or backend. Restart from its weights (fresh optimizer state; data position, lr schedule and growth "
        f"history kept): `nanogrow consolidate {path} --out DIR`, then `--resume DIR/{Path(path).name}`")


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
        from nanogrow.train import param_groups

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
        masters = [(f"fp32 partition {i}", t) for i, t in enumerate(_partition_params(self.engine))]
        moments = [(f"optimizer state {i}.{k}", v) for i, st in enumerate(_inner_optimizer(self.engine).state.values())
                   for k, v in st.items()]
        check_finite(masters + moments, f"step {step}")  # before anything is written or rotated

        def write(tmp: Path) -> None:
            self.engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, client_state={}, save_latest=False)

        meta = dict(meta, format="deepspeed", zero_stage=self.stage)
        return atomic_save(out_dir, step, write, meta, keep_last)


def load_consolidated_weights(path: Path, model: torch.nn.Module) -> None:
    """Load the fp32 weights (and growth masks) of a ZeRO checkpoint into an unwrapped ``model`` of its shape,
    gathered from the partitions by DeepSpeed's ``zero_to_fp32``. One process, no engine."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise CheckpointError(f"checkpoint {str(path)!r} is a DeepSpeed checkpoint; reading it needs the deepspeed "
                              f"package") from None
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DEEPSPEED_TAG)
    own = model.state_dict()
    for name, tensor in state.items():
        if name not in own:  # a growth mask (None in a fresh model until set)
            try:
                set_buffer(model, name, tensor.clone())
            except KeyError:
                raise CheckpointError(f"checkpoint {str(path)!r} has tensor {name!r} that the model does not "
                                      f"know") from None
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


def consolidate(path: str | Path, out_dir: str | Path, log=print) -> Path:
    """Write a weights-only DCP checkpoint of ``path`` (DeepSpeed or any other) into ``out_dir``, same step: the
    fp32 weights and masks, a fresh optimizer (step-0 state), and the meta that lets training continue (data
    position, lr schedule, stage, growth history)."""
    from nanogrow.config import RunConfig
    from nanogrow.model import ModelConfig, Transformer
    from nanogrow.train import make_optimizer

    src = Path(path)
    meta = read_meta(src)
    cfg = ModelConfig(**meta["model_config"])
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    load_checkpoint(src, model, None, load_rng=False)
    model.reset_rope()
    optimizer = make_optimizer(model, RunConfig.from_dict(meta["run_config"], source=str(src)).train)
    optimizer.init_state()
    out_meta = {k: v for k, v in meta.items() if k not in ("format", "zero_stage", "format_version", "step",
                                                            "world_size")}
    out_meta["optimizer_ages"] = False
    out_meta["history"] = meta.get("history", []) + [{
        "event": "consolidate", "step": meta["step"], "source": str(src.resolve()),
        "world_size": meta.get("world_size"), "format": meta.get("format", "dcp"), "optimizer": "reset"}]
    saved = save_checkpoint(out_dir, meta["step"], model, optimizer, out_meta, keep_last=10**6)
    log(f"consolidated {src} (step {meta['step']}, {cfg.num_params():,} params, world size "
        f"{meta.get('world_size')}) into the weights-only checkpoint {saved}")
    return saved


__all__ = ["ZeroBackend", "check_resume", "consolidate", "load_consolidated_weights"]
