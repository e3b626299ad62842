"""The one table of samplers (k-diffusion's idea, in diffusers' vocabulary): adding a sampler is one entry.

Each entry knows the timesteps it visits, the function that runs it (``diffusion/samplers.py``: the maths), the
diffusers scheduler and ``pipe(...)`` arguments that reproduce it, and the options a training run must record
(in ``lora/cm_lightning.json``) so that ``sample``, ``compare``, ``evaluate`` and ``export`` can use it later.
``sampler`` names the sampler, not the method: ``ddim`` (the teacher), ``multistep`` (CT and CD, LCM-style
re-noising) and ``edge_jumps`` (MCD, deterministic, one network call per segment).

Options are plain keyword values: ``num_solver_steps`` (the DDIM solver grid size N of training), ``edges`` (MCD's
segment edges) and, from the model's own scheduler config, ``timestep_spacing`` and ``steps_offset``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..diffusion.denoiser import Denoiser
from ..diffusion.grid import ddim_timesteps, edge_jump_timesteps, lcm_timesteps, solver_grid
from ..diffusion.samplers import Conditioning, sample_ddim, sample_edge_jumps, sample_multistep
from ..errors import UserError

# (steps, num_train_timesteps, options) -> the descending timesteps of ``steps`` network calls
TimestepsFn = Callable[[int, int, Mapping[str, Any]], torch.Tensor]
# (denoiser, start noise, timesteps, conditioning, generator) -> final latents
RunFn = Callable[[Denoiser, torch.Tensor, torch.Tensor, Conditioning, "torch.Generator | None"], torch.Tensor]


@dataclass(frozen=True)
class Sampler:
    """One sampler: how to run it here, and how to run it in a plain diffusers pipeline.

    Args:
        name: what runs record (``RunInfo.sampler``) and modules declare (``sampler_kind``).
        timesteps: ``(steps, num_train_timesteps, options) -> timesteps`` [steps] long, descending.
        run: ``(denoiser, x, timesteps, cond, generator) -> latents``.
        scheduler: the diffusers scheduler class (by name) that reproduces the sampler numerically.
        records: the options a run must record to be sampled (and exported) this way.
        scheduler_config: ``options -> overrides`` of the base model's scheduler config for ``scheduler``.
        pipeline_arguments: ``(steps, options, num_train_timesteps) -> keyword arguments of pipe(...)``.
    """

    name: str
    timesteps: TimestepsFn
    run: RunFn
    scheduler: str
    records: tuple[str, ...] = ()
    scheduler_config: Callable[[Mapping[str, Any]], dict] = field(default=lambda options: {})
    pipeline_arguments: Callable[[int, Mapping[str, Any], int], dict] = field(
        default=lambda steps, options, total: {"num_inference_steps": steps})

    def recorded(self, options: Mapping[str, Any]) -> dict:
        """The options a run writes down for this sampler, as JSON values (tensors become lists)."""
        missing = [k for k in self.records if options.get(k) is None]
        if missing:
            raise ValueError(f"sampler {self.name!r} needs the run to record {missing}; got {sorted(options)}")
        return {k: options[k].tolist() if isinstance(options[k], torch.Tensor) else options[k] for k in self.records}

    def scheduler_class(self):
        import diffusers

        return getattr(diffusers, self.scheduler)


SAMPLERS: dict[str, Sampler] = {}


def register_sampler(sampler: Sampler) -> Sampler:
    """Add ``sampler`` to the table (by its name; a second entry of the same name replaces the first)."""
    SAMPLERS[sampler.name] = sampler
    return sampler


def get_sampler(name: str) -> Sampler:
    """The table's entry called ``name``; a one-line error naming the known ones otherwise."""
    if name not in SAMPLERS:
        raise UserError(f"sampler {name!r} is not one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


# ---------------------------------------------------------------------------------------------- the entries
def _ddim_timesteps(steps: int, total: int, options: Mapping[str, Any]) -> torch.Tensor:
    return ddim_timesteps(total, steps, spacing=options.get("timestep_spacing", "leading"),
                          steps_offset=options.get("steps_offset", 1))


def _multistep_timesteps(steps: int, total: int, options: Mapping[str, Any]) -> torch.Tensor:
    return lcm_timesteps(solver_grid(total, options.get("num_solver_steps", 50)), steps)


def _edges(options: Mapping[str, Any]) -> torch.Tensor:
    if options.get("edges") is None:
        raise ValueError("edge_jumps needs the segment edges")
    return torch.as_tensor(options["edges"], dtype=torch.long)


def _edge_jump_timesteps(steps: int, total: int, options: Mapping[str, Any]) -> torch.Tensor:
    edges = _edges(options)
    timesteps = edge_jump_timesteps(edges, total)
    if steps != len(timesteps):
        raise UserError(
            f"steps={steps}: an MCD model with {len(edges)} segments samples in exactly {len(timesteps)} steps "
            f"(one jump per segment, timesteps {timesteps.tolist()}); pass steps={len(timesteps)}"
        )
    return timesteps


def _original_steps(options: Mapping[str, Any]) -> dict:
    return {"original_inference_steps": options.get("num_solver_steps", 50)}


register_sampler(Sampler(
    "ddim", _ddim_timesteps, lambda denoiser, x, timesteps, cond, generator: sample_ddim(denoiser, x, timesteps, cond),
    scheduler="DDIMScheduler",
    pipeline_arguments=lambda steps, options, total: {"num_inference_steps": steps, "eta": 0.0},
))
register_sampler(Sampler(
    "multistep", _multistep_timesteps, lambda denoiser, x, timesteps, cond, generator: sample_multistep(
        denoiser, x, timesteps, cond, generator=generator),
    scheduler="LCMScheduler", records=("num_solver_steps",), scheduler_config=_original_steps,
))
register_sampler(Sampler(
    "edge_jumps", _edge_jump_timesteps,
    lambda denoiser, x, timesteps, cond, generator: sample_edge_jumps(denoiser, x, timesteps, cond),
    scheduler="TCDScheduler", records=("num_solver_steps", "edges"), scheduler_config=_original_steps,
    pipeline_arguments=lambda steps, options, total: {
        "timesteps": edge_jump_timesteps(_edges(options), total).tolist(), "eta": 0.0},
))
