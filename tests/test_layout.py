"""The top-level ``kernels/`` and ``data_prep/`` folders are ``nanogrow.kernels`` and ``nanogrow.data_prep`` and
nothing else: a Python started in the checkout's root (where ``python -m``, ``-c`` and pytest put the root on
``sys.path``) imports Hugging Face's ``kernels`` as ``kernels``, and transformers, which imports it, runs there."""

import importlib.util
import sys

import pytest

import helpers

ROOT = helpers.ROOT


def python_in_root(code: str) -> str:
    """Run ``python -c code`` with the checkout's root as working directory (the root is then sys.path[0])."""
    return helpers.run([sys.executable, "-c", code], env={"HF_HUB_OFFLINE": "1"}).stdout.strip()


def test_folders_have_no_init_that_would_make_them_top_level_packages():
    for name in ("kernels", "data_prep"):
        assert (ROOT / name).is_dir() and not (ROOT / name / "__init__.py").exists(), name


def test_nanogrow_packages_are_the_folders_from_the_root():
    out = python_in_root(
        "import nanogrow.kernels as K, nanogrow.kernels.ops, nanogrow.data_prep.prepare as P, nanogrow.kernels.bench;"
        "print(K.rms_norm.__module__, K.ops.__file__, P.__file__, sep='\\n')")
    module, ops_file, prep_file = out.splitlines()
    assert module == "nanogrow.kernels.dispatch"
    assert ops_file == str(ROOT / "kernels" / "ops.py") and prep_file == str(ROOT / "data_prep" / "prepare.py")


def test_import_kernels_in_the_root_is_hugging_faces_and_a_llama_forward_runs():
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    where = python_in_root("import importlib.util as u; s = u.find_spec('kernels'); print(s and s.origin)")
    if where in ("None", "") or where.startswith(str(ROOT / "kernels")):
        # Without Hugging Face's package, `import kernels` must still not find ours as a regular package.
        assert where in ("None", ""), f"`import kernels` in the checkout's root found {where}"
        pytest.skip("Hugging Face's kernels package is not installed")
    assert "site-packages" in where, where
    out = python_in_root(
        "import torch, transformers as T;"
        "c = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16);"
        "torch.manual_seed(0); m = T.LlamaForCausalLM(c).eval();"
        "print(tuple(m(torch.arange(8)[None]).logits.shape))")
    assert out.splitlines()[-1] == "(1, 8, 64)"
