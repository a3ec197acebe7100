"""Data preparation: tokenizers, sources, and the shards prepare() writes from them."""

import gzip
import json

import numpy as np
import pytest

from nanogrow.data_prep import prepare as prep_mod
from nanogrow.data_prep.prepare import main, prepare
from nanogrow.data_prep.sources import iter_documents
from nanogrow.data_prep.tokenizer import load_tokenizer
from nanogrow.data import TokenLoader, list_shards, open_shard, read_meta, val_batches

DOCS = [f"Document {i}: the {w} fox jumps over {i * 7} lazy dogs.\nSecond line of {w}." for i, w in
        enumerate(["quick", "slow", "red", "blue", "tired", "happy", "wise", "brave"])]


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


def split_documents(out, split, tok):
    """Decode a split back into documents: every document is preceded by eot."""
    tokens = np.concatenate([open_shard(p)[1] for p in list_shards(out, split)]).astype(np.int64)
    eot = read_meta(out)["eot_id"]
    assert tokens[0] == eot
    starts = np.flatnonzero(tokens == eot)
    return [tok.decode(part[1:].tolist()) for part in np.split(tokens, starts[1:])]


def write_jsonl(path, docs, column="text", compress=False):
    lines = "".join(json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(docs))
    if compress:
        with gzip.open(path, "wt") as f:
            f.write(lines)
    else:
        path.write_text(lines)
    return path


# ---- tokenizers ------------------------------------------------------------------------------------------------

def test_gpt2_tokenizer_is_the_real_one(gpt2):
    tok, eot = gpt2
    assert tok.encode("Hello world").ids == [15496, 995]
    assert eot == 50256 and tok.get_vocab_size() == 50257


def test_bpe_training_on_a_tiny_corpus(tmp_path):
    tok, eot = load_tokenizer("bpe:300", DOCS * 20)
    assert eot == 0 and 257 < tok.get_vocab_size() <= 300
    ids = tok.encode(DOCS[0]).ids
    assert len(ids) < len(DOCS[0].encode()) / 2  # merges learned: far fewer tokens than bytes
    assert tok.decode(ids) == DOCS[0] and tok.decode(tok.encode("ünïcode ☃").ids) == "ünïcode ☃"  # byte-level
    tok.save(str(tmp_path / "tokenizer.json"))
    again, eot2 = load_tokenizer(str(tmp_path))  # a directory holding tokenizer.json, or the file itself
    assert again.encode(DOCS[3]).ids == tok.encode(DOCS[3]).ids and eot2 == 0


def test_bad_tokenizer_specs():
    with pytest.raises(ValueError, match="bpe:N with N an integer"):
        load_tokenizer("bpe:lots", DOCS)
    with pytest.raises(ValueError, match="needs corpus texts"):
        load_tokenizer("bpe:300")
    with pytest.raises(ValueError, match="no/such/tokenizer.json is not a file"):
        load_tokenizer("no/such/tokenizer.json")


# ---- sources ---------------------------------------------------------------------------------------------------

