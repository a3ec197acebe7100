"""Benchmarks that print numbers: throughput of a config (tokens/s, MFU, peak memory)."""

from __future__ import annotations

import copy
import dataclasses
import json
import resource
import statistics
import time

import torch

from . import lag as lag_mod
from .config import RunConfig, eval_seq_len, validate
from .dist_utils import pick_device
from .grow import make_optimizer
from .handbook.stats import first_crossing
from .metrics import cpu_matmul_peak_flops, device_peak_flops
from .model import build_model
from .parallel import compile_blocks
from .schedule import stage_layouts
from .train import Trainer


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def throughput(cfg: RunConfig, warmup: int = 3, steps: int = 10, log=print) -> dict:
    """Median optimizer-step time of ``cfg``'s model on random tokens (no data needed), after ``warmup`` steps."""

    t = cfg.train
    device = pick_device(t.device)
    mc = cfg.model.resolved()
    torch.manual_seed(t.seed)
    model = build_model(mc, device, seed=t.seed)
    if t.compile:  # per block, as the Trainer compiles
        compile_blocks(model)
    opt = make_optimizer(model, t)
    use_bf16 = t.dtype == "bf16" or (t.dtype == "auto" and device.type == "cuda")
    T, B = cfg.data.seq_len, t.micro_batch
    tokens = B * T * t.grad_accum
    times = []
    for i in range(warmup + steps):
        x = torch.randint(0, mc.vocab_size, (B, T), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(t.grad_accum):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = model(x, x)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    peak = device_peak_flops(device)
    fpt = mc.flops_per_token(T)
    out = {
        "params": mc.num_params(), "non_embedding_params": mc.num_params(False),
        "flops_per_token": fpt, "tokens_per_step": tokens, "median_step_s": med,
        "tokens_per_s": tokens / med, "mfu": tokens * fpt / med / peak if peak else 0.0,
        "peak_flops": peak, "peak_memory_mib": peak_memory_bytes(device) / 2**20, "device": str(device),
    }
    log(f"model {mc.n_layer}L d{mc.d_model} h{mc.n_head}/{mc.n_kv_head} ff{mc.d_ff} vocab {mc.vocab_size}: "
        f"{out['params'] / 1e6:.2f}M params, {fpt / 1e6:.1f} MFLOPs/token")
    log(f"{out['tokens_per_s']:,.0f} tokens/s | MFU {100 * out['mfu']:.1f}% of {peak / 1e9:.1f} GFLOP/s "
        f"({'measured matmul peak' if device.type == 'cpu' else 'device table'}) | median step "
        f"{1e3 * med:.1f} ms over {steps} steps | peak memory {out['peak_memory_mib']:.0f} MiB on {device}")
    return out


__all__ = ["throughput", "cpu_matmul_peak_flops", "peak_memory_bytes"]


# ---- growth benchmarks --------------------------------------------------------------------------------------

def _quiet(*_a, **_k):
    pass


def _run_curve(cfg: RunConfig, log=_quiet) -> dict:
    """Train ``cfg`` to the end; return its validation curve and wall time. The curve has the Handbook runner's
    layout, ``[flops, tokens, seconds, val_loss]`` per evaluation (``seconds``: since the run started, as the
    Trainer records it), so ``handbook.stats.first_crossing`` reads both."""

    trainer = Trainer(cfg, log=log, overwrite=True)  # a benchmark run is a new measurement: replace a previous one
    t0 = time.perf_counter()
    summary = trainer.run()
    curve = [[h["flops"], h["tokens"], h["seconds"], h["val_loss"]] for h in trainer.history if h["event"] == "eval"]
    return {"curve": curve, "final": summary["val_loss"], "flops": summary["flops"],
            "seconds": time.perf_counter() - t0, "growth_events": summary["growth_events"]}


def scratch_config(cfg: RunConfig) -> RunConfig:
    """The from-scratch reference of a grown schedule: its final shape at its final sequence length from the first
    step, with the tokens per step the schedule starts with (``train.micro_batch * data.seq_len``), validated at
    the schedule's validation length."""


    final = stage_layouts(cfg.model, cfg.data.seq_len, cfg.train.micro_batch, cfg.stage)[-1]
    tokens = cfg.train.micro_batch * cfg.data.seq_len
    if tokens % final.seq_len:
        raise ValueError(f"the scratch run trains at the final seq_len {final.seq_len} with the starting tokens per "
                         f"sequence batch {tokens} (train.micro_batch x data.seq_len), which it does not divide")
    scratch = copy.deepcopy(cfg)
    scratch.model, scratch.stage = final.model, []
    scratch.data.seq_len, scratch.train.micro_batch = final.seq_len, tokens // final.seq_len
    scratch.data.eval_seq_len = eval_seq_len(cfg)
    validate(scratch)
    return scratch


def equal_flops_steps(cfg: RunConfig) -> int:
    """Steps the grown schedule of ``cfg`` (manual ``at_step`` boundaries) needs to spend the FLOPs of training its
    final shape from scratch (``scratch_config``) for ``train.max_steps``: the extra steps go to the last stage.
    Every stage is costed at its own tokens per step and FLOPs per token (micro-batch, seq_len, shape)."""

    if cfg.growth.schedule != "manual" or any(st.at_step < 0 for st in cfg.stage):
        raise ValueError("--budget flops needs growth.schedule='manual' with at_step boundaries")
    t = cfg.train
    layouts = stage_layouts(cfg.model, cfg.data.seq_len, t.micro_batch, cfg.stage)
    ends = [st.at_step for st in cfg.stage]
    spent = sum((end - start) * lay.tokens_per_step(1, t.grad_accum) * lay.flops_per_token()
                for lay, start, end in zip(layouts, [0] + ends, ends))
    ref = scratch_config(cfg)
    scratch = t.max_steps * ref.train.micro_batch * ref.data.seq_len * t.grad_accum * \
        ref.model.flops_per_token(ref.data.seq_len)
    last = layouts[-1]
    return ends[-1] + round((scratch - spent) / (last.tokens_per_step(1, t.grad_accum) * last.flops_per_token()))


def _speedup_budget(cfg: RunConfig, budget: str):
    """The scratch reference's final shape and the grown run's step count (``'flops'``: the scratch run's FLOPs)."""

    if not cfg.stage:
        raise ValueError("bench speedup needs a config with [[stage]] growth stages")
    final_shape = dataclasses.replace(cfg.model)
    for st in cfg.stage:
        final_shape = dataclasses.replace(final_shape, **st.shape)
    grown_steps = equal_flops_steps(cfg) if budget == "flops" else cfg.train.max_steps
    return final_shape, grown_steps


def speedup(cfg: RunConfig, variants: list[str], seeds: list[int], out_dir: str, png: str | None = None,
            budget: str = "flops", log=print) -> dict:
    """Scratch (the final shape, trained from the start for ``train.max_steps``) against the grown schedule of
    ``cfg`` with each optimizer transfer policy in ``variants``, on the same data order, for every seed. With
    ``budget='flops'`` the grown run trains until it has spent the scratch run's FLOPs (its last stage is
    longer); with ``'steps'`` both train ``max_steps``. Prints FLOPs and wall time to reach the scratch run's
    final validation loss and the ratio scratch / grown."""

    final_shape, grown_steps = _speedup_budget(cfg, budget)
    log(f"budget: {budget}; scratch {cfg.train.max_steps} steps of {final_shape.n_layer} x {final_shape.d_model}; "
        f"grown {grown_steps} steps")
    results: dict = {"seeds": seeds, "runs": {}}
    for seed in seeds:
        runs = {}
        scratch = scratch_config(cfg)  # the final shape (and final seq_len) from the first step
        scratch.train.seed = scratch.data.seed = seed
        scratch.train.out_dir = f"{out_dir}/seed{seed}/scratch"
        runs["scratch"] = _run_curve(scratch)
        for v in variants:
            grown = copy.deepcopy(cfg)
            grown.growth.optimizer = v
            grown.train.max_steps = grown_steps
            grown.train.seed = grown.data.seed = grown.growth.seed = seed
            grown.train.out_dir = f"{out_dir}/seed{seed}/grown-{v}"
            runs[f"grown/{v}"] = _run_curve(grown)
        target = runs["scratch"]["final"]
        # Scratch's own cost is where its curve first reaches its final loss (a noisy curve can get there early):
        # FLOPs and seconds since the run started, each interpolated between the evaluations around the crossing.
        ref_flops = first_crossing(runs["scratch"]["curve"], target)
        ref_seconds = first_crossing(runs["scratch"]["curve"], target, x=2)
        for name, r in runs.items():
            hit = first_crossing(r["curve"], target)
            r["flops_to_target"] = hit
            r["seconds_to_target"] = first_crossing(r["curve"], target, x=2)
            r["flops_ratio"] = ref_flops / hit if hit is not None else None
            r["time_ratio"] = ref_seconds / r["seconds_to_target"] if r["seconds_to_target"] else None
            log(f"seed {seed} | {name:<14} | final val {r['final']:.4f} | total {r['flops']:.3e} FLOPs, "
                f"{r['seconds']:.0f} s | to scratch's final loss {target:.4f}: "
                + (f"{hit:.3e} FLOPs, {r['seconds_to_target']:.0f} s -> FLOPs ratio {r['flops_ratio']:.2f}x, "
                   + (f"time ratio {r['time_ratio']:.2f}x" if r["time_ratio"] else "time ratio n/a")
                   if hit is not None else "not reached"))
        results["runs"][seed] = runs
    names = list(results["runs"][seeds[0]])
    log("summary over seeds (mean): name | final val loss | FLOPs ratio scratch/grown to scratch's final loss")
    for name in names:
        finals = [results["runs"][s][name]["final"] for s in seeds]
        ratios = [results["runs"][s][name]["flops_ratio"] for s in seeds]
        shown = [f"{r:.2f}" if r else "n/r" for r in ratios]
        log(f"  {name:<14} | {statistics.mean(finals):.4f} (+- {statistics.pstdev(finals):.4f}) | "
            f"{', '.join(shown)}")
    if png:
        _plot_curves(results, png, log)
    return results


def speedup_ops(cfg: RunConfig, ops: list[str], seeds: list[int], out_dir: str, png: str | None = None,
                budget: str = "flops", log=print) -> dict:
    """Growth OPERATORS compared on the schedule of ``cfg``: scratch (the final shape), then the grown run once per
    operator in ``ops`` (every stage's op replaced; a stage keeps its config options only for the op it names,
    e.g. the ``learned`` op's {steps, lr}), same seeds and data order. FLOPs to scratch's final loss count all the
    run spent, including the learned operator's map fitting (the Trainer adds it to its FLOP meter). Prints each
    op's FLOPs-to-target ratio against scratch and against the first op (``--ops stack,learned``: the ratio
    stack / learned > 1 means learned reached the target with fewer FLOPs)."""

    final_shape, grown_steps = _speedup_budget(cfg, budget)
    log(f"operators {', '.join(ops)}; budget: {budget}; scratch {cfg.train.max_steps} steps of "
        f"{final_shape.n_layer} x {final_shape.d_model}; grown {grown_steps} steps")
    results: dict = {"seeds": seeds, "runs": {}}
    for seed in seeds:
        scratch = scratch_config(cfg)  # the final shape (and final seq_len) from the first step
        scratch.train.seed = scratch.data.seed = seed
        scratch.train.out_dir = f"{out_dir}/seed{seed}/scratch"
        runs = {"scratch": _run_curve(scratch)}
        for op in ops:
            grown = copy.deepcopy(cfg)
            for st in grown.stage:
                st.options = st.options if (st.op or grown.growth.op) == op else {}
                st.op = op
            grown.train.max_steps = grown_steps
            grown.train.seed = grown.data.seed = grown.growth.seed = seed
            grown.train.out_dir = f"{out_dir}/seed{seed}/grown-{op}"
            runs[f"grown/{op}"] = _run_curve(grown)
        target = runs["scratch"]["final"]
        ref_flops = first_crossing(runs["scratch"]["curve"], target)
        first = None
        for name, r in runs.items():
            hit = first_crossing(r["curve"], target)
            r["flops_to_target"] = hit
            r["flops_ratio"] = ref_flops / hit if hit is not None else None
            if name != "scratch" and first is None:
                first = r
            r["ratio_vs_first_op"] = (first["flops_to_target"] / hit
                                      if hit is not None and first and first["flops_to_target"] else None)
            log(f"seed {seed} | {name:<14} | final val {r['final']:.4f} | total {r['flops']:.3e} FLOPs, "
                f"{r['seconds']:.0f} s | to scratch's final loss {target:.4f}: "
                + (f"{hit:.3e} FLOPs -> scratch/op {r['flops_ratio']:.3f}x" if hit is not None else "not reached")
                + (f", {ops[0]}/op {r['ratio_vs_first_op']:.3f}x" if name != "scratch" and
                   r["ratio_vs_first_op"] else ""))
        results["runs"][seed] = runs
    if png:
        _plot_curves(results, png, log)
    return results


def _plot_curves(results: dict, png: str, log) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install matplotlib; launch/setup.sh installs it): no plot written")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for seed, runs in results["runs"].items():
        for name, r in runs.items():
            c = colors.setdefault(name, f"C{len(colors)}")
            xs, ys = [p[0] for p in r["curve"]], [p[3] for p in r["curve"]]
            ax.plot(xs, ys, color=c, alpha=0.8, label=name if seed == results["seeds"][0] else None)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss")
    ax.set_title("scratch vs grown: loss against compute")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    log(f"wrote {png}")


