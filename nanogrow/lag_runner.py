"""LAG candidates as the trainer runs them: fork, restore, apply a plan, train k steps, score.

``CandidateRunner`` is the one interface both one-process LAG (``lag_select``, here) and LAG across process groups
(``lag_parallel.select_across_groups``) drive: neither touches the Trainer's internals. A fork is the run state
(``run_state.RunState``) with the model and optimizer it trains; a grown candidate leaves the forked ones
untouched, so restoring a fork is cheap.

What a selection computes is charged to the run (``metrics``, category "selection"): every candidate's scoring
passes and everything a losing candidate spent; the winner's steps are the run's own training. Candidates are
scored on ``lag.score_batches`` micro-batches taken from the training stream when the selection starts, before the
fork: the same batches for every candidate, never trained on (the run continues after them), never validation data.
"""

from __future__ import annotations

import time

from . import dist_utils
from .config import Stage
from .grow import make_plan
from .lag import Candidate, paired_se, select, select_halving, spread, standard_error
from .model import ModelConfig
from .run_state import RunState


class CandidateRunner:
    """Candidates of stage ``st`` trained by ``trainer``, grown by its GrowthController ``growth``."""

    def __init__(self, trainer, growth, st: Stage):
        self.trainer, self.growth, self.st = trainer, growth, st

    def fork(self) -> dict:
        """The run state, and the model and optimizer it trains."""
        tr = self.trainer
        return {"state": RunState.of(tr), "model": tr.model, "optimizer": tr.optimizer}

    def restore(self, fork: dict) -> None:
        tr = self.trainer
        tr.model, tr.optimizer = fork["model"], fork["optimizer"]
        fork["state"].restore(tr)

    def state(self) -> RunState:
        return RunState.of(self.trainer)

    def load_state(self, state: RunState) -> None:
        """The counters of another fork (the LAG winner's), on this runner's model and optimizer."""
        state.restore(self.trainer)

    def apply(self, candidate: Candidate, old_cfg: ModelConfig, new_cfg: ModelConfig, seed: int, fit: bool = True):
        """Grow the trainer by ``candidate``'s plan; returns the plan applied (a learned one: fitted, if ``fit``)."""
        return self.growth.apply(make_plan(candidate.op, old_cfg, new_cfg, seed=seed, **candidate.options), self.st,
                                 fit=fit)

    def apply_plan(self, plan, fit: bool = True):
        return self.growth.apply(plan, self.st, fit=fit)

    def train(self, n: int = 1) -> None:
        for _ in range(n):
            self.growth.update_masks()
            self.trainer.train_step()

    def selection_batches(self, n: int) -> list:
        """The next ``n`` micro-batches of this rank's training stream, at the batch shape of the stage the
        candidates train (its micro-batch and sequence length), on the device: the selection's held-out data. Read
        before the fork, so that no candidate (and not the run after it) trains on them."""
        tr, lay = self.trainer, self.growth.layouts[self.st.index]
        tr.loader.set_batch_shape(micro_batch=lay.micro_batch, seq_len=lay.seq_len)
        batches = [(x.to(tr.device), y.to(tr.device)) for x, y in (tr.loader.next_batch() for _ in range(n))]
        tr.loader.set_batch_shape(micro_batch=tr.micro_batch, seq_len=tr.seq_len)  # the stage running now
        return batches

    def local_score(self, batches: list) -> tuple[float, float]:
        """This rank's mean loss of the current candidate over ``batches``, and the FLOPs of that forward pass on
        every rank of its data-parallel group (LAG across groups reduces the loss over one group only)."""
        tr = self.trainer
        return tr.local_val_loss(batches), tr.forward_cost(batches)

    def score(self, batches: list) -> tuple[float, float]:
        """``local_score`` with the loss averaged over every rank."""
        loss, flops = self.local_score(batches)
        return dist_utils.all_reduce_mean(loss, self.trainer.device), flops


