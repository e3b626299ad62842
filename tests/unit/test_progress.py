"""Progress: the training bar counts optimizer steps to max_steps (rate, ETA) across epochs and from a resume."""

from __future__ import annotations

import re

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel

from cm_lightning.methods.progress import StepProgressBar


def fit(tmp_path, capsys, **trainer_args) -> str:
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[StepProgressBar()], **trainer_args)
    trainer.fit(BoringModel())  # 64 batches per epoch
    return capsys.readouterr().out


def last_count(out: str) -> tuple[int, int]:
    n, total = re.findall(r"train: .*?(\d+)/(\d+) \[", out)[-1]
    return int(n), int(total)


def test_bar_counts_optimizer_steps_to_max_steps_across_epochs(tmp_path, capsys):
    # 100 optimizer steps of 2 accumulated batches: 200 batches, more than three epochs of 64
    out = fit(tmp_path, capsys, max_steps=100, accumulate_grad_batches=2)
    assert last_count(out) == (100, 100)
    assert "step/s" in out and "<" in out  # rate and the ETA ("elapsed<remaining")
    assert "Epoch" not in out


def test_bar_without_max_steps_counts_epochs_times_steps(tmp_path, capsys):
    out = fit(tmp_path, capsys, max_epochs=2, limit_train_batches=10)
    assert last_count(out) == (20, 20)


def test_bar_in_a_log_file_redraws_at_most_every_log_interval(tmp_path, capsys):
    # captured output is not a terminal: a long run's log gets a line every 30 s, not one per refresh
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[StepProgressBar(log_interval_s=30)], max_steps=300,
                        limit_val_batches=0)  # as a training run: no validation loop (its bar redraws this one)
    trainer.fit(BoringModel())
    out = capsys.readouterr().out
    assert last_count(out) == (300, 300)
    assert len(re.findall(r"train: ", out)) <= 4  # the first draw, the last, and the close