def stages(cfg: RunConfig, static_steps: int = 8, log=print) -> dict:
    """Tokens/s and MFU of every stage of the growth schedule in ``cfg`` (median step time within the stage,
    its first two steps excluded), side by side with the same shape trained statically through the same
    ``Trainer.train_step``, plus the wall time of each growth event."""


    cfg = copy.deepcopy(cfg)
    cfg.train.eval_every, cfg.growth.eval_at_growth = 0, False
    trainer = Trainer(cfg, log=_quiet, overwrite=True)
    per_stage: dict[int, list[float]] = {0: []}
    events = []
    clock = [0.0]

    def grown(event: dict) -> None:  # growth events are timed on their own (events[i]["seconds"])
        events.append(event)
        per_stage[trainer.stage_index] = []
        clock[0] = time.perf_counter()

    while trainer.step < trainer.max_steps:
        clock[0] = time.perf_counter()
        if trainer.advance(on_grow=grown) is None:
            break
        per_stage[trainer.stage_index].append(time.perf_counter() - clock[0])
    peak = trainer.meter.peak
    rows = []
    log("stage | shape (L x d, ff) | seq x micro_batch | grown tok/s | static tok/s | ratio | MFU grown | "
        "growth event ms")
    for k, times in per_stage.items():
        stats = trainer.stage_stats.rows[k]
        lay = trainer.growth.layouts[k]
        shape, mb = lay.model, lay.micro_batch
        steady = times[2:] or times
        tokens = stats["tokens"] / max(1, stats["steps"])
        grown_tps = tokens / statistics.median(steady)
        static_cfg = copy.deepcopy(cfg)
        static_cfg.model, static_cfg.stage = shape, []
        static_cfg.train.micro_batch, static_cfg.data.seq_len = mb, lay.seq_len
        static_cfg.data.eval_seq_len = lay.seq_len
        static_cfg.train.max_steps = static_steps + 2
        static_cfg.train.warmup_steps = 1
        static_cfg.train.out_dir = f"{cfg.train.out_dir}/static{k}"
        static = Trainer(static_cfg, log=_quiet, overwrite=True)
        st_times = []
        for _ in range(static_steps + 2):
            t0 = time.perf_counter()
            static.train_step()
            st_times.append(time.perf_counter() - t0)
        static_tps = tokens / statistics.median(st_times[2:])
        mfu = grown_tps * lay.flops_per_token() / peak if peak else 0.0
        ev_ms = 1e3 * events[k - 1]["seconds"] if k else 0.0
        rows.append({"stage": k, "grown_tokens_per_s": grown_tps, "static_tokens_per_s": static_tps,
                     "ratio": grown_tps / static_tps, "mfu": mfu, "growth_event_ms": ev_ms})
        log(f"{k:>5} | {shape.n_layer} x {shape.d_model}, {shape.d_ff:<6} | {f'{lay.seq_len} x {mb}':>17} | "
            f"{grown_tps:>11,.0f} | "
            f"{static_tps:>12,.0f} | {grown_tps / static_tps:5.3f} | {100 * mfu:8.1f}% | "
            + (f"{ev_ms:.0f}" if k else "-"))
    return {"stages": rows}


