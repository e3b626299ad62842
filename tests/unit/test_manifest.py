"""Manifest reader: JSONL and CSV, path resolution, skips, malformed lines (UserError at file:line)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cm_lightning.data.manifest import ManifestSource
from cm_lightning.data.sources import CaptionedImageSource
from cm_lightning.data.synthetic import write_manifest
from cm_lightning.errors import UserError


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """6 images under tmp/images/ and a JSONL manifest listing them (one caption each)."""
    write_manifest(tmp_path / "train.jsonl", 6, image_size=(16, 12))
    return tmp_path


def lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]


def write_lines(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_jsonl(folder: Path):
    source = ManifestSource(str(folder / "train.jsonl"))
    assert isinstance(source, CaptionedImageSource) and source.name == "manifest" and len(source) == 6
    item = source[0]
    assert re.fullmatch(r"images/\d{6}\.jpg", item.key) and item.image.mode == "RGB"
    assert {pair.key for pair in source.pairs} == {row["image"] for row in lines(folder)}


def test_csv_with_quoted_commas_and_newlines(tmp_path: Path):
    write_manifest(tmp_path / "m.csv", 3, image_size=(16, 12), captions_per_image=2)
    source = ManifestSource(str(tmp_path / "m.csv"))
    assert len(source) == 6 and source[5].image.mode == "RGB"
    with (tmp_path / "m.csv").open("a", newline="") as file:
        file.write('images/000000.jpg,"red, white\nand blue"\n')
    captions = {pair.caption for pair in ManifestSource(str(tmp_path / "m.csv")).pairs}
    assert "red, white and blue" in captions  # quoted comma kept, newline -> space


def test_alternative_keys_and_paths(folder: Path, tmp_path: Path):
    absolute = str(folder / "images" / "000001.jpg")
    sub = tmp_path / "lists"
    sub.mkdir()
    write_lines(sub / "alt.jsonl", [
        {"file_name": "images/000000.jpg", "text": "file_name and text keys"},
        {"image": absolute, "caption": "absolute path"},
        {"image": "./images/000002.jpg", "caption": "dot slash", "extra": [1, 2]},
    ])
    source = ManifestSource(str(sub / "alt.jsonl"), root=str(folder))  # relative paths from root
    assert sorted(pair.key for pair in source.pairs) == [f"images/00000{i}.jpg" for i in range(3)]
    assert source.skipped.total == 0
    # Without root, relative paths start at the manifest's folder: two of three are missing.
    default = ManifestSource(str(sub / "alt.jsonl"))
    assert len(default) == 1 and default.skipped.counts == {"missing file": 2}


def test_u2028_inside_a_caption_is_not_a_line_break(folder: Path):
    path = folder / "train.jsonl"
    path.write_text('{"image": "images/000000.jpg", "caption": "one\u2028two"}\n', encoding="utf-8")
    assert ManifestSource(str(path)).pairs[0].caption == "one two"


def test_bom_and_blank_lines_are_fine(folder: Path):
    path = folder / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\n\n", 2) + b"\n  \n")
    assert len(ManifestSource(str(path))) == 6


def test_skips_are_counted_per_line(folder: Path):
    rows = lines(folder)
    rows[0]["image"] = "images/missing.jpg"
    rows[1]["caption"] = " \u200b "
    rows[2]["caption"] = 7
    del rows[3]["caption"]
    source = ManifestSource(str(write_lines(folder / "train.jsonl", rows)))
    assert len(source) == 2
    assert source.skipped.counts == {
        "missing file": 1, "empty caption": 1, "non-string caption": 1, "missing caption": 1
    }
    assert source.skipped.examples["missing file"] == ["images/missing.jpg"]


def test_selection_is_seeded(folder: Path):
    path = str(folder / "train.jsonl")
    first, again, other = (ManifestSource(path, num_pairs=4, seed=s) for s in (0, 0, 1))
    assert first.pairs == again.pairs and first.fingerprint() == again.fingerprint()
    assert first.pairs != other.pairs and first.fingerprint() != other.fingerprint()
    assert ManifestSource(path, num_pairs=2).pairs == first.pairs[:2]


def test_fingerprint(folder: Path):
    path = folder / "train.jsonl"
    base = ManifestSource(str(path)).fingerprint()
    json.dumps(base)
    assert ManifestSource(str(path), min_side=3).fingerprint() != base
    assert ManifestSource(str(path), root=str(folder)).fingerprint() == base  # the same folder either way
    rows = lines(folder)
    rows[0]["caption"] = "edited"
    write_lines(path, rows)
    changed = ManifestSource(str(path)).fingerprint()
    assert changed["manifest_sha256"] != base["manifest_sha256"]
    assert changed["pairs_sha256"] != base["pairs_sha256"]


def test_fewer_pairs_than_asked_warns(folder: Path, caplog: pytest.LogCaptureFixture):
    ManifestSource(str(folder / "train.jsonl"), num_pairs=50)
    assert "asked for 50 pairs, only 6 usable" in caplog.text


def test_zero_usable_is_a_user_error(folder: Path):
    path = write_lines(folder / "train.jsonl", [{"image": "nope.jpg", "caption": "x"}])
    expected = r"train\.jsonl: no usable image-caption pairs \(skipped 1: 1 missing file"
    with pytest.raises(UserError, match=expected):
        ManifestSource(str(path))
    with pytest.raises(UserError, match="it lists no images"):
        ManifestSource(str(write_lines(folder / "empty.jsonl", [])))


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"image": "images/000000.jpg", "caption": "unterminated', "not valid JSON"),
        ('["images/000000.jpg", "a list"]', "expected a JSON object"),
        ('{"caption": "no image"}', "no 'image' (or 'file_name') field"),
        ('{"image": 12, "caption": "number"}', "'image' is not a non-empty string"),
    ],
)
def test_malformed_jsonl_line_names_file_and_line(folder: Path, bad_line: str, message: str):
    rows: list[object] = lines(folder)
    rows.insert(2, bad_line)
    path = write_lines(folder / "train.jsonl", rows)
    with pytest.raises(UserError, match=re.escape(f"{path}:3: {message}")):
        ManifestSource(str(path))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("image,caption\nimages/000000.jpg,a cat\nimages/000001.jpg,a cat, a dog\n",
         ":3: expected 2 fields, found 3 (quote captions that contain commas)"),
        ("path,caption\nimages/000000.jpg,a cat\n", ":1: header must name columns 'image' and 'caption'"),
        ("image,caption\n,a cat\n", ":2: empty 'image' field"),
        ("", ": empty file"),
    ],
)
def test_malformed_csv_names_file_and_line(folder: Path, content: str, message: str):
    path = folder / "bad.csv"
    path.write_text(content)
    with pytest.raises(UserError, match=re.escape(f"{path}{message}")):
        ManifestSource(str(path))


def test_not_utf8_names_the_line(folder: Path):
    path = folder / "train.jsonl"
    path.write_bytes(path.read_bytes() + b'{"image": "images/000000.jpg", "caption": "caf\xe9"}\n')
    with pytest.raises(UserError, match=re.escape(f"{path}:7: not UTF-8 text")):
        ManifestSource(str(path))


def test_unknown_extension_and_missing_manifest(folder: Path):
    (folder / "train.txt").write_text("images/000000.jpg a cat\n")
    with pytest.raises(UserError, match=r"unknown extension '\.txt'"):
        ManifestSource(str(folder / "train.txt"))
    with pytest.raises(UserError, match="not found"):
        ManifestSource(str(folder / "nope.jsonl"))
