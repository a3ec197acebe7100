"""Run a study: every arm x seed (x lr for the reference, x budget scale for its longer runs) not yet in the store.

Order: the reference over its learning-rate grid first (its best lr, the "tuned" one, is what every grown arm
trains at), then the grown arms, then the reference at the larger budgets. Each finished run is appended to the
store at once, so a study stopped at any point loses at most the run(s) in progress.

With ``jobs`` > 1 the runs train in parallel in ``jobs`` worker processes (``RunPool``), each pinned to one core
and running torch on one thread; the parent process plans, copies records stored for other studies, and is the
store's only writer (records appended in completion order). Scheduling is work-conserving (``run_scheduled``): each
time a run ends the parent plans again from the store and gives every idle worker the longest run that is ready
(the lr grid first, the rest once the tuned lr is known; several studies share one pool). A worker that would idle
while the grid's last runs finish trains the grid extension the finished runs already call for
(``speculative_runs``). Every record says how it ran: ``jobs``, ``threads`` (torch threads of that run) and ``cpu``
(the core its worker was pinned to; null when not pinned), so its wall-clock seconds can be read.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from ..progress import RunEta
from .store import Store
from .study import LR_FACTOR, Run, Study, config_hash

FULL_VAL_BATCHES, FULL_VAL_BATCH = 15, 32  # 480 sequences: 94% of a 65,536-token val split at seq 128


def compiled(study, log=print):
    """``study`` (a Study or a Frontier) with its runs under torch.compile (inductor), for ``handbook run --compile``.
    Its runs keep their keys (``config_hash`` leaves train.compile out), so a compiled study continues an eager
    store and the reverse; each record says which way it ran ("compiled"). A worker compiles a block shape once and
    reuses it for every later run of that shape (and the on-disk inductor cache across processes): the compile
    seconds fall in the first runs' wall-clock.

    Compiled and eager runs of one config are the same run up to floating-point rounding, which training amplifies
    (measured: final losses within 0.003 at a tuned lr, up to 0.02 at twice it and 0.11 at an unstable lr, 770-step
    runs): a study's seed-paired comparisons should not mix the two, so a store holding eager runs is warned of."""
    eager = sum(not r.get("compiled") for r in Store(study.store_path).records)
    if eager:
        log(f"warning: {study.path}: {eager} stored run(s) ran eager; runs trained now under --compile differ from "
            f"eager ones by amplified rounding (up to ~0.02 in final loss off the tuned lr): paired comparisons "
            f"will mix both (records say which ran how)")
    train = dataclasses.replace(study.base.train, compile=True)
    return dataclasses.replace(study, base=dataclasses.replace(study.base, train=train))


def tuned_lr(study: Study, store: Store, seeds: list[int]) -> tuple[float | None, dict]:
    """The reference's best lr: lowest mean final loss (full validation set) over the tuning seeds
    (``study.tune_seeds``, or ``seeds``), among the lrs of the grid that have all of them. Returns (lr or None,
    {lr: mean final loss}). None while the grid is not done, or while its best lr sits at an edge that
    ``study.lr_extensions`` still allows to extend."""
    grid, lr, means = lr_grid(study, store, seeds)
    return lr, means


def lr_grid(study: Study, store: Store, seeds: list[int]) -> tuple[list[float], float | None, dict]:
    """(the lrs to train the reference at, the tuned lr or None, {lr: mean final loss over the tuning seeds}): the
    study's grid, extended by ``LR_FACTOR`` past an edge that is the best so far, at most ``lr_extensions`` times."""
    tune = study.tune_seeds or seeds
    grid, means = list(study.lr_grid), {}
    while True:
        for lr in grid:
            finals = {r["seed"]: r["final_loss"] for r in store.select(study.reference, scale=1.0, lr=lr)
                      if r["seed"] in tune}
            if len(finals) == len(tune):
                means[lr] = statistics.fmean(finals.values())
        if len(means) < len(grid):
            return grid, None, means
        best = min(grid, key=means.get)
        if best not in (grid[0], grid[-1]) or len(grid) >= len(study.lr_grid) + study.lr_extensions:
            return grid, best, means
        grid = [best / LR_FACTOR] + grid if best == grid[0] else grid + [best * LR_FACTOR]


