"""Validation while training: how close the student's few-step images are to the teacher's, on fixed prompts.

Every ``every_n_steps`` optimizer steps and at the end of training, the student draws a small fixed prompt set with
its own sampler and step count (guidance distilled in: g = 1) from fixed noise; the metric is the teacher gap, the
RMSE in pixels ([-1, 1]) to the teacher's 50-step DDIM images (CFG at ``teacher_guidance``) from the same noise.
Noise and re-noising (CT/CD's multistep sampler) are drawn as the quality table draws them (image i from seed
``seed + i``, each batch's re-noising from ``renoise_generator``), so the metric equals the table's teacher gap for
the same prompts, seed and batch size.
The teacher is the same UNet with its adapters switched off, and its images are drawn once per run. With
``clip_model`` set (a local CLIP folder), the CLIP score of the student's images is logged beside it.

The metrics go to every logger and into ``trainer.callback_metrics`` (``val/teacher_gap``, ``val/clip_score``),
so ``train`` returns them and sweeps optimise them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch

from ..diffusion.samplers import Conditioning
from ..eval.metrics import clip_score, teacher_gap
from ..figures import image_grid
from ..loggers import log_image
from ..models.compilation import eager_blocks
from ..models.lora import adapters_disabled
from ..prompts import read_prompts
from .sampling import generate_latents, renoise_generator

log = logging.getLogger(__name__)


def has_adapters(unet: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in unet.modules())


class TeacherGapValidation(L.Callback):
    """The teacher gap (and optionally CLIP score) of the student on ``num_prompts`` fixed prompts.

    Args:
        enabled: off, the callback does nothing (the default for model=tiny, whose random weights make no teacher).
        every_n_steps: validate every this many optimizer steps (0: only at the end of training).
        prompts, prompts_file: the prompt set (default: the seed's eight prompts), cut to ``num_prompts``.
        teacher_steps, teacher_guidance: the reference, DDIM with CFG at diffusers' g. Keep it fixed across the runs
            of a sweep (not the sweep's guidance range), so that their metrics compare.
        student_steps: default the method's own (4 for CD/CT, K for MCD); ``student_guidance``: g for the student.
        clip_model: a local CLIP folder (transformers format) for ``val/clip_score``; null skips it.
        folder: where the teacher's reference grid and each validation grid are saved (null: not saved).
    """

    def __init__(self, enabled: bool = True, every_n_steps: int = 250, prompts: list[str] | None = None, prompts_file: str | None = None,
                 num_prompts: int = 8, teacher_steps: int = 50, teacher_guidance: float = 7.5,
                 student_steps: int | None = None, student_guidance: float = 1.0, seed: int = 1234,
                 batch_size: int = 8, clip_model: str | None = None, folder: str | None = None):
        self.enabled, self.every_n_steps, self.num_prompts = enabled, every_n_steps, num_prompts
        self.prompts = read_prompts(prompts, prompts_file)[:num_prompts]
        self.teacher_steps, self.teacher_guidance = teacher_steps, teacher_guidance
        self.student_steps, self.student_guidance = student_steps, student_guidance
        self.seed, self.batch_size, self.clip_model = seed, batch_size, clip_model
        self.folder = Path(folder) if folder else None
        self.ddim_options: dict = {}  # the model's timestep spacing, from train.py (bind_scheduler_config)
        self.reference: torch.Tensor | None = None  # the teacher's images, [N, 3, H, W] on the CPU
        self.last_step = -1
        self.history: list[dict[str, float]] = []

    def bind_scheduler_config(self, config: dict) -> None:
        """The model's DDIM timestep spacing, so that the reference is what ``sample`` draws for the teacher."""
        self.ddim_options = {"timestep_spacing": config.get("timestep_spacing", "leading"),
                             "steps_offset": config.get("steps_offset", 0)}

    # ------------------------------------------------------------------ hooks
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self.validate(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self.validate(trainer, module)

    # ------------------------------------------------------------------ drawing
    def _noise(self, module) -> torch.Tensor:
        config = module.unet.config
        shape = (config.in_channels, config.sample_size, config.sample_size)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(self.seed + i))
                            for i in range(len(self.prompts))])

    def _draw(self, module, encoders, draw_batch) -> torch.Tensor:
        """Images for every prompt, ``batch_size`` at a time: ``draw_batch(noise, context, null, start)``."""
        noise, images = self._noise(module), []
        null = module.null_context if module.null_context is not None else encoders.encode_prompts([""])[0]
        for start in range(0, len(self.prompts), self.batch_size):
            prompts = self.prompts[start:start + self.batch_size]
            context = encoders.encode_prompts(prompts).to(module.device)
            latents = draw_batch(noise[start:start + len(prompts)].to(module.device), context,
                                 null.to(module.device), start)
            images.append(encoders.decode_latents(latents.float().to(encoders.device)).float().cpu())
        return torch.cat(images)

    def teacher_images(self, module, encoders) -> torch.Tensor:
        def draw(noise, context, null, start):  # eager blocks, as the student's sample_latents runs them
            with adapters_disabled(module.unet), eager_blocks():
                return generate_latents(module.unet, module.schedule, "ddim", noise,
                                        Conditioning(context, null, self.teacher_guidance), steps=self.teacher_steps,
                                        generator=renoise_generator(self.seed, start, module.device),
                                        **self.ddim_options)

        return self._draw(module, encoders, draw)

    def student_images(self, module, encoders) -> torch.Tensor:
        def draw(noise, context, null, start):  # re-noising (CT/CD's multistep) from the table's generator
            return module.sample_latents(noise, context, steps=self.student_steps,
                                         guidance_scale=self.student_guidance,
                                         generator=renoise_generator(self.seed, start, module.device))

        return self._draw(module, encoders, draw)

    @torch.no_grad()
    def validate(self, trainer, module) -> dict[str, float] | None:
        encoders = getattr(trainer.datamodule, "encoders", None)
        if (not self.enabled or not trainer.is_global_zero or encoders is None or not hasattr(module, "sample_latents")
                or trainer.global_step == self.last_step or not self.prompts or not has_adapters(module.unet)):
            return None  # (a run without adapters, method=teacher, has no teacher to compare with)
        self.last_step = trainer.global_step
        started = time.perf_counter()
        was_training = module.training
        module.eval()
        try:
            with torch.autocast(module.device.type, enabled=False):  # sampling runs at the frozen weights' dtype
                if self.reference is None:
                    self.reference = self.teacher_images(module, encoders)
                    self._show(trainer, "validation/teacher", self.reference,
                               f"teacher DDIM {self.teacher_steps}, g={self.teacher_guidance:g}")
                    log.info("validation: the teacher's reference drawn in %.1f s", time.perf_counter() - started)
                    started = time.perf_counter()
                images = self.student_images(module, encoders)
        finally:
            module.train(was_training)
        metrics = {"val/teacher_gap": teacher_gap(images, self.reference)}
        if self.clip_model:
            metrics["val/clip_score"] = clip_score(images, self.prompts, self.clip_model)
        self.history.append({"step": trainer.global_step, **metrics})
        self._show(trainer, "validation/student", images, f"step {trainer.global_step}")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        log.info("step %d: %s (%.1f s)", trainer.global_step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                 time.perf_counter() - started)
        return metrics

    def _show(self, trainer, key: str, images: torch.Tensor, caption: str) -> None:
        grid = image_grid(images, columns=min(4, len(images)))
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            name = "teacher_reference" if key.endswith("teacher") else f"validation_step{trainer.global_step:06d}"
            grid.save(self.folder / f"{name}.png")
        log_image(trainer.loggers, key, grid, caption, trainer.global_step)
