"""Bad data in real folders: each case is handled (converted, cleaned) or named (skip reason, UserError).

Images are tiny and folders are generated, so the whole file runs in about a second.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cm_lightning.data.coco import CocoCaptions
from cm_lightning.data.images import clean_caption, load_image
from cm_lightning.data.preprocess import image_to_tensor
from cm_lightning.data.sources import BadSample
from cm_lightning.data.synthetic import write_coco_folder
from cm_lightning.errors import UserError

ANNOTATIONS = "annotations/captions_train2017.json"


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    """A 4-image COCO 2017 folder with two captions per image."""
    return write_coco_folder(tmp_path / "coco", 4, image_size=(16, 12))


def read_captions(root: Path) -> dict:
    return json.loads((root / ANNOTATIONS).read_text())


def write_captions(root: Path, data: object) -> None:
    (root / ANNOTATIONS).write_text(json.dumps(data))


def first_image(root: Path) -> tuple[Path, str]:
    """(path, key) of the first image listed in the captions file."""
    name = read_captions(root)["images"][0]["file_name"]
    return root / "train2017" / name, f"train2017/{name}"


def bad_sample(path: Path, key: str = "k.jpg", **kwargs) -> BadSample:
    with pytest.raises(BadSample) as caught:
        load_image(path, key, **kwargs)
    return caught.value


# -- images: unusable ones are named with a reason -------------------------------------------------------


def test_unreadable_file_is_a_bad_sample(coco: Path):
    path, key = first_image(coco)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    source = CocoCaptions(str(coco), num_pairs=None)
    index = [item.key for item in source.pairs].index(key)
    with pytest.raises(BadSample) as caught:
        source[index]
    assert caught.value.key == key and caught.value.reason == "unreadable image"
    assert str(caught.value).startswith(f"{key}: unreadable image")


def test_empty_file_is_unreadable(tmp_path: Path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    error = bad_sample(tmp_path / "empty.jpg")
    assert (error.reason, error.detail) == ("unreadable image", "empty file")


def test_truncated_jpeg_is_a_bad_sample(coco: Path):
    path, key = first_image(coco)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    error = bad_sample(path, key)
    assert error.reason == "truncated image" and error.key == key
    assert "truncated" in error.detail.lower()


def test_missing_file_at_load_time(tmp_path: Path):
    error = bad_sample(tmp_path / "gone.jpg", "gone.jpg")
    assert error.reason == "missing file" and "gone.jpg" in error.detail


# -- images: odd but usable ones are converted -----------------------------------------------------------


def test_grayscale_becomes_rgb(tmp_path: Path):
    Image.fromarray(np.full((12, 16), 100, np.uint8), "L").save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png", "g.png")
    assert image.mode == "RGB" and image.size == (16, 12) and image.getpixel((3, 3)) == (100, 100, 100)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path):
    Image.new("CMYK", (16, 12), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)  # red ink
    image = load_image(tmp_path / "c.jpg", "c.jpg")
    red, green, blue = image.getpixel((8, 6))
    assert image.mode == "RGB" and red > 200 and green < 60 and blue < 60


def test_rgba_alpha_is_composited_on_white(tmp_path: Path):
    pixels = np.zeros((12, 16, 4), np.uint8)
    pixels[:, :8] = (200, 10, 10, 255)  # opaque red on the left, fully transparent black on the right
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png", "a.png")
    assert image.mode == "RGB" and image.getpixel((2, 2)) == (200, 10, 10)
    assert image.getpixel((12, 2)) == (255, 255, 255)


def test_palette_with_transparency_is_composited(tmp_path: Path):
    image = Image.new("P", (16, 12), 0)
    image.putpalette([0, 0, 0, 0, 0, 255])
    image.paste(1, (0, 0, 8, 12))
    image.save(tmp_path / "p.png", transparency=0)
    loaded = load_image(tmp_path / "p.png", "p.png")
    assert loaded.getpixel((2, 2)) == (0, 0, 255) and loaded.getpixel((12, 2)) == (255, 255, 255)


def test_16_bit_png_is_rescaled_to_8_bit(tmp_path: Path):
    pixels = np.zeros((12, 16), np.uint16)
    pixels[:, 8:] = 60000
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = load_image(tmp_path / "deep.png", "deep.png")
    assert image.mode == "RGB"
    assert image.getpixel((12, 2)) == (255, 255, 255) and image.getpixel((2, 2)) == (0, 0, 0)


def test_exif_orientation_is_applied(tmp_path: Path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored 16x12, shown 12x16
    Image.new("RGB", (16, 12), (0, 128, 0)).save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "r.jpg", "r.jpg").size == (12, 16)


def test_small_image_is_upscaled_by_default(tmp_path: Path):
    Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / "tiny.png")
    image = load_image(tmp_path / "tiny.png", "tiny.png")
    assert image.size == (8, 6)
    assert image_to_tensor(image, 32).shape == (3, 32, 32)


def test_small_image_is_skipped_when_min_side_is_set(tmp_path: Path):
    Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / "tiny.png")
    error = bad_sample(tmp_path / "tiny.png", "tiny.png", min_side=32)
    assert error.reason == "too small" and error.detail == "8x6, min_side=32"
    assert load_image(tmp_path / "tiny.png", "tiny.png", min_side=6).size == (8, 6)  # exactly min_side: kept


def test_min_side_reaches_the_reader(coco: Path):
    source = CocoCaptions(str(coco), num_pairs=None, min_side=1000)
    with pytest.raises(BadSample, match="too small"):
        source[0]


# -- index problems: dropped at parse time and counted ---------------------------------------------------


def test_missing_file_is_skipped_and_counted(coco: Path):
    path, key = first_image(coco)
    path.unlink()
    source = CocoCaptions(str(coco), num_pairs=None)
    assert len(source) == 3 and key not in {pair.key for pair in source.pairs}
    assert source.skipped.counts == {"missing file": 1} and source.skipped.examples["missing file"] == [key]


def test_file_removed_after_parsing_is_a_bad_sample(coco: Path):
    source = CocoCaptions(str(coco), num_pairs=None)
    path = Path(source.pairs[0].path)
    path.unlink()
    with pytest.raises(BadSample) as caught:
        source[0]
    assert caught.value.reason == "missing file" and caught.value.key == source.pairs[0].key


@pytest.mark.parametrize(
    ("caption", "reason"),
    [
        (..., "missing caption"),  # no "caption" key
        (None, "missing caption"),
        ("", "empty caption"),
        ("  \t\n\u3000 ", "empty caption"),  # whitespace only, including an ideographic space
        ("\u200b\u200b", "empty caption"),  # only invisible characters
        (42, "non-string caption"),
        (["a", "list"], "non-string caption"),
    ],
)
def test_bad_caption_is_skipped_with_its_reason(coco: Path, caption: object, reason: str):
    data = read_captions(coco)
    target = data["images"][0]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != target]
    fields = {} if caption is ... else {"caption": caption}
    data["annotations"].append({"id": 999, "image_id": target, **fields})
    write_captions(coco, data)
    source = CocoCaptions(str(coco), num_pairs=None, captions_per_image=2)
    key = f"train2017/{data['images'][0]['file_name']}"
    assert source.skipped.counts == {reason: 1} and source.skipped.examples[reason] == [key]
    assert len(source) == 6 and key not in {pair.key for pair in source.pairs}


def test_image_without_annotations_is_skipped_as_missing_caption(coco: Path):
    data = read_captions(coco)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != data["images"][1]["id"]]
    write_captions(coco, data)
    assert CocoCaptions(str(coco), num_pairs=None).skipped.counts == {"missing caption": 1}


def test_one_bad_caption_does_not_cost_the_image(coco: Path):
    data = read_captions(coco)
    data["annotations"][0]["caption"] = "   "
    write_captions(coco, data)
    source = CocoCaptions(str(coco), num_pairs=None, captions_per_image=2)
    assert source.skipped.total == 0 and len(source) == 7  # 4 images x 2 captions, minus the blank one


# -- odd Unicode: cleaned, never dropped -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("a cat 🐱 on a mat 🧶", "a cat 🐱 on a mat 🧶"),  # emoji kept
        ("一只猫坐在垫子上", "一只猫坐在垫子上"),  # CJK kept
        ("قطة على حصيرة", "قطة على حصيرة"),  # right-to-left kept
        ("cafe\u0301 crème", "café crème"),  # NFC: e + combining accent -> é
        # ZWJ inside an emoji sequence kept
        ("family 👨\u200d👩\u200d👧 photo", "family 👨\u200d👩\u200d👧 photo"),
        ("thumbs 👍🏽\u200d", "thumbs 👍🏽"),  # trailing ZWJ dropped, skin tone kept
        ("zero\u200bwidth\u200dsplit\ufeff", "zerowidthsplit"),  # ZWSP, ZWJ between letters, BOM removed
        ("bell\x07 and\x00 nul\x1b", "bell and nul"),  # control characters removed
        ("  two\tlines\r\nhere\u2028 ", "two lines here"),  # any whitespace -> one space, trimmed
        ("\u202eevil bidi\u202c", "evil bidi"),  # bidi overrides removed
        ("broken \ud800 surrogate", "broken surrogate"),  # lone surrogate cannot be UTF-8
    ],
)
def test_clean_caption(raw: str, clean: str):
    assert clean_caption(raw) == clean


def test_odd_unicode_caption_is_cleaned_not_dropped(coco: Path):
    data = read_captions(coco)
    for annotation in data["annotations"]:
        annotation["caption"] = "  a\u200b cat\x00 🐱 猫\n\tcafe\u0301 "
    write_captions(coco, data)
    source = CocoCaptions(str(coco), num_pairs=None)
    assert source.skipped.total == 0 and len(source) == 4
    assert {pair.caption for pair in source.pairs} == {"a cat 🐱 猫 café"}
    assert source[0].caption == "a cat 🐱 猫 café"


# -- broken captions JSON: UserError naming the file and the field --------------------------------------


def _drop_annotations(data: dict) -> None:
    del data["annotations"]


def _images_as_dict(data: dict) -> None:
    data["images"] = {"0": data["images"][0]}


def _string_id(data: dict) -> None:
    data["images"][1]["id"] = "9"


def _no_file_name(data: dict) -> None:
    del data["images"][2]["file_name"]


def _no_image_id(data: dict) -> None:
    del data["annotations"][3]["image_id"]


def _annotation_not_object(data: dict) -> None:
    data["annotations"][1] = "a cat"


def _duplicate_id(data: dict) -> None:
    data["images"][1]["id"] = data["images"][0]["id"]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_drop_annotations, "field 'annotations' missing"),
        (_images_as_dict, "field 'images' is a JSON object, expected a list"),
        (_string_id, "images[1].id is not an integer"),
        (_no_file_name, "images[2].file_name missing"),
        (_no_image_id, "annotations[3].image_id missing"),
        (_annotation_not_object, "annotations[1] is a JSON string, expected an object"),
        (_duplicate_id, "images[1].id"),
    ],
)
def test_wrong_schema_is_a_user_error(coco: Path, corrupt, message: str):
    data = read_captions(coco)
    corrupt(data)
    write_captions(coco, data)
    with pytest.raises(UserError, match=re.escape(f"{ANNOTATIONS}: {message}")):
        CocoCaptions(str(coco))


def test_top_level_list_is_a_user_error(coco: Path):
    write_captions(coco, [1, 2])
    expected = f"{ANNOTATIONS}: top level is a JSON list, expected an object"
    with pytest.raises(UserError, match=re.escape(expected)):
        CocoCaptions(str(coco))


def test_not_json_is_a_user_error(coco: Path):
    (coco / ANNOTATIONS).write_text('{"images": [}')
    with pytest.raises(UserError, match=re.escape(f"{ANNOTATIONS}: not valid JSON (line 1, column 13")):
        CocoCaptions(str(coco))


# -- too few pairs ---------------------------------------------------------------------------------------


def test_fewer_pairs_than_asked_warns_with_both_numbers(coco: Path, caplog: pytest.LogCaptureFixture):
    first_image(coco)[0].unlink()
    with caplog.at_level(logging.WARNING, logger="cm_lightning.data.coco"):
        source = CocoCaptions(str(coco), num_pairs=10)
    assert len(source) == 3
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "asked for 10 pairs, only 3 usable" in record.getMessage()
    assert "1 missing file" in record.getMessage()


def test_zero_usable_pairs_is_a_user_error(coco: Path):
    data = read_captions(coco)
    for annotation in data["annotations"]:
        annotation["caption"] = " "
    first_image(coco)[0].unlink()
    write_captions(coco, data)
    with pytest.raises(UserError) as caught:
        CocoCaptions(str(coco))
    message = str(caught.value)
    assert message.startswith(f"{ANNOTATIONS}: no usable image-caption pairs (skipped 4: ")
    assert "3 empty caption" in message and "1 missing file" in message and "\n" not in message
