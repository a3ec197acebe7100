"""The shard format and the loader: round trips, clear errors, and the global-stream properties resume relies on."""

import json
import re

import numpy as np
import pytest
import torch

from nanogrow.data import (HEADER_BYTES, MAGIC, DataError, PrefetchLoader, TokenLoader, open_shard, read_header,
                           shard_order, val_batches, write_shard)

# Shards whose tokens are all distinct (1..5300, eot 0 never used) so a token names its place in the stream.
SIZES = [1000, 1500, 700, 1200, 900]
VOCAB = 70_000  # > 65536: uint32 shards, ids up to 5300 fit


def make_dir(path, sizes=SIZES, split="train", vocab=VOCAB):
    path.mkdir(parents=True, exist_ok=True)
    start = 1
    for i, n in enumerate(sizes):
        write_shard(path / f"{split}_{i:06d}.bin", np.arange(start, start + n), vocab, 0)
        start += n
    return path


def stream(path, seed, epoch, split="train"):
    """The documented epoch stream: shards concatenated in shard_order(seed, epoch)."""
    shards = [open_shard(path / f"{split}_{i:06d}.bin")[1] for i in range(len(SIZES))]
    return np.concatenate([shards[i] for i in shard_order(len(shards), seed, epoch)]).astype(np.int64)


@pytest.fixture
def data(tmp_path):
    d = make_dir(tmp_path / "data")
    make_dir(d, sizes=[600, 500], split="val")
    return d


# ---- format ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab,token_bytes", [(50257, 2), (65536, 2), (65537, 4), (128256, 4)])
def test_write_read_roundtrip(tmp_path, vocab, token_bytes):
    tokens = np.array([vocab - 1, 0, 17, 5, vocab - 2])
    h = write_shard(tmp_path / "train_000000.bin", tokens, vocab, eot_id=3)
    assert (tmp_path / "train_000000.bin").stat().st_size == HEADER_BYTES + token_bytes * tokens.size
    header, data = open_shard(tmp_path / "train_000000.bin", vocab_size=vocab, verify=True)
    assert header == h == read_header(tmp_path / "train_000000.bin")
    assert (header.token_bytes, header.n_tokens, header.vocab_size, header.eot_id, header.max_token_id) == (
        token_bytes, 5, vocab, 3, vocab - 1)
    np.testing.assert_array_equal(data, tokens)
    assert list(tmp_path.iterdir()) == [tmp_path / "train_000000.bin"]  # the temporary file is gone


def test_token_count_beyond_int32(tmp_path):
    path = tmp_path / "big.bin"
    write_shard(path, np.arange(10), 1000, 0)
    n = 2**31 + 5
    header = np.fromfile(path, dtype="<i4", count=256)
    header.view("<u4")[3:5] = n & 0xFFFFFFFF, n >> 32
    with open(path, "r+b") as f:
        f.write(header.tobytes())
        f.truncate(HEADER_BYTES + 2 * n)  # sparse: costs no disk
    assert read_header(path).n_tokens == n


def test_write_rejects_ids_outside_vocab(tmp_path):
    with pytest.raises(DataError, match=r"x\.bin.*\[0, 100\)"):
        write_shard(tmp_path / "x.bin", [1, 100], 100, 0)


def test_truncated_shard_names_file(tmp_path):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(100), 1000, 0)
    with open(path, "r+b") as f:
        f.truncate(HEADER_BYTES + 150)
    with pytest.raises(DataError, match=r"train_000000\.bin: truncated shard.*100 tokens x 2 bytes"):
        read_header(path)
    with open(path, "r+b") as f:
        f.truncate(500)
    with pytest.raises(DataError, match=r"train_000000\.bin: truncated shard: 500 bytes"):
        TokenLoader(tmp_path, "train", 4, 1)


def test_wrong_magic_and_version_name_file(tmp_path):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(100), 1000, 0)
    raw = bytearray(path.read_bytes())
    raw[:4] = np.int32(20240520).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"train_000000\.bin: not a nanogrow shard: wrong magic number "
                                        rf"20240520, expected {MAGIC} \(looks like an llm.c"):
        read_header(path)
    raw[:8] = np.array([MAGIC, 7], dtype="<i4").tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train_000000\.bin: unsupported shard format version 7"):
        read_header(path)


def test_ids_beyond_model_vocab_name_file(tmp_path):
    write_shard(tmp_path / "train_000000.bin", np.arange(900), 1000, 0)
    with pytest.raises(DataError, match=r"train_000000\.bin: contains token id 899 but the model's vocab_size "
                                        r"is 512"):
        TokenLoader(tmp_path, "train", 8, 2, vocab_size=512)
    TokenLoader(tmp_path, "train", 8, 2, vocab_size=900)  # exactly fits


