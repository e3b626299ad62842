"""Stable Diffusion 1.5's architecture (its published configs) with random weights, for speed and memory work.

Timing does not depend on the weight values, so benchmarks at full scale run where the real weights cannot be
downloaded. The configs are SD1.5's ``unet/``, ``vae/`` and ``text_encoder/`` ``config.json`` values.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)


def random_sd15(parts: tuple[str, ...] = ("unet", "vae", "text_encoder"), seed: int = 0,
                device: str | torch.device = "cpu") -> dict[str, torch.nn.Module]:
    """The named SD1.5 networks with random weights (float32), built on ``device`` (a GPU initialises the ~1.1 B
    weights in a fraction of the CPU's ~10 s; the values differ from a CPU build's, which timing does not see)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    builders = {
        "unet": lambda: UNet2DConditionModel(**SD15_UNET),
        "vae": lambda: AutoencoderKL(**SD15_VAE),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
    }
    with torch.device(device):
        return {name: builders[name]() for name in parts}


def write_random_sd15(folder: str | Path, device: str | torch.device = "cpu") -> Path:
    """A diffusers SD1.5 folder (the layout ``model=local`` loads) with random weights and the offline tokenizer."""
    from diffusers import DDIMScheduler

    from .tiny import SD15_SCHEDULER, _model_index
    from .tokenizer import write_clip_tokenizer

    folder = Path(folder)
    for name, net in random_sd15(device=device).items():
        net.save_pretrained(folder / name)
    write_clip_tokenizer(folder / "tokenizer")
    DDIMScheduler(**SD15_SCHEDULER).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(_model_index(), indent=2))
    return folder
