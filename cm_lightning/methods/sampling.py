"""Running a sampler of the table (``sampler_table.py``) over a diffusers UNet: what ``sample``, ``compare``,
``evaluate``, the training callbacks and the methods' ``sample_latents`` call.
"""

from __future__ import annotations

import torch

from ..diffusion.denoiser import Denoiser
from ..diffusion.samplers import Conditioning
from ..diffusion.schedule import NoiseSchedule
from .sampler_table import get_sampler

SamplerKind = str  # a name in the sampler table: "ddim", "multistep", "edge_jumps", or one registered later


def unet_network(unet):
    """Wrap a diffusers UNet2DConditionModel as ``net(x_t, t, context) -> output``.

    Inputs go in at the frozen weights' dtype (bf16/fp16 when training with mixed precision: sampling runs
    outside autocast) and the output comes back in fp32, so the sampler's maths stay in fp32."""
    dtype = unet.conv_in.weight.dtype  # the base weights' dtype; LoRA weights may be fp32 beside them
    return lambda x, t, context: unet(x.to(dtype), t, encoder_hidden_states=context.to(dtype)).sample.float()


# the multistep sampler's re-noising of the batch that starts at prompt ``start`` draws from a generator seeded
# ``seed + RENOISE_SEED_OFFSET + start`` (offset: apart from the start noise's seeds ``seed + i``)
RENOISE_SEED_OFFSET = 1_000_003


def renoise_generator(seed: int, start: int, device: torch.device | str) -> torch.Generator:
    """The generator for the re-noising of the batch starting at prompt ``start``: the Drawer's (``sample``,
    ``compare``, ``evaluate``, the quality table) and the validation's, so that a stochastic sampler's validation
    images are the table's for the same prompts, noise seed and batch size."""
    return torch.Generator(device=device).manual_seed(seed + RENOISE_SEED_OFFSET + start)


def sampling_timesteps(kind: SamplerKind, steps: int, schedule: NoiseSchedule, **options) -> torch.Tensor:
    """The descending timesteps sampler ``kind`` visits in ``steps`` network calls (options: see the table)."""
    return get_sampler(kind).timesteps(steps, schedule.num_train_timesteps, options)


@torch.no_grad()
def generate_latents(
    unet,
    schedule: NoiseSchedule,
    kind: SamplerKind,
    noise: torch.Tensor,
    cond: Conditioning,
    *,
    steps: int,
    generator: torch.Generator | None = None,
    network=None,
    **options,
) -> torch.Tensor:
    """Run sampler ``kind`` from ``noise`` [B, C, h, w] for ``steps`` calls; returns the final latents (scaled).

    ``options``: what the sampler reads (``num_solver_steps``, ``edges``, ``timestep_spacing``, ``steps_offset``).
    ``network`` replaces ``unet_network(unet)`` (e.g. a :class:`CudaGraphNetwork` kept across calls)."""
    sampler = get_sampler(kind)
    timesteps = sampler.timesteps(steps, schedule.num_train_timesteps, options)
    return sampler.run(Denoiser(network or unet_network(unet), schedule), noise, timesteps, cond, generator)
