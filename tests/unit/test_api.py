"""The Python API: light to import, and each function does what its entry point does."""

from __future__ import annotations

import subprocess
import sys

import pytest

import cm_lightning
from cm_lightning.errors import UserError


def test_import_is_light_and_the_api_is_listed():
    done = subprocess.run([sys.executable, "-c", "import sys, cm_lightning; print(sorted(cm_lightning.__all__)); "
                           "print('torch' in sys.modules, 'diffusers' in sys.modules, 'hydra' in sys.modules)"],
                          capture_output=True, text=True, check=True)
    names, heavy = done.stdout.splitlines()
    assert heavy == "False False False"
    for name in ("load_pipeline", "train_from_config", "sampling_kwargs", "export_lora", "compose_config"):
        assert name in names and callable(getattr(cm_lightning, name)) and getattr(cm_lightning, name).__doc__
    with pytest.raises(AttributeError):
        cm_lightning.no_such_function


def test_compose_config_uses_the_packaged_configs_and_refuses_bad_overrides():
    cfg = cm_lightning.compose_config("train", ["method=mcd", "boundaries=2", "model=tiny", "data=shapes"])
    assert cfg.method.name == "mcd" and cfg.boundaries == 2
    with pytest.raises(UserError, match="method=nope: no such method"):
        cm_lightning.compose_config("train", ["method=nope"])


def test_train_from_config_returns_the_run_folder_with_its_lora(tmp_path):
    run = cm_lightning.train_from_config(
        ["experiment=quickstart", "trainer.max_steps=1", "batch_size=2", "data.datamodule.source.num_images=4",
         "data.datamodule.progress=false", "logger=none", "callbacks=none", f"paths.cache_dir={tmp_path / 'cache'}"],
        output_dir=tmp_path / "run")
    assert run == tmp_path / "run" and (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert cm_lightning.sampling_kwargs(run) == {"num_inference_steps": 4, "guidance_scale": 1.0}
