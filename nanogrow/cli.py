"""``nanogrow`` command line: prep, train, sample, eval, bench, ..."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .errors import run_reporting_errors


class HELP(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless there is none to tell (None, or an off switch)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _version() -> str:

    try:
        return version("nanogrow")
    except PackageNotFoundError:  # a source checkout on sys.path, not installed
        return "0.1.0 (source)"


def _operators() -> list[str]:
    from .grow import OPERATORS

    return list(OPERATORS)


def cmd_config(args) -> int:
    from .config import config_reference, load_config

    if args.show:
        print(config_reference())
        return 0
    print(json.dumps(load_config(args.config, args.overrides).to_dict(), indent=1))
    return 0


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="TOML config file, or the name of a bundled one (nanogrow configs), e.g. "
                                          "demo (default: the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=100 (repeatable)")


def tune_allocator() -> bool:
    """Keep freed memory in the process (glibc ``mallopt``): no large allocation is handed back to the kernel,
    so the activations and gradients of the next step reuse pages instead of faulting fresh ones in. On CPU,
    with glibc's defaults, every tensor above the (at most 32 MiB) mmap threshold is mapped and page-faulted
    anew each step. Set for the ``train`` and ``bench`` commands only (a library should not change its host's
    allocator); ``NANOGROW_MALLOC=default`` opts out. Returns whether the settings were applied."""

    if os.environ.get("NANOGROW_MALLOC", "") == "default" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30))


def cmd_train(args) -> int:
    from . import dist_utils
    from .config import load_config
    from .train import Trainer

    tune_allocator()
    cfg = load_config(args.config, args.overrides)
    resume, overwrite = restart_resume(cfg.train.out_dir, args.resume, args.overwrite)
    trainer = Trainer(cfg, resume=resume, overwrite=overwrite)
    trainer.run()
    dist_utils.shutdown_and_exit()
    return 0


def restart_resume(out_dir: str, resume: str | None, overwrite: bool) -> tuple[str | None, bool]:
    """What a worker group that torchrun restarted (``--max-restarts``; TORCHELASTIC_RESTART_COUNT > 0) does: it
    continues from the newest complete checkpoint of its own ``out_dir``, whatever the command line said
    (``--overwrite`` would delete the run so far, ``--resume PATH`` would go back to where the job began). With no
    checkpoint written yet it starts as the first attempt did."""
    from .checkpoint import latest_checkpoint

    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    newest = latest_checkpoint(out_dir) if restart > 0 else None
    if newest is None:
        return resume, overwrite
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"nanogrow: torchrun restart {restart}: continuing from the newest complete checkpoint, {newest}",
              file=sys.stderr)
    return "auto", False


def parse_shape(text: str) -> dict:
    """``"n_layer=8,d_model=256"`` -> {"n_layer": 8, "d_model": 256}; names must be ModelConfig fields."""

    from .model import ModelConfig

    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in ModelConfig.field_names():
            raise ValueError(f"--to {text!r}: {item!r} is not FIELD=VALUE with FIELD one of "
                             f"{', '.join(ModelConfig.field_names())}")
        try:
            out[key] = json.loads(value.lower() if value.lower() in ("true", "false") else value)
        except json.JSONDecodeError:
            raise ValueError(f"--to {text!r}: {value!r} is not a number or true/false") from None
    return out


def cmd_grow(args) -> int:

    from .offline import grow_checkpoint

    options = json.loads(args.options) if args.options else {}
    grow_checkpoint(args.checkpoint, parse_shape(args.to), args.op, args.out, options=options,
                    policy=args.optimizer, seed=args.seed)
    return 0


def cmd_consolidate(args) -> int:
    from .offline import consolidate

    consolidate(args.checkpoint, args.out)
    return 0


def cmd_sample(args) -> int:
    from .sample import sample

    out = sample(args.checkpoint, args.prompt or "", max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k or None, seed=args.seed, num_samples=args.num_samples, device=args.device,
                 tokenizer=args.tokenizer)
    for i, text in enumerate(out.texts):
        if i:
            print("-" * 40)
        print(text)
    rate = out.new_tokens / out.seconds
    print(f"{out.checkpoint}: {out.new_tokens} new tokens ({len(out.texts)} x up to {args.max_new_tokens}) in "
          f"{out.seconds:.2f} s, {rate:,.{0 if rate >= 10 else 1}f} tokens/s on {out.device}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate, report

    print(report(evaluate(args.checkpoint, args.data, split=args.split, batches=args.batches,
                          batch_size=args.batch_size, device=args.device, tokenizer=args.tokenizer), args.json))
    return 0


def cmd_bench(args) -> int:
    from . import bench, dist_utils
    from .config import load_config

    if args.what == "gpu":  # one GPU, ~8 minutes, one table (on a machine without CUDA: says so, exit 0)
        from .gpu_check import gpu_check
        return gpu_check()
    if args.what == "grow":  # under torchrun: one growth event of a sharded model, time and memory

        from .parallel import bench_grow
        if args.backend != "none" and int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise ValueError(f"nanogrow bench grow --backend {args.backend} measures a sharded growth event: launch "
                             f"it under torchrun with 2 or more processes (torchrun --standalone --nproc_per_node=2 "
                             f"-m nanogrow.cli bench grow), or use --backend none")
        bench_grow(backend=args.backend, steps=args.steps, zero_stages=[int(s) for s in args.zero_stages.split(",")])
        dist_utils.shutdown_and_exit()
        return 0
    if args.what == "study":
        from .handbook.bench import DEFAULT_STUDY, bench_study
        bench_study(args.study or [str(DEFAULT_STUDY)], modes=args.modes.split(","), rounds=args.rounds,
                    jobs=args.jobs, out_json=args.out)
        return 0
    tune_allocator()  # (bench grow, above, sets the allocator itself: default for its times, exact RSS)
    cfg = load_config(args.config, args.overrides)
    if args.what == "throughput":
        bench.throughput(cfg, warmup=args.warmup, steps=args.steps)
    elif args.what == "speedup" and args.ops:
        bench.speedup_ops(cfg, ops=args.ops.split(","), seeds=[int(s) for s in args.seeds.split(",")],
                          out_dir=args.out, png=args.png, budget=args.budget)
    elif args.what == "speedup" and args.against:  # compound growth against a depth-only schedule
        bench.speedup_compound(cfg, load_config(args.against, args.overrides), out_dir=args.out, png=args.png,
                               seeds=[int(s) for s in args.seeds.split(",")])
    elif args.what == "speedup":
        bench.speedup(cfg, variants=args.variants.split(","), seeds=[int(s) for s in args.seeds.split(",")],
                      out_dir=args.out, png=args.png, budget=args.budget)
    elif args.what == "stages":
        bench.stages(cfg, static_steps=args.steps)
    elif args.what == "optimizer":
        modes = args.modes.split(",") if args.modes else bench.OPTIMIZER_MODES
        bad = [m for m in modes if m not in bench.OPTIMIZER_MODES]
        if bad:
            raise ValueError(f"nanogrow bench optimizer --modes: unknown mode(s) {', '.join(bad)}; "
                             f"choose from {', '.join(bench.OPTIMIZER_MODES)}")
        bench.optimizer_step(cfg.model, modes=modes, rounds=args.rounds, steps=args.steps)
    elif args.what == "lag":
        out = args.out or cfg.train.out_dir
        os.makedirs(out, exist_ok=True)
        bench.lag(cfg, out_json=f"{out}/lag.json", png_prefix=f"{out}/lag",
                  ks=[int(k) for k in args.ks.split(",")] if args.ks else None)
    return 0


def _report_after_run(args, report) -> None:
    """After ``handbook run``: regenerate HANDBOOK.md from every store (tens of seconds: all tables, fits and plots),
    unless this was a dry run or ``--no-report`` asked to leave it to one ``handbook report`` after several runs."""
    if args.dry_run:
        return
    if args.no_report:
        print("HANDBOOK.md not regenerated (--no-report): `nanogrow handbook report` writes it from the stores")
        return
    report.write_handbook(log=print)


def cmd_handbook(args) -> int:
    """Studies that answer the Handbook's questions: run what is missing, report, list."""
    from .handbook import frontier, report, runner
    from .handbook.study import budget_check, load_study, studies_in

    paths = args.study or []
    if len(paths) > 1 and args.action != "run":
        raise ValueError(f"handbook {args.action} takes one study file; several are for `run`")
    if args.action == "run" and len(paths) > 1:
        if args.retime or args.arms or args.seeds:
            raise ValueError("with several study files, --retime, --arms and --seeds do not apply (run one study)")
        studies = [load_study(p) for p in paths]
        runner.run_studies([runner.compiled(s) for s in studies] if args.compile else studies, jobs=args.jobs,
                           dry_run=args.dry_run)
        _report_after_run(args, report)
        return 0
    args.study = paths[0] if paths else None
    if args.action == "predict":
        from .handbook import regime
        if not args.study:
            raise ValueError("handbook predict needs the study file to predict, e.g. "
                             "configs/handbook/regime-4x64-t32.toml")
        regime.predict(load_study(args.study), studies_in())
        return 0
    if args.action == "report" and not args.study:  # the whole Handbook, from the stores
        report.write_handbook(log=print)
        return 0
    if args.action in ("run", "report") and args.study and frontier.is_frontier_file(args.study):
        fr = frontier.load_frontier(args.study)
        if args.action == "report":
            from .handbook.frontier_report import frontier_markdown
            print(frontier_markdown(fr, plots=False))
            return 0
        if args.retime or args.arms or args.seeds:
            raise ValueError(f"{args.study} is a frontier file: --retime, --arms and --seeds do not apply "
                             f"(its sizes, budgets and seeds are in the file)")
        frontier.run_frontier(runner.compiled(fr) if args.compile else fr, dry_run=args.dry_run, jobs=args.jobs)
        _report_after_run(args, report)
        return 0
    if args.action == "run":
        study = load_study(args.study)
        study = runner.compiled(study) if args.compile else study
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        if args.retime and args.jobs != 1:
            raise ValueError("--retime trains one run at a time (it is for clean wall-clock seconds): drop --jobs")
        if args.retime:
            for arm in args.retime.split(","):
                runner.retime(study, arm, seeds=seeds)
        else:
            runner.run_study(study, seeds=seeds, arms=args.arms.split(",") if args.arms else None,
                             dry_run=args.dry_run, jobs=args.jobs)
        _report_after_run(args, report)
    elif args.action == "report":
        print(report.study_markdown(load_study(args.study), plots=False))
        report.write_handbook(log=print)
    elif args.action == "list":
        for fr in frontier.frontiers_in():
            print(frontier.completeness(fr))
        for study in studies_in():
            print(report.completeness(study))
            if args.verbose:
                print("  " + "\n  ".join(budget_check(study)))
    return 0


