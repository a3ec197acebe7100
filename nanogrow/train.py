"""The training loop: data -> step -> metrics -> evaluation -> checkpoints, for a model whose shape may change.

Read top to bottom: ``Trainer.__init__`` validates everything that can be wrong (config, data, checkpoint) before
any compute, ``run`` is the loop, ``advance`` one turn of it, ``train_step`` one optimizer step with gradient
accumulation. What the Trainer composes: a backend (``backend.py``: how the model is built, stepped, grown and
saved), a growth controller (``growth.py``: when the next stage starts and what entering it does, LAG included)
and the run state (``run_state.py``: what a checkpoint, a resume and a LAG fork carry).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch

from . import dist_utils, run_lock
from .backend import ZeroBackend, make_backend
from .checkpoint import (CheckpointError, NonFiniteError, check_resume, checkpoint_dirs, latest_checkpoint, read_meta,
                         remove_checkpoints, remove_stray_tmp)
from .config import (ConfigError, RunConfig, TrainConfig, check_global_batch, eval_seq_len, fit_warmup,
                     from_accelerate, grad_accum, parallel_mode, validate)
from .data import PrefetchLoader, TokenLoader, val_batches
from .grow import GrowthLR, MaskRamp
from .grow import make_optimizer  # noqa: F401  (re-exported: nanogrow.train.make_optimizer)
from .growth import GrowthController
from .lag_parallel import check_world
from .logs import RunLog
from .metrics import StageStats, ThroughputMeter, device_peak_flops, forward_flops
from .model import ModelConfig, build_model
from .offline import grow_checkpoint  # noqa: F401  (re-exported: nanogrow.train.grow_checkpoint)
from .parallel import grad_sync, reshard
from .plot import have_matplotlib, plot_runs
from .run_state import BatchLayout, RunState
from .tracking import Trackers
from .triggers import Observation


def lr_at(step: int, t: TrainConfig, max_steps: int | None = None) -> float:
    """Learning rate at optimizer step ``step`` (0-based) for the schedule in TrainConfig ``t``, over a run of
    ``max_steps`` steps (default train.max_steps; the run passes its own, which train.max_flops may re-plan)."""
    peak, floor = t.lr, t.lr * t.min_lr_ratio
    max_steps = t.max_steps if max_steps is None else max_steps
    if t.schedule == "constant":
        return peak * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else peak
    if step < t.warmup_steps:
        return peak * (step + 1) / t.warmup_steps
    if t.schedule == "cosine":
        progress = min(1.0, (step - t.warmup_steps) / max(1, max_steps - t.warmup_steps))
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
    # wsd: warm-up, stable at peak, then linear decay over the last decay_frac of the run
    decay_start = int(max_steps * (1.0 - t.decay_frac))
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return peak + (floor - peak) * progress


class Trainer:
    def __init__(self, cfg: RunConfig, resume: str | None = None, log: Callable[[str], None] | None = None,
                 overwrite: bool = False) -> None:
        """``log``: a callable for the console lines (default: the "nanogrow.train" logger, rank 0); every line
        also goes to ``out_dir/train.log`` on rank 0."""
        # The run's own copy of the config, frozen below once resolved: nothing the run does reaches the caller's
        # object, and the caller may go on editing its own (a test starts a second run from it).
        cfg = cfg.editable_copy()
        launcher_note = from_accelerate(cfg.train)  # accelerate launch --use_deepspeed: the ZeRO stage it names
        validate(cfg)
        self.cfg, self.t = cfg, cfg.train
        _check_device(cfg)
        self.device = dist_utils.pick_device(self.t.device)
        dist_utils.init_from_env(self.device)
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.dp_group = None  # the data-parallel process group (None: the world; LAG groups narrow it)
        self.groups = 1  # LAG across process groups: how many groups read the world's batch (group_view sets it)
        self.lag_meshes: dict = {}  # LAG across groups: one device mesh per group count (lag_parallel)
        check_world(cfg.stage, self.world)  # LAG across process groups: G must divide the world
        self.out_dir = Path(self.t.out_dir)
        console = None if log is None else (log if self.rank == 0 else (lambda *a, **k: None))
        self.log = RunLog(self.out_dir, console=console, rank=self.rank)
        check_global_batch(cfg, self.world)
        warmup_note = fit_warmup(self.t)
        cfg.freeze()  # from here on the run changes its RunState and batch layout, never its config

        # Everything that can be wrong is checked here, before a single FLOP is spent. First: no other job is
        # writing this directory (before anything here deletes or rewrites a file in it; a directory that does not
        # exist yet is locked once the checks below pass, so a refused run leaves nothing behind).
        self._lock_out_dir(create=False)
        _claim_out_dir(self.out_dir, resume, overwrite, self.log, self.rank)
        ckpt = None if resume is None else (latest_checkpoint(self.out_dir) if resume == "auto" else Path(resume))
        meta = read_meta(ckpt) if ckpt else None  # (auto with nothing to resume: start fresh)
        if meta:
            _check_compatible(cfg, meta, ckpt)
        for note in (launcher_note, warmup_note):
            if note:
                self.log(note)
        self.model_config: ModelConfig = (ModelConfig(**meta["model_config"]) if meta else cfg.model).resolved()
        self.batch = BatchLayout(micro_batch=self.t.micro_batch, seq_len=cfg.data.seq_len,
                                 grad_accum=grad_accum(self.t, self.world, self.t.micro_batch),
                                 max_steps=self.t.max_steps)
        # The next batch is read (and pinned on CUDA) in a background thread while a step computes.
        self.loader = PrefetchLoader(TokenLoader(cfg.data.dir, "train", self.seq_len, self.micro_batch, rank=self.rank,
                                                 world_size=self.world, seed=cfg.data.seed,
                                                 vocab_size=self.model_config.vocab_size,
                                                 shuffle_block=cfg.data.shuffle_block),
                                     pin=self.device.type == "cuda")
        # Validation at one fixed length for the whole run (see config.eval_seq_len): comparable across stages.
        self.val = val_batches(cfg.data.dir, eval_seq_len(cfg), self.t.eval_batch_size, self.t.eval_batches,
                               rank=self.rank, world_size=self.world, vocab_size=self.model_config.vocab_size)
        self.val_at_len: dict[int, list] = {}  # a short stage's own-length batches (evaluate_at_stage_len)

        # Growth: stage i >= 1 starts with the i-th growth event. Boundaries of a budgeted schedule are fixed now.
        self.growth = GrowthController(self, cfg)
        self.stage_index = 0
        g = cfg.growth
        self.growth_lr = GrowthLR(g.lr_policy, g.rewarm_steps if g.lr_policy != "continue" else 0,
                                  g.rewarm_start, peak_step=self.t.warmup_steps)
        self.ramp: MaskRamp | None = None
        self.meter = ThroughputMeter(device_peak_flops(self.device), self.world)
        self.stage_stats = StageStats(self.world, self.meter.peak)
        self.stage_stats.start(0, 0, self.model_config, self.seq_len, self.micro_batch)

        torch.manual_seed(self.t.seed)
        self.parallel = parallel_mode(self.t, self.world)
        if meta:
            check_resume(meta, ckpt, self.parallel, self.world, self.t.zero_stage)  # before any engine is built
        self.backend = make_backend(self.parallel, self.t, self.device, cfg.growth)
        self.model, self.optimizer = self.backend.start(build_model(self.model_config, self.device, seed=self.t.seed),
                                                        self.micro_batch, self.batch.grad_accum,
                                                        resume=(ckpt, meta) if meta else None)
        self.step = 0
        self.guard = StepGuard(self.t, self.out_dir, self.log)  # non-finite steps and exploding losses
        self.trigger = self.growth.make_trigger()
        self.history: list[dict] = []  # growth events and evaluations, in order
        self.last_eval: list[float] = []  # the last evaluation's per-batch losses (this rank's)
        if meta:
            RunState.from_meta(meta).restore(self, resumed=True)
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
        self.compile_seconds = self.compile() if self.t.compile else 0.0
        self.growth.fit_steps_to_flops()
        self.growth.warn_dropped_stages()
        self._lock_out_dir(create=True)

    def _lock_out_dir(self, create: bool) -> None:
        """Rank 0 holds ``out_dir``'s lock (run_lock) for the run; a stale one taken over is said."""
        note = run_lock.acquire(self.out_dir, create=create) if self.rank == 0 else None
        if note:
            self.log(f"note: {note}")

    @property
    def zero(self) -> ZeroBackend | None:
        """The DeepSpeed backend, when the run uses it (its engine is the model)."""
        return self.backend if isinstance(self.backend, ZeroBackend) else None

    def compile(self) -> float:
        """``train.compile`` (the backend's ``compile``): returns the seconds it took."""
        return self.backend.compile(self.model, self.optimizer, (self.micro_batch, self.seq_len), self.ramp, self.step,
                                    self.log)

    # The batch layout's fields, read often (and by callers of the loop): set through ``self.batch`` only.
    @property
    def micro_batch(self) -> int:
        return self.batch.micro_batch

    @property
    def seq_len(self) -> int:
        return self.batch.seq_len

    @property
    def max_steps(self) -> int:
        """The step the run ends at: train.max_steps, or what train.max_flops buys (re-planned at growth)."""
        return self.batch.max_steps

    # ---- the step -------------------------------------------------------------------------------------------
    def tokens_per_step(self) -> int:
        return self.world * self.micro_batch * self.seq_len * self.batch.grad_accum

    def current_lr(self, step: int | None = None) -> float:
        step = self.step if step is None else step
        return (self.growth_lr.lr(step, lambda s: lr_at(s, self.t, self.max_steps))
                * self.growth.lr_mult(self.stage_index))

    def train_step(self) -> float:
        t0 = time.perf_counter()
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.growth.update_masks()
        self.growth.end_wd_hold()
        # Signals the trigger asks for on this step (triggers.Trigger.signals): one micro-batch's gradient beside
        # the whole step's (two batch sizes), and the step's batches re-evaluated after the update.
        accum = self.batch.grad_accum
        wanted = self.trigger.needs(self.step) if self.trigger is not None else frozenset()
        want_noise = "gradient-noise" in wanted and accum > 1
        probe = "step-probe" in wanted and self.backend.supports("step-probe")
        batches: list = []
        losses, grad_sq_small = [], None
        for micro in range(accum):
            x, y = self.loader.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if probe:
                batches.append((x, y))
            # Gradients are reduced over ranks once per step, on the last micro-batch (DDP no_sync, FSDP2
            # set_requires_gradient_sync); the others accumulate locally. The gradient trigger reads the first
            # micro-batch's gradient, which must be the same on every rank, so that one is reduced too.
            with grad_sync(self.model, micro == accum - 1 or (want_noise and micro == 0)):
                with self.autocast():
                    loss = self.model(x, y) / accum
                self.backend.backward(loss)  # (DeepSpeed also steps here, at the accumulation boundary)
            losses.append(loss.detach())
            if want_noise and micro == 0:
                grad_sq_small = _grad_sq(self.model) * accum ** 2
        # One host sync per step, not one per micro-batch; summed in Python in micro-batch order as before.
        loss_sum = sum(torch.stack(losses).float().tolist())
        grad_sq_big = _grad_sq(self.model) if want_noise else None
        decrease = (None, None)
        params = [p for p in self.model.parameters() if p.grad is not None] if probe else []
        before = [p.detach().clone() for p in params] if probe else None
        self.grad_norm = norm = self.backend.grad_norm(self.model)  # global (reduced): every rank decides alike
        if self.guard.finite(self.step + 1, loss_sum, norm, can_skip=self.backend.supports("skip-nonfinite-step")):
            self.backend.step(self.optimizer)
            if probe:  # clipping scaled the gradient by 1 / unclip; the probe wants the true one
                unclip = max(1.0, norm / self.t.grad_clip) if self.t.grad_clip > 0 else 1.0
                decrease = self._probe_decrease(params, before, unclip, batches, loss_sum)
        self.backend.zero_grad(self.optimizer)
        tokens, fpt = self.tokens_per_step(), self.model_config.flops_per_token(self.seq_len)
        self.meter.add(tokens, fpt)
        if probe:
            self.meter.add_flops(forward_flops(tokens, fpt), "probe")  # the step's batches, forward again
        self.step += 1
        self.stage_stats.add_step(tokens, tokens * fpt, time.perf_counter() - t0)
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

    # ---- evaluation -----------------------------------------------------------------------------------------
    def evaluate(self, n_batches: int | None = None) -> float:
        """Mean loss over the fixed validation batches (the first ``n_batches`` of them, if given). For reporting
        only: its FLOPs are counted as "eval", outside the charged total (nothing is decided on validation data)."""
        batches = self.val[:n_batches] if n_batches else self.val
        self.meter.add_flops(self.forward_cost(batches), "eval")
        return dist_utils.all_reduce_mean(self.local_val_loss(batches), self.device)

    def forward_cost(self, batches: list) -> float:
        """FLOPs of one forward pass of the current model over ``batches`` (this rank's share) on every rank of
        the data-parallel group (``self.world``: a LAG group's size inside one)."""
        return sum(forward_flops(x.numel() * self.world, self.model_config.flops_per_token(x.shape[1]))
                   for x, _ in batches)

    def evaluate_at_stage_len(self) -> float | None:
        """Mean validation loss at the current stage's own sequence length, or None when that is the run's
        validation length. A short-sequence stage is scored at the final length by ``evaluate`` (comparable across
        stages and runs); this is what it does at the length it trains on. Same number of batches and sequences,
        from the start of the val split."""
        if self.seq_len == eval_seq_len(self.cfg):
            return None
        if self.seq_len not in self.val_at_len:
            self.val_at_len[self.seq_len] = val_batches(
                self.cfg.data.dir, self.seq_len, self.t.eval_batch_size, self.t.eval_batches, rank=self.rank,
                world_size=self.world, vocab_size=self.model_config.vocab_size)
        self.meter.add_flops(self.forward_cost(self.val_at_len[self.seq_len]), "eval")
        return dist_utils.all_reduce_mean(self.local_val_loss(self.val_at_len[self.seq_len]), self.device)

    @torch.no_grad()
    def local_val_loss(self, batches: list) -> float:
        """This rank's mean loss over ``batches`` (``evaluate`` averages it over ranks; LAG across groups over
        one group only). Keeps the per-batch losses in ``last_eval``. Counts no FLOPs: the caller charges them
        (``forward_cost``) to what the pass is for."""
        self.model.eval()
        losses = []
        for x, y in batches:
            with self.autocast():
                losses.append(self.model(x.to(self.device), y.to(self.device)).detach())
        self.last_eval = torch.stack(losses).float().tolist()  # one host sync per evaluation, not one per batch
        total = sum(self.last_eval)
        self.model.train()
        reshard(self.model)  # FSDP2 keeps the root unsharded after a no_grad forward; checkpoints need it sharded
        return total / len(batches)

    def evaluate_and_record(self, start: float) -> float:
        """An evaluation of ``run`` (every train.eval_every steps and at the end), recorded in the history, the
        stage's statistics, the log and the trackers; a stage shorter than the validation length is scored at its
        own length as well. ``start``: when ``run`` started. Returns the validation loss."""
        t0 = time.perf_counter()
        val_loss, own = self.evaluate(), self.evaluate_at_stage_len()
        at_len = {"val_loss_stage_len": own} if own is not None else {}
        now = time.perf_counter()
        self.history.append({"event": "eval", "step": self.step, "tokens": self.meter.total_tokens,
                             "flops": self.meter.total_flops, "flops_by": dict(self.meter.flops_by),
                             "val_loss": val_loss, "seconds": round(now - start, 3), "eval_seconds": round(now - t0, 4),
                             **at_len})
        self.stage_stats.rows[-1].update(val_loss=val_loss, **at_len)
        own_note = f" ({own:.4f} at its own seq_len {self.seq_len})" if own is not None else ""
        self.log(f"step {self.step:>6} | val loss {val_loss:.4f}{own_note} | {self.meter.total_flops:.3e} FLOPs")
        self.trackers.log({"kind": "eval", "step": self.step, "tokens": self.meter.total_tokens,
                           "flops": self.meter.total_flops, "flops_by": dict(self.meter.flops_by),
                           "val_loss": val_loss, "stage": self.stage_index, **at_len})
        self.meter.reset_window()  # evaluation time is not training throughput
        return val_loss

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict:
        return {"run_config": self.cfg.to_dict(), **RunState.of(self, rng=False).to_meta(),
                "optimizer_ages": bool(getattr(self.optimizer, "track_ages", False))}

    def save(self) -> Path:
        try:
            path = self.backend.save(self.out_dir, self.step, self.model, self.optimizer, self.checkpoint_meta(),
                                     keep_last=self.t.keep_last)
        except NonFiniteError as e:  # nothing was written or rotated
            raise NonFiniteError(self.guard.message(f"model or optimizer state, not saved ({e})",
                                                    self.step)) from None
        self.log(f"saved {path}")
        return path

    # ---- the loop -------------------------------------------------------------------------------------------
    def advance(self, on_grow: Callable[[dict], bool | None] | None = None) -> float | None:
        """One turn of the loop that ``run``, ``nanogrow lag``, the benchmarks and the tests all drive: every
        growth event that is due (a LAG event trains its candidates' steps inside it), then one optimizer step.
        Returns the step's loss, or None when no step was taken: growth reached train.max_steps, or ``on_grow``
        (called with each growth event's record) returned True to stop right after that event."""
        while self.growth.due():
            event = self.growth.grow_next_stage()
            if on_grow is not None and on_grow(event):
                return None
        if self.step >= self.max_steps:
            return None
        return self.train_step()

    def train_until_growth(self, stop: Callable[[dict], bool]) -> dict | None:
        """Train (growth events included) until a growth event for which ``stop`` is true, and return it (the
        event has saved its checkpoint); None if the run reaches train.max_steps first. ``nanogrow lag`` stops
        after its LAG selection this way."""
        hits: list[dict] = []

        def on_grow(event: dict) -> bool:
            if stop(event):
                hits.append(event)
            return bool(hits)

        while not hits:
            if self.advance(on_grow=on_grow) is None and not hits:  # train.max_steps came first
                return None
        return hits[0]

    def run(self) -> dict:
        t = self.t
        self.log(f"model: {self.model_config.num_params():,} params ({self.model_config.num_params(False):,} "
                 f"non-embedding), {self.model_config.flops_per_token(self.seq_len) / 1e6:.2f} MFLOPs/token; "
                 f"{self.world} process(es) on {self.device}; {self.tokens_per_step():,} tokens/step")
        start, start_step = time.perf_counter(), self.step
        self.meter.reset_window()
        last_loss = float("nan")
        while self.step < self.max_steps:
            loss = self.advance()  # stops (NonFiniteError) on non-finite steps past the allowed skips
            if loss is None:  # LAG's candidate steps count as training steps and may reach the end
                break
            last_loss = loss
            self.guard.watch(self.step, last_loss, self.model_config.vocab_size)
            if self.step % t.log_every == 0 or self.step == self.max_steps:
                last_loss = dist_utils.all_reduce_mean(last_loss, self.device)  # the global batch's, not rank 0's
                w = self.meter.window()
                elapsed = time.perf_counter() - start
                eta = elapsed / max(1, self.step - start_step) * (self.max_steps - self.step)
                self.log(f"step {self.step:>6}/{self.max_steps} | loss {last_loss:.4f} | "
                         f"lr {self.current_lr(self.step - 1):.2e} | {w['tokens_per_s']:,.0f} tok/s | "
                         f"mfu {100 * w['mfu']:.2f}% | eta {_hms(eta)}")
                self.trackers.log({"kind": "train", "step": self.step, "tokens": self.meter.total_tokens,
                                   "flops": self.meter.total_flops, "flops_by": dict(self.meter.flops_by),
                                   "loss": last_loss,
                                   "lr": self.current_lr(self.step - 1), "grad_norm": self.grad_norm,
                                   "tokens_per_s": w["tokens_per_s"], "mfu": w["mfu"], "stage": self.stage_index,
                                   "params": self.model_config.num_params(), "seconds": round(elapsed, 3)})
            if t.eval_every and self.step % t.eval_every == 0 and self.step < self.max_steps:
                self.evaluate_and_record(start)
            if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < self.max_steps:
                self.save()
        # The final evaluation: at train.max_steps, or wherever the loop ended (inside a growth event whose LAG
        # candidate steps reached the end, or right away on a run resumed at its end).
        val_loss = self.evaluate_and_record(start)
        self.save()
        # flops: the charged total (train + selection + probe + fit; evaluation for reporting is outside it, in
        # flops_by["eval"]); flops_by: every category; flops_share: each as a fraction of the charged total.
        summary = {"steps": self.step, "train_loss": last_loss, "val_loss": val_loss,
                   "tokens": self.meter.total_tokens, "flops": self.meter.total_flops,
                   "flops_by": dict(self.meter.flops_by), "flops_share": self.meter.shares(),
                   "seconds": time.perf_counter() - start, "stages": self.stage_stats.rows,
                   "growth_events": [h for h in self.history if h["event"] == "grow"]}
        if len(self.stage_stats.rows) > 1:
            self.log(self.stage_stats.table())
        if self.rank == 0:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.trackers.close()
        if self.rank == 0 and self.t.plot:
            _plot(self.out_dir, self.log)
        self.log(f"done: {summary['steps']} steps, val loss {val_loss:.4f}, {summary['tokens']:,} tokens, "
                 f"{self.meter.breakdown()}, {summary['seconds']:.1f} s")
        if self.rank == 0:
            run_lock.release(self.out_dir)
        return summary


