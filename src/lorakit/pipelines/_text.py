"""Tokenizers for the tiny pipelines, built at runtime (no download): byte-level vocabularies, so any prompt
tokenizes and the same prompt always gives the same ids."""

from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["chat_tokenizer", "clip_tokenizer", "t5_tokenizer"]


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


def t5_tokenizer(max_length: int = 512) -> Any:
    """A T5/UMT5-style fast tokenizer built in code with the ``tokenizers`` library (no download): byte-level, with
    fixed merges of every lower-case letter pair and of space + letter, so English takes about half a token per
    byte (the pipelines' long default negative prompts fit in 512 tokens). ``<pad>`` 0, ``</s>`` 1 (appended to
    every sequence), ``<unk>`` 2, bytes 3-258, then the merged pairs (vocabulary of 961)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = _byte_alphabet()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({c: 3 + i for i, c in enumerate(alphabet)})
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    space = alphabet[ord(" ")]
    merges = [(space, b) for b in letters] + [(a, b) for a in letters for b in letters]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def chat_tokenizer(specials: list[str], max_length: int = 512, *, pad: str | None = None, bos: str | None = None,
                   eos: str | None = None, add_bos: bool = False) -> Any:
    """A fast byte-level tokenizer for the chat-template LLM text encoders (Qwen, Mistral, Llama, Gemma), built in
    code with the ``tokenizers`` library (no download): ``specials`` get ids 0.. in order and are matched whole in
    any text (``<|im_start|>``, ``[INST]``, ...), then the 256 bytes, then the merged letter pairs of
    :func:`t5_tokenizer` (vocabulary ``len(specials) + 958``). ``pad``/``bos``/``eos`` name specials;
    ``add_bos`` prepends ``bos`` (when given) to every sequence (Llama, Gemma). No chat template: each pipeline sets its own."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = _byte_alphabet()
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({c: len(specials) + i for i, c in enumerate(alphabet)})
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    space = alphabet[ord(" ")]
    merges = [(space, b) for b in letters] + [(a, b) for a in letters for b in letters]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])
    named = {k: v for k, v in (("pad_token", pad), ("bos_token", bos), ("eos_token", eos)) if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **named)
