"""LightningModules: one shared base, and CT / CD / MCD differing only where their maths differs."""

from .base import ConsistencyModule
from .cd import ConsistencyDistillation
from .ct import ConsistencyTraining
from .mcd import MultiBoundaryConsistencyDistillation

__all__ = [
    "ConsistencyModule",
    "ConsistencyDistillation",
    "ConsistencyTraining",
    "MultiBoundaryConsistencyDistillation",
]