def plan_runs(study: Study, store: Store, seeds: list[int], arms: list[str] | None = None) -> list[Run]:
    """The runs still to do, in order, with the tuned lr resolved where the store already allows it: the lr grid at
    the tuning seeds, then the other arms, the reference's other seeds and its other budgets at the tuned lr."""
    grid, lr, _ = lr_grid(study, store, seeds)
    tune = study.tune_seeds or seeds
    todo = [r for x in grid for r in study.runs(study.reference, tune, x)]
    if lr is not None:
        for name in study.arms:
            if name != study.reference and (arms is None or name in arms):
                todo += study.runs(name, seeds, lr)
        todo += study.runs(study.reference, [s for s in seeds if s not in tune], lr)
        todo += study.runs(study.reference, seeds, lr, study.scratch_scales)
    return [r for r in todo if not store.has(r.key)]


def speculative_runs(study: Study, store: Store, seeds: list[int]) -> list[Run]:
    """While the lr grid is not done: the extension its finished runs already call for, to train on a core that
    would otherwise idle until the grid's last run ends. Called for: an edge lr whose inner neighbour has finished
    and is worse, with an extension still allowed. Unless a grid lr still running beats both (a loss that is not
    unimodal in lr), ``lr_grid`` asks for exactly this run once the grid is done. Empty otherwise."""
    grid, lr, means = lr_grid(study, store, seeds)
    if lr is not None or len(grid) < 2 or len(grid) >= len(study.lr_grid) + study.lr_extensions:
        return []
    for edge, inner, step in ((grid[0], grid[1], 1 / LR_FACTOR), (grid[-1], grid[-2], LR_FACTOR)):
        if edge in means and inner in means and means[edge] < means[inner]:
            return [r for r in study.runs(study.reference, study.tune_seeds or seeds, edge * step)
                    if not store.has(r.key)]
    return []


def run_study(study: Study, seeds: list[int] | None = None, arms: list[str] | None = None, log=print,
              dry_run: bool = False, jobs: int = 1) -> int:
    """Run what is missing; returns the number of runs made. The tuned lr is decided once the grid is done.

    ``jobs`` = 1 trains one run at a time in this process. ``jobs`` > 1 trains each phase's runs (the lr grid, then
    the grown arms and larger budgets) in ``jobs`` pinned single-thread worker processes (see ``RunPool``)."""
    seeds = seeds or study.seeds
    unknown = [a for a in arms or [] if a not in study.arms]
    if unknown:
        raise ValueError(f"{study.path}: no arm(s) {unknown}; the study has {', '.join(study.arms)}")
    check_jobs(jobs)
    store = Store(study.store_path)
    ensure_data(study, log)
    if dry_run:
        for r in plan_runs(study, store, seeds, arms):
            log(f"would run {r.arm} seed {r.seed} lr {r.lr:g} x{r.scale:g} ({r.cfg.train.max_steps} steps)")
        return 0
    with RunPool(jobs, log) as pool:
        if jobs > 1:
            made = run_scheduled(pool, [(study, store, seeds, arms)], log)
        else:
            made = 0
            while todo := plan_runs(study, store, seeds, arms):
                # A whole phase: the lr grid, or (the tuned lr known) the rest; plan_runs lists no later phase's runs.
                made += run_batch(study, todo, store, jobs, log, pool)
    lr, means = tuned_lr(study, store, seeds)
    log(f"[{study.name}] complete for seeds {seeds}: tuned lr {lr:g} "
        f"({', '.join(f'{k:g}: {v:.4f}' for k, v in means.items())})")
    return made


