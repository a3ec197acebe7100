"""One frontier run outside the frontier's grid, not stored: the frontier file's own run config at (size, budget,
seed, lr), trained by the Handbook runner's ``execute``; prints its val and test losses. For checking a profile's
tuning before re-running it (frontier.md's 1e13 probe:
``python launch/frontier_probe.py 2x48 1e13 2e-3``; one thread, as the studies' workers run)."""

import argparse
import json
import tempfile

import torch

from nanogrow.handbook.frontier import load_frontier
from nanogrow.handbook.runner import execute


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("size")
    p.add_argument("budget", type=float)
    p.add_argument("lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frontier", default="configs/handbook/frontier.toml")
    args = p.parse_args()
    torch.set_num_threads(1)
    fr = load_frontier(args.frontier)
    run = fr.run(args.size, args.budget, args.seed, args.lr)
    run.cfg.train.out_dir = tempfile.mkdtemp(prefix="frontier-probe-")
    rec = execute(fr, run)
    print(json.dumps({k: rec[k] for k in ("arm", "lr", "seed", "steps", "flops", "final_loss", "final_test_loss",
                                          "wall_seconds", "commit")}))


if __name__ == "__main__":
    main()
