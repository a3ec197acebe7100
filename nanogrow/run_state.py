"""What a run carries besides its model and optimizer, listed once.

A checkpoint's meta.json (``to_meta``), a resume (``from_meta``), a LAG candidate's fork and restore, and the
counters LAG across process groups sends from the winning group to every rank are all this one dataclass: a field
added here is saved, resumed, forked and broadcast alike.

``BatchLayout`` is the other thing that changes while a run goes (the config is frozen): how the current stage
batches, and how many steps the run has. It is derived, never saved: the stage index and the config decide it
again on resume and on restore.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .grow import GrowthLR, MaskRamp
from .model import ModelConfig
from .triggers import trigger_from_state


@dataclass
class BatchLayout:
    """The current stage's batch shape and the run's length, owned by the loop. A stage may change ``micro_batch``
    and ``seq_len`` (and, with train.global_batch, the accumulation follows); ``max_steps`` is train.max_steps, or
    with train.max_flops the steps the budget buys, re-planned at the start and after every growth event."""

    micro_batch: int  # sequences per micro-step on each rank
    seq_len: int  # tokens per sequence
    grad_accum: int  # micro-steps per optimizer step on each rank
    max_steps: int  # the step the run ends at


@dataclass
class RunState:
    step: int
    loader: dict | None  # the data position (None: an imported model, whose data stream starts here)
    meter: dict  # tokens and FLOPs so far
    stage_index: int
    stage_stats: list[dict] | None  # one row per stage (None: an older checkpoint without them)
    model_config: ModelConfig  # the current shape
    growth_lr: dict | None  # the lr policy after growth (None: an older checkpoint; the config's is kept)
    ramp: dict | None  # the fade-in in progress, if any
    trigger: dict | None  # the next stage's trigger (None: a fresh one is made)
    history: list[dict]  # growth events and evaluations, in order
    seq_len: int | None = None  # the current stage's batch shape: recorded; the config's stages decide it
    micro_batch: int | None = None
    rng: Any = None  # torch's CPU RNG state, in forks only: checkpoints keep each rank's RNG in files of their own

    @classmethod
    def of(cls, trainer, rng: bool = True) -> RunState:
        """A copy of what ``trainer``'s run carries besides model and optimizer (``rng``: with torch's RNG)."""
        tr = trainer
        return cls(step=tr.step, loader=tr.loader.state_dict(), meter=tr.meter.state_dict(),
                   stage_index=tr.stage_index, stage_stats=tr.stage_stats.rows, model_config=tr.model_config,
                   growth_lr=tr.growth_lr.state_dict(), ramp=tr.ramp.to_dict() if tr.ramp is not None else None,
                   trigger=tr.trigger.state_dict() if tr.trigger is not None else None, history=tr.history,
                   seq_len=tr.seq_len, micro_batch=tr.micro_batch,
                   rng=torch.get_rng_state() if rng else None).copy()

    def restore(self, trainer, resumed: bool = False) -> None:
        """``trainer`` continues from this state (a fork's, the LAG winner's, or a checkpoint's on resume). The
        model and optimizer are not part of it; the stage's batch shape follows from its index."""
        s, tr = self.copy(), trainer
        tr.step, tr.stage_index, tr.model_config = s.step, s.stage_index, s.model_config
        if s.loader is not None:
            tr.loader.load_state_dict(s.loader)
        tr.meter.load_state_dict(s.meter)
        tr.history = s.history
        if s.growth_lr is not None:
            tr.growth_lr = GrowthLR.from_state_dict(s.growth_lr)
        if s.rng is not None:
            torch.set_rng_state(s.rng)
        tr.ramp = MaskRamp.from_dict(s.ramp) if s.ramp else None
        if s.stage_stats is not None:
            tr.stage_stats.rows = s.stage_stats
        if resumed:  # a stage continued at another world size, shape or peak gets a row of its own from here
            now = tr.stage_stats.row(tr.stage_index, tr.step, tr.model_config, tr.seq_len, tr.micro_batch)
            if any(tr.stage_stats.rows[-1].get(k) != now[k] for k in ("world", "peak_flops", "shape")):
                tr.stage_stats.rows.append(dict(now, resumed=True))
        tr.trigger = trigger_from_state(s.trigger) if s.trigger else tr.growth.make_trigger()
        tr.growth.set_stage_batch()

    def to_meta(self) -> dict:
        """The entries of a checkpoint's meta.json (everything but the RNG)."""
        meta = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rng"}
        meta["model_config"] = dataclasses.asdict(self.model_config)
        return meta

    @classmethod
    def from_meta(cls, meta: dict) -> RunState:
        """From a checkpoint's meta.json; entries older checkpoints lack are None (or empty)."""
        return cls(step=meta["step"], loader=meta.get("loader"), meter=meta["meter"],
                   stage_index=meta.get("stage_index", 0), stage_stats=meta.get("stage_stats"),
                   model_config=ModelConfig(**meta["model_config"]).resolved(), growth_lr=meta.get("growth_lr"),
                   ramp=meta.get("ramp"), trigger=meta.get("trigger"), history=meta.get("history", []),
                   seq_len=meta.get("seq_len"), micro_batch=meta.get("micro_batch"))

    def copy(self) -> RunState:
        """A copy that shares nothing mutable with this one (a fork must not see its sibling's training)."""
        return copy.deepcopy(self)
