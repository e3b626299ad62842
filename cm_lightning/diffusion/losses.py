"""Consistency losses between the student's output and its target, both [B, C, H, W]."""

from __future__ import annotations

import torch


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """Element-wise pseudo-Huber ``mean(sqrt((pred - target)^2 + c^2) - c)`` (LCM; the seed uses c = 0.001)."""
    diff = (pred.float() - target.float()) ** 2
    return (torch.sqrt(diff + c * c) - c).mean()


def pseudo_huber_norm(pred: torch.Tensor, target: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """iCT's pseudo-Huber on the whole-sample L2 norm: ``mean_b(sqrt(||d_b||^2 + c^2) - c)``.

    ``c = 0.00054 * sqrt(d)`` by default, d the number of elements per sample (SD1.5 latents: 0.069).
    """
    diff = (pred.float() - target.float()).flatten(1)
    if c is None:
        c = 0.00054 * diff.shape[1] ** 0.5
    return (torch.sqrt(diff.pow(2).sum(dim=1) + c * c) - c).mean()


def l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error."""
    return torch.mean((pred.float() - target.float()) ** 2)


LOSSES = {"pseudo_huber": pseudo_huber, "pseudo_huber_norm": pseudo_huber_norm, "l2": l2}


def consistency_loss(name: str, pred: torch.Tensor, target: torch.Tensor, **kw) -> torch.Tensor:
    if name not in LOSSES:
        raise ValueError(f"loss {name!r} is not one of {sorted(LOSSES)}")
    return LOSSES[name](pred, target, **kw)
