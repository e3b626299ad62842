"""Training callbacks: sample grids from the student while it trains (PNG files, and W&B images when logging there)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch

from ..figures import image_grid
from ..loggers import log_image
from ..prompts import read_prompts

log = logging.getLogger(__name__)


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` optimizer steps and at the end of training, draw ``prompts`` with the method's own
    sampler (from fixed noise, so grids are comparable across steps) and save ``samples/step{N:06d}.png``.

    The grid also goes to every logger that can show images (W&B, TensorBoard).
    """

    def __init__(self, folder: str, every_n_steps: int = 250, prompts: list[str] | None = None,
                 prompts_file: str | None = None, steps: int | None = None, guidance_scale: float = 1.0,
                 seed: int = 0, max_prompts: int = 8):
        self.folder, self.every_n_steps = Path(folder), every_n_steps
        self.prompts = read_prompts(prompts, prompts_file)[:max_prompts]
        self.steps, self.guidance_scale, self.seed = steps, guidance_scale, seed
        self.last_step = -1

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self.draw(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self.draw(trainer, module)

    @torch.no_grad()
    def draw(self, trainer, module) -> None:
        encoders = getattr(trainer.datamodule, "encoders", None)
        if not trainer.is_global_zero or encoders is None or not hasattr(module, "sample_latents"):
            return
        if trainer.global_step == self.last_step:
            return
        self.last_step = trainer.global_step
        started = time.perf_counter()
        unet = module.unet
        shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(self.seed + i))
                             for i in range(len(self.prompts))]).to(module.device)
        context = encoders.encode_prompts(self.prompts).to(module.device)
        was_training = module.training
        module.eval()
        with torch.autocast(module.device.type, enabled=False):
            latents = module.sample_latents(noise, context, steps=self.steps, guidance_scale=self.guidance_scale,
                                            generator=torch.Generator(module.device).manual_seed(self.seed))
        module.train(was_training)
        grid = image_grid(encoders.decode_latents(latents.float().to(encoders.device)).cpu(),
                          columns=min(4, len(self.prompts)))
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step{trainer.global_step:06d}.png"
        grid.save(path)
        log_image(trainer.loggers, "samples", grid, " | ".join(self.prompts), trainer.global_step)
        log.info("step %d: sample grid %s (%.1f s)", trainer.global_step, path, time.perf_counter() - started)
