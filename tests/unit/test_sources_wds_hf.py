"""The webdataset and HF datasets sources: small shards and folders built here, read through the latent cache with
the same bad-data policy as COCO (bad items skipped, counted and named), configurable caption fields."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from cm_lightning.data.cache import LatentCache
from cm_lightning.data.manifest import ManifestSource
from cm_lightning.errors import UserError

wds = pytest.importorskip("webdataset")


def png(color: tuple[int, int, int], size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def color(i: int) -> tuple[int, int, int]:
    return (20 * i % 256, 255 - 20 * i % 256, 7 * i % 256)


def build(source, root, encoders, **kw):
    cache = LatentCache(source, root=root, resolution=16, encoders=encoders, encode_batch_size=4, shard_size=4,
                        progress=False, max_bad_fraction=0.5, **kw)
    return cache, cache.build()


def write_shards(folder, *, count=10, per_shard=4, json_caption=False):
    """Samples 0..count-1 over shards of per_shard; 3 has no caption, 5 a broken image, 7 no image."""
    folder.mkdir(parents=True, exist_ok=True)
    for first in range(0, count, per_shard):
        with wds.TarWriter(str(folder / f"shard-{first // per_shard:03d}.tar")) as sink:
            for i in range(first, min(first + per_shard, count)):
                sample = {"__key__": f"{i:06d}"}
                if i != 7:
                    sample["png"] = png(color(i)) if i != 5 else b"not an image at all"
                if i != 3:
                    if json_caption:
                        sample["json"] = json.dumps({"caption": f"caption {i}", "width": 12}).encode()
                    else:
                        sample["txt"] = f"caption {i}"
                sink.write(sample)
    return folder


def test_webdataset_brace_pattern_through_the_cache(tmp_path, fake_encoders):
    from cm_lightning.data.webdataset_source import WebDatasetSource

    folder = write_shards(tmp_path / "shards")
    source = WebDatasetSource(str(folder / "shard-{000..002}.tar"))
    assert len(source.shards) == 3
    # index-time drops, as COCO's: sample 3 has no caption, 7 no image
    assert dict(source.skipped.counts) == {"missing caption": 1, "missing image": 1}
    assert len(source) == 8 and {p.key for p in source.pairs} == {f"shard-{i // 4:03d}.tar/{i:06d}"
                                                                  for i in range(10) if i not in (3, 7)}
    item = source[next(i for i, p in enumerate(source.pairs) if p.key.endswith("000002"))]
    assert item.caption == "caption 2" and item.image.getpixel((0, 0)) == color(2)

    cache, summary = build(source, tmp_path / "cache", fake_encoders())
    assert summary.startswith("cache: 7 of 10 pairs encoded; skipped 3")
    for reason in ("unreadable image: 1", "missing caption: 1", "missing image: 1"):
        assert reason in summary
    data = cache.load()
    assert len(data) == 7 and all(c.startswith("caption ") for c in data.captions)
    assert "caption 5" not in data.captions
    # the same shards and options find the finished cache; another caption field is another cache
    assert WebDatasetSource([str(folder / "shard-*.tar")]).fingerprint() == source.fingerprint()


def test_webdataset_json_caption_field_and_bad_input(tmp_path):
    from cm_lightning.data.webdataset_source import WebDatasetSource

    folder = write_shards(tmp_path / "shards", count=4, json_caption=True)
    source = WebDatasetSource(str(folder / "shard-000.tar"), caption="json.caption")
    assert sorted(p.caption for p in source.pairs) == ["caption 0", "caption 1", "caption 2"]
    with pytest.raises(UserError, match="shard .*nothere-1.tar not found"):
        WebDatasetSource(str(folder / "nothere-{1..2}.tar"))
    (tmp_path / "fake.tar").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(UserError, match="not a readable uncompressed tar"):
        WebDatasetSource(str(tmp_path / "fake.tar"))
    with pytest.raises(UserError, match="no usable image-caption pairs"):
        WebDatasetSource(str(folder / "shard-000.tar"), caption="json.nofield")


def write_imagefolder(folder, count=8):
    """An imagefolder with metadata.jsonl, custom caption column 'prompt': 2 has an empty caption, 4 is broken."""
    folder.mkdir(parents=True)
    lines = []
    for i in range(count):
        name = f"img{i}.png"
        (folder / name).write_bytes(png(color(i)) if i != 4 else png(color(i))[:40])
        lines.append(json.dumps({"file_name": name, "prompt": "" if i == 2 else f"photo {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_hf_imagefolder_with_custom_caption_column_through_the_cache(tmp_path, fake_encoders):
    pytest.importorskip("datasets")
    from cm_lightning.data.hf_source import HFDatasetSource

    folder = write_imagefolder(tmp_path / "folder")
    source = HFDatasetSource(str(folder), caption_column="prompt")
    assert len(source) == 7 and dict(source.skipped.counts) == {"empty caption": 1}
    cache, summary = build(source, tmp_path / "cache", fake_encoders())
    assert summary.startswith("cache: 6 of 8 pairs encoded; skipped 2")
    assert "truncated image: 1" in summary or "unreadable image: 1" in summary
    data = cache.load()
    assert sorted(data.captions) == sorted(f"photo {i}" for i in range(8) if i not in (2, 4))
    # the decoded pixels are the file's: the cached latent of "photo 1" matches an encoding of its image
    again = HFDatasetSource(str(folder), caption_column="prompt")
    assert again.fingerprint() == source.fingerprint()
    row = data.captions.index("photo 1")
    item = source[next(i for i, p in enumerate(source.pairs) if p.caption == "photo 1")]
    assert item.image.getpixel((3, 3)) == color(1)
    assert torch.isfinite(data.latent_mean[row].float()).all()

    with pytest.raises(UserError, match="no column 'caption'.*data.caption_column"):
        HFDatasetSource(str(folder), caption_column="caption")
    with pytest.raises(UserError, match="not a folder"):
        HFDatasetSource(str(tmp_path / "missing_folder"))


def test_hf_saved_dataset_with_pil_column(tmp_path, fake_encoders):
    datasets = pytest.importorskip("datasets")
    from cm_lightning.data.hf_source import HFDatasetSource

    images = [Image.new("RGB", (10, 10), color(i)) for i in range(5)]
    ds = datasets.Dataset.from_dict({"picture": images, "caption": [f"c{i}" for i in range(4)] + [None]},
                                    features=datasets.Features({"picture": datasets.Image(),
                                                                "caption": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "saved"))
    source = HFDatasetSource(str(tmp_path / "saved"), image_column="picture", caption_column="caption")
    assert len(source) == 4 and dict(source.skipped.counts) == {"missing caption": 1}
    _, summary = build(source, tmp_path / "cache", fake_encoders())
    assert summary == "cache: 4 of 5 pairs encoded; skipped 1 (missing caption: 1), e.g. " + \
        f"{tmp_path / 'saved'}[train][4]"


def test_manifest_caption_field_is_configurable(tmp_path):
    (tmp_path / "a.png").write_bytes(png(color(1)))
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "a.png", "prompt": "a red cube", "caption": "wrong"}) + "\n")
    source = ManifestSource(str(tmp_path / "m.jsonl"), image_field="path", caption_field="prompt")
    assert [p.caption for p in source.pairs] == ["a red cube"]
    (tmp_path / "m.csv").write_text("path,prompt\na.png,a blue ball\n")
    assert [p.caption for p in ManifestSource(str(tmp_path / "m.csv"), image_field="path",
                                              caption_field="prompt").pairs] == ["a blue ball"]
    with pytest.raises(UserError, match="header must name columns 'file' and 'prompt'"):
        ManifestSource(str(tmp_path / "m.csv"), image_field="file", caption_field="prompt")


def test_data_configs_build_these_sources(tmp_path, conf_dir):
    """data=webdataset (a quoted brace pattern on the command line) and data=hf compose into working datamodules."""
    pytest.importorskip("datasets")
    from hydra import compose, initialize_config_dir

    from cm_lightning.cli import build

    folder = write_shards(tmp_path / "shards")
    images = write_imagefolder(tmp_path / "folder")
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        wds_cfg = compose("train", overrides=["model=tiny", "data=webdataset", "data.caption=txt",
                                              f"data.shards='{folder}/shard-{{000..002}}.tar'"])
        hf_cfg = compose("train", overrides=["model=tiny", "data=hf", f"data.path={images}",
                                             "data.caption_column=prompt"])
    assert len(build(wds_cfg.data.datamodule).source) == 8
    assert len(build(hf_cfg.data.datamodule).source) == 7