def run_studies(studies: list[Study], jobs: int = 1, log=print, dry_run: bool = False) -> int:
    """Run what is missing of several studies in one pool of ``jobs`` workers: each round trains every study's
    current phase together (longest runs first, so the cores stay busy), then plans again (a study whose lr grid
    is done moves on to its arms). Returns the number of runs made."""
    if len(studies) == 1 or dry_run:
        return sum(run_study(s, log=log, dry_run=dry_run, jobs=jobs) for s in studies)
    check_jobs(jobs)
    stores = {s.name: Store(s.store_path) for s in studies}
    if len(stores) < len(studies):
        raise ValueError("two of the studies have the same name: " + ", ".join(str(s.path) for s in studies))
    for s in studies:
        ensure_data(s, log)
    with RunPool(jobs, log) as pool:
        if jobs > 1:
            return run_scheduled(pool, [(s, stores[s.name], s.seeds, None) for s in studies], log)
        made = 0
        while True:  # one run at a time: each round, every study's current phase, longest runs first
            items = []
            for s in studies:
                todo = plan_runs(s, stores[s.name], s.seeds)
                made += run_batch(s, [r for r in todo if stored_elsewhere(s, r.key)], stores[s.name], jobs, log, pool)
                items += [(s, r) for r in todo if not stores[s.name].has(r.key)]
            if not items:
                return made
            items.sort(key=lambda item: -run_flops_of(item[1]))
            log(f"[{len(studies)} studies] {len(items)} runs on 1 jobs")
            eta = RunEta(jobs)  # per round: the next round's runs (other phases) may be longer or shorter
            for done, (study, run, record) in enumerate(pool.run(items), start=1):
                stores[study.name].append(record)
                made += 1
                eta.add(record)
                log(f"[{study.name}] {run_label(run)} | {run.cfg.train.max_steps} steps | cpu {record['cpu']}: "
                    f"{result_line(record)} | {eta.note(done, len(items) - done)}")


def ready_runs(plans: list[tuple], in_flight: set[str], log=print) -> tuple[list[tuple[Study, Run]], int, set]:
    """(what a free worker may start now, in order; how many records were copied on the way; the keys of the
    speculative ones). Each study's
    current phase (``plan_runs``; a run stored for another study is copied into this one's store here, not
    trained) less the runs in flight, longest first; then the grid extensions already called for
    (``speculative_runs``), for workers the others leave idle. ``plans``: (study, store, seeds, arms or None)."""
    items, copied, keys = [], 0, set(in_flight)
    for study, store, seeds, arms in plans:
        todo = [r for r in plan_runs(study, store, seeds, arms) if r.key not in keys]
        copies = [r for r in todo if stored_elsewhere(study, r.key)]
        if copies:
            copied += run_batch(study, copies, store, 1, log)
        for r in todo:
            if not store.has(r.key) and r.key not in keys:  # two arms that resolve to one config: trained once
                items.append((study, r))
                keys.add(r.key)
    items.sort(key=lambda item: -run_flops_of(item[1]))
    # After every run that is ready, for the workers those leave idle (the pool takes from the front): the grid
    # extensions already called for. Two grid runs can end together with one grid run left: one worker would idle.
    extra = []
    for study, store, seeds, _ in plans:
        for r in speculative_runs(study, store, seeds):
            if r.key not in keys:
                extra.append((study, r))
                keys.add(r.key)
    return items + extra, copied, {r.key for _, r in extra}


def run_scheduled(pool: "RunPool", plans: list[tuple], log=print) -> int:
    """Train what ``plans`` still need on ``pool``'s workers, work-conserving: ``ready_runs`` is asked again each
    time a run ends, so no core idles at a phase boundary while a run is ready; each record is stored as its run
    ends (a stopped study loses only the runs in progress). Returns the number of runs made, copies included."""
    stores = {study.name: store for study, store, _, _ in plans}
    eta = RunEta(pool.jobs)
    made = done = 0
    announced: set[str] = set()

    def ready(in_flight: set[str]) -> list[tuple[Study, Run]]:
        nonlocal made
        items, copied, speculative = ready_runs(plans, in_flight, log)
        made += copied
        new = [(s, r) for s, r in items if r.key not in announced]
        if new:  # a phase opens (the lr grid, its extension, the rest): say what became ready
            announced.update(r.key for _, r in new)
            log(f"[{', '.join(sorted({s.name for s, _ in new}))}] {len(new)} runs ready for {pool.jobs} jobs (1 thread "
                f"each): " + ", ".join(f"{r.arm} s{r.seed} lr {r.lr:g} x{r.scale:g}"
                                       + (" (speculative: the lr grid extension its finished runs call for)"
                                          if r.key in speculative else "") for _, r in new))
        return items

    for study, run, record, waiting in pool.run_dynamic(ready):
        stores[study.name].append(record)
        made += 1
        done += 1
        eta.add(record)
        log(f"[{study.name}] {run_label(run)} | {run.cfg.train.max_steps} steps | cpu {record['cpu']}: "
            f"{result_line(record)} | {eta.note(done, waiting)}")
    return made