def test_demo_source_is_the_bundled_bible():
    docs = list(iter_documents("demo"))
    assert len(docs) == 1189  # chapters of the King James Bible
    assert docs[0].startswith("In the beginning God created the heaven and the earth.\n")
    assert docs[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")


def test_local_formats_yield_their_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": DOCS[:3], "id": [0, 1, 2]}), tmp_path / "a.parquet")
    write_jsonl(tmp_path / "b.jsonl.gz", DOCS[3:5], column="body", compress=True)
    (tmp_path / "c.txt").write_text(DOCS[5] + "\n\n" + DOCS[6])  # a .txt file is one document
    assert list(iter_documents([str(tmp_path)], text_column="body")) == DOCS[:5] + [DOCS[5] + "\n\n" + DOCS[6]]
    with pytest.raises(ValueError, match=r"a\.parquet: no column 'text'; columns are \['body', 'id'\]"):
        list(iter_documents([str(tmp_path / "a.parquet")]))
    with pytest.raises(ValueError, match="nope.csv: no such file"):
        iter_documents([str(tmp_path / "nope.csv")])


def test_fineweb_uses_the_streaming_path(tmp_path, monkeypatch):
    """FineWeb cannot be reached here: check the call it makes, and feed it a local parquet through it."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS[:2]}), tmp_path / "fw.parquet")
    real, calls = datasets.load_dataset, []

    def fake(path, **kwargs):
        calls.append((path, kwargs))
        return real("parquet", data_files=[str(tmp_path / "fw.parquet")], split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert list(iter_documents("fineweb", fineweb_config="sample-100BT")) == DOCS[:2]
    assert calls == [("HuggingFaceFW/fineweb-edu", {"name": "sample-100BT", "split": "train", "streaming": True})]


# ---- prepare ---------------------------------------------------------------------------------------------------

def test_prepare_jsonl_splits_documents_between_val_and_train(tmp_path, gpt2):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "out"
    val_tokens = 1 + len(gpt2[0].encode(DOCS[0]).ids) + 10  # all of document 0, 10 tokens of document 3
    meta = prepare([str(src)], out, "gpt2", val_tokens=val_tokens, val_every=3, shard_tokens=50,
                   log=lambda s: None)
    val_docs = split_documents(out, "val", gpt2[0])
    # Documents 0 and 3 go to val; val_tokens cuts document 3 short (its tail is dropped, not put into train).
    assert val_docs[0] == DOCS[0] and DOCS[3].startswith(val_docs[1]) and len(val_docs) == 2
    assert len(gpt2[0].encode(val_docs[1]).ids) == 9
    assert split_documents(out, "train", gpt2[0]) == [d for i, d in enumerate(DOCS) if i not in (0, 3)]
    assert meta["val"]["tokens"] == val_tokens and meta["train"]["documents"] == 6 and meta["train"]["shards"] > 1
    assert all(open_shard(p)[0].n_tokens == 50 for p in list_shards(out, "train")[:-1])
    assert read_meta(out) == meta and (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", ["docs.parquet", "docs.txt", "docs.jsonl.gz"])
def test_prepare_other_formats(tmp_path, gpt2, name):
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": DOCS}), tmp_path / name)
        sources, expected = [str(tmp_path / name)], DOCS
    elif name.endswith(".txt"):
        for i, d in enumerate(DOCS):
            (tmp_path / f"{i}.txt").write_text(d)
        sources, expected = [str(tmp_path / f"{i}.txt") for i in range(len(DOCS))], DOCS
    else:
        sources, expected = [str(write_jsonl(tmp_path / name, DOCS, compress=True))], DOCS
    prepare(sources, tmp_path / "out", "gpt2", val_tokens=0, log=lambda s: None)
    assert split_documents(tmp_path / "out", "train", gpt2[0]) == expected


def test_literal_endoftext_in_text_is_not_a_document_boundary(tmp_path, gpt2):
    docs = ["before <|endoftext|> after", "next"]
    prepare([str(write_jsonl(tmp_path / "d.jsonl", docs))], tmp_path / "out", "gpt2", val_tokens=0,
            log=lambda s: None)
    assert split_documents(tmp_path / "out", "train", gpt2[0]) == docs


def test_one_and_two_workers_write_identical_shards(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS * 5)
    monkeypatch.setattr(prep_mod, "CHUNK_CHARS", 300)  # many chunks, so two workers really interleave
    for w in (1, 2):
        prepare([str(src)], tmp_path / f"w{w}", "bpe:300", workers=w, val_tokens=100, shard_tokens=256,
                log=lambda s: None)
    names = sorted(p.name for p in (tmp_path / "w1").glob("*.bin"))
    assert len(names) > 3 and names == sorted(p.name for p in (tmp_path / "w2").glob("*.bin"))
    assert all((tmp_path / "w1" / n).read_bytes() == (tmp_path / "w2" / n).read_bytes() for n in names)


def test_max_tokens_cuts_train_exactly(tmp_path):
    meta = prepare("demo", tmp_path / "out", "gpt2", max_tokens=12_345, val_tokens=1000, log=lambda s: None)
    assert meta["train"]["tokens"] == 12_345 and meta["val"]["tokens"] == 1000


def test_cli_demo_end_to_end_and_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--source", "demo", "--tokenizer", "bpe:512", "--out", str(out), "--max-tokens", "20000",
            "--bpe-train-chars", "200000", "--shard-tokens", "4096", "--val-tokens", "2048", "--workers", "1"]
    assert main(argv) == 0
    assert "20,000 train tokens in 5 shards + 2,048 val tokens" in capsys.readouterr().out
    meta = read_meta(out)
    assert (meta["vocab_size"], meta["eot_id"], meta["source"]["source"]) == (512, 0, "demo")
    loader = TokenLoader(out, "train", 64, 4, vocab_size=512, verify=True)
    x, y = loader.next_batch()
    assert x.shape == (4, 64) and open_shard(out / "train_000000.bin")[1][0] == 0  # a document's eot first
    assert len(val_batches(out, 64, 4, 2, vocab_size=512)) == 2
    assert main(argv) == 1 and "not empty; pass --overwrite" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    assert main(argv + ["--overwrite"]) == 0 and (out / "notes.txt").read_text() == "mine"


def test_txt_is_one_document_unless_split_is_asked(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("First paragraph,\nstill first.\n\nSecond paragraph.\n")
    assert len(list(iter_documents([str(p)]))) == 1
    assert len(list(iter_documents([str(p)], txt_split="paragraph"))) == 2
    assert len(list(iter_documents([str(p)], txt_split="line"))) == 3
    with pytest.raises(ValueError, match="txt_split='words'"):
        iter_documents([str(p)], txt_split="words")


def test_fineweb_offline_fails_at_once_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import socket
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    assert main(["--source", "fineweb", "--out", str(tmp_path / "a")]) == 1
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err and not (tmp_path / "a").exists()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)

    def unreachable(*a, **k):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    assert main(["--source", "fineweb", "--out", str(tmp_path / "b")]) == 1
    assert "huggingface.co, which cannot be reached" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "b").exists()