def test_verify_scan_catches_a_lying_header(tmp_path):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(100), 1000, 0)  # header max id 99
    raw = bytearray(path.read_bytes())
    raw[HEADER_BYTES + 20:HEADER_BYTES + 22] = np.uint16(5000).tobytes()  # token 10 := 5000
    path.write_bytes(bytes(raw))
    TokenLoader(tmp_path, "train", 8, 2, vocab_size=1000)  # the cheap check trusts the header
    with pytest.raises(DataError, match=r"train_000000\.bin: verify scan found token id 5000 >= the model's "
                                        r"vocab_size 1000"):
        TokenLoader(tmp_path, "train", 8, 2, vocab_size=1000, verify=True)
    with pytest.raises(DataError, match=r"train_000000\.bin: corrupt shard: header says max token id 99"):
        open_shard(path, verify=True)


def test_a_flipped_byte_in_the_reserved_header_area_is_an_error(tmp_path):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(100), 1000, 0)
    raw = bytearray(path.read_bytes())
    raw[200] ^= 0x10  # byte 200: reserved word 50
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train_000000\.bin: corrupt header: reserved word 50 \(byte 200\) is "):
        read_header(path)


def test_a_data_dir_meta_json_must_be_readable_and_agree_with_its_shards(tmp_path):
    make_dir(tmp_path, sizes=[100])
    TokenLoader(tmp_path, "train", 8, 2)  # no meta.json: fine (shards carry vocab and eot)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"vocab_size": VOCAB, "eot_id": 0, "tokenizer": {"spec": "x"}}))
    TokenLoader(tmp_path, "train", 8, 2)
    meta.write_text(meta.read_text()[:20])  # truncated
    with pytest.raises(DataError, match=rf"{re.escape(str(meta))}: invalid JSON"):
        TokenLoader(tmp_path, "train", 8, 2)
    meta.write_text(json.dumps({"vocab_size": 50257, "eot_id": 0}))
    with pytest.raises(DataError, match=r"meta\.json: vocab_size 50257 but the shards .* say 70000: meta\.json is "
                                        r"stale"):
        TokenLoader(tmp_path, "train", 8, 2)


def test_missing_or_empty_data_dir_names_it(tmp_path):
    with pytest.raises(DataError, match=rf"data directory {re.escape(str(tmp_path / 'nope'))} does not exist"):
        TokenLoader(tmp_path / "nope", "train", 8, 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'empty'))} has no 'train' shards .* contains "
                                        rf"nothing"):
        TokenLoader(tmp_path / "empty", "train", 8, 2)
    make_dir(tmp_path / "only_train", sizes=[100])
    with pytest.raises(DataError, match=r"only_train has no 'val' shards .*'train_000000.bin'"):
        val_batches(tmp_path / "only_train", 8, 2, 1)


def test_gap_in_shard_numbers_is_an_error(tmp_path):
    make_dir(tmp_path, sizes=[100, 100, 100])
    (tmp_path / "train_000001.bin").unlink()
    with pytest.raises(DataError, match=r"missing indices \[1\]"):
        TokenLoader(tmp_path, "train", 8, 2)


def test_split_smaller_than_one_step_is_an_error(data):
    with pytest.raises(DataError, match=r"5300 tokens, fewer than one step needs \(2 ranks x 10 x 300 \+ 1 = 6001\)"):
        TokenLoader(data, "train", 300, 10, world_size=2)


# ---- loader ----------------------------------------------------------------------------------------------------

def test_next_batch_reads_the_documented_windows(data):
    T, B, W = 16, 3, 2
    s = stream(data, seed=5, epoch=0)
    loaders = [TokenLoader(data, "train", T, B, rank=r, world_size=W, seed=5) for r in range(W)]
    for step in range(4):
        for r, loader in enumerate(loaders):
            x, y = loader.next_batch()
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, T)
            for j in range(B):
                p = step * W * B * T + (r * B + j) * T
                np.testing.assert_array_equal(x[j].numpy(), s[p:p + T])
                np.testing.assert_array_equal(y[j].numpy(), s[p + 1:p + T + 1])


@pytest.mark.parametrize("world", [2, 3])
def test_rank_slices_are_disjoint_and_cover_the_world1_stream(data, world):
    T, B = 16, 2
    ref = TokenLoader(data, "train", T, B * world, seed=1)
    ranks = [TokenLoader(data, "train", T, B, rank=r, world_size=world, seed=1) for r in range(world)]
    for _ in range(100):  # 100 * world * 32 tokens > 5300: crosses at least one epoch wrap
        x_ref, y_ref = ref.next_batch()
        xs, ys = zip(*(loader.next_batch() for loader in ranks))
        assert torch.equal(torch.cat(xs), x_ref) and torch.equal(torch.cat(ys), y_ref)
        assert torch.cat(xs).unique().numel() == x_ref.numel()  # disjoint: every token of the step once
    assert ref.epoch >= 1 and all(loader.state_dict() == ranks[0].state_dict() for loader in ranks)
    assert (ref.epoch, ref.position, ref.tokens_consumed) == (ranks[0].epoch, ranks[0].position,
                                                              ranks[0].tokens_consumed)


