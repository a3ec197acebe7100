"""Where documents come from: each source is an iterator of text strings, one per document.

- ``"demo"``: the bundled King James Bible, one document per chapter (``corpus/kjv.jsonl.gz``). Read with the
  standard library only, so the demo needs nothing beyond the base install and starts instantly.
- ``"fineweb"``: FineWeb-Edu streamed from the Hugging Face hub (needs network), column ``text``.
- ``"debian-docs"``: an offline prose corpus from pinned Debian documentation packages (``debian.py``; the
  Handbook's part 3 corpus).
- file or directory paths: ``.parquet``, ``.jsonl`` / ``.json`` (a text column, default ``text``) and ``.txt``,
  each also ``.gz``; directories are searched recursively, files taken in sorted order. A ``.txt`` file is ONE
  document (a book, a web page): splitting on blank lines would cut prose into paragraph-sized documents and put
  an end-of-text token between every paragraph. ``txt_split="paragraph"`` or ``"line"`` asks for that split when a
  file really holds one document per paragraph or per line.

FineWeb and local files go through the same function (``_hf_stream`` then ``_texts``), so the tested local path
is the FineWeb path with another dataset name.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from collections.abc import Iterator, Sequence
from itertools import groupby
from pathlib import Path

FINEWEB = "HuggingFaceFW/fineweb-edu"
FINEWEB_CONFIG = "sample-10BT"
BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}


def demo_corpus_path() -> Path:
    return Path(__file__).resolve().parent / "corpus" / "kjv.jsonl.gz"  # package data next to this file


def iter_demo() -> Iterator[str]:
    with gzip.open(demo_corpus_path(), "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def builder_for(path: Path) -> str | None:
    """The ``datasets`` packaged builder that reads ``path`` (compression is detected from the suffix)."""
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def expand_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named, plus the supported files under directories named (sorted, recursively)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and builder_for(f))
            if not found:
                raise ValueError(f"{p}: no .parquet, .jsonl, .json or .txt files (optionally .gz) in this directory")
            files += found
        elif p.is_file():
            if not builder_for(p):
                raise ValueError(f"{p}: unsupported file type (expected .parquet, .jsonl, .json, .txt, "
                                 f"optionally .gz)")
            files.append(p)
        else:
            raise ValueError(f"{p}: no such file or directory")
    return files


def _hf_stream(path: str, **kwargs):
    """``datasets.load_dataset(..., split="train", streaming=True)``: rows arrive as they are read."""
    import datasets

    # Closing a streaming parquet iterator otherwise sleeps 5 s waiting for reader threads (measured).
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    return datasets.load_dataset(path, split="train", streaming=True, **kwargs)


def _texts(rows, column: str, where: str) -> Iterator[str]:
    for i, row in enumerate(rows):
        if i == 0 and column not in row:
            raise ValueError(f"{where}: no column {column!r}; columns are {sorted(row)} (use --text-column)")
        text = row[column]
        if text:  # an empty document would only add an end-of-text token
            yield text


TXT_SPLITS = ("document", "paragraph", "line")


def check_hub(source: str | Sequence[str]) -> None:
    """``fineweb`` streams from the Hugging Face hub: on a machine without it, fail at once (datasets would retry
    for ~23 s first). Offline mode (HF_HUB_OFFLINE) is an error; otherwise a 3 s connection to the hub's host
    decides, unless a proxy is configured (then the request itself will tell)."""
    if [str(x) for x in ([source] if isinstance(source, (str, os.PathLike)) else source)] != ["fineweb"]:
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ValueError("--source fineweb streams from the Hugging Face hub, but HF_HUB_OFFLINE is set; unset it, "
                         "or prepare local files (--source PATH ...)")
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as e:
        raise ValueError(f"--source fineweb streams from {host}, which cannot be reached from here ({e}); prepare "
                         f"local files instead (--source PATH ...)") from None


def iter_files(paths: Sequence[str | os.PathLike], text_column: str = "text",
               txt_split: str = "document") -> Iterator[str]:
    if txt_split not in TXT_SPLITS:
        raise ValueError(f"txt_split={txt_split!r} is not one of {', '.join(TXT_SPLITS)}")
    files = expand_paths(paths)  # here, not in the generator: a bad path fails at the call
    if "datasets" not in sys.modules:
        # Local files need no hub; without this, a hub lookup can retry for ~23 s on a machine without network.
        # Only before the first import: huggingface_hub reads the variable once.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return _iter_files(files, text_column, txt_split)


def _iter_files(files: list[Path], text_column: str, txt_split: str = "document") -> Iterator[str]:
    # One load_dataset per run of consecutive files of the same kind keeps the sorted file order.
    for builder, group in groupby(files, key=builder_for):
        group = [str(f) for f in group]
        where = group[0] if len(group) == 1 else f"{group[0]} (+{len(group) - 1} files)"
        if builder == "text":
            yield from _texts(_hf_stream("text", data_files=group, sample_by=txt_split), "text", where)
        else:
            yield from _texts(_hf_stream(builder, data_files=group), text_column, where)


def iter_fineweb(config: str = FINEWEB_CONFIG, text_column: str = "text") -> Iterator[str]:
    yield from _texts(_hf_stream(FINEWEB, name=config), text_column, f"{FINEWEB} ({config})")


NAMED_SOURCES = ("demo", "fineweb", "debian-docs")


def iter_documents(source: str | Sequence[str], text_column: str = "text",
                   fineweb_config: str = FINEWEB_CONFIG, txt_split: str = "document",
                   stats: dict | None = None) -> Iterator[str]:
    """Documents of ``source``: ``"demo"``, ``"fineweb"``, or one or more file / directory paths (a ``.txt``
    file is one document, or one per paragraph / line with ``txt_split``)."""
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    source = [str(s) for s in source]
    if source == ["demo"]:
        return iter_demo()
    if source == ["fineweb"]:
        return iter_fineweb(fineweb_config, text_column)
    if source == ["debian-docs"]:
        from .debian import iter_debian_docs
        return iter_debian_docs(stats=stats)
    return iter_files(source, text_column, txt_split)
