"""Checkpoints: model and optimizer through torch.distributed.checkpoint (DCP, sharded, reshards on load), plus a
small JSON sidecar (config, current grown shape, step, schedule, data position, growth history, optimizer
hyper-parameters, checksums) and per-rank RNG state in safetensors.

Atomicity: everything is written into ``ckpt_XXXXXXX.tmp`` and renamed to ``ckpt_XXXXXXX`` only after every rank
has finished and ``meta.json`` (written last) is in place, so a crash never leaves a directory that looks valid.

Trust: loading runs no code from the checkpoint. DCP's ``.metadata`` is read by a restricted unpickler and only
tensor entries are loaded (``nanogrow.safe_dcp``); nanogrow writes no pickled byte entries (optimizer
hyper-parameters go to meta.json); JSON and safetensors are data formats. Every file's sha256 is recorded in
meta.json at save and checked before the file is used; meta.json itself is checked against ``META_SCHEMA``.
Nothing non-finite is ever written (``check_finite``), so rotation only ever deletes finite checkpoints older than
a finite one. The exception is a DeepSpeed ZeRO checkpoint (``meta["format"] == "deepspeed"``, written by
``nanogrow.backend.ZeroBackend``): its tensors are DeepSpeed's own files (``torch.save``, unpickled by
DeepSpeed on load), inside the same atomic directory, next to the same meta.json and rng files. Checksums guard
against corruption, not against a crafted checkpoint (anyone can recompute them), so every checkpoint's checksums
are also signed with a key kept outside it (``integrity.sign``, HMAC-SHA256 under ``~/.config/nanogrow/
checkpoint.key`` or NANOGROW_CHECKPOINT_KEY), and a DeepSpeed checkpoint is opened only when its files match and
its signature verifies here, or the user passes ``--trust-checkpoint`` (``check_deepspeed_trusted``).

Disk full or an I/O error during a save: every rank learns of it, the partial ``.tmp`` directory is removed,
nothing is rotated away, and the run stops with ``SaveError`` naming the directory and its free space.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import dist_utils, safe_dcp
from .grow.fade import set_buffer
from .integrity import TRUST_ENV, digest_tree, key_path, mismatch, sign, signed_here
from .model import ModelConfig
from .parallel.state import placeholder

CKPT_RE = re.compile(r"^ckpt_(\d{7,})$")
TMP_RE = re.compile(r"^ckpt_(\d{7,})\.tmp$")
META = "meta.json"
# 2: optimizer hyper-parameters in meta.json (no byte entries), sha256 of every file in meta.json["checksums"].
# 1 (before): still readable; its byte entries are skipped (never unpickled) and it has no checksums to verify.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
DEEPSPEED_TAG = "deepspeed"  # the subdirectory (DeepSpeed "tag") holding a ZeRO checkpoint's tensors


def is_deepspeed(meta: dict) -> bool:
    """A checkpoint written by DeepSpeed ZeRO (partitioned optimizer state, tied to its world size)?"""
    return meta.get("format") == "deepspeed"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path and what is wrong."""


class NonFiniteError(FloatingPointError):
    """Parameters, optimizer state, loss or gradients are NaN/inf; the message names the step or tensor."""


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


def remove_stray_tmp(out_dir: str | Path, log=print) -> None:
    """Delete ``ckpt_*.tmp`` directories left by a save that crashed (never complete, never loaded). Rank 0."""
    out = Path(out_dir)
    for tmp in sorted(out.iterdir()) if out.is_dir() else ():
        if TMP_RE.match(tmp.name) and tmp.is_dir():
            shutil.rmtree(tmp)
            log(f"removed {tmp}: an unfinished checkpoint write (a crash during a save)")


def remove_checkpoints(out_dir: str | Path, log=print) -> None:
    """``--overwrite``: delete every checkpoint in ``out_dir``, deliberately. Rank 0."""
    for d in checkpoint_dirs(out_dir):
        shutil.rmtree(d)
        log(f"--overwrite: removed {d}")


