"""The sampler table: every sampler is one entry that ``sample``/``compare``/``evaluate`` (through the Drawer), ``export``
and ``train``'s run summary look up. A toy sampler registered here is usable through all of them."""

from __future__ import annotations

import json

import pytest
import torch

from cm_lightning.diffusion.denoiser import Denoiser
from cm_lightning.diffusion.samplers import Conditioning
from cm_lightning.errors import UserError
from cm_lightning.export import export_run
from cm_lightning.methods import sampler_table
from cm_lightning.methods.sampler_table import Sampler, get_sampler, register_sampler
from cm_lightning.methods.sampling import unet_network
from cm_lightning.models.components import load_components
from cm_lightning.models.lora import add_lora, save_lora_diffusers
from cm_lightning.pipeline import RunInfo, load_drawer

PROMPTS = ["a small red circle at the top left, on a white background", "a large blue star in the center"]


def one_jump(denoiser, x, timesteps, cond, generator):
    """The toy sampler: one network call at the first timestep, straight to its x0 estimate."""
    return cond.predict(denoiser, x, int(timesteps[0])).x0


TOY = Sampler(
    "toy_jump", lambda steps, total, options: torch.tensor([options["start"]]), one_jump,
    scheduler="EulerDiscreteScheduler", records=("start",),
    pipeline_arguments=lambda steps, options, total: {"num_inference_steps": steps, "timesteps": [options["start"]]},
)


@pytest.fixture
def toy_sampler():
    before = dict(sampler_table.SAMPLERS)
    register_sampler(TOY)
    yield TOY
    sampler_table.SAMPLERS.clear()
    sampler_table.SAMPLERS.update(before)


def test_the_table_holds_the_three_samplers_with_their_diffusers_twins():
    assert {name: get_sampler(name).scheduler for name in ("ddim", "multistep", "edge_jumps")} == {
        "ddim": "DDIMScheduler", "multistep": "LCMScheduler", "edge_jumps": "TCDScheduler"}
    edge = get_sampler("edge_jumps")
    options = {"num_solver_steps": 50, "edges": torch.tensor([0, 259, 519, 779])}
    assert edge.timesteps(4, 1000, options).tolist() == [999, 779, 519, 259]
    assert edge.pipeline_arguments(4, options, 1000) == {"timesteps": [999, 779, 519, 259], "eta": 0.0}
    assert edge.recorded({**options, "unused": 1}) == {"num_solver_steps": 50, "edges": [0, 259, 519, 779]}
    assert get_sampler("multistep").timesteps(4, 1000, {"num_solver_steps": 50}).tolist() == [999, 759, 499, 259]


def test_unknown_sampler_and_missing_records_are_clear_errors():
    with pytest.raises(UserError, match=r"sampler 'nope' is not one of \['ddim', 'edge_jumps', 'multistep'"):
        get_sampler("nope")
    with pytest.raises(ValueError, match=r"needs the run to record \['edges'\]"):
        get_sampler("edge_jumps").recorded({"num_solver_steps": 50})


def test_a_registered_toy_sampler_works_through_sample_and_export(toy_sampler, tiny_sd_path, tmp_path):
    components = load_components(str(tiny_sd_path))
    add_lora(components.unet, rank=4, alpha=4)
    folder = tmp_path / "run" / "lora"
    save_lora_diffusers(components.unet, folder)
    # what train.py writes: the options the entry says a run records, picked from the module's sampler options
    options = toy_sampler.recorded({"start": 899, "num_solver_steps": 50})
    RunInfo("toy", "toy_jump", 1, options, {"rank": 4, "alpha": 4}, str(tiny_sd_path)).write(folder)

    drawer, info = load_drawer(load_components(str(tiny_sd_path)), tmp_path / "run")
    assert info.options == {"start": 899} and drawer.sampler == "toy_jump"
    noise = drawer.noise(len(PROMPTS), seed=0)
    drawn = drawer.draw_latents(PROMPTS, steps=1, noise=noise)
    with torch.inference_mode():
        context = drawer.encoders.encode_prompts(PROMPTS)
        expected = Conditioning(context).predict(Denoiser(unet_network(drawer.unet), drawer.schedule), noise, 899).x0
    assert torch.allclose(drawn, expected, atol=1e-5)

    out = export_run(tmp_path / "run", tmp_path / "export")
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
        "EulerDiscreteScheduler"
    card = (out / "README.md").read_text()
    assert "EulerDiscreteScheduler" in card and "num_inference_steps=1, timesteps=[899], guidance_scale=1.0" in card


def test_a_run_with_a_sampler_this_installation_lacks_is_one_line(tmp_path):
    RunInfo("toy", "not_registered", 1).write(tmp_path)
    with pytest.raises(UserError, match="sampler 'not_registered' is not one of"):
        RunInfo.read(tmp_path)


def test_runs_written_before_the_table_still_read(tmp_path):
    (tmp_path / "cm_lightning.json").write_text(json.dumps({
        "method": "mcd", "sampler": "edge_jumps", "sample_steps": 4, "num_solver_steps": 50,
        "edges": [0, 259, 519, 779], "lora": {"rank": 4}, "model": "m"}))
    info = RunInfo.read(tmp_path)
    assert info.options == {"num_solver_steps": 50, "edges": [0, 259, 519, 779]} and info.lora == {"rank": 4}