def lag_select(runner: CandidateRunner, st: Stage, old_cfg: ModelConfig, new_cfg: ModelConfig, seed: int):
    """One-process LAG: each candidate from the same fork, one after another (all k steps, or successive halving);
    the trainer continues from the winner. Returns (the winner's plan, the selection's record)."""
    tr = runner.trainer
    k, every, strategy = st.lag.steps, st.lag.eval_every, st.lag.strategy
    candidates = st.lag.candidate_list(old_cfg, new_cfg)
    start = time.perf_counter()
    held_out = runner.selection_batches(st.lag.score_batches)
    score_tokens = held_out_tokens(tr, held_out)
    base = runner.fork()
    plans: dict[int, object] = {}
    ses: list[list[float]] = [[] for _ in candidates]
    last_batches: dict[int, list[float]] = {}  # each candidate's per-batch losses at its last scoring
    # Each candidate's FLOPs and steps (its meter and step counter advance from the same start), its scoring FLOPs,
    # and the wall-clock of its growth and steps (scoring excluded).
    spent, steps = [0.0] * len(candidates), [0] * len(candidates)
    scored, own_seconds = [0.0] * len(candidates), [0.0] * len(candidates)

    def account(idx):
        spent[idx] = tr.meter.total_flops - base["state"].meter["total_flops"]
        steps[idx] = tr.step - base["state"].step

    def grow_candidate(idx, cand):
        t0 = time.perf_counter()
        runner.restore(base)
        plans[idx] = runner.apply(cand, old_cfg, new_cfg, seed)
        own_seconds[idx] += time.perf_counter() - t0

    def train(idx, n, eval_every):
        losses = []
        for j in range(n):
            t0 = time.perf_counter()
            runner.train(1)
            own_seconds[idx] += time.perf_counter() - t0
            if (j + 1) % eval_every == 0 or j == n - 1:
                loss, flops = runner.score(held_out)
                losses.append(loss)
                scored[idx] += flops
                # The standard error of the score's mean over its batches (this rank's): about how far apart two
                # candidates' losses must be to be told apart.
                ses[idx].append(standard_error(tr.last_eval))
                last_batches[idx] = list(tr.last_eval)
        return losses

    def train_candidate(idx, cand):  # LAG@k: k steps each
        grow_candidate(idx, cand)
        losses = train(idx, k, every)
        account(idx)
        tr.log(f"  LAG candidate {idx + 1}/{len(candidates)} {cand.name()}: held-out loss after {k} steps "
               f"{losses[-1]:.4f} (+- {ses[idx][-1]:.4f})")
        return losses, runner.fork()

    def train_more(idx, cand, n, state):  # successive halving: n more steps from where it stopped
        if state is None:
            grow_candidate(idx, cand)
        else:
            runner.restore(state)
        loss = train(idx, n, n)[-1]
        account(idx)
        tr.log(f"  LAG candidate {idx + 1}/{len(candidates)} {cand.name()}: held-out loss after "
               f"{tr.step - base['state'].step} steps {loss:.4f} (+- {ses[idx][-1]:.4f})")
        return loss, runner.fork()

    rounds = None
    if strategy == "halving":
        result, rounds = select_halving(candidates, k, train_more)
    else:
        result = select(candidates, train_candidate)
    runner.restore(result.states)
    w = result.winner
    record = result.to_dict(candidates)
    record.update(steps=k, eval_every=every, flops_per_candidate=spent, steps_per_candidate=steps,
                  strategy=strategy, eval_se=ses, score_batches=st.lag.score_batches, score_tokens=score_tokens,
                  **charge_selection(tr, spent, scored, w))
    record["selection_seconds"] = time.perf_counter() - start - own_seconds[w]  # all but the winner's own steps
    if rounds is not None:
        record["rounds"] = rounds
    record["paired_se"] = paired_se(result, steps, last_batches)
    tr.log(f"  LAG ({strategy}) picked {candidates[w].name()} "
           f"(held-out loss {result.curves[w][-1]:.4f} after {steps[w]} steps; "
           f"its s.e. {ses[w][-1]:.4f}, of its difference from the runner-up "
           f"{record['paired_se']:.4f}; candidates' spread {spread([c[-1] for c in result.curves if c]):.4f}); "
           f"selection charged {record['selection_flops']:.3e} FLOPs (losers' steps "
           f"{record['selection_flops'] - sum(scored):.2e}, scoring {sum(scored):.2e}), "
           f"{record['selection_seconds']:.1f} s")
    return plans[w], record


def charge_selection(tr, spent: list[float], scored: list[float], winner: int) -> dict:
    """Charge a finished selection to ``tr``'s meter (category "selection"): what every losing candidate spent and
    every candidate's scoring passes; the winner's own steps stay the run's training. Returns the record's entries
    for it."""
    flops = sum(f for j, f in enumerate(spent) if j != winner) + sum(scored)
    tr.meter.add_flops(flops, "selection")
    return {"score_flops_per_candidate": list(scored), "selection_flops": flops}


def held_out_tokens(tr, batches: list) -> int:
    """Tokens of the held-out batches over the ranks of ``tr``'s data-parallel group (every rank holds its share)."""
    return sum(x.numel() for x, _ in batches) * tr.world
