"""DDP on the CPU: two gloo processes through the real command line train like one process at the same global batch;
rank 0 alone writes the outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

COMMON = ["method=mcd", "model=tiny", "data=shapes", "lora.rank=4", "data.datamodule.source.num_images=16",
          "data.datamodule.progress=false", "logger=none", "lr_scheduler=constant", "optimizer.lr=1e-3",
          "trainer.max_steps=4", "callbacks.sample_grid.every_n_steps=0", "teacher_guidance.min=1",
          "teacher_guidance.max=1", "trainer.accelerator=cpu", "trainer.precision=32-true"]


def run(out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cm_lightning.train", *COMMON, f"paths.cache_dir={cache}",
                           f"hydra.run.dir={out}", *extra], cwd=out.parent, env=env, capture_output=True, text=True,
                          timeout=300)


def lora(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "lora" / "pytorch_lora_weights.safetensors")


def test_two_gloo_processes_train_like_one_at_the_same_global_batch(tmp_path):
    cache = tmp_path / "cache"
    one = run(tmp_path / "one", cache, "trainer=cpu", "batch_size=2", "trainer.accumulate_grad_batches=2")
    assert one.returncode == 0, one.stderr[-2000:]
    ddp = run(tmp_path / "ddp", cache, "trainer=ddp", "trainer.devices=2", "batch_size=2")
    assert ddp.returncode == 0, ddp.stderr[-2000:]

    logs = "".join(p.read_text() for p in (tmp_path / "ddp").glob("*.log"))
    assert logs.count("LoRA weights written") == 1  # rank 0 alone writes outputs
    saved = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4 and saved["data_position"] == {"epoch": 1, "batches": 0}  # 2 batches a rank

    # global batch 4 either way: 2 ranks x 2, or 1 process x 2 x 2 accumulated; same samples, same draws per shard
    a, b = lora(tmp_path / "one"), lora(tmp_path / "ddp")
    assert a.keys() == b.keys()
    assert any(v.abs().max() > 0 for k, v in b.items() if "lora_B" in k)  # trained (B starts at zero)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
