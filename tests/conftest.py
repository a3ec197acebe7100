"""Shared fixtures: a small tokenized slice of the bundled demo corpus, prepared once per test session."""

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on hub retries in tests
# Checkpoints are signed with a host key (nanogrow.integrity): the tests' own, not the user's ~/.config one; set
# here so every torchrun and subprocess the tests start inherits it.
os.environ["NANOGROW_CHECKPOINT_KEY"] = os.path.join(tempfile.mkdtemp(prefix="nanogrow-key-"), "checkpoint.key")
os.environ.pop("NANOGROW_TRUST_CHECKPOINT", None)


def pytest_collection_modifyitems(session, config, items):
    """Run the Triton-interpreter kernel tests first. After the training tests and the transformers tests have run
    in the same process, Triton 3.7's interpreter fails some launches with "ValueError: vector::reserve"
    (reproducible with test_growth_training + test_hf + test_kernels, not with any two of them); in a fresh
    process, and first in the session, they pass."""
    items.sort(key=lambda item: 0 if item.path.name == "test_kernels.py" else 1)  # stable: order kept otherwise


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """~120k train tokens of the King James Bible, byte-level BPE with 512 tokens, 8k val tokens."""
    from nanogrow.data_prep.prepare import prepare

    out = tmp_path_factory.mktemp("demo_data")
    prepare("demo", out, tokenizer="bpe:512", max_tokens=120_000, val_tokens=8_192, shard_tokens=40_000,
            workers=1, bpe_train_chars=300_000, overwrite=True, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def grown_run(demo_data, tmp_path_factory):
    """A tiny run on ``demo_data`` grown 2 -> 4 layers (G_stack) at step 4 of 8: its run directory, whose newest
    checkpoint (step 8) is the grown model, and whose summary.json holds the final validation loss."""
    from helpers import tiny_run_config, with_stages

    from nanogrow.train import Trainer

    out = tmp_path_factory.mktemp("grown_run")
    cfg = with_stages(tiny_run_config(demo_data, out, max_steps=8), [{"at_step": 4, "shape": {"n_layer": 4}}])
    Trainer(cfg, log=lambda *_: None).run()
    return out
