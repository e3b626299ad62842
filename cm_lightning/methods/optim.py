"""Learning-rate schedules (Hydra ``_partial_`` targets: ``optimizer -> LRScheduler``)."""

from __future__ import annotations

import torch


def warmup_constant(optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then the optimizer's lr."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))
