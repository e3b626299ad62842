"""W&B without a key or a network: a run logs offline, and its files hold the whole resolved config, throughput,
the sample and validation grids (the teacher's reference once) and the validation metric."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from cm_lightning.train import train

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def wandb_records(path: Path) -> list:
    """The records of an offline run's ``run-*.wandb`` file: W&B's 7-byte header, then LevelDB's log format (32 KiB
    blocks; records of crc32, length, type (1 full, 2 first, 3 middle, 4 last)), each a ``wandb_internal`` Record."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_an_offline_wandb_run_holds_config_throughput_images_and_validation(tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no `wandb login` either
    out = tmp_path / "run"
    overrides = ["method=mcd", "model=tiny", "data=shapes", "trainer=cpu", "trainer.max_steps=4", "lora.rank=2",
                 "batch_size=2", "data.datamodule.source.num_images=8", "data.datamodule.progress=false",
                 "logger=wandb", "trainer.log_every_n_steps=1", "callbacks.throughput.window_size=2",
                 "callbacks.sample_grid.every_n_steps=2", "callbacks.validation.enabled=true",
                 "callbacks.validation.every_n_steps=2", "callbacks.validation.num_prompts=2",
                 "callbacks.validation.teacher_steps=2", "optimizer.lr=3e-4",
                 f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={out}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        metrics = train(compose("train", overrides=overrides))
    assert os.environ["WANDB_MODE"] == "offline"  # set by us: no prompt, no network
    run_dir = next((out / "wandb").glob("offline-run-*"))
    records = wandb_records(next(run_dir.glob("run-*.wandb")))

    config = {item.key: item.value_json for r in records if r.WhichOneof("record_type") == "config" for item in r.config.update}
    assert {"optimizer", "trainer", "data", "lora", "seed", "batch_size", "method"} <= set(config)  # the whole config
    assert json.loads(config["optimizer"])["lr"] == 3e-4 and json.loads(config["trainer"])["max_steps"] == 4
    history = [{item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    logged = {key for row in history for key in row}
    assert {"train/loss", "train/grad_norm", "lr-AdamW", "train/device/samples_per_sec", "val/teacher_gap"} <= logged
    gaps = [float(row["val/teacher_gap"]) for row in history if "val/teacher_gap" in row]
    assert len(gaps) == 2 and gaps[-1] == pytest.approx(metrics["val/teacher_gap"], rel=1e-6)  # at step 2 and at the end; train returns it
    media = run_dir / "files" / "media" / "images"
    assert len(list(media.glob("samples_*.png"))) == 2
    assert len(list((media / "validation").glob("teacher_*.png"))) == 1  # the reference, logged once
    assert len(list((media / "validation").glob("student_*.png"))) == 2


def test_wandb_is_imported_only_when_its_logger_is_built():
    code = ("import sys; import cm_lightning.train, cm_lightning.loggers, cm_lightning.sweeps; "
            "print('wandb' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr[-2000:]


def test_without_wandb_installed_the_default_logger_is_one_clear_error(monkeypatch):
    """A machine whose environment lacks wandb (the GPU image did) gets one line naming the fix, not Hydra's trace."""
    from cm_lightning.cli import build
    from cm_lightning.errors import UserError
    from omegaconf import OmegaConf

    monkeypatch.setenv("WANDB_MODE", "offline")  # restored after the test (the logger sets it when no key)
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    node = OmegaConf.create({"_target_": "cm_lightning.loggers.wandb_logger", "save_dir": "unused"})
    with pytest.raises(UserError, match=r"pip install wandb.*logger=csv"):
        build(node)
