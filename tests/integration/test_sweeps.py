"""Sweeps: a 2 x 2 multirun on the tiny model ends in job folders named by their overrides and one summary table
(CSV + markdown) with every job's final metrics; sweeps that would run a job for nothing are refused up front."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_train(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cm_lightning.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def tiny_job(cache: Path) -> list[str]:
    """Two steps of the tiny model on 8 shapes images, validated cheaply (2 prompts, teacher DDIM 2)."""
    return ["model=tiny", "data=shapes", "trainer=cpu", "trainer.max_steps=2", "batch_size=2",
            "data.datamodule.source.num_images=8", "data.datamodule.progress=false", "logger=none",
            "~callbacks.sample_grid", "callbacks.validation.enabled=true", "callbacks.validation.num_prompts=2",
            "callbacks.validation.teacher_steps=2", f"paths.cache_dir={cache}"]


def test_a_2x2_multirun_names_job_folders_by_overrides_and_ends_in_one_summary_table(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train("-m", *tiny_job(tmp_path / "cache"), "method=cd,mcd", "lora.rank=2,4",
                       f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {p.name for p in sweep.iterdir() if p.is_dir()}
    assert jobs == {"lora.rank=2,method=cd", "lora.rank=4,method=cd", "lora.rank=2,method=mcd",
                    "lora.rank=4,method=mcd"}
    for job in jobs:  # each folder holds a whole run
        assert (sweep / job / "lora" / "pytorch_lora_weights.safetensors").is_file()
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["method"], r["lora.rank"]) for r in rows] == [
        ("0", "cd", "2"), ("1", "cd", "4"), ("2", "mcd", "2"), ("3", "mcd", "4")]
    for row in rows:
        assert row["status"] == "done" and row["model"] == "tiny"  # the CSV keeps every override
        assert 0 < float(row["val/teacher_gap"]) < 2 and float(row["train/loss"]) > 0
    markdown = (sweep / "summary.md").read_text()
    assert "Every job: `model=tiny data=shapes" in markdown  # shared overrides once, above the table
    header = next(line for line in markdown.splitlines() if line.startswith("| job"))
    assert "| lora.rank |" in header and "| method |" in header and "val/teacher_gap" in header
    assert "| model |" not in header
    assert len([line for line in markdown.splitlines() if line.startswith("| ")]) == 5  # header + 4 jobs


@pytest.mark.parametrize("sweep,expected", [
    (["method=cd,mcd", "boundaries=2,4"], "sweep job 0 (method=cd boundaries=2): boundaries=2 is only read by methods"),
    (["method=mcd", "lora.rank=4,4"], "sweep jobs 0 and 1 compose the same config"),
])
def test_a_sweep_with_jobs_that_change_nothing_is_refused_before_any_job_runs(sweep, expected):
    """What ``python -m cm_lightning.train -m ...`` checks before Hydra starts the first job (one ``error:`` line)."""
    from cm_lightning.config_check import check_command_line
    from cm_lightning.errors import UserError

    with pytest.raises(UserError) as refused:
        check_command_line("train", ["-m", "experiment=quickstart", *sweep])
    assert expected in str(refused.value) and "\n" not in str(refused.value)
    check_command_line("train", ["-m", "experiment=quickstart", "method=mcd", "boundaries=2,4"])  # a fine sweep


def test_the_optuna_search_minimises_the_validation_teacher_gap(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install 'cm_lightning[optuna]'")
    import yaml

    sweep = tmp_path / "optuna"
    result = run_train("hparams_search=mcd_optuna", "hydra.sweeper.n_trials=2", *tiny_job(tmp_path / "cache"),
                       "trainer.max_steps=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"optimizer.lr", "lora.rank", "boundaries", "teacher_guidance.min",
                                        "teacher_guidance.max"}
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows)
    gaps = [float(r["val/teacher_gap"]) for r in rows]
    assert best["best_value"] == pytest.approx(min(gaps), rel=1e-5)  # train returned the metric Optuna minimised