def run_flops_of(run: Run) -> float:
    from .study import run_flops
    return run_flops(run.cfg)


def run_batch(study, runs: list[Run], store: Store, jobs: int = 1, log=print, pool: "RunPool | None" = None) -> int:
    """Make ``runs`` of ``study`` (a Study, or any planner with ``name``, ``path`` and ``store_path``) and append each
    record to ``store`` as it finishes; returns the number made. A run whose key ``store`` already has is skipped,
    one stored in another store next to it is copied (in this process), the rest are trained by ``pool`` (or a
    ``RunPool(jobs)`` for this batch alone): with ``jobs`` = 1 one after the other in the order given, the log
    saying each run before it starts; with ``jobs`` > 1 in parallel, logged as each finishes."""
    if pool is None:
        with RunPool(jobs, log) as own:
            return run_batch(study, runs, store, jobs, log, own)
    jobs = pool.jobs
    made, to_train, keys = 0, [], set()
    eta = RunEta(jobs)  # from this batch's finished runs: a phase's runs are alike (same budget, mostly)
    for i, run in enumerate(runs):
        if store.has(run.key) or run.key in keys:  # (two arms that resolve to one config: trained once)
            continue
        if jobs == 1:
            log(f"[{study.name}] {run_label(run)} | {run.cfg.train.max_steps} steps | "
                f"{eta.note(made, len(runs) - i - 1, 'more queued', starting=1)}")
        record = stored_elsewhere(study, run.key)
        if record is None:
            if jobs == 1:
                _, _, record = next(pool.run([(study, run)]))
            else:
                to_train.append((study, run))
                keys.add(run.key)
                continue
        else:  # the same config was run for another study (e.g. the shared reference); it is this run here, so it
            # takes this run's names (another study's 2x-budget scratch run can be this one's 1x: same config)
            record = {**record, "study": study.name, "arm": run.arm, "seed": run.seed, "lr": run.lr,
                      "scale": run.scale, "copied_from": record["study"]}
            log(f"    {'' if jobs == 1 else run_label(run) + ': '}the same config is in {record['copied_from']}'s "
                f"store: copied, not rerun")
        store.append(record)
        made += 1
        eta.add(record)
        if jobs == 1:
            log(f"    {result_line(record)}")
    if to_train:
        log(f"[{study.name}] {len(to_train)} runs on {min(jobs, len(to_train))} jobs (1 thread each): "
            + ", ".join(f"{r.arm} s{r.seed} lr {r.lr:g} x{r.scale:g}" for _, r in to_train))
    for done, (_, run, record) in enumerate(pool.run(to_train), start=1):
        store.append(record)  # as soon as it finishes: a stopped study loses only the runs in progress
        made += 1
        eta.add(record)
        log(f"[{study.name}] {run_label(run)} | {run.cfg.train.max_steps} steps | cpu {record['cpu']}: "
            f"{result_line(record)} | {eta.note(done, len(to_train) - done)}")
    return made


def run_label(run: Run) -> str:
    return f"{run.arm} | seed {run.seed} | lr {run.lr:g} | budget x{run.scale:g}"


def result_line(record: dict) -> str:
    return (f"final loss {record['final_loss']:.4f} (+- {record['final_loss_se']:.4f}), "
            f"{record['flops']:.3e} FLOPs, {record['wall_seconds']:.0f} s")


# ---- parallel runs -------------------------------------------------------------------------------------------

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # read when a worker imports torch: set before it starts