def lag(cfg: RunConfig, out_json: str, png_prefix: str | None = None, ks: list[int] | None = None,
        log=print) -> dict:
    """LAG's predictive power at one growth event: every candidate of the (single) LAG stage of ``cfg`` is trained
    to the end of the run, evaluated every ``lag.eval_every`` steps; then the report (correlations, recall,
    regret of LAG@k for several k, the phase transition)."""


    cfg = copy.deepcopy(cfg)
    if len(cfg.stage) != 1 or not cfg.stage[0].lag or cfg.stage[0].at_step < 0:
        raise ValueError("bench lag needs exactly one [[stage]] with lag = {...} and at_step")
    st = cfg.stage[0]
    st.lag = dict(st.lag, steps=cfg.train.max_steps - st.at_step)  # every candidate to the end of its stage
    trainer = Trainer(cfg, log=log, overwrite=True)
    while not any(h["event"] == "grow" for h in trainer.history):
        trainer.advance(on_grow=lambda event: True)  # stop once the LAG event is done
    record = [h for h in trainer.history if h["event"] == "grow"][-1]["lag"]
    with open(out_json, "w") as f:
        json.dump(record, f)
    log(f"wrote {out_json}")
    return lag_mod.report(record, ks=ks, png_prefix=png_prefix, log=log)