_NONE = type(None)
# meta.json, key -> (allowed types, required). Checked on every read, so a corrupt or hand-edited file fails here
# naming the key, not later as a TypeError or KeyError deep in the trainer. Keys not listed are carried along.
META_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "format_version": ((int,), True), "step": ((int,), True), "world_size": ((int,), True),
    "model_config": ((dict,), True), "run_config": ((dict,), True),
    "checksums": ((dict,), False),  # required from format 2 on (checked below)
    "signature": ((str,), False),  # HMAC of the checksums under the writing host's key (integrity.sign)
    "optim_param_groups": ((list,), False), "format": ((str,), False), "zero_stage": ((int,), False),
    "loader": ((dict, _NONE), False), "meter": ((dict,), False), "history": ((list,), False),
    "stage_index": ((int,), False), "stage_stats": ((list,), False), "growth_lr": ((dict,), False),
    "ramp": ((dict, _NONE), False), "optimizer_ages": ((bool,), False), "trigger": ((dict, _NONE), False),
    "seq_len": ((int,), False), "micro_batch": ((int,), False),
}
_NESTED_SCHEMA = {  # required keys of nested records that code reads by key
    "loader": {"seed": (int,), "fingerprint": (str,), "epoch": (int,), "position_in_epoch": (int,),
               "tokens_consumed": (int,)},
    "meter": {"total_tokens": (int,), "total_flops": (int, float)},
}


def _type_ok(value, types: tuple[type, ...]) -> bool:
    # bool is an int to Python; a JSON true where a number belongs is still a mistake
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _names(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is _NONE else t.__name__ for t in types)


def check_meta_schema(meta, where: str) -> None:
    """Types and required keys of a meta.json (see META_SCHEMA); the error names the file and key."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: expected a JSON object, found {type(meta).__name__}")
    for key, (types, required) in META_SCHEMA.items():
        if key not in meta:
            if required:
                raise CheckpointError(f"{where}: lacks the key {key!r} (expected {_names(types)})")
            continue
        if not _type_ok(meta[key], types):
            raise CheckpointError(f"{where}: key {key!r} should be {_names(types)}, found "
                                  f"{type(meta[key]).__name__} {str(meta[key])[:40]!r}")
    for key, fields in _NESTED_SCHEMA.items():
        record = meta.get(key)
        for name, types in (fields.items() if isinstance(record, dict) else ()):
            if name not in record or not _type_ok(record[name], types):
                found = f"{type(record[name]).__name__}" if name in record else "nothing"
                raise CheckpointError(f"{where}: key {key}.{name} should be {_names(types)}, found {found}")
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for name, value in meta["model_config"].items():
        if name not in defaults:
            raise CheckpointError(f"{where}: model_config.{name} is not a model field "
                                  f"({', '.join(defaults)})")
        want = (int, float) if isinstance(defaults[name], float) else (type(defaults[name]),)
        if not _type_ok(value, want):
            raise CheckpointError(f"{where}: model_config.{name} should be {_names(want)}, found {value!r}")


def read_meta(path: str | Path) -> dict:
    """Read and check a checkpoint's sidecar; raises CheckpointError naming the path for anything incomplete."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist or is not a directory")
    if not (p / META).is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} is incomplete: no {META} (an interrupted save?)")
    try:
        meta = json.loads((p / META).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {str(p / META)!r} is not valid JSON: {e}") from None
    if isinstance(meta, dict) and meta.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"checkpoint {str(p)!r} has format_version={meta.get('format_version')!r}, "
                              f"this nanogrow reads {', '.join(map(str, READABLE_VERSIONS))}")
    check_meta_schema(meta, str(p / META))
    if meta["format_version"] >= 2 and "checksums" not in meta:
        raise CheckpointError(f"checkpoint {str(p / META)!r} lacks the key 'checksums' (format 2 records the "
                              f"sha256 of every file)")
    if is_deepspeed(meta):
        if not (p / DEEPSPEED_TAG).is_dir():
            raise CheckpointError(f"checkpoint {str(p)!r} is incomplete: no DeepSpeed directory {DEEPSPEED_TAG!r}")
    elif not (p / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} is incomplete: no DCP .metadata file")
    return meta


