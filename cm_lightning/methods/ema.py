"""Exponential moving averages of weights: the LoRA weights (the consistency target with ``target=ema``) and the
teacher's whole UNet (what ``method=teacher`` saves)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class EmaWeights:
    """Shadow copies of ``params``; ``swapped()`` runs a block with the averaged values in place.

    ``shadow``: tensors to average into instead of fresh clones (e.g. the parameters of a frozen copy of the model,
    which is then saved as it is).
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float, shadow: list[torch.Tensor] | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay={decay} must be in [0, 1)")
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params] if shadow is None else shadow
        if len(self.shadow) != len(params):
            raise ValueError(f"EMA shadow has {len(self.shadow)} tensors for {len(params)} parameters")

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """shadow <- decay * shadow + (1 - decay) * param (``decay`` defaults to the configured one), in one foreach
        kernel per dtype group rather than one lerp per parameter (a small UNet has hundreds)."""
        decay = self.decay if decay is None else decay
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Through ``.data``: the swap must not bump the parameters' autograd version counters, because the
        consistency target is computed after the student's forward pass has saved them for its backward pass
        (the values are restored before that backward runs)."""
        backup = [p.detach().clone() for p in self.params]
        for param, shadow in zip(self.params, self.shadow):
            param.data.copy_(shadow)
        try:
            yield
        finally:
            for param, saved in zip(self.params, backup):
                param.data.copy_(saved)

    def state_dict(self) -> list[torch.Tensor]:
        return self.shadow

    def load_state_dict(self, shadow: list[torch.Tensor]) -> None:
        for mine, saved in zip(self.shadow, shadow):
            mine.copy_(saved)
