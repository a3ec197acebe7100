"""One job per train.out_dir: a second run on a directory in use is refused naming the holder, a lock left by a
dead run is taken over with a note, and Trainers of one process share the lock."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import tiny_run_config
from nanogrow import run_lock
from nanogrow.checkpoint import CheckpointError
from nanogrow.train import Trainer

HOLD = textwrap.dedent("""
    import sys, time
    from nanogrow import run_lock
    run_lock.acquire(sys.argv[1])
    print("held", flush=True)
    sys.stdin.readline()  # hold until the test closes our stdin
    run_lock.release(sys.argv[1])
""")


def test_a_second_job_on_a_directory_in_use_is_refused_naming_the_holder(demo_data, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=rf"is in use by another run \(host \S+, pid {holder.pid}, since "):
            Trainer(tiny_run_config(demo_data, out), resume="auto", log=lambda *_: None)
        assert not any(out.glob("ckpt_*")) and not (out / "train.log").exists()  # nothing touched
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    notes = []  # the holder ended cleanly (its lock released): the next run starts without a note
    Trainer(tiny_run_config(demo_data, out), log=notes.append)
    assert not any("took over" in n for n in notes)


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_note(demo_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / run_lock.LOCK_NAME).write_text(json.dumps({"host": "node7", "pid": 4242, "started": "2026-01-01T00:00:00"}))
    notes = []
    trainer = Trainer(tiny_run_config(demo_data, out, max_steps=2), log=notes.append)
    assert any("took over the lock of a run that ended without releasing it (host node7, pid 4242" in n
               for n in notes)
    held = json.loads((out / run_lock.LOCK_NAME).read_text())
    assert held["pid"] == os.getpid()
    Trainer(tiny_run_config(demo_data, out, max_steps=2), resume="auto", log=lambda *_: None)  # same process: shared
    trainer.run()
    assert (out / run_lock.LOCK_NAME).read_text() == ""  # released at the end of the run
    run_lock.release(out)  # (the second Trainer never trained; releasing twice is harmless)
