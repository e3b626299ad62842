"""Checks every file-backed item must pass: decode one image safely, clean one caption.

Shared by the COCO and manifest readers. Failures become :class:`BadSample` with a short reason
("missing file", "unreadable image", "truncated image", "too small") so the cache builder can count
and name them; nothing here sets global PIL state (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off, so a
half-written JPEG is an error, not a grey bottom half).
"""

from __future__ import annotations

import io
import unicodedata
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from cm_lightning.data.preprocess import to_rgb
from cm_lightning.data.sources import BadSample

# Caption-level skip reasons, shared by the readers so summary lines use the same words.
MISSING_CAPTION = "missing caption"
EMPTY_CAPTION = "empty caption"
NON_STRING_CAPTION = "non-string caption"
MISSING_FILE = "missing file"


def load_image(path: Path, key: str, *, min_side: int = 0) -> Image.Image:
    """Decode ``path`` fully and return it as an upright RGB image.

    Any mode (L, P, CMYK, RGBA, I;16, ...) goes through ``preprocess.to_rgb`` (alpha composited on
    white); EXIF orientation is applied. Images smaller than the training crop are returned as they are
    (preprocessing upscales them) unless ``min_side`` > 0 asks to skip those whose shorter side, in
    pixels, is below it.

    Raises:
        BadSample: reason "missing file", "unreadable image", "truncated image" or "too small".
    """
    path = Path(path)
    if not path.is_file():
        raise BadSample(key, MISSING_FILE, str(path))
    return decode_image(path, key, min_side=min_side, empty=path.stat().st_size == 0)


def load_image_bytes(data: bytes, key: str, *, min_side: int = 0) -> Image.Image:
    """:func:`load_image` for an image held in memory (a tar member, a dataset row): the same checks and reasons."""
    return decode_image(io.BytesIO(data), key, min_side=min_side, empty=not data)


def decode_image(file, key: str, *, min_side: int = 0, empty: bool = False) -> Image.Image:
    """Decode a path or binary file object fully into an upright RGB image (see :func:`load_image`)."""
    try:
        with Image.open(file) as opened:
            opened.load()  # force the full decode: truncation only shows up here
            image = to_rgb(_upright(opened))
    except UnidentifiedImageError:
        detail = "empty file" if empty else "not a recognised image format"
        raise BadSample(key, "unreadable image", detail) from None
    except (OSError, EOFError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # PIL reports truncation as OSError("image file is truncated ...") or "Truncated File Read".
        reason = "truncated image" if _is_truncation(error) else "unreadable image"
        raise BadSample(key, reason, f"{type(error).__name__}: {error}") from None
    width, height = image.size
    if width == 0 or height == 0:
        raise BadSample(key, "unreadable image", f"zero-size image {width}x{height}")
    if min(width, height) < min_side:
        raise BadSample(key, "too small", f"{width}x{height}, min_side={min_side}")
    return image


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a malformed EXIF block leaves the pixels as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - EXIF is metadata; bad metadata should not cost the image
        return image.copy()  # detached from the file, which the caller closes


def _is_truncation(error: BaseException) -> bool:
    return isinstance(error, EOFError) or "truncat" in str(error).lower()


# Zero-width characters joining emoji (ZWJ sequences like the family emoji) are meaningful there.
_ZWJ = "\u200d"


def clean_caption(text: str) -> str | None:
    """Normalise a caption: NFC, no control or invisible format characters, single spaces.

    Removed: control characters (Cc; tabs and newlines become spaces), format characters (Cf: zero-width
    space, BOM, soft hyphen, bidi marks) and lone surrogates (Cs, which cannot be encoded as UTF-8).
    Kept: everything visible, emoji, CJK, accents, right-to-left scripts, and a zero-width joiner that
    sits between two symbols (an emoji sequence). Returns None if nothing is left.
    """
    kept: list[str] = []
    for i, char in enumerate(text):
        category = unicodedata.category(char)
        if char.isspace():
            kept.append(" ")
        elif category == "Cc" or category == "Cs":
            continue
        elif category == "Cf":
            if char == _ZWJ and _is_symbol(text, i - 1) and _is_symbol(text, i + 1):
                kept.append(char)
        else:
            kept.append(char)
    cleaned = " ".join(unicodedata.normalize("NFC", "".join(kept)).split())
    return cleaned or None


def _is_symbol(text: str, index: int) -> bool:
    """True if text[index] can be part of an emoji sequence (symbol, modifier or variation selector)."""
    if not 0 <= index < len(text):
        return False
    char = text[index]
    return unicodedata.category(char) in ("So", "Sk", "Mn") or "\ufe00" <= char <= "\ufe0f"


def check_caption(value: object, *, present: bool = True) -> tuple[str | None, str | None]:
    """Validate a raw caption field: ``(cleaned, None)`` if usable, else ``(None, skip reason)``.

    ``present`` is False when the field is absent from its record (reported like a null caption).
    """
    if not present or value is None:
        return None, MISSING_CAPTION
    if not isinstance(value, str):
        return None, NON_STRING_CAPTION
    cleaned = clean_caption(value)
    return (cleaned, None) if cleaned is not None else (None, EMPTY_CAPTION)
