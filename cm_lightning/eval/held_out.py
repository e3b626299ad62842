"""Held-out evaluation pairs: leave out every COCO pair whose image or caption a training run saw.

Training data is read from what training leaves behind: a latent-cache folder (``shard-*.json`` list every encoded
pair's key and caption; a folder of caches, e.g. ``CM_LIGHTNING_CACHE/latents``, is searched one level down) or
a manifest (``.jsonl``/``.ndjson``/``.csv``, as ``data=manifest`` reads it). An image is identified by its COCO
image id where its file name is COCO's (``000000397133.jpg``, ``COCO_val2014_000000397133.jpg``: the same image
in the 2017 and 2014 releases), else by its file name; a caption by its words, case and spacing aside.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

from ..data.coco import SelectedPairs
from ..errors import UserError

COCO_FILE = re.compile(r"(?:COCO_[A-Za-z]+\d{4}_)?(\d{12})\.jpg")


def image_identity(path: str) -> str:
    """``coco:<id>`` for a COCO file name (any release), else the file name."""
    name = PurePosixPath(str(path).replace("\\", "/")).name
    match = COCO_FILE.fullmatch(name)
    return f"coco:{int(match.group(1))}" if match else name


def caption_identity(caption: str) -> str:
    return " ".join(str(caption).lower().split())


def _manifest_pairs(path: Path) -> list[tuple[str, str]]:
    from ..data import manifest

    text, _ = manifest._read_text(path, str(path))
    parse = manifest.parse_jsonl if path.suffix.lower() in manifest.JSONL_SUFFIXES else manifest.parse_csv
    # records: (image, (raw caption, present)), with the default field names as data=manifest reads them
    return [(image, value if present and isinstance(value, str) else None) for image, (value, present)
            in parse(text, str(path))]


def _cache_pairs(folder: Path) -> list[tuple[str, str]]:
    shards = sorted(folder.glob("shard-*.json")) or sorted(folder.glob("*/shard-*.json"))
    if not shards:
        raise UserError(f"coco.exclude_training: {folder} holds no latent cache (shard-*.json), here or one level "
                        "down")
    pairs = []
    for shard in shards:
        meta = json.loads(shard.read_text())
        pairs += list(zip(meta["keys"], meta["captions"]))
    return pairs


def training_pairs(paths) -> tuple[set[str], set[str]]:
    """(image identities, caption identities) of the training data at ``paths`` (caches or manifests)."""
    from ..data.manifest import CSV_SUFFIXES, JSONL_SUFFIXES

    images, captions = set(), set()
    for item in [paths] if isinstance(paths, (str, Path)) else list(paths):
        path = Path(str(item)).expanduser()
        if path.is_dir():
            pairs = _cache_pairs(path)
        elif path.is_file() and path.suffix.lower() in JSONL_SUFFIXES + CSV_SUFFIXES:
            pairs = _manifest_pairs(path)
        else:
            raise UserError(f"coco.exclude_training: {item} is neither a latent-cache folder nor a manifest "
                            f"({', '.join(JSONL_SUFFIXES + CSV_SUFFIXES)})")
        images.update(image_identity(image) for image, _ in pairs)
        captions.update(caption_identity(caption) for _, caption in pairs if caption is not None)
    return images, captions


class KeptPairs(SelectedPairs):
    """Some of a source's selected pairs, in its order (images decoded as the source decodes them)."""

    def __init__(self, pairs, min_side: int):
        self._pairs, self.min_side = list(pairs), min_side


def without_training_pairs(source: SelectedPairs, paths, limit: int | None = None) -> tuple[KeptPairs, int]:
    """``source``'s pairs whose image and caption are both absent from the training data at ``paths``, the first
    ``limit`` of them; and how many were left out."""
    images, captions = training_pairs(paths)
    kept = [p for p in source.pairs
            if image_identity(p.key) not in images and caption_identity(p.caption) not in captions]
    left_out = len(source.pairs) - len(kept)
    if not kept:
        raise UserError(f"coco.exclude_training leaves none of {len(source.pairs)} evaluation pairs: every one's "
                        "image or caption was in training")
    return KeptPairs(kept[:limit], source.min_side), left_out
