"""A study's result store: one JSON line per finished run, committed next to the study file.

A record is appended only once its run has finished, in one ``os.write`` of the whole line on a file descriptor
opened with ``O_APPEND``, followed by ``fsync``: the kernel moves to the end of the file and writes in one step, so
two processes appending to the same store at once (the study runner's parallel jobs hand their records to one writer,
the parent, but two ``handbook run`` commands may share a store) interleave whole lines, never parts of lines, and an
interrupted study leaves whole records only (a torn last line, from a machine that died mid-write, is reported and
skipped, never silently read). Runs are keyed by the hash of their resolved config: a run whose key is stored is
not run again, and a changed arm has a new key (a new run), never mixed with the old results.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class Store:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: list[dict] = []
        self.torn: list[int] = []
        if self.path.exists():
            for i, line in enumerate(self.path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    self.torn.append(i)

    def keys(self) -> set[str]:
        return {r["config_hash"] for r in self.records}

    def has(self, key: str) -> bool:
        return key in self.keys()

    def append(self, record: dict) -> None:
        data = (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)  # one write: never a line assembled from several writes
            if written != len(data):  # (a full disk): the torn line is reported when the store is read
                raise OSError(f"{self.path}: wrote {written} of {len(data)} bytes of a record")
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records.append(record)

    def select(self, arm: str | None = None, scale: float | None = None, lr: float | None = None) -> list[dict]:
        return [r for r in self.records if (arm is None or r["arm"] == arm)
                and (scale is None or r["scale"] == scale) and (lr is None or r["lr"] == lr)]

    def provenance(self) -> tuple[list[str], list[str]]:
        """(short commits, machines) the records ran on, sorted: what a report cites for reproduction."""
        commits = sorted({r["commit"][:10] for r in self.records})
        machines = sorted({f"{r['machine']['cpu']} ({r['machine']['cores']} cores, torch {r['machine']['torch']})"
                           for r in self.records})
        return commits, machines