def verify_file(path: str | Path, meta: dict, rel: str) -> None:
    """Check ``path/rel`` against the sha256 recorded in meta.json (format 1 has none: nothing to check)."""
    if meta["format_version"] < 2:
        return
    sums = meta["checksums"]
    if rel not in sums:
        raise CheckpointError(f"checkpoint {str(path)!r}: file {rel!r} has no checksum in {META}; refusing to "
                              f"read a file the save did not write")
    problem = mismatch(Path(path) / rel, sums[rel])
    if problem:
        raise CheckpointError(f"checkpoint file {str(Path(path) / rel)!r} {problem}")


def verify_tree(path: str | Path, meta: dict, under: str) -> None:
    """Check every recorded file below ``under`` (a DeepSpeed checkpoint's directory) and that none is missing."""
    if meta["format_version"] < 2:
        return
    for rel in sorted(r for r in meta["checksums"] if r.startswith(under + "/")):
        verify_file(path, meta, rel)


def check_finite(named_tensors, where: str, device=None) -> None:
    """Raise NonFiniteError naming the first NaN/inf tensor (agreed on by every rank: one flag all-reduced).
    One pass over the tensors, at save time only."""
    bad = None
    for name, t in named_tensors:
        if isinstance(t, torch.Tensor):
            local = t.to_local() if hasattr(t, "to_local") else t
            if local.is_floating_point() and local.numel() and not bool(torch.isfinite(local).all()):
                bad = name
                break
    if dist_utils.is_distributed():
        ok = dist_utils.all_reduce_mean(0.0 if bad else 1.0, device or torch.device("cpu"))
        if ok < 1.0 and bad is None:
            bad = "a tensor on another rank"
    if bad is not None:
        raise NonFiniteError(f"{where}: {bad} holds NaN or inf; refusing to write a non-finite checkpoint")


def _flat(state: dict, prefix: str = ""):
    """(DCP key, tensor) pairs of a nested state dict, keys joined by '.' as DCP flattens them."""
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flat(v, key + ".")
        else:
            yield key, v


def _model_and_optim_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return {"model": get_model_state_dict(model)}
    if hasattr(optimizer, "init_state"):
        optimizer.init_state()  # step-0 state, not DCP's zero-gradient step (which would leave step=1)
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def _param_groups_to_json(groups: list[dict]) -> list[dict]:
    """Optimizer hyper-parameters (lr, betas, eps, weight decay, parameter names) for meta.json: DCP would pickle
    them as byte entries, which loading would have to unpickle."""
    out = []
    for g in groups:
        rec = {}
        for k, v in g.items():
            v = list(v) if isinstance(v, tuple) else v
            if not (v is None or isinstance(v, (bool, int, float, str)) or
                    (isinstance(v, list) and all(isinstance(x, (bool, int, float, str)) for x in v))):
                raise TypeError(f"optimizer param-group value {k}={v!r} is not JSON-able; nanogrow keeps "
                                f"hyper-parameters out of the tensor files")
            rec[k] = v
        out.append(rec)
    return out


def _param_groups_from_json(groups: list[dict]) -> list[dict]:
    # torch optimizers keep sequences of hyper-parameters (betas) as tuples; "params" is a list of names
    return [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()} for g in groups]


