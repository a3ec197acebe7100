"""LAG across process groups: the world splits into G groups, each trains one candidate at the same time.

The growth controller calls ``select_across_groups`` instead of the one-process ``lag_runner.lag_select`` when a
stage says ``lag = { ..., groups = G }``; both drive the trainer through the same ``lag_runner.CandidateRunner``.
What stays equal to the one-process LAG (tests/test_lag_groups.py checks it):

* the data: every group trains on the run's global batches. A group has W/G ranks instead of W, so it runs G times
  the gradient accumulation and its rank d reads, at the g-th of every G micro-steps, the slice world rank
  ``g * W/G + d`` would read (``GroupLoader``). Same tokens per optimizer step, same per-rank memory, same loss
  (a mean over the same rows), the same epoch wrap-around;
* the score: the same held-out batches, the run's next ``lag.score_batches`` world micro-steps, read through the
  group's loader (G reads per world micro-step) before the fork, so that no candidate trains on them; each group's
  mean all-gathered (``group_values``);
* the decision: lowest loss at step k, ties to the earlier candidate, candidates numbered as in the config.
  With more candidates than groups, round r trains candidates r*G .. r*G+G-1; groups left without one in the
  last round idle (their losses are +inf);
* the continuation: the winner's group keeps its state; every other rank rebuilds the winner's structure from
  its plan (cheap, no training), takes the winner's counters (step, data position, meter, lr policy, RNG, fade-in)
  and receives its weights, optimizer moments and ages by ``broadcast_group_state``. Then the world-wide wrapping
  is rebuilt and all ranks continue as one job;
* the cost: FLOPs spent on losing candidates and on every scoring pass are charged to the run's selection, as on
  one process. The wall time of a round is that of one candidate; the FLOPs are still spent.

Within a group the candidate is replicated (DDP over the group's ranks) or, when the run uses FSDP, sharded over
the group's ranks: the pre-growth state is re-sharded once from the world mesh onto each group's mesh
(``move_to_mesh``, one parameter gathered at a time), candidates grow there with ``grow_sharded``, the winner's
shards line up rank for rank across groups for the broadcast, and it is re-sharded back onto the world mesh.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch.distributed as dist

from .config import ConfigError, LagConfig, Stage, StageConfig
from .data import TokenLoader
from .grow import GrowthPlan, make_plan
from .lag import LagResult
from .lag_runner import CandidateRunner, charge_selection, held_out_tokens
from .model import ModelConfig
from .parallel import (broadcast_group_state, candidate_index, candidate_mesh, group_values,
                       model_and_optimizer_tensors, unwrap)
from .parallel.backends import backend_of, fsdp_mesh
from .parallel.groups import adopt_optimizer_structure, move_to_mesh, replicate_in_group, state_structure


def check_world(stages: list[StageConfig], world: int) -> None:
    """Raise ConfigError before any compute when a stage's ``lag.groups`` cannot split this world."""
    for i, st in enumerate(stages, start=1):
        g = LagConfig.from_dict(st.lag).groups if st.lag else 1
        if g > 1 and world % g:
            raise ConfigError(f"stage[{i}].lag.groups={g} must divide the world size {world} (launch a multiple "
                              f"of {g} processes, or set groups = 1 to run the candidates one after another)")


class GroupLoader:
    """The run's global token stream read by a group of ``world / n_groups`` ranks: micro-step j (mod n_groups)
    of group rank d reads what world rank ``j * world/n_groups + d`` reads from the world loader. Called
    n_groups times as often as the world loader; its state is the world loader's after every n_groups calls."""

    def __init__(self, data_dir, seq_len: int, micro_batch: int, dp_rank: int, dp_size: int, n_groups: int,
                 seed: int, vocab_size: int, shuffle_block: int = 0):
        self.loaders = [TokenLoader(data_dir, "train", seq_len, micro_batch, rank=j * dp_size + dp_rank,
                                    world_size=dp_size * n_groups, seed=seed, vocab_size=vocab_size,
                                    shuffle_block=shuffle_block)
                        for j in range(n_groups)]
        self.calls = 0

    def next_batch(self):
        loader = self.loaders[self.calls % len(self.loaders)]
        self.calls += 1
        return loader.next_batch()

    def set_batch_shape(self, micro_batch=None, seq_len=None) -> None:
        for loader in self.loaders:
            loader.set_batch_shape(micro_batch, seq_len)

    def state_dict(self) -> dict:
        if self.calls % len(self.loaders):
            raise RuntimeError("GroupLoader state read in the middle of a world micro-step")
        return self.loaders[0].state_dict()

    def load_state_dict(self, sd: dict) -> None:
        for loader in self.loaders:
            loader.load_state_dict(sd)
        self.calls = 0


