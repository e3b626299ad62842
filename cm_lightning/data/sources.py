"""What every data source provides: captioned images, addressable by index, with a fingerprint.

A source is cheap to construct (it parses its index, not the images). Decoding happens in
``__getitem__``, which raises :class:`BadSample` for an item that cannot be used, so that the cache
builder can count it, skip it and name it, instead of a worker dying with a stack trace.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from PIL import Image


class BadSample(Exception):
    """One item of a source cannot be used. ``reason`` is a short category for the summary line."""

    def __init__(self, key: str, reason: str, detail: str = ""):
        self.key, self.reason, self.detail = key, reason, detail
        super().__init__(f"{key}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass
class CaptionedImage:
    image: Image.Image  # RGB
    caption: str
    key: str  # stable identifier: a file path relative to the data root, or "shapes/train/17"


@dataclass
class SkipReport:
    """Items a source dropped while reading its index (before any image is decoded)."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, key: str, max_examples: int = 5) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < max_examples:
            self.examples[reason].append(key)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@runtime_checkable
class CaptionedImageSource(Protocol):
    """A finite, indexable set of (image, caption) pairs."""

    name: str
    skipped: SkipReport

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> CaptionedImage: ...

    def fingerprint(self) -> dict:
        """JSON-serialisable description of exactly which pairs this source yields (for cache keys)."""
        ...