def save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict, keep_last: int = 2) -> Path:
    """Write ``out_dir/ckpt_{step}`` atomically on every rank (a collective); keep the newest ``keep_last``."""
    state = _model_and_optim_state(model, optimizer)
    like = next(model.parameters(), torch.empty(0))
    check_finite(_flat(state), f"step {step}", device=like.device)  # before anything is written or rotated
    if "optim" in state:  # tensors go to DCP, hyper-parameters to meta.json: no byte entry is ever written
        meta = dict(meta, optim_param_groups=_param_groups_to_json(state["optim"]["param_groups"]))
        state["optim"] = {"state": state["optim"]["state"]}
    bytes_entries = [k for k, v in _flat(state) if not isinstance(v, torch.Tensor)]
    if bytes_entries:
        raise TypeError(f"refusing to save non-tensor entries {bytes_entries[:4]}: DCP would pickle them")

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():  # DCP warns that one process without a process group "assumes" single process
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=str(tmp))

    return atomic_save(out_dir, step, write, meta, keep_last)


class SaveError(CheckpointError):
    """A checkpoint could not be written (disk full, I/O error); the message names the directory and its free
    space. Nothing of the failed write is kept; the checkpoints before it are untouched."""


def atomic_save(out_dir: str | Path, step: int, write, meta: dict, keep_last: int = 2) -> Path:
    """The checkpoint protocol shared by every format: ``write(tmp)`` (a collective) puts the tensors into
    ``ckpt_{step}.tmp``; then each rank's RNG state, then meta.json (rank 0, last), then the rename.

    An I/O error on any rank (a full disk, a failing device) is agreed on by every rank before anyone goes on, so
    no rank waits at a barrier for one that has given up: the ``.tmp`` directory is removed (which also gives its
    space back), nothing older is rotated away, and every rank raises ``SaveError``."""
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

    def tensors_and_rng() -> None:
        write(tmp)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        (tmp / "rng").mkdir(exist_ok=True)
        save_file(rng, str(tmp / "rng" / f"rank_{rank:05d}.safetensors"))

    def meta_and_rename() -> None:  # rank 0, once every rank's files are written
        checksums = digest_tree(tmp, skip=(META,))
        full = dict(meta, format_version=FORMAT_VERSION, step=step, world_size=dist_utils.world_size(),
                    checksums=checksums, signature=sign(checksums))
        (tmp / META).write_text(json.dumps(full, indent=1))
        if final.exists():  # re-saving the same step (e.g. a growth event at a checkpoint step)
            shutil.rmtree(final)
        os.replace(tmp, final)

    _agree_or_raise(_io_failure(tensors_and_rng), out, final, tmp)
    _agree_or_raise(_io_failure(meta_and_rename) if rank == 0 else None, out, final, tmp)
    if rank == 0:
        for old in checkpoint_dirs(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist_utils.barrier()
    return final


def _io_failure(fn) -> str | None:
    """Run ``fn``; None when it succeeds, a few words on the I/O error that stopped it otherwise. Anything that is
    not an I/O error is a bug and propagates."""
    try:
        fn()
    except BaseException as e:
        why = _io_error_text(e)
        if why is None:
            raise
        return why
    return None


def _io_error_text(e: BaseException) -> str | None:
    """What an I/O error says, whichever writer raised it; None for anything else. A full disk reaches us as
    ``OSError`` (json, shutil), as ``SafetensorError`` ("I/O error: No space left on device", the RNG files), as
    torch.save's ``RuntimeError`` from its zip writer ("[enforce fail at inline_container.cc] unexpected pos", DCP's
    tensor files and DeepSpeed's), or wrapped by DCP in a ``CheckpointException`` (a BaseException) holding each
    failed rank's (exception, traceback)."""
    if isinstance(e, OSError):
        return f"{e.strerror or e} ({e.filename})" if e.filename else str(e.strerror or e)
    if isinstance(e, SafetensorError) and "I/O error" in str(e):
        return str(e)
    if isinstance(e, RuntimeError) and "inline_container" in str(e):
        return f"torch.save's writer failed ({' '.join(str(e).split())}), as it does on a full disk"
    if isinstance(e, CheckpointException):
        failures = getattr(e, "failures", {}).values()  # rank -> (exception, traceback)
        texts = [_io_error_text(f[0] if isinstance(f, tuple) else f) for f in failures]
        return texts[0] if texts and all(texts) else None
    return None


def _agree_or_raise(failure: str | None, out: Path, final: Path, tmp: Path) -> None:
    """Every rank learns whether any rank failed (an all-reduce instead of a barrier); on a failure rank 0 removes
    the partial directory and every rank raises ``SaveError`` naming the directory and its free space."""
    if not dist_utils.any_rank(failure is not None):
        return
    if dist_utils.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        free = f"{shutil.disk_usage(out).free / 2**20:,.1f} MiB free on it after the partial write was removed"
    except OSError:
        free = "its free space unknown"
    newest = latest_checkpoint(out)
    raise SaveError(f"could not write checkpoint {str(final)!r}: {failure or 'another rank failed to write'}; "
                    f"{str(out)!r} has {free}. Nothing of this checkpoint was kept; the newest complete one, "
                    f"{str(newest) if newest else 'none'}, is untouched (resume from it with --resume auto once "
                    f"there is room)")


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
        check_deepspeed_trusted(p, meta)
        load_consolidated_weights(p, model)
    else:
        _load_dcp(p, meta, model, optimizer)
    if load_rng:
        restore_rng(p, meta)
    return meta


def _check_fits(p: Path, metadata, state: dict) -> None:
    """Every tensor the destination wants is a tensor entry of the same shape in the checkpoint; else one line
    naming the key (DCP's own errors arrive as a multi-line CheckpointException)."""
    entries = metadata.state_dict_metadata
    for key, t in _flat(state):
        md = entries.get(key)
        if md is None:
            raise CheckpointError(f"checkpoint {str(p)!r} lacks the tensor {key!r} that this model/optimizer has "
                                  f"(.metadata lists {len(entries)} entries)")
        if isinstance(md, BytesStorageMetadata) or not isinstance(md, TensorStorageMetadata):
            raise safe_dcp.UnsafeCheckpoint(f"checkpoint {str(p / '.metadata')!r}: entry {key!r} is a pickled "
                                            f"(byte) entry; nanogrow never writes those and never unpickles them")
        if tuple(md.size) != tuple(t.shape):
            raise CheckpointError(f"checkpoint {str(p)!r}: tensor {key!r} is {list(md.size)} in .metadata but "
                                  f"{META}'s model_config makes it {list(t.shape)}")


def _load_dcp(p: Path, meta: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    state = _model_and_optim_state(model, optimizer)
    groups = None
    if "optim" in state:  # hyper-parameters from meta.json (format 1: the optimizer's own, its bytes never read)
        saved = meta.get("optim_param_groups")
        groups = _param_groups_from_json(saved) if saved is not None else state["optim"]["param_groups"]
        state["optim"] = {"state": state["optim"]["state"]}
    verify_file(p, meta, ".metadata")  # before unpickling anything, restricted as that is
    metadata = safe_dcp.read_metadata(p)
    _materialise_missing(state, model, metadata)
    _check_fits(p, metadata, state)
    reader = safe_dcp.SafeReader(p, metadata, verify=lambda rel: verify_file(p, meta, rel))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, planner=safe_dcp.TensorsOnlyPlanner())
    except CheckpointException as e:  # a BaseException: DCP wraps every rank's failure in it
        errors = [exc for exc, _ in e.failures.values()]
        ours = next((x for x in errors if isinstance(x, ValueError)), None)  # our checks' one-line errors
        if ours is not None:
            raise ours from None
        first = errors[0] if errors else e
        raise CheckpointError(f"checkpoint {str(p)!r} could not be read: {type(first).__name__}: "
                              f"{str(first).splitlines()[0] if str(first) else ''}") from None
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        set_model_state_dict(model, state["model"])
    else:
        osd = {"state": state["optim"]["state"], "param_groups": groups}
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=osd)


