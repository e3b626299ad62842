"""Outputs that survive: no run folder overwritten, resume by name and only into the same setup, checkpoint
retention, whole-folder writes, exports without local paths, checkpoints that load with weights_only=True."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from cm_lightning.errors import UserError
from cm_lightning.outputs import portable, refuse_overwrite, resolve_ckpt_path, whole_folder
from cm_lightning.train import train

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def tiny(cache: Path, out: Path, *extra: str) -> list[str]:
    return ["method=mcd", "model=tiny", "data=shapes", "trainer=cpu", "lora.rank=4", "batch_size=4",
            "data.datamodule.source.num_images=16", "data.datamodule.progress=false", f"paths.cache_dir={cache}",
            f"paths.output_dir={out}", "logger=none", "lr_scheduler=constant", "callbacks.sample_grid.every_n_steps=0",
            *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 4-step MCD run keeping the newest 2 of its per-step checkpoints."""
    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("runs") / "mcd" / "2026-01-01_00-00-00"
    cfg = compose_train(*tiny(cache, out, "trainer.max_steps=4",
                              "callbacks.model_checkpoint.every_n_train_steps=1",
                              "callbacks.model_checkpoint.save_top_k=2"))
    train(cfg)
    return cache, out


def test_checkpoints_beyond_the_retention_count_are_deleted(run):
    _, out = run
    assert sorted(p.name for p in (out / "checkpoints").glob("*.ckpt")) == ["last.ckpt", "step000003.ckpt",
                                                                            "step000004.ckpt"]


def test_checkpoints_load_with_weights_only_and_carry_the_run_identity(run):
    _, out = run
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["cm_lightning_run"]["method"] == "mcd" and saved["cm_lightning_run"]["boundaries"] == 4
    assert saved["cm_lightning_run"]["lora_rank"] == 4


@pytest.mark.parametrize("change,expected", [
    (["method=cd"], "method 'mcd' \\(this run: 'cd'\\)"),
    (["boundaries=2"], "boundaries 4 \\(this run: 2\\)"),
    (["lora.rank=8"], "lora_rank 4 \\(this run: 8\\)"),
])
def test_a_resume_into_another_setup_is_refused_in_one_line(run, change, expected, tmp_path, monkeypatch):
    import cm_lightning.train as train_module

    monkeypatch.setattr(train_module, "load_model", lambda *a: pytest.fail("weights read before the check"))
    cache, out = run
    cfg = compose_train(*tiny(cache, tmp_path, f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}"), *change)
    with pytest.raises(UserError, match=expected):
        train(cfg)


def test_rerunning_into_a_finished_run_folder_is_refused(run):
    cache, out = run
    with pytest.raises(UserError, match="already holds a run; resume it with ckpt_path=last"):
        train(compose_train(*tiny(cache, out)))


def test_export_carries_no_absolute_local_path(run, tmp_path):
    from cm_lightning.export import export_run

    cache, out = run
    exported = export_run(out, tmp_path / "export")
    texts = {p.name: p.read_text() for p in exported.rglob("*") if p.suffix in (".md", ".json", ".yaml")}
    assert {"README.md", "cm_lightning.json", "train_config.yaml", "scheduler_config.json"} <= texts.keys()
    for name, text in texts.items():
        for local in (str(cache), str(out), str(ROOT), str(Path.home())):
            assert local not in text, (name, local)
    assert "<local>/tiny-sd" in texts["README.md"]


def test_ckpt_path_last_takes_the_newest_last_ckpt_of_the_run_name(tmp_path, caplog):
    def fake_run(name: str, age: float) -> Path:
        ckpt = tmp_path / "mcd" / name / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"")
        os.utime(ckpt, (time.time() - age, time.time() - age))
        return ckpt

    new = tmp_path / "mcd" / "2026-01-03"
    assert resolve_ckpt_path("last", new) is None and "no earlier last.ckpt" in caplog.text
    fake_run("2026-01-01", age=100)
    newest = fake_run("2026-01-02", age=10)
    assert resolve_ckpt_path("last", new) == str(newest) and f"resuming from {newest}" in caplog.text
    own = fake_run("2026-01-03", age=1000)  # a requeued job resumes its own folder first
    assert resolve_ckpt_path("last", new) == str(own)
    refuse_overwrite(new, str(own))  # resuming in place is allowed
    with pytest.raises(UserError):
        refuse_overwrite(new, str(newest))


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "lora"
    with whole_folder(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with whole_folder(target) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("killed mid-write")
    assert (target / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["lora"]
    with whole_folder(target) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"]


def test_portable_replaces_absolute_paths_only():
    assert portable({"a": "/home/me/models/sd", "b": ["rel/x", 3], "c": "stable-diffusion-v1-5/x"}) == {
        "a": "<local>/sd", "b": ["rel/x", 3], "c": "stable-diffusion-v1-5/x"}
