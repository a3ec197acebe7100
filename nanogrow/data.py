"""Token shards on disk and the rank-aware, resumable loader that streams them.

Shard format (one source of truth: ``write_shard`` writes it, ``read_header`` / ``open_shard`` read it)
-----------------------------------------------------------------------------------------------------
A shard is a 1024-byte header of 256 little-endian int32 followed by the tokens, in the spirit of llm.c /
modded-nanogpt, but self-describing enough to be checked without any side file::

    header[0]  MAGIC            int.from_bytes(b"grow", "little"); a hex dump of a shard starts with "grow"
    header[1]  VERSION          2 (1: the same without a checksum; still read)
    header[2]  token_bytes      2 (uint16, when vocab_size <= 65536) or 4 (uint32)
    header[3]  n_tokens low     n_tokens = lo + (hi << 32), both read as uint32, so shards may hold > 2^31 tokens
    header[4]  n_tokens high
    header[5]  vocab_size       of the tokenizer that wrote the shard
    header[6]  eot_id           end-of-text id that separates documents
    header[7]  max_token_id     largest id present: checking a shard against a model's vocab costs one read
    header[8:16] sha256         of the token bytes after the header (32 bytes; version 2)
    header[16:] 0               reserved

Trust: the header is checked when the split is listed; the body when a shard is first opened in a run (once, not
per batch): one read that hashes it against the sha256 above and finds its largest id, so corrupt bytes or ids the
model cannot embed stop the run with a one-line error naming the shard, whatever the header says.

Documents: every document is *preceded* by ``eot_id`` (``[eot] doc0 [eot] doc1 ...``), as in llm.c's FineWeb
script: a window that starts anywhere sees a document start announced by eot, and a shard starts with eot.

Files of a prepared data directory: ``train_000000.bin``, ``train_000001.bin``, ..., ``val_000000.bin``, ...,
``meta.json`` (vocab_size, eot_id, tokenizer, source, token counts) and ``tokenizer.json`` (HF tokenizers).

The loader
----------
``TokenLoader`` defines one *global* token stream per (data, seed): epoch ``e`` is the concatenation of the
shards in an order permuted from (seed, e); a call to ``next_batch`` consumes ``world_size * micro_batch * seq_len``
tokens of it and rank ``r`` takes the windows of ``seq_len + 1`` tokens that start at
``p + (r * micro_batch + j) * seq_len`` (``j < micro_batch``). Rank slices are thus disjoint and together cover
the stream, and the state (epoch, position, tokens consumed) is topology-free, as in OLMo-core: a run may resume
at another world size, micro-batch or sequence length and continue from the same global token.

Shuffling (``shuffle_block = B`` tokens, ``data.shuffle_block``): the epoch's stream is cut into blocks of B tokens,
which are read in an order permuted from (seed, epoch), so consecutive steps read unrelated parts of the corpus
instead of one book after another (with shard-order permutation alone, a small corpus's validation loss swings
with the text being read). B is a multiple of every sequence length a run uses, so a window never straddles two
blocks except for its one extra target token; the tail of fewer than B tokens is left out of that epoch. The
position stays a token offset in the (permuted) stream: still topology-free and exactly resumable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .integrity import sha256_file

if TYPE_CHECKING:
    import torch

MAGIC = int.from_bytes(b"grow", "little")
VERSION = 2
READABLE_VERSIONS = (1, 2)
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
LLMC_MAGICS = {20240520: "llm.c / modded-nanogpt GPT-2", 20240801: "llm.c Llama 3"}  # to make the error helpful


class DataError(ValueError):
    """A problem with the data on disk: the message names the file or directory and what is wrong."""


@dataclass(frozen=True)
class ShardHeader:
    path: str
    version: int
    token_bytes: int
    n_tokens: int
    vocab_size: int
    eot_id: int
    max_token_id: int
    sha256: str | None = None  # of the token bytes; None for a version-1 shard

    @property
    def dtype(self) -> np.dtype:
        return np.dtype("<u2" if self.token_bytes == 2 else "<u4")


def token_bytes_for(vocab_size: int) -> int:
    """2 bytes per token while every id fits in uint16 (ids < 65536), else 4."""
    return 2 if vocab_size <= 2**16 else 4


def write_shard(path: str | os.PathLike, tokens, vocab_size: int, eot_id: int) -> ShardHeader:
    """Write ``tokens`` as one shard, atomically: a reader never sees a half-written file under ``path``."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{path}: tokens must be a non-empty 1-d integer array, got shape {tokens.shape} "
                        f"dtype {tokens.dtype}")
    if not 0 <= eot_id < vocab_size:
        raise DataError(f"{path}: eot_id {eot_id} is outside the vocabulary [0, {vocab_size})")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise DataError(f"{path}: token ids must lie in [0, {vocab_size}), got min {lo} max {hi}")
    tb = token_bytes_for(vocab_size)
    n = int(tokens.size)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, tb
    header.view("<u4")[3:5] = n & 0xFFFFFFFF, n >> 32
    header[5:8] = vocab_size, eot_id, hi
    body = np.ascontiguousarray(tokens, dtype="<u2" if tb == 2 else "<u4")
    digest = hashlib.sha256(memoryview(body).cast("B")).digest()
    header[8:16] = np.frombuffer(digest, dtype="<i4")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            body.tofile(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return ShardHeader(str(path), VERSION, tb, n, vocab_size, eot_id, hi, digest.hex())


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Read and validate a shard's header, and check the file size against its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror})") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: truncated shard: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    h = np.frombuffer(raw, dtype="<i4")
    if h[0] != MAGIC:
        hint = f" (looks like an {LLMC_MAGICS[int(h[0])]} shard)" if int(h[0]) in LLMC_MAGICS else ""
        raise DataError(f"{path}: not a nanogrow shard: wrong magic number {int(h[0])}, expected {MAGIC}{hint}")
    if int(h[1]) not in READABLE_VERSIONS:
        raise DataError(f"{path}: unsupported shard format version {int(h[1])} (this code reads versions "
                        f"{', '.join(map(str, READABLE_VERSIONS))})")
    tb = int(h[2])
    if tb not in (2, 4):
        raise DataError(f"{path}: invalid token size {tb} bytes in header (expected 2 or 4)")
    u = h.view("<u4")
    n = int(u[3]) | (int(u[4]) << 32)
    vocab_size, eot_id, max_id = int(h[5]), int(h[6]), int(h[7])
    if tb == 2 and vocab_size > 2**16:
        raise DataError(f"{path}: header says vocab_size {vocab_size} but 2-byte tokens cannot hold it")
    if not (0 <= eot_id < vocab_size and max_id < vocab_size):
        raise DataError(f"{path}: inconsistent header: eot_id {eot_id}, max_token_id {max_id}, "
                        f"vocab_size {vocab_size}")
    expected = HEADER_BYTES + n * tb
    if size != expected:
        what = "truncated shard" if size < expected else "shard longer than its header says"
        raise DataError(f"{path}: {what}: header promises {n} tokens x {tb} bytes = {expected} bytes "
                        f"with the header, file has {size}")
    reserved = np.flatnonzero(h[16:])
    if reserved.size:  # written as zeros: a non-zero word is a flipped byte the checksum (body only) cannot see
        raise DataError(f"{path}: corrupt header: reserved word {16 + int(reserved[0])} (byte "
                        f"{4 * (16 + int(reserved[0]))}) is {int(h[16 + reserved[0]])}, not 0")
    digest = h[8:16].tobytes().hex() if int(h[1]) >= 2 else None
    return ShardHeader(str(path), int(h[1]), tb, n, vocab_size, eot_id, max_id, digest)


def check_vocab(header: ShardHeader, vocab_size: int | None, verify: bool = False) -> None:
    """Fail if the shard holds ids the model cannot embed.

    The cheap check trusts the header's max id; ``verify=True`` also reads the body (``verify_body``), which
    catches a header that lies and corrupt bytes. The loader verifies every shard's body when it first opens it.
    """
    if vocab_size is not None and header.max_token_id >= vocab_size:
        raise DataError(f"{header.path}: contains token id {header.max_token_id} but the model's vocab_size is "
                        f"{vocab_size} (shard written with vocab_size {header.vocab_size})")
    if verify:
        verify_body(header, vocab_size)


def verify_body(header: ShardHeader, vocab_size: int | None) -> None:
    """One read of the token bytes: their largest id against the model's vocabulary (whatever the header says)
    and the header's max id, and their sha256 against the header's (version 2)."""
    top = [-1]

    def scan(chunk: bytes) -> None:  # chunks are 4 MiB, a multiple of the token size; the file size was checked
        if chunk:
            top[0] = max(top[0], int(np.frombuffer(chunk, dtype=header.dtype).max()))

    digest = sha256_file(header.path, offset=HEADER_BYTES, each_chunk=scan)
    actual = top[0]
    if vocab_size is not None and actual >= vocab_size:
        raise DataError(f"{header.path}: verify scan found token id {actual} >= the model's vocab_size "
                        f"{vocab_size}")
    if actual != header.max_token_id:
        raise DataError(f"{header.path}: corrupt shard: header says max token id {header.max_token_id}, "
                        f"the data holds {actual}")
    if header.sha256 is not None and digest != header.sha256:
        raise DataError(f"{header.path}: corrupt shard: the tokens' sha256 {digest[:16]}... does not match the "
                        f"{header.sha256[:16]}... in its header")


def open_shard(path, vocab_size: int | None = None, verify: bool = False) -> tuple[ShardHeader, np.memmap]:
    """Validate a shard and memory-map its tokens (read-only)."""
    header = read_header(path)
    check_vocab(header, vocab_size, verify)
    tokens = np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_BYTES, shape=(header.n_tokens,))
    return header, tokens


