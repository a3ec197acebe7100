"""Checkpoints: model and optimizer through torch.distributed.checkpoint (DCP, sharded, reshards on load), plus a
small JSON sidecar (config, current grown shape, step, schedule, data position, growth history) and per-rank RNG
state in safetensors.

Atomicity: everything is written into ``ckpt_XXXXXXX.tmp`` and renamed to ``ckpt_XXXXXXX`` only after every rank
has finished and ``meta.json`` (written last) is in place, so a crash never leaves a directory that looks valid.
Loading never unpickles: DCP tensors, JSON and safetensors only. The exception is a DeepSpeed ZeRO checkpoint
(``meta["format"] == "deepspeed"``, written by ``nanogrow.parallel.zero_trainer``): its tensors are DeepSpeed's own
files (``torch.save``), inside the same atomic directory, next to the same meta.json and rng files.
"""

from __future__ import annotations

import json
import warnings
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import dist_utils
from .parallel.state import placeholder

CKPT_RE = re.compile(r"^ckpt_(\d{7,})$")
META = "meta.json"
FORMAT_VERSION = 1
DEEPSPEED_TAG = "deepspeed"  # the subdirectory (DeepSpeed "tag") holding a ZeRO checkpoint's tensors


def is_deepspeed(meta: dict) -> bool:
    """A checkpoint written by DeepSpeed ZeRO (partitioned optimizer state, tied to its world size)?"""
    return meta.get("format") == "deepspeed"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path and what is wrong."""


def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``out_dir``, oldest first (temporary and incomplete directories are skipped)."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := CKPT_RE.match(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(out_dir)
    return dirs[-1] if dirs else None


def read_meta(path: str | Path) -> dict:
    """Read and check a checkpoint's sidecar; raises CheckpointError naming the path for anything incomplete."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist or is not a directory")
    if not (p / META).is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} is incomplete: no {META} (an interrupted save?)")
    try:
        meta = json.loads((p / META).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {str(p / META)!r} is not valid JSON: {e}") from None
    if is_deepspeed(meta):
        if not (p / DEEPSPEED_TAG).is_dir():
            raise CheckpointError(f"checkpoint {str(p)!r} is incomplete: no DeepSpeed directory {DEEPSPEED_TAG!r}")
    elif not (p / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} is incomplete: no DCP .metadata file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(p)!r} has format_version={meta.get('format_version')!r}, "
                              f"this nanogrow reads {FORMAT_VERSION}")
    for key in ("step", "model_config", "run_config"):
        if key not in meta:
            raise CheckpointError(f"checkpoint {str(p / META)!r} lacks the key {key!r}")
    return meta


def _model_and_optim_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return {"model": get_model_state_dict(model)}
    if hasattr(optimizer, "init_state"):
        optimizer.init_state()  # step-0 state, not DCP's zero-gradient step (which would leave step=1)
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict, keep_last: int = 2) -> Path:
    """Write ``out_dir/ckpt_{step}`` atomically on every rank (a collective); keep the newest ``keep_last``."""
    def write(tmp: Path) -> None:
        with warnings.catch_warnings():  # DCP warns that one process without a process group "assumes" single process
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(_model_and_optim_state(model, optimizer), checkpoint_id=str(tmp))

    return atomic_save(out_dir, step, write, meta, keep_last)


def atomic_save(out_dir: str | Path, step: int, write, meta: dict, keep_last: int = 2) -> Path:
    """The checkpoint protocol shared by every format: ``write(tmp)`` (a collective) puts the tensors into
    ``ckpt_{step}.tmp``; then each rank's RNG state, then meta.json (rank 0, last), then the rename."""
    out = Path(out_dir)
    final = out / f"ckpt_{step:07d}"
    tmp = out / f"ckpt_{step:07d}.tmp"
    rank = dist_utils.rank()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed save of this same step
        tmp.mkdir()
    dist_utils.barrier()
    write(tmp)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    (tmp / "rng").mkdir(exist_ok=True)
    save_file(rng, str(tmp / "rng" / f"rank_{rank:05d}.safetensors"))
    dist_utils.barrier()
    if rank == 0:
        meta = dict(meta, format_version=FORMAT_VERSION, step=step, world_size=dist_utils.world_size())
        (tmp / META).write_text(json.dumps(meta, indent=1))
        if final.exists():  # re-saving the same step (e.g. a growth event at a checkpoint step)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist_utils.barrier()
    return final


def _materialise_missing(state: dict, model: torch.nn.Module, metadata) -> None:
    """Create destination tensors for entries the checkpoint has but a freshly built model/optimizer lacks:
    growth masks (buffers that are None until set) and optional optimizer state (per-element ages, lr scales).
    DCP loads only keys present in the destination, so without this they would be silently dropped."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        section, _, rest = key.partition(".")
        if section == "model" and rest not in state["model"]:
            module_name, _, buf = rest.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            if buf not in module._buffers:
                raise CheckpointError(f"checkpoint has tensor {rest!r} that the model does not know")
            like = next(model.parameters())
            setattr(module, buf, torch.zeros(md.size, dtype=md.properties.dtype, device=like.device))
            state["model"][rest] = getattr(module, buf)
        elif section == "optim" and "optim" in state and rest.startswith("state."):
            # key: optim.state.<param fqn>.<state name>
            fqn, _, name = rest[len("state."):].rpartition(".")
            pstate = state["optim"]["state"].get(fqn)
            if pstate is not None and name not in pstate:
                # shaped and sharded like the parameter's first moment (a DTensor under FSDP)
                pstate[name] = placeholder(pstate.get("exp_avg"), md.size, md.properties.dtype)


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    load_rng: bool = True) -> dict:
    """Load model (and optimizer) state in place from a checkpoint written by ``save_checkpoint``; returns meta.
    The model must already have the checkpoint's shape (build it from ``meta['model_config']``).
    A DeepSpeed checkpoint loads here weights only (consolidated from its partitions); its optimizer state
    only loads into a DeepSpeed run at the world size that wrote it."""
    p = Path(path)
    meta = read_meta(p)
    if is_deepspeed(meta):
        if optimizer is not None:
            raise CheckpointError(f"checkpoint {str(p)!r} is a DeepSpeed ZeRO checkpoint: its optimizer state loads "
                                  f"only with train.parallel='deepspeed' at world size {meta.get('world_size')}; "
                                  f"restart from its weights with `nanogrow consolidate {p} --out DIR`")
        from .parallel.zero_trainer import load_consolidated_weights
        load_consolidated_weights(p, model)
    else:
        _load_dcp(p, model, optimizer)
    if load_rng:
        restore_rng(p)
    return meta


def _load_dcp(p: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    state = _model_and_optim_state(model, optimizer)
    reader = dcp.FileSystemReader(str(p))
    _materialise_missing(state, model, reader.read_metadata())
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(p))
    except Exception as e:  # DCP wraps shape mismatches in CheckpointException
        raise CheckpointError(f"checkpoint {str(p)!r} does not fit this model: {e}") from None
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def restore_rng(path: str | Path) -> None:
    """This rank's RNG state as saved (nothing when the checkpoint has none for this rank)."""
    rng_file = Path(path) / "rng" / f"rank_{dist_utils.rank():05d}.safetensors"
    if rng_file.is_file():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
