"""Multi-boundary Consistency Distillation: K segments, each with its own boundary at its left edge.

The consistency function jumps with DDIM to the segment's left edge (iCD / PCM): ``f(x_t, t; s) = a_s x0_hat +
s_s eps_hat``, exact at t = s. Edge 0 is SD's timestep 0 (abar_0), as in TCD and PCM. K = 1 is one segment whose
boundary is 0: DDIM-jump-to-0 parameterization of CD (not LCM's c_skip/c_out), sampled in one step.
"""

from __future__ import annotations

import torch

from ..diffusion.grid import EdgeRule, boundary_of, segment_edges
from ..diffusion.parameterization import Prediction, edge_jump_consistency
from .base import ConsistencyModule
from .cd import TeacherStep


class MultiBoundaryConsistencyDistillation(TeacherStep, ConsistencyModule):
    sampler_kind = "edge_jumps"

    def __init__(
        self, *args, num_segments: int = 4, edge_rule: EdgeRule = "icd", guidance_min: float = 6.0,
        guidance_max: float = 16.0, **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.set_guidance_range(guidance_min, guidance_max)
        self.edges = segment_edges(self.grid, num_segments, edge_rule)
        self.save_hyperparameters(ignore=["unet", "schedule", "optimizer", "lr_scheduler"])

    def boundary(self, t_lo: torch.Tensor) -> torch.Tensor:
        return boundary_of(t_lo, self.edges)

    def consistency(self, x_t, t, pred: Prediction, boundary) -> torch.Tensor:
        return edge_jump_consistency(pred, boundary, self.schedule)

    def sampler_options(self) -> dict:
        return {**super().sampler_options(), "edges": self.edges}

    def default_sample_steps(self) -> int:
        return int((self.edges > 0).sum()) + 1  # one network call per segment
