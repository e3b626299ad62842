"""A tiny CPU run with the CSV and TensorBoard loggers at once: FLOP/s and MFU in the CSV metrics (from the model
FLOPs of a training sample), the sample grids and the validation grids (the teacher's reference once) in TensorBoard's
event file."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from cm_lightning.methods.flops import peak_flops, unet_call_flops
from cm_lightning.models.components import load_components
from cm_lightning.models.lora import add_lora
from cm_lightning.train import train

ROOT = Path(__file__).resolve().parents[2]
BATCH, PEAK = 2, 1e9


def test_a_run_logs_flops_mfu_and_its_grids_to_csv_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    overrides = ["method=cd", "model=tiny", "data=shapes", "trainer=cpu", "trainer.max_steps=4", "lora.rank=2",
                 f"batch_size={BATCH}", "data.datamodule.source.num_images=8", "data.datamodule.progress=false",
                 "logger=[csv,tensorboard]", "trainer.log_every_n_steps=1", "callbacks.throughput.window_size=2",
                 f"callbacks.throughput.peak_flops={PEAK}", "teacher_guidance.min=2.0", "teacher_guidance.max=3.0",
                 "callbacks.sample_grid.every_n_steps=2", "callbacks.validation.enabled=true",
                 "callbacks.validation.every_n_steps=2", "callbacks.validation.num_prompts=2",
                 "callbacks.validation.teacher_steps=2",
                 f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={out}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
        train(cfg)

    rows = list(csv.DictReader((out / "csv" / "version_0" / "metrics.csv").open()))
    rates = [r for r in rows if r.get("train/device/flops_per_sec")]
    assert len(rates) >= 2, rows[-1].keys()
    # the expected model FLOPs per batch, counted here on the run's UNet shapes: CFG teacher (2), target, student
    unet = load_components(cfg.model.pretrained).unet
    add_lora(unet, rank=2, alpha=cfg.lora.alpha)
    latent = unet.config.sample_size
    forward, forward_backward = unet_call_flops(unet, (4, latent, latent), (77, unet.config.cross_attention_dim))
    per_batch = BATCH * (3 * forward + forward_backward)
    for r in rates:
        flops = float(r["train/device/flops_per_sec"])
        assert flops == pytest.approx(per_batch * float(r["train/device/batches_per_sec"]), rel=1e-4)
        assert float(r["train/device/mfu"]) == pytest.approx(flops / PEAK, rel=1e-4)
    assert peak_flops(torch.device("cpu"), torch.float32) is None  # without peak_flops a CPU run logs no MFU

    events = EventAccumulator(str(next((out / "tensorboard").glob("version_0"))), size_guidance={"images": 0})
    events.Reload()
    assert {"samples", "validation/teacher", "validation/student"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("samples")] == [2, 4]
    assert [e.step for e in events.Images("validation/student")] == [2, 4]  # every 2 steps and at the end
    assert len(events.Images("validation/teacher")) == 1  # the reference, drawn once
    image = events.Images("validation/student")[0]
    assert (image.width, image.height) == (2 * 32, 32)  # two 32 px images side by side
