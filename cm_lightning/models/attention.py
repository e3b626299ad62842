"""Which of torch's scaled-dot-product-attention kernels the UNet's attention layers run on.

diffusers' attention calls ``F.scaled_dot_product_attention`` and torch picks its kernel by a priority order. A
preference only reorders that list: a kernel that does not take a shape falls back to the next one. Measured on an
H200 (benchmarks/speed.md, session 6), SD1.5 in bf16: an eager calibration of the UNet alone favoured cuDNN's kernel
without gradients (forward at batch 16: 49.6 ms, torch's choice 56.0) and flash's with them (forward + backward at
batch 8: 86.1 ms, torch's choice 115.9), yet through ``train`` with CUDA graphs those preferences made the CD step
slower (203.2 ms against 191.8), and drawing no faster. So every default is torch's own order; the switch stays for
other cards and torch versions.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from functools import lru_cache
from typing import Callable, ContextManager

import torch

SDPA_CHOICES = ("default", "cudnn", "flash", "efficient", "math")


def check_sdpa_choice(choice: str, field: str) -> None:
    if choice not in SDPA_CHOICES:
        raise ValueError(f"{field}={choice!r} is not one of {', '.join(SDPA_CHOICES)}")


@lru_cache(maxsize=None)
def _priority_order(choice: str) -> tuple | None:
    """torch's backends with ``choice``'s first; None for 'default' or a torch without priorities (< 2.6)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if choice == "default" or "set_priority" not in inspect.signature(sdpa_kernel).parameters:
        return None
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return (backends[choice], *(b for name, b in backends.items() if name != choice))


def sdpa_preference(choice: str) -> ContextManager:
    """A context in which attention tries ``choice``'s kernel first, then torch's others ('default': torch's order)."""
    check_sdpa_choice(choice, "attention kernel")
    order = _priority_order(choice)
    if order is None:
        return nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(list(order), set_priority=True)


def prefer_sdpa(net: Callable[..., torch.Tensor], choice: str) -> Callable[..., torch.Tensor]:
    """``net`` called inside :func:`sdpa_preference` (``net`` itself for 'default')."""
    check_sdpa_choice(choice, "attention kernel")
    if choice == "default":
        return net

    def call(*args, **kwargs):
        with sdpa_preference(choice):
            return net(*args, **kwargs)

    return call