class RunFailed(RuntimeError):
    """A run that raised in a worker process; ``__cause__`` is its exception (with the worker's traceback)."""


def usable_cores() -> list[int]:
    """The cores this process may run on (its CPU affinity), or 0..cpu_count-1 where that cannot be read."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def check_jobs(jobs: int) -> list[int]:
    """Refuse a job count this process cannot give a core each; returns the usable cores."""
    cores = usable_cores()
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"--jobs must be a positive integer, got {jobs!r}")
    if jobs > len(cores):
        raise ValueError(f"--jobs {jobs}: this process may use {len(cores)} core(s) ({', '.join(map(str, cores))}) "
                         f"and each job needs one of its own (one torch thread, pinned); use --jobs {len(cores)} "
                         f"or fewer")
    return cores


class RunPool:
    """Trains (study, run) pairs with ``execute`` and yields ``(study, run, record)`` as each finishes, the record
    carrying ``jobs``, ``threads`` and ``cpu``. For any planner of ``Run`` objects (``run_study``, and others); the
    caller stores the records (one writer) and decides what to do next between calls of ``run``.

    ``jobs`` = 1: in this process, one run after the other, in the order given, unpinned (``cpu`` null, ``threads``
    this process's torch threads); an exception propagates as it is. ``jobs`` > 1: ``jobs`` spawned worker
    processes (started as needed, kept across calls of ``run`` until the pool closes), each pinned to its own core
    of this process's affinity and running torch on 1 thread (``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = 1 in its
    environment before it imports torch). Records come back in completion order. A run that raises stops the
    pool's queue (runs not started are dropped, runs in progress finish and are yielded) and then surfaces as
    ``RunFailed`` naming its study, arm, seed, lr and budget. Leaving the ``with`` block on an exception (Ctrl-C
    included: the workers ignore SIGINT, the parent ends them) terminates the workers and their runs in progress.
    """

    def __init__(self, jobs: int = 1, log=print):
        self.cores = check_jobs(jobs)[:jobs]
        self.jobs, self.log = jobs, log
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> "RunPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(abort=exc_type is not None)

    def _start(self) -> ProcessPoolExecutor:
        if self._executor is None:
            ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: torch imported after the env is set
            cores = ctx.SimpleQueue()
            pin = hasattr(os, "sched_setaffinity")
            for cpu in self.cores:
                cores.put(cpu if pin else None)  # each worker takes one core as it starts
            self._executor = ProcessPoolExecutor(self.jobs, mp_context=ctx, initializer=_init_worker,
                                                 initargs=(cores, os.getpid()))
        return self._executor

    def run(self, items: Iterable[tuple[Study, Run]]) -> Iterator[tuple[Study, Run, dict]]:
        items = list(items)
        if self.jobs == 1:
            for study, run in items:
                record = execute(study, run)
                yield study, run, {**record, "jobs": 1, "threads": torch.get_num_threads(), "cpu": None}
            return
        if not items:
            return
        executor = self._start()
        futures = {self._submit(executor, study, run): i for i, (study, run) in enumerate(items)}
        failed, pending = None, set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=futures.get):
                    if fut.cancelled():
                        continue
                    study, run = items[futures[fut]]
                    if fut.exception() is not None:
                        if failed is None:
                            failed = (study, run, fut.exception())
                            for f in pending:
                                f.cancel()  # not started: not run
                            running = sum(1 for f in pending if not f.cancelled())
                            self.log(f"[{study.name}] {run_label(run)} {failure(failed[2])}; waiting for the "
                                     f"{running} run(s) in progress, then stopping")
                        continue
                    yield study, run, {**fut.result(), "jobs": self.jobs}
        finally:
            for f in pending:
                f.cancel()
        if failed is not None:
            study, run, exc = failed
            raise RunFailed(f"{study.name}: {run_label(run)} {failure(exc)}") from exc

    def run_dynamic(self, ready) -> Iterator[tuple[Study, Run, dict, int]]:
        """Keep every worker busy: ``ready(keys in flight)`` lists the (study, run) pairs that may start now, longest
        first; the pool starts as many as it has idle workers and asks again after each run ends, once the caller has
        stored its record (the generator resumes only then). Yields ``(study, run, record, runs in flight or
        ready)`` in completion order; stops when nothing is in flight and nothing is ready. A failed run stops new
        starts, lets the runs in progress end (yielded) and then raises ``RunFailed``."""
        executor = self._start()
        in_flight: dict = {}  # future -> (study, run)
        failed = None
        try:
            while True:
                items = [] if failed else ready({run.key for _, run in in_flight.values()})
                start = items[: self.jobs - len(in_flight)]
                for study, run in start:
                    in_flight[self._submit(executor, study, run)] = (study, run)
                queued = len(items) - len(start)  # ready but waiting for a worker (later phases not counted)
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in done:
                    study, run = in_flight.pop(fut)
                    if fut.exception() is not None:
                        if failed is None:
                            failed = (study, run, fut.exception())
                            self.log(f"[{study.name}] {run_label(run)} {failure(failed[2])}; waiting for the "
                                     f"{len(in_flight)} run(s) in progress, then stopping")
                        continue
                    yield study, run, {**fut.result(), "jobs": self.jobs}, len(in_flight) + queued
        finally:
            for f in in_flight:
                f.cancel()
        if failed is not None:
            study, run, exc = failed
            raise RunFailed(f"{study.name}: {run_label(run)} {failure(exc)}") from exc

    def _submit(self, executor: ProcessPoolExecutor, study: Study, run: Run):
        saved = {k: os.environ.get(k) for k in THREAD_ENV}
        os.environ.update({k: "1" for k in THREAD_ENV})  # spawn starts a worker inside submit, with this env
        try:
            return executor.submit(_train_in_worker, study, run)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def close(self, abort: bool = False) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        if abort:
            # Python < 3.14 has no public way to stop a task in progress: end the workers themselves (their runs
            # are lost, as a stopped study's run in progress always was; the next attempt overwrites its out_dir).
            processes = list((getattr(executor, "_processes", None) or {}).values())
            for p in processes:
                p.terminate()
            executor.shutdown(wait=False, cancel_futures=True)
            for p in processes:
                p.join(10)
        else:
            executor.shutdown(wait=True)


def failure(exc: BaseException) -> str:
    if isinstance(exc, BrokenProcessPool):  # not this run's doing, necessarily: every run in the pool gets it
        return f"was lost: the worker pool broke (a worker was killed, ran out of memory or could not start): {exc}"
    return f"failed in a worker process: {type(exc).__name__}: {exc}"


def run_pool(items: Iterable[tuple[Study, Run]], jobs: int = 1, log=print) -> Iterator[tuple[Study, Run, dict]]:
    """``RunPool(jobs, log).run(items)`` for one batch: the pool's workers end with it."""
    with RunPool(jobs, log) as pool:
        yield from pool.run(items)


