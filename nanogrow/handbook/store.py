"""A study's result store: one JSON line per finished run, committed next to the study file.

A record is appended only once its run has finished, in one ``write`` of one line followed by ``fsync``, so an
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
        line = json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)

    def select(self, arm: str | None = None, scale: float | None = None, lr: float | None = None) -> list[dict]:
        return [r for r in self.records if (arm is None or r["arm"] == arm)
                and (scale is None or r["scale"] == scale) and (lr is None or r["lr"] == lr)]
