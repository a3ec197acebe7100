"""The training loop: data -> step -> metrics -> evaluation -> checkpoints, for a model whose shape may change.

Read top to bottom: ``Trainer.__init__`` validates everything that can be wrong (config, data, checkpoint) before
any compute, ``run`` is the loop, ``train_step`` one optimizer step with gradient accumulation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch

from . import dist_utils
from .backend import ZeroBackend, make_backend
from .checkpoint import (CheckpointError, NonFiniteError, check_resume, checkpoint_dirs, latest_checkpoint, read_meta,
                         remove_checkpoints, remove_stray_tmp)
from .config import (ConfigError, RunConfig, Stage, changes_parameters, eval_seq_len, fit_warmup, from_accelerate,
                     resolve_stages)
from .data import PrefetchLoader, TokenLoader, val_batches
from .grow import GrowthLR, MaskRamp, make_plan
from .grow import make_optimizer  # noqa: F401  (re-exported: nanogrow.train.make_optimizer)
from .grow.learned import LearnedPlan, fit
from .lag import select, select_halving
from .lag_parallel import check_world, select_across_groups
from .logs import RunLog
from .metrics import ThroughputMeter, device_peak_flops
from .model import ModelConfig, build_model
from .offline import grow_checkpoint  # noqa: F401  (re-exported: nanogrow.train.grow_checkpoint)
from .run_state import RunState
from .parallel import grad_sync, reshard, unwrap
from .schedule import stage_layouts, stage_start_steps
from .tracking import Trackers
from .triggers import CurvatureTrigger, GradientTrigger, Observation, make_trigger, trigger_from_state


def lr_at(step: int, t) -> float:
    """Learning rate at optimizer step ``step`` (0-based) for the schedule in TrainConfig ``t``."""
    peak, floor = t.lr, t.lr * t.min_lr_ratio
    if t.schedule == "constant":
        return peak * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else peak
    if step < t.warmup_steps:
        return peak * (step + 1) / t.warmup_steps
    if t.schedule == "cosine":
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
    # wsd: warm-up, stable at peak, then linear decay over the last decay_frac of the run
    decay_start = int(t.max_steps * (1.0 - t.decay_frac))
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, t.max_steps - decay_start))
    return peak + (floor - peak) * progress


class Trainer:
    def __init__(self, cfg: RunConfig, resume: str | None = None, log=None, overwrite: bool = False):
        """``log``: a callable for the console lines (default: the "nanogrow.train" logger, rank 0); every line
        also goes to ``out_dir/train.log`` on rank 0."""
        launcher_note = from_accelerate(cfg.train)  # accelerate launch --use_deepspeed: the ZeRO stage it names
        cfg.validate()
        self.cfg, self.t = cfg, cfg.train
        _check_device(cfg)
        self.device = dist_utils.pick_device(self.t.device)
        dist_utils.init_from_env(self.device)
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.dp_group = None  # the data-parallel process group (None: the world; LAG groups narrow it)
        check_world(cfg.stage, self.world)  # LAG across process groups: G must divide the world
        self.out_dir = Path(self.t.out_dir)
        console = None if log is None else (log if self.rank == 0 else (lambda *a, **k: None))
        self.log = RunLog(self.out_dir, console=console, rank=self.rank)
        self._check_global_batch()
        warmup_note = fit_warmup(self.t)

        # Everything that can be wrong is checked here, before a single FLOP is spent.
        self._claim_out_dir(resume, overwrite)
        ckpt = self._resolve_resume(resume)
        meta = read_meta(ckpt) if ckpt else None
        if meta:
            self._check_compatible(meta, ckpt)
        for note in (launcher_note, warmup_note):
            if note:
                self.log(note)
        self.model_config: ModelConfig = (ModelConfig(**meta["model_config"]) if meta else cfg.model).resolved()
        self.seq_len = cfg.data.seq_len
        self.micro_batch = self.t.micro_batch
        # The next batch is read (and pinned on CUDA) in a background thread while a step computes.
        self.loader = PrefetchLoader(TokenLoader(cfg.data.dir, "train", self.seq_len, self.micro_batch, rank=self.rank,
                                                 world_size=self.world, seed=cfg.data.seed,
                                                 vocab_size=self.model_config.vocab_size,
                                                 shuffle_block=cfg.data.shuffle_block),
                                     pin=self.device.type == "cuda")
        # Validation at one fixed length for the whole run (see config.eval_seq_len): comparable across stages.
        self.val = val_batches(cfg.data.dir, eval_seq_len(cfg), self.t.eval_batch_size, self.t.eval_batches,
                               rank=self.rank, world_size=self.world, vocab_size=self.model_config.vocab_size)
        self._val_at_len: dict[int, list] = {}  # a short stage's own-length batches (evaluate_at_stage_len)

        # Growth: stage i >= 1 starts with the i-th growth event. Boundaries of a budgeted schedule are fixed now.
        self.stages: list[Stage] = resolve_stages(cfg)  # every stage's values, growth defaults filled in
        self.layouts = stage_layouts(cfg.model, cfg.data.seq_len, self.t.micro_batch, cfg.stage)
        self.stage_starts = self._stage_boundaries()
        self.stage_index = 0
        g = cfg.growth
        self.growth_lr = GrowthLR(g.lr_policy, g.rewarm_steps if g.lr_policy != "continue" else 0,
                                  g.rewarm_start, peak_step=self.t.warmup_steps)
        self.ramp: MaskRamp | None = None
        self.meter = ThroughputMeter(device_peak_flops(self.device), self.world)
        self.stage_stats: list[dict] = [self._new_stage_stats(0, 0)]

        torch.manual_seed(self.t.seed)
        self.parallel = self.t.parallel if self.t.parallel != "auto" else ("ddp" if self.world > 1 else "none")
        if self.parallel != "none" and self.world == 1:
            self.parallel = "none"  # one process: nothing to shard or replicate
        if meta:
            check_resume(meta, ckpt, self.parallel, self.world, self.t.zero_stage)  # before any engine is built
        self.backend = make_backend(self.parallel, self.t, self.device, cfg.growth)
        self.model, self.optimizer = self.backend.start(build_model(self.model_config, self.device, seed=self.t.seed),
                                                        self.micro_batch, resume=(ckpt, meta) if meta else None)
        self.step = 0
        self._nonfinite_streak, self._loss_avg, self._quiet_until = 0, None, 0
        self.trigger = self._make_trigger()
        self.history: list[dict] = []  # growth events and evaluations, in order
        if meta:
            self.load_run_state(RunState.from_meta(meta), resumed=True)  # (backend.start loaded the checkpoint)
            if meta.get("seq_len", self.seq_len) != self.seq_len or \
                    meta.get("micro_batch", self.micro_batch) != self.micro_batch:
                self.log(f"note: the config trains stage {self.stage_index} at seq_len {self.seq_len} x micro_batch "
                         f"{self.micro_batch}, the checkpoint was at {meta.get('seq_len')} x "
                         f"{meta.get('micro_batch')}; the token stream continues from the same global position")
            self.log(f"resumed from {ckpt} at step {self.step} ({self.meter.total_tokens:,} tokens, "
                     f"stage {self.stage_index})")
        self.autocast = self.backend.autocast()
        self.grad_norm: float | None = None  # the last step's global gradient norm (before clipping)
        self.trackers = Trackers(self.out_dir, self.rank, self.t, cfg.to_dict(),
                                 resume_step=self.step if meta else None)
        self.compile_seconds = self._compile() if self.t.compile else 0.0
        self._fit_steps_to_flops()
        self._warn_dropped_stages()

    def _fit_steps_to_flops(self) -> None:
        """With train.max_flops: the step count that spends what is left of the budget at the current stage's cost
        per step (called at the start, on resume, and after every growth event, so it is exact and resumable)."""
        if not self.t.max_flops:
            return
        per_step = self.tokens_per_step() * self.model_config.flops_per_token(self.seq_len)
        left = max(0.0, self.t.max_flops - self.meter.total_flops)
        self.t.max_steps = self.step + max(1, round(left / per_step))

    # ---- set-up helpers -------------------------------------------------------------------------------------
    def _claim_out_dir(self, resume: str | None, overwrite: bool) -> None:
        """A fresh run never writes into another run's checkpoints: rotation orders by step number across both
        runs and --resume auto would then load a mix. Leftovers of a crashed save are removed in any case."""
        existing = checkpoint_dirs(self.out_dir)
        if existing and resume is None and not overwrite:
            raise CheckpointError(
                f"train.out_dir {str(self.out_dir)!r} already holds checkpoints ({existing[0].name} ... "
                f"{existing[-1].name}) of an earlier run; continue it with `--resume auto`, or start afresh with "
                f"`--overwrite` (deletes them), or set another train.out_dir")
        if resume is None:
            self.log.start_afresh()
        if self.rank == 0:
            if existing and resume is None and overwrite:
                remove_checkpoints(self.out_dir, log=self.log)
            remove_stray_tmp(self.out_dir, log=self.log)
        dist_utils.barrier()

    def _resolve_resume(self, resume: str | None) -> Path | None:
        if resume is None:
            return None
        if resume == "auto":
            return latest_checkpoint(self.out_dir)  # None: nothing to resume, start fresh
        return Path(resume)

    def _compile(self) -> float:
        """``train.compile`` (the backend's ``compile``): returns the seconds it took."""
        return self.backend.compile(self.model, self.optimizer, (self.micro_batch, self.seq_len), self.ramp, self.step,
                                    self.log)

    def _stage_boundaries(self) -> list[dict]:
        """For each growth event, the condition that fires it: {"at_step"|"at_tokens"|"at_flops": value}."""
        g = self.cfg.growth
        if not self.stages:
            return []
        if g.schedule == "manual":
            return [{k: getattr(st, k)} for st in self.stages for k in ("at_step", "at_tokens", "at_flops")
                    if getattr(st, k) >= 0]
        # Each stage's own tokens per step and FLOPs per token (its micro-batch, sequence length and shape).
        tps = [lay.tokens_per_step(self.world, self._accum(lay.micro_batch)) for lay in self.layouts]
        fpt = [lay.flops_per_token() for lay in self.layouts]
        starts = stage_start_steps(g.schedule, self.t.max_steps, tps, fpt, g.exp_ratio)
        return [{"at_step": s} for s in starts]

    def _set_stage_batch(self) -> None:
        """Batch shape and context of the current stage (later stages may change micro-batch, seq_len and
        max_seq_len). The loader keeps its global position: the next batch starts at the token after the last
        one consumed, whatever the new shape."""
        lay = self.layouts[self.stage_index]
        self.t.grad_accum = self._accum(lay.micro_batch)
        if (lay.micro_batch, lay.seq_len) != (self.micro_batch, self.seq_len):
            self.micro_batch, self.seq_len = lay.micro_batch, lay.seq_len
            self.loader.set_batch_shape(micro_batch=lay.micro_batch, seq_len=lay.seq_len)
        if lay.model.max_seq_len != self.model_config.max_seq_len:
            unwrap(self.model).set_max_seq_len(lay.model.max_seq_len)  # every rank: RoPE tables are not sharded
            self.model_config = dataclasses.replace(self.model_config, max_seq_len=lay.model.max_seq_len)

    def lr_mult(self) -> float:
        """A stage's own peak lr, as a multiple of train.lr (the schedule's shape is kept)."""
        mult = 1.0
        for st in self.stages[: self.stage_index]:
            mult = st.lr / self.t.lr if st.lr else mult
        return mult

    def _check_compatible(self, meta: dict, path: Path) -> None:
        """The run being resumed must have started from the same shape; later shapes come from its history."""
        started = meta["run_config"].get("model")
        if not isinstance(started, dict):
            raise CheckpointError(f"checkpoint {str(path / 'meta.json')!r}: run_config.model should be the table "
                                  f"the run started with, found {type(started).__name__}")
        ours = dataclasses.asdict(self.cfg.model)
        diff = [k for k in ours if ours[k] != started.get(k) and k != "kernels"]  # kernels: not a shape
        if diff:
            pairs = ", ".join(f"model.{k}: checkpoint {started.get(k)!r} vs config {ours[k]!r}" for k in diff)
            raise CheckpointError(f"checkpoint {str(path)!r} is from another model shape ({pairs})")

    # ---- batch size, stages that cannot run, per-stage statistics -------------------------------------------------
    def _accum(self, micro_batch: int) -> int:
        """Micro-steps per optimizer step: derived from train.global_batch (sequences over all ranks) when set."""
        if not self.t.global_batch:
            return self.t.grad_accum
        return self.t.global_batch // (self.world * micro_batch)

    def _check_global_batch(self) -> None:
        """train.global_batch must split into world x micro_batch x grad_accum for every stage's micro-batch."""
        if not self.t.global_batch:
            return
        for mb in sorted({self.t.micro_batch} | {st.micro_batch for st in self.cfg.stage if st.micro_batch}):
            if self.t.global_batch % (self.world * mb):
                raise ConfigError(f"train.global_batch={self.t.global_batch} cannot be met with world size "
                                  f"{self.world} x micro_batch {mb}: it must be a multiple of their product "
                                  f"{self.world * mb} (sequences per optimizer step = world x micro_batch x "
                                  f"grad_accum)")
        self.t.grad_accum = self._accum(self.t.micro_batch)

    def _warn_dropped_stages(self) -> None:
        """Stages that start at or after train.max_steps never run (say, after --set train.max_steps=40 on the
        demo): name them. at_tokens / at_flops marks are placed with each stage's own tokens per step and FLOPs
        per token; triggered stages cannot be foreseen."""
        if self.cfg.growth.schedule != "manual" and not self.stage_starts:
            return
        step, tokens, flops, dropped = self.step, self.meter.total_tokens, self.meter.total_flops, []
        for i in range(self.stage_index, len(self.stages)):
            st, lay, when = self.stages[i], self.layouts[i], self.stage_starts[i] if i < len(self.stage_starts) else {}
            tps = lay.tokens_per_step(self.world, self._accum(lay.micro_batch))
            fps = tps * lay.flops_per_token()
            if st.trigger != "schedule" or not when:
                break
            (kind, mark), = when.items()
            at = {"at_step": lambda: mark, "at_tokens": lambda: step + math.ceil((mark - tokens) / tps),
                  "at_flops": lambda: step + math.ceil((mark - flops) / fps)}[kind]()
            at = max(at, step)
            if at >= self.t.max_steps:
                dropped.append(f"stage {i + 1} ({kind} {mark:g})" if kind != "at_step" else f"stage {i + 1} "
                               f"(at_step {mark})")
                continue
            tokens, flops, step = tokens + (at - step) * tps, flops + (at - step) * fps, at
        if dropped:
            self.log(f"warning: train.max_steps={self.t.max_steps} ends before {', '.join(dropped)} would start: "
                     f"{'it' if len(dropped) == 1 else 'they'} will never run (raise train.max_steps or move the "
                     f"stage with --set stage.N.at_step=...)")

    def _new_stage_stats(self, stage: int, start_step: int) -> dict:
        """A row of per-stage statistics, with the shape, world size and peak FLOP/s it runs at (MFU of a stage
        is computed with its own peak, whatever the run's world size later)."""
        return _new_stage_stats(stage, start_step, self.model_config, self.seq_len, self.micro_batch,
                                world=self.world, peak=self.meter.peak)

    def _continue_stage_stats(self) -> None:
        """On resume: a stage continued at another world size, shape or peak gets a row of its own from here."""
        last = self.stage_stats[-1]
        now = self._new_stage_stats(self.stage_index, self.step)
        if any(last.get(k) != now[k] for k in ("world", "peak_flops", "shape")):
            now["resumed"] = True
            self.stage_stats.append(now)

    # ---- the step -------------------------------------------------------------------------------------------
    def tokens_per_step(self) -> int:
        return self.world * self.micro_batch * self.seq_len * self.t.grad_accum

    def current_lr(self, step: int | None = None) -> float:
        step = self.step if step is None else step
        return self.growth_lr.lr(step, lambda s: lr_at(s, self.t)) * self.lr_mult()

    def train_step(self) -> float:
        t0 = time.perf_counter()
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._update_masks()
        self._end_wd_hold()
        # The gradient trigger compares one micro-batch's gradient with the whole step's (two batch sizes).
        want_noise = isinstance(self.trigger, GradientTrigger) and self.t.grad_accum > 1
        # The curvature trigger re-evaluates this step's batches after the update (see CurvatureTrigger).
        probe = (isinstance(self.trigger, CurvatureTrigger) and self.backend.probes and
                 self.trigger.probe_due(self.step))
        batches: list = []
        loss_sum, grad_sq_small = 0.0, None
        for micro in range(self.t.grad_accum):
            x, y = self.loader.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if probe:
                batches.append((x, y))
            # Gradients are reduced over ranks once per step, on the last micro-batch (DDP no_sync, FSDP2
            # set_requires_gradient_sync); the others accumulate locally. The gradient trigger reads the first
            # micro-batch's gradient, which must be the same on every rank, so that one is reduced too.
            with grad_sync(self.model, micro == self.t.grad_accum - 1 or (want_noise and micro == 0)):
                with self.autocast():
                    loss = self.model(x, y) / self.t.grad_accum
                self.backend.backward(loss)  # (DeepSpeed also steps here, at the accumulation boundary)
            loss_sum += loss.item()
            if want_noise and micro == 0:
                grad_sq_small = _grad_sq(self.model) * self.t.grad_accum ** 2
        grad_sq_big = _grad_sq(self.model) if want_noise else None
        decrease = (None, None)
        params = [p for p in self.model.parameters() if p.grad is not None] if probe else []
        before = [p.detach().clone() for p in params] if probe else None
        self.grad_norm = norm = self.backend.grad_norm(self.model)  # global (reduced): every rank decides alike
        if self._finite_step(loss_sum, norm, can_skip=self.backend.can_skip):
            self.backend.step(self.optimizer)
            if probe:  # clipping scaled the gradient by 1 / unclip; the probe wants the true one
                unclip = max(1.0, norm / self.t.grad_clip) if self.t.grad_clip > 0 else 1.0
                decrease = self._probe_decrease(params, before, unclip, batches, loss_sum)
        self.backend.zero_grad(self.optimizer)
        tokens, fpt = self.tokens_per_step(), self.model_config.flops_per_token(self.seq_len)
        self.meter.add(tokens, fpt)
        if probe:
            self.meter.add_flops(tokens * fpt / 3)  # the probe's forward pass (2N of the 6N FLOPs per token)
        self.step += 1
        st = self.stage_stats[-1]
        st["steps"] += 1
        st["tokens"] += tokens
        st["flops"] += tokens * fpt
        st["seconds"] += time.perf_counter() - t0
        if self.trigger is not None:
            self.trigger.observe(Observation(
                self.step, self.meter.total_tokens, self.meter.total_flops, loss_sum, grad_sq_small, grad_sq_big,
                self.micro_batch * self.seq_len, tokens, *decrease))
        return loss_sum

    @torch.no_grad()
    def _probe_decrease(self, params, before, unclip: float, batches, loss_before: float) -> tuple[float, float]:
        """(actual, predicted) loss decrease of the step just taken on its own batches: the loss re-evaluated at
        the new weights, and -g . delta with g the unclipped gradient (averaged over ranks by DDP already)."""
        predicted = -unclip * sum(float((p.grad * (p.detach() - b)).sum()) for p, b in zip(params, before))
        with self.autocast():
            after = sum(self.model(x, y).item() for x, y in batches) / len(batches)
        actual = dist_utils.all_reduce_mean(loss_before - after, self.device)
        return actual, predicted

    def _finite_step(self, loss: float, grad_norm: float, can_skip: bool = True) -> bool:
        """May this step's update be applied? A non-finite loss or gradient norm skips it (up to
        train.skip_nonfinite_steps in a row, as torchtitan does), then stops the run naming the step, the likely
        cause and the checkpoint to go back to. A finite update that makes the weights non-finite is caught by
        the finite check every checkpoint save does (checkpoint.check_finite), or at the next step's loss."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self._nonfinite_streak = 0
            return True
        self._nonfinite_streak += 1
        step = self.step + 1
        if can_skip and self._nonfinite_streak <= self.t.skip_nonfinite_steps:
            self.log(f"warning: step {step}: loss {loss}, gradient norm {grad_norm}: update skipped "
                     f"({self._nonfinite_streak} of train.skip_nonfinite_steps={self.t.skip_nonfinite_steps} "
                     f"in a row)")
            return False
        raise NonFiniteError(self._nonfinite_message(f"loss or gradient (loss {loss}, gradient norm {grad_norm})",
                                                     step))

    @property
    def zero(self) -> ZeroBackend | None:
        """The DeepSpeed backend, when the run uses it (its engine is the model)."""
        return self.backend if isinstance(self.backend, ZeroBackend) else None

    def _nonfinite_message(self, what: str, step: int) -> str:
        last = latest_checkpoint(self.out_dir)
        resume = f"last good checkpoint {last} (`--resume {last}`)" if last else "no checkpoint written yet"
        return (f"step {step}: non-finite {what}; likely cause: a learning rate too high for this model "
                f"(train.lr={self.t.lr}) or corrupt data; {resume}; lower train.lr or set "
                f"train.skip_nonfinite_steps to skip isolated bad steps")

    def _watch_loss(self, loss: float) -> None:
        """Warn about a finite but exploding loss: far above a uniform guess (ln vocab_size), or a spike over the
        recent average. At most one warning per 100 steps."""
        uniform = math.log(self.model_config.vocab_size)
        avg = self._loss_avg
        self._loss_avg = loss if avg is None else 0.9 * avg + 0.1 * loss
        if self.step < self._quiet_until:
            return
        if loss > 2 * uniform:
            why = f"more than twice ln(vocab_size) = {uniform:.2f}, what a uniform guess scores"
        elif avg is not None and self.step > 20 and loss > 1.5 * avg:
            why = f"a spike over the recent average {avg:.4f}"
        else:
            return
        self.log(f"warning: step {self.step}: loss {loss:.4g} is {why}: training may be diverging "
                 f"(train.lr={self.t.lr})")
        self._quiet_until = self.step + 100

    # ---- growth ---------------------------------------------------------------------------------------------
    def _end_wd_hold(self) -> None:
        """growth.new_wd_steps after the last growth, the new elements decay again. Derived from the growth
        history, so a resumed run ends the hold at the same step (the held scales are in the checkpoint)."""
        n = self.cfg.growth.new_wd_steps
        if n <= 0:
            return
        last = next((h["step"] for h in reversed(self.history) if h["event"] == "grow"), None)
        if last is not None and self.step == last + n:
            self.backend.end_wd_hold(self.optimizer)
    def _update_masks(self) -> None:
        """Set the fade-in masks for this step; once the ramp is over they are removed (no steady-state cost)."""
        if self.ramp is not None and self.ramp.apply(unwrap(self.model), self.step):
            self.ramp = None

    def _make_trigger(self):
        """The trigger that decides when the next stage starts; its stage-length bounds count from now."""
        if self.stage_index >= len(self.stages):
            return None
        st = self.stages[self.stage_index]
        opts = dict(st.trigger_options)
        if st.trigger == "schedule":
            opts.update(self.stage_starts[self.stage_index])
        elif st.trigger == "scaling-law":
            nxt = dataclasses.replace(self.model_config, **st.shape)
            opts.setdefault("next_params", nxt.num_params(include_embedding=False))
        return make_trigger(st.trigger, start_step=self.step, **opts)

    def growth_due(self) -> bool:
        """Does the trigger of the next stage fire now? (Checked before every step.) A growth that falls inside
        a fade-in waits for it to finish: operators are defined on unmasked models."""
        self._update_masks()
        if self.trigger is None or self.ramp is not None:
            return False
        return self.trigger.should_grow(self.step, self.meter.total_tokens, self.meter.total_flops)

    def _apply_plan(self, plan, st: Stage, fit: bool = True):
        """Swap in the grown model and optimizer (the old ones are left untouched), start masks and lr policy.
        Returns the plan applied (a learned plan is fitted first, unless ``fit`` is False: a structure-only rebuild
        whose values are about to be overwritten, as LAG across groups does)."""
        if fit:
            plan = self._fit_learned(plan)
        self.t.grad_accum = self._accum(st.micro_batch or self.micro_batch)  # (a new ZeRO engine is built with it)
        self.model, self.optimizer = self.backend.grow(self.model, self.optimizer, plan, st.optimizer,
                                                       st.micro_batch or self.micro_batch)
        self.model_config = plan.new_cfg.resolved()
        self.ramp = plan.mask_ramp(self.step)
        if self.ramp is not None:
            self.ramp.apply(unwrap(self.model), self.step)
        if st.lr_policy != "continue":
            self.growth_lr.on_growth(self.step)
        self._enter_next_stage()
        if self.t.compile:  # the grown model's blocks, at the new stage's shapes: part of the growth event's time
            self.compile_seconds = self._compile()
        return plan

    def _fit_learned(self, plan):
        """Fit a learned (LiGO-style) plan's maps on the grown model's LM loss before it is applied. Batches come
        from the training loader (this rank's share, one micro-batch per map step): they count as tokens seen
        and are not trained on again. The old weights are gathered in full on every rank (the maps are fitted
        identically everywhere, their gradients averaged over ranks); the FLOPs spent, on every rank, count in
        the run's total. Other plans pass through."""
        if not isinstance(plan, LearnedPlan) or plan.fitted:
            return plan
        reshard(self.model)
        old = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
               for n, p in unwrap(self.model).named_parameters()}

        def next_batch():
            x, y = self.loader.next_batch()
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

        def average(flat):
            torch.distributed.all_reduce(flat, group=self.dp_group)
            flat.div_(self.world)

        plan = fit(plan, old, next_batch, reduce_grads=average if self.world > 1 else None, autocast=self.autocast,
                   log=self.log)
        self.meter.add(plan.fit_record["tokens"] * self.world, 0.0)
        self.meter.add_flops(plan.fit_record["flops"] * self.world)
        return plan

    def _enter_stage_without_growth(self, st: Stage) -> None:
        """A stage that changes no parameter (only seq_len, micro_batch or max_seq_len): no plan, no copy of the
        weights, no optimizer change. The lr is re-warmed only if the stage asks for it (lr_policy): the default
        growth.lr_policy is about fresh weights and moments, which this stage does not make."""
        if st.rewarm_without_growth:
            self.growth_lr.on_growth(self.step)
        self._enter_next_stage()

    def _enter_next_stage(self) -> None:
        """The stage counter, its batch shape and context, and a fresh row of per-stage statistics."""
        self.stage_index += 1
        self._set_stage_batch()
        self.stage_stats.append(self._new_stage_stats(self.stage_index, self.step))

    def grow_next_stage(self) -> dict:
        """Apply the next stage's growth plan in place (weights, optimizer state, ages, masks), log the event and
        write a checkpoint. With ``lag`` set, the operator is chosen by LAG first."""
        i = self.stage_index + 1
        st, g = self.stages[i - 1], self.cfg.growth
        old_cfg, old_seq, old_mb = self.model_config, self.seq_len, self.micro_batch
        # The plan maps parameters at the old context length; the stage's max_seq_len (RoPE tables only) and its
        # batch shape are applied by _set_stage_batch once the stage is entered.
        new_cfg = dataclasses.replace(old_cfg, **{**st.shape, "max_seq_len": old_cfg.max_seq_len}).resolved()
        before = self.evaluate() if g.eval_at_growth else None
        t0 = time.perf_counter()
        lag_record, plan = None, None
        if not changes_parameters(old_cfg, new_cfg):
            self._enter_stage_without_growth(st)
        elif st.lag:
            plan, lag_record = self._lag_select(st, old_cfg, new_cfg, seed=st.seed)
        else:
            plan = make_plan(st.op, old_cfg, new_cfg, seed=st.seed, **st.options)
            plan = self._apply_plan(plan, st)
        seconds = time.perf_counter() - t0
        # Same weights and the same (fixed-length) validation batches: the loss after a plan-free stage is the same.
        after = (self.evaluate() if plan is not None else before) if g.eval_at_growth else None
        event = {"event": "grow", "stage": i, "step": self.step, "tokens": self.meter.total_tokens,
                 "flops": self.meter.total_flops, "plan": plan.to_dict() if plan is not None else None,
                 "optimizer": st.optimizer if plan is not None else None,
                 "params_before": old_cfg.num_params(), "params_after": self.model_config.num_params(),
                 "seq_len_before": old_seq, "seq_len_after": self.seq_len, "micro_batch_before": old_mb,
                 "micro_batch_after": self.micro_batch, "max_seq_len": self.model_config.max_seq_len,
                 "val_loss_before": before, "val_loss_after": after, "seconds": seconds,
                 "compile_seconds": self.compile_seconds if self.t.compile and plan is not None else 0.0,
                 "trigger": self.trigger.state_dict() if self.trigger else None}
        if lag_record:
            event["lag"] = lag_record
        self.history.append(event)
        self.trackers.log({"kind": "grow", "step": self.step, "tokens": event["tokens"], "flops": event["flops"],
                           "stage": i, "params_before": event["params_before"], "params_after": event["params_after"],
                           "val_loss_before": before, "val_loss_after": after,
                           "op": plan.op if plan is not None else None, "seconds": seconds})
        self.trigger = self._make_trigger()
        self._fit_steps_to_flops()
        what = plan.describe().splitlines()[0] if plan is not None else "no parameter change"
        if (old_seq, old_mb) != (self.seq_len, self.micro_batch):
            what += f" | seq_len {old_seq} -> {self.seq_len}, micro_batch {old_mb} -> {self.micro_batch}"
        self.log(f"grow -> stage {i} at step {self.step}: {what} | "
                 f"{event['params_before']:,} -> {event['params_after']:,} params | val loss "
                 f"{_fmt(before)} -> {_fmt(after)} | {1e3 * seconds:.0f} ms"
                 + (f" (recompile {1e3 * event['compile_seconds']:.0f} ms)" if event["compile_seconds"] else ""))
        self.save()  # every growth event is a checkpoint: the grown shape is recoverable from here on
        self.meter.reset_window()
        return event

    # ---- LAG: fork candidates, train each k steps on the same batches, continue from the winner -----------------
    def _soft_state(self) -> dict:
        """A fork: the run state, and the model and optimizer it trains (left untouched by a grown candidate)."""
        return {"state": self.run_state(), "model": self.model, "optimizer": self.optimizer}

    def _restore_soft_state(self, s: dict) -> None:
        self.model, self.optimizer = s["model"], s["optimizer"]
        self.load_run_state(s["state"])

    def _lag_select(self, st: Stage, old_cfg: ModelConfig, new_cfg: ModelConfig, seed: int):
        if st.lag.groups > 1:  # candidates train at the same time, one per process group
            return select_across_groups(self, st, old_cfg, new_cfg, seed)
        k, every, strategy = st.lag.steps, st.lag.eval_every, st.lag.strategy
        n_eval = st.lag.eval_batches or len(self.val)
        candidates = st.lag.candidate_list(old_cfg, new_cfg)
        base = self._soft_state()
        plans: dict[int, object] = {}
        ses: list[list[float]] = [[] for _ in candidates]
        last_batches: dict[int, list[float]] = {}  # each candidate's per-batch losses at its last evaluation
        # Each candidate's FLOPs and steps: its meter and step counter advance from the same start.
        spent, steps = [0.0] * len(candidates), [0] * len(candidates)

        def account(idx):
            spent[idx] = self.meter.total_flops - base["state"].meter["total_flops"]
            steps[idx] = self.step - base["state"].step

        def grow_candidate(idx, cand):
            self._restore_soft_state(base)
            plans[idx] = self._apply_plan(make_plan(cand.op, old_cfg, new_cfg, seed=seed, **cand.options), st)

        def train(idx, n, eval_every):
            losses = []
            for j in range(n):
                self._update_masks()
                self.train_step()
                if (j + 1) % eval_every == 0 or j == n - 1:
                    losses.append(self.evaluate(n_eval))
                    ses[idx].append(self.last_eval_se())
                    last_batches[idx] = list(self._last_eval)
            return losses

        def train_candidate(idx, cand):  # LAG@k: k steps each
            grow_candidate(idx, cand)
            losses = train(idx, k, every)
            account(idx)
            self.log(f"  LAG candidate {idx + 1}/{len(candidates)} {cand.name()}: val loss after {k} steps "
                     f"{losses[-1]:.4f} (+- {ses[idx][-1]:.4f})")
            return losses, self._soft_state()

        def train_more(idx, cand, n, state):  # successive halving: n more steps from where it stopped
            if state is None:
                grow_candidate(idx, cand)
            else:
                self._restore_soft_state(state)
            loss = train(idx, n, n)[-1]
            account(idx)
            self.log(f"  LAG candidate {idx + 1}/{len(candidates)} {cand.name()}: val loss after "
                     f"{self.step - base['state'].step} steps {loss:.4f} (+- {ses[idx][-1]:.4f})")
            return loss, self._soft_state()

        rounds = None
        if strategy == "halving":
            result, rounds = select_halving(candidates, k, train_more)
        else:
            result = select(candidates, train_candidate)
        self._restore_soft_state(result.states)
        # The losers' training is compute the run spent: count it, so compute-normalized comparisons stay honest.
        self.meter.add_flops(sum(f for j, f in enumerate(spent) if j != result.winner))
        record = result.to_dict(candidates)
        record.update(steps=k, eval_every=every, flops_per_candidate=spent, steps_per_candidate=steps,
                      strategy=strategy, eval_batches=n_eval, eval_se=ses)
        if rounds is not None:
            record["rounds"] = rounds
        record["paired_se"] = _paired_se(result, steps, last_batches)
        spread = _spread([c[-1] for c in result.curves if c])
        self.log(f"  LAG ({strategy}) picked {candidates[result.winner].name()} "
                 f"(val loss {result.curves[result.winner][-1]:.4f} after {steps[result.winner]} steps; "
                 f"evaluation s.e. {ses[result.winner][-1]:.4f}, of its difference from the runner-up "
                 f"{record['paired_se']:.4f}; candidates' spread {spread:.4f})")
        return plans[result.winner], record

    def last_eval_se(self) -> float:
        """Standard error of the last evaluation's mean over its batches (this rank's batches): about how far
        apart two candidates' losses must be to be told apart."""
        xs = getattr(self, "_last_eval", [])
        return _spread(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")

    def evaluate(self, n_batches: int | None = None) -> float:
        """Mean loss over the fixed validation batches (the first ``n_batches`` of them, if given)."""
        return dist_utils.all_reduce_mean(self._local_val_loss(n_batches), self.device)

    def evaluate_at_stage_len(self) -> float | None:
        """Mean validation loss at the current stage's own sequence length, or None when that is the run's
        validation length. A short-sequence stage is scored at the final length by ``evaluate`` (comparable across
        stages and runs); this is what it does at the length it trains on. Same number of batches and sequences,
        from the start of the val split."""
        if self.seq_len == eval_seq_len(self.cfg):
            return None
        if self.seq_len not in self._val_at_len:
            self._val_at_len[self.seq_len] = val_batches(
                self.cfg.data.dir, self.seq_len, self.t.eval_batch_size, self.t.eval_batches, rank=self.rank,
                world_size=self.world, vocab_size=self.model_config.vocab_size)
        return dist_utils.all_reduce_mean(self._local_val_loss(batches=self._val_at_len[self.seq_len]), self.device)

    @torch.no_grad()
    def _local_val_loss(self, n_batches: int | None = None, batches: list | None = None) -> float:
        """This rank's share of ``evaluate`` (LAG across groups reduces it over one group only)."""
        self.model.eval()
        if batches is None:
            batches = self.val[:n_batches] if n_batches else self.val
        total, self._last_eval = 0.0, []
        for x, y in batches:
            with self.autocast():
                loss = self.model(x.to(self.device), y.to(self.device)).item()
            total += loss
            self._last_eval.append(loss)
        self.model.train()
        reshard(self.model)  # FSDP2 keeps the root unsharded after a no_grad forward; checkpoints need it sharded
        return total / len(batches)

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict:
        return {"run_config": self.cfg.to_dict(), **self.run_state(rng=False).to_meta(),
                "optimizer_ages": bool(getattr(self.optimizer, "track_ages", False))}

    def run_state(self, rng: bool = True) -> RunState:
        """A copy of what the run carries besides model and optimizer (``rng``: with torch's RNG state)."""
        return RunState(
            step=self.step, loader=self.loader.state_dict(), meter=self.meter.state_dict(),
            stage_index=self.stage_index, stage_stats=self.stage_stats, model_config=self.model_config,
            growth_lr=self.growth_lr.state_dict(), ramp=self.ramp.to_dict() if self.ramp is not None else None,
            trigger=self.trigger.state_dict() if self.trigger is not None else None, history=self.history,
            seq_len=self.seq_len, micro_batch=self.micro_batch, rng=torch.get_rng_state() if rng else None).copy()

    def load_run_state(self, s: RunState, resumed: bool = False) -> None:
        """Continue from ``s`` (a fork's, the LAG winner's, or a checkpoint's on resume). The model and optimizer
        are not part of it; the stage's batch shape follows from its index."""
        s = s.copy()
        self.step, self.stage_index, self.model_config = s.step, s.stage_index, s.model_config
        if s.loader is not None:
            self.loader.load_state_dict(s.loader)
        self.meter.load_state_dict(s.meter)
        self.history = s.history
        if s.growth_lr is not None:
            self.growth_lr = GrowthLR.from_state_dict(s.growth_lr)
        if s.rng is not None:
            torch.set_rng_state(s.rng)
        self.ramp = MaskRamp.from_dict(s.ramp) if s.ramp else None
        if s.stage_stats is not None:
            self.stage_stats = s.stage_stats
        if resumed:
            self._continue_stage_stats()
        self.trigger = trigger_from_state(s.trigger) if s.trigger else self._make_trigger()
        self._set_stage_batch()

    def save(self) -> Path:
        try:
            path = self.backend.save(self.out_dir, self.step, self.model, self.optimizer, self.checkpoint_meta(),
                                     keep_last=self.t.keep_last)
        except NonFiniteError as e:  # nothing was written or rotated
            raise NonFiniteError(self._nonfinite_message(f"model or optimizer state, not saved ({e})",
                                                         self.step)) from None
        self.log(f"saved {path}")
        return path

    # ---- the loop -------------------------------------------------------------------------------------------
    def advance(self, on_grow: Callable[[dict], bool | None] | None = None) -> float | None:
        """One turn of the loop that ``run``, ``nanogrow lag``, the benchmarks and the tests all drive: every
        growth event that is due (a LAG event trains its candidates' steps inside it), then one optimizer step.
        Returns the step's loss, or None when no step was taken: growth reached train.max_steps, or ``on_grow``
        (called with each growth event's record) returned True to stop right after that event."""
        while self.growth_due():
            event = self.grow_next_stage()
            if on_grow is not None and on_grow(event):
                return None
        if self.step >= self.t.max_steps:
            return None
        return self.train_step()

    def run(self) -> dict:
        t = self.t
        self.log(f"model: {self.model_config.num_params():,} params ({self.model_config.num_params(False):,} "
                 f"non-embedding), {self.model_config.flops_per_token(self.seq_len) / 1e6:.2f} MFLOPs/token; "
                 f"{self.world} process(es) on {self.device}; {self.tokens_per_step():,} tokens/step")
        start, start_step = time.perf_counter(), self.step
        self.meter.reset_window()
        last_loss, val_loss = float("nan"), None
        while self.step < t.max_steps:
            loss = self.advance()  # stops (NonFiniteError) on non-finite steps past the allowed skips
            if loss is None:  # LAG's candidate steps count as training steps and may reach the end
                break
            last_loss = loss
            self._watch_loss(last_loss)
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                last_loss = dist_utils.all_reduce_mean(last_loss, self.device)  # the global batch's, not rank 0's
                w = self.meter.window()
                elapsed = time.perf_counter() - start
                eta = elapsed / max(1, self.step - start_step) * (t.max_steps - self.step)
                self.log(f"step {self.step:>6}/{t.max_steps} | loss {last_loss:.4f} | "
                         f"lr {self.current_lr(self.step - 1):.2e} | {w['tokens_per_s']:,.0f} tok/s | "
                         f"mfu {100 * w['mfu']:.2f}% | eta {_hms(eta)}")
                self.trackers.log({"kind": "train", "step": self.step, "tokens": self.meter.total_tokens,
                                   "flops": self.meter.total_flops, "loss": last_loss,
                                   "lr": self.current_lr(self.step - 1), "grad_norm": self.grad_norm,
                                   "tokens_per_s": w["tokens_per_s"], "mfu": w["mfu"], "stage": self.stage_index,
                                   "params": self.model_config.num_params(), "seconds": round(elapsed, 3)})
            if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.max_steps:
                val_loss, own = self.evaluate(), self.evaluate_at_stage_len()
                record = {"event": "eval", "step": self.step, "tokens": self.meter.total_tokens,
                          "flops": self.meter.total_flops, "val_loss": val_loss,
                          "seconds": round(time.perf_counter() - start, 3)}
                self.stage_stats[-1]["val_loss"] = val_loss
                if own is not None:  # a stage shorter than the validation length: its own-length loss as well
                    record["val_loss_stage_len"] = self.stage_stats[-1]["val_loss_stage_len"] = own
                self.history.append(record)
                at_len = f" ({own:.4f} at its own seq_len {self.seq_len})" if own is not None else ""
                self.log(f"step {self.step:>6} | val loss {val_loss:.4f}{at_len} | {self.meter.total_flops:.3e} FLOPs")
                self.trackers.log({"kind": "eval", "step": self.step, "tokens": self.meter.total_tokens,
                                   "flops": self.meter.total_flops, "val_loss": val_loss, "stage": self.stage_index,
                                   **({"val_loss_stage_len": own} if own is not None else {})})
                self.meter.reset_window()  # evaluation time is not training throughput
            if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < t.max_steps:
                self.save()
        if val_loss is None or self.history[-1].get("event") != "eval":  # the loop ended inside a growth event
            val_loss = self.evaluate()
            self.history.append({"event": "eval", "step": self.step, "tokens": self.meter.total_tokens,
                                 "flops": self.meter.total_flops, "val_loss": val_loss})
            self.trackers.log({"kind": "eval", "step": self.step, "tokens": self.meter.total_tokens,
                               "flops": self.meter.total_flops, "val_loss": val_loss, "stage": self.stage_index})
        self.save()
        summary = {"steps": self.step, "train_loss": last_loss, "val_loss": val_loss,
                   "tokens": self.meter.total_tokens, "flops": self.meter.total_flops,
                   "seconds": time.perf_counter() - start, "stages": self.stage_stats,
                   "growth_events": [h for h in self.history if h["event"] == "grow"]}
        if len(self.stage_stats) > 1:
            self.log(self.stage_table())
        if self.rank == 0:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.trackers.close()
        self._plot()
        self.log(f"done: {summary['steps']} steps, val loss {val_loss:.4f}, {summary['tokens']:,} tokens, "
                 f"{summary['flops']:.3e} FLOPs, {summary['seconds']:.1f} s")
        return summary


    def _plot(self) -> None:
        """out_dir/loss.png from metrics.jsonl (rank 0; train.plot)."""
        if self.rank != 0 or not self.t.plot:
            return
        from .plot import have_matplotlib, plot_runs
        if not have_matplotlib():
            self.log("note: matplotlib is not installed, so no loss.png (pip install matplotlib; "
                     "`nanogrow plot RUN_DIR` draws it later)")
            return
        self.log(f"wrote {plot_runs([self.out_dir], self.out_dir / 'loss.png')}")

    def stage_table(self) -> str:
        rows = ["stage | from step | shape (L x d, ff, heads) | seq x mb | world | params | steps | tokens | FLOPs | "
                "tok/s | MFU | val loss"]
        notes = set()
        for st in self.stage_stats:
            peak = st.get("peak_flops") or self.meter.peak  # the stage's own peak (older checkpoints: the run's)
            tps = st["tokens"] / st["seconds"] if st["seconds"] else 0.0
            mfu = st["flops"] / st["seconds"] / peak if st["seconds"] and peak else 0.0
            batch = f"{st.get('seq_len', '?')} x {st.get('micro_batch', '?')}"
            mark = "g" if st.get("offline") else ("r" if st.get("resumed") else "")
            notes.add(mark)
            rows.append(f"{str(st['stage']) + mark:>5} | {st['start_step']:>9} | {st['shape']:<24} | {batch:>8} | "
                        f"{st.get('world', '?'):>5} | "
                        f"{st['params']:>10,} | {st['steps']:>5} | {st['tokens']:>10,} | {st['flops']:.2e} | "
                        f"{tps:>7,.0f} | "
                        f"{100 * mfu:4.1f}% | {_fmt(st.get('val_loss'))}")
        if "g" in notes:
            rows.append("g: the same stage after an offline `nanogrow grow` (new shape)")
        if "r" in notes:
            rows.append("r: the same stage resumed at another world size or peak")
        return "\n".join(rows)


def _check_device(cfg: RunConfig) -> None:
    """A device or kernel backend this machine cannot give is a config error, before anything is built."""
    t, kernels = cfg.train, cfg.model.kernels
    if t.device.startswith("cuda") and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build that sees no GPU"
        raise ConfigError(f"train.device={t.device!r} but torch {torch.__version__} is {build}; use train.device="
                          f"'auto' or 'cpu' (or install a CUDA torch on a GPU machine)")
    if kernels == "triton":
        from . import kernels as K
        try:
            K.resolve(kernels, dist_utils.pick_device(t.device) if t.device != "auto" else None)
        except RuntimeError as e:
            raise ConfigError(str(e)) from None


def _grad_sq(model: torch.nn.Module) -> float:
    return sum(float(p.grad.detach().float().pow(2).sum()) for p in model.parameters() if p.grad is not None)


def _new_stage_stats(stage: int, start_step: int, c: ModelConfig, seq_len: int | None = None,
                     micro_batch: int | None = None, world: int | None = None, peak: float | None = None) -> dict:
    return {"stage": stage, "start_step": start_step, "params": c.num_params(), "seq_len": seq_len,
            "micro_batch": micro_batch, "world": world, "peak_flops": peak,
            "shape": f"{c.n_layer} x {c.d_model}, {c.d_ff}, {c.n_head}/{c.n_kv_head}",
            "steps": 0, "tokens": 0, "flops": 0.0, "seconds": 0.0, "val_loss": None}


def _paired_se(result, steps: list[int], last_batches: dict[int, list[float]]) -> float:
    """Standard error of the winner's loss minus the runner-up's, over the validation batches both were scored on
    (this rank's): every candidate sees the same batches, so their difference is far less noisy than either
    loss. The runner-up: the lowest last loss among the candidates trained as long as the winner (under
    successive halving, the last round's other finalists). NaN if there is none."""
    w = result.winner
    rivals = [i for i, c in enumerate(result.curves) if i != w and c and steps[i] == steps[w] and i in last_batches]
    if not rivals or w not in last_batches:
        return float("nan")
    r = min(rivals, key=lambda i: result.curves[i][-1])
    diffs = [a - b for a, b in zip(last_batches[w], last_batches[r])]
    return _spread(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")


def _spread(xs: list[float]) -> float:
    """Sample standard deviation (nan for fewer than two values)."""
    if len(xs) < 2:
        return float("nan")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
