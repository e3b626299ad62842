"""Diffusion training of a whole UNet (the teacher of our own quality world): ``method=teacher``.

Standard DDPM training in the model's own parameterization (eps or v) with caption dropout, so that the
teacher supports classifier-free guidance; an EMA of the weights is what gets saved, as is usual for
diffusion models (it samples markedly better than the raw weights after short training).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from ..diffusion.parameterization import drop_captions
from ..diffusion.schedule import NoiseSchedule
from ..methods.ema import EmaWeights
from ..methods.latent_module import LatentTrainingModule


class TeacherTraining(LatentTrainingModule):
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
        self.ema = EmaWeights(list(self.unet.parameters()), ema_decay, shadow=list(self.ema_unet.parameters()))
        self.schedule = schedule
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.null_context: torch.Tensor | None = None
        self._ema_step = 0  # the optimizer step the EMA last saw
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        # kept out of the module tree so that checkpoints hold the UNet's parameters once
        object.__setattr__(self, "_unet_call", torch.compile(unet, mode=compile) if compile else unet)

    @property
    def exported_unet(self) -> torch.nn.Module:
        """The UNet that ``train`` saves as the new model (``method.uses_lora: false``): the EMA weights."""
        return self.ema_unet

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._ema_step = self.global_step  # the step the EMA last saw (a resumed run's, on resume)

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
            context = drop_captions(context, self.null_context, self.hparams.caption_dropout)
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
        # once per optimizer step: under accumulate_grad_batches=k this hook runs k times per step
        if self.global_step == self._ema_step:
            return
        self._ema_step = self.global_step
        decay = min(self.hparams.ema_decay, (1 + self.global_step) / (10 + self.global_step))  # warm-up
        self.ema.update(decay)

