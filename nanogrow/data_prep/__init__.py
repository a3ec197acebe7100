"""Stand-in for the repository's top-level ``data_prep/`` folder, which is the real ``nanogrow.data_prep``.

The preparation code (sources, tokenizers, shards, the bundled demo corpus) lives in ``data_prep/`` as the design
card lays the repository out, but installs under the nanogrow namespace: a top-level ``data_prep`` package would
be a generic name in everyone's site-packages. An installed wheel gets ``nanogrow.data_prep`` from the
``package-dir`` mapping in pyproject.toml and never contains this file. From a source checkout this package points
its ``__path__`` at ``data_prep/`` and runs that folder's ``__init__.py`` (as ``nanogrow/kernels`` does for
``kernels/``), so ``nanogrow.data_prep.prepare`` is ``data_prep/prepare.py``.
"""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parents[2] / "data_prep")]
__file__ = str(Path(__path__[0]) / "__init__.py")
exec(compile(Path(__file__).read_text(), __file__, "exec"))
