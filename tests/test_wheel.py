"""The wheel outside a checkout: it carries the configs (``--config demo``) and the demo corpus, installs the
preparation code as ``nanogrow.data_prep`` (no generic top-level ``data_prep``), and the README's demo command
trains from it in a fresh virtual environment, leaving loss.png and metrics.jsonl."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import helpers

pytestmark = pytest.mark.slow  # builds a wheel and a virtual environment (~30 s)

SOURCES = ["nanogrow", "kernels", "data_prep", "configs", "pyproject.toml", "README.md"]


def build_wheel(dest: Path) -> Path:
    """Build from a copy of the sources, so that the checkout gets no build/ or egg-info directories."""
    src = dest / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.jsonl", "*.png", "*.md", "plots")
    for name in SOURCES:
        path = helpers.ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy(path, src / name)
    helpers.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                 dest / "dist", src], timeout=300)
    (wheel,) = (dest / "dist").glob("nanogrow-*.whl")
    return wheel


def test_wheel_carries_configs_and_trains_the_demo_in_a_fresh_venv(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "nanogrow/configs/demo.toml" in names and "nanogrow/configs/bench/speedup-cpu.toml" in names
    assert "nanogrow/data_prep/prepare.py" in names and "nanogrow/data_prep/corpus/kjv.jsonl.gz" in names
    assert "nanogrow/kernels/ops.py" in names and "nanogrow/handbook/runner.py" in names
    assert not [n for n in names if n.startswith(("data_prep/", "kernels/", "configs/"))]  # nothing generic on top

    # A fresh venv that sees this interpreter's packages (torch, tokenizers, ...) but not its nanogrow: a .pth
    # line adds the directory only, so the editable install's own .pth finder there is not run.
    venv = tmp_path / "venv"
    helpers.run([sys.executable, "-m", "venv", "--without-pip", venv])
    site = next((venv / "lib").glob("python*/site-packages"))
    # Install first: once the .pth is there, pip would see this interpreter's nanogrow as already installed.
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a checkout on the path looks installed
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                           "--no-deps", "-q", str(wheel)], capture_output=True, text=True, timeout=300, env=clean)
    assert proc.returncode == 0, helpers.tail(proc)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "work"  # not the checkout: configs/demo.toml is not a file here
    work.mkdir()

    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # no PYTHONPATH to a checkout

    def nanogrow(*args):
        proc = subprocess.run([str(venv / "bin" / "nanogrow"), *map(str, args)], cwd=work, capture_output=True,
                              text=True, timeout=300, env=env)
        assert proc.returncode == 0, helpers.tail(proc)
        return proc.stdout

    proc = subprocess.run([str(venv / "bin" / "python"), "-c", "import nanogrow, importlib.util; "
                           "print(nanogrow.__file__, importlib.util.find_spec('data_prep'))"],
                          cwd=work, capture_output=True, text=True, env=env)
    where = proc.stdout
    assert where.startswith(str(site)) and where.split()[1] == "None", helpers.tail(proc)
    assert "demo" in nanogrow("configs")
    nanogrow("prep", "--source", "demo", "--tokenizer", "bpe:512", "--out", "data/demo", "--max-tokens", 60000,
             "--val-tokens", 4096, "--bpe-train-chars", 200000, "--workers", 1)
    out = nanogrow("train", "--config", "configs/demo.toml", "--set", "train.max_steps=3", "--set",
                   "model.vocab_size=512", "--set", "train.eval_batches=1", "--set", "train.log_every=1")
    assert "done: 3 steps" in out and "will never run" in out  # the demo's stages start after step 3
    for name in ("loss.png", "metrics.jsonl", "train.log", "summary.json"):
        assert (work / "runs" / "demo" / name).is_file(), name
