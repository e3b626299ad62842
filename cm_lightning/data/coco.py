"""COCO Captions (2014 or 2017 layout) as a :class:`CaptionedImageSource`, plus the selection rules
that every file-backed reader shares (:func:`select_pairs`).

Layout::

    root/annotations/captions_{split}{year}.json   {"images": [{id, file_name}],
                                                    "annotations": [{image_id, caption}]}
    root/{split}{year}/{file_name}                  000000000009.jpg (2017),
                                                    COCO_train2014_000000000009.jpg (2014)

Selection (deterministic given the files and the seed): candidates sorted by image id, visited in a
seeded permutation; a candidate whose file is missing or that has no usable caption is recorded in
``skipped`` and the walk moves on, until ``num_pairs`` pairs are collected. Only visited candidates are
checked, so asking for 5,000 of COCO's 118k images costs about 5,000 ``stat`` calls, ``skipped`` measures
the bad fraction of what was actually drawn, and a bigger ``num_pairs`` extends a smaller one's pairs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image

from cm_lightning.data.images import MISSING_FILE, check_caption, load_image
from cm_lightning.data.sources import CaptionedImage, SkipReport
from cm_lightning.errors import UserError

log = logging.getLogger(__name__)

# Bump when a change here alters which pairs come out for the same files and arguments.
READER_VERSION = 1
CAPTION_CHOICES = ("first", "random")
COCO_YEARS = ("2017", "2014")  # auto-detection order


class Candidate(NamedTuple):
    """One item before validation: an image and its raw caption fields (absent: ``(None, False)``)."""

    key: str  # image path relative to the data root, "/"-separated
    path: str  # relative to the reader's base folder, or absolute
    captions: list[tuple[object, bool]]  # (raw value, present in its record)


class Pair(NamedTuple):
    path: str  # the image file (the reader's base folder joined with the listed path)
    caption: str  # cleaned
    key: str


def select_pairs(
    candidates: list[Candidate],
    *,
    base_dir: Path,
    num_pairs: int | None,
    seed: int,
    captions_per_image: int,
    caption_choice: str,
    skipped: SkipReport,
    where: str,
    missing: Callable[[Candidate], str | None] | None = None,
) -> list[Pair]:
    """Walk ``candidates`` in a seeded order and collect up to ``num_pairs`` usable (image, caption) pairs.

    Each usable candidate gives up to ``captions_per_image`` pairs (its first ones, or a sample seeded by
    ``seed`` and the key). Unusable ones go into ``skipped``. Fewer pairs than asked logs a warning
    naming both numbers; none at all raises :class:`UserError` naming ``where`` (the index file).
    ``missing(candidate)`` gives the skip reason of a candidate without an image (default: its file is absent),
    for readers whose images are not files (tar members, dataset rows).
    """
    pairs: list[Pair] = []
    for index in np.random.default_rng(seed).permutation(len(candidates)).tolist():
        if num_pairs is not None and len(pairs) >= num_pairs:
            break
        key, rel_path, raw_captions = candidates[index]
        path = base_dir / rel_path
        absent = missing(candidates[index]) if missing else (None if path.is_file() else MISSING_FILE)
        if absent:
            skipped.add(absent, key)
            continue
        usable, first_problem = [], None
        for value, present in raw_captions:
            caption, problem = check_caption(value, present=present)
            if caption is not None:
                usable.append(caption)
            elif first_problem is None:
                first_problem = problem
        if not usable:
            skipped.add(first_problem or "missing caption", key)
            continue
        if caption_choice == "random" and len(usable) > captions_per_image:
            # Seeded per image, so one image's choice does not depend on which others were drawn.
            usable = random.Random(f"{seed}/{key}").sample(usable, captions_per_image)
        pairs.extend(Pair(str(path), caption, key) for caption in usable[:captions_per_image])
    if num_pairs is not None:
        pairs = pairs[:num_pairs]
    _report_shortfall(pairs, num_pairs, skipped, where)
    return pairs


def _report_shortfall(pairs: list[Pair], num_pairs: int | None, skipped: SkipReport, where: str) -> None:
    if not pairs:
        why = describe_skips(skipped) if skipped.total else "it lists no images"
        raise UserError(f"{where}: no usable image-caption pairs ({why})")
    if num_pairs is not None and len(pairs) < num_pairs:
        log.warning(
            "%s: asked for %d pairs, only %d usable (%s); continuing with %d",
            where, num_pairs, len(pairs), describe_skips(skipped), len(pairs),
        )


def describe_skips(skipped: SkipReport) -> str:
    """'skipped 3: 2 missing file, 1 empty caption; e.g. train2017/000000000009.jpg', or 'nothing skipped'."""
    if not skipped.total:
        return "nothing skipped"
    counts = ", ".join(f"{n} {reason}" for reason, n in skipped.counts.most_common())
    examples = [key for keys in skipped.examples.values() for key in keys][:3]
    return f"skipped {skipped.total}: {counts}; e.g. {', '.join(examples)}"


def pairs_digest(pairs: list[Pair]) -> str:
    """sha256 over the (key, caption) list: pins exactly which pairs a reader yields, in order."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(f"{pair.key}\0{pair.caption}\0".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def check_selection_args(
    num_pairs: int | None, captions_per_image: int, caption_choice: str, seed: int
) -> None:
    """UserError for arguments no selection can satisfy (named as the config fields)."""
    if not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if num_pairs is not None and (not isinstance(num_pairs, int) or num_pairs < 1):
        raise UserError(f"num_pairs must be a positive integer or null (all), got {num_pairs!r}")
    if not isinstance(captions_per_image, int) or captions_per_image < 1:
        raise UserError(f"captions_per_image must be a positive integer, got {captions_per_image!r}")
    if caption_choice not in CAPTION_CHOICES:
        raise UserError(f"caption_choice must be one of {', '.join(CAPTION_CHOICES)}, got {caption_choice!r}")


