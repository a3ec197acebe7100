"""Progress of long work: prep's bar on a terminal and its periodic lines off one; the ETA of handbook run's
lines (their done / queued counts are tested with the runner, in test_handbook.py)."""

import io
import json
import sys

import pytest

from nanogrow import progress
from nanogrow.data_prep import prepare as prep
from nanogrow.progress import Progress, RunEta, duration


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_duration_is_short():
    assert [duration(s) for s in (0, 42.4, 185, 7620, -3)] == ["0s", "42s", "3m05s", "2h07m", "0s"]


def test_off_a_terminal_lines_come_at_most_every_interval_with_rate_and_eta_and_no_bar():
    clock, lines, out = Clock(), [], io.StringIO()
    p = Progress("prep", "tokens", 2_700_000, log=lines.append, file=out, every=30, clock=clock)
    assert not p.tty
    for t, done in [(10, 200_000), (20, 400_000), (31, 620_000), (50, 1_000_000), (61, 1_220_000)]:
        clock.t = t
        p.update(done, documents=done // 100)
    p.close()
    # None before the first 30 s, then one per 30 s (at 31 and 61, not at 50): the rate since the start, the ETA
    # from it and the total.
    assert lines == ["prep: 620,000 of 2,700,000 tokens (23%), 6,200 documents, 20,000 tokens/s, ETA 1m44s",
                     "prep: 1,220,000 of 2,700,000 tokens (45%), 12,200 documents, 20,000 tokens/s, ETA 1m14s"]
    assert out.getvalue() == ""  # no bar, no carriage returns in a log file


def test_off_a_terminal_without_a_total_the_rate_alone():
    clock, lines = Clock(), []
    p = Progress("prep", "tokens", None, log=lines.append, file=io.StringIO(), every=30, clock=clock)
    clock.t = 40
    p.update(800_000, documents=9)
    assert lines == ["prep: 800,000 tokens, 9 documents, 20,000 tokens/s"]


def test_on_a_terminal_a_bar_and_no_lines():
    lines, term = [], FakeTerminal()
    with Progress("prep", "tokens", 3000, log=lines.append, file=term, every=0) as p:
        assert p.tty
        for done in (1000, 2000, 3000):
            p.update(done, documents=done // 10)
    bar = term.getvalue()
    assert lines == []
    assert "\r" in bar and "prep: 100%|" in bar and "3.00k/3.00k" in bar and "tokens/s" in bar
    assert "300 documents" in bar


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_CHARS", 20_000)  # several chunks, so several updates, from a small sample


def test_prep_off_a_terminal_logs_progress_lines(tmp_path, monkeypatch, small_chunks):
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)  # a line at every chunk
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    lines = []
    meta = prep.prepare("demo", tmp_path / "out", "gpt2", max_tokens=30_000, val_tokens=2_000, log=lines.append)
    progress_lines = [line for line in lines if line.startswith("prep: ")]
    assert len(progress_lines) >= 3
    assert all(" of 32,000 tokens (" in line and " documents, " in line and " tokens/s, ETA " in line
               for line in progress_lines)
    assert progress_lines[-1].startswith("prep: 32,000 of 32,000 tokens (100%), ")
    assert lines[-1].startswith(f"prepared {tmp_path / 'out'}: ")  # the summary line as before, last
    assert sys.stderr.getvalue() == ""
    # meta.json holds what it held before: no progress fields
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    assert set(meta) == {"format", "format_version", "vocab_size", "eot_id", "documents", "tokenizer", "source",
                         "train", "val", "shard_tokens", "max_tokens", "seconds", "created"}


def test_prep_without_max_tokens_logs_the_rate_without_an_eta(tmp_path, monkeypatch, small_chunks):
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} " + "word " * 2000}) + "\n" for i in range(30)))
    lines = []
    prep.prepare([str(src)], tmp_path / "out", "gpt2", val_tokens=1_000, log=lines.append)
    progress_lines = [line for line in lines if line.startswith("prep: ")]
    assert progress_lines and all(" tokens/s" in line and "ETA" not in line and " of " not in line
                                  for line in progress_lines)


def test_prep_on_a_terminal_shows_a_bar_and_logs_no_progress_lines(tmp_path, monkeypatch, small_chunks):
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    lines = []
    prep.prepare("demo", tmp_path / "out", "gpt2", max_tokens=30_000, val_tokens=2_000, log=lines.append)
    assert not any(line.startswith("prep: ") for line in lines)
    bar = sys.stderr.getvalue()
    assert "prep: 100%|" in bar and "32.0k/32.0k" in bar and "tokens/s" in bar and "documents" in bar


# ---- handbook run ---------------------------------------------------------------------------------------------

def test_run_eta_is_the_mean_run_divided_over_the_jobs():
    eta = RunEta(jobs=2)
    assert eta.eta(4) == ""  # nothing finished: nothing to estimate from
    eta.add({"wall_seconds": 50.0, "setup_seconds": 4.0, "final_eval_seconds": 6.0})
    eta.add({"wall_seconds": 100.0})
    eta.add({"wall_seconds": 1000.0, "copied_from": "other"})  # copied, not run here: no time spent
    assert eta.eta(4) == "ETA 2m40s"  # 80 s a run, 4 runs on 2 jobs
    assert eta.eta(1) == "ETA 1m20s"  # one run left keeps one job busy
    assert eta.eta(0) == ""
    assert eta.note(3, 4) == "3 done, 4 to go, ETA 2m40s"
