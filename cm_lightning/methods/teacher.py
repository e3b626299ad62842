"""Diffusion training of a whole UNet (the teacher of our own quality world): ``method=teacher``.

Standard DDPM training in the model's own parameterization (eps or v) with caption dropout, so that the
teacher supports classifier-free guidance; an EMA of the weights is what gets saved, as is usual for
diffusion models (it samples markedly better than the raw weights after short training).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable

import lightning as L
import torch

from ..diffusion.schedule import NoiseSchedule
from .optim import clip_gradients


class TeacherTraining(L.LightningModule):
    """Args: unet (all weights trained), schedule, optimizer / lr_scheduler factories (Hydra partials),
    caption_dropout (probability of training on the empty prompt), ema_decay, gradient_checkpointing,
    snr_gamma (None: plain MSE; a number: min-SNR-gamma weighting, 5 in the paper and in diffusers' scripts),
    compile (None, or a ``torch.compile`` mode such as "default" or "reduce-overhead": fuses the small UNet's many
    small kernels. Checked on CPU, not yet measured on a GPU)."""

    sampler_kind = "ddim"

    def __init__(
        self,
        unet: torch.nn.Module,
        schedule: NoiseSchedule,
        *,
        optimizer: Callable,
        lr_scheduler: Callable | None = None,
        caption_dropout: float = 0.1,
        ema_decay: float = 0.999,
        gradient_checkpointing: bool = False,
        compile: str | None = None,
        snr_gamma: float | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["unet", "schedule", "optimizer", "lr_scheduler"])
        self.unet = unet.train().requires_grad_(True)
        self.ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
        self.schedule = schedule
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.null_context: torch.Tensor | None = None
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        # kept out of the module tree so that checkpoints hold the UNet's parameters once
        object.__setattr__(self, "_unet_call", torch.compile(unet, mode=compile) if compile else unet)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and datamodule.null_text_embed is not None:
            self.null_context = datamodule.null_text_embed

    def on_fit_start(self) -> None:
        self.schedule = replace(self.schedule, alphas_cumprod=self.schedule.alphas_cumprod.to(self.device))
        if self.null_context is not None:
            self.null_context = self.null_context.to(self.device, torch.float32)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kind = self.schedule.prediction_type
        if kind == "epsilon":
            return noise
        a, s = self.schedule.alpha_sigma(t, x0.ndim)
        if kind == "v_prediction":
            return a * noise - s * x0
        return x0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0, context = batch["latents"].float(), batch["text_embeds"].float()
        if self.null_context is not None and self.hparams.caption_dropout > 0:
            drop = torch.rand(x0.shape[0], device=self.device) < self.hparams.caption_dropout
            context = torch.where(drop.view(-1, 1, 1), self.null_context.expand_as(context), context)
        t = torch.randint(0, self.schedule.num_train_timesteps, (x0.shape[0],), device=self.device)
        noise = torch.randn_like(x0)
        output = self._unet_call(self.schedule.add_noise(x0, noise, t), t, encoder_hidden_states=context).sample
        per_sample = (output.float() - self.training_target(x0, noise, t)).pow(2).flatten(1).mean(1)
        if self.hparams.snr_gamma:
            per_sample = per_sample * self.schedule.min_snr_weights(t, self.hparams.snr_gamma)
        loss = per_sample.mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        decay = min(self.hparams.ema_decay, (1 + self.global_step) / (10 + self.global_step))  # warm-up
        # one foreach kernel per dtype group instead of one lerp per parameter (a small UNet has hundreds)
        torch._foreach_lerp_(list(self.ema_unet.parameters()), [p.detach() for p in self.unet.parameters()],
                             1 - decay)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip in true units (also with a fused optimizer under mixed precision, which Lightning refuses to clip)."""
        self.log("train/grad_norm", clip_gradients(self._trainer, optimizer, list(self.unet.parameters()),
                                                   gradient_clip_val))

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.unet.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer), "interval": "step"}}