def test_resume_continues_exactly(data):
    full = TokenLoader(data, "train", 32, 4, seed=3)
    part = TokenLoader(data, "train", 32, 4, seed=3)
    for _ in range(30):
        full.next_batch(), part.next_batch()
    state = json.loads(json.dumps(part.state_dict()))  # it must survive a JSON checkpoint
    resumed = TokenLoader(data, "train", 32, 4, seed=3)
    resumed.load_state_dict(state)
    for _ in range(30):  # crosses the wrap into epoch 1
        assert all(torch.equal(a, b) for a, b in zip(full.next_batch(), resumed.next_batch()))
    assert resumed.state_dict() == full.state_dict() and full.epoch >= 1


def test_resume_at_other_world_size_and_batch_shape_keeps_global_position(data):
    ref = TokenLoader(data, "train", 16, 6, seed=2)
    for _ in range(5):
        ref.next_batch()
    state = ref.state_dict()
    p = state["position_in_epoch"]
    s = stream(data, seed=2, epoch=0)
    # Same global batch at world 2: the union of the ranks is exactly the uninterrupted stream.
    ranks = [TokenLoader(data, "train", 16, 3, rank=r, world_size=2, seed=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    x_ref, _ = ref.next_batch()
    assert torch.equal(torch.cat([loader.next_batch()[0] for loader in ranks]), x_ref)
    # Another world size, micro_batch and seq_len: rank 0's first window starts at the same global token.
    other = TokenLoader(data, "train", 8, 1, rank=0, world_size=3, seed=2)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.next_batch()[0][0].numpy(), s[p:p + 8])
    assert other.state_dict()["tokens_consumed"] == state["tokens_consumed"] + 3 * 8


def test_set_batch_shape_keeps_global_position(data):
    loader = TokenLoader(data, "train", 16, 4, seed=0)
    s = stream(data, seed=0, epoch=0)
    loader.next_batch()
    loader.set_batch_shape(micro_batch=2, seq_len=24)
    x, _ = loader.next_batch()
    np.testing.assert_array_equal(x.flatten().numpy(), s[64:64 + 48])
    loader.set_batch_shape(seq_len=8)
    np.testing.assert_array_equal(loader.next_batch()[0].flatten().numpy(), s[112:128])
    assert loader.tokens_consumed == 128


def test_epoch_wrap_is_deterministic_and_reshuffles(data):
    a, b = (TokenLoader(data, "train", 100, 4, seed=7) for _ in range(2))  # 400 tokens per step
    steps = [a.next_batch() for _ in range(14)]  # epoch 0 fits 13 steps: 13 * 400 + 1 <= 5300 < 14 * 400 + 1
    assert (a.epoch, a.position, a.tokens_consumed) == (1, 400, 14 * 400)
    assert all(torch.equal(x, b.next_batch()[0]) for x, _ in steps)
    np.testing.assert_array_equal(steps[13][0].flatten().numpy(), stream(data, 7, 1)[:400])
    assert len({tuple(shard_order(5, 7, e)) for e in range(4)}) > 1  # epochs see the shards in new orders


def test_load_state_rejects_other_data_or_seed(data, tmp_path):
    state = TokenLoader(data, "train", 16, 2, seed=0).state_dict()
    other = TokenLoader(make_dir(tmp_path / "other", sizes=[1000, 1500, 700, 1200, 901]), "train", 16, 2, seed=0)
    with pytest.raises(DataError, match=rf"{state['fingerprint']}.*fingerprint '{other.fingerprint}'"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match=r"saved with seed 0 but this loader has seed 1"):
        TokenLoader(data, "train", 16, 2, seed=1).load_state_dict(state)


def test_val_batches_fixed_and_rank_sliced(data):
    one = val_batches(data, 16, 4, 3)
    assert all(torch.equal(a, b) for (x1, y1), (x2, y2) in zip(one, val_batches(data, 16, 4, 3))
               for a, b in ((x1, x2), (y1, y2)))
    assert torch.equal(one[0][0].flatten(), torch.arange(1, 65))  # no seed: val shards in file order, from token 0
    two = [val_batches(data, 16, 4, 3, rank=r, world_size=2) for r in range(2)]
    for k in range(3):
        assert torch.equal(torch.cat([two[0][k][0], two[1][k][0]]), one[k][0])
        assert torch.equal(torch.cat([two[0][k][1], two[1][k][1]]), one[k][1])
    with pytest.raises(DataError, match=r"val split has 1100 tokens, fewer than 5 batches x 16 sequences x 16 "
                                        r"tokens \+ 1 = 1281"):
        val_batches(data, 16, 16, 5)


# ---- block shuffling (data.shuffle_block) -----------------------------------------------------------------------

def test_shuffled_epoch_reads_every_block_once_in_a_seeded_order(data):
    """An epoch of 5300 tokens in blocks of 64: 82 whole blocks (the 52-token tail is left out), each read once,
    whole, in an order that depends on seed and epoch; the windows inside a block are the stream's."""
    B, T = 64, 16
    s = stream(data, seed=4, epoch=0)
    where = {int(tok): i for i, tok in enumerate(s)}  # tokens are distinct: a token names its place in the stream
    loader = TokenLoader(data, "train", T, 4, seed=4, shuffle_block=B)  # 64 tokens per step: one block
    assert loader.epoch_tokens == 5300 // B * B
    starts = []
    for _ in range(5300 // B - 1):  # the last block cannot give its final target token inside the epoch
        x, y = loader.next_batch()
        flat = x.flatten().numpy()
        i = where[int(flat[0])]
        assert i % B == 0, "a step starts at a block boundary"
        np.testing.assert_array_equal(flat, s[i:i + B])
        starts.append(i // B)
    assert len(set(starts)) == len(starts) == 5300 // B - 1
    assert starts != sorted(starts)
    other = TokenLoader(data, "train", T, 4, seed=5, shuffle_block=B)
    assert [where[other.next_batch()[0][0, 0].item()] // B for _ in range(5)] != starts[:5]


def test_shuffled_stream_resumes_exactly_at_another_world_size(data):
    ref = TokenLoader(data, "train", 16, 4, seed=2, shuffle_block=128)
    for _ in range(7):
        ref.next_batch()
    state = json.loads(json.dumps(ref.state_dict()))
    ranks = [TokenLoader(data, "train", 16, 2, rank=r, world_size=2, seed=2, shuffle_block=128) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    for _ in range(100):  # crosses epoch wraps
        x_ref, _ = ref.next_batch()
        assert torch.equal(torch.cat([loader.next_batch()[0] for loader in ranks]), x_ref)
    assert ref.epoch >= 1
    with pytest.raises(DataError, match="shuffle_block 128 but this run has 0"):
        TokenLoader(data, "train", 16, 4, seed=2).load_state_dict(state)


def test_shuffle_block_must_be_a_multiple_of_seq_len(data, tmp_path):
    from nanogrow.config import ConfigError, load_config

    with pytest.raises(ValueError, match="shuffle_block 100 must be a multiple of every seq_len"):
        TokenLoader(data, "train", 16, 4, shuffle_block=100)
    with pytest.raises(ConfigError, match=r"data.shuffle_block=96 must be 0 or a multiple of every seq_len.*\[64\]"):
        load_config(None, ["data.shuffle_block=96", "data.seq_len=64", "model.max_seq_len=64"])


@pytest.mark.parametrize("shuffle_block", [0, 64])
def test_prefetching_loader_gives_the_same_stream_and_resumes_exactly(data, shuffle_block):
    """The prefetching wrapper hands out the plain loader's batches; its state is that of the batches handed out
    (not of the one in flight), through an epoch wrap, a batch-shape change and a resume from that state."""
    plain = TokenLoader(data, "train", 32, 4, seed=3, shuffle_block=shuffle_block)
    fast = PrefetchLoader(TokenLoader(data, "train", 32, 4, seed=3, shuffle_block=shuffle_block))
    for i in range(70):  # crosses the wrap into epoch 1
        assert all(torch.equal(a, b) for a, b in zip(plain.next_batch(), fast.next_batch()))
        if i == 5:
            assert fast.state_dict() == plain.state_dict()  # a batch is in flight, not counted
    plain.set_batch_shape(2, 16)
    fast.set_batch_shape(2, 16)  # the batch in flight had the old shape: dropped, stream rewound
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(plain.next_batch(), fast.next_batch()))
    state = json.loads(json.dumps(fast.state_dict()))
    assert state == plain.state_dict() and fast.tokens_consumed == plain.tokens_consumed and plain.epoch >= 1
    resumed = PrefetchLoader(TokenLoader(data, "train", 16, 2, seed=3, shuffle_block=shuffle_block))
    resumed.next_batch()  # a loader that has moved (and prefetched) before the state is loaded
    resumed.load_state_dict(state)
    for _ in range(5):
        assert all(torch.equal(a, b) for a, b in zip(plain.next_batch(), resumed.next_batch()))
    fast.close()
    resumed.close()
