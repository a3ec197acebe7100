"""``nanogrow sample``: text from a trained (grown) model, with the tokenizer its run trained on.

``generate`` is the loop: one forward over the prompt fills a ``KVCache``, then each new token is a forward of one
token against the cache (``use_cache=False`` recomputes the whole sequence each step instead: the reference the
cache is tested against). The next token is the argmax at temperature 0, else drawn from the softmax of the
logits / temperature, restricted to the ``top_k`` most likely tokens, with a seeded generator: the same seed gives
the same text. The prompt is preceded by the token that opens every training document (nanogrow's data: eot),
and a sample ends at the token that closes one (or after ``max_new_tokens``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .inference import RunTokenizer, load_for_inference, pick_device
from .model import KVCache, Transformer


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None,
               generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B, 1] token ids: argmax at temperature 0, else a draw from the top-k softmax."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def generate(model: Transformer, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, generator: torch.Generator | None = None, stop_id: int | None = None,
             use_cache: bool = True) -> torch.Tensor:
    """``idx`` [B, T] followed by up to ``max_new_tokens`` generated tokens each: [B, T + n]. A row that has drawn
    ``stop_id`` continues with ``stop_id`` only; generation ends when every row has, or after max_new_tokens."""
    cache = KVCache(model.config.max_seq_len) if use_cache else None
    out = idx
    logits = model(idx, cache=cache)[:, -1]
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for i in range(max_new_tokens):
        token = next_token(logits, temperature, top_k, generator)
        if stop_id is not None:
            token = token.masked_fill(done[:, None], stop_id)
            done |= token[:, 0] == stop_id
        out = torch.cat([out, token], dim=1)
        if i == max_new_tokens - 1 or bool(done.all()):
            break
        logits = (model(token, cache=cache) if use_cache else model(out))[:, -1]
    return out


@dataclass
class Samples:
    texts: list[str]  # prompt and continuation, decoded
    prompt_tokens: int
    new_tokens: int  # generated tokens, every sample together (up to and excluding the stop token)
    seconds: float  # the generation (prompt forward included), not the loading
    device: str
    checkpoint: Path


def encode_prompt(tok: RunTokenizer, prompt: str, vocab_size: int) -> list[int]:
    """The prompt's ids after the document-opening token; errors name the token the model cannot embed."""
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)
    if not ids:
        raise ValueError(f"--prompt is empty and the tokenizer {str(tok.path)!r} has no end-of-text / bos token to "
                         f"start a document with: give a prompt")
    for i in ids:
        if i >= vocab_size:
            raise ValueError(f"--prompt {prompt!r}: token {tok.tok.id_to_token(i)!r} (id {i} in {str(tok.path)!r}) "
                             f"is outside the model's vocabulary (model.vocab_size={vocab_size}): wrong --tokenizer?")
    return ids


def check_options(max_new_tokens: int, temperature: float, top_k: int | None, num_samples: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k must be >= 1 (or left out: every token), got {top_k}")
    if num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")


def sample(checkpoint: str | Path, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
           top_k: int | None = 200, seed: int = 0, num_samples: int = 1, device: str | None = None,
           tokenizer: str | Path | None = None) -> Samples:
    """``num_samples`` continuations of ``prompt`` by the model of ``checkpoint`` (a checkpoint or a run
    directory), drawn together in one batch with one generator seeded by ``seed``."""
    check_options(max_new_tokens, temperature, top_k, num_samples)
    dev = pick_device(device)
    model, meta, ckpt = load_for_inference(checkpoint, dev)
    tok = RunTokenizer.of_run(meta, tokenizer)
    c = model.config
    ids = encode_prompt(tok, prompt, c.vocab_size)
    room = c.max_seq_len - len(ids)  # RoPE has no angle past the context the model was trained to
    if max_new_tokens > room:
        fix = f"use --max-new-tokens {room} or less" if room > 0 else "shorten the prompt"
        raise ValueError(f"--prompt ({len(ids)} tokens with the document-opening one) + --max-new-tokens "
                         f"{max_new_tokens} exceeds the context of {ckpt} (model.max_seq_len={c.max_seq_len}); {fix}")
    generator = torch.Generator(device=dev).manual_seed(seed)
    idx = torch.tensor([ids] * num_samples, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = generate(model, idx, max_new_tokens, temperature, top_k, generator, stop_id=tok.eos_id).tolist()
    seconds = time.perf_counter() - t0  # .tolist() waited for the device
    texts, new = [], 0
    for row in out:
        cont = row[len(ids):]
        if tok.eos_id is not None and tok.eos_id in cont:
            cont = cont[:cont.index(tok.eos_id)]
        new += len(cont)
        texts.append(tok.decode(row[:len(ids)] + cont))
    return Samples(texts, len(ids), new, seconds, str(dev), ckpt)
