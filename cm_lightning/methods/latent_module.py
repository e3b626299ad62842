"""What every LightningModule trained on the latent cache shares (the consistency methods and the teacher's diffusion
training): the empty prompt's embedding from the datamodule, the schedule and that embedding on the run's device,
the optimizer from the run's factories, and gradient clipping with the norm logged."""

from __future__ import annotations

from dataclasses import replace

import lightning as L
import torch

from .optim import (FlatParameters, clip_gradients, flatten_optimizer_state, gradients_into_one_buffer,
                    lightning_optimizers, split_optimizer_state)


class LatentTrainingModule(L.LightningModule):
    """Hooks over attributes a subclass sets in its ``__init__``: ``schedule`` (NoiseSchedule), ``null_context``
    (None until setup), ``optimizer_factory`` and ``lr_scheduler_factory`` (Hydra partials), and optionally
    ``flat_parameters`` (True: the trainable parameters live in one flat buffer that the optimizer steps as one
    tensor, :class:`~cm_lightning.methods.optim.FlatParameters`)."""

    flat_parameters: bool = False
    _flat: FlatParameters | None = None
    _grads_in_one_buffer = False  # under accumulation, this window's gradients were moved into one buffer

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
        params = [p for group in optimizer.param_groups for p in group["params"]]  # the flat buffer, if flat
        norm = clip_gradients(self._trainer, optimizer, params, gradient_clip_val)
        self.log("train/grad_norm", norm)

    def _flat_layout(self, params: list[torch.nn.Parameter]) -> bool:
        """Whether the optimizer steps ``params`` as one flat buffer (one parameter needs no flattening)."""
        return self.flat_parameters and len(params) > 1

    def configure_optimizers(self):
        # here the module is on its device (Lightning moves it first) and nothing has captured its storage yet
        params = self.trainable_parameters()
        if self._flat_layout(params):
            self._flat = FlatParameters(params)
            params = [self._flat.flat]
        return lightning_optimizers(params, self.optimizer_factory, self.lr_scheduler_factory)

    def backward_reuses_buffers(self) -> bool:
        """Whether the backward hands autograd buffers it writes again at the next call (a CUDA graph's replay)."""
        return False

    def on_after_backward(self) -> None:
        # under accumulation the gradients must not stay a replayed backward's output buffers (gradients_into_one_buffer)
        accumulating = self._trainer is not None and self.trainer.accumulate_grad_batches > 1
        if self._flat is not None:
            self._flat.gather_grads(accumulating)
        elif accumulating and not self._grads_in_one_buffer and self.backward_reuses_buffers():
            gradients_into_one_buffer(self.trainable_parameters())
            self._grads_in_one_buffer = True

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        if self._flat is not None:
            self._flat.zero_grad()  # the layers' own gradients too: autograd accumulates into them
        self._grads_in_one_buffer = False
        optimizer.zero_grad()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint's optimizer state in this run's layout: flat from one saved parameter by parameter, and back."""
        states = checkpoint.get("optimizer_states") or []
        if len(states) != 1 or len(states[0].get("param_groups", [])) != 1:
            return
        params = self.trainable_parameters()
        saved = len(states[0]["param_groups"][0]["params"])
        if self._flat_layout(params) and saved == len(params):
            states[0] = flatten_optimizer_state(states[0], params)
        elif not self._flat_layout(params) and saved == 1 and len(params) > 1:
            states[0] = split_optimizer_state(states[0], params)
