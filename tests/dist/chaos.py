"""Chaos harness for multi-process runs (issue 30): SIGKILL one rank of a 2-process run at a random point, let
torchrun restart the worker group (``--max-restarts=1``), and check that the restarted run, resuming by itself
(no ``--resume`` on the command line: a restarted group continues from the newest complete checkpoint, or starts
afresh when none is complete yet), ends with the weights, optimizer state and data position of an uninterrupted
run, bit for bit (same world size).

The run: a 1-layer model grown to 2 layers at step 4 and to 4 at step 8 (G_stack), 12 steps, a checkpoint every 3
steps and at each growth (saves at 3, 4, 6, 8, 9, 12), ``keep_last = 2``; FSDP2 (growth.optimizer map+age) or
DeepSpeed ZeRO-2 (map). Kill points, each on a chosen rank (the rank-0-only phases on rank 0):

* ``step K``: as the trainer begins step K+1 (between optimizer steps);
* ``grow I``: inside growth event I, after the model and optimizer state are grown, before its checkpoint;
* ``save N PHASE``: during the N-th save of the run, at PHASE: ``write`` (before this rank writes any tensor),
  ``tensors`` (after its tensors, before its RNG file), ``meta`` (rank 0, every rank's files written, before
  meta.json), ``rename`` (rank 0, meta.json written, before the rename), ``rotate`` (rank 0, renamed, before the
  oldest checkpoint is deleted), ``after`` (the save complete on this rank).

Run alone (prints one line per trial and a summary; exit 1 on any failure):
    python tests/dist/chaos.py --backend fsdp --seed 0 --trials 20
``tests/test_chaos.py`` keeps a few fixed points in the test suite. As a worker (``worker`` argument), the script
installs the kill named by NANOGROW_CHAOS on the first attempt only (TORCHELASTIC_RESTART_COUNT = 0) and runs
``nanogrow.cli.main``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS, GROW_AT, SAVES = 12, (4, 8), 6  # saves at steps 3, 4, 6, 8, 9, 12
BACKENDS = {"fsdp": ('parallel = "fsdp"', 'optimizer = "map+age"'),
            "zero2": ('parallel = "deepspeed"\nzero_stage = 2', 'optimizer = "map"')}


def config_toml(backend: str, data: Path, out: Path) -> str:
    from helpers import tiny_model_toml  # tests/helpers.py: the torchrun tests' [model] and [data] tables

    parallel, optimizer = BACKENDS[backend]
    return tiny_model_toml(n_layer=1).format(data=data) + f"""
[train]
out_dir = "{out}"
{parallel}
micro_batch = 2
max_steps = {STEPS}
warmup_steps = 2
lr = 0.01
eval_every = 0
eval_batches = 1
log_every = 1000
ckpt_every = 3
keep_last = 2
plot = false

[growth]
{optimizer}
lr_policy = "rewarm"
rewarm_steps = 2

[[stage]]
at_step = {GROW_AT[0]}
shape = {{ n_layer = 2 }}

