"""A plain manifest of (image, caption) pairs as a :class:`CaptionedImageSource`.

Formats, chosen by extension:

- ``.jsonl`` / ``.ndjson``: one object per line, ``{"image": "a/b.jpg", "caption": "..."}``
  (``file_name`` and ``text`` are accepted as the same fields); blank lines are ignored.
- ``.csv``: a header with ``image,caption`` (or ``file_name``/``text``) columns; other columns are ignored.

Relative image paths resolve against ``root`` (default: the manifest's folder); keys are those paths.
Each line is one pair (an image may appear on several lines with different captions).

Bad data policy: a line that cannot be a record at all (not JSON, not an object, no image field, wrong
number of CSV fields) raises :class:`UserError` naming ``file:line``. Such a line means the program that
wrote the manifest is wrong, usually on every line, and a skip would hide that. Problems of the data itself
(missing image file, missing/empty/non-string caption) are skipped and counted, as for COCO, and the same
seeded selection applies (:func:`cm_lightning.data.coco.select_pairs`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

from cm_lightning.data.coco import (
    SelectedPairs,
    READER_VERSION,
    Candidate,
    check_selection_args,
    display_path,
    pairs_digest,
    select_pairs,
)
from cm_lightning.data.sources import SkipReport
from cm_lightning.errors import UserError

IMAGE_FIELDS = ("image", "file_name")
CAPTION_FIELDS = ("caption", "text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv",)


class ManifestSource(SelectedPairs):
    """Pairs listed in a JSONL or CSV manifest; ``len`` is the number of pairs, at most ``num_pairs``.

    Args:
        path: the manifest file.
        root: folder that relative image paths start from (default: the manifest's folder).
        num_pairs: how many pairs to draw, in a seeded order (None = all usable).
        seed: seeds the choice of lines.
        min_side: skip images whose shorter side is below this many pixels (0 = keep and upscale).
        image_field / caption_field: the column (CSV) or key (JSONL) holding the image path / the caption
            (default: ``image`` or ``file_name`` / ``caption`` or ``text``, whichever is present).
    """

    name = "manifest"

    def __init__(
        self,
        path: str,
        *,
        root: str | None = None,
        num_pairs: int | None = None,
        seed: int = 0,
        min_side: int = 0,
        image_field: str | None = None,
        caption_field: str | None = None,
    ):
        check_selection_args(num_pairs, 1, "first", seed)
        self.path = Path(path).expanduser()
        self.shown = str(path)  # messages name the file as the user wrote it
        if not self.path.is_file():
            raise UserError(f"manifest {self.shown} not found (data.manifest)")
        self.root = Path(root).expanduser() if root is not None else self.path.parent
        if not self.root.is_dir():
            raise UserError(f"manifest root {self.root} is not a folder (data.root)")
        self.num_pairs, self.seed, self.min_side = num_pairs, seed, min_side
        self.image_field, self.caption_field = image_field, caption_field
        fields = dict(image_fields=(image_field,) if image_field else IMAGE_FIELDS,
                      caption_fields=(caption_field,) if caption_field else CAPTION_FIELDS)
        self.skipped = SkipReport()

        text, self._manifest_sha256 = _read_text(self.path, self.shown)
        suffix = self.path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            records = parse_jsonl(text, self.shown, **fields)
        elif suffix in CSV_SUFFIXES:
            records = parse_csv(text, self.shown, **fields)
        else:
            raise UserError(
                f"manifest {self.shown}: unknown extension {suffix!r}; use one of "
                + ", ".join(JSONL_SUFFIXES + CSV_SUFFIXES)
            )
        candidates = [Candidate(self._key(image), image, [caption]) for image, caption in records]
        self._pairs = select_pairs(
            candidates,
            base_dir=self.root,
            num_pairs=num_pairs,
            seed=seed,
            captions_per_image=1,
            caption_choice="first",
            skipped=self.skipped,
            where=self.shown,
        )
        self._digest = pairs_digest(self._pairs)

    def _key(self, image: str) -> str:
        """The image path relative to root; an absolute path outside root stays absolute."""
        path = Path(image)
        return display_path(path, self.root) if path.is_absolute() else path.as_posix()


    def fingerprint(self) -> dict:
        return {
            "source": self.name,
            "reader_version": READER_VERSION,
            "manifest": str(self.path.resolve()),
            "manifest_sha256": self._manifest_sha256,
            "root": str(self.root.resolve()),
            "num_pairs": self.num_pairs,
            "seed": self.seed,
            "min_side": self.min_side,
            **({"fields": [self.image_field, self.caption_field]} if self.image_field or self.caption_field else {}),
            "pairs_sha256": self._digest,
        }

    def __repr__(self) -> str:
        return f"ManifestSource({self.shown!r}, pairs={len(self)})"


# A record is (image path as written, (raw caption, caption field present)).
Record = tuple[str, tuple[object, bool]]


def parse_jsonl(text: str, shown: str, *, image_fields: tuple[str, ...] = IMAGE_FIELDS,
                caption_fields: tuple[str, ...] = CAPTION_FIELDS) -> list[Record]:
    """One JSON object per line -> records; a line that is not a record raises UserError at ``shown:line``."""
    records = []
    # Split on "\n" only: str.splitlines would also split on U+2028, which JSON allows inside strings.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{shown}:{lineno}: not valid JSON ({error.msg}, column {error.colno})") from None
        if not isinstance(record, dict):
            example = '{"image": ..., "caption": ...}'
            raise UserError(f"{shown}:{lineno}: expected a JSON object like {example}")
        image = _first_present(record, image_fields)
        if image is None:
            raise UserError(f"{shown}:{lineno}: no {_names(image_fields)} field")
        if not isinstance(record[image], str) or not record[image].strip():
            raise UserError(f"{shown}:{lineno}: '{image}' is not a non-empty string")
        caption = _first_present(record, caption_fields)
        records.append((record[image], (record.get(caption), caption is not None)))
    return records


def parse_csv(text: str, shown: str, *, image_fields: tuple[str, ...] = IMAGE_FIELDS,
              caption_fields: tuple[str, ...] = CAPTION_FIELDS) -> list[Record]:
    """CSV with a header naming the image and caption columns -> records."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip().lower() for name in next(reader)]
    except StopIteration:
        raise UserError(f"{shown}: empty file; expected a header line 'image,caption'") from None
    image_col = next((header.index(f.lower()) for f in image_fields if f.lower() in header), None)
    caption_col = next((header.index(f.lower()) for f in caption_fields if f.lower() in header), None)
    if image_col is None or caption_col is None:
        found = ",".join(header)
        raise UserError(f"{shown}:1: header must name columns '{image_fields[0]}' and '{caption_fields[0]}', "
                        f"found {found!r}")

    records = []
    lineno = reader.line_num
    while True:
        start = lineno + 1  # where this row begins (a quoted caption may span lines)
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            raise UserError(f"{shown}:{start}: not valid CSV ({error})") from None
        lineno = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            raise UserError(
                f"{shown}:{start}: expected {len(header)} fields, found {len(row)} "
                "(quote captions that contain commas)"
            )
        if not row[image_col].strip():
            raise UserError(f"{shown}:{start}: empty '{header[image_col]}' field")
        records.append((row[image_col].strip(), (row[caption_col], True)))
    return records


def _names(fields: tuple[str, ...]) -> str:
    """('image', 'file_name') -> "'image' (or 'file_name')"."""
    return f"'{fields[0]}'" + "".join(f" (or '{f}')" for f in fields[1:])


def _first_present(record: dict, fields: tuple[str, ...]) -> str | None:
    return next((field for field in fields if field in record), None)


def _read_text(path: Path, shown: str) -> tuple[str, str]:
    """UTF-8 text of a manifest (a BOM is allowed) and the sha256 of its bytes."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        lineno = raw[: error.start].count(b"\n") + 1
        raise UserError(f"{shown}:{lineno}: not UTF-8 text") from None
    return text, hashlib.sha256(raw).hexdigest()