# ---- compound growth (depth + width + sequence length) against depth-only ----------------------------------------

def speedup_compound(cfg: RunConfig, baseline: RunConfig, seeds: list[int], out_dir: str, png: str | None = None,
                     log=print) -> dict:
    """Compound growth ``cfg`` (e.g. width, sequence length and depth stages) against the depth-only schedule
    ``baseline`` that ends in the same shape, at the same sequence length, with the same step budget. All three
    runs (scratch, depth-only, compound) spend the same FLOPs: each grown schedule's last stage is extended until
    it has spent what scratch spends in ``train.max_steps`` (``equal_flops_steps``). Everything is validated at
    one fixed length (``data.eval_seq_len``, by default the final seq_len), so the losses are comparable. Reports
    the FLOPs each run needs to reach scratch's final validation loss and depth-only's, and the ratios."""

    ref, ref_base = scratch_config(cfg), scratch_config(baseline)
    same = (ref.model.resolved(), ref.data.seq_len, ref.train.micro_batch, ref.data.eval_seq_len, ref.train.max_steps)
    other = (ref_base.model.resolved(), ref_base.data.seq_len, ref_base.train.micro_batch, ref_base.data.eval_seq_len,
             ref_base.train.max_steps)
    if same != other:
        raise ValueError(f"bench speedup --against: both schedules must end in the same shape, seq_len, tokens per "
                         f"step, eval_seq_len and train.max_steps (the common FLOPs budget); got {same} and {other}")
    schedules = {"depth-only": baseline, "compound": cfg}
    steps = {name: equal_flops_steps(c) for name, c in schedules.items()}
    log(f"budget: the FLOPs of {cfg.train.max_steps} scratch steps of {ref.model.n_layer} x {ref.model.d_model} at "
        f"seq_len {ref.data.seq_len}; " + ", ".join(f"{n} trains {s} steps" for n, s in steps.items()))
    results: dict = {"seeds": seeds, "runs": {}}
    for seed in seeds:
        runs = {}
        scratch = copy.deepcopy(ref)
        scratch.train.seed = scratch.data.seed = seed
        scratch.train.out_dir = f"{out_dir}/seed{seed}/scratch"
        runs["scratch"] = _run_curve(scratch)
        for name, c in schedules.items():
            grown = copy.deepcopy(c)
            grown.train.max_steps = steps[name]
            grown.train.seed = grown.data.seed = grown.growth.seed = seed
            grown.train.out_dir = f"{out_dir}/seed{seed}/{name}"
            runs[name] = _run_curve(grown)
        for target_name in ("scratch", "depth-only"):
            target = runs[target_name]["final"]
            ref_hit = first_crossing(runs[target_name]["curve"], target)
            for name, r in runs.items():
                hit = first_crossing(r["curve"], target)
                r[f"flops_to_{target_name}"] = hit
                r[f"flops_ratio_vs_{target_name}"] = ref_hit / hit if hit is not None else None
        for name, r in runs.items():
            log(f"seed {seed} | {name:<10} | final val {r['final']:.4f} | {r['flops']:.3e} FLOPs, {r['seconds']:.0f} s"
                f" | FLOPs to scratch's final loss: " + _ratio(r, "scratch") +
                " | to depth-only's final loss: " + _ratio(r, "depth-only"))
        results["runs"][seed] = runs
    log("summary (mean over seeds): name | final val loss | FLOPs ratio vs scratch | FLOPs ratio vs depth-only")
    for name in ("scratch", "depth-only", "compound"):
        rs = [results["runs"][s][name] for s in seeds]
        ratios = {t: [r[f"flops_ratio_vs_{t}"] for r in rs] for t in ("scratch", "depth-only")}
        log(f"  {name:<10} | {statistics.mean(r['final'] for r in rs):.4f} | "
            + " | ".join(", ".join(f"{x:.2f}x" if x else "n/r" for x in v) for v in ratios.values()))
    if png:
        _plot_curves(results, png, log)
    return results


