"""Exact resume: a run killed with SIGKILL and resumed with ckpt_path=last gives the loss curve and the LoRA of a
run that was never interrupted (RNG, data position mid-epoch, optimizer and schedule all restored)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from cm_lightning import rng
from cm_lightning.data.datamodule import ResumableSampler
from cm_lightning.train import train

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def overrides(cache: Path, out: Path) -> list[str]:
    # 24 images at batch 4: 6 batches an epoch, so 10 steps cross an epoch end and the kill (step 4 or 5) lands mid-epoch
    return ["method=mcd", "model=tiny", "data=shapes", "trainer=cpu", "lora.rank=4", "batch_size=4",
            "data.datamodule.source.num_images=24", "data.datamodule.progress=false", f"paths.cache_dir={cache}",
            f"paths.output_dir={out}", "lr_scheduler=warmup_constant", "lr_scheduler.warmup_steps=4",
            "optimizer.lr=1e-3", "trainer.max_steps=10", "trainer.log_every_n_steps=1",
            "logger=csv", "+logger.csv.flush_logs_every_n_steps=1", "callbacks.model_checkpoint.every_n_train_steps=1",
            "callbacks.sample_grid.every_n_steps=0", "callbacks.lr_monitor.logging_interval=step"]


def losses(run: Path) -> dict[int, float]:
    out = {}
    for metrics in sorted(run.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(metrics.open()):
            if row.get("train/loss"):
                out.setdefault(int(row["step"]), []).append(float(row["train/loss"]))
    return out


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    cache = tmp_path / "cache"
    whole = tmp_path / "whole"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        train(compose("train", overrides=overrides(cache, whole)))

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "cm_lightning.train", *overrides(cache, killed),
                                f"hydra.run.dir={killed}"], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step000005.ckpt").exists() and process.poll() is None:
        assert time.time() < deadline, "the run to kill never reached step 5"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "lora").exists(), "the run finished before it was killed"
    stopped_at = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 4 <= stopped_at < 10  # last.ckpt is written just after step000005.ckpt: the kill may land between

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        train(compose("train", overrides=[*overrides(cache, killed), "ckpt_path=last"]))

    reference, resumed = losses(whole), losses(killed)
    assert sorted(reference) == list(range(10))
    # Lightning saves a step's checkpoint (on_train_batch_end) before it hands that step's metrics to the logger:
    # a kill between the two loses that one row, and the resumed run starts after it. No other row may be missing.
    missing = set(reference) - set(resumed)
    assert missing <= {stopped_at - 1}, f"steps {sorted(missing)} have no train/loss row (resumed at {stopped_at})"
    assert set(resumed) <= set(reference)
    for step, values in resumed.items():  # steps replayed after the last checkpoint must agree too
        for value in values:
            assert value == pytest.approx(reference[step][0], rel=1e-4, abs=1e-6), step
    a = load_file(whole / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(killed / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_the_sampler_resumes_mid_epoch_and_shards_like_one_process():
    whole = list(ResumableSampler(10, 2, seed=3))
    sampler = ResumableSampler(10, 2, seed=3)
    sampler.skip_batches(2)
    assert [int(i) for i in sampler] == [int(i) for i in whole[4:]]
    assert [i.noise_seed for i in ResumableSampler(10, 2, seed=3)][4:] == [i.noise_seed for i in whole[4:]]
    ranks = [list(ResumableSampler(10, 2, seed=3, rank=r, world_size=2)) for r in range(2)]
    one = list(ResumableSampler(10, 4, seed=3))
    merged = [x for b in range(3) for r in range(2) for x in ranks[r][2 * b:2 * b + 2]]
    assert [(int(i), i.noise_seed) for i in merged] == [(int(i), i.noise_seed) for i in one]


def test_building_the_cache_leaves_the_training_generators_alone(tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides(tmp_path / "cache", tmp_path / "run"))
    from cm_lightning.cli import build, load_model
    from cm_lightning.models.encoders import FrozenEncoders

    datamodule = build(cfg.data.datamodule)
    datamodule.attach_encoders(FrozenEncoders.from_components(load_model(cfg.model), device="cpu"))
    torch.manual_seed(0)
    before = rng.capture()
    datamodule.prepare_data()
    after = rng.capture()
    assert datamodule.cache.is_complete()
    assert torch.equal(before["torch"], after["torch"]) and before["python"] == after["python"]