def cmd_lag(args) -> int:
    """A LAG selection alone: train (or resume) up to the next stage that has ``lag``, select, save, stop."""
    from . import dist_utils
    from .config import load_config, validate
    from .train import Trainer

    cfg = load_config(args.config, args.overrides)
    if args.groups is not None:  # every LAG stage trains its candidates on this many process groups at once
        for st in cfg.stage:
            if st.lag:
                st.lag = dict(st.lag, groups=args.groups)
        validate(cfg)
    trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    if not any(st.lag for st in trainer.growth.stages[trainer.stage_index:]):
        raise ValueError(f"{args.config}: no [[stage]] with lag = {{...}} left to run")
    if trainer.train_until_growth(lambda event: "lag" in event) is None:
        raise ValueError(f"{args.config}: train.max_steps={trainer.max_steps} is reached before the next "
                         f"[[stage]] with lag = {{...}}")
    dist_utils.shutdown_and_exit()  # under torchrun: leave the process group cleanly
    return 0


def cmd_lag_report(args) -> int:

    from .checkpoint import latest_checkpoint, read_meta
    from .lag import Candidate, report

    run = Path(args.run_dir)
    if (run / "lag.json").is_file():  # written by `nanogrow bench lag`: candidates trained to the end
        report(json.loads((run / "lag.json").read_text()), png_prefix=str(run / "lag-report"))
        return 0
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"{run}: neither lag.json nor a checkpoint with a growth history")
    events = [h for h in read_meta(ckpt)["history"] if h["event"] == "grow" and "lag" in h]
    if not events:
        print(f"{ckpt}: no LAG selection in the growth history")
    for ev in events:  # a training run: candidates trained k steps only, so no final-loss analysis
        rec = ev["lag"]
        print(f"stage {ev['stage']} at step {ev['step']}: {len(rec['curves'])} candidates x {rec['steps']} steps")
        for i, (c, curve) in enumerate(zip(rec["candidates"], rec["curves"])):
            mark = " <- picked" if i == rec["winner"] else ""
            print(f"  {Candidate(c['op'], c.get('options', {})).name():<40} {curve[-1]:.4f}{mark}")
    return 0


