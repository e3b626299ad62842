"""Optimizers for Lightning from the run's factories, and learning-rate schedules (Hydra ``_partial_`` targets:
``optimizer -> LRScheduler``)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def lightning_optimizers(params: Iterable[torch.nn.Parameter], optimizer: Callable, lr_scheduler: Callable | None):
    """What ``configure_optimizers`` returns: ``optimizer(params)``, with ``lr_scheduler(optimizer)`` stepped every
    optimizer step when given. Shared by the consistency methods and the teacher's training."""
    opt = optimizer(params)
    if lr_scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_scheduler(opt), "interval": "step"}}


def warmup_constant(optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then the optimizer's lr."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))