_WORKER_CPU: int | None = None  # in a worker process: the core it is pinned to


def die_with_parent() -> bool:
    """Ask Linux to SIGTERM this process when its parent dies (prctl PR_SET_PDEATHSIG). A parent ended by SIGTERM or
    SIGKILL runs no cleanup, and its workers would otherwise train on, orphaned, for runs nobody will store, holding
    the cores the next attempt pins. Returns whether it took (False off Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
        return False
    return True


def _init_worker(cores, parent: int | None = None) -> None:
    global _WORKER_CPU
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the workers
    die_with_parent()
    if parent is not None and os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    _WORKER_CPU = cores.get()
    if _WORKER_CPU is not None:
        os.sched_setaffinity(0, {_WORKER_CPU})
    torch.set_num_threads(1)
    code_commit()  # the code this worker imported at its start


def _train_in_worker(study: Study, run: Run) -> dict:
    record = execute(study, run)
    return {**record, "threads": torch.get_num_threads(), "cpu": _WORKER_CPU}


def retime(study: Study, arm: str, seeds: list[int] | None = None, log=print) -> int:
    """Run ``arm``'s records at the tuned lr and budget x1 again and replace them in every store that holds the same
    config. For wall-clock hygiene only: the losses and FLOPs of a seeded run reproduce, its seconds do not when the
    machine was loaded while it ran (two runs on two cores, a test suite). Returns the number of runs made."""
    seeds = seeds or study.seeds
    store = Store(study.store_path)
    lr, _ = tuned_lr(study, store, seeds)
    if lr is None:
        raise ValueError(f"{study.path}: the reference's lr grid is not complete; nothing to retime")
    made = 0
    for run in study.runs(arm, seeds, lr):
        log(f"[{study.name}] retiming {arm} seed {run.seed} (lr {lr:g})")
        record = execute(study, run)
        for path in sorted(study.store_path.parent.glob("*.jsonl")):
            other = Store(path)
            if not other.has(run.key):
                continue
            records = [({**record, "study": r["study"], "arm": r["arm"], "retimed": True,
                         **({"copied_from": study.name} if r["study"] != study.name else {})}
                        if r["config_hash"] == run.key else r) for r in other.records]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r, separators=(",", ":"), sort_keys=True) + "\n" for r in records))
            os.replace(tmp, path)  # atomic: a reader sees the old store or the new one
        made += 1
        log(f"    {record['wall_seconds']:.0f} s, final loss {record['final_loss']:.4f}")
    return made


def stored_elsewhere(study: Study, key: str) -> dict | None:
    """A record of the config ``key`` in another study's store next to this one (runs are identified by their
    config, so a reference shared by several studies is trained once)."""
    for path in sorted(study.store_path.parent.glob("*.jsonl")):
        if path != study.store_path:
            for r in Store(path).records:
                if r["config_hash"] == key:
                    return r
    return None


def ensure_data(study: Study, log) -> None:
    d = Path(study.base.data.dir)
    if (d / "meta.json").exists():
        return
    if not study.prep:
        raise FileNotFoundError(f"{d} does not exist and {study.path} has no study.prep to make it")
    from ..data_prep.prepare import main as prep_main
    log(f"preparing {d}: nanogrow prep {' '.join(study.prep)} --out {d}")
    prep_main([*study.prep, "--out", str(d)])


def execute(study: Study, run: Run) -> dict:
    """Train one run and return its store record."""
    from ..train import Trainer

    # The record is keyed by the config as planned: the Trainer may rewrite fields of the config it is given (with
    # train.max_flops it re-derives max_steps), so it trains on a copy.
    key, config = config_hash(run.cfg), run.cfg.to_dict()
    t_setup = time.perf_counter()
    trainer = Trainer(copy.deepcopy(run.cfg), log=lambda *a, **k: None, overwrite=True)  # replaces a crashed attempt
    t0 = time.perf_counter()
    summary = trainer.run()
    wall = time.perf_counter() - t0
    final, se = full_validation(trainer)
    # The test split, where the data has one (part 3's corpus): what the Handbook reports; val is for choices.
    test = full_validation(trainer, "test") if has_split(run.cfg.data.dir, "test") else (None, None)
    t_end = time.perf_counter()
    # Where a study run's time goes besides training (issue #29): building the Trainer, the evaluations inside the
    # run (its eval entries' own seconds), and the final full validation and test passes.
    overhead = {"setup_seconds": round(t0 - t_setup, 3), "final_eval_seconds": round(t_end - t0 - wall, 3),
                "eval_seconds": round(sum(h.get("eval_seconds", 0.0) for h in trainer.history
                                          if h["event"] == "eval"), 3)}
    curve = [[h["flops"], h["tokens"], h.get("seconds"), h["val_loss"]] for h in trainer.history
             if h["event"] == "eval"]
    events = [growth_event_record(h) for h in trainer.history if h["event"] == "grow"]
    # Each stage's last evaluation, at the validation length and (a shorter stage) at its own sequence length.
    stages = [{k: st.get(k) for k in ("stage", "start_step", "seq_len", "shape", "val_loss", "val_loss_stage_len")}
              for st in trainer.stage_stats.rows]
    shutil.rmtree(run.cfg.train.out_dir, ignore_errors=True)  # checkpoints of a finished study run are not kept
    return {
        "study": study.name, "arm": run.arm, "seed": run.seed, "lr": run.lr, "scale": run.scale,
        "config_hash": key, "config": config, "commit": code_commit(),
        "curve": curve, "growth_events": events, "stages": stages, "final_loss": final, "final_loss_se": se,
        "final_test_loss": test[0], "final_test_loss_se": test[1],
        # flops: charged (train + selection + probe + fit); flops_by: every category, the final scoring above in
        # "eval" (records written before the breakdown have no flops_by: all their flops were charged)
        "final_curve_loss": summary["val_loss"], "flops": summary["flops"], "tokens": summary["tokens"],
        "flops_by": dict(trainer.meter.flops_by),
        "steps": summary["steps"], "wall_seconds": wall, **overhead, "compiled": bool(run.cfg.train.compile),
        "machine": machine(),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def growth_event_record(h: dict) -> dict:
    """What a store keeps of a growth event: when, the operator, the loss before and after, and a LAG
    selection's outcome (candidates, winner, each candidate's steps, training and scoring FLOPs, last held-out loss
    and its standard error, that of the winner's difference from the runner-up, and what the selection charged in
    FLOPs and wall-clock beyond the winner's own steps; older records lack the last ones)."""
    plan = h.get("plan") or {}
    out = {k: h.get(k) for k in ("step", "tokens", "flops", "val_loss_before", "val_loss_after", "seconds",
                                  "params_before", "params_after")}
    out.update(op=plan.get("op"), options=plan.get("options"))
    lag = h.get("lag")
    if lag:
        out["lag"] = {"strategy": lag.get("strategy", "all"), "candidates": lag["candidates"],
                      "winner": lag["winner"], "steps_per_candidate": lag.get("steps_per_candidate"),
                      "flops_per_candidate": lag["flops_per_candidate"],
                      "last_losses": [c[-1] if c else None for c in lag["curves"]],
                      "last_se": [s[-1] if s else None for s in lag.get("eval_se", [])],
                      "paired_se": lag.get("paired_se"),
                      **{k: lag.get(k) for k in ("score_flops_per_candidate", "selection_flops", "selection_seconds",
                                                 "score_batches", "score_tokens") if k in lag}}
    return out


