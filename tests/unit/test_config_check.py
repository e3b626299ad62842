"""Fail fast: every bad config of issue 11's list is one line, exit code 2, before any weights are read."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import cm_lightning.train as train_module
from cm_lightning.config_check import check_command_line, check_device
from cm_lightning.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["model=tiny", "data=shapes", "trainer=cpu"]


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture
def no_weights(monkeypatch):
    """Reading the model is a test failure: every check below must fire before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the config was checked")

    monkeypatch.setattr(train_module, "load_model", refuse)


@pytest.mark.parametrize("argv,expected", [
    (["method=foo"], "method=foo: no such method; choose one of: cd, ct, mcd, teacher"),
    (["model=sd14"], "model=sd14: no such model; choose one of: local, sd15, shapes_teacher, tiny"),
    (["data=imagenet"], "data=imagenet: no such data; choose one of: coco5k, hf, manifest, shapes, webdataset"),
    (["-m", "method=cd,mcdd"], "method=mcdd: no such method"),   # each value of a sweep
    (["foo=1"], "Could not override 'foo'"),
])
def test_bad_command_lines_are_refused_before_hydra(argv, expected):
    with pytest.raises(UserError, match=expected) as error:
        check_command_line("train", argv)
    assert "\n" not in str(error.value)


def test_good_command_lines_pass():
    check_command_line("train", ["method=mcd", "boundaries=8", "data.root=/x"])
    check_command_line("train", ["-m", "method=cd,mcd", "data=shapes"])
    check_command_line("train", ["--cfg", "job", "method=ct"])


@pytest.mark.parametrize("overrides,expected", [
    (["data=coco5k"], r"data.root is not set \(needed by data=coco5k\)"),
    (["data=manifest"], r"data.manifest is not set \(needed by data=manifest\)"),
    ([*TINY, "trainer.precision=banana"], "trainer.precision='banana' is not one of"),
    ([*TINY, "trainer.precision=16-mixed"], "needs a CUDA GPU"),
    ([*TINY, "+foo=1"], "unknown setting foo"),
    ([*TINY, "method=cd", "boundaries=8"], "boundaries=8 is only read by methods with segments"),
    ([*TINY, "method=ct", "boundaries=4"], "method=ct has one boundary"),
    ([*TINY, "ckpt_path=/no/such.ckpt"], "ckpt_path=/no/such.ckpt: no such file"),
    ([*TINY, "data.datamodule.compile_image_encoder=yes"], "compile_image_encoder='yes' is not true, false or 'auto'"),
    (["model=tiny", "data=coco5k", "data.root=/no/such/coco", "trainer=cpu"], "COCO root /no/such/coco"),
])
def test_bad_configs_fail_before_any_weights_are_read(overrides, expected, no_weights, tmp_path):
    cfg = compose_train(*overrides, f"paths.output_dir={tmp_path}")
    with pytest.raises(UserError, match=expected) as error:
        train_module.train(cfg)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("overrides, expected", [
    (["data.datamodule.compile_image_encoder=yes"], "compile_image_encoder='yes' is not true, false or 'auto'"),
    (["data=coco5k", "data.root=/no/such/coco"], "COCO root /no/such/coco"),
])
def test_prepare_checks_the_data_before_any_weights_are_read(overrides, expected, monkeypatch, tmp_path):
    import cm_lightning.prepare as prepare_module

    monkeypatch.setattr(prepare_module, "load_model", lambda *a, **k: pytest.fail("weights read before the data"))
    cfg = compose_train(*TINY, *overrides, f"paths.output_dir={tmp_path}")
    with pytest.raises(UserError, match=expected) as error:
        prepare_module.prepare(cfg)
    assert "\n" not in str(error.value)


def test_mcd_takes_boundaries_and_defaults_to_four(tmp_path):
    assert compose_train("method=mcd").method.module.num_segments == 4
    assert compose_train("method=mcd", "boundaries=8").method.module.num_segments == 8
    assert compose_train("method=cd").boundaries is None


def test_gpu_asked_for_on_a_cpu_machine(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device"):
        check_device("gpu", "16-mixed")
    check_device("cpu", "bf16-mixed")  # Lightning runs bf16 autocast on the CPU