def restore_rng(path: str | Path, meta: dict | None = None) -> None:
    """This rank's RNG state as saved (nothing when the checkpoint has none for this rank)."""
    p = Path(path)
    rel = f"rng/rank_{dist_utils.rank():05d}.safetensors"
    if (p / rel).is_file():
        verify_file(p, meta if meta is not None else read_meta(p), rel)
        try:
            rng = load_file(str(p / rel))
            torch.set_rng_state(rng["cpu"])
        except (SafetensorError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint file {str(p / rel)!r} is not a usable RNG state "
                                  f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


# ---- DeepSpeed ZeRO checkpoints: what can be read of them without an engine -------------------------------
def check_resume(meta: dict, path: Path, parallel: str, world: int, stage: int) -> None:
    """A ZeRO checkpoint resumes only under ZeRO, at the stage and world size that wrote it; say so, and how to
    restart from its weights, before anything is built."""
    if not is_deepspeed(meta):
        return
    saved_world, saved_stage = meta.get("world_size"), meta.get("zero_stage")
    if parallel == "deepspeed" and world == saved_world and stage == saved_stage:
        return
    here = f"ZeRO-{stage}" if parallel == "deepspeed" else f"train.parallel={parallel!r}"
    raise CheckpointError(
        f"checkpoint {str(path)!r} was written by DeepSpeed ZeRO-{saved_stage} at world size {saved_world}; this "
        f"run is {here} at world size {world}. DeepSpeed cannot repartition its optimizer state for another world "
        f"size or backend. Restart from its weights (fresh optimizer state; data position, lr schedule and growth "
        f"history kept): `nanogrow consolidate {path} --out DIR`, then `--resume DIR/{Path(path).name}`")


def check_deepspeed_trusted(path: Path, meta: dict) -> None:
    """Before DeepSpeed opens a ZeRO checkpoint's files (``torch.load(weights_only=False)``: unpickling runs any code
    a crafted file holds): every file must match its recorded checksum, and the checksums must be signed by this
    host's key (``integrity.sign``: the checkpoint was written here, or on a host sharing the key file), unless the
    user trusts it (``--trust-checkpoint``, or NANOGROW_TRUST_CHECKPOINT=1)."""
    verify_tree(path, meta, DEEPSPEED_TAG)
    if os.environ.get(TRUST_ENV, "") in ("", "0") and not signed_here(meta.get("checksums") or {},
                                                                     meta.get("signature")):
        why = "it carries no signature" if not meta.get("signature") else "its signature does not verify"
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a DeepSpeed ZeRO checkpoint and {why} under this host's key "
            f"({key_path()}): it was not written here (or was altered), and DeepSpeed loads its files with "
            f"torch.load(weights_only=False), which runs any code a crafted file contains. If you know where it "
            f"came from, pass --trust-checkpoint (or set {TRUST_ENV}=1); hosts of one cluster can share the key "
            f"file through NANOGROW_CHECKPOINT_KEY")


def load_consolidated_weights(path: Path, model: torch.nn.Module) -> None:
    """Load the fp32 weights (and growth masks) of a ZeRO checkpoint into an unwrapped ``model`` of its shape,
    gathered from the partitions by DeepSpeed's ``zero_to_fp32``. One process, no engine."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise CheckpointError(f"checkpoint {str(path)!r} is a DeepSpeed checkpoint; reading it needs the deepspeed "
                              f"package") from None
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DEEPSPEED_TAG)
    own = model.state_dict()
    for name, tensor in state.items():
        if name not in own:  # a growth mask (None in a fresh model until set)
            try:
                set_buffer(model, name, tensor.clone())
            except KeyError:
                raise CheckpointError(f"checkpoint {str(path)!r} has tensor {name!r} that the model does not "
                                      f"know") from None
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
