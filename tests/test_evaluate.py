"""`nanogrow eval`: bits per byte on a case worked out by hand, the refusal of data tokenized by another tokenizer,
and a grown run evaluated end to end (its log's validation loss, text and JSON output, one-line errors)."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

from nanogrow.checkpoint import save_checkpoint
from nanogrow.cli import main
from nanogrow.config import RunConfig
from nanogrow.data import write_shard
from nanogrow.evaluate import bits_per_byte, evaluate
from nanogrow.grow import make_optimizer
from nanogrow.model import ModelConfig, build_model

from helpers import one_thread  # noqa: F401 (autouse fixture: one torch thread per module)


def word_tokenizer(path, words: int):
    """A word-level tokenizer: "<|endoftext|>" is id 0, "w1".."w{words-1}" are 1..words-1; decoding joins words
    with one space."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, words)}},
                                     unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))


def test_bits_per_byte_arithmetic():
    assert bits_per_byte(math.log(2), tokens=8, n_bytes=8) == pytest.approx(1.0)  # 1 bit per 1-byte token
    assert bits_per_byte(math.log(256), tokens=10, n_bytes=10) == pytest.approx(8.0)  # uniform over bytes
    assert bits_per_byte(2.0, tokens=100, n_bytes=400) == pytest.approx(200 / (400 * math.log(2)))


def test_uniform_model_on_a_hand_made_split(tmp_path):
    """A model whose LM head is zero predicts every one of its 64 tokens with probability 1/64: loss ln 64 per
    token. The val split is eot, then "w5" 40 times; a batch of 2 windows x 8 evaluates 16 targets, all "w5",
    which decode to "w5 w5 ... w5": 16 * 2 + 15 spaces = 47 bytes. bits/byte = 16 * log2(64) / 47 = 96 / 47."""
    data = tmp_path / "data"
    data.mkdir()
    word_tokenizer(data / "tokenizer.json", 64)
    (data / "meta.json").write_text(json.dumps({"vocab_size": 64, "eot_id": 0}))
    write_shard(data / "val_000000.bin", np.array([0] + [5] * 40), vocab_size=64, eot_id=0)

    cfg = ModelConfig(n_layer=1, d_model=16, n_head=2, n_kv_head=1, vocab_size=64, max_seq_len=8)
    model = build_model(cfg, seed=0)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    run = RunConfig(model=cfg)
    run.data.dir, run.data.seq_len, run.train.eval_batch_size = str(data), 8, 2
    opt = make_optimizer(model, run.train)
    meta = {"run_config": run.to_dict(), "model_config": dataclasses.asdict(model.config), "loader": None,
            "meter": {"total_tokens": 0, "total_flops": 0.0}, "history": [], "stage_index": 0, "ramp": None}
    save_checkpoint(tmp_path / "run", 1, model, opt, meta)

    r = evaluate(tmp_path / "run", data, batches=1, device="cpu")
    assert (r["batches"], r["batch_size"], r["seq_len"], r["tokens"], r["bytes"]) == (1, 2, 8, 16, 47)
    assert r["loss"] == pytest.approx(math.log(64), rel=1e-6)
    assert r["perplexity"] == pytest.approx(64, rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(96 / 47, rel=1e-6)
    assert r["bytes_per_token"] == pytest.approx(47 / 16)
    # Every whole batch: 40 tokens hold 2 batches of 2 x 8 (+1); 32 targets -> 32 * 2 + 31 bytes.
    r = evaluate(tmp_path / "run", data, device="cpu")
    assert (r["batches"], r["tokens"], r["bytes"]) == (2, 32, 95)
    assert r["bits_per_byte"] == pytest.approx(32 * 6 / 95, rel=1e-6)


def test_data_of_another_tokenizer_is_refused_naming_both(grown_run, demo_data, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(demo_data, other)
    word_tokenizer(other / "tokenizer.json", 512)  # same vocabulary size, other words
    assert main(["eval", str(grown_run), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanogrow: error: ") and err.count("\n") == 1, err
    assert f"{other}/tokenizer.json" in err and f"{demo_data}/tokenizer.json" in err and "sha256" in err
    # The same tokenizer saved with other formatting is the same tokenizer.
    text = json.loads((demo_data / "tokenizer.json").read_text())
    (other / "tokenizer.json").write_text(json.dumps(text, indent=4, sort_keys=True))
    assert evaluate(grown_run, other, batches=1, device="cpu")["tokens"] == 4 * 64


def test_eval_of_a_grown_run_end_to_end(grown_run, demo_data, capsys):
    """With --batches = the run's eval_batches, the loss is the final validation loss the run logged."""
    logged = json.loads((grown_run / "summary.json").read_text())["val_loss"]
    assert main(["eval", str(grown_run), "--data", str(demo_data), "--batches", "2", "--json", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["checkpoint"].endswith("ckpt_0000008") and r["shape"].startswith("4 x ")  # grown 2 -> 4 layers
    assert (r["split"], r["batches"], r["batch_size"], r["seq_len"], r["tokens"]) == ("val", 2, 4, 64, 512)
    assert r["loss"] == pytest.approx(logged, abs=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert 1.5 < r["bytes_per_token"] < 5  # byte-level BPE with 512 tokens on English
    assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / (r["bytes"] * math.log(2)))

    assert main(["eval", str(grown_run), "--data", str(demo_data), "--device", "cpu"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert "ckpt_0000008 (step 8, 4 x 64" in first and "val: 31 batches x 4 x 64 = 7,936 tokens" in first
    assert second.startswith("loss ") and "perplexity" in second and "bits/byte" in second


def test_eval_bad_inputs_are_one_line_errors(grown_run, demo_data, tmp_path, capsys):
    def one_line_error(argv, *needles):
        assert main(["eval", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("nanogrow: error: ") and err.count("\n") == 1, err
        for n in needles:
            assert n in err, err

    run, data = str(grown_run), str(demo_data)
    one_line_error([str(tmp_path / "nope"), "--data", data], "nope")
    one_line_error([run, "--data", data, "--split", "train"], "--split 'train'", "val, test")
    one_line_error([run, "--data", data, "--split", "test"], "no 'test' shards")
    one_line_error([run, "--data", data, "--batches", "99"], "--batches 99", "31 batches")
    one_line_error([run, "--data", str(tmp_path)], f"{tmp_path}/tokenizer.json not found")
