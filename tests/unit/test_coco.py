"""COCO Captions reader: layouts (2014/2017, overrides), seeded selection, captions per image, fingerprint."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest

from cm_lightning.data.coco import CocoCaptions
from cm_lightning.data.sources import CaptionedImageSource
from cm_lightning.data.synthetic import write_coco_folder
from cm_lightning.errors import UserError


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 images, 3 captions each (read-only for the tests that share it)."""
    return write_coco_folder(tmp_path_factory.mktemp("coco"), 12, image_size=(16, 12), captions_per_image=3)


def keys(source: CocoCaptions) -> list[str]:
    return [pair.key for pair in source.pairs]


def test_2017_layout_is_detected_and_items_decode(coco: Path):
    source = CocoCaptions(str(coco), num_pairs=5)
    assert isinstance(source, CaptionedImageSource) and source.name == "coco"
    assert source.year == "2017" and source.image_dir == coco / "train2017" and len(source) == 5
    item = source[0]
    assert re.fullmatch(r"train2017/\d{12}\.jpg", item.key)
    assert item.image.mode == "RGB" and min(item.image.size) >= 9
    assert item.caption == source.pairs[0].caption and item.caption.strip() == item.caption


def test_2014_layout_is_detected(tmp_path: Path):
    root = write_coco_folder(tmp_path, 3, year="2014", split="val", image_size=(16, 12))
    source = CocoCaptions(str(root), split="val", num_pairs=None)
    assert source.year == "2014" and len(source) == 3
    assert all(re.fullmatch(r"val2014/COCO_val2014_\d{12}\.jpg", key) for key in keys(source))
    assert source[2].image.mode == "RGB"


def test_year_as_int_from_config(coco: Path):
    assert CocoCaptions(str(coco), year=2017, num_pairs=2).year == "2017"


def test_both_years_present_needs_an_explicit_year(tmp_path: Path):
    write_coco_folder(tmp_path, 2, year="2017", image_size=(16, 12))
    write_coco_folder(tmp_path, 3, year="2014", image_size=(16, 12))
    with pytest.raises(UserError, match=r"several COCO caption files .*captions_train2017\.json.*"
                       r"captions_train2014\.json; set data\.year"):
        CocoCaptions(str(tmp_path))
    assert len(CocoCaptions(str(tmp_path), year="2014", num_pairs=None)) == 3


def test_no_caption_file_lists_what_was_looked_for(tmp_path: Path):
    with pytest.raises(UserError) as caught:
        CocoCaptions(str(tmp_path), split="val")
    message = str(caught.value)
    assert "annotations/captions_val2017.json" in message and "annotations/captions_val2014.json" in message


def test_missing_root_and_image_dir(coco: Path, tmp_path: Path):
    with pytest.raises(UserError, match="is not a folder"):
        CocoCaptions(str(tmp_path / "nope"))
    shutil.copytree(coco / "annotations", tmp_path / "annotations")
    with pytest.raises(UserError, match=r"image folder .*train2017 not found"):
        CocoCaptions(str(tmp_path))


def test_overrides_for_annotation_file_and_image_dir(coco: Path, tmp_path: Path):
    shutil.copy(coco / "annotations" / "captions_train2017.json", tmp_path / "caps.json")
    image_dir = str(coco / "train2017")
    source = CocoCaptions(str(tmp_path), annotation_file="caps.json", image_dir=image_dir, num_pairs=3)
    assert len(source) == 3 and keys(source)[0].startswith("train2017/")  # outside root: named by folder
    assert source[0].image.mode == "RGB"
    with pytest.raises(UserError, match="set data.image_dir or data.year"):
        CocoCaptions(str(tmp_path), annotation_file="caps.json")


def test_same_seed_same_pairs_different_seed_different(coco: Path):
    first = CocoCaptions(str(coco), num_pairs=6, seed=1)
    again = CocoCaptions(str(coco), num_pairs=6, seed=1)
    other = CocoCaptions(str(coco), num_pairs=6, seed=2)
    assert first.pairs == again.pairs and first.fingerprint() == again.fingerprint()
    assert keys(first) != keys(other) and first.fingerprint() != other.fingerprint()


