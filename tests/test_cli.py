"""The command line as a user meets it: one-line errors for what the machine cannot do, help for every verb and
option, the config reference, the version."""

import argparse

import pytest
import torch

from nanogrow.cli import main


def one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanogrow: error: ") and err.count("\n") == 1 and match in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine can train on cuda")
def test_cuda_device_on_a_cpu_torch_is_a_one_line_error(capsys, tmp_path):
    one_line_error(capsys, ["train", "--set", "train.device='cuda'", "--set", f"train.out_dir='{tmp_path}'"],
                   "train.device='cuda' but torch")
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton may run on a CUDA machine")
def test_triton_kernels_without_a_gpu_are_a_one_line_error(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    one_line_error(capsys, ["train", "--set", "model.kernels='triton'", "--set", f"train.out_dir='{tmp_path}'"],
                   "model.kernels='triton' but the Triton kernels cannot run")


def test_bench_grow_without_torchrun_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one_line_error(capsys, ["bench", "grow"], "launch it under torchrun")


def test_bench_sub_verbs_take_only_their_own_options(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "grow", "--config", "demo"])  # bench grow builds its own model
    assert "unrecognized arguments: --config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "lag", "--help"])
    assert "--out" in capsys.readouterr().out


def test_bench_optimizer_times_each_mode_against_the_first(capsys):
    assert main(["bench", "optimizer", "--config", "demo", "--rounds", "1", "--steps", "1",
                 "--modes", "torch-foreach,ours,ours-ages-mixed"]) == 0
    out = capsys.readouterr().out
    assert "optimizer step" in out and "ours-ages-mixed" in out and "of torch-foreach" in out
    one_line_error(capsys, ["bench", "optimizer", "--config", "demo", "--modes", "torch-foreach,adam"],
                   "unknown mode(s) adam")


def test_version_and_help_for_every_verb(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("nanogrow ")
    from nanogrow import cli

    parser_verbs = ["train", "config", "grow", "consolidate", "sample", "eval", "lag", "lag-report", "handbook",
                    "plot", "configs", "bench"]
    for verb in parser_verbs:
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        out = capsys.readouterr().out
        assert out.startswith("usage: nanogrow " + verb), verb
        description = out.split("\n\n")[1]
        assert not description.startswith(("positional", "options")), f"{verb}: no description"
    with pytest.raises(SystemExit):
        main(["grow", "--help"])
    out = capsys.readouterr().out
    assert "learned" in out and "(default: map+age)" in out
    assert issubclass(cli.HELP, argparse.ArgumentDefaultsHelpFormatter)


def test_train_help_points_to_the_config_reference(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "nanogrow config --show" in capsys.readouterr().out
    assert main(["config", "--show"]) == 0
    ref = capsys.readouterr().out
    for line in ("[train]", "  global_batch = 0    # sequences per optimizer step", "  wandb_project = \"nanogrow\"",
                 "[[stage]]", "  at_step = -1    # when the event fires"):
        assert line in ref, line
    assert main(["config", "--config", "demo", "--set", "stage.1.at_step=50"]) == 0
    assert '"at_step": 50' in capsys.readouterr().out
