"""LAG candidates as the trainer runs them: fork, restore, apply a plan, train k steps, score.

``CandidateRunner`` is the one interface both one-process LAG (``lag_select``, here) and LAG across process groups
(``lag_parallel.select_across_groups``) drive: neither touches the Trainer's internals. A fork is the run state
(``run_state.RunState``) with the model and optimizer it trains; a grown candidate leaves the forked ones
untouched, so restoring a fork is cheap.
"""

from __future__ import annotations

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

    def local_val_loss(self, batches: list) -> float:
        """This rank's mean loss over ``batches`` (LAG across groups reduces it over one group only)."""
        return self.trainer.local_val_loss(batches)

    def val_batches(self, n: int | None = None) -> list:
        return self.trainer.val[:n] if n else self.trainer.val

    def evaluate(self, n: int | None = None) -> float:
        return self.trainer.evaluate(n)


def lag_select(runner: CandidateRunner, st: Stage, old_cfg: ModelConfig, new_cfg: ModelConfig, seed: int):
    """One-process LAG: each candidate from the same fork, one after another (all k steps, or successive halving);
    the trainer continues from the winner. Returns (the winner's plan, the selection's record)."""
    tr = runner.trainer
    k, every, strategy = st.lag.steps, st.lag.eval_every, st.lag.strategy
    n_eval = st.lag.eval_batches or len(tr.val)
    candidates = st.lag.candidate_list(old_cfg, new_cfg)
    base = runner.fork()
    plans: dict[int, object] = {}
    ses: list[list[float]] = [[] for _ in candidates]
    last_batches: dict[int, list[float]] = {}  # each candidate's per-batch losses at its last evaluation
    # Each candidate's FLOPs and steps: its meter and step counter advance from the same start.
    spent, steps = [0.0] * len(candidates), [0] * len(candidates)

    def account(idx):
        spent[idx] = tr.meter.total_flops - base["state"].meter["total_flops"]
        steps[idx] = tr.step - base["state"].step

    def grow_candidate(idx, cand):
        runner.restore(base)
        plans[idx] = runner.apply(cand, old_cfg, new_cfg, seed)

    def train(idx, n, eval_every):
        losses = []
        for j in range(n):
            runner.train(1)
            if (j + 1) % eval_every == 0 or j == n - 1:
                losses.append(runner.evaluate(n_eval))
                # The standard error of the evaluation's mean over its batches (this rank's): about how far apart
                # two candidates' losses must be to be told apart.
                ses[idx].append(standard_error(tr.last_eval))
                last_batches[idx] = list(tr.last_eval)
        return losses

    def train_candidate(idx, cand):  # LAG@k: k steps each
        grow_candidate(idx, cand)
        losses = train(idx, k, every)
        account(idx)
        tr.log(f"  LAG candidate {idx + 1}/{len(candidates)} {cand.name()}: val loss after {k} steps "
               f"{losses[-1]:.4f} (+- {ses[idx][-1]:.4f})")
        return losses, runner.fork()

    def train_more(idx, cand, n, state):  # successive halving: n more steps from where it stopped
        if state is None:
            grow_candidate(idx, cand)
        else:
            runner.restore(state)
        loss = train(idx, n, n)[-1]
        account(idx)
        tr.log(f"  LAG candidate {idx + 1}/{len(candidates)} {cand.name()}: val loss after "
               f"{tr.step - base['state'].step} steps {loss:.4f} (+- {ses[idx][-1]:.4f})")
        return loss, runner.fork()

    rounds = None
    if strategy == "halving":
        result, rounds = select_halving(candidates, k, train_more)
    else:
        result = select(candidates, train_candidate)
    runner.restore(result.states)
    # The losers' training is compute the run spent: count it, so compute-normalized comparisons stay honest.
    tr.meter.add_flops(sum(f for j, f in enumerate(spent) if j != result.winner))
    record = result.to_dict(candidates)
    record.update(steps=k, eval_every=every, flops_per_candidate=spent, steps_per_candidate=steps,
                  strategy=strategy, eval_batches=n_eval, eval_se=ses)
    if rounds is not None:
        record["rounds"] = rounds
    record["paired_se"] = paired_se(result, steps, last_batches)
    tr.log(f"  LAG ({strategy}) picked {candidates[result.winner].name()} "
           f"(val loss {result.curves[result.winner][-1]:.4f} after {steps[result.winner]} steps; "
           f"evaluation s.e. {ses[result.winner][-1]:.4f}, of its difference from the runner-up "
           f"{record['paired_se']:.4f}; candidates' spread {spread([c[-1] for c in result.curves if c]):.4f})")
    return plans[result.winner], record