def list_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The shards of ``split`` in index order; errors name the directory and what was found instead."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data directory {d} does not exist (prepare one with `nanogrow prep`)")
    pattern = re.compile(rf"^{re.escape(split)}_(\d+)\.bin$")
    found = sorted((int(m.group(1)), p) for p in d.iterdir() if (m := pattern.match(p.name)))
    if not found:
        others = sorted(p.name for p in d.iterdir())[:8]
        raise DataError(f"data directory {d} has no '{split}' shards ({split}_000000.bin, ...); "
                        f"it contains {others if others else 'nothing'}")
    indices = [i for i, _ in found]
    if indices != list(range(len(found))):
        missing = sorted(set(range(max(indices) + 1)) - set(indices))[:8]
        raise DataError(f"data directory {d}: '{split}' shards are not numbered 0..{len(found) - 1}; "
                        f"missing indices {missing} (incomplete copy?)")
    return [p for _, p in found]


def read_meta(data_dir: str | os.PathLike) -> dict:
    """``meta.json`` of a prepared data directory (vocab_size, eot_id, tokenizer, source, token counts)."""
    path = Path(data_dir) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} not found: not a prepared data directory (see `nanogrow prep`)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None


def check_meta_agrees(data_dir: str | os.PathLike, header: ShardHeader) -> None:
    """A data directory's ``meta.json`` is optional for training (shards carry their own vocab_size and eot_id, and
    tools other than ``nanogrow prep`` write shards without one), but one that is there must be readable and agree
    with the shards: it is what ``sample`` and ``eval`` trust for the tokenizer, so a truncated or stale one is an
    error here, not a silent surprise later."""
    if not (Path(data_dir) / "meta.json").exists():
        return
    meta = read_meta(data_dir)
    path = Path(data_dir) / "meta.json"
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key, value in (("vocab_size", header.vocab_size), ("eot_id", header.eot_id)):
        if key in meta and meta[key] != value:
            raise DataError(f"{path}: {key} {meta[key]!r} but the shards (e.g. {header.path}) say {value}: "
                            f"meta.json is stale or from another preparation")


