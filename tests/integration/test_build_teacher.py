"""The teacher's one-command build, at toy size on the CPU: folder layout, loading, and continuing a build."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from cm_lightning.shapes.build_teacher import build_teacher
from cm_lightning.errors import UserError
from cm_lightning.models.components import load_components

UNET = ('unet_overrides=["experiment=shapes_teacher","trainer=cpu","trainer.max_steps=2","batch_size=4",'
        '"data.datamodule.source.num_images=16","data.datamodule.num_workers=0","data.datamodule.progress=false",'
        '"logger=none","callbacks=none"]')
TOY = ["architecture.unet_channels=[32,32,32]", "architecture.norm_num_groups=8", "architecture.text_hidden_size=32",
       "architecture.vae_channels=[16,16,16]", "vae.steps=2", "vae.batch_size=4", "vae.num_images=16",
       "vae.num_workers=0", "text.steps=3", "text.batch_size=8", "text.num_captions=32", "device=cpu", UNET]


@pytest.fixture
def run_build(conf_dir):
    """``run_build(*overrides)``: build_teacher composes the UNet's training config itself, so Hydra stays
    initialised around it."""

    def run(*overrides):
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return build_teacher(compose("build_teacher", overrides=list(overrides)))

    return run


def test_build_then_continue(tmp_path, run_build):
    first = run_build(*TOY, f"out={tmp_path / 'teacher'}", f"paths.cache_dir={tmp_path / 'c'}",
                                        f"paths.output_dir={tmp_path}")
    parts = load_components(str(first))
    assert parts.unet.config.sample_size == 16 and parts.vae.config.scaling_factor != 0.18215  # set from data
    record = json.loads((first / "build_record.json").read_text())
    assert record["vae"]["steps"] == 2 and record["continue_from"] is None
    assert set(record["text_encoder"]["heldout_accuracy"]) == {"background", "occupied", "shape", "colour", "size"}

    second = run_build(*TOY, f"continue_from={first}", f"out={tmp_path / 'teacher2'}",
                                         f"paths.cache_dir={tmp_path / 'c'}", f"paths.output_dir={tmp_path}")
    again = load_components(str(second))
    vae_same = all(torch.equal(a, b) for a, b in zip(parts.vae.state_dict().values(), again.vae.state_dict().values()))
    unet_moved = any(not torch.equal(a, b) for a, b in zip(parts.unet.state_dict().values(),
                                                          again.unet.state_dict().values()))
    assert vae_same and unet_moved
    second_record = json.loads((second / "build_record.json").read_text())
    assert second_record["continue_from"] == str(first) and second_record["previous"] == record


def test_reuse_vae_from_another_teacher(tmp_path, run_build):
    first = run_build(*TOY, "text.steps=0", f"out={tmp_path / 'a'}", f"paths.cache_dir={tmp_path / 'c'}",
                      f"paths.output_dir={tmp_path}")
    second = run_build(*TOY, f"reuse_vae_from={first}", f"out={tmp_path / 'b'}", f"paths.cache_dir={tmp_path / 'c'}",
                       f"paths.output_dir={tmp_path}")
    a, b = load_components(str(first)), load_components(str(second))
    assert all(torch.equal(x, y) for x, y in zip(a.vae.state_dict().values(), b.vae.state_dict().values()))
    text_moved = any(not torch.equal(x, y) for x, y in zip(a.text_encoder.state_dict().values(),
                                                          b.text_encoder.state_dict().values()))
    assert text_moved  # the second build trained its text encoder; the first kept the random one
    assert json.loads((second / "build_record.json").read_text())["vae"]["reused_from"] == str(first)


def test_reuse_vae_from_a_folder_without_vae_is_one_line(tmp_path, run_build):
    with pytest.raises(UserError, match=r"reuse_vae_from=.*no vae/config.json"):
        run_build(*TOY, f"reuse_vae_from={tmp_path}", f"out={tmp_path / 'a'}", f"paths.cache_dir={tmp_path / 'c'}",
                  f"paths.output_dir={tmp_path}")
