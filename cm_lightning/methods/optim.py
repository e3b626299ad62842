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


def clip_gradients(trainer, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                   clip_val: float | None) -> torch.Tensor:
    """Clip the gradients of ``params`` to total norm ``clip_val`` (0 or None: measure only); returns the norm.

    Under fp16 loss scaling with a fused optimizer, Lightning leaves the gradients scaled (the optimizer unscales
    inside its step) and refuses to clip them; unscaling here first keeps clipping in true units, and the
    GradScaler then steps the fused optimizer without a second unscale.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
    if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
        scaler.unscale_(optimizer)
    if clip_val:
        return torch.nn.utils.clip_grad_norm_(params, clip_val)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