class ShardSet:
    """The validated shards of one split, read as one stream in a given shard order.

    Memory maps are opened lazily and only a few are kept open, so a split of thousands of shards does not
    exhaust file descriptors; reading is sequential, so the cache almost always hits.
    """

    MAX_OPEN = 8

    def __init__(self, data_dir, split: str, vocab_size: int | None = None, verify: bool = False):
        self.data_dir, self.split = str(data_dir), split
        self.paths = list_shards(data_dir, split)
        self.headers = [read_header(p) for p in self.paths]
        first = self.headers[0]
        for h in self.headers:
            if (h.vocab_size, h.eot_id) != (first.vocab_size, first.eot_id):
                raise DataError(f"{h.path}: vocab_size {h.vocab_size} / eot_id {h.eot_id} differ from "
                                f"{first.path} ({first.vocab_size} / {first.eot_id}): shards of different "
                                f"tokenizers in one split")
            check_vocab(h, vocab_size, verify)
        self.vocab_size, self.eot_id = first.vocab_size, first.eot_id
        check_meta_agrees(data_dir, first)
        self.model_vocab = vocab_size
        self.sizes = np.array([h.n_tokens for h in self.headers], dtype=np.int64)
        self.total = int(self.sizes.sum())
        self._open: OrderedDict[int, np.memmap] = OrderedDict()
        self._verified = {i for i in range(len(self.paths))} if verify else set()  # bodies read and checked

    @property
    def fingerprint(self) -> str:
        """Identifies the shard set by names, sizes and header fields: cheap, and it changes if any shard does."""
        items = [[Path(h.path).name, h.version, h.token_bytes, h.n_tokens, h.vocab_size, h.eot_id, h.max_token_id]
                 for h in self.headers]
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]

    def _tokens(self, i: int) -> np.memmap:
        if i in self._open:
            self._open.move_to_end(i)
        else:
            h = self.headers[i]
            if i not in self._verified:  # once per shard per run; the LRU may reopen it later
                verify_body(h, self.model_vocab)
                self._verified.add(i)
            self._open[i] = np.memmap(h.path, dtype=h.dtype, mode="r", offset=HEADER_BYTES, shape=(h.n_tokens,))
            if len(self._open) > self.MAX_OPEN:
                self._open.popitem(last=False)
        return self._open[i]

    def read(self, order: list[int], start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the concatenation of shards in ``order``, as int64 (may straddle shards)."""
        sizes = self.sizes[order]
        ends = np.cumsum(sizes)
        out = np.empty(stop - start, dtype=np.int64)
        k = int(np.searchsorted(ends, start, side="right"))  # first shard whose end is past start
        filled, pos = 0, start
        while filled < out.size:
            begin = int(ends[k] - sizes[k])
            take = min(out.size - filled, int(ends[k]) - pos)
            out[filled:filled + take] = self._tokens(order[k])[pos - begin:pos - begin + take]
            filled, pos, k = filled + take, pos + take, k + 1
        return out


def shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard order of an epoch: sorted by a hash of (seed, epoch, index).

    A hash rather than numpy's generator, whose streams may change between numpy versions: the order must be
    reproducible for as long as a checkpoint may be resumed.
    """
    def key(i: int) -> bytes:
        return hashlib.sha256(f"{seed}:{epoch}:{i}".encode()).digest()
    return sorted(range(n_shards), key=key)


_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a fixed, version-independent hash."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(_MIX[0])
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX[1])
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX[2])
        return z ^ (z >> np.uint64(31))


