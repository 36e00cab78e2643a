"""The real CLIP BPE tokenizer, built offline from the vocabulary openai-clip ships.

SD 2.1 uses OpenCLIP's tokenizer, which is the original CLIP BPE (49,408 tokens).
The ``openai-clip`` package (a pyiqa dependency) carries its merge list as
``bpe_simple_vocab_16e6.txt.gz``; we rebuild the vocabulary from it in the
order CLIP's ``SimpleTokenizer`` uses, so token ids match the real model's.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

VOCAB_SIZE = 49408
MAX_LENGTH = 77
_NUM_MERGES = VOCAB_SIZE - 256 * 2 - 2  # byte tokens, byte+</w> tokens, two specials


def clip_bpe_path() -> Path:
    spec = importlib.util.find_spec("clip")  # locate, do not import: clip imports pkg_resources
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the openai-clip package is not installed; it ships the CLIP BPE vocabulary")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise ValueError(f"openai-clip is installed but {path} is missing")
    return path


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(clip_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return {tok: i for i, tok in enumerate(tokens)}, merges


@lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    """SD 2.1's tokenizer settings: 77 tokens, padded with ``!`` (id 0) as OpenCLIP does."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=MAX_LENGTH)
