"""An exported LoRA, loaded into a plain diffusers pipeline, reproduces the project's own samplers (fp32, 1e-4).

CD/CT via LCMScheduler, MCD via TCDScheduler (eta = 0, edge timesteps), and the teacher's DDIM via DDIMScheduler.
The pipeline gets the scheduler class the export declares (as its model card tells users to load it), so an export
naming the wrong scheduler draws something else.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline, TCDScheduler

from cm_lightning.diffusion.grid import edge_jump_timesteps, segment_edges, solver_grid
from cm_lightning.export import export_run
from cm_lightning.models.components import load_components
from cm_lightning.pipeline import load_drawer

PROMPTS = ["a small red circle at the top left, on a white background", "a large blue star in the center"]


def pipeline(tiny_sd_path, scheduler) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_path), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe


def exported_scheduler(exported, expected: type):
    """The scheduler as a user loads it: the class the exported config names (any scheduler class reads it)."""
    name = DDIMScheduler.load_config(exported, subfolder="scheduler")["_class_name"]
    scheduler = getattr(diffusers, name).from_pretrained(exported, subfolder="scheduler")
    assert isinstance(scheduler, expected), name
    return scheduler


def test_cd_export_reproduces_our_multistep_sampler_with_lcm_scheduler(tiny_sd_path, trained_run, tmp_path):
    run = trained_run("cd", "multistep")
    exported = export_run(run, tmp_path / "export")
    drawer, _ = load_drawer(load_components(str(tiny_sd_path)), run, merge_lora=False)
    noise = drawer.noise(len(PROMPTS), seed=3)
    mine = drawer.draw_latents(PROMPTS, steps=4, noise=noise, generator=torch.Generator().manual_seed(7))

    pipe = pipeline(tiny_sd_path, exported_scheduler(exported, LCMScheduler))
    pipe.load_lora_weights(exported)
    theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=1.0, latents=noise.clone(),
                  generator=torch.Generator().manual_seed(7), output_type="latent").images
    assert (mine - theirs).abs().max() < 1e-4
    # the LoRA matters: without it the pipeline draws something else
    pipe.unload_lora_weights()
    base = pipe(PROMPTS, num_inference_steps=4, guidance_scale=1.0, latents=noise.clone(),
                generator=torch.Generator().manual_seed(7), output_type="latent").images
    assert (mine - base).abs().max() > 1e-2


def test_mcd_export_reproduces_our_edge_jumps_with_tcd_scheduler(tiny_sd_path, trained_run, tmp_path):
    edges = segment_edges(solver_grid(1000, 50), 4).tolist()
    run = trained_run("mcd", "edge_jumps", edges=edges)
    exported = export_run(run, tmp_path / "export")
    drawer, _ = load_drawer(load_components(str(tiny_sd_path)), run, merge_lora=False)
    noise = drawer.noise(len(PROMPTS), seed=5)
    mine = drawer.draw_latents(PROMPTS, steps=4, noise=noise)

    pipe = pipeline(tiny_sd_path, exported_scheduler(exported, TCDScheduler))
    pipe.load_lora_weights(exported)
    timesteps = edge_jump_timesteps(torch.tensor(edges), 1000).tolist()
    assert timesteps == [999, 779, 519, 259]
    theirs = pipe(PROMPTS, timesteps=timesteps, eta=0.0, guidance_scale=1.0, latents=noise.clone(),
                  output_type="latent").images
    assert (mine - theirs).abs().max() < 1e-4
    assert "timesteps=[999, 779, 519, 259], eta=0.0" in (exported / "README.md").read_text()


# 10 steps only in `make test-all`: the 4-step run pins the same pipeline path, and unit/test_diffusion.py's
# test_sample_ddim_matches_ddim_scheduler pins the DDIM maths at several step counts against DDIMScheduler.
@pytest.mark.parametrize("steps", [4, pytest.param(10, marks=pytest.mark.slow)])
def test_teacher_ddim_matches_diffusers_ddim_pipeline(tiny_sd_path, steps):
    components = load_components(str(tiny_sd_path))
    drawer, _ = load_drawer(components, None)
    noise = drawer.noise(len(PROMPTS), seed=1)
    mine = drawer.draw_latents(PROMPTS, steps=steps, guidance_scale=7.5, noise=noise)
    pipe = pipeline(tiny_sd_path, DDIMScheduler.from_pretrained(str(tiny_sd_path), subfolder="scheduler"))
    theirs = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=7.5, latents=noise.clone(), eta=0.0,
                  output_type="latent").images
    assert (mine - theirs).abs().max() < 1e-4


def test_mcd_sampler_refuses_a_step_count_that_does_not_fit_the_edges(tiny_sd_path, trained_run):
    from cm_lightning.errors import UserError

    run = trained_run("mcd", "edge_jumps", edges=[0, 259, 519, 779])
    drawer, _ = load_drawer(load_components(str(tiny_sd_path)), run, merge_lora=False)
    with pytest.raises(UserError, match="samples in exactly 4 steps"):
        drawer.draw_latents(PROMPTS, steps=2)


def test_export_is_hub_ready_card_metadata_grid_and_lora_load(tiny_sd_path, trained_run, tmp_path):
    """The card's YAML metadata loads with huggingface_hub, the LoRA loads in diffusers from the folder as it would
    from a Hub repo (same layout), the grid is the exported LoRA's own samples, and no local absolute path leaks."""
    from huggingface_hub import ModelCard
    from PIL import Image

    run = trained_run("cd", "multistep")
    (run / "lora" / "train_config.yaml").write_text(
        f"method:\n  name: cd\n  module:\n    loss: pseudo_huber\ntrainer:\n  max_steps: 6\n  precision: 32-true\n"
        f"batch_size: 4\nseed: 42\nmodel:\n  pretrained: {tiny_sd_path}\ndata:\n  name: shapes\n")
    exported = export_run(run, tmp_path / "export", hub_base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
                          grid_prompts=PROMPTS)
    card = ModelCard.load(exported / "README.md")
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert {"lora", "cd", "consistency-distillation"} <= set(card.data.tags)
    assert card.data.widget[0]["output"]["url"] == "sample_grid.png"
    assert "LCMScheduler" in card.text and "num_inference_steps=4" in card.text and "| steps | 6 |" in card.text
    grid = Image.open(exported / "sample_grid.png")
    assert grid.size == (2 * 32, 32)  # two 32 px samples of the tiny model side by side
    for name in ("README.md", "train_config.yaml", "cm_lightning.json"):
        text = (exported / name).read_text()
        assert str(tmp_path) not in text and str(tiny_sd_path) not in text, name

    pipe = pipeline(tiny_sd_path, LCMScheduler.from_pretrained(exported, subfolder="scheduler"))
    pipe.load_lora_weights(exported)
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())
    # drawn by diffusers with the card's own call, the first image is the grid's first tile
    image = pipe(PROMPTS[:1], num_inference_steps=4, guidance_scale=1.0, output_type="pt",
                 latents=load_drawer(load_components(str(tiny_sd_path)), run)[0].noise(1, seed=0)).images
    assert image.shape == (1, 3, 32, 32)

    # a local base model without a Hub id: no base_model in the metadata (the Hub would refuse a path)
    plain = ModelCard.load(export_run(run, tmp_path / "plain", grid=False) / "README.md")
    assert plain.data.base_model is None and "<local>/" in plain.text