def cmd_plot(args) -> int:
    from .plot import have_matplotlib, plot_runs

    if not have_matplotlib():
        raise ValueError("nanogrow plot needs matplotlib, which is not installed (pip install matplotlib; a source "
                         "checkout's launch/setup.sh installs it)")
    out = args.out or (f"{args.run_dirs[0]}/loss.png" if len(args.run_dirs) == 1 else "loss.png")
    print(f"wrote {plot_runs(args.run_dirs, out, labels=args.labels.split(',') if args.labels else None)}")
    return 0


def cmd_configs(args) -> int:
    from .config import bundled_config_dir, bundled_configs

    configs = bundled_configs()
    if args.name:
        from .config import resolve_config
        print(resolve_config(args.name).read_text(), end="")
        return 0
    print(f"bundled configs ({bundled_config_dir()}); use the name: nanogrow train --config NAME")
    for name, path in configs.items():
        first = next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        print(f"  {name:<28} {first[:90]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # One line at a time even when stdout is a file (SLURM --output, nohup, > log), where Python would otherwise
    # hold back the output in a block buffer for minutes.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    if argv and argv[0] == "prep":  # data preparation owns its own arguments
        from .data_prep.prepare import main as prep_main
        return prep_main(argv[1:])
    if argv and argv[0] in ("export-hf", "import-hf"):  # so do the transformers converters
        from . import hf
        return (hf.export_main if argv[0] == "export-hf" else hf.import_main)(argv[1:])

    parser = argparse.ArgumentParser(prog="nanogrow", description="Pretrain decoder LLMs that grow while they train.",
                                     formatter_class=HELP)
    parser.add_argument("--version", action="version", version=f"nanogrow {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def verb(name: str, text: str, **kw) -> argparse.ArgumentParser:
        """A sub-command whose help line and description say what it does, options listed with defaults."""
        return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".", formatter_class=HELP,
                              **kw)

    verb("prep", "tokenize text into shards (nanogrow prep --help)")
    verb("export-hf", "write a checkpoint as a transformers Llama model (nanogrow export-hf --help)")
    verb("import-hf", "turn a local Llama checkpoint into a nanogrow one (nanogrow import-hf --help)")

    p = verb("train", "train (and grow) a model", epilog="Config keys: `nanogrow config --show` lists every key with "
             "its default and meaning; bundled configs: `nanogrow configs`.")
    _config_args(p)
    p.add_argument("--resume", help="'auto' (latest checkpoint in train.out_dir, if any) or a checkpoint path")
    p.add_argument("--overwrite", action="store_true", help="start afresh in a train.out_dir that holds an earlier "
                                                            "run's checkpoints, deleting them first")
    p.set_defaults(func=cmd_train)

    p = verb("config", "print the resolved config of --config and --set, or every key with its default (--show)")
    _config_args(p)
    p.add_argument("--show", action="store_true", help="every config key, its default and what it means")
    p.set_defaults(func=cmd_config)

    p = verb("grow", "grow a saved checkpoint offline (weights and optimizer state)")
    p.add_argument("checkpoint", help="a checkpoint directory (ckpt_XXXXXXX)")
    p.add_argument("--to", required=True, metavar="SHAPE", help="new shape fields, e.g. n_layer=8,d_ff=1024")
    p.add_argument("--op", required=True, help=f"growth operator: {', '.join(_operators())}")
    p.add_argument("--options", help='operator options as JSON, e.g. \'{"fade_steps": 50}\'')
    p.add_argument("--optimizer", default="map+age", choices=["reset", "map", "map+age"],
                   help="what happens to Adam's moments")
    p.add_argument("--seed", type=int, default=0, help="randomness of fresh pieces")
    p.add_argument("--out", required=True, help="directory to write the grown checkpoint into")
    p.set_defaults(func=cmd_grow)

    p = verb("consolidate", "write a weights-only checkpoint (fresh optimizer, same data position and history) of "
                            "a DeepSpeed ZeRO checkpoint, to restart at another world size or backend")
    p.add_argument("checkpoint", help="a checkpoint directory (ckpt_XXXXXXX)")
    p.add_argument("--out", required=True, help="directory to write the consolidated checkpoint into")
    p.set_defaults(func=cmd_consolidate)

    def model_args(p: argparse.ArgumentParser) -> None:  # sample and eval: which model, on what, which tokenizer
        p.add_argument("checkpoint", metavar="CKPT_OR_RUN_DIR",
                       help="a checkpoint directory (ckpt_XXXXXXX), or a run directory (its newest checkpoint)")
        p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if this torch has a GPU, else cpu)")
        p.add_argument("--tokenizer", help="tokenizer.json (or a directory holding one); default: the run's "
                                           "data.dir/tokenizer.json")

    p = verb("sample", "generate text from a trained (grown) model with its run's tokenizer",
             epilog="The prompt is preceded by the token that opens every training document (eot); a sample ends "
                    "at the next one or after --max-new-tokens. Text goes to stdout, the timing to stderr.")
    model_args(p)
    p.add_argument("--prompt", help="text to continue (default: none, a fresh document)")
    p.add_argument("--max-new-tokens", type=int, default=100, metavar="N", help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="softmax temperature; 0: greedy")
    p.add_argument("--top-k", type=int, default=200, metavar="K", help="draw among the K likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="the same seed gives the same samples")
    p.add_argument("--num-samples", type=int, default=1, metavar="M", help="samples, drawn together in one batch")
    p.set_defaults(func=cmd_sample)

    p = verb("eval", "loss, perplexity and bits per byte of a trained (grown) model on a data directory's split",
             epilog="Windows are the trainer's validation windows at the run's validation length and batch size; "
                    "the data must be tokenized by the run's tokenizer.")
    model_args(p)
    p.add_argument("--data", required=True, metavar="DIR", help="a prepared data directory (nanogrow prep)")
    p.add_argument("--split", default="val", help="val or test")
    p.add_argument("--batches", type=int, metavar="N", help="evaluate the first N batches (default: every whole "
                                                             "batch of the split)")
    p.add_argument("--batch-size", type=int, metavar="B", help="sequences per batch (default: the run's "
                                                                "train.eval_batch_size)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_eval)

    p = verb("lag", "train up to the next LAG stage, select its operator, save and stop")
    _config_args(p)
    p.add_argument("--resume", help="'auto' or a checkpoint path to start from")
    p.add_argument("--overwrite", action="store_true", help="start afresh, deleting train.out_dir's checkpoints")
    p.add_argument("--groups", type=int, help="process groups training candidates at the same time (sets "
                                               "lag.groups of every LAG stage; must divide the world size)")
    p.set_defaults(func=cmd_lag)

    p = verb("lag-report", "print the correlations, recall and regret of a LAG selection")
    p.add_argument("run_dir", help="a run directory (train.out_dir) or a bench lag output directory")
    p.set_defaults(func=cmd_lag_report)

    p = verb("handbook", "run, report, list or predict the studies behind HANDBOOK.md")
    p.add_argument("action", choices=["run", "report", "list", "predict"],
                   help="run STUDY [STUDY ...] | report (writes HANDBOOK.md) or report STUDY (prints its section) | "
                        "list | predict STUDY (part 3's growth law, written before the study runs)")
    p.add_argument("study", nargs="*", help="a study file, e.g. configs/handbook/growth-time.toml (run: several "
                                            "share one pool of --jobs workers)")
    p.add_argument("--seeds", help="run: these seeds instead of the study's, e.g. 0,1,2")
    p.add_argument("--arms", help="run: only these arms (comma-separated; the reference's lr grid always runs)")
    p.add_argument("--dry-run", action="store_true", help="run: list the runs that are missing, run nothing")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run: train a phase's runs (the lr grid, then the rest) in N worker processes, each pinned "
                        "to a core of its own, 1 torch thread each; at most the cores this process may use")
    p.add_argument("--compile", action="store_true",
                   help="run: train under torch.compile (inductor; each worker compiles a shape once). The runs "
                        "keep their keys (same configs; losses differ from eager by amplified rounding: compile a "
                        "study whole, it warns on a mix); records say which ran how")
    p.add_argument("--retime", metavar="ARMS", help="run: train these arms (tuned lr, budget x1) again and replace "
                                                     "their records everywhere: for runs timed on a loaded machine")
    p.add_argument("--no-report", action="store_true",
                   help="run: leave HANDBOOK.md as it is (regenerating it reads every store and redraws every plot, "
                        "tens of seconds; `nanogrow handbook report` does it once after several runs)")
    p.add_argument("--verbose", "-v", action="store_true", help="list: each arm's steps, growth step and budget")
    p.set_defaults(func=cmd_handbook)

    p = verb("plot", "draw loss against FLOPs and tokens of one or more runs, growth events marked (PNG)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (train.out_dir) with metrics.jsonl")
    p.add_argument("--out", help="the PNG to write (default: RUN_DIR/loss.png for one run, ./loss.png for several)")
    p.add_argument("--labels", help="comma-separated legend labels (default: the directories' names)")
    p.set_defaults(func=cmd_plot)

    p = verb("configs", "list the bundled configs (usable by name: --config demo), or print one")
    p.add_argument("name", nargs="?", help="print this bundled config, e.g. demo")
    p.set_defaults(func=cmd_configs)

    p = verb("bench", "run benchmarks that print numbers (nanogrow bench WHAT --help)")
    what = p.add_subparsers(dest="what", required=True, metavar="WHAT")

    def bench(name: str, text: str, config: bool = True) -> argparse.ArgumentParser:
        b = what.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".", formatter_class=HELP)
        if config:
            _config_args(b)
        b.set_defaults(func=cmd_bench)
        return b

    b = bench("throughput", "tokens/s, MFU and peak memory of a config")
    b.add_argument("--warmup", type=int, default=3, help="steps before timing")
    b.add_argument("--steps", type=int, default=10, help="timed steps")
    b = bench("speedup", "scratch vs grown to the same loss (or growth operators, or two schedules) on a few seeds")
    b.add_argument("--variants", default="map+age,reset", help="optimizer transfer policies to compare")
    b.add_argument("--seeds", default="0,1,2", help="seeds (init and data order)")
    b.add_argument("--out", default="runs/bench", help="where the runs write")
    b.add_argument("--budget", default="flops", choices=["flops", "steps"],
                   help="the grown run spends the scratch run's FLOPs, or trains as many steps")
    b.add_argument("--png", default="runs/bench/speedup.png", help="loss-vs-FLOPs plot")
    b.add_argument("--ops", help="compare growth operators instead of policies, e.g. stack,learned (FLOPs to "
                                 "scratch's final loss, map fitting included)")
    b.add_argument("--against", metavar="CONFIG",
                   help="compare --config (e.g. compound growth: depth + width + seq_len) with this schedule (e.g. "
                        "depth-only) ending in the same shape, at the same FLOPs budget")
    b = bench("stages", "tokens/s per growth stage vs the same shape trained static")
    b.add_argument("--steps", type=int, default=10, help="timed steps per stage")
    b = bench("optimizer", "time of one AdamW step at the config's model shape: ours (with and without ages, mixed "
                           "ages, lr scales) against torch's foreach and fused AdamW, alternated")
    b.add_argument("--modes", help="comma-separated modes to time, ratios to the first (default: all, "
                                    "torch-foreach first; nanogrow.bench.OPTIMIZER_MODES)")
    b.add_argument("--rounds", type=int, default=5, help="alternated rounds (the median per-round ratio is reported)")
    b.add_argument("--steps", type=int, default=5, help="timed steps per mode per round (median)")
    b = bench("lag", "LAG@k regret and the correlation phase transition (every candidate trained to the end)")
    b.add_argument("--ks", help="LAG@k steps to report, e.g. 5,10,20 (default: the config's)")
    b.add_argument("--out", help="directory for lag.json and the plots (default: the config's train.out_dir)")
    b = bench("study", "Handbook runs per hour of fixed studies, trained from empty stores each way (one process on "
                       "every core; one pinned worker per core; the same with torch.compile), alternated", config=False)
    b.add_argument("--study", action="append", metavar="FILE",
                   help="a study file (repeatable; default: configs/handbook/ladder-4x48.toml, 21 runs)")
    b.add_argument("--modes", default="serial,jobs", help="comma-separated, ratios to the first: serial, jobs, compile")
    b.add_argument("--rounds", type=int, default=2, help="alternated rounds (odd rounds run the modes in reverse)")
    b.add_argument("--jobs", type=int, help="cores to use (default: every core this process may use)")
    b.add_argument("--out", help="write the numbers and every run's record here (JSON)")
    b = bench("grow", "time, step time and memory of one sharded growth event (under torchrun, 2+ processes)",
              config=False)
    b.add_argument("--backend", default="fsdp", choices=["none", "ddp", "fsdp", "deepspeed"], help="parallel backend")
    b.add_argument("--steps", type=int, default=10, help="timed steps before and after the growth")
    b.add_argument("--zero-stages", default="1,2,3", help="with --backend deepspeed: ZeRO stages to measure")
    bench("gpu", "the one-GPU check: kernels, bf16 training, growth under FSDP2 (launch/gpu_check.sh)", config=False)

    for name in ("train", "lag", "grow", "consolidate", "sample", "eval"):  # the commands that open checkpoints
        sub.choices[name].add_argument(
            "--trust-checkpoint", action="store_true",
            help="open a DeepSpeed checkpoint whose signature does not verify under this host's key (one written "
                 "elsewhere): DeepSpeed unpickles its files, which runs any code they hold")
    args = parser.parse_args(argv)
    if getattr(args, "trust_checkpoint", False):  # read where the checkpoint is opened, on every rank
        from .integrity import TRUST_ENV
        os.environ[TRUST_ENV] = "1"
    return run_reporting_errors("nanogrow", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
