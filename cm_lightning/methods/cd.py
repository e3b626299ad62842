"""Consistency Distillation (LCM-style): the teacher's guided DDIM step makes x_lo; LCM boundary scalings."""

from __future__ import annotations

import torch

from ..diffusion.parameterization import Prediction, ddim_jump, lcm_consistency
from .base import ConsistencyModule


class TeacherStep:
    """Mixin: x_lo is one guided DDIM step of the frozen teacher from x_hi.

    ``guidance_min``/``guidance_max`` are in diffusers' form g (eps = eps_u + g (eps_c - eps_u)); one g per sample is
    drawn from U[g_min, g_max]. The LCM papers' w is g - 1: the reference's w ~ U[5, 15] is g ~ U[6, 16].
    """

    guidance_min: float
    guidance_max: float

    def set_guidance_range(self, guidance_min: float, guidance_max: float) -> None:
        if not 1.0 <= guidance_min <= guidance_max:
            raise ValueError(f"need 1 <= method.guidance_min <= method.guidance_max, got {guidance_min}, {guidance_max}")
        self.guidance_min, self.guidance_max = guidance_min, guidance_max

    def previous_point(self, x0, noise, x_hi, t_hi, t_lo, context) -> torch.Tensor:
        scale = torch.empty(x_hi.shape[0], device=x_hi.device).uniform_(self.guidance_min, self.guidance_max)
        if self.guidance_min == self.guidance_max == 1.0:
            scale = 1.0
        pred = self.teacher(x_hi, t_hi, context, scale)
        return ddim_jump(pred, t_lo, self.schedule)


class ConsistencyDistillation(TeacherStep, ConsistencyModule):
    """CD: teacher step + LCM parameterization ``f = c_skip x + c_out x0_hat`` (boundary at t = 0)."""

    sampler_kind = "multistep"

    def __init__(self, *args, guidance_min: float = 6.0, guidance_max: float = 16.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_guidance_range(guidance_min, guidance_max)
        self.save_hyperparameters(ignore=["unet", "schedule", "optimizer", "lr_scheduler"])

    def consistency(self, x_t, t, pred: Prediction, boundary) -> torch.Tensor:
        return lcm_consistency(x_t, t, pred)