def test_selection_does_not_depend_on_json_order(coco: Path, tmp_path: Path):
    root = tmp_path / "shuffled"
    shutil.copytree(coco, root)
    path = root / "annotations" / "captions_train2017.json"
    data = json.loads(path.read_text())
    data["images"].reverse()
    path.write_text(json.dumps(data))
    assert keys(CocoCaptions(str(root), num_pairs=6)) == keys(CocoCaptions(str(coco), num_pairs=6))


def test_more_pairs_extend_fewer(coco: Path):
    assert keys(CocoCaptions(str(coco), num_pairs=8))[:4] == keys(CocoCaptions(str(coco), num_pairs=4))


def test_all_pairs(coco: Path):
    source = CocoCaptions(str(coco), num_pairs=None, captions_per_image=3)
    assert len(source) == 36 and len(set(source.pairs)) == 36


def test_captions_per_image_first(coco: Path):
    source = CocoCaptions(str(coco), num_pairs=6, captions_per_image=2)
    assert len(source) == 6 and len(set(keys(source))) == 3  # num_pairs counts pairs, not images
    data = json.loads((coco / "annotations" / "captions_train2017.json").read_text())
    by_key: dict[str, list[str]] = {}
    for pair in source.pairs:
        by_key.setdefault(pair.key, []).append(pair.caption)
    names = {image["id"]: f"train2017/{image['file_name']}" for image in data["images"]}
    in_file: dict[str, list[str]] = {}
    for annotation in data["annotations"]:
        in_file.setdefault(names[annotation["image_id"]], []).append(annotation["caption"])
    assert all(captions == in_file[key][:2] for key, captions in by_key.items())


def test_captions_per_image_random_is_seeded(coco: Path):
    def captions(seed: int) -> list[tuple[str, str]]:
        source = CocoCaptions(
            str(coco), num_pairs=None, captions_per_image=2, caption_choice="random", seed=seed
        )
        return sorted((pair.key, pair.caption) for pair in source.pairs)

    first = CocoCaptions(str(coco), num_pairs=None, captions_per_image=2)
    assert captions(0) == captions(0) and len(captions(0)) == 24
    assert captions(0) != sorted((p.key, p.caption) for p in first.pairs)  # not just the first two
    assert captions(0) != captions(1)


def test_fingerprint_covers_every_argument_and_the_file(coco: Path, tmp_path: Path):
    base = CocoCaptions(str(coco), num_pairs=6).fingerprint()
    json.dumps(base)  # serialisable
    for change in [
        dict(num_pairs=5), dict(seed=3), dict(captions_per_image=2), dict(caption_choice="random"),
        dict(min_side=4),
    ]:
        assert CocoCaptions(str(coco), **{"num_pairs": 6, **change}).fingerprint() != base, change
    assert {"root", "annotation_file", "annotation_sha256", "split", "year", "reader_version"} <= set(base)

    copy = tmp_path / "copy"
    shutil.copytree(coco, copy)
    moved = CocoCaptions(str(copy), num_pairs=6).fingerprint()
    assert moved["annotation_sha256"] == base["annotation_sha256"] and moved["root"] != base["root"]
    path = copy / "annotations" / "captions_train2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["caption"] = "edited"
    path.write_text(json.dumps(data))
    edited = CocoCaptions(str(copy), num_pairs=6).fingerprint()
    assert edited["annotation_sha256"] != base["annotation_sha256"]


def test_orphan_captions_are_ignored_with_a_warning(
    coco: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    root = tmp_path / "orphans"
    shutil.copytree(coco, root)
    path = root / "annotations" / "captions_train2017.json"
    data = json.loads(path.read_text())
    data["annotations"].append({"id": 10_000, "image_id": 123_456_789, "caption": "nobody's"})
    path.write_text(json.dumps(data))
    assert len(CocoCaptions(str(root), num_pairs=None)) == 12
    assert "1 captions refer to image ids not in 'images'" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_pairs=0), "num_pairs must be a positive integer"),
        (dict(captions_per_image=0), "captions_per_image must be a positive integer"),
        (dict(caption_choice="longest"), "caption_choice must be one of first, random"),
    ],
)
def test_bad_arguments(coco: Path, kwargs: dict, message: str):
    with pytest.raises(UserError, match=message):
        CocoCaptions(str(coco), **kwargs)


def test_source_pickles_for_dataloader_workers(coco: Path):
    source = CocoCaptions(str(coco), num_pairs=4)
    clone = pickle.loads(pickle.dumps(source))
    assert clone.pairs == source.pairs and clone[1].key == source[1].key
