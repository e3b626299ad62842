"""Consistency losses between the student's output and its target, both [B, C, H, W].

Each returns one value per sample, [B] float32, so that methods can weight samples (iCT) before averaging.
"""

from __future__ import annotations

from typing import Callable

import torch

PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """Element-wise pseudo-Huber ``sqrt((pred - target)^2 + c^2) - c``, averaged per sample (LCM; the seed's c = 0.001)."""
    diff = (pred.float() - target.float()) ** 2
    return (torch.sqrt(diff + c * c) - c).flatten(1).mean(dim=1)


def pseudo_huber_norm(pred: torch.Tensor, target: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """iCT's pseudo-Huber on the whole-sample L2 norm: ``sqrt(||d||^2 + c^2) - c`` per sample.

    ``c = 0.00054 * sqrt(d)`` by default, d the number of elements per sample (SD1.5 latents: 0.069).
    """
    diff = (pred.float() - target.float()).flatten(1)
    if c is None:
        c = 0.00054 * diff.shape[1] ** 0.5
    return torch.sqrt(diff.pow(2).sum(dim=1) + c * c) - c


def l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def make_loss(name: str, huber_c: float | None = None) -> PerSampleLoss:
    """The per-sample loss called ``name`` ('pseudo_huber', 'pseudo_huber_norm' or 'l2'); ``huber_c`` None = its default."""
    if name == "l2":
        return l2
    if name == "pseudo_huber":
        c = 0.001 if huber_c is None else huber_c
        return lambda pred, target: pseudo_huber(pred, target, c)
    if name == "pseudo_huber_norm":
        return lambda pred, target: pseudo_huber_norm(pred, target, huber_c)
    raise ValueError(f"loss {name!r} is not one of 'pseudo_huber', 'pseudo_huber_norm', 'l2'")