@contextlib.contextmanager
def group_view(trainer, mesh):
    """The trainer as one group sees it: its loader, world size and gradient accumulation (``n_groups`` times the
    world's: ``trainer.groups``, which the growth controller's ``accumulation`` reads)."""
    n_groups, dp_size, dp_rank = mesh.size(0), mesh.size(1), mesh.get_local_rank("dp")
    cfg = trainer.cfg
    saved = trainer.loader, trainer.world, trainer.dp_group
    loader = GroupLoader(cfg.data.dir, trainer.seq_len, trainer.micro_batch, dp_rank, dp_size, n_groups,
                         cfg.data.seed, trainer.model_config.vocab_size, cfg.data.shuffle_block)
    loader.load_state_dict(trainer.loader.state_dict())
    trainer.loader = loader
    trainer.world, trainer.groups = dp_size, n_groups
    trainer.batch.grad_accum = trainer.growth.accumulation(trainer.micro_batch)
    trainer.dp_group = mesh.get_group("dp")  # collectives inside a candidate's training stay within its group
    try:
        yield
    finally:
        trainer.loader, trainer.world, trainer.dp_group = saved
        trainer.groups = 1
        # The world loader and accumulation take the batch shape the trainer now has (a candidate's stage may
        # change it).
        trainer.batch.grad_accum = trainer.growth.accumulation(trainer.micro_batch)
        trainer.loader.set_batch_shape(micro_batch=trainer.micro_batch, seq_len=trainer.seq_len)


def _mesh(trainer, n_groups: int):
    """One mesh per group count for the trainer's lifetime (creating process groups is a world collective)."""
    if n_groups not in trainer.lag_meshes:
        trainer.lag_meshes[n_groups] = candidate_mesh(n_groups, trainer.device.type)
    return trainer.lag_meshes[n_groups]


def select_across_groups(runner: CandidateRunner, st: Stage, old_cfg: ModelConfig, new_cfg: ModelConfig,
                         seed: int):
    """LAG with the candidates spread over ``st.lag.groups`` process groups; returns (winner's plan, record) like
    ``lag_runner.lag_select`` and leaves the trainer in the winner's state on every rank. A collective."""
    trainer = runner.trainer
    start = time.perf_counter()
    n_groups = st.lag.groups
    mesh = _mesh(trainer, n_groups)
    group = candidate_index(mesh)
    k, every = st.lag.steps, st.lag.eval_every
    candidates = st.lag.candidate_list(old_cfg, new_cfg)
    n = len(candidates)
    fsdp = backend_of(trainer.model) == "fsdp"
    world_mesh = fsdp_mesh(trainer.model) if fsdp else None
    base = runner.fork()
    # Candidates grow from the pre-growth state laid out for one group: sharded over the group's ranks (FSDP),
    # or the plain model, replicated within the group once grown.
    if fsdp:
        base["model"], base["optimizer"] = move_to_mesh(trainer.model, trainer.optimizer, mesh["dp"])
    else:
        base["model"] = unwrap(trainer.model)
    curves: list[list[float]] = [[] for _ in range(n)]
    spent, scored = [0.0] * n, [0.0] * n
    own_seconds = [0.0] * n  # each candidate's growth and steps (scoring excluded), as its group timed them
    winner, kept = None, None  # kept: the winner's state, on the ranks of the group that trained it
    applied = {}  # candidate -> the plan this group applied (a learned plan: fitted)

    with group_view(trainer, mesh):
        held_out = runner.selection_batches(st.lag.score_batches * n_groups)  # score_batches world micro-steps
        score_tokens = held_out_tokens(trainer, held_out)
        base["state"].loader = trainer.loader.state_dict()  # candidates start after the held-out batches
        for first in range(0, n, n_groups):
            mine = first + group
            t0, own = time.perf_counter(), 0.0
            if mine < n:
                runner.restore(base)
                applied[mine] = runner.apply(candidates[mine], old_cfg, new_cfg, seed)
                if not fsdp:
                    trainer.model = replicate_in_group(trainer.model, mesh)
            own += time.perf_counter() - t0
            score_flops = 0.0
            for j in range(k):
                if mine < n:
                    t0 = time.perf_counter()
                    runner.train(1)
                    own += time.perf_counter() - t0
                if (j + 1) % every == 0 or j == k - 1:
                    local, flops = runner.local_score(held_out) if mine < n else (math.inf, 0.0)
                    score_flops += flops
                    for h, loss in enumerate(group_values(local, mesh)):
                        if first + h < n:
                            curves[first + h].append(loss)
            flops = trainer.meter.total_flops - base["state"].meter["total_flops"] if mine < n else 0.0
            for h, (f, sf, sec) in enumerate(zip(group_values(flops, mesh, reduce="max"),
                                                 group_values(score_flops, mesh, reduce="max"),
                                                 group_values(own, mesh, reduce="max"))):
                if first + h < n:
                    spent[first + h], scored[first + h], own_seconds[first + h] = f, sf, sec
            for idx in range(first, min(first + n_groups, n)):
                trainer.log(f"  LAG candidate {idx + 1}/{n} {candidates[idx].name()} (group {idx - first}): "
                            f"held-out loss after {k} steps {curves[idx][-1]:.4f}")
                if winner is None or curves[idx][-1] < curves[winner][-1]:
                    winner, kept = idx, (runner.fork() if idx == mine else None)

    plan = applied.get(winner)
    if plan is None:
        plan = make_plan(candidates[winner].op, old_cfg, new_cfg, seed=seed, **candidates[winner].options)
    plan = _continue_from_winner(runner, mesh, winner % n_groups, kept, base, plan, world_mesh)
    record = LagResult(winner, curves).to_dict(candidates)
    record.update(steps=k, eval_every=every, flops_per_candidate=spent, groups=n_groups,
                  score_batches=st.lag.score_batches, score_tokens=score_tokens,
                  **charge_selection(trainer, spent, scored, winner))
    # The wall-clock the selection added: all of it but the winner's own growth and steps (rank 0's clock; the
    # rounds end together at their collectives, so every rank's is about the same).
    record["selection_seconds"] = time.perf_counter() - start - own_seconds[winner]
    trainer.log(f"  LAG picked {candidates[winner].name()} (held-out loss {curves[winner][-1]:.4f} after {k} steps, "
                f"{n} candidates on {n_groups} groups of {mesh.size(1)} process(es)); selection charged "
                f"{record['selection_flops']:.3e} FLOPs, {record['selection_seconds']:.1f} s")
    return plan, record


