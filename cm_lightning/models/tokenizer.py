"""A small CLIP-format tokenizer written offline, for the tiny models that stand in for SD1.5.

It is byte-level BPE exactly like CLIP's: the 256 ``bytes_to_unicode`` symbols and their ``</w>``
(end-of-word) forms, merges, then ``<|startoftext|>`` and ``<|endoftext|>``. The merges are chosen so
that each known word becomes one token; any other text still tokenizes, byte by byte.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from cm_lightning.prompts import seed_prompts

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77

# CLIP's pre-tokenizer: letters run together, digits stand alone, punctuation runs together.
_PRE_TOKEN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")

_SHAPE_WORDS = """
circle square triangle star diamond cross hexagon heart ring
red green blue yellow orange purple pink cyan white black gray brown
small medium large big tiny
top bottom left right center middle upper lower corner
a an the and at on in of with background one two
"""

# The seed's eight evaluation prompts: one copy, the package's assets/prompts.txt.
EVAL_PROMPTS: tuple[str, ...] = tuple(seed_prompts())


def pre_tokenize(text: str) -> list[str]:
    """Split text into CLIP's pre-tokens (lower-cased, whitespace collapsed)."""
    return _PRE_TOKEN.findall(" ".join(text.lower().split()))


def _default_words() -> tuple[str, ...]:
    words: dict[str, None] = {}  # ordered set
    for text in (_SHAPE_WORDS, *EVAL_PROMPTS):
        for piece in pre_tokenize(text):
            if len(piece) > 1 and piece[0].isalpha():
                words[piece] = None
    return tuple(words)


DEFAULT_WORDS: tuple[str, ...] = _default_words()


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters (256 entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _symbols(word: str) -> list[str]:
    """A pre-token as CLIP's BPE starts it: byte symbols, ``</w>`` appended to the last one."""
    enc = bytes_to_unicode()
    chars = [enc[b] for b in word.encode("utf-8")]
    return chars[:-1] + [chars[-1] + END_OF_WORD]


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge the lowest-ranked adjacent pair until none is known (CLIP's BPE loop)."""
    while len(symbols) > 1:
        known = [p for p in itertools.pairwise(symbols) if p in ranks]
        if not known:
            break
        first, second = min(known, key=ranks.__getitem__)
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-ordered vocabulary and merges that make every word (lower-cased) a single token.

    Merges are added left to right on the word's current segmentation (c+i, ci+r, ...). A new merge
    has the lowest priority, so words already made single stay single: they have no pairs left.
    """
    base = list(bytes_to_unicode().values())
    tokens: dict[str, None] = dict.fromkeys(base + [s + END_OF_WORD for s in base])
    ranks: dict[tuple[str, str], int] = {}
    for text in words:
        for piece in pre_tokenize(text):
            symbols = _apply_bpe(_symbols(piece), ranks)
            while len(symbols) > 1:
                ranks[(symbols[0], symbols[1])] = len(ranks)
                tokens[symbols[0] + symbols[1]] = None
                symbols = _apply_bpe(symbols, ranks)
    tokens.update({BOS: None, EOS: None})
    return {tok: i for i, tok in enumerate(tokens)}, sorted(ranks, key=ranks.__getitem__)


def write_clip_tokenizer(folder: str | Path, words: Iterable[str] = DEFAULT_WORDS) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into ``folder``.

    ``CLIPTokenizer.from_pretrained(folder)`` loads the result: max length 77, pad = ``<|endoftext|>``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # CLIP's merges.txt starts with a version line that readers skip.
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        **special,
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder
