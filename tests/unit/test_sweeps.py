"""Sweep bookkeeping on its own: job folder names, and a summary that lists failed jobs beside finished ones."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from omegaconf import OmegaConf

from cm_lightning.sweeps import MAX_NAME, job_dirname, write_summary


def test_job_folders_are_named_by_what_the_sweep_varies(tmp_path):
    (tmp_path / "multirun.yaml").write_text(OmegaConf.to_yaml(
        {"hydra": {"overrides": {"task": ["model=tiny", "method=cd,mcd", "lora.rank=range(2,6,2)"]}}}))
    job = ["model=tiny", "method=mcd", "lora.rank=4", "paths.cache_dir=/a/b"]
    assert job_dirname(job, 3, str(tmp_path)) == "lora.rank=4,method=mcd"
    # an Optuna trial: the sweeper's params, its floats shortened
    assert job_dirname(["model=tiny", "optimizer.lr=5.195586024325663e-05"], 0, str(tmp_path / "none"),
                       {"optimizer.lr": "interval(1e-5, 1e-3)"}) == "optimizer.lr=5.19559e-05"
    assert job_dirname([], 7, str(tmp_path)) == "job7"
    assert job_dirname(["data.root=/x/y"], 0, None) == "data.root=_x_y"  # one path component
    long = job_dirname([f"k{i}=value{i}" for i in range(40)], 0, None)
    assert len(long) == MAX_NAME and "/" not in long
    assert long != job_dirname([f"k{i}=value{i}" for i in range(41)], 0, None)  # the hash tells them apart


def fake_job(sweep: Path, name: str, num: int, overrides: list[str], metrics: dict | None) -> None:
    folder = sweep / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    (folder / ".hydra" / "hydra.yaml").write_text(OmegaConf.to_yaml({"hydra": {"job": {"num": num}}}))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps({"job": num, "overrides": overrides, "metrics": metrics}))


def test_the_summary_lists_every_job_in_order_with_failed_ones_marked(tmp_path):
    fake_job(tmp_path, "lora.rank=8", 1, ["model=tiny", "lora.rank=8"], None)  # failed: no metrics.json
    fake_job(tmp_path, "lora.rank=4", 0, ["model=tiny", "lora.rank=4"], {"val/teacher_gap": 0.125, "train/loss": 1.5})
    csv_path, md_path = write_summary(tmp_path)
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["job"], r["lora.rank"], r["status"], r["val/teacher_gap"]) for r in rows] == [
        ("0", "4", "done", "0.125"), ("1", "8", "no metrics (failed or running)", "")]
    markdown = md_path.read_text()
    assert "Every job: `model=tiny`" in markdown and "| model |" not in markdown
    assert "| 0 | lora.rank=4 | 4 | done | 1.5 | 0.125 |" in markdown