class StepGuard:
    """Non-finite steps (skipped up to train.skip_nonfinite_steps in a row, then the run stops naming the step, the
    likely cause and the checkpoint to go back to) and finite but exploding losses (a warning)."""

    def __init__(self, t: TrainConfig, out_dir: Path, log: Callable[[str], None]) -> None:
        self.t, self.out_dir, self.log = t, out_dir, log
        self.streak, self.loss_avg, self.quiet_until = 0, None, 0

    def finite(self, step: int, loss: float, grad_norm: float, can_skip: bool = True) -> bool:
        """May step ``step``'s update be applied? A finite update that makes the weights non-finite is caught by
        the finite check every checkpoint save does (checkpoint.check_finite), or at the next step's loss."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.streak = 0
            return True
        self.streak += 1
        if can_skip and self.streak <= self.t.skip_nonfinite_steps:
            self.log(f"warning: step {step}: loss {loss}, gradient norm {grad_norm}: update skipped "
                     f"({self.streak} of train.skip_nonfinite_steps={self.t.skip_nonfinite_steps} in a row)")
            return False
        raise NonFiniteError(self.message(f"loss or gradient (loss {loss}, gradient norm {grad_norm})", step))

    def message(self, what: str, step: int) -> str:
        last = latest_checkpoint(self.out_dir)
        resume = f"last good checkpoint {last} (`--resume {last}`)" if last else "no checkpoint written yet"
        return (f"step {step}: non-finite {what}; likely cause: a learning rate too high for this model "
                f"(train.lr={self.t.lr}) or corrupt data; {resume}; lower train.lr or set "
                f"train.skip_nonfinite_steps to skip isolated bad steps")

    def watch(self, step: int, loss: float, vocab_size: int) -> None:
        """Warn about a finite but exploding loss: far above a uniform guess (ln vocab_size), or a spike over the
        recent average. At most one warning per 100 steps."""
        uniform = math.log(vocab_size)
        avg = self.loss_avg
        self.loss_avg = loss if avg is None else 0.9 * avg + 0.1 * loss
        if step < self.quiet_until:
            return
        if loss > 2 * uniform:
            why = f"more than twice ln(vocab_size) = {uniform:.2f}, what a uniform guess scores"
        elif avg is not None and step > 20 and loss > 1.5 * avg:
            why = f"a spike over the recent average {avg:.4f}"
        else:
            return
        self.log(f"warning: step {step}: loss {loss:.4g} is {why}: training may be diverging (train.lr={self.t.lr})")
        self.quiet_until = step + 100


def _claim_out_dir(out_dir: Path, resume: str | None, overwrite: bool, log, rank: int) -> None:
    """A fresh run never writes into another run's checkpoints: rotation orders by step number across both
    runs and --resume auto would then load a mix. Leftovers of a crashed save are removed in any case."""
    existing = checkpoint_dirs(out_dir)
    if existing and resume is None and not overwrite:
        raise CheckpointError(
            f"train.out_dir {str(out_dir)!r} already holds checkpoints ({existing[0].name} ... "
            f"{existing[-1].name}) of an earlier run; continue it with `--resume auto`, or start afresh with "
            f"`--overwrite` (deletes them), or set another train.out_dir")
    if resume is None:
        log.start_afresh()
    if rank == 0:
        if existing and resume is None and overwrite:
            remove_checkpoints(out_dir, log=log)
        remove_stray_tmp(out_dir, log=log)
    dist_utils.barrier()


def _check_compatible(cfg: RunConfig, meta: dict, path: Path) -> None:
    """The run being resumed must have started from the same shape; later shapes come from its history."""
    started = meta["run_config"].get("model")
    if not isinstance(started, dict):
        raise CheckpointError(f"checkpoint {str(path / 'meta.json')!r}: run_config.model should be the table "
                              f"the run started with, found {type(started).__name__}")
    ours = dataclasses.asdict(cfg.model)
    diff = [k for k in ours if ours[k] != started.get(k) and k != "kernels"]  # kernels: not a shape
    if diff:
        pairs = ", ".join(f"model.{k}: checkpoint {started.get(k)!r} vs config {ours[k]!r}" for k in diff)
        raise CheckpointError(f"checkpoint {str(path)!r} is from another model shape ({pairs})")


def _plot(out_dir: Path, log) -> None:
    """out_dir/loss.png from metrics.jsonl (train.plot)."""
    if not have_matplotlib():
        log("note: matplotlib is not installed, so no loss.png (pip install matplotlib; `nanogrow plot RUN_DIR` "
            "draws it later)")
        return
    log(f"wrote {plot_runs([out_dir], out_dir / 'loss.png')}")


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


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
