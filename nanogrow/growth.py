"""Growth during a run: when the next stage starts, and what entering it does.

``GrowthController`` holds the resolved stages (``config.resolve_stages``), their layouts and boundaries, and
answers the Trainer's two questions before every step: ``due()`` (does the next stage's trigger fire now?) and
``grow_next_stage()`` (apply its plan, chosen by LAG when the stage says so, log the event, checkpoint). Applying a
plan (``apply``: learned maps fitted first, the backend's grow, fade-in masks, lr policy) is shared by the plain
growth event and by every LAG candidate (``lag_runner.CandidateRunner``).

The controller acts on its trainer's public state (model, optimizer, step, meter, the run-state fields and the
batch layout ``trainer.batch``); what it keeps itself is derived from the (frozen) config and fixed for the run.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch

from .config import RunConfig, Stage, changes_parameters, grad_accum, resolve_stages
from .grow import make_plan
from .grow.learned import LearnedPlan, fit
from .grow.plan import GrowthPlan
from .lag_runner import CandidateRunner, lag_select
from .lag_parallel import select_across_groups
from .metrics import fmt
from .model import ModelConfig
from .parallel import reshard, unwrap
from .schedule import stage_layouts, stage_start_steps
from .triggers import Trigger, make_trigger


class GrowthController:
    # ``trainer``: the Trainer (typed Any: train.py imports this module, and a type import back would be a cycle).
    def __init__(self, trainer: Any, cfg: RunConfig) -> None:
        self.trainer, self.cfg, self.t = trainer, cfg, cfg.train
        self.stages: list[Stage] = resolve_stages(cfg)  # every stage's values, growth defaults filled in
        self.layouts = stage_layouts(cfg.model, cfg.data.seq_len, self.t.micro_batch, cfg.stage)
        self.starts = self.boundaries()

    def boundaries(self) -> list[dict]:
        """For each growth event, the condition that fires it: {"at_step"|"at_tokens"|"at_flops": value}."""
        g, tr = self.cfg.growth, self.trainer
        if not self.stages:
            return []
        if g.schedule == "manual":
            return [{k: getattr(st, k)} for st in self.stages for k in ("at_step", "at_tokens", "at_flops")
                    if getattr(st, k) >= 0]
        # Each stage's own tokens per step and FLOPs per token (its micro-batch, sequence length and shape).
        tps = [lay.tokens_per_step(tr.world, self.accumulation(lay.micro_batch)) for lay in self.layouts]
        fpt = [lay.flops_per_token() for lay in self.layouts]
        starts = stage_start_steps(g.schedule, self.t.max_steps, tps, fpt, g.exp_ratio)
        return [{"at_step": s} for s in starts]

    def accumulation(self, micro_batch: int) -> int:
        """Micro-steps per optimizer step on each rank at ``micro_batch`` (config.grad_accum). Inside LAG's group
        view (``trainer.groups`` > 1, ``trainer.world`` one group's ranks) a group reads the world's whole batch:
        the world's accumulation times the number of groups."""
        tr = self.trainer
        return grad_accum(self.t, tr.world * tr.groups, micro_batch) * tr.groups

    def lr_mult(self, stage_index: int) -> float:
        """A stage's own peak lr, as a multiple of train.lr (the schedule's shape is kept)."""
        mult = 1.0
        for st in self.stages[:stage_index]:
            mult = st.lr / self.t.lr if st.lr else mult
        return mult

    def make_trigger(self) -> Trigger | None:
        """The trigger that decides when the next stage starts; its stage-length bounds count from now."""
        tr = self.trainer
        if tr.stage_index >= len(self.stages):
            return None
        st = self.stages[tr.stage_index]
        opts = dict(st.trigger_options)
        if st.trigger == "schedule":
            opts.update(self.starts[tr.stage_index])
        elif st.trigger == "scaling-law":
            nxt = dataclasses.replace(tr.model_config, **st.shape)
            opts.setdefault("next_params", nxt.num_params(include_embedding=False))
        return make_trigger(st.trigger, start_step=tr.step, **opts)

    def update_masks(self) -> None:
        """Set the fade-in masks for this step; once the ramp is over they are removed (no steady-state cost)."""
        tr = self.trainer
        if tr.ramp is not None and tr.ramp.apply(unwrap(tr.model), tr.step):
            tr.ramp = None

    def end_wd_hold(self) -> None:
        """growth.new_wd_steps after the last growth, the new elements decay again. Derived from the growth
        history, so a resumed run ends the hold at the same step (the held scales are in the checkpoint)."""
        n, tr = self.cfg.growth.new_wd_steps, self.trainer
        if n <= 0:
            return
        last = next((h["step"] for h in reversed(tr.history) if h["event"] == "grow"), None)
        if last is not None and tr.step == last + n:
            tr.backend.end_wd_hold(tr.optimizer)

    def due(self) -> bool:
        """Does the trigger of the next stage fire now? (Checked before every step.) A growth that falls inside
        a fade-in waits for it to finish: operators are defined on unmasked models."""
        tr = self.trainer
        self.update_masks()
        if tr.trigger is None or tr.ramp is not None:
            return False
        return tr.trigger.should_grow(tr.step, tr.meter.total_tokens, tr.meter.total_flops)

    def apply(self, plan: GrowthPlan, st: Stage, fit: bool = True) -> GrowthPlan:
        """Swap in the grown model and optimizer (the old ones are left untouched), start masks and lr policy.
        Returns the plan applied (a learned plan is fitted first, unless ``fit`` is False: a structure-only rebuild
        whose values are about to be overwritten, as LAG across groups does)."""
        tr = self.trainer
        if fit:
            plan = self.fit_learned(plan)
        micro_batch = st.micro_batch or tr.micro_batch  # the new stage's (a new ZeRO engine is built with it)
        tr.model, tr.optimizer = tr.backend.grow(tr.model, tr.optimizer, plan, st.optimizer, micro_batch,
                                                 self.accumulation(micro_batch))
        tr.model_config = plan.new_cfg.resolved()
        tr.ramp = plan.mask_ramp(tr.step)
        if tr.ramp is not None:
            tr.ramp.apply(unwrap(tr.model), tr.step)
        if st.lr_policy != "continue":
            tr.growth_lr.on_growth(tr.step)
        self.enter_next_stage()
        if self.t.compile:  # the grown model's blocks, at the new stage's shapes: part of the growth event's time
            tr.compile_seconds = tr.compile()
        return plan

    def set_stage_batch(self) -> None:
        """Batch shape and context of the current stage (later stages may change micro-batch, seq_len and
        max_seq_len). The loader keeps its global position: the next batch starts at the token after the last
        one consumed, whatever the new shape."""
        tr = self.trainer
        lay = self.layouts[tr.stage_index]
        tr.batch.grad_accum = self.accumulation(lay.micro_batch)
        if (lay.micro_batch, lay.seq_len) != (tr.micro_batch, tr.seq_len):
            tr.batch.micro_batch, tr.batch.seq_len = lay.micro_batch, lay.seq_len
            tr.loader.set_batch_shape(micro_batch=lay.micro_batch, seq_len=lay.seq_len)
        if lay.model.max_seq_len != tr.model_config.max_seq_len:
            unwrap(tr.model).set_max_seq_len(lay.model.max_seq_len)  # every rank: RoPE tables are not sharded
            tr.model_config = dataclasses.replace(tr.model_config, max_seq_len=lay.model.max_seq_len)

    def enter_next_stage(self) -> None:
        """The stage counter, its batch shape and context, and a fresh row of per-stage statistics."""
        tr = self.trainer
        tr.stage_index += 1
        self.set_stage_batch()
        tr.stage_stats.start(tr.stage_index, tr.step, tr.model_config, tr.seq_len, tr.micro_batch)

    def fit_learned(self, plan: GrowthPlan) -> GrowthPlan:
        """Fit a learned (LiGO-style) plan's maps on the grown model's LM loss before it is applied. Batches come
        from the training loader (this rank's share, one micro-batch per map step): they count as tokens seen
        and are not trained on again. The old weights are gathered in full on every rank (the maps are fitted
        identically everywhere, their gradients averaged over ranks); the FLOPs spent, on every rank, count in
        the run's total (category "fit"; a losing LAG candidate's fit is charged to its selection). Other plans
        pass through."""
        if not isinstance(plan, LearnedPlan) or plan.fitted:
            return plan
        tr = self.trainer
        reshard(tr.model)
        old = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
               for n, p in unwrap(tr.model).named_parameters()}

        def next_batch():
            x, y = tr.loader.next_batch()
            return x.to(tr.device, non_blocking=True), y.to(tr.device, non_blocking=True)

        def average(flat):
            torch.distributed.all_reduce(flat, group=tr.dp_group)
            flat.div_(tr.world)

        plan = fit(plan, old, next_batch, reduce_grads=average if tr.world > 1 else None, autocast=tr.autocast,
                   log=tr.log)
        tr.meter.add(plan.fit_record["tokens"] * tr.world, 0.0)
        tr.meter.add_flops(plan.fit_record["flops"] * tr.world, "fit")
        return plan

    def grow_next_stage(self) -> dict:
        """Apply the next stage's growth plan in place (weights, optimizer state, ages, masks), log the event and
        write a checkpoint. With ``lag`` set, the operator is chosen by LAG first."""
        tr = self.trainer
        i = tr.stage_index + 1
        st, g = self.stages[i - 1], self.cfg.growth
        old_cfg, old_seq, old_mb = tr.model_config, tr.seq_len, tr.micro_batch
        # The plan maps parameters at the old context length; the stage's max_seq_len (RoPE tables only) and its
        # batch shape are applied by set_stage_batch once the stage is entered.
        new_cfg = dataclasses.replace(old_cfg, **{**st.shape, "max_seq_len": old_cfg.max_seq_len}).resolved()
        before = tr.evaluate() if g.eval_at_growth else None
        t0 = time.perf_counter()
        lag_record, plan = None, None
        if not changes_parameters(old_cfg, new_cfg):
            # Only seq_len, micro_batch or max_seq_len: no plan, no copy of the weights, no optimizer change. The
            # lr is re-warmed only if the stage asks (growth.lr_policy is about fresh weights and moments).
            if st.rewarm_without_growth:
                tr.growth_lr.on_growth(tr.step)
            self.enter_next_stage()
        elif st.lag:
            plan, lag_record = self.lag_select(st, old_cfg, new_cfg)
        else:
            plan = self.apply(make_plan(st.op, old_cfg, new_cfg, seed=st.seed, **st.options), st)
        seconds = time.perf_counter() - t0
        # Same weights and the same (fixed-length) validation batches: the loss after a plan-free stage is the same.
        after = (tr.evaluate() if plan is not None else before) if g.eval_at_growth else None
        event = {"event": "grow", "stage": i, "step": tr.step, "tokens": tr.meter.total_tokens,
                 "flops": tr.meter.total_flops, "plan": plan.to_dict() if plan is not None else None,
                 "optimizer": st.optimizer if plan is not None else None,
                 "params_before": old_cfg.num_params(), "params_after": tr.model_config.num_params(),
                 "seq_len_before": old_seq, "seq_len_after": tr.seq_len, "micro_batch_before": old_mb,
                 "micro_batch_after": tr.micro_batch, "max_seq_len": tr.model_config.max_seq_len,
                 "val_loss_before": before, "val_loss_after": after, "seconds": seconds,
                 "compile_seconds": tr.compile_seconds if self.t.compile and plan is not None else 0.0,
                 "trigger": tr.trigger.state_dict() if tr.trigger else None}
        if lag_record:
            event["lag"] = lag_record
        tr.history.append(event)
        tr.trackers.log({"kind": "grow", "step": tr.step, "tokens": event["tokens"], "flops": event["flops"],
                         "stage": i, "params_before": event["params_before"], "params_after": event["params_after"],
                         "val_loss_before": before, "val_loss_after": after,
                         "op": plan.op if plan is not None else None, "seconds": seconds})
        tr.trigger = self.make_trigger()
        self.fit_steps_to_flops()
        what = plan.describe().splitlines()[0] if plan is not None else "no parameter change"
        if (old_seq, old_mb) != (tr.seq_len, tr.micro_batch):
            what += f" | seq_len {old_seq} -> {tr.seq_len}, micro_batch {old_mb} -> {tr.micro_batch}"
        tr.log(f"grow -> stage {i} at step {tr.step}: {what} | "
               f"{event['params_before']:,} -> {event['params_after']:,} params | val loss "
               f"{fmt(before)} -> {fmt(after)} | {1e3 * seconds:.0f} ms"
               + (f" (recompile {1e3 * event['compile_seconds']:.0f} ms)" if event["compile_seconds"] else ""))
        tr.save()  # every growth event is a checkpoint: the grown shape is recoverable from here on
        tr.meter.reset_window()
        return event

    def lag_select(self, st: Stage, old_cfg: ModelConfig, new_cfg: ModelConfig) -> tuple[GrowthPlan, dict]:
        """LAG: (the winner's plan, the selection's record); the trainer continues from the winner."""
        runner = CandidateRunner(self.trainer, self, st)
        if st.lag.groups > 1:  # candidates train at the same time, one per process group
            return select_across_groups(runner, st, old_cfg, new_cfg, st.seed)
        return lag_select(runner, st, old_cfg, new_cfg, st.seed)

    def step_cost(self, stage: int) -> tuple[int, float]:
        """Tokens and FLOPs of one optimizer step of stage ``stage`` (its shape, micro-batch and sequence length)."""
        tr, lay = self.trainer, self.layouts[stage]
        tps = lay.tokens_per_step(tr.world, self.accumulation(lay.micro_batch))
        return tps, tps * lay.flops_per_token()

    def planned_starts(self) -> list[tuple[int, int]]:
        """The growth events ahead whose step is known now, as (index into ``stages``, step it fires at): schedule
        triggers at_step, or at_tokens / at_flops reached at each stage's own cost per step from the run's tokens
        and charged FLOPs so far; up to the first stage a trigger decides (it cannot be foreseen)."""
        tr = self.trainer
        if self.cfg.growth.schedule != "manual" and not self.starts:
            return []
        step, tokens, flops, out = tr.step, tr.meter.total_tokens, tr.meter.total_flops, []
        for i in range(tr.stage_index, len(self.stages)):
            when = self.starts[i] if i < len(self.starts) else {}
            if self.stages[i].trigger != "schedule" or not when:
                break
            tps, fps = self.step_cost(i)
            (kind, mark), = when.items()
            at = {"at_step": lambda: mark, "at_tokens": lambda: step + math.ceil((mark - tokens) / tps),
                  "at_flops": lambda: step + math.ceil((mark - flops) / fps)}[kind]()
            at = max(at, step)
            out.append((i, at))
            tokens, flops, step = tokens + (at - step) * tps, flops + (at - step) * fps, at
        return out

    def fit_steps_to_flops(self) -> None:
        """With train.max_flops: the step at which the run has spent its budget (charged FLOPs), each stage ahead
        whose start is known (``planned_starts``) at its own cost per step and the rest at the last one's. Called
        at the start, on resume and after every growth event, so it is exact and resumable: the lr schedule a run
        starts with is that of the same run planned in steps (a study's at_frac arms), and what a growth event
        charges beyond its steps (LAG's selection, a learned fit) shortens the schedule from there on."""
        tr = self.trainer
        if not self.t.max_flops:
            return
        left, step = max(0.0, self.t.max_flops - tr.meter.total_flops), tr.step
        cost = tr.tokens_per_step() * tr.model_config.flops_per_token(tr.seq_len)  # the stage as it runs now
        for i, at in self.planned_starts():
            if (at - step) * cost >= left:
                break
            left -= (at - step) * cost
            step, cost = at, self.step_cost(i + 1)[1]
        tr.batch.max_steps = step + max(1, round(left / cost))

    def warn_dropped_stages(self) -> None:
        """Stages that start at or after train.max_steps never run (say, after --set train.max_steps=40 on the
        demo): name them. at_tokens / at_flops marks are placed with each stage's own tokens per step and FLOPs
        per token; triggered stages cannot be foreseen."""
        dropped = []
        for i, at in self.planned_starts():
            (kind, mark), = self.starts[i].items()
            if at >= self.trainer.max_steps:
                dropped.append(f"stage {i + 1} ({kind} {mark:g})" if kind != "at_step" else
                               f"stage {i + 1} (at_step {mark})")
        if dropped:
            tr = self.trainer
            tr.log(f"warning: train.max_steps={tr.max_steps} ends before {', '.join(dropped)} would start: "
                   f"{'it' if len(dropped) == 1 else 'they'} will never run (raise train.max_steps or move the stage "
                   f"with --set stage.N.at_step=...)")
