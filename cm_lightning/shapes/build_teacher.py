"""Build the shapes world's teacher from scratch: ``python -m cm_lightning.shapes.build_teacher``.

Stages, each optional: 1. the text encoder (a small CLIPTextModel) is trained to state each caption's scene
(``shapes/text_training.py``; ``text.steps=0`` keeps its random weights), then frozen for good; 2. the VAE is
trained on shapes images (or taken from another teacher with ``reuse_vae_from=``); 3. the UNet is trained by
``cm_lightning.train`` with ``method=teacher`` (eps-prediction, caption dropout). ``continue_from=`` skips 1-2
and trains an existing teacher's UNet further.
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

from ..cli import compute_device, one_line_errors
from .world import ShapesSource
from ..errors import UserError
from .text_training import train_text_encoder
from ..models.tiny import build_tiny_sd
from .vae_training import train_vae
from ..conf_dir import CONF_PATH

log = logging.getLogger("cm_lightning.shapes.build_teacher")


def build_teacher(cfg: DictConfig) -> Path:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..train import train

    out = Path(cfg.out)
    work = out.parent / f".{out.name}-work"
    shutil.rmtree(work, ignore_errors=True)
    device = compute_device(cfg.device)
    if cfg.get("continue_from"):  # keep that model's VAE, text encoder and UNet weights; train the UNet further
        base = Path(shutil.copytree(cfg.continue_from, work / "base"))
        vae_metrics, text_metrics = {"continued_from": str(cfg.continue_from)}, {}
    else:
        base = build_tiny_sd(work / "base", **OmegaConf.to_container(cfg.architecture, resolve=True))
        text_metrics = {}
        if cfg.text.steps > 0:
            text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
            tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
            text_metrics = train_text_encoder(text_encoder, tokenizer, steps=cfg.text.steps,
                                              batch_size=cfg.text.batch_size, lr=cfg.text.lr,
                                              num_captions=cfg.text.num_captions, device=device)
            text_encoder.to("cpu").save_pretrained(base / "text_encoder")
        if cfg.get("reuse_vae_from"):
            vae = _load_vae(Path(cfg.reuse_vae_from), cfg.architecture.image_size)
            vae_metrics = {"reused_from": str(cfg.reuse_vae_from)}
        else:
            vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
            source = ShapesSource(cfg.vae.num_images, split="train", image_size=cfg.architecture.image_size, seed=1)
            vae_metrics = train_vae(vae, source, resolution=cfg.architecture.image_size, steps=cfg.vae.steps,
                                    batch_size=cfg.vae.batch_size, lr=cfg.vae.lr, kl_weight=cfg.vae.kl_weight,
                                    device=device, num_workers=cfg.vae.num_workers)
        shutil.rmtree(base / "vae")
        vae.to("cpu", torch.float16).save_pretrained(base / "vae")  # shipped in fp16 (25 MB budget); runs in fp32

    overrides = [*cfg.unet_overrides, f"model.pretrained={base}", f"paths.output_dir={work / 'unet_run'}",
                 f"paths.cache_dir={cfg.paths.cache_dir}"]
    log.info("training the UNet: %s", " ".join(overrides))
    metrics = train(compose(config_name="train", overrides=overrides))

    if out.exists():
        shutil.rmtree(out)
    shutil.move(str(work / "unet_run" / "model"), out)
    record = {
        "command": " ".join(["python -m cm_lightning.shapes.build_teacher", *sys.argv[1:]]),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "architecture": OmegaConf.to_container(cfg.architecture, resolve=True),
        "text_encoder": {**OmegaConf.to_container(cfg.text, resolve=True), **text_metrics},
        "vae": vae_metrics if "reused_from" in vae_metrics else {**OmegaConf.to_container(cfg.vae, resolve=True),
                                                                 **vae_metrics},
        "continue_from": cfg.get("continue_from"),
        "unet_overrides": list(overrides[: len(cfg.unet_overrides)]),
        "unet_final_loss": metrics.get("train/loss"),
    }
    previous = Path(cfg.continue_from) / "build_record.json" if cfg.get("continue_from") else None
    if previous is not None and previous.is_file():  # a teacher built over several calls keeps its history
        record["previous"] = json.loads(previous.read_text())
    (out / "build_record.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    log.info("teacher written to %s", out)
    return out


def _load_vae(folder: Path, image_size: int):
    """The VAE of another teacher folder, checked to fit this build's image size."""
    from diffusers import AutoencoderKL

    if not (folder / "vae" / "config.json").is_file():
        raise UserError(f"reuse_vae_from={folder}: no vae/config.json there; give a teacher folder")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
    if vae.config.sample_size != image_size:
        raise UserError(f"reuse_vae_from={folder}: its VAE is for {vae.config.sample_size} px images, "
                        f"but architecture.image_size={image_size}")
    return vae


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="build_teacher")
@one_line_errors
def main(cfg: DictConfig) -> None:
    print(build_teacher(cfg))


if __name__ == "__main__":
    main()