def display_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (short messages), else as given."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def read_json(path: Path, shown: str) -> tuple[object, str]:
    """Parse a JSON file; returns (data, sha256 of its bytes). Bad JSON -> UserError naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise UserError(f"{shown}: cannot read ({error.strerror or error})") from None
    try:
        return json.loads(raw), hashlib.sha256(raw).hexdigest()
    except UnicodeDecodeError:
        raise UserError(f"{shown}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise UserError(f"{shown}: not valid JSON ({where}: {error.msg})") from None


class SelectedPairs:
    """What the COCO and manifest readers share once their pairs are chosen: index -> decoded image + caption."""

    _pairs: list[Pair]
    min_side: int

    @property
    def pairs(self) -> list[Pair]:
        """The selected (path, caption, key) triples, in index order; nothing decoded."""
        return self._pairs

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index: int) -> CaptionedImage:
        path, caption, key = self._pairs[index]
        image: Image.Image = load_image(Path(path), key, min_side=self.min_side)
        return CaptionedImage(image=image, caption=caption, key=key)


class CocoCaptions(SelectedPairs):
    """COCO Captions pairs; ``len`` is the number of (image, caption) pairs, at most ``num_pairs``.

    Args:
        root: folder holding ``annotations/`` and ``{split}{year}/``.
        split: "train" or "val" (any name that matches the files).
        year: "2017" or "2014"; None detects which one ``root`` holds (an error if both or neither).
        num_pairs: how many pairs to draw (None = all usable).
        captions_per_image: pairs per image, each with a different caption.
        caption_choice: "first" (in file order) or "random" (seeded by ``seed`` and the image).
        seed: seeds the choice of images and captions.
        min_side: skip images whose shorter side is below this many pixels (0 = keep and upscale).
        annotation_file / image_dir: override the layout (relative paths are taken from ``root``).
    """

    name = "coco"

    def __init__(
        self,
        root: str,
        *,
        split: str = "train",
        year: str | None = None,
        num_pairs: int | None = 5000,
        captions_per_image: int = 1,
        caption_choice: str = "first",
        seed: int = 0,
        min_side: int = 0,
        annotation_file: str | None = None,
        image_dir: str | None = None,
    ):
        check_selection_args(num_pairs, captions_per_image, caption_choice, seed)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise UserError(f"COCO root {self.root} is not a folder (data.root)")
        self.split = split
        self.year = None if year is None else str(year)  # Hydra reads `year: 2017` as an int
        self.num_pairs, self.seed, self.min_side = num_pairs, seed, min_side
        self.captions_per_image, self.caption_choice = captions_per_image, caption_choice
        self.annotation_file = self._find_annotations(annotation_file)
        self.image_dir = self._find_image_dir(image_dir)
        self.skipped = SkipReport()

        shown = display_path(self.annotation_file, self.root)
        data, self._annotation_sha256 = read_json(self.annotation_file, shown)
        candidates = parse_coco(data, shown, image_prefix=self._image_prefix())
        self._pairs = select_pairs(
            candidates,
            base_dir=self.image_dir,
            num_pairs=num_pairs,
            seed=seed,
            captions_per_image=captions_per_image,
            caption_choice=caption_choice,
            skipped=self.skipped,
            where=shown,
        )
        self._digest = pairs_digest(self._pairs)

    # -- layout ---------------------------------------------------------------------------------------

    def _find_annotations(self, override: str | None) -> Path:
        if override is not None:
            path = self.root / Path(override).expanduser()  # an absolute override replaces root
            if not path.is_file():
                raise UserError(f"COCO annotation file {path} not found (data.annotation_file)")
            if self.year is None:  # still needed to name the image folder, if not given
                match = re.fullmatch(rf"captions_{re.escape(self.split)}(\d{{4}})\.json", path.name)
                self.year = match.group(1) if match else None
            return path
        years = (self.year,) if self.year is not None else COCO_YEARS
        looked = [self.root / "annotations" / f"captions_{self.split}{y}.json" for y in years]
        found = [(y, p) for y, p in zip(years, looked) if p.is_file()]
        if len(found) != 1:
            what = "several" if found else "no"
            raise UserError(
                f"{what} COCO caption files under {self.root}: looked for "
                + ", ".join(display_path(p, self.root) for p in looked)
                + ("; set data.year" if found else "; check data.root, data.split and data.year")
            )
        self.year = found[0][0]
        return found[0][1]

    def _find_image_dir(self, override: str | None) -> Path:
        if override is not None:
            path = self.root / Path(override).expanduser()
        elif self.year is None:
            raise UserError(
                f"cannot tell the COCO image folder for {self.annotation_file.name}: "
                "set data.image_dir or data.year"
            )
        else:
            path = self.root / f"{self.split}{self.year}"
        if not path.is_dir():
            raise UserError(f"COCO image folder {path} not found (data.image_dir, or data.root/split/year)")
        return path

    def _image_prefix(self) -> str:
        """Keys are paths relative to root; an image folder outside root is named by its own name."""
        shown = display_path(self.image_dir, self.root)
        return (shown if not Path(shown).is_absolute() else self.image_dir.name).rstrip("/") + "/"


    def fingerprint(self) -> dict:
        return {
            "source": self.name,
            "reader_version": READER_VERSION,
            "root": str(self.root.resolve()),
            "annotation_file": self.annotation_file.name,
            "annotation_sha256": self._annotation_sha256,
            "image_dir": str(self.image_dir.resolve()),
            "split": self.split,
            "year": self.year,
            "num_pairs": self.num_pairs,
            "captions_per_image": self.captions_per_image,
            "caption_choice": self.caption_choice,
            "seed": self.seed,
            "min_side": self.min_side,
            # Also pins what the files on disk made of all that (a file that went missing changes it).
            "pairs_sha256": self._digest,
        }

    def __repr__(self) -> str:
        root, split, year = str(self.root), self.split, self.year
        return f"CocoCaptions({root!r}, {split=}, {year=}, pairs={len(self)})"


def parse_coco(data: object, shown: str, *, image_prefix: str = "") -> list[Candidate]:
    """Validate a captions JSON and group captions by image, sorted by image id.

    Structure errors (missing or mistyped ``images``, ``annotations``, ``id``, ``file_name``, ``image_id``)
    raise :class:`UserError` naming ``shown`` and the field; caption problems are left to the selection,
    which skips and counts them.
    """
    if not isinstance(data, dict):
        raise UserError(f"{shown}: top level is a JSON {_json_type(data)}, expected an object")
    for field in ("images", "annotations"):
        if field not in data:
            raise UserError(f"{shown}: field '{field}' missing")
        if not isinstance(data[field], list):
            raise UserError(f"{shown}: field '{field}' is a JSON {_json_type(data[field])}, expected a list")

    files: dict[int, str] = {}
    for i, record in enumerate(data["images"]):
        image_id = _int_field(record, "id", f"images[{i}]", shown)
        file_name = _get_field(record, "file_name", f"images[{i}]", shown)
        if not isinstance(file_name, str) or not file_name.strip():
            raise UserError(f"{shown}: images[{i}].file_name is not a non-empty string")
        if image_id in files:
            raise UserError(f"{shown}: images[{i}].id {image_id} is duplicated")
        files[image_id] = file_name

    captions: dict[int, list[tuple[object, bool]]] = {image_id: [] for image_id in files}
    orphans = 0
    for i, record in enumerate(data["annotations"]):
        image_id = _int_field(record, "image_id", f"annotations[{i}]", shown)
        if image_id not in captions:
            orphans += 1
            continue
        captions[image_id].append((record.get("caption"), "caption" in record))
    if orphans:
        log.warning("%s: %d captions refer to image ids not in 'images'; ignored", shown, orphans)

    return [
        Candidate(image_prefix + files[image_id].replace("\\", "/"), files[image_id], captions[image_id])
        for image_id in sorted(files)
    ]


def _get_field(record: object, field: str, where: str, shown: str) -> object:
    if not isinstance(record, dict):
        raise UserError(f"{shown}: {where} is a JSON {_json_type(record)}, expected an object")
    if field not in record:
        raise UserError(f"{shown}: {where}.{field} missing")
    return record[field]


def _int_field(record: object, field: str, where: str, shown: str) -> int:
    value = _get_field(record, field, where, shown)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{shown}: {where}.{field} is not an integer (got {value!r:.40})")
    return value


def _json_type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
