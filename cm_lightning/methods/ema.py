"""An exponential moving average of the trainable (LoRA) weights, used as the consistency target when asked."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class EmaWeights:
    """Shadow copies of ``params``; ``swapped()`` runs a block with the averaged values in place."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay={decay} must be in [0, 1)")
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

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
