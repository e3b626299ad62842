"""The noise schedule of a diffusion model, read from its own scheduler config.

Timesteps are integers 0..T-1 everywhere. ``x_t = a_t * x0 + s_t * eps`` with ``a_t = sqrt(abar_t)``,
``s_t = sqrt(1 - abar_t)``. Timestep 0 is SD's first noisy level (abar_0 = 0.99915 for SD1.5), as in
diffusers' DDIM, LCM and TCD schedulers; nothing in this project jumps to "exactly clean" except the
teacher's DDIM when its config says ``set_alpha_to_one``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

PredictionType = Literal["epsilon", "v_prediction", "sample"]


def ve_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = s_t / a_t = sqrt((1 - abar_t) / abar_t) for every timestep: the variance-exploding noise level of
    x_t / a_t, in which iCT writes its lognormal pair choice and its 1 / (sigma_hi - sigma_lo) weighting."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


@dataclass(frozen=True)
class NoiseSchedule:
    """abar_t for t = 0..T-1 (float32, as diffusers keeps it) and what the network predicts."""

    alphas_cumprod: torch.Tensor  # [T]
    prediction_type: PredictionType = "epsilon"
    final_alpha_cumprod: float = 1.0  # DDIM's value past t = 0 (1.0 if set_alpha_to_one, else abar_0)

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "NoiseSchedule":
        """Build from a diffusers scheduler config (``scheduler/scheduler_config.json``).

        The betas are computed by diffusers' own ``DDIMScheduler`` so that every ``beta_schedule`` it knows
        (linear, scaled_linear, squaredcos_cap_v2, zero-SNR rescaling) is read exactly as the model was trained.
        """
        from diffusers import DDIMScheduler  # the numerical oracle for the schedule

        ddim = DDIMScheduler.from_config(config)
        return cls(
            alphas_cumprod=ddim.alphas_cumprod.to(torch.float32).clone(),
            prediction_type=ddim.config.prediction_type,
            final_alpha_cumprod=float(ddim.final_alpha_cumprod),
        )

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def alpha_sigma(self, t: torch.Tensor, ndim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) for integer timesteps t [B], shaped [B, 1, ..., 1] to broadcast over ``ndim`` dims."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        shape = (-1,) + (1,) * (ndim - 1)
        return abar.sqrt().view(shape), (1 - abar).sqrt().view(shape)

    def ve_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The VE (EDM / iCT) noise level sigma_t = s_t / a_t at integer timesteps t [B] (see :func:`ve_sigmas`)."""
        return ve_sigmas(self.alphas_cumprod.to(t.device))[t.long()]

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio a_t^2 / s_t^2 at integer timesteps t [B] (float32)."""
        abar = self.alphas_cumprod.to(t.device)[t.long()].float()
        return abar / (1 - abar)

    def min_snr_weights(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma loss weights [B] (Hang et al. 2023; diffusers' ``snr_gamma``) for this schedule's
        prediction type: the loss of each sample counts as an x0-loss clipped at SNR gamma, so the nearly clean
        timesteps stop dominating training and the noisy ones (where the prompt decides the image) learn faster."""
        snr = self.snr(t)
        clipped = snr.clamp(max=gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = a_t * x0 + s_t * noise (the forward process q(x_t | x0))."""
        a, s = self.alpha_sigma(t, x0.ndim)
        return a.to(x0.dtype) * x0 + s.to(x0.dtype) * noise
