"""What a run carries besides its model and optimizer, listed once.

A checkpoint's meta.json (``to_meta``), a resume (``from_meta``), a LAG candidate's fork and restore, and the
counters LAG across process groups sends from the winning group to every rank are all this one dataclass: a field
added here is saved, resumed, forked and broadcast alike.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from .model import ModelConfig


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
