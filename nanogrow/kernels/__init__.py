"""Stand-in for the repository's top-level ``kernels/`` folder, which is the real ``nanogrow.kernels``.

The project keeps the kernels in ``kernels/`` but a top-level import package of that name would collide with the
``kernels`` package on PyPI, so they are imported as ``nanogrow.kernels``. An installed wheel gets that from the
``package-dir`` mapping in pyproject.toml and never contains this file. From a source checkout (an editable
install, or the repo root on sys.path) this package points its ``__path__`` at ``kernels/`` and runs that
folder's ``__init__.py``, so submodules (``nanogrow.kernels.ops``, ...) are the files in ``kernels/``.
"""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parents[2] / "kernels")]
__file__ = str(Path(__path__[0]) / "__init__.py")
exec(compile(Path(__file__).read_text(), __file__, "exec"))
