"""Training from a generated COCO-layout folder through the real configs; the second run reuses the cache."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from cm_lightning.data.synthetic import write_coco_folder
from cm_lightning.models.encoders import FrozenEncoders
from cm_lightning.train import train



def coco_overrides(root, cache, out):
    return [
        "method=cd", "model=tiny", "data=coco5k", f"data.root={root}", "data.datamodule.source.num_pairs=12",
        "data.datamodule.num_workers=0", "data.datamodule.progress=false", "trainer=cpu", "trainer.max_steps=2",
        "batch_size=4", "lora.rank=4", "logger=none", "callbacks=none", f"paths.cache_dir={cache}",
        f"paths.output_dir={out}",
    ]


def test_coco_folder_trains_and_the_second_run_reuses_the_cache(tmp_path, monkeypatch, conf_dir):
    root = write_coco_folder(tmp_path / "coco", 16, image_size=(48, 40), captions_per_image=2)
    cache = tmp_path / "cache"
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        first = compose("train", overrides=coco_overrides(root, cache, tmp_path / "run1"))
        second = compose("train", overrides=coco_overrides(root, cache, tmp_path / "run2"))
    train(first)
    assert (tmp_path / "run1" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    caches = list((cache / "latents").iterdir())
    assert len(caches) == 1 and (caches[0] / "COMPLETE").is_file()

    def no_encoding(*args, **kwargs):
        raise AssertionError("the second run must not encode images again")

    monkeypatch.setattr(FrozenEncoders, "encode_images", no_encoding)
    train(second)
    assert (tmp_path / "run2" / "checkpoints" / "last.ckpt").is_file()
    assert list((cache / "latents").iterdir()) == caches


def test_a_changed_selection_builds_a_new_cache(tmp_path, conf_dir):
    root = write_coco_folder(tmp_path / "coco", 16, image_size=(48, 40))
    cache = tmp_path / "cache"
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        a = compose("train", overrides=coco_overrides(root, cache, tmp_path / "a") + ["trainer.max_steps=1"])
        b = compose("train", overrides=coco_overrides(root, cache, tmp_path / "b")
                    + ["trainer.max_steps=1", "data.datamodule.source.seed=1"])
    train(a)
    train(b)
    assert len(list((cache / "latents").iterdir())) == 2


def test_missing_coco_root_is_one_clear_line(tmp_path, conf_dir):
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("train", overrides=coco_overrides(tmp_path / "nowhere", tmp_path / "c", tmp_path / "o"))
    from cm_lightning.errors import UserError

    with pytest.raises(UserError, match="nowhere"):
        train(cfg)


def test_prepare_builds_the_cache_that_training_then_reuses(tmp_path, monkeypatch, conf_dir):
    from cm_lightning.prepare import prepare

    root = write_coco_folder(tmp_path / "coco", 12, image_size=(48, 40))
    cache = tmp_path / "cache"
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("train", overrides=coco_overrides(root, cache, tmp_path / "run"))
    report = prepare(cfg)
    assert "12 of 12 pairs encoded" in report

    def no_encoding(*args, **kwargs):
        raise AssertionError("training must reuse the prepared cache")

    monkeypatch.setattr(FrozenEncoders, "encode_images", no_encoding)
    train(cfg)
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
