"""One interface over any epsilon/v network: ``Denoiser(x_t, t, context) -> Prediction(x0, eps)``.

The network is a plain callable ``net(x_t, t, context) -> output`` (a diffusers UNet wrapped by a lambda),
so this module knows nothing of diffusers, LoRA or Lightning. Classifier-free guidance runs the conditional
and unconditional halves in one batched call of 2B.
"""

from __future__ import annotations

from typing import Callable

import torch

from .parameterization import Prediction, guided, split_prediction
from .schedule import NoiseSchedule

Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Denoiser:
    def __init__(self, net: Network, schedule: NoiseSchedule):
        self.net = net
        self.schedule = schedule

    def __call__(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        *,
        guidance_scale: torch.Tensor | float = 1.0,
        null_context: torch.Tensor | None = None,
    ) -> Prediction:
        """Predict (x0_hat, eps_hat) at x_t [B, C, H, W], timesteps t [B], text context [B, L, D].

        With ``guidance_scale`` != 1 (a float or a [B] tensor, diffusers' form) the guided eps and x0 are
        returned; ``null_context`` ([L, D] or [B, L, D]) is the empty-prompt embedding.
        """
        if isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0:
            return split_prediction(self.net(x_t, t, context), x_t, t, self.schedule)
        if null_context is None:
            raise ValueError("classifier-free guidance needs null_context (the empty-prompt embedding)")
        null = null_context.expand_as(context) if null_context.ndim == 2 else null_context
        output = self.net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([null.to(context.dtype), context]))
        uncond, cond = output.chunk(2)
        # guiding the raw output is the same as guiding eps (and x0): both are affine in it at fixed x_t, t
        return split_prediction(guided(uncond, cond, guidance_scale), x_t, t, self.schedule)
