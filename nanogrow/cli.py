"""``nanogrow`` command line: prep, train, bench."""

from __future__ import annotations

import argparse
import sys


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="TOML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=100 (repeatable)")


def cmd_train(args) -> int:
    from .config import load_config
    from .train import Trainer
    from . import dist_utils

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg, resume=args.resume)
    trainer.run()
    dist_utils.shutdown()
    return 0


def cmd_bench(args) -> int:
    from .config import load_config
    from . import bench

    cfg = load_config(args.config, args.overrides)
    if args.what == "throughput":
        bench.throughput(cfg, warmup=args.warmup, steps=args.steps)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "prep":  # data preparation owns its own arguments
        from data_prep.prepare import main as prep_main
        return prep_main(argv[1:])

    parser = argparse.ArgumentParser(prog="nanogrow", description="Pretrain decoder LLMs that grow while they train.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prep", help="tokenize text into shards (nanogrow prep --help)")

    p = sub.add_parser("train", help="train (and grow) a model")
    _config_args(p)
    p.add_argument("--resume", help="'auto' (latest checkpoint in train.out_dir, if any) or a checkpoint path")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="benchmarks that print numbers")
    p.add_argument("what", choices=["throughput"])
    _config_args(p)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # config / data / checkpoint errors: one clear line, no trace
        if type(e).__name__ in ("ConfigError", "CheckpointError", "DataError", "FileNotFoundError"):
            print(f"nanogrow: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
