"""nanogrow.data_prep: the preparation code (sources, tokenizers, token shards, the bundled demo corpus), kept in the
repository's top-level ``data_prep/`` folder as the layout lays it out.

This module is the package: its ``__path__`` is that folder in a checkout, or ``nanogrow/data_prep/`` in an
installed wheel (pyproject's ``package-dir``), so ``nanogrow.data_prep.prepare`` is ``data_prep/prepare.py``.
``data_prep/`` has no ``__init__.py``, like ``kernels/``: a Python started in the checkout's root must not import
it as a top-level ``data_prep`` package, which would shadow any installed package of that generic name.
"""

from nanogrow import package_folder

__path__ = [package_folder(__file__, "data_prep")]
