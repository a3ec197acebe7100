"""nanogrow: pretrain decoder LLMs that grow while they train."""

from pathlib import Path


def package_folder(front: str, name: str) -> str:
    """The folder whose files are the submodules of ``nanogrow.<name>``, given its front module ``front``
    (``nanogrow/<name>.py``): ``nanogrow/<name>/`` in an installed wheel (pyproject's ``package-dir`` copies the
    files there), else the source checkout's top-level ``<name>/`` (a checkout: ``pyproject.toml`` beside it, so
    site-packages' own ``<name>``, e.g. Hugging Face's ``kernels``, is never taken for ours)."""
    here = Path(front).resolve().parent
    if (here / name).is_dir():
        return str(here / name)
    if (here.parent / "pyproject.toml").is_file() and (here.parent / name).is_dir():
        return str(here.parent / name)
    raise ImportError(f"nanogrow.{name}: found neither {here / name} (installed) nor {here.parent / name} "
                      f"(source checkout)")
