"""``nanogrow bench study``: how many Handbook runs an hour this machine makes, for each way of running a study.

Trains fixed studies (default: the ladder rung 4x48 on the Bible, 21 runs of 98 to 392 steps) from empty stores in
a temporary directory, once per mode and round, the modes alternated (odd rounds run them in reverse order) so that a
drift of the machine's speed does not favour one. Modes:

    serial    one run at a time in this process, torch on every usable core (how studies ran before --jobs)
    jobs      --jobs = the usable cores (work-conserving: ``runner.run_scheduled``), one pinned 1-thread worker each
    compile   as ``jobs``, with train.compile: torch.compile (inductor) per run, recompiled at each growth event,
              the compile time inside the run's seconds

For each mode it prints runs/hour per round and their median, and per study arm the training tokens/s of one run
(tokens over the run's training seconds, median over its runs) and the share of a run's seconds spent outside the
training loop's steps: evaluations inside the run, the final full-validation (and test) pass, building the Trainer.
Every mode trains the same runs (same configs, seeds and lrs, up to train.compile), so its losses are the study's.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .runner import compiled, ensure_data, run_study, usable_cores
from .store import Store
from .study import STUDY_DIR, Study, load_study

MODES = ("serial", "jobs", "compile")
DEFAULT_STUDY = STUDY_DIR / "ladder-4x48.toml"


def study_copy(src: Study, directory: Path, compile: bool) -> Study:
    """``src`` as ``bench-<name>``, its store in ``directory`` (empty: every run trains) and its runs in
    runs/handbook/bench-<name>/ (removed as each ends), so that it never meets the study's own store or a run of it
    in progress; train.compile as the mode asks. The runs are the study's otherwise (same shapes, steps, lrs, seeds)."""
    copy = dataclasses.replace(src, path=directory / f"bench-{src.path.name}", name=f"bench-{src.name}")
    return compiled(copy) if compile else copy


def time_mode(studies: list[Study], mode: str, jobs: int) -> dict:
    """Train every run of ``studies`` from empty stores the ``mode`` way; their records and the seconds it took."""
    with tempfile.TemporaryDirectory(prefix="nanogrow-bench-study-") as tmp:
        copies = [study_copy(s, Path(tmp), compile=mode == "compile") for s in studies]
        threads = torch.get_num_threads()
        if mode == "serial":
            torch.set_num_threads(jobs)
        t0 = time.perf_counter()
        try:
            for c in copies:
                run_study(c, log=lambda *a, **k: None, jobs=1 if mode == "serial" else jobs)
        finally:
            torch.set_num_threads(threads)
        seconds = time.perf_counter() - t0
        records = [r for c in copies for r in Store(c.store_path).records]
    return {"seconds": seconds, "runs": len(records), "runs_per_hour": 3600 * len(records) / seconds,
            "records": [{k: r.get(k) for k in ("study", "arm", "seed", "lr", "scale", "tokens", "wall_seconds",
                                               "eval_seconds", "final_eval_seconds", "setup_seconds", "final_loss",
                                               "jobs", "threads", "cpu", "compiled")} for r in records]}


def per_arm(rounds: list[dict]) -> dict[str, dict]:
    """{study/arm: median training tokens/s of one run, and the median share of a run's seconds outside the
    training steps (evaluation inside the run, the final passes, setup)} over every round's runs."""
    out: dict[str, dict] = {}
    for rnd in rounds:
        for r in rnd["records"]:
            d = out.setdefault(f"{r['study'].removeprefix('bench-')}/{r['arm']}", {"tokens_per_s": [], "outside_steps": []})
            evals, final, setup = (r.get(k) or 0.0 for k in ("eval_seconds", "final_eval_seconds", "setup_seconds"))
            d["tokens_per_s"].append(r["tokens"] / max(r["wall_seconds"] - evals, 1e-9))
            d["outside_steps"].append((evals + final + setup) / (r["wall_seconds"] + final + setup))
    return {k: {m: statistics.median(v[m]) for m in v} for k, v in out.items()}


def bench_study(paths: list[str], modes: list[str], rounds: int = 2, jobs: int | None = None, log=print,
                out_json: str | None = None) -> dict:
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"nanogrow bench study --modes: unknown mode(s) {', '.join(bad)}; choose from "
                         f"{', '.join(MODES)}")
    if rounds < 1:
        raise ValueError(f"nanogrow bench study --rounds must be >= 1, got {rounds}")
    cores = usable_cores()
    jobs = jobs or len(cores)
    studies = [load_study(p) for p in paths]
    for s in studies:
        ensure_data(s, log)  # prepared once, before any timing
    log(f"bench study: {', '.join(s.name for s in studies)}; modes {', '.join(modes)}; {rounds} round(s), "
        f"alternated; {jobs} core(s) ({torch.__version__}, {len(cores)} usable)")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for i in range(rounds):
        for mode in (modes if i % 2 == 0 else modes[::-1]):
            res = time_mode(studies, mode, jobs)
            results[mode].append(res)
            log(f"  round {i + 1} {mode:<8} {res['runs']} runs in {res['seconds']:7.1f} s: "
                f"{res['runs_per_hour']:6.0f} runs/hour")
    summary = {}
    for mode, rnds in results.items():
        rates = [r["runs_per_hour"] for r in rnds]
        summary[mode] = {"runs_per_hour": statistics.median(rates), "rounds": rates, "per_arm": per_arm(rnds)}
    base = summary[modes[0]]["runs_per_hour"]
    log(f"\n{'mode':<9} {'runs/hour (median)':>19} {'per round':>24} {'x ' + modes[0]:>10}")
    for mode, s in summary.items():
        log(f"{mode:<9} {s['runs_per_hour']:>19.0f} {', '.join(f'{x:.0f}' for x in s['rounds']):>24} "
            f"{s['runs_per_hour'] / base:>9.2f}x")
    arms = sorted({a for s in summary.values() for a in s["per_arm"]})
    log("\ntraining tokens/s of one run (median) and share of its seconds outside the training steps")
    log(f"{'study/arm':<34}" + "".join(f"{m + ' tok/s':>15}{'outside':>9}" for m in summary))
    for a in arms:
        cells = "".join(f"{s['per_arm'][a]['tokens_per_s']:>15.0f}{s['per_arm'][a]['outside_steps']:>9.1%}"
                        if a in s["per_arm"] else f"{'-':>15}{'-':>9}" for s in summary.values())
        log(f"{a[:34]:<34}{cells}")
    out = {"studies": paths, "jobs": jobs, "rounds": rounds, "torch": torch.__version__, "modes": summary,
           "raw": results}
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(out, indent=1))
        log(f"wrote {out_json}")
    return out
