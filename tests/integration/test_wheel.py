"""A built wheel runs: the configs ship inside it, so entry points work from any folder without the checkout.

The wheel is built from a copy of the sources (no build isolation: no network), installed without dependencies
into a fresh virtual environment that sees this environment's packages through a ``.pth`` line, and run from
another folder with ``PYTHONPATH`` unset, so the checkout cannot stand in for the installed package.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from cm_lightning.conf_dir import CONF, config_dir

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("cm_lightning", "conf", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md")


def test_config_lookup_prefers_the_packaged_copy(tmp_path, monkeypatch):
    """A checkout reads the top-level conf/; an installed package (cm_lightning/conf present) reads its own."""
    assert CONF == ROOT / "conf" and (CONF / "train.yaml").is_file()
    package = tmp_path / "site" / "cm_lightning"
    (package / "conf").mkdir(parents=True)
    (package / "conf" / "train.yaml").write_text("seed: 1\n")
    monkeypatch.setattr("cm_lightning.conf_dir._PACKAGE", package)
    assert config_dir() == package / "conf"
    (package / "conf" / "train.yaml").unlink()
    from cm_lightning.errors import UserError

    with pytest.raises(UserError, match="no configs found"):
        config_dir()


def _fresh_venv(path: Path) -> Path:
    """A venv without pip whose site-packages then lists this environment's (dependencies only: .pth files found
    there, such as an editable install of this package, are not run)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    parents = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    Path(purelib, "zz_parent_env.pth").write_text("\n".join(sorted(p for p in parents if Path(p).is_dir())) + "\n")
    return python


def test_built_wheel_runs_entry_points_from_another_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(src)], check=True, capture_output=True)
    (wheel,) = wheels.glob("cm_lightning-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"cm_lightning/conf/train.yaml", "cm_lightning/conf/data/shapes.yaml",
            "cm_lightning/conf/hydra/default.yaml"} <= names
    assert any(n.startswith("cm_lightning/assets/shapes_teacher/") for n in names)

    python = _fresh_venv(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([str(python), *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    where = run("-c", "import cm_lightning.conf_dir as c; print(c.__file__); print(c.CONF)").stdout.split()
    assert all(Path(p).is_relative_to(tmp_path / "venv") for p in where), where

    job = run("-m", "cm_lightning.train", "--cfg", "job", "method=mcd", "model=tiny", "data=shapes").stdout
    assert "name: mcd" in job and "resolution: 32" in job

    out, cache = tmp_path / "run", tmp_path / "cache"
    run("-m", "cm_lightning.train", "experiment=quickstart", "trainer.max_steps=2", "batch_size=2",
        "data.datamodule.source.num_images=4", "data.datamodule.progress=false", "logger=none", "callbacks=none",
        f"paths.cache_dir={cache}", f"paths.output_dir={out}")
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((out / "lora" / "cm_lightning.json").read_text())["method"] == "cd"
