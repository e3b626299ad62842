"""WebDataset tar shards (the format of diffusers' LCM-LoRA example) as a :class:`CaptionedImageSource`.

A shard is a tar whose members are grouped into samples by key, webdataset's convention: ``dir/000123.jpg``,
``dir/000123.txt`` and ``dir/000123.json`` are the image, caption and metadata of sample ``dir/000123``.
Shards are given as paths, brace patterns (``/data/laion-{00000..00099}.tar``, expanded by ``webdataset``), globs,
or a list of those.

Construction reads every shard's tar headers and its small caption members (``.txt``/``.json``), not the images:
each image is then read by offset, so the source is indexable and random access like the other readers, and the
cache builder's workers decode in parallel. Selection and the bad-data policy are COCO's
(:func:`cm_lightning.data.coco.select_pairs`): a sample without an image ("missing image") or caption is skipped
and counted; an image that does not decode is a :class:`BadSample` at encoding time. A file that is not a tar, or
a pattern that matches nothing, is a :class:`UserError`.

Needs the optional ``webdataset`` package (``pip install "cm_lightning[webdataset]"``), imported on first use.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tarfile
from pathlib import Path
from typing import NamedTuple

from cm_lightning.data.coco import (
    READER_VERSION,
    Candidate,
    SelectedPairs,
    check_selection_args,
    pairs_digest,
    select_pairs,
)
from cm_lightning.data.images import load_image_bytes
from cm_lightning.data.sources import BadSample, CaptionedImage, SkipReport
from cm_lightning.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MISSING_IMAGE = "missing image"


def import_webdataset():
    try:
        import webdataset
    except ImportError:
        raise UserError('data=webdataset needs the webdataset package: pip install "cm_lightning[webdataset]"') from None
    return webdataset


class _Member(NamedTuple):
    shard: int  # index into the source's shard list
    offset: int  # of the member's data in the tar file
    size: int


def expand_shards(shards: str | list[str]) -> list[Path]:
    """Paths, brace patterns and globs -> the existing shard files, in the given order (each once)."""
    wds = import_webdataset()
    patterns = [shards] if isinstance(shards, str) else list(shards)
    if not patterns:
        raise UserError("data.shards is empty: give tar paths or a brace pattern like /data/shard-{00000..00009}.tar")
    found: list[Path] = []
    for pattern in patterns:
        for expanded in wds.shardlists.expand_urls(os.path.expanduser(str(pattern))):
            matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
            if not matches or not all(Path(m).is_file() for m in matches):
                missing = next((m for m in matches if not Path(m).is_file()), expanded)
                raise UserError(f"webdataset shard {missing} not found (data.shards={pattern})")
            found += [Path(m) for m in matches]
    return list(dict.fromkeys(found))


class WebDatasetSource(SelectedPairs):
    """Samples of WebDataset tar shards; ``len`` is the number of usable pairs, at most ``num_pairs``.

    Args:
        shards: tar paths, brace patterns or globs (a string or a list).
        caption: where the caption is: a member extension (``txt``), or ``json.<field>`` for a field of the
            sample's ``.json`` member (e.g. ``json.caption``).
        image_exts: member extensions taken as the image, the first present wins.
        num_pairs / seed / min_side: as for COCO (None = every usable sample).
    """

    name = "webdataset"

    def __init__(self, shards: str | list[str], *, caption: str = "txt", image_exts: list[str] | tuple = IMAGE_EXTS,
                 num_pairs: int | None = None, seed: int = 0, min_side: int = 0):
        check_selection_args(num_pairs, 1, "first", seed)
        wds = import_webdataset()
        self.shards = expand_shards(shards)
        self.caption, self.image_exts = caption, tuple(e.lower().lstrip(".") for e in image_exts)
        self.num_pairs, self.seed, self.min_side = num_pairs, seed, min_side
        self.skipped = SkipReport()

        candidates, self._images, digest = [], {}, hashlib.sha256()
        for number, shard in enumerate(self.shards):
            for key, members, texts in self._index_shard(number, shard, wds):
                image = next((members[e] for e in self.image_exts if e in members), None)
                if image is not None:
                    self._images[key] = image
                    digest.update(f"{key}\0{image.size}\0".encode("utf-8", "surrogatepass"))
                candidates.append(Candidate(key, key, [self._caption_of(key, texts)]))
        self._shards_sha256 = digest.hexdigest()
        self._pairs = select_pairs(candidates, base_dir=Path(""), num_pairs=num_pairs, seed=seed,
                                   captions_per_image=1, caption_choice="first", skipped=self.skipped,
                                   where=f"webdataset {shards}",
                                   missing=lambda c: None if c.key in self._images else MISSING_IMAGE)
        self._digest = pairs_digest(self._pairs)

    def _index_shard(self, number: int, shard: Path, wds):
        """(sample key, {ext: member}, {ext: text of small text members}) per sample, in tar order."""
        samples: dict[str, tuple[dict, dict]] = {}
        caption_ext = self.caption.split(".", 1)[0]
        try:
            with tarfile.open(shard, "r:") as tar, open(shard, "rb") as raw:
                for info in tar:
                    if not info.isfile() or "/." in f"/{info.name}":
                        continue
                    base, ext = wds.tariterators.base_plus_ext(info.name)
                    if base is None:
                        continue
                    ext = ext.lower()
                    members, texts = samples.setdefault(f"{shard.name}/{base}", ({}, {}))
                    members[ext] = _Member(number, info.offset_data, info.size)
                    if ext == caption_ext:
                        raw.seek(info.offset_data)
                        texts[ext] = raw.read(info.size)
        except tarfile.TarError as error:
            raise UserError(f"webdataset shard {shard} is not a readable uncompressed tar ({error})") from None
        for key, (members, texts) in samples.items():
            yield key, members, texts

    def _caption_of(self, key: str, texts: dict) -> tuple[object, bool]:
        """(raw caption, present) for select_pairs' caption checks."""
        ext, _, field = self.caption.partition(".")
        if ext not in texts:
            return None, False
        try:
            text = texts[ext].decode("utf-8")
        except UnicodeDecodeError:
            return 0, True  # a non-string caption: skipped and counted as such
        if not field:
            return text, True
        try:
            record = json.loads(text)
        except ValueError:
            return None, False
        return (record.get(field), field in record) if isinstance(record, dict) else (None, False)

    def __getitem__(self, index: int) -> CaptionedImage:
        _, caption, key = self._pairs[index]
        member = self._images[key]
        try:
            with open(self.shards[member.shard], "rb") as raw:
                raw.seek(member.offset)
                data = raw.read(member.size)
        except OSError as error:
            raise BadSample(key, "unreadable image", str(error)) from None
        if len(data) != member.size:
            raise BadSample(key, "truncated image", f"{len(data)} of {member.size} bytes")
        return CaptionedImage(load_image_bytes(data, key, min_side=self.min_side), caption, key)

    def fingerprint(self) -> dict:
        return {
            "source": self.name,
            "reader_version": READER_VERSION,
            "shards": [str(s.resolve()) for s in self.shards],
            "shard_sizes": [s.stat().st_size for s in self.shards],
            "shards_sha256": self._shards_sha256,
            "caption": self.caption,
            "image_exts": list(self.image_exts),
            "num_pairs": self.num_pairs,
            "seed": self.seed,
            "min_side": self.min_side,
            "pairs_sha256": self._digest,
        }

    def __repr__(self) -> str:
        return f"WebDatasetSource({len(self.shards)} shards, pairs={len(self)})"
