"""The reference loop for speed ratios: one training step written the way diffusers' LCM-LoRA example trains.

``examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py`` (diffusers) keeps a frozen teacher UNet and a
LoRA student UNet as two copies, encodes every batch with the fp32 VAE and the text encoder, runs the teacher's
conditional and unconditional passes separately, keeps fp32 LoRA weights under fp16 autocast with a gradient scaler,
clips gradients and steps a plain AdamW. This file re-creates that step (our own code, same work) so that the
project's step can be timed beside it in one call. It gives the reference a head start: its pixels are already on
the GPU (the example decodes webdataset JPEGs in workers), so ratios against it are conservative.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


def measure_reference(model: Path, device: torch.device, *, batch: int, steps: int, skip: int, resolution: int,
                      gradient_checkpointing: tuple[bool, ...] = (False, True)) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    from cm_lightning.models.lora import DEFAULT_TARGETS

    cuda = device.type == "cuda"
    half = torch.float16 if cuda else torch.float32
    out = {}
    for checkpointing in gradient_checkpointing:
        torch.manual_seed(0)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae").to(device).requires_grad_(False)  # fp32
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").to(device, half).requires_grad_(False)
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        teacher = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(device, half).requires_grad_(False)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(device, half).requires_grad_(False)
        rank = 64 if cuda else 4
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(DEFAULT_TARGETS),
                                    init_lora_weights="gaussian"))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=cuda)
        scheduler = DDIMScheduler.from_pretrained(model, subfolder="scheduler")
        abar = scheduler.alphas_cumprod.to(device)
        grid = torch.arange(1, 51, device=device) * 20 - 1  # the 50-step DDIM solver grid, skip 20
        uncond = text_encoder(tokenizer([""] * batch, padding="max_length", max_length=77,
                                        return_tensors="pt").input_ids.to(device))[0]
        pixels = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
        captions = ["A sad puppy with large eyes"] * batch
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(steps):
            started = time.perf_counter()
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids.to(device)
                context = text_encoder(ids)[0]
            index = torch.randint(0, 50, (batch,), device=device)
            t_hi = grid[index]
            t_lo = torch.where(index > 0, grid[(index - 1).clamp(min=0)], torch.zeros_like(t_hi))
            noise = torch.randn_like(latents)
            a_hi = abar[t_hi].view(-1, 1, 1, 1)
            x_hi = a_hi.sqrt() * latents + (1 - a_hi).sqrt() * noise
            w = torch.empty(batch, device=device).uniform_(5, 15).view(-1, 1, 1, 1)
            with torch.autocast(device.type, dtype=half, enabled=cuda):
                eps = unet(x_hi, t_hi, encoder_hidden_states=context.float()).sample
                pred = lcm_boundary(x_hi, eps, t_hi, abar)
                with torch.no_grad():
                    cond = teacher(x_hi.to(half), t_hi, encoder_hidden_states=context.to(half)).sample
                    unc = teacher(x_hi.to(half), t_hi, encoder_hidden_states=uncond.to(half)).sample
                    eps_t = (cond + w * (cond - unc)).float()
                    x0_t = (x_hi - (1 - a_hi).sqrt() * eps_t) / a_hi.sqrt()
                    a_lo = abar[t_lo].view(-1, 1, 1, 1)
                    x_lo = a_lo.sqrt() * x0_t + (1 - a_lo).sqrt() * eps_t
                    target = lcm_boundary(x_lo, unet(x_lo.float(), t_lo, encoder_hidden_states=context.float()).sample,
                                          t_lo, abar)
            loss = (torch.sqrt((pred.float() - target.float()) ** 2 + 0.001**2) - 0.001).mean()
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if step >= skip:
                times.append(time.perf_counter() - started)
        step_s = statistics.median(times)
        out["ckpt" if checkpointing else "no_ckpt"] = {
            "step_ms": round(step_s * 1000, 1), "samples_per_s": round(batch / step_s, 1),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
        del vae, text_encoder, teacher, unet, optimizer, params
        if cuda:
            torch.cuda.empty_cache()
    return out


def lcm_boundary(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """LCM's consistency output: c_skip x_t + c_out x0_hat (sigma_data 0.5, timestep scaling 10)."""
    a = abar[t].view(-1, 1, 1, 1)
    x0 = (x_t.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()
    scaled = (t * 10.0).view(-1, 1, 1, 1)
    c_skip = 0.25 / (scaled**2 + 0.25)
    c_out = scaled / (scaled**2 + 0.25).sqrt()
    return c_skip * x_t.float() + c_out * x0
