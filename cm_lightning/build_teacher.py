"""Build the shapes world's teacher from scratch: ``python -m cm_lightning.build_teacher``.

The text encoder is a small CLIPTextModel with random weights, kept frozen (its embeddings of the world's words
are distinct and stable; the UNet's cross-attention learns to read them). The VAE is trained here on shapes
images; the UNet is trained by ``cm_lightning.train`` with ``method=teacher`` (eps-prediction, caption dropout).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from datetime import date
from pathlib import Path

import hydra
import torch
from hydra import compose
from omegaconf import DictConfig, OmegaConf

from .cli import compute_device, one_line_errors
from .data.shapes import ShapesSource
from .models.tiny import build_tiny_sd
from .models.vae_training import train_vae

log = logging.getLogger("cm_lightning.build_teacher")


def build_teacher(cfg: DictConfig) -> Path:
    from diffusers import AutoencoderKL

    from .train import train

    out = Path(cfg.out)
    work = out.parent / f".{out.name}-work"
    shutil.rmtree(work, ignore_errors=True)
    device = compute_device(cfg.device)
    if cfg.get("continue_from"):  # keep that model's VAE, text encoder and UNet weights; train the UNet further
        base = Path(shutil.copytree(cfg.continue_from, work / "base"))
        vae_metrics = {"continued_from": str(cfg.continue_from)}
    else:
        base = build_tiny_sd(work / "base", **OmegaConf.to_container(cfg.architecture, resolve=True))
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
        source = ShapesSource(cfg.vae.num_images, split="train", image_size=cfg.architecture.image_size, seed=1)
        vae_metrics = train_vae(vae, source, resolution=cfg.architecture.image_size, steps=cfg.vae.steps,
                                batch_size=cfg.vae.batch_size, lr=cfg.vae.lr, kl_weight=cfg.vae.kl_weight,
                                device=device, num_workers=cfg.vae.num_workers)
        vae.to("cpu", torch.float16).save_pretrained(base / "vae")  # shipped in fp16 (25 MB budget); runs in fp32

    overrides = [*cfg.unet_overrides, f"model.pretrained={base}", f"paths.output_dir={work / 'unet_run'}",
                 f"paths.cache_dir={cfg.paths.cache_dir}"]
    log.info("training the UNet: %s", " ".join(overrides))
    metrics = train(compose(config_name="train", overrides=overrides))

    if out.exists():
        shutil.rmtree(out)
    shutil.move(str(work / "unet_run" / "model"), out)
    record = {
        "command": " ".join(["python -m cm_lightning.build_teacher", *sys.argv[1:]]),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "architecture": OmegaConf.to_container(cfg.architecture, resolve=True),
        "vae": {**OmegaConf.to_container(cfg.vae, resolve=True), **vae_metrics},
        "continue_from": cfg.get("continue_from"),
        "unet_overrides": list(overrides[: len(cfg.unet_overrides)]),
        "unet_final_loss": metrics.get("train/loss"),
    }
    (out / "build_record.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    log.info("teacher written to %s", out)
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="build_teacher")
@one_line_errors
def main(cfg: DictConfig) -> None:
    print(build_teacher(cfg))


if __name__ == "__main__":
    main()