[[stage]]
at_step = {GROW_AT[1]}
shape = {{ n_layer = 4 }}
"""


def kill_points() -> list[str]:
    """Every kill point of the run, as 'KIND ARGS@RANK'."""
    points = [f"step {k}@{r}" for k in range(1, STEPS) if k not in GROW_AT for r in (0, 1)]
    points += [f"grow {i}@{r}" for i in (1, 2) for r in (0, 1)]
    for n in range(1, SAVES + 1):
        points += [f"save {n} {phase}@{r}" for phase in ("write", "tensors", "after") for r in (0, 1)]
        points += [f"save {n} {phase}@0" for phase in ("meta", "rename")]
        if n >= 3:  # keep_last = 2: the third save is the first to delete one
            points.append(f"save {n} rotate@0")
    return points


# ---- the worker side: install one kill, then run nanogrow ------------------------------------------------------
def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    """Patch nanogrow so that this process SIGKILLs itself at ``point`` (when it is this rank's)."""
    what, rank = point.rsplit("@", 1)
    if int(os.environ.get("RANK", "0")) != int(rank):
        return
    kind, *args = what.split()
    from nanogrow import backend, checkpoint, train

    if kind == "step":
        real_advance = train.Trainer.advance

        def advance(self, *a, **k):
            if self.step == int(args[0]):
                _die()
            return real_advance(self, *a, **k)
        train.Trainer.advance = advance
    elif kind == "grow":
        grown = {"n": 0}
        for cls in (backend.TorchBackend, backend.ZeroBackend):
            def grow(self, *a, _real=cls.grow, **k):
                out = _real(self, *a, **k)
                grown["n"] += 1
                if grown["n"] == int(args[0]):
                    _die()
                return out
            cls.grow = grow
    elif kind == "save":
        nth, phase = int(args[0]), args[1]
        saves = {"n": 0}
        real_atomic = checkpoint.atomic_save

        def here(p: str) -> None:
            if saves["n"] == nth and phase == p:
                _die()

        def atomic_save(out_dir, step, write, meta, keep_last=2):
            saves["n"] += 1

            def write_then(tmp):
                here("write")
                write(tmp)
                here("tensors")
            path = real_atomic(out_dir, step, write_then, meta, keep_last)
            here("after")
            return path
        checkpoint.atomic_save = backend.atomic_save = atomic_save
        real_write_text, real_replace, real_rmtree = Path.write_text, os.replace, shutil.rmtree

        def write_text(self, *a, **k):
            if self.name == "meta.json" and self.parent.name.endswith(".tmp"):
                here("meta")
            return real_write_text(self, *a, **k)

        def replace(src, dst, *a, **k):
            if str(src).endswith(".tmp"):
                here("rename")
            return real_replace(src, dst, *a, **k)

        def rmtree(path, *a, **k):
            if checkpoint.CKPT_RE.match(Path(path).name):
                here("rotate")
            return real_rmtree(path, *a, **k)
        Path.write_text, os.replace, shutil.rmtree = write_text, replace, rmtree
    else:
        raise SystemExit(f"chaos: unknown kill point {point!r}")


def worker_main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    if os.environ.get("NANOGROW_CHAOS") and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        install(os.environ["NANOGROW_CHAOS"])
    from nanogrow.cli import main
    return main(argv)


# ---- the harness side ----------------------------------------------------------------------------------------
def torchrun(config: Path, point: str | None, log: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", NANOGROW_DIST_TIMEOUT="60")
    env.pop("NANOGROW_CHAOS", None)
    # DeepSpeed compiles a communication extension on its first start (~45 s): keep it where the tests keep it.
    # As launch/_common.sh sets it: without it the restarted group reads the killed group's addresses from the
    # rendezvous store it shares and fails to connect (pytorch/pytorch#135712; seen here with gloo).
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "nanogrow" / "ext"))
    if point:
        env["NANOGROW_CHAOS"] = point
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", "--monitor-interval=0.5", __file__, "worker", "train", "--config", str(config)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    log.write_text(proc.stdout + proc.stderr)
    return proc


