"""``nanogrow eval``: the loss, perplexity and bits per byte of a trained (grown) model on a prepared data directory's
``val`` or ``test`` split.

The windows are the trainer's validation windows (``data.val_batches``: from the start of the split, in file order,
``seq_len + 1`` tokens each, back to back), at the run's validation length and batch size, so ``--batches`` equal
to the run's ``train.eval_batches`` gives the validation loss its log reports. Without ``--batches``, every whole
batch the split holds.

Bits per byte make losses of different tokenizers comparable: the evaluated (target) tokens are decoded with the
tokenizer, special tokens (the eot between documents) left out, and the UTF-8 bytes of that text counted:
bits/byte = loss (nats per token) * tokens / (bytes * ln 2). The data must have been tokenized by the model's own
tokenizer (compared by content, ``RunTokenizer.identity``): another one's ids would mean other text.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .checkpoint import read_meta
from .config import RunConfig, eval_seq_len
from .data import DataError, ShardSet, val_batches
from .inference import RunTokenizer, load_for_inference, pick_device, resolve_checkpoint

SPLITS = ("val", "test")


def bits_per_byte(loss_nats: float, tokens: int, n_bytes: int) -> float:
    """The total loss in bits (``loss_nats`` per token, ``tokens`` of them) per byte of the text they encode."""
    return loss_nats * tokens / (n_bytes * math.log(2))


def check_same_tokenizer(ours: RunTokenizer, data_dir: Path) -> RunTokenizer:
    """The data directory's tokenizer, which must be the checkpoint's; the error names both files."""
    path = data_dir / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{path} not found: {data_dir} is not a prepared data directory (see `nanogrow prep`)")
    theirs = RunTokenizer(path)
    a, b = ours.identity(), theirs.identity()
    if a != b:
        raise DataError(f"data directory {str(data_dir)!r} was tokenized by {path} (sha256 {b[:12]}), not by the "
                        f"checkpoint's tokenizer {ours.path} (sha256 {a[:12]}): its token ids mean other text")
    return theirs


def evaluate(checkpoint: str | Path, data_dir: str | Path, split: str = "val", batches: int | None = None,
             batch_size: int | None = None, device: str | None = None, tokenizer: str | Path | None = None) -> dict:
    """Loss (nats per token), perplexity and bits per byte of ``checkpoint`` (a checkpoint or a run directory) on
    ``split`` of ``data_dir``; the result as one flat dict."""
    if split not in SPLITS:
        raise ValueError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    for name, v in (("--batches", batches), ("--batch-size", batch_size)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    dev = pick_device(device)
    ckpt = resolve_checkpoint(checkpoint)
    meta = read_meta(ckpt)
    data = Path(data_dir)
    check_same_tokenizer(RunTokenizer.of_run(meta, tokenizer), data)
    tok = RunTokenizer(data / "tokenizer.json")
    run = RunConfig.from_dict(meta["run_config"], source=str(ckpt / "meta.json"))
    vocab, context = meta["model_config"]["vocab_size"], meta["model_config"]["max_seq_len"]
    seq_len = min(eval_seq_len(run), context)
    batch_size = batch_size or run.train.eval_batch_size
    shards = ShardSet(data, split, vocab)  # checks the shards' ids against the model's vocabulary
    whole = (shards.total - 1) // (batch_size * seq_len)
    if whole < 1:
        raise DataError(f"data directory {str(data)!r}: the {split} split has {shards.total} tokens, fewer than one "
                        f"batch of {batch_size} x {seq_len} + 1; use a smaller --batch-size")
    if batches is not None and batches > whole:
        raise DataError(f"--batches {batches}: the {split} split of {str(data)!r} holds {whole} batches of "
                        f"{batch_size} x {seq_len} tokens ({shards.total} tokens)")
    n = batches or whole

    model, meta, ckpt = load_for_inference(ckpt, dev)
    t0 = time.perf_counter()
    total = 0.0
    with torch.no_grad():
        for x, y in val_batches(data, seq_len, batch_size, n, vocab_size=vocab, split=split):
            total += model(x.to(dev), y.to(dev)).item()  # each batch the same number of tokens: mean of means
    loss = total / n
    seconds = time.perf_counter() - t0
    tokens = n * batch_size * seq_len
    targets = shards.read(list(range(len(shards.paths))), 1, 1 + tokens)  # the windows' targets, back to back
    n_bytes = len(tok.decode(targets.tolist()).encode("utf-8"))
    if n_bytes == 0:
        raise DataError(f"the {split} split of {str(data)!r} decodes to no text (special tokens only)")
    c = model.config
    return {
        "checkpoint": str(ckpt), "step": meta["step"], "shape": f"{c.n_layer} x {c.d_model}", "params": c.num_params(),
        "data": str(data), "split": split, "seq_len": seq_len, "batch_size": batch_size, "batches": n,
        "tokens": tokens, "loss": loss, "perplexity": math.exp(loss), "bytes": n_bytes,
        "bytes_per_token": n_bytes / tokens, "bits_per_byte": bits_per_byte(loss, tokens, n_bytes),
        "device": str(dev), "seconds": round(seconds, 3),
    }


def report(result: dict, as_json: bool = False) -> str:
    """The result as text (two lines) or one JSON object."""
    if as_json:
        return json.dumps(result)
    r = result
    return (f"{r['checkpoint']} (step {r['step']}, {r['shape']}, {r['params']:,} params) on {r['data']} "
            f"{r['split']}: {r['batches']} batches x {r['batch_size']} x {r['seq_len']} = {r['tokens']:,} tokens\n"
            f"loss {r['loss']:.4f} | perplexity {r['perplexity']:.2f} | bits/byte {r['bits_per_byte']:.4f} "
            f"({r['bytes_per_token']:.3f} bytes/token) | {r['seconds']:.1f} s on {r['device']}")
