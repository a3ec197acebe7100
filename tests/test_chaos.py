"""The chaos harness (tests/dist/chaos.py) at fixed kill points: one rank of a 2-process run grown twice is
SIGKILLed, torchrun restarts the worker group, and the run resumes by itself from the newest complete checkpoint
to the uninterrupted run's final weights, optimizer state and data position, bit for bit. One point of each kind
here (FSDP2), two under ZeRO-2; ``python tests/dist/chaos.py --backend fsdp --trials 20`` draws many."""

from __future__ import annotations

import pytest

from dist import chaos  # tests/dist/chaos.py

pytestmark = pytest.mark.slow  # every test here launches torchrun (twice per kill point)

POINTS = {
    "fsdp": ["step 5@1", "grow 2@0", "save 2 write@1", "save 3 tensors@0", "save 4 meta@0", "save 5 rename@0",
             "save 5 rotate@0"],
    "zero2": ["grow 1@1", "save 4 tensors@1"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_data):
    """{backend: (work dir, the uninterrupted run's final state)}, made on first use."""
    made = {}

    def get(backend):
        if backend not in made:
            work = tmp_path_factory.mktemp(f"chaos-{backend}")
            ref = chaos.trial(backend, demo_data, work, None)
            assert ref["rc"] == 0, ref["log"].read_text()[-3000:]
            made[backend] = (work, chaos.final_state(ref["out"]))
        return made[backend]
    return get


@pytest.mark.parametrize("backend,point", [(b, p) for b, ps in POINTS.items() for p in ps])
def test_a_killed_rank_restarts_and_resumes_to_the_uninterrupted_state(backend, point, runs, demo_data):
    if backend == "zero2":
        pytest.importorskip("deepspeed")
    work, reference = runs(backend)
    result = chaos.trial(backend, demo_data, work, point)
    assert chaos.check(result, reference) == [], result["log"].read_text()[-3000:]


def test_every_kill_point_is_a_point_of_the_run():
    points = chaos.kill_points()
    assert len(points) == len(set(points)) >= 40
    assert all(p in points for ps in POINTS.values() for p in ps)


def test_the_comparison_catches_one_changed_element():
    import torch

    state = {"step": 12, "tokens": 3072, "loader": {"position_in_epoch": 3072}, "shape": 4,
             "tensors": {"model/w": torch.zeros(3), "optim/w/exp_avg": torch.ones(3)}}
    nudged = dict(state, tensors=dict(state["tensors"], **{"optim/w/exp_avg": torch.tensor([1.0, 1.0, 1.0 + 2**-20])}))
    assert chaos.differences(state, state) == []
    assert chaos.differences(state, nudged) == ["optim/w/exp_avg differs (max |diff| 9.54e-07)"]
    assert chaos.differences(state, dict(state, loader={"position_in_epoch": 3008}))


def test_a_restarted_worker_group_continues_from_its_newest_checkpoint(grown_run, tmp_path, monkeypatch, capsys):
    """What ``nanogrow train`` does in a group torchrun restarted: resume from the out_dir's newest complete
    checkpoint, dropping --overwrite and an explicit --resume; with no checkpoint yet, what the command line said."""
    from nanogrow.checkpoint import latest_checkpoint
    from nanogrow.cli import restart_resume

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert restart_resume(str(grown_run), None, True) == (None, True)  # the first attempt: as asked
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert restart_resume(str(grown_run), "elsewhere/ckpt_0000001", True) == ("auto", False)
    assert str(latest_checkpoint(grown_run)) in capsys.readouterr().err
    assert restart_resume(str(tmp_path / "nothing yet"), None, True) == (None, True)