def has_split(data_dir: str, split: str) -> bool:
    return (Path(data_dir) / f"{split}_000000.bin").exists()


@torch.no_grad()
def full_validation(trainer, split: str = "val") -> tuple[float, float]:
    """Final loss on up to 480 sequences of ``split`` (15 batches of 32; fewer where the split is smaller) and its
    standard error over the batches. Its FLOPs are counted as the trainer's "eval" (reporting, not charged)."""
    from ..config import eval_seq_len
    from ..data import ShardSet, val_batches
    from ..parallel import unwrap

    seq = eval_seq_len(trainer.cfg)
    n = min(FULL_VAL_BATCHES, (ShardSet(trainer.cfg.data.dir, split).total - 1) // (FULL_VAL_BATCH * seq))
    model = unwrap(trainer.model)
    model.eval()
    losses = []
    batches = val_batches(trainer.cfg.data.dir, seq, FULL_VAL_BATCH, n, vocab_size=trainer.model_config.vocab_size,
                          split=split)
    trainer.meter.add_flops(trainer.forward_cost(batches), "eval")
    for x, y in batches:
        losses.append(float(model(x.to(trainer.device), y.to(trainer.device))))
    model.train()
    return statistics.fmean(losses), statistics.stdev(losses) / len(losses) ** 0.5


_CODE_COMMIT: str | None = None


def code_commit() -> str:
    """The commit of the code this process runs: read once, at the first run, not at every record (a study runs for
    hours while commits land; the records of one process ran one version of the code). A worker of ``RunPool``
    reads it when it starts, which is when it imports the code."""
    global _CODE_COMMIT
    if _CODE_COMMIT is None:
        _CODE_COMMIT = git_commit()
    return _CODE_COMMIT


def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "nanogrow"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    cpu = platform.processor()  # often empty on Linux; /proc/cpuinfo names the model where it exists
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = cpu or "unknown"  # not Linux, or no model name: keep what platform reports
    return {"cores": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}
