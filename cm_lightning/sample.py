"""Draw images: ``python -m cm_lightning.sample run=PATH prompts='[...]' steps=4 seed=0``.

Writes one PNG per prompt and ``grid.png`` into the output folder (``outputs/sample/...`` by default).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from .cli import checked_command_line, compute_device, load_model, one_line_errors, parse_dtype
from .config_check import check_missing, check_unknown_keys
from .figures import image_grid, save_images
from .models.components import load_components
from .pipeline import RunInfo, load_drawer, resolve_run_folder
from .prompts import read_prompts
from .conf_dir import CONF_PATH

log = logging.getLogger("cm_lightning.sample")

TEACHER_STEPS, TEACHER_GUIDANCE = 50, 7.5


def load_base_model(cfg: DictConfig):
    """The model a run was trained on (or ``base_model=``); without a run, the configured ``model``."""
    if cfg.get("run"):
        info = RunInfo.read(resolve_run_folder(cfg.run))
        return load_components(cfg.get("base_model") or info.model)
    return load_model(cfg.model)


def sample(cfg: DictConfig) -> Path:
    check_missing(cfg)
    check_unknown_keys(cfg, "sample")
    prompts = read_prompts(cfg.prompts, cfg.prompts_file)
    device = compute_device(cfg.device)
    dtype = parse_dtype(cfg.dtype, "dtype") if device.type == "cuda" else torch.float32
    components = load_base_model(cfg)
    drawer, info = load_drawer(
        components, cfg.run, device=device, dtype=dtype,
        encoder_dtype=parse_dtype(cfg.model.encoder_dtype, "model.encoder_dtype"),
    )
    steps = cfg.steps or (info.sample_steps if info else TEACHER_STEPS)
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else (1.0 if info else TEACHER_GUIDANCE)
    images = drawer.draw(prompts, steps=steps, guidance_scale=guidance, seed=cfg.seed, batch_size=cfg.batch_size,
                         progress=True)
    out = Path(cfg.output_dir)
    save_images(images, out)
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    image_grid(images, columns=min(len(prompts), 4)).save(out / "grid.png")
    log.info("%d images (%s, %d steps, g=%.1f) written to %s", len(prompts), drawer.sampler, steps, guidance, out)
    return out


@checked_command_line("sample")
@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="sample")
@one_line_errors
def main(cfg: DictConfig) -> None:
    print(sample(cfg))


if __name__ == "__main__":
    main()
