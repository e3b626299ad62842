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

    def draw_guidance(self, batch: int, device: torch.device) -> torch.Tensor | float:
        """One g per sample ~ U[g_min, g_max] ([batch]), or the float 1.0 (no CFG pass at all) when both are 1."""
        scale = torch.empty(batch, device=device).uniform_(self.guidance_min, self.guidance_max)
        return 1.0 if self.guidance_min == self.guidance_max == 1.0 else scale

    def teacher_step(self, x_hi, t_hi, t_lo, context, guidance: torch.Tensor | float) -> torch.Tensor:
        """x_lo: the frozen teacher's DDIM step from t_hi to t_lo, guided by g (a float or one per sample)."""
        return ddim_jump(self.teacher(x_hi, t_hi, context, guidance), t_lo, self.schedule)

    def previous_point(self, x0, noise, x_hi, t_hi, t_lo, context) -> torch.Tensor:
        return self.teacher_step(x_hi, t_hi, t_lo, context, self.draw_guidance(x_hi.shape[0], x_hi.device))


class ConsistencyDistillation(TeacherStep, ConsistencyModule):
    """CD: teacher step + LCM parameterization ``f = c_skip x + c_out x0_hat`` (boundary at t = 0)."""

    sampler_kind = "multistep"

    def __init__(self, *args, guidance_min: float = 6.0, guidance_max: float = 16.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_guidance_range(guidance_min, guidance_max)
        self.save_hyperparameters(ignore=["unet", "schedule", "optimizer", "lr_scheduler"])

    def consistency(self, x_t, t, pred: Prediction, boundary) -> torch.Tensor:
        return lcm_consistency(x_t, t, pred)