def final_state(out: Path) -> dict:
    """Everything the final checkpoint holds that must match: tensors by name (weights, moments, ages, or
    DeepSpeed's partitions), the data position, step and token count."""
    import torch

    from nanogrow.checkpoint import DEEPSPEED_TAG, latest_checkpoint, read_meta

    ckpt = latest_checkpoint(out)
    meta = read_meta(ckpt)
    tensors: dict[str, torch.Tensor] = {}
    if meta.get("format") == "deepspeed":
        def walk(prefix, obj):
            if isinstance(obj, torch.Tensor):
                tensors[prefix] = obj
            elif isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}/{k}", v)
            elif isinstance(obj, (list, tuple)):
                for i, v in enumerate(obj):
                    walk(f"{prefix}/{i}", v)
        for f in sorted((ckpt / DEEPSPEED_TAG).glob("*.pt")):
            walk(f.name, torch.load(f, map_location="cpu", weights_only=False))  # our own files (the harness's)
    else:
        from nanogrow.offline import load_model

        model, optimizer, _ = load_model(ckpt, with_optimizer=True)
        tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
        names = {p: n for n, p in model.named_parameters()}
        for p, st in optimizer.state.items():
            tensors.update({f"optim/{names[p]}/{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
    return {"step": meta["step"], "tokens": meta["meter"]["total_tokens"], "loader": meta["loader"],
            "shape": meta["model_config"]["n_layer"], "tensors": tensors}


def differences(a: dict, b: dict) -> list[str]:
    import torch

    out = [f"{k}: {a[k]} != {b[k]}" for k in ("step", "tokens", "loader", "shape") if a[k] != b[k]]
    if a["tensors"].keys() != b["tensors"].keys():
        out.append(f"tensor names differ: {sorted(a['tensors'].keys() ^ b['tensors'].keys())[:4]}")
    out += [f"{k} differs (max |diff| {(a['tensors'][k].float() - b['tensors'][k].float()).abs().max():.3g})"
            for k in sorted(a["tensors"].keys() & b["tensors"].keys())
            if not torch.equal(a["tensors"][k], b["tensors"][k])]
    return out


def trial(backend: str, data: Path, work: Path, point: str | None, timeout: float = 300) -> dict:
    """One run (``point`` None: the uninterrupted reference) in ``work/NAME``; returns what the harness checks."""
    name = "reference" if point is None else point.replace(" ", "-").replace("@", "-r")
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = out / "run.toml"
    config.write_text(config_toml(backend, data, out / "run"))
    t0 = time.perf_counter()
    proc = torchrun(config, point, out / "torchrun.log", timeout)
    text = proc.stdout + proc.stderr
    resumed = [line.split("resumed from ", 1)[1].split()[0] for line in text.splitlines() if "resumed from " in line]
    return {"point": point, "rc": proc.returncode, "seconds": time.perf_counter() - t0, "out": out / "run",
            "killed": "failed (exitcode: -9)" in text,  # torchrun's line for a worker that died of SIGKILL
            "resumed_from": resumed[-1] if resumed else None, "log": out / "torchrun.log"}


def prepare_data(where: Path) -> Path:
    from nanogrow.data_prep.prepare import prepare

    if not (where / "meta.json").exists():
        prepare("demo", where, tokenizer="bpe:512", max_tokens=120_000, val_tokens=8_192, shard_tokens=40_000,
                workers=1, bpe_train_chars=300_000, overwrite=True, log=lambda *_: None)
    return where


def check(result: dict, reference: dict) -> list[str]:
    """What is wrong with a trial, or []."""
    if result["rc"] != 0:
        return [f"exit code {result['rc']} (see {result['log']})"]
    problems = differences(final_state(result["out"]), reference)
    if result["point"] and not result["killed"]:
        problems.append("torchrun reports no worker killed by SIGKILL: the kill point was never reached")
    if result["point"] and (result["resumed_from"] is None) != before_first_checkpoint(result["point"]):
        problems.append(f"resumed from {result['resumed_from']}: a restart must continue from the newest complete "
                        f"checkpoint, and start afresh only when none was complete yet")
    return problems


def before_first_checkpoint(point: str) -> bool:
    """Does the kill at ``point`` come before the run's first checkpoint (step 3) is complete?"""
    kind, *args = point.rsplit("@", 1)[0].split()
    if kind == "step":
        return int(args[0]) < 3
    return kind == "save" and args[0] == "1" and args[1] != "after"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=sorted(BACKENDS), default="fsdp")
    p.add_argument("--seed", type=int, default=0, help="which kill points (and ranks) are drawn")
    p.add_argument("--trials", type=int, default=20, help="kill points drawn without replacement")
    p.add_argument("--points", help="';'-separated kill points instead of drawing (e.g. 'step 5@1;grow 2@0')")
    p.add_argument("--work", type=Path, help="where runs go (default: a temporary directory, removed)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="nanogrow-chaos-"))
    points = (args.points.split(";") if args.points
              else random.Random(args.seed).sample(kill_points(), min(args.trials, len(kill_points()))))
    data = prepare_data(work / "data")
    ref = trial(args.backend, data, work, None)
    if ref["rc"] != 0:
        print(f"the uninterrupted run failed: see {ref['log']}")
        return 1
    reference = final_state(ref["out"])
    print(f"chaos {args.backend}, seed {args.seed}: reference run {ref['seconds']:.0f} s; {len(points)} kill points")
    failed = 0
    for point in points:
        r = trial(args.backend, data, work, point)
        problems = check(r, reference)
        failed += bool(problems)
        print(json.dumps({"point": point, "ok": not problems, "resumed_from": r["resumed_from"],
                          "seconds": round(r["seconds"], 1), "problems": problems}), flush=True)
    print(f"chaos {args.backend}, seed {args.seed}: {len(points) - failed} of {len(points)} kill points resumed "
          f"to the uninterrupted run's final state bit for bit")
    if not (args.keep or args.work):
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.exit(worker_main(sys.argv[2:]))
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    sys.exit(main(sys.argv[1:]))
