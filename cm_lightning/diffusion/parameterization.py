"""From a network output to (x0_hat, eps_hat), DDIM jumps, guidance, and the consistency functions.

Pure tensor maths. Shapes: latents [B, C, H, W]; timesteps [B] long (0..T-1).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .schedule import NoiseSchedule


class Prediction(NamedTuple):
    """The clean-latent and noise estimates at x_t (both [B, C, H, W])."""

    x0: torch.Tensor
    eps: torch.Tensor


def split_prediction(output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> Prediction:
    """Network output (eps, v or x0, per ``schedule.prediction_type``) -> (x0_hat, eps_hat)."""
    a, s = schedule.alpha_sigma(t, x_t.ndim)
    a, s = a.to(output.dtype), s.to(output.dtype)
    kind = schedule.prediction_type
    if kind == "epsilon":
        return Prediction((x_t - s * output) / a, output)
    if kind == "v_prediction":
        return Prediction(a * x_t - s * output, a * output + s * x_t)
    if kind == "sample":
        return Prediction(output, (x_t - a * output) / s)
    raise ValueError(f"prediction_type {kind!r} is not one of 'epsilon', 'v_prediction', 'sample'")


def guided(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance in diffusers' form: ``u + g * (c - u)`` (g = 1: no guidance; LCM's w = g - 1)."""
    if isinstance(guidance_scale, torch.Tensor) and guidance_scale.ndim == 1:
        guidance_scale = guidance_scale.view(-1, *([1] * (cond.ndim - 1))).to(cond.dtype)
    return uncond + guidance_scale * (cond - uncond)


def drop_captions(context: torch.Tensor, null_context: torch.Tensor, probability: float) -> torch.Tensor:
    """Caption dropout, the training side of classifier-free guidance: each sample's context [B, L, D] is replaced by
    the empty prompt's ``null_context`` ([L, D]) with ``probability``, so the model also learns the unconditional
    branch that guidance needs. One ``torch.rand(B)`` draw on the context's device."""
    drop = torch.rand(context.shape[0], device=context.device) < probability
    return torch.where(drop.view(-1, 1, 1), null_context.to(context.dtype).expand_as(context), context)


def ddim_jump(pred: Prediction, to_t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """DDIM from (x0_hat, eps_hat) to timestep ``to_t``: ``a_s * x0_hat + s_s * eps_hat`` (identity at s = t)."""
    a, s = schedule.alpha_sigma(to_t, pred.x0.ndim)
    return a.to(pred.x0.dtype) * pred.x0 + s.to(pred.x0.dtype) * pred.eps


def lcm_scalings(
    t: torch.Tensor, *, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM boundary scalings (c_skip, c_out) at integer timesteps t [B]; c_skip(0) = 1, c_out(0) = 0.

    Same formula and float32 arithmetic as diffusers' ``LCMScheduler.get_scalings_for_boundary_condition_discrete``.
    """
    scaled = t.to(torch.float32) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def lcm_consistency(x_t: torch.Tensor, t: torch.Tensor, pred: Prediction, **scaling_kw) -> torch.Tensor:
    """LCM's consistency function ``f(x, t) = c_skip(t) * x + c_out(t) * x0_hat`` (boundary at t = 0)."""
    c_skip, c_out = lcm_scalings(t, **scaling_kw)
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    return c_skip.view(shape).to(x_t.dtype) * x_t + c_out.view(shape).to(x_t.dtype) * pred.x0


def edge_jump_consistency(pred: Prediction, boundary: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """MCD's consistency function: jump with DDIM to the segment's left edge, ``f(x_t, t; s) = x_s``.

    The boundary condition is exact: at t = s the jump returns x_t (up to float rounding).
    """
    return ddim_jump(pred, boundary, schedule)