def _ratio(r: dict, target: str) -> str:
    f = r[f"flops_to_{target}"]
    return f"{f:.3e} ({r[f'flops_ratio_vs_{target}']:.2f}x)" if f else "not reached"


# ---- optimizer step -----------------------------------------------------------------------------------------

OPTIMIZER_MODES = ("torch-foreach", "ours", "ours-ages-uniform", "ours-ages-mixed", "ours-ages+lr-scales",
                   "torch-fused", "ours-fused", "ours-fused-ages-mixed")


def _optimizer_setup(mc, mode: str, seed: int = 0):
    """Parameters shaped like ``mc``'s model with random gradients and the optimizer ``mode`` names; 'mixed'
    modes put two ages in every tensor (a growth's fresh rows at age 0 next to age 1000; 'lr-scales' also
    scales the fresh rows' lr), as after a width growth with map+age (and lr_adapt='vt')."""
    from .grow import AdamW

    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = [(n, p.shape) for n, p in build_model(mc, "meta", seed=None).named_parameters()]
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for _, s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if mode.startswith("torch"):
        return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), **({"fused": True} if "fused" in mode
                                                                          else {"foreach": True}))
    opt = AdamW(groups, lr=1e-3, betas=(0.9, 0.95), ages=mode == "ours-ages-uniform", fused="fused" in mode)
    if "mixed" in mode or "scales" in mode:
        for p in params:
            st = opt.state[p] = opt.fresh_state(p)
            st["step"].fill_(1000.0)
            age = torch.full(p.shape, 1000.0)
            age[-max(1, p.shape[0] // 4):] = 0.0  # the last quarter of the rows is fresh
            st["age"] = age
            if "scales" in mode:
                st["lr_scale"] = torch.where(age == 0, 0.3, 1.0)
    return opt


def optimizer_step(mc, modes=OPTIMIZER_MODES, rounds: int = 3, steps: int = 5, log=print) -> dict:
    """Median time of one optimizer step per ``mode``, the modes alternated within each round (A B C A B C ...)
    so that a shared machine's drift hits all alike; reports each mode's median per-round ratio to the first
    mode (torch.optim.AdamW(foreach=True)) with its min-max spread."""
    per_round: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(rounds):
        for m in modes:
            opt = _optimizer_setup(mc, m)
            opt.step()  # state created, caches filled: what every later step sees
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)
            per_round[m].append(statistics.median(times))
            del opt
    base = per_round[modes[0]]
    out = {}
    n = sum(p.numel() for p in build_model(mc, "meta", seed=None).parameters())
    log(f"optimizer step, {n / 1e6:.1f}M params, {torch.get_num_threads()} thread(s), {rounds} alternated rounds "
        f"x {steps} steps (median per round)")
    for m in modes:
        ratios = sorted(t / b for t, b in zip(per_round[m], base))
        out[m] = {"seconds": per_round[m], "ratio_median": statistics.median(ratios),
                  "ratio_min": ratios[0], "ratio_max": ratios[-1]}
        log(f"  {m:<20} {1e3 * statistics.median(per_round[m]):8.1f} ms   x{out[m]['ratio_median']:.2f} of "
            f"{modes[0]} (spread {ratios[0]:.2f}-{ratios[-1]:.2f})")
    return out
