"""Consistency Training: no teacher. x_hi and x_lo share one noise draw (the oracle DDIM step).

Captions are dropped with probability ``caption_dropout`` so that classifier-free guidance still works at inference.
iCT's options (Song & Dhariwal 2023) are available and off by default, so that CT, CD and MCD compare on
equal terms: lognormal pair choice, 1/(sigma_hi - sigma_lo) weighting, step-doubling curriculum
(use ``loss=pseudo_huber_norm`` for iCT's whole-sample Huber).
"""

from __future__ import annotations

import torch

from ..diffusion.grid import curriculum_num_steps, lognormal_step_weights, solver_grid
from ..diffusion.parameterization import Prediction, drop_captions, lcm_consistency
from .base import ConsistencyModule


class ConsistencyTraining(ConsistencyModule):
    sampler_kind = "multistep"

    def __init__(
        self, *args, caption_dropout: float = 0.1, pair_sampling: str = "uniform", weighting: str = "none",
        curriculum_start: int | None = None, **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._lognormal_weights: dict[int, torch.Tensor] = {}  # per grid size: the curriculum changes it
        if pair_sampling not in ("uniform", "lognormal"):
            raise ValueError(f"method.pair_sampling={pair_sampling!r} is not one of 'uniform', 'lognormal'")
        if weighting not in ("none", "ict"):
            raise ValueError(f"method.weighting={weighting!r} is not one of 'none', 'ict'")
        self.caption_dropout = caption_dropout
        self.pair_sampling, self.weighting, self.curriculum_start = pair_sampling, weighting, curriculum_start
        self.save_hyperparameters(ignore=["unet", "schedule", "optimizer", "lr_scheduler"])

    def previous_point(self, x0, noise, x_hi, t_hi, t_lo, context) -> torch.Tensor:
        # the DDIM step whose x0_hat and eps_hat are the true x0 and noise
        return self.schedule.add_noise(x0, noise, t_lo)

    def consistency(self, x_t, t, pred: Prediction, boundary) -> torch.Tensor:
        return lcm_consistency(x_t, t, pred)

    def training_context(self, context: torch.Tensor) -> torch.Tensor:
        if not self.training or self.caption_dropout <= 0 or self.null_context is None:
            return context
        return drop_captions(context, self.null_context, self.caption_dropout)

    def training_grid(self) -> torch.Tensor:
        if self.curriculum_start is None:
            return self.grid
        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else 1
        n = curriculum_num_steps(self.global_step, total, self.curriculum_start, self.grid.numel())
        return solver_grid(self.schedule.num_train_timesteps, n)

    def pair_index_weights(self, grid: torch.Tensor) -> torch.Tensor | None:
        if self.pair_sampling == "uniform":
            return None
        size = grid.numel()
        if size not in self._lognormal_weights:  # computed once per grid size, not every step
            self._lognormal_weights[size] = lognormal_step_weights(self.schedule.alphas_cumprod, grid)
        return self._lognormal_weights[size]

    def pair_weights(self, t_hi: torch.Tensor, t_lo: torch.Tensor) -> torch.Tensor | None:
        if self.weighting == "none":
            return None
        return 1.0 / (self.schedule.ve_sigma(t_hi) - self.schedule.ve_sigma(t_lo)).clamp(min=1e-4)