def block_order(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The block permutation of an epoch: blocks sorted by a hash of (seed, epoch, index). Arithmetic rather than
    numpy's generator, for the reason ``shard_order`` gives; vectorised, so millions of blocks take a second."""
    key = _mix64(np.array([(seed & 0xFFFFFFFF) << 32 | (epoch & 0xFFFFFFFF)], dtype=np.uint64))
    return np.argsort(_mix64(np.arange(n_blocks, dtype=np.uint64) ^ key), kind="stable")


def _xy(buf: np.ndarray, batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets from ``batch * seq_len + 1`` contiguous tokens (separate storage)."""
    import torch  # here, not at the top: data preparation writes shards with this module and need not load torch
    x = torch.from_numpy(buf[:-1].reshape(batch, seq_len).copy())
    y = torch.from_numpy(buf[1:].reshape(batch, seq_len).copy())
    return x, y


class TokenLoader:
    """Yields ``(x, y)`` int64 tensors of shape [micro_batch, seq_len] from a split's shards.

    Every rank calls ``next_batch`` in lockstep, once per micro-step; see the module docstring for the global
    stream and how ranks slice it. Epoch wrap: when fewer tokens remain in the current epoch than one call needs
    (``world_size * micro_batch * seq_len + 1``), the remainder is skipped and the call starts the next epoch,
    whose shard order is permuted afresh from (seed, epoch). Skipped tokens are not counted as consumed.
    """

    def __init__(self, data_dir, split: str, seq_len: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, vocab_size: int | None = None, verify: bool = False, shuffle_block: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if shuffle_block < 0:
            raise ValueError(f"shuffle_block must be >= 0 (0 = read each shard in order), got {shuffle_block}")
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.shards = ShardSet(data_dir, split, vocab_size, verify)
        self.fingerprint = self.shards.fingerprint
        self.shuffle_block = int(shuffle_block)
        # Tokens of one epoch's stream: whole blocks only when shuffling.
        self.epoch_tokens = (self.shards.total // self.shuffle_block * self.shuffle_block if self.shuffle_block
                             else self.shards.total)
        if self.shuffle_block and self.epoch_tokens == 0:
            raise DataError(f"data directory {self.shards.data_dir}: split '{split}' has {self.shards.total} tokens, "
                            f"fewer than one shuffle block of {self.shuffle_block}")
        self._blocks: tuple[int, np.ndarray] | None = None
        self.seq_len = self.micro_batch = 0
        self.set_batch_shape(micro_batch, seq_len)
        self.epoch = 0
        self.position = 0  # tokens of the current epoch's stream already consumed
        self.tokens_consumed = 0  # over all epochs
        self._order: tuple[int, list[int]] | None = None

    def set_batch_shape(self, micro_batch: int | None = None, seq_len: int | None = None) -> None:
        """Change the per-rank batch shape between calls (growth stages do); the global position is kept."""
        micro_batch = self.micro_batch if micro_batch is None else int(micro_batch)
        seq_len = self.seq_len if seq_len is None else int(seq_len)
        if micro_batch < 1 or seq_len < 1:
            raise ValueError(f"micro_batch and seq_len must be >= 1, got {micro_batch} and {seq_len}")
        if self.shuffle_block and self.shuffle_block % seq_len:
            raise ValueError(f"data.shuffle_block {self.shuffle_block} must be a multiple of every seq_len the run "
                             f"uses, got seq_len {seq_len}")
        need = self.world_size * micro_batch * seq_len + 1
        if need > self.epoch_tokens:
            raise DataError(f"data directory {self.shards.data_dir}: split '{self.shards.split}' has "
                            f"{self.shards.total} tokens, fewer than one step needs ({self.world_size} ranks x "
                            f"{micro_batch} x {seq_len} + 1 = {need})")
        self.micro_batch, self.seq_len = micro_batch, seq_len

    @property
    def tokens_per_step(self) -> int:
        """Tokens the global stream advances per ``next_batch`` call (over all ranks)."""
        return self.world_size * self.micro_batch * self.seq_len

    def _epoch_order(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, shard_order(len(self.shards.paths), self.seed, self.epoch))
        return self._order[1]

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of this epoch's stream (block-permuted when shuffling)."""
        if not self.shuffle_block:
            return self.shards.read(self._epoch_order(), start, stop)
        B = self.shuffle_block
        if self._blocks is None or self._blocks[0] != self.epoch:
            self._blocks = (self.epoch, block_order(self.epoch_tokens // B, self.seed, self.epoch))
        perm, pieces, pos = self._blocks[1], [], start
        while pos < stop:
            block, offset = divmod(pos, B)
            take = min(stop - pos, B - offset)
            physical = int(perm[block]) * B + offset
            pieces.append(self.shards.read(self._epoch_order(), physical, physical + take))
            pos += take
        return np.concatenate(pieces)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.tokens_per_step
        if self.position + step + 1 > self.epoch_tokens:
            self.epoch, self.position = self.epoch + 1, 0
        per_rank = self.micro_batch * self.seq_len
        start = self.position + self.rank * per_rank
        buf = self._read(start, start + per_rank + 1)
        self.position += step
        self.tokens_consumed += step
        return _xy(buf, self.micro_batch, self.seq_len)

    def state_dict(self) -> dict:
        """Global, JSON-able state; identical on every rank. The batch shape is recorded for information only."""
        return {"version": 1, "split": self.shards.split, "seed": self.seed, "fingerprint": self.fingerprint,
                "shuffle_block": self.shuffle_block,
                "epoch": self.epoch, "position_in_epoch": self.position, "tokens_consumed": self.tokens_consumed,
                "world_size": self.world_size, "micro_batch": self.micro_batch, "seq_len": self.seq_len}

    def load_state_dict(self, sd: dict) -> None:
        """Continue from ``sd``'s global position, whatever world size / batch shape wrote it."""
        if sd.get("fingerprint") != self.fingerprint:
            raise DataError(f"data directory {self.shards.data_dir}: loader state was saved on shard set "
                            f"{sd.get('fingerprint')!r} but split '{self.shards.split}' here has fingerprint "
                            f"{self.fingerprint!r} (different or changed data)")
        if sd.get("seed") != self.seed:
            raise DataError(f"loader state was saved with seed {sd.get('seed')!r} but this loader has seed "
                            f"{self.seed!r}; the token stream would differ")
        if int(sd.get("shuffle_block", 0)) != self.shuffle_block:
            raise DataError(f"loader state was saved with data.shuffle_block {sd.get('shuffle_block', 0)} but this "
                            f"run has {self.shuffle_block}; the token stream would differ")
        if not 0 <= int(sd["position_in_epoch"]) <= self.shards.total:
            raise DataError(f"loader state position {sd['position_in_epoch']} is outside the split's "
                            f"{self.shards.total} tokens")
        self.epoch, self.position = int(sd["epoch"]), int(sd["position_in_epoch"])
        self.tokens_consumed = int(sd["tokens_consumed"])


class PrefetchLoader:
    """A ``TokenLoader`` whose next batch is read in a background thread while the current step computes (and
    pinned, with ``pin=True``, so that ``.to(cuda, non_blocking=True)`` really overlaps the copy).

    The token stream is the wrapped loader's, batch for batch. The loader runs one batch ahead, so the state this
    wrapper reports is the one from before the batch in flight (the position of the batches handed out), and
    anything that moves the stream (``load_state_dict``, ``set_batch_shape``) first drops that batch and rewinds
    the loader to it: checkpoints and resume are exactly those of the plain loader."""

    def __init__(self, loader: TokenLoader, pin: bool = False):

        self.loader, self.pin = loader, pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanogrow-prefetch")
        self._pending = None  # (future of (x, y), the loader's position before that batch)

    def _position(self) -> tuple[int, int, int]:
        return self.loader.epoch, self.loader.position, self.loader.tokens_consumed

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.loader.next_batch()
        return (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)

    def _prefetch(self) -> None:
        before = self._position()  # read before the reader starts: it moves the loader on
        self._pending = (self._pool.submit(self._read), before)

    def _drop(self) -> None:
        """Forget the batch in flight and rewind the loader to before it."""
        if self._pending is not None:
            future, (epoch, position, consumed) = self._pending
            future.result()  # let the reader finish before its state is rewound
            self.loader.epoch, self.loader.position, self.loader.tokens_consumed = epoch, position, consumed
            self._pending = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pending is None:
            self._prefetch()
        batch = self._pending[0].result()
        self._prefetch()
        return batch

    def set_batch_shape(self, micro_batch: int | None = None, seq_len: int | None = None) -> None:
        self._drop()
        self.loader.set_batch_shape(micro_batch, seq_len)

    def state_dict(self) -> dict:
        sd = self.loader.state_dict() if self._pending is None else None
        if sd is None:
            future, (epoch, position, consumed) = self._pending
            future.result()  # the loader's other fields are not changed by a read, but wait for a quiet copy
            sd = dict(self.loader.state_dict(), epoch=epoch, position_in_epoch=position, tokens_consumed=consumed)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self._drop()
        self.loader.load_state_dict(sd)

    def close(self) -> None:
        self._drop()
        self._pool.shutdown(wait=True)

    def __getattr__(self, name):  # seq_len, micro_batch, tokens_per_step, fingerprint, ...: the loader's
        if name in ("epoch", "position", "tokens_consumed"):
            self._drop()  # the position of the batches handed out, not of the one in flight
        return getattr(self.__dict__["loader"], name)


def val_batches(data_dir, seq_len: int, batch_size: int, n_batches: int, rank: int = 0, world_size: int = 1,
                vocab_size: int | None = None, split: str = "val") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed evaluation batches from the ``val`` split (or ``test``): the same set for every run on the same data.

    ``batch_size`` is the *global* number of sequences per batch; rank ``r`` gets its ``batch_size // world_size``
    of them, sliced like ``TokenLoader`` slices. So the evaluated set does not depend on the seed nor on the
    world size, and validation losses stay comparable across runs and topologies. The val shards are read in
    file order from the start; batch ``k``'s window ``i`` starts at token ``(k * batch_size + i) * seq_len``.
    The split is never wrapped (repeated windows would weigh some text twice): too small a split is an error.
    """
    if batch_size < 1 or n_batches < 1 or seq_len < 1 or batch_size % world_size:
        raise ValueError(f"val_batches needs positive sizes and batch_size divisible by world_size; got "
                         f"batch_size {batch_size}, n_batches {n_batches}, seq_len {seq_len}, "
                         f"world_size {world_size}")
    shards = ShardSet(data_dir, split, vocab_size)
    need = n_batches * batch_size * seq_len + 1
    if need > shards.total:
        raise DataError(f"data directory {data_dir}: the {split} split has {shards.total} tokens, fewer than "
                        f"{n_batches} batches x {batch_size} sequences x {seq_len} tokens + 1 = {need}")
    per_rank = batch_size // world_size
    order = list(range(len(shards.paths)))
    out = []
    for k in range(n_batches):
        start = (k * batch_size + rank * per_rank) * seq_len
        out.append(_xy(shards.read(order, start, start + per_rank * seq_len + 1), per_rank, seq_len))
    return out
