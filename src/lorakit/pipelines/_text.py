"""Tokenizers for the tiny pipelines, built at runtime (no download): byte-level vocabularies, so any prompt
tokenizes and the same prompt always gives the same ids."""

from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["clip_tokenizer"]


def _byte_alphabet() -> list[str]:
    # CLIP/GPT-2 byte-level alphabet: printable bytes stand for themselves, the rest map to 256+n.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


@lru_cache(maxsize=1)
def _tokenizer_dir() -> str:
    """A per-process folder with a byte-level CLIP vocabulary and no merges (every byte is one token)."""
    alphabet = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    folder = Path(tempfile.mkdtemp(prefix="lorakit-tiny-tokenizer-"))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return str(folder)


def clip_tokenizer(max_length: int = 77) -> Any:
    """A CLIP tokenizer over the byte-level vocabulary: every byte is one token (ids 0-511), BOS 512, EOS/PAD 513."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        os.path.join(_tokenizer_dir(), "vocab.json"),
        os.path.join(_tokenizer_dir(), "merges.txt"),
        model_max_length=max_length,
    )
