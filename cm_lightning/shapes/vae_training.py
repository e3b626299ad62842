"""Training a small AutoencoderKL for the shapes world (the teacher's VAE; SD1.5 ships its own).

Reconstruction L1 + L2 in pixel space, plus ``kl_weight`` times the KL term. With Adam even a 1e-6 KL weight steadily
widens the posterior (Adam rescales its small but consistent gradient: build 3 drifted from std 0.007 to 0.40,
benchmarks/teacher.md), and the decoder learns to render those noisy latents; ``kl_weight=0`` (this function's
default) keeps the posterior near its start. ``conf/build_teacher.yaml`` says 1e-6, what the shipped VAE was
trained with. Afterwards ``scaling_factor`` is set to 1 / std of the latents, as SD's was (0.18215), so diffusion
sees unit-variance latents.
"""

from __future__ import annotations

import logging

import torch
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.preprocess import image_to_tensor

log = logging.getLogger(__name__)


class _Pixels(Dataset):
    def __init__(self, source, resolution: int):
        self.source, self.resolution = source, resolution

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> torch.Tensor:
        return image_to_tensor(self.source[index].image, self.resolution)


def start_with_small_posterior_std(vae: AutoencoderKL, log_std: float = -5.0) -> None:
    """Make the encoder's log-variance start at ``2 * log_std`` for every input (std 0.007).

    From a random start the posterior std stays near 0.5 through a short training run, and the cache's latent
    samples (mean + std * noise) then carry noise the diffusion model cannot tell from its own: SD's VAE has a
    near-deterministic posterior, and so must ours. Without KL it stays there; a KL weight, even 1e-6, widens
    it over training (module docstring).
    """
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:].zero_()
        vae.quant_conv.bias[channels:].fill_(2 * log_std)


def train_vae(
    vae: AutoencoderKL, source, *, resolution: int, steps: int, batch_size: int = 64, lr: float = 1e-3,
    kl_weight: float = 0.0, device: str | torch.device = "cpu", num_workers: int = 0, progress: bool = True,
) -> dict[str, float]:
    """Train ``vae`` in place on ``source``'s images; set its scaling factor; return final metrics."""
    device = torch.device(device)
    start_with_small_posterior_std(vae)
    vae.to(device).train().requires_grad_(True)
    loader = DataLoader(_Pixels(source, resolution), batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=num_workers, persistent_workers=num_workers > 0)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    step, bar = 0, tqdm(total=steps, desc="vae", disable=not progress)
    while step < steps:
        for pixels in loader:
            pixels = pixels.to(device, non_blocking=True)
            posterior = vae.encode(pixels).latent_dist
            recon = vae.decode(posterior.sample()).sample
            error = recon - pixels
            loss = error.abs().mean() + error.pow(2).mean() + kl_weight * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step >= steps:
                break
    bar.close()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        pixels = torch.stack([loader.dataset[i] for i in range(min(512, len(source)))]).to(device)
        mean = vae.encode(pixels).latent_dist.mean
        rmse = (vae.decode(mean).sample.clamp(-1, 1) - pixels).pow(2).mean().sqrt().item()
    scaling = 1.0 / mean.std().item()
    vae.register_to_config(scaling_factor=scaling)
    log.info("vae: reconstruction RMSE %.4f (pixels in [-1, 1]); scaling_factor %.4f", rmse, scaling)
    return {"reconstruction_rmse": rmse, "scaling_factor": scaling}
