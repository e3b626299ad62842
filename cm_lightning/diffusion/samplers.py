"""Samplers: the teacher's DDIM, CD's multistep (LCM) and MCD's edge jumps, one shape for all.

Each takes a :class:`Denoiser`, the start noise ``x`` [B, C, H, W] and the descending timesteps, plus the
text context and guidance, and returns the final latent. Each matches a diffusers scheduler numerically:
DDIM <-> ``DDIMScheduler`` (eta = 0), multistep <-> ``LCMScheduler``, edge jumps <-> ``TCDScheduler``
(eta = 0, custom timesteps). Tests pin these parities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .denoiser import Denoiser
from .parameterization import Prediction, ddim_jump, lcm_consistency

StepCallback = Callable[[int, torch.Tensor, Prediction], None]


@dataclass
class Conditioning:
    """Text context for a batch: prompts' embeddings [B, L, D], the empty prompt's [L, D], guidance scale g."""

    context: torch.Tensor
    null_context: torch.Tensor | None = None
    guidance_scale: float = 1.0

    def predict(self, denoiser: Denoiser, x: torch.Tensor, t: int) -> Prediction:
        timesteps = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        return denoiser(
            x, timesteps, self.context, guidance_scale=self.guidance_scale, null_context=self.null_context
        )


def _alpha_sigma_at(denoiser: Denoiser, t: int, batch: int, device, ndim: int, final_alpha: float):
    """(a, s) at timestep t, where t < 0 means "past the end of the schedule" (abar = final_alpha)."""
    if t >= 0:
        return denoiser.schedule.alpha_sigma(torch.full((batch,), t, device=device, dtype=torch.long), ndim)
    abar = torch.tensor(final_alpha, device=device)
    return abar.sqrt(), (1 - abar).sqrt()


def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning,
    *,
    num_train_timesteps: int | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) as diffusers' ``DDIMScheduler``: from t to ``t - T // n`` each step.

    The final step lands on ``schedule.final_alpha_cumprod`` (1.0 when the config sets ``set_alpha_to_one``).
    """
    schedule = denoiser.schedule
    total = num_train_timesteps or schedule.num_train_timesteps
    stride = total // len(timesteps)
    for i, t in enumerate(timesteps.tolist()):
        pred = cond.predict(denoiser, x, t)
        a, s = _alpha_sigma_at(denoiser, t - stride, x.shape[0], x.device, x.ndim, schedule.final_alpha_cumprod)
        x = a.to(x.dtype) * pred.x0 + s.to(x.dtype) * pred.eps
        if callback is not None:
            callback(i, x, pred)
    return x


def sample_multistep(
    denoiser: Denoiser,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """CD's multistep sampler, exactly ``LCMScheduler``: x0 = f(x, t) with LCM scalings, then re-noise to the next t.

    Fresh noise is drawn with ``torch.randn(..., generator=generator)`` in the same order as diffusers' pipeline.
    Returns the last x0 (no noise added after the final step).
    """
    steps = timesteps.tolist()
    for i, t in enumerate(steps):
        pred = cond.predict(denoiser, x, t)
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        denoised = lcm_consistency(x, t_batch, pred)
        if i + 1 < len(steps):
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            next_t = torch.full_like(t_batch, steps[i + 1])
            x = ddim_jump(Prediction(denoised, noise), next_t, denoiser.schedule)
        else:
            x = denoised
        if callback is not None:
            callback(i, x, pred)
    return x


def sample_edge_jumps(
    denoiser: Denoiser,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning,
    *,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """MCD's deterministic sampler: from each timestep, one DDIM jump to the next (the segment edges), finally to 0.

    K = 4: 999 -> 779 -> 519 -> 259 -> 0, one network call per segment; equals ``TCDScheduler(eta=0)`` with
    ``timesteps=[999, 779, 519, 259]``. The last jump lands on timestep 0 (abar_0), as TCD and PCM do.
    """
    steps = timesteps.tolist() + [0]
    for i, t in enumerate(steps[:-1]):
        pred = cond.predict(denoiser, x, t)
        x = ddim_jump(pred, torch.full((x.shape[0],), steps[i + 1], device=x.device, dtype=torch.long), denoiser.schedule)
        if callback is not None:
            callback(i, x, pred)
    return x
