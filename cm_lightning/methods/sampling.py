"""The samplers of each method, over a diffusers UNet: what ``sample``, ``compare`` and validation call.

``kind`` names the sampler, not the method: ``ddim`` (the teacher), ``multistep`` (CT and CD, LCM-style
re-noising) and ``edge_jumps`` (MCD, deterministic, one network call per segment).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..diffusion.denoiser import Denoiser
from ..diffusion.grid import ddim_timesteps, edge_jump_timesteps, lcm_timesteps, solver_grid
from ..diffusion.samplers import Conditioning, sample_ddim, sample_edge_jumps, sample_multistep
from ..diffusion.schedule import NoiseSchedule
from ..errors import UserError

SamplerKind = Literal["ddim", "multistep", "edge_jumps"]


def unet_network(unet):
    """Wrap a diffusers UNet2DConditionModel as ``net(x_t, t, context) -> output``.

    Inputs go in at the frozen weights' dtype (bf16/fp16 when training with mixed precision: sampling runs
    outside autocast) and the output comes back in fp32, so the sampler's maths stay in fp32."""
    dtype = unet.conv_in.weight.dtype  # the base weights' dtype; LoRA weights may be fp32 beside them
    return lambda x, t, context: unet(x.to(dtype), t, encoder_hidden_states=context.to(dtype)).sample.float()


def sampling_timesteps(
    kind: SamplerKind,
    steps: int,
    schedule: NoiseSchedule,
    *,
    num_solver_steps: int = 50,
    edges: torch.Tensor | None = None,
    timestep_spacing: str = "leading",
    steps_offset: int = 1,
) -> torch.Tensor:
    """The descending timesteps ``kind`` visits in ``steps`` network calls."""
    total = schedule.num_train_timesteps
    if kind == "ddim":
        return ddim_timesteps(total, steps, spacing=timestep_spacing, steps_offset=steps_offset)
    if kind == "multistep":
        return lcm_timesteps(solver_grid(total, num_solver_steps), steps)
    if kind == "edge_jumps":
        if edges is None:
            raise ValueError("edge_jumps needs the segment edges")
        timesteps = edge_jump_timesteps(edges, total)
        if steps != len(timesteps):
            raise UserError(
                f"steps={steps}: an MCD model with {len(edges)} segments samples in exactly {len(timesteps)} steps "
                f"(one jump per segment, timesteps {timesteps.tolist()}); pass steps={len(timesteps)}"
            )
        return timesteps
    raise UserError(f"sampler {kind!r} is not one of 'ddim', 'multistep', 'edge_jumps'")


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
    num_solver_steps: int = 50,
    edges: torch.Tensor | None = None,
    timestep_spacing: str = "leading",
    steps_offset: int = 1,
    network=None,
) -> torch.Tensor:
    """Run sampler ``kind`` from ``noise`` [B, C, h, w] for ``steps`` calls; returns the final latents (scaled).

    ``network`` replaces ``unet_network(unet)`` (e.g. a :class:`CudaGraphNetwork` kept across calls)."""
    timesteps = sampling_timesteps(
        kind, steps, schedule, num_solver_steps=num_solver_steps, edges=edges,
        timestep_spacing=timestep_spacing, steps_offset=steps_offset,
    )
    denoiser = Denoiser(network or unet_network(unet), schedule)
    if kind == "ddim":
        return sample_ddim(denoiser, noise, timesteps, cond)
    if kind == "multistep":
        return sample_multistep(denoiser, noise, timesteps, cond, generator=generator)
    return sample_edge_jumps(denoiser, noise, timesteps, cond)