def test_python_api_load_pipeline_samples_a_run_as_our_sampler_does(tiny_sd_path, trained_run, tmp_path):
    """cm_lightning.load_pipeline(run) + sampling_kwargs(run): a diffusers pipeline with the LoRA and the MCD edge
    jumps' scheduler, equal to our own sampler; an export of a local model needs base_model."""
    import cm_lightning

    edges = segment_edges(solver_grid(1000, 50), 4).tolist()
    run = trained_run("mcd", "edge_jumps", edges=edges)
    pipe = cm_lightning.load_pipeline(run, safety_checker=None, requires_safety_checker=False)
    kwargs = cm_lightning.sampling_kwargs(run)
    assert isinstance(pipe.scheduler, TCDScheduler)
    assert kwargs == {"timesteps": [999, 779, 519, 259], "eta": 0.0, "guidance_scale": 1.0}
    drawer, _ = load_drawer(load_components(str(tiny_sd_path)), run, merge_lora=False)
    noise = drawer.noise(len(PROMPTS), seed=2)
    mine = drawer.draw_latents(PROMPTS, steps=4, noise=noise)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, latents=noise.clone(), output_type="latent", **kwargs).images
    assert (mine - theirs).abs().max() < 1e-4

    exported = export_run(run, tmp_path / "export", grid=False)
    from cm_lightning.errors import UserError

    with pytest.raises(UserError, match="pass base_model"):
        cm_lightning.load_pipeline(exported)
    again = cm_lightning.load_pipeline(exported, base_model=str(tiny_sd_path), safety_checker=None,
                                       requires_safety_checker=False)
    assert cm_lightning.sampling_kwargs(exported) == kwargs and isinstance(again.scheduler, TCDScheduler)
