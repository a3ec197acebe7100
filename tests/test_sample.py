"""Generation: with the KV cache it decodes what recomputing the whole sequence decodes, sampling is reproducible
per seed, greedy decoding of a grown run is transformers' greedy decoding of its export, and `nanogrow sample` says
what is wrong with its inputs in one line. (The cache's forward itself: tests/test_model.py.)"""

import os

import pytest
import torch

from nanogrow.cli import main
from nanogrow.sample import generate, sample

from helpers import masked_model, one_thread  # noqa: F401 (autouse fixture)


def ids(n, seed=0, batch=2, vocab=97):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


# ---- generation ------------------------------------------------------------------------------------------------

def test_cached_generation_equals_recomputing_and_sampling_is_reproducible_per_seed():
    model = masked_model()
    prompt = ids(4, seed=5)
    greedy = [generate(model, prompt, 12, use_cache=c) for c in (True, False)]
    assert greedy[0].shape == (2, 16) and torch.equal(greedy[0], greedy[1])

    def draw(seed, use_cache=True):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompt, 12, temperature=1.5, top_k=20, generator=g, use_cache=use_cache)

    assert torch.equal(draw(7), draw(7)) and torch.equal(draw(7), draw(7, use_cache=False))
    assert not torch.equal(draw(7), draw(8))
    assert not torch.equal(draw(7), greedy[0])


def test_generation_stops_each_row_at_the_stop_token():
    model = masked_model()
    prompt = ids(4, seed=5)
    free = generate(model, prompt, 12)
    stop = int(free[0, 6])  # row 0's third new token
    out = generate(model, prompt, 12, stop_id=stop)
    for row, full in zip(out.tolist(), free.tolist()):
        cont, full_cont = row[4:], full[4:]
        end = full_cont.index(stop) + 1 if stop in full_cont else len(full_cont)
        assert cont[:end] == full_cont[:end] and set(cont[end:]) <= {stop}


# ---- a grown run: its export, the command line ----------------------------------------------------------------------

def test_greedy_sample_of_a_grown_run_matches_transformers_generate_on_its_export(grown_run, tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    from nanogrow.hf import export_hf

    out = export_hf(grown_run, tmp_path / "hf", log=lambda *_: None)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf.config.num_hidden_layers == 4  # grown from 2

    prompt = "And God said"
    ours = sample(grown_run, prompt, max_new_tokens=30, temperature=0, device="cpu")
    x = torch.tensor([[tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]])
    assert ours.prompt_tokens == x.shape[1]
    gen = transformers.GenerationConfig(max_new_tokens=30, do_sample=False, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        theirs = hf.generate(x, generation_config=gen)
    assert ours.texts == [tok.decode(theirs[0], skip_special_tokens=True)]
    assert ours.texts[0].startswith(prompt) and len(ours.texts[0]) > len(prompt)

    from nanogrow.inference import load_for_inference  # the ids too, without stopping at eot
    model, _, _ = load_for_inference(grown_run, torch.device("cpu"))
    gen = transformers.GenerationConfig(max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        assert generate(model, x, 30).tolist() == hf.generate(x, generation_config=gen).tolist()


def test_cli_sample_is_reproducible_per_seed(grown_run, capsys):
    argv = ["sample", str(grown_run), "--prompt", "In the beginning", "--max-new-tokens", "12", "--num-samples",
            "2", "--device", "cpu"]
    runs = []
    for seed in ("3", "3", "4"):
        assert main(argv + ["--seed", seed]) == 0
        runs.append(capsys.readouterr())
    assert runs[0].out == runs[1].out != runs[2].out
    texts = runs[0].out.split("-" * 40 + "\n")
    assert len(texts) == 2 and all(t.startswith("In the beginning") for t in texts)
    assert "tokens/s on cpu" in runs[0].err and "ckpt_0000008" in runs[0].err


def one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanogrow: error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err


def test_cli_sample_bad_inputs_are_one_line_errors(grown_run, demo_data, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from nanogrow.inference import RunTokenizer
    from nanogrow.sample import encode_prompt

    run = str(grown_run)
    room = 64 - len(encode_prompt(RunTokenizer(demo_data / "tokenizer.json"), "In the beginning", 512))
    one_line_error(capsys, ["sample", str(tmp_path / "nope")], "nope", "does not exist")
    one_line_error(capsys, ["sample", str(tmp_path)], str(tmp_path), "neither a checkpoint")
    one_line_error(capsys, ["sample", run, "--max-new-tokens", "100", "--prompt", "In the beginning"],
                   "--max-new-tokens 100", "model.max_seq_len=64", f"use --max-new-tokens {room} or less")
    one_line_error(capsys, ["sample", run, "--prompt", "In the beginning " * 40], "model.max_seq_len=64",
                   "shorten the prompt")
    one_line_error(capsys, ["sample", run, "--temperature", "-1"], "--temperature", "-1")
    one_line_error(capsys, ["sample", run, "--num-samples", "0"], "--num-samples")
    one_line_error(capsys, ["sample", run, "--device", "tpu"], "--device 'tpu'")
    one_line_error(capsys, ["sample", run, "--tokenizer", str(tmp_path / "missing.json")], "missing.json")
    big = Tokenizer(models.WordLevel({"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 1000)}},
                                     unk_token="<|endoftext|>"))
    big.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big.save(str(tmp_path / "big.json"))
    one_line_error(capsys, ["sample", run, "--tokenizer", str(tmp_path / "big.json"), "--prompt", "w3 w900"],
                   "'w900' (id 900", "model.vocab_size=512")
