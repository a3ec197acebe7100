"""Checkpoints and data you can trust (issue 14): loading runs no code, corrupt bytes are caught by checksums,
nothing non-finite is written, a fresh run does not clobber another run, and bad inputs are one-line errors."""

import io
import json
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from nanogrow.checkpoint import checkpoint_dirs, latest_checkpoint, load_checkpoint, read_meta
from nanogrow.cli import main
from nanogrow.integrity import sha256_file

from helpers import tiny_run_config


def _train_args(data, out, *extra):
    sets = {"model.n_layer": 1, "model.d_model": 32, "model.n_head": 2, "model.n_kv_head": 1,
            "model.vocab_size": 512, "model.max_seq_len": 32, "data.dir": f"'{data}'", "data.seq_len": 32,
            "train.out_dir": f"'{out}'", "train.micro_batch": 2, "train.warmup_steps": 1, "train.eval_batches": 1,
            "train.eval_every": 0, "train.log_every": 100, "train.max_steps": 2}
    args = ["train"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args + list(extra)


@pytest.fixture(scope="module")
def pristine(demo_data, tmp_path_factory):
    """A finished two-step run and a consolidated copy of its checkpoint; tests corrupt copies of these."""
    out = tmp_path_factory.mktemp("trusted_run")
    assert main(_train_args(demo_data, out)) == 0
    assert main(["consolidate", str(out / "ckpt_0000002"), "--out", str(out / "consolidated")]) == 0
    return out


@pytest.fixture
def run(pristine, tmp_path):
    shutil.copytree(pristine, tmp_path / "run")
    return tmp_path / "run"


def _rehash(ckpt: Path) -> None:
    """What an attacker (or a careless copy tool) can do: record the tampered files' checksums in meta.json."""
    meta = json.loads((ckpt / "meta.json").read_text())
    if "checksums" in meta:
        meta["checksums"] = {rel: sha256_file(ckpt / rel) for rel in meta["checksums"]}
        (ckpt / "meta.json").write_text(json.dumps(meta))


class _Payload:
    """Unpickling this writes ``marker``: proof that loading ran code from the checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _craft_metadata(ckpt: Path, marker: Path) -> None:
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _rehash(ckpt)


def _craft_byte_entry(ckpt: Path, marker: Path, key: str = "model.norm.weight") -> None:
    """Declare tensor ``key`` a DCP byte entry whose bytes are a torch.save'd payload."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    with open(ckpt / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own pristine file: trusted here
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    (ckpt / "evil.distcp").write_bytes(buf.getvalue())
    md.state_dict_metadata[key] = BytesStorageMetadata()
    md.storage_data = {i: s for i, s in md.storage_data.items() if i.fqn != key}
    md.storage_data[MetadataIndex(key)] = _StorageInfo("evil.distcp", 0, len(buf.getvalue()))
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    meta = json.loads((ckpt / "meta.json").read_text())
    if "checksums" in meta:
        meta["checksums"]["evil.distcp"] = ""
        (ckpt / "meta.json").write_text(json.dumps(meta))
    _rehash(ckpt)


LOAD_PATHS = ["train --resume PATH", "train --resume auto", "grow", "export-hf", "consolidate",
              "train --resume CONSOLIDATED"]


def _load_via(path: str, run: Path, demo_data, tmp_path) -> int:
    ckpt = run / "ckpt_0000002"
    more = ["--set", "train.max_steps=3"]
    if path == "train --resume PATH":
        return main(_train_args(demo_data, run, "--resume", str(ckpt), *more))
    if path == "train --resume auto":
        return main(_train_args(demo_data, run, "--resume", "auto", *more))
    if path == "grow":
        return main(["grow", str(ckpt), "--to", "n_layer=2", "--op", "stack", "--out", str(tmp_path / "grown")])
    if path == "export-hf":
        return main(["export-hf", str(ckpt), str(tmp_path / "hf"), "--no-tokenizer"])
    if path == "consolidate":
        return main(["consolidate", str(ckpt), "--out", str(tmp_path / "cons")])
    if path == "train --resume CONSOLIDATED":
        return main(_train_args(demo_data, run, "--resume", str(run / "consolidated" / "ckpt_0000002"), *more))
    raise AssertionError(path)


def _target(path: str, run: Path) -> Path:
    return run / "consolidated" / "ckpt_0000002" if path.endswith("CONSOLIDATED") else run / "ckpt_0000002"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


# ---- 1. no code runs on load ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", LOAD_PATHS)
def test_crafted_metadata_is_refused_and_never_runs(path, run, demo_data, tmp_path, capsys):
    marker = tmp_path / "pwned"
    _craft_metadata(_target(path, run), marker)
    assert _load_via(path, run, demo_data, tmp_path) == 2
    assert not marker.exists(), "the .metadata payload ran"
    err = _one_line_error(capsys)
    assert ".metadata" in err and "builtins.exec" in err


@pytest.mark.parametrize("path", LOAD_PATHS)
def test_crafted_byte_entry_is_refused_and_never_runs(path, run, demo_data, tmp_path, capsys):
    marker = tmp_path / "pwned"
    _craft_byte_entry(_target(path, run), marker)
    assert _load_via(path, run, demo_data, tmp_path) == 2
    assert not marker.exists(), "the byte-entry payload ran"
    err = _one_line_error(capsys)
    assert "model.norm.weight" in err and "byte" in err


def test_planner_refuses_byte_entries_even_when_asked_directly(run, tmp_path):
    """Defence in depth: DCP driven with our reader and planner, bypassing checkpoint.py's own checks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from nanogrow.safe_dcp import SafeReader, TensorsOnlyPlanner, UnsafeCheckpoint, read_metadata

    ckpt, marker = run / "ckpt_0000002", tmp_path / "pwned"
    _craft_byte_entry(ckpt, marker)
    reader = SafeReader(ckpt, read_metadata(ckpt), verify=lambda rel: None)
    with pytest.raises(CheckpointException) as info:
        dcp.load({"model": {"norm.weight": torch.zeros(32)}}, storage_reader=reader, planner=TensorsOnlyPlanner())
    assert any(isinstance(exc, UnsafeCheckpoint) for exc, _ in info.value.failures.values())
    assert not marker.exists()


def test_nanogrow_writes_no_byte_entries(pristine):
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from nanogrow.safe_dcp import read_metadata

    for ckpt in (pristine / "ckpt_0000002", pristine / "consolidated" / "ckpt_0000002"):
        entries = read_metadata(ckpt).state_dict_metadata
        assert entries and all(isinstance(md, TensorStorageMetadata) for md in entries.values())
        groups = read_meta(ckpt)["optim_param_groups"]  # the hyper-parameters live in meta.json instead
        assert [g["betas"] for g in groups] == [[0.9, 0.95]] * 2


# ---- 2. integrity ---------------------------------------------------------------------------------------------
def test_every_checkpoint_file_is_checksummed(pristine):
    ckpt = pristine / "ckpt_0000002"
    files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != "meta.json"}
    sums = read_meta(ckpt)["checksums"]
    assert set(sums) == files and {".metadata", "__0_0.distcp", "rng/rank_00000.safetensors"} <= files
    assert all(sums[f] == sha256_file(ckpt / f) for f in files)


@pytest.mark.parametrize("path", ["train --resume PATH", "grow", "export-hf"])
def test_flipped_bytes_in_tensor_file_are_caught(path, run, demo_data, tmp_path, capsys):
    ckpt = run / "ckpt_0000002"
    raw = bytearray((ckpt / "__0_0.distcp").read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)
    (ckpt / "__0_0.distcp").write_bytes(bytes(raw))
    assert _load_via(path, run, demo_data, tmp_path) == 2
    err = _one_line_error(capsys)
    assert "__0_0.distcp" in err and "corrupt" in err
    assert latest_checkpoint(run).name == "ckpt_0000002"  # nothing trained on it, nothing written over it


def _copy_data(demo_data, tmp_path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    return data


def test_corrupt_shard_body_is_caught_when_first_opened(demo_data, tmp_path, capsys):
    data = _copy_data(demo_data, tmp_path)
    for shard in data.glob("train_*.bin"):  # whichever the seeded order opens first
        raw = shard.read_bytes()
        tokens = np.frombuffer(raw, dtype="<u2", offset=1024).copy()
        i = 1000 + int(np.flatnonzero(tokens[1000:-1] != tokens[1001:])[0])
        tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]  # two different tokens swapped: ids stay in range
        shard.write_bytes(raw[:1024] + tokens.tobytes())
    assert main(_train_args(data, tmp_path / "out")) == 2
    err = _one_line_error(capsys)
    assert "train_0" in err and "sha256" in err
    assert not (tmp_path / "out").exists() or not checkpoint_dirs(tmp_path / "out")


def test_token_ids_beyond_vocab_are_caught_whatever_the_header_says(demo_data, tmp_path, capsys):
    data = _copy_data(demo_data, tmp_path)
    for shard in data.glob("train_*.bin"):
        raw = bytearray(shard.read_bytes())
        raw[1024 + 20:1024 + 22] = np.uint16(600).tobytes()  # header still says max id < 512
        shard.write_bytes(bytes(raw))
    assert main(_train_args(data, tmp_path / "out")) == 2
    err = _one_line_error(capsys)
    assert "token id 600 >= the model's vocab_size 512" in err


def test_each_shard_is_verified_once_per_run(demo_data, monkeypatch):
    import nanogrow.data as data_mod

    calls = []
    real = data_mod.verify_body
    monkeypatch.setattr(data_mod, "verify_body", lambda h, v: (calls.append(h.path), real(h, v)))
    shards = data_mod.ShardSet(demo_data, "train", vocab_size=512)
    shards.MAX_OPEN = 1  # every shard change reopens a memory map
    order = list(range(len(shards.paths)))
    for _ in range(3):
        for start in range(0, shards.total - 1000, 7000):
            shards.read(order, start, start + 1000)
    assert sorted(calls) == sorted(str(p) for p in shards.paths)


# ---- 3. non-finite values -------------------------------------------------------------------------------------
def _all_finite(ckpt: Path) -> bool:
    from nanogrow.model import ModelConfig, build_model
    from nanogrow.train import make_optimizer

    meta = read_meta(ckpt)
    model = build_model(ModelConfig(**meta["model_config"]), "cpu", seed=0)
    opt = make_optimizer(model, tiny_run_config("x", "y").train)
    load_checkpoint(ckpt, model, opt, load_rng=False)
    tensors = list(model.parameters()) + [t for s in opt.state.values() for t in s.values()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def test_exploding_lr_never_writes_a_nonfinite_checkpoint(demo_data, tmp_path, capsys):
    args = _train_args(demo_data, tmp_path / "out", "--set", "train.lr=1e6", "--set", "train.max_steps=8",
                       "--set", "train.ckpt_every=1", "--set", "train.keep_last=2", "--set", "train.grad_clip=0")
    assert main(args) == 2
    err = _one_line_error(capsys)
    assert "non-finite" in err and "train.lr=1000000.0" in err and "step " in err
    kept = checkpoint_dirs(tmp_path / "out")
    assert all(_all_finite(c) for c in kept)
    if kept:
        assert f"last good checkpoint {kept[-1]}" in err


def test_nan_moment_never_rotates_away_the_last_good_checkpoint(demo_data, tmp_path):
    from nanogrow.train import Trainer

    trainer = Trainer(tiny_run_config(demo_data, tmp_path, ckpt_every=1, keep_last=2), log=lambda *_: None)
    for _ in range(3):
        trainer.train_step()
        trainer.save()
    p = next(iter(trainer.optimizer.state))
    trainer.optimizer.state[p]["exp_avg"].view(-1)[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"step 4: non-finite .*last good checkpoint .*ckpt_0000003"):
        trainer.train_step()  # the update spreads the NaN into the weights
        trainer.save()
    assert [c.name for c in checkpoint_dirs(tmp_path)] == ["ckpt_0000002", "ckpt_0000003"]
    assert all(_all_finite(c) for c in checkpoint_dirs(tmp_path))


def _poison_grads(trainer, steps: set[int]):
    """NaN gradients at the given (1-based) steps."""
    w = trainer.model.norm.weight
    w.register_hook(lambda g: g * float("nan") if trainer.step + 1 in steps else g)


def test_nonfinite_step_stops_naming_step_cause_and_checkpoint(demo_data, tmp_path):
    from nanogrow.train import Trainer

    trainer = Trainer(tiny_run_config(demo_data, tmp_path), log=lambda *_: None)
    trainer.train_step()
    trainer.save()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    _poison_grads(trainer, {2})
    with pytest.raises(FloatingPointError) as info:  # NonFiniteError
        trainer.train_step()
    msg = str(info.value)
    assert "step 2" in msg and "train.lr=0.01" in msg and str(tmp_path / "ckpt_0000001") in msg
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())  # not applied


def test_skip_nonfinite_steps_skips_then_stops(demo_data, tmp_path):
    from nanogrow.train import Trainer

    logs = []
    trainer = Trainer(tiny_run_config(demo_data, tmp_path, skip_nonfinite_steps=1), log=logs.append)
    _poison_grads(trainer, {2, 4, 5})
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step()  # skipped
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert any("step 2" in m and "update skipped" in m for m in logs)
    trainer.train_step()  # finite again: the streak resets
    trainer.train_step()  # step 4 skipped
    with pytest.raises(FloatingPointError, match="step 5"):
        trainer.train_step()  # step 5: a second bad step in a row


def test_exploding_final_norm_gain_is_warned_about_or_stopped(demo_data, tmp_path):
    from nanogrow.train import Trainer

    logs = []
    trainer = Trainer(tiny_run_config(demo_data, tmp_path / "a", max_steps=4), log=logs.append)
    with torch.no_grad():
        trainer.model.norm.weight.mul_(1e4)  # loss ~5e3, finite: trains to the end, but not silently
    assert trainer.run()["steps"] == 4
    assert any(m.startswith("warning: step 1: loss") and "diverging" in m for m in logs), logs
    trainer = Trainer(tiny_run_config(demo_data, tmp_path / "b", max_steps=4), log=logs.append)
    with torch.no_grad():
        trainer.model.norm.weight.mul_(1e30)  # the gradient norm overflows: the run stops at step 1
    with pytest.raises(FloatingPointError, match="step 1: non-finite loss or gradient"):
        trainer.run()


# ---- 4. a fresh run does not clobber another run --------------------------------------------------------------
def test_fresh_run_in_a_used_out_dir_stops_and_offers_resume_or_overwrite(run, demo_data, capsys):
    before = {p: p.read_bytes() for p in (run / "ckpt_0000002").rglob("*") if p.is_file()}
    assert main(_train_args(demo_data, run, "--set", "train.max_steps=3")) == 2
    err = _one_line_error(capsys)
    assert "--resume auto" in err and "--overwrite" in err and str(run) in err
    assert {p: p.read_bytes() for p in (run / "ckpt_0000002").rglob("*") if p.is_file()} == before


def test_overwrite_removes_the_old_checkpoints_first(run, demo_data, capsys):
    assert main(_train_args(demo_data, run, "--set", "train.max_steps=3", "--overwrite")) == 0
    assert [c.name for c in checkpoint_dirs(run)] == ["ckpt_0000003"]
    assert "--overwrite: removed" in capsys.readouterr().out


def test_stray_tmp_dirs_are_removed_at_start_and_resume(run, demo_data, capsys):
    (run / "ckpt_0000009.tmp").mkdir()
    assert main(_train_args(demo_data, run, "--resume", "auto", "--set", "train.max_steps=3")) == 0
    assert not (run / "ckpt_0000009.tmp").exists()
    out = capsys.readouterr().out
    assert "removed" in out and "ckpt_0000009.tmp" in out


# ---- 5. one-line errors for corrupt inputs --------------------------------------------------------------------
def _truncate(file: Path, keep: float = 0.5) -> None:
    file.write_bytes(file.read_bytes()[:int(file.stat().st_size * keep)])


def _edit_meta(ckpt: Path, edit) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    edit(meta)
    (ckpt / "meta.json").write_text(json.dumps(meta))


CORRUPTIONS = {
    "truncated distcp": (lambda c: _truncate(c / "__0_0.distcp"), "__0_0.distcp"),
    "truncated distcp, checksum updated": (lambda c: (_truncate(c / "__0_0.distcp"), _rehash(c)), "ckpt_0000002"),
    "meta.json shape mismatch": (lambda c: _edit_meta(c, lambda m: m["model_config"].update(d_model=64)),
                                 "model_config makes it"),
    "truncated .metadata": (lambda c: (_truncate(c / ".metadata"), _rehash(c)), ".metadata"),
    "random bytes in meta.json": (lambda c: (c / "meta.json").write_bytes(bytes(range(256)) * 4), "meta.json"),
    "wrong type in meta.json": (lambda c: _edit_meta(c, lambda m: m.update(step="2")), "'step' should be int"),
    "missing loader key": (lambda c: _edit_meta(c, lambda m: m["loader"].pop("epoch")), "loader.epoch"),
    "truncated rng file": (lambda c: (_truncate(c / "rng" / "rank_00000.safetensors"), _rehash(c)),
                           "rank_00000.safetensors"),
}


@pytest.mark.parametrize("what", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_a_one_line_error(what, run, demo_data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NANOGROW_DEBUG", raising=False)
    corrupt, expected = CORRUPTIONS[what]
    corrupt(run / "ckpt_0000002")
    assert _load_via("train --resume PATH", run, demo_data, tmp_path) == 2
    err = _one_line_error(capsys)
    assert expected in err, err


def test_nanogrow_debug_shows_the_traceback(run, demo_data, tmp_path, monkeypatch):
    from nanogrow.checkpoint import CheckpointError

    monkeypatch.setenv("NANOGROW_DEBUG", "1")
    _edit_meta(run / "ckpt_0000002", lambda m: m.update(step="2"))
    with pytest.raises(CheckpointError, match="'step' should be int"):
        _load_via("train --resume PATH", run, demo_data, tmp_path)


# ---- 6. learned width growth by a non-integer d_model factor --------------------------------------------------
def test_learned_refuses_non_integer_d_model_factor_like_net2net():
    from nanogrow.grow import make_plan
    from nanogrow.model import ModelConfig

    old = ModelConfig(n_layer=2, d_model=32, n_head=2, n_kv_head=1, vocab_size=64, max_seq_len=16).resolved()
    new = replace(old, d_model=48, n_head=3, d_ff=0).resolved()
    with pytest.raises(ValueError, match="integer factor") as net2net:
        make_plan("net2net", old, new)
    with pytest.raises(ValueError, match="integer factor") as learned:
        make_plan("learned", old, new, steps=0)
    assert str(learned.value) == f"learned: {net2net.value}"
    make_plan("learned", old, replace(old, d_model=64, n_head=4, d_ff=0).resolved(), steps=0)  # x2 still fine


def test_cli_grow_learned_refuses_non_integer_d_model_factor(run, tmp_path, capsys):
    assert main(["grow", str(run / "ckpt_0000002"), "--to", "d_model=48,n_head=3", "--op", "learned",
                 "--options", '{"steps": 0}', "--out", str(tmp_path / "grown")]) == 2
    assert "integer factor" in _one_line_error(capsys)
    assert not (tmp_path / "grown").exists()


# ---- 7. DeepSpeed checkpoints: unpickled by DeepSpeed, so opened only when signed here or trusted ---------------
def _as_deepspeed(ckpt: Path, marker: Path, sign_with: bytes | None) -> None:
    """Turn ``ckpt`` into what a ZeRO checkpoint looks like to the loader: meta says deepspeed, and its DeepSpeed
    directory holds a torch.save'd payload that writes ``marker`` when unpickled. Checksums recomputed (anyone can);
    signed with ``sign_with`` (None: no signature)."""
    from nanogrow.checkpoint import DEEPSPEED_TAG
    from nanogrow.integrity import sign

    (ckpt / DEEPSPEED_TAG).mkdir()
    torch.save(_Payload(marker), ckpt / DEEPSPEED_TAG / "mp_rank_00_model_states.pt")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta.update(format="deepspeed", zero_stage=2)
    meta["checksums"] = {p.relative_to(ckpt).as_posix(): sha256_file(p) for p in sorted(ckpt.rglob("*"))
                         if p.is_file() and p.name != "meta.json"}
    meta.pop("signature", None)
    if sign_with is not None:
        meta["signature"] = sign(meta["checksums"], sign_with)
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_every_checkpoint_is_signed_by_its_writer(pristine):
    from nanogrow.integrity import signed_here

    for ckpt in (pristine / "ckpt_0000002", pristine / "consolidated" / "ckpt_0000002"):
        meta = read_meta(ckpt)
        assert signed_here(meta["checksums"], meta["signature"])
        assert not signed_here(dict(meta["checksums"], extra="0" * 64), meta["signature"])


@pytest.mark.parametrize("signer", ["none", "another host"])
@pytest.mark.parametrize("path", ["consolidate", "export-hf", "eval"])
def test_deepspeed_checkpoint_not_signed_here_is_refused_before_deepspeed_opens_it(signer, path, run, demo_data,
                                                                                   tmp_path, capsys):
    ckpt, marker = run / "ckpt_0000002", tmp_path / "ran"
    _as_deepspeed(ckpt, marker, None if signer == "none" else bytes(32))  # not this host's key
    if path == "eval":
        code = main(["eval", str(ckpt), "--data", str(demo_data), "--batches", "1"])
    else:
        code = _load_via(path, run, demo_data, tmp_path)
    assert code == 2 and not marker.exists()
    err = _one_line_error(capsys)
    assert str(ckpt) in err and "--trust-checkpoint" in err and "weights_only=False" in err
    assert ("carries no signature" if signer == "none" else "does not verify") in err


@pytest.mark.parametrize("how", ["signed here", "--trust-checkpoint"])
def test_deepspeed_checkpoint_signed_here_or_trusted_reaches_deepspeed(how, run, demo_data, tmp_path, monkeypatch):
    from nanogrow import checkpoint
    from nanogrow.integrity import host_key

    opened = []

    def deepspeed_stands_in(path, model):  # DeepSpeed's loader, reached: record it and stop there
        opened.append(path)
        raise checkpoint.CheckpointError("reached DeepSpeed")

    monkeypatch.setattr(checkpoint, "load_consolidated_weights", deepspeed_stands_in)
    monkeypatch.delenv("NANOGROW_TRUST_CHECKPOINT", raising=False)  # the flag sets it: removed after the test
    ckpt = run / "ckpt_0000002"
    _as_deepspeed(ckpt, tmp_path / "ran", host_key() if how == "signed here" else bytes(32))
    args = ["export-hf", str(ckpt), str(tmp_path / "hf"), "--no-tokenizer"]
    assert main(args + (["--trust-checkpoint"] if how == "--trust-checkpoint" else [])) == 2
    assert opened == [ckpt]


def test_deepspeed_files_must_still_match_their_checksums_when_trusted(run, demo_data, tmp_path, monkeypatch,
                                                                         capsys):
    from nanogrow.checkpoint import DEEPSPEED_TAG
    from nanogrow.integrity import host_key

    monkeypatch.delenv("NANOGROW_TRUST_CHECKPOINT", raising=False)  # the flag sets it: removed after the test
    ckpt, marker = run / "ckpt_0000002", tmp_path / "ran"
    _as_deepspeed(ckpt, marker, host_key())
    with open(ckpt / DEEPSPEED_TAG / "mp_rank_00_model_states.pt", "ab") as f:
        f.write(b"\0")
    assert main(["consolidate", str(ckpt), "--out", str(tmp_path / "cons"), "--trust-checkpoint"]) == 2
    assert "is corrupt" in _one_line_error(capsys) and not marker.exists()