def _continue_from_winner(runner: CandidateRunner, mesh, src: int, kept: dict | None, base: dict, plan,
                          world_mesh=None) -> GrowthPlan:
    """Every rank takes the winning group's state, then the world-wide wrapping is rebuilt (FSDP: the winner is
    re-sharded from the group's mesh onto ``world_mesh``). Returns the winner's plan as its group applied it (a
    learned plan with the maps that group fitted; the other ranks only rebuild its structure, without fitting)."""
    trainer = runner.trainer
    if kept is not None:  # this group trained the winner
        runner.restore(kept)
        trainer.model = unwrap(trainer.model)
    else:  # rebuild the winner's structure from its plan; values follow by broadcast
        runner.restore(base)
        runner.apply_plan(plan, fit=False)
    # The winner's run state, and the layout its tensors have, travel as one small object.
    mine = {"state": runner.state(), "structure": state_structure(trainer.model, trainer.optimizer), "plan": plan}
    box = [mine]
    dist.broadcast_object_list(box, group=mesh.get_group("candidate"), group_src=src)
    winner = box[0]
    if kept is None:
        ramp = trainer.ramp  # the plan's fade-in, started at the growth step like the winner's
        runner.load_state(winner["state"])
        if ramp is not None:  # masks as the winner's last step left them (removed if its fade-in has ended)
            ramp.apply(trainer.model, trainer.step - 1)
        adopt_optimizer_structure(trainer.model, trainer.optimizer, winner["structure"])
    here = state_structure(trainer.model, trainer.optimizer)
    # Decided together: a rank that raised alone would leave the others waiting in the broadcast.
    if max(group_values(float(here != winner["structure"]), mesh, reduce="max")):
        diff = sorted(set(here) ^ set(winner["structure"]))[:4]
        raise RuntimeError(f"LAG groups: the winner's state and its rebuild on some rank differ in layout "
                           f"(here: {diff or 'none'})")
    broadcast_group_state(src, mesh, model_and_optimizer_tensors(trainer.model, trainer.optimizer))
    if hasattr(trainer.optimizer, "forget_uniform_cache"):
        trainer.optimizer.forget_uniform_cache()  # the broadcast rewrote ages without bumping their versions
    if world_mesh is not None:
        trainer.model, trainer.optimizer = move_to_mesh(trainer.model, trainer.optimizer, world_mesh)
    else:
        trainer.model = trainer.backend.wrap(trainer.model)
    return winner["plan"]
