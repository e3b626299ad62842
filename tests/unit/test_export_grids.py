"""Exported LoRAs trained on a solver grid other than diffusers' default N = 50, with K != 4 segments, sampled with
classifier-free guidance: a plain diffusers pipeline must still draw what the project's own sampler draws.

LCMScheduler picks its inference timesteps from a grid of ``original_inference_steps`` points (default 50), so the
exported scheduler config must carry the run's N; guidance exercises the empty prompt on both sides.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, TCDScheduler

from cm_lightning.diffusion.grid import edge_jump_timesteps, lcm_timesteps, segment_edges, solver_grid
from cm_lightning.export import export_run
from cm_lightning.models.components import load_components
from cm_lightning.pipeline import load_drawer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a small red circle at the top left, on a white background", "a large blue star in the center"]


def pipeline(tiny_sd_path, scheduler, exported) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_path), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(exported)
    return pipe


def test_cd_export_on_a_25_step_grid_reproduces_our_sampler_with_guidance(tiny_sd_path, trained_run, tmp_path):
    num_solver_steps, steps, guidance = 25, 4, 3.0
    run = trained_run("cd", "multistep", steps, num_solver_steps)
    exported = export_run(run, tmp_path / "export")
    scheduler = LCMScheduler.from_pretrained(exported, subfolder="scheduler")
    assert scheduler.config.original_inference_steps == num_solver_steps
    scheduler.set_timesteps(steps)
    ours_timesteps = lcm_timesteps(solver_grid(1000, num_solver_steps), steps).tolist()
    assert scheduler.timesteps.tolist() == ours_timesteps
    assert ours_timesteps != lcm_timesteps(solver_grid(1000, 50), steps).tolist()  # N matters here

    drawer, _ = load_drawer(load_components(str(tiny_sd_path)), run, merge_lora=False)
    noise = drawer.noise(len(PROMPTS), seed=3)
    mine = drawer.draw_latents(PROMPTS, steps=steps, guidance_scale=guidance, noise=noise,
                               generator=torch.Generator().manual_seed(7))
    pipe = pipeline(tiny_sd_path, LCMScheduler.from_pretrained(exported, subfolder="scheduler"), exported)
    theirs = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone(),
                  generator=torch.Generator().manual_seed(7), output_type="latent").images
    assert (mine - theirs).abs().max() < 1e-4


def test_mcd_export_with_three_segments_on_a_25_step_grid_reproduces_our_edge_jumps_with_guidance(
    tiny_sd_path, trained_run, tmp_path
):
    edges = segment_edges(solver_grid(1000, 25), 3).tolist()
    assert edges == [0, 359, 719]
    run = trained_run("mcd", "edge_jumps", 3, 25, edges)
    exported = export_run(run, tmp_path / "export")
    scheduler = TCDScheduler.from_pretrained(exported, subfolder="scheduler")
    assert scheduler.config.original_inference_steps == 25
    timesteps = edge_jump_timesteps(torch.tensor(edges), 1000).tolist()
    assert timesteps == [999, 719, 359]
    assert f"timesteps={timesteps}, eta=0.0" in (exported / "README.md").read_text()

    drawer, _ = load_drawer(load_components(str(tiny_sd_path)), run, merge_lora=False)
    noise = drawer.noise(len(PROMPTS), seed=5)
    mine = drawer.draw_latents(PROMPTS, steps=3, guidance_scale=2.0, noise=noise)
    pipe = pipeline(tiny_sd_path, scheduler, exported)
    theirs = pipe(PROMPTS, timesteps=timesteps, eta=0.0, guidance_scale=2.0, latents=noise.clone(),
                  output_type="latent").images
    assert (mine - theirs).abs().max() < 1e-4
    unguided = drawer.draw_latents(PROMPTS, steps=3, guidance_scale=1.0, noise=noise)
    assert (mine - unguided).abs().max() > 1e-2  # guidance did change the drawing
