"""Draw images: ``python -m cm_lightning.sample run=PATH prompts='[...]' steps=4 seed=0``.

``run`` is a training run, its ``lora/`` folder or checkpoint, an exported folder, or a Hub repo id of an export.
Writes one PNG per image, ``{prompt:03d}_{image:02d}_seed{seed}.png`` (the seed of its starting noise: with a
deterministic sampler, MCD's edge jumps or the teacher's DDIM, ``seed=`` that number redraws the file exactly; the
multistep sampler's re-noising is seeded per batch), ``prompts.txt`` and ``grid.png`` into the output folder
(``outputs/sample/...`` by default).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from .cli import checked_command_line, compute_device, load_model, one_line_errors, parse_dtype
from .config_check import check_missing, check_unknown_keys
from .data.preprocess import tensor_to_image
from .errors import UserError
from .figures import image_grid
from .hub import local_lora
from .models.components import load_components
from .pipeline import RunInfo, load_drawer, resolve_run_folder
from .prompts import read_prompts
from .conf_dir import CONF_PATH

log = logging.getLogger("cm_lightning.sample")

TEACHER_STEPS, TEACHER_GUIDANCE = 50, 7.5


def load_base_model(cfg: DictConfig):
    """The model a run was trained on (or ``base_model=``); without a run, the configured ``model``."""
    if cfg.get("run"):
        info = RunInfo.read(resolve_run_folder(local_lora(cfg.run)))
        base = cfg.get("base_model") or info.model
        if base.startswith("<local>/"):
            raise UserError(f"run={cfg.run} was trained on a local model ({base}); pass base_model=PATH_OR_HUB_ID")
        return load_components(base)
    return load_model(cfg.model)


def check_size(cfg: DictConfig, scale: int) -> tuple[int, int] | None:
    """(h, w) of the latents for ``height``/``width`` (pixels, multiples of the VAE's scale), or None (the model's)."""
    if cfg.height is None and cfg.width is None:
        return None
    for name in ("height", "width"):
        value = cfg.get(name)
        if value is not None and (not isinstance(value, int) or value <= 0 or value % scale):
            raise UserError(f"{name}={value}: must be a positive multiple of {scale} pixels")
    return cfg.height, cfg.width


def sample(cfg: DictConfig) -> Path:
    check_missing(cfg)
    check_unknown_keys(cfg, "sample")
    prompts = read_prompts(cfg.prompts, cfg.prompts_file)
    if not isinstance(cfg.images_per_prompt, int) or cfg.images_per_prompt < 1:
        raise UserError(f"images_per_prompt={cfg.images_per_prompt}: must be a positive integer")
    device = compute_device(cfg.device)
    dtype = parse_dtype(cfg.dtype, "dtype") if device.type == "cuda" else torch.float32
    components = load_base_model(cfg)
    drawer, info = load_drawer(
        components, local_lora(cfg.run) if cfg.run else None, device=device, dtype=dtype,
        encoder_dtype=parse_dtype(cfg.model.encoder_dtype, "model.encoder_dtype"), compile=cfg.compile,
    )
    steps = cfg.steps or (info.sample_steps if info else TEACHER_STEPS)
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else (1.0 if info else TEACHER_GUIDANCE)
    scale = drawer.encoders.vae_scale
    size = check_size(cfg, scale)
    if size is not None:
        default = drawer.unet.config.sample_size * scale
        drawer.latent_size = ((size[0] or default) // scale, (size[1] or default) // scale)
    if cfg.negative_prompt and guidance == 1.0:
        log.warning("negative_prompt has no effect at guidance_scale=1 (a student's default); set guidance_scale > 1")
    each = cfg.images_per_prompt
    drawn = [prompt for prompt in prompts for _ in range(each)]  # image i starts from noise seeded seed + i
    images = drawer.draw(drawn, steps=steps, guidance_scale=guidance, seed=cfg.seed, batch_size=cfg.batch_size,
                         progress=True, negative_prompt=cfg.negative_prompt)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        tensor_to_image(image).save(out / f"{i // each:03d}_{i % each:02d}_seed{cfg.seed + i}.png")
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    image_grid(images, columns=each if each > 1 else min(len(prompts), 4)).save(out / "grid.png")
    log.info("%d images (%s, %d steps, g=%.1f) written to %s", len(drawn), drawer.sampler, steps, guidance, out)
    return out


@checked_command_line("sample")
@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="sample")
@one_line_errors
def main(cfg: DictConfig) -> None:
    print(sample(cfg))


if __name__ == "__main__":
    main()
