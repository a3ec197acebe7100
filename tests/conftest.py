"""Shared fixtures: a small tokenized slice of the bundled demo corpus, prepared once per test session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on hub retries in tests


def pytest_collection_modifyitems(session, config, items):
    """Run the Triton-interpreter kernel tests first. After the training tests and the transformers tests have run
    in the same process, Triton 3.7's interpreter fails some launches with "ValueError: vector::reserve"
    (reproducible with test_growth_training + test_hf + test_kernels, not with any two of them); in a fresh
    process, and first in the session, they pass."""
    items.sort(key=lambda item: 0 if item.path.name == "test_kernels.py" else 1)  # stable: order kept otherwise


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """~120k train tokens of the King James Bible, byte-level BPE with 512 tokens, 8k val tokens."""
    from data_prep.prepare import prepare

    out = tmp_path_factory.mktemp("demo_data")
    prepare("demo", out, tokenizer="bpe:512", max_tokens=120_000, val_tokens=8_192, shard_tokens=40_000,
            workers=1, bpe_train_chars=300_000, overwrite=True, log=lambda *_: None)
    return out


def tiny_run_config(data_dir, out_dir, **train):
    """A seeded two-layer model that trains in well under a second per step on CPU."""
    from nanogrow.config import load_config

    overrides = {
        "model.n_layer": 2, "model.d_model": 64, "model.n_head": 4, "model.n_kv_head": 2, "model.vocab_size": 512,
        "model.max_seq_len": 64, "data.dir": f"'{data_dir}'", "data.seq_len": 64, "train.out_dir": f"'{out_dir}'",
        "train.micro_batch": 4, "train.max_steps": 12, "train.warmup_steps": 2, "train.lr": 0.01,
        "train.eval_every": 0, "train.eval_batches": 2, "train.eval_batch_size": 4, "train.log_every": 1000,
    }
    overrides.update({f"train.{k}": (f"'{v}'" if isinstance(v, str) else v) for k, v in train.items()})
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def with_stages(cfg, stages, **growth):
    """``cfg`` with these [[stage]] tables and [growth] values, validated like a TOML file would be."""
    from nanogrow.config import RunConfig, validate

    raw = cfg.to_dict()
    raw["growth"].update(growth)
    raw["stage"] = stages
    cfg = RunConfig.from_dict(raw)
    validate(cfg)
    return cfg


def run_steps(trainer, n):
    """n training steps, growing whenever the trainer's trigger says so (what Trainer.run does)."""
    losses = []
    for _ in range(n):
        while trainer.growth_due():
            trainer.grow_next_stage()
        losses.append(trainer.train_step())
    return losses
