"""Callbacks that make a run survive: what a checkpoint must carry to resume exactly, and non-finite steps.

Added by ``cm_lightning.train`` to every run (not a config choice: ``callbacks=none`` keeps them).
"""

from __future__ import annotations

import lightning as L

from ..outputs import IDENTITY_KEY


class RunState(L.Callback):
    """Writes the run's identity (method, model, LoRA rank, K) into every checkpoint, for the resume check."""

    def __init__(self, identity: dict):
        self.identity = identity

    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        checkpoint[IDENTITY_KEY] = dict(self.identity)
