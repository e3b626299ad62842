"""What every LightningModule trained on the latent cache shares (the consistency methods and the teacher's diffusion
training): the empty prompt's embedding from the datamodule, the schedule and that embedding on the run's device,
the optimizer from the run's factories, and gradient clipping with the norm logged."""

from __future__ import annotations

from dataclasses import replace

import lightning as L
import torch

from .optim import clip_gradients, lightning_optimizers


class LatentTrainingModule(L.LightningModule):
    """Hooks over attributes a subclass sets in its ``__init__``: ``schedule`` (NoiseSchedule), ``null_context``
    (None until setup), ``optimizer_factory`` and ``lr_scheduler_factory`` (Hydra partials)."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and getattr(datamodule, "null_text_embed", None) is not None:
            self.null_context = datamodule.null_text_embed

    def on_fit_start(self) -> None:
        self.schedule = replace(self.schedule, alphas_cumprod=self.schedule.alphas_cumprod.to(self.device))
        if self.null_context is not None:
            self.null_context = self.null_context.to(self.device, torch.float32)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip (trainer.gradient_clip_val) and log the total gradient norm from the same single foreach pass; also
        what lets a fused optimizer (AdamW fused=True) be clipped, which Lightning's own clipping refuses."""
        norm = clip_gradients(self._trainer, optimizer, self.trainable_parameters(), gradient_clip_val)
        self.log("train/grad_norm", norm)

    def configure_optimizers(self):
        return lightning_optimizers(self.trainable_parameters(), self.optimizer_factory, self.lr_scheduler_factory)
