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
    from nanogrow.data_prep.prepare import prepare

    out = tmp_path_factory.mktemp("demo_data")
    prepare("demo", out, tokenizer="bpe:512", max_tokens=120_000, val_tokens=8_192, shard_tokens=40_000,
            workers=1, bpe_train_chars=300_000, overwrite=True, log=lambda *_: None)
    return out
