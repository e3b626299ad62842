"""Parity of the diffusion maths with diffusers' schedulers (the numerical oracle), fp32, max abs diff < 1e-5."""

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler

from cm_lightning.diffusion.denoiser import Denoiser
from cm_lightning.diffusion.grid import (
    curriculum_num_steps,
    lognormal_step_weights,
    boundary_of,
    ddim_timesteps,
    edge_jump_timesteps,
    lcm_timesteps,
    sample_training_pairs,
    segment_edges,
    solver_grid,
)
from cm_lightning.diffusion.losses import l2, make_loss, pseudo_huber, pseudo_huber_norm
from cm_lightning.diffusion.parameterization import (
    Prediction,
    ddim_jump,
    edge_jump_consistency,
    lcm_consistency,
    lcm_scalings,
    split_prediction,
)
from cm_lightning.diffusion.samplers import Conditioning, sample_ddim, sample_edge_jumps, sample_multistep
from cm_lightning.diffusion.schedule import NoiseSchedule

SD15 = {
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "steps_offset": 1, "skip_prk_steps": True,
    "clip_sample": False, "prediction_type": "epsilon",
}
TOL = 1e-5


def fake_net(x, t, context):
    """A deterministic stand-in for a UNet: depends nonlinearly on x, t and the context."""
    scale = (t.float() / 1000).view(-1, 1, 1, 1)
    return torch.tanh(0.7 * x + scale) * (1 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)) - 0.3 * scale


@pytest.fixture
def schedule():
    return NoiseSchedule.from_scheduler_config(SD15)


def test_schedule_is_sd15_scaled_linear(schedule):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - betas, 0).float()
    assert torch.allclose(schedule.alphas_cumprod, expected, atol=1e-6)
    assert schedule.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=1e-5)
    assert schedule.final_alpha_cumprod == pytest.approx(0.99915, abs=1e-5)  # set_alpha_to_one False


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers_training_scripts(prediction_type):
    """The weighting of diffusers' train_text_to_image.py (``--snr_gamma``), computed with its compute_snr."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    config = {**SD15, "prediction_type": prediction_type}
    ours = NoiseSchedule.from_scheduler_config(config)
    t = torch.tensor([0, 10, 50, 200, 500, 999])
    snr = compute_snr(DDPMScheduler.from_config(config), t)
    expected = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    expected = expected / snr if prediction_type == "epsilon" else expected / (snr + 1)
    weights = ours.min_snr_weights(t, 5.0)
    assert torch.allclose(weights, expected, rtol=1e-5)
    if prediction_type == "epsilon":  # clean steps down-weighted, noisy steps untouched
        assert weights[0] < 0.01 and weights[-1] == 1.0


def test_solver_grid_edges_and_timesteps():
    grid = solver_grid(1000, 50)
    assert grid[:3].tolist() == [19, 39, 59] and grid[-1].item() == 999 and grid.numel() == 50
    assert segment_edges(grid, 4, "icd").tolist() == [0, 259, 519, 779]
    assert segment_edges(grid, 4, "pcm").tolist() == [0, 239, 499, 739]
    assert segment_edges(grid, 1).tolist() == [0]
    assert segment_edges(grid, 2).tolist() == [0, 499]
    assert edge_jump_timesteps(segment_edges(grid, 4), 1000).tolist() == [999, 779, 519, 259]
    assert edge_jump_timesteps(segment_edges(grid, 1), 1000).tolist() == [999]
    with pytest.raises(ValueError, match="boundaries=0"):
        segment_edges(grid, 0)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_timesteps_match_lcm_scheduler(steps):
    scheduler = LCMScheduler.from_config(SD15)
    scheduler.set_timesteps(steps)
    assert lcm_timesteps(solver_grid(1000, 50), steps).tolist() == scheduler.timesteps.tolist()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [4, 50])
def test_ddim_timesteps_match_ddim_scheduler(spacing, steps):
    scheduler = DDIMScheduler.from_config({**SD15, "timestep_spacing": spacing})
    scheduler.set_timesteps(steps)
    ours = ddim_timesteps(1000, steps, spacing=spacing, steps_offset=SD15["steps_offset"])
    assert ours.tolist() == scheduler.timesteps.tolist()


def test_training_pairs_are_solver_neighbours():
    grid = solver_grid(1000, 50)
    t_hi, t_lo = sample_training_pairs(grid, 4096, torch.Generator().manual_seed(0))
    assert set(t_hi.tolist()) == set(grid.tolist())  # every grid point is drawn
    assert torch.equal(t_lo, (t_hi - 20).clamp(min=0))
    assert t_lo.min().item() == 0


def test_boundary_of_training_and_sampling():
    edges = torch.tensor([0, 259, 519, 779])
    t = torch.tensor([0, 19, 258, 259, 260, 779, 999])
    assert boundary_of(t, edges).tolist() == [0, 0, 0, 259, 259, 779, 779]
    assert boundary_of(t, edges, strict=True).tolist() == [0, 0, 0, 0, 259, 519, 779]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_split_prediction_matches_ddim_step(prediction_type):
    config = {**SD15, "prediction_type": prediction_type}
    schedule = NoiseSchedule.from_scheduler_config(config)
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(50)
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in [981, 501, 21, 1]:
        ref = scheduler.step(out[:1], t, x[:1]).pred_original_sample
        ours = split_prediction(out[:1], x[:1], torch.tensor([t]), schedule)
        assert (ours.x0 - ref).abs().max() < TOL
        # eps and x0 reproduce x_t exactly: the DDIM jump to t itself is the identity
        assert (ddim_jump(ours, torch.tensor([t]), schedule) - x[:1]).abs().max() < 1e-4


def test_lcm_scalings_match_lcm_scheduler():
    scheduler = LCMScheduler.from_config(SD15)
    for t in [0, 1, 19, 259, 999]:
        ref_skip, ref_out = scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        c_skip, c_out = lcm_scalings(torch.tensor([t]))
        assert abs(c_skip.item() - float(ref_skip)) < 1e-7 and abs(c_out.item() - float(ref_out)) < 1e-7
    c_skip, c_out = lcm_scalings(torch.tensor([0]))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0  # the boundary condition f(x, 0) = x


def test_edge_jump_boundary_condition_is_exact_at_every_edge(schedule):
    for edge in segment_edges(solver_grid(1000, 50), 8).tolist():
        t = torch.full((3,), edge)
        x_t = torch.randn(3, 4, 8, 8)
        pred = split_prediction(torch.randn(3, 4, 8, 8), x_t, t, schedule)
        assert (edge_jump_consistency(pred, t, schedule) - x_t).abs().max() < 1e-4, edge
    x_t = torch.randn(2, 4, 8, 8)
    pred = Prediction(torch.randn_like(x_t), torch.randn_like(x_t))
    assert torch.equal(lcm_consistency(x_t, torch.zeros(2, dtype=torch.long), pred), x_t)


def _conditioning(batch=2, guidance=1.0):
    g = torch.Generator().manual_seed(1)
    return Conditioning(torch.randn(batch, 7, 16, generator=g), torch.randn(7, 16, generator=g), guidance)


def _guided_reference_output(x, t, cond):
    """What diffusers' pipelines feed the scheduler: u + g (c - u) from two separate passes."""
    t_b = torch.full((x.shape[0],), int(t))
    if cond.guidance_scale == 1.0:
        return fake_net(x, t_b, cond.context)
    u = fake_net(x, t_b, cond.null_context.expand_as(cond.context))
    c = fake_net(x, t_b, cond.context)
    return u + cond.guidance_scale * (c - u)


@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("steps", [4, 50])
def test_sample_ddim_matches_ddim_scheduler(schedule, guidance, steps):
    scheduler = DDIMScheduler.from_config(SD15)
    scheduler.set_timesteps(steps)
    cond = _conditioning(guidance=guidance)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = x0.clone()
    for t in scheduler.timesteps:
        ref = scheduler.step(_guided_reference_output(ref, t, cond), t, ref, eta=0.0).prev_sample
    timesteps = ddim_timesteps(1000, steps, spacing="leading", steps_offset=1)
    ours = sample_ddim(Denoiser(fake_net, schedule), x0.clone(), timesteps, cond)
    assert (ours - ref).abs().max() < TOL


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_sample_multistep_matches_lcm_scheduler(schedule, steps):
    scheduler = LCMScheduler.from_config(SD15)
    scheduler.set_timesteps(steps)
    cond = _conditioning()
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref, generator = x0.clone(), torch.Generator().manual_seed(42)
    for t in scheduler.timesteps:
        out = scheduler.step(_guided_reference_output(ref, t, cond), t, ref, generator=generator)
        ref, last_denoised = out.prev_sample, out.denoised
    ours = sample_multistep(
        Denoiser(fake_net, schedule), x0.clone(), lcm_timesteps(solver_grid(1000, 50), steps), cond,
        generator=torch.Generator().manual_seed(42),
    )
    assert (ours - last_denoised).abs().max() < TOL


@pytest.mark.parametrize("edges", [[0, 259, 519, 779], [0, 499], [0]])
def test_sample_edge_jumps_matches_tcd_scheduler(schedule, edges):
    timesteps = edge_jump_timesteps(torch.tensor(edges), 1000)
    scheduler = TCDScheduler.from_config(SD15)
    scheduler.set_timesteps(timesteps=timesteps.tolist())
    cond = _conditioning(guidance=3.0)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = x0.clone()
    for t in scheduler.timesteps:
        ref = scheduler.step(_guided_reference_output(ref, t, cond), t, ref, eta=0.0).prev_sample
    ours = sample_edge_jumps(Denoiser(fake_net, schedule), x0.clone(), timesteps, cond)
    assert (ours - ref).abs().max() < TOL


def test_guidance_runs_one_batched_pass_with_same_result(schedule):
    calls = []

    def counting_net(x, t, c):
        calls.append(x.shape[0])
        return fake_net(x, t, c)

    cond = _conditioning(guidance=5.0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    pred = cond.predict(Denoiser(counting_net, schedule), x, 500)
    assert calls == [4]
    ref = split_prediction(_guided_reference_output(x, 500, cond), x, t, schedule)
    assert (pred.eps - ref.eps).abs().max() < TOL and (pred.x0 - ref.x0).abs().max() < TOL


def test_losses_are_per_sample():
    a, b = torch.zeros(2, 4, 8, 8), torch.full((2, 4, 8, 8), 0.5)
    b[1] = 1.0
    assert l2(a, b).tolist() == pytest.approx([0.25, 1.0])
    assert pseudo_huber(a, b, c=0.001)[0].item() == pytest.approx((0.25 + 1e-6) ** 0.5 - 0.001, rel=1e-5)
    assert pseudo_huber(a, a).abs().max().item() == 0.0
    d = 4 * 8 * 8
    c = 0.00054 * d**0.5
    assert pseudo_huber_norm(a, b)[0].item() == pytest.approx((0.25 * d + c * c) ** 0.5 - c, rel=1e-5)
    assert make_loss("pseudo_huber", 0.5)(a, b)[0].item() == pytest.approx((0.25 + 0.25) ** 0.5 - 0.5, rel=1e-5)
    with pytest.raises(ValueError, match="huber"):
        make_loss("huber")


def test_curriculum_doubles_from_start_to_end():
    sizes = [curriculum_num_steps(step, 400, 10, 80) for step in range(0, 400, 50)]
    assert sizes == [10, 10, 20, 20, 40, 40, 80, 80]
    assert curriculum_num_steps(10**6, 400, 10, 80) == 80
    assert curriculum_num_steps(0, 400, 50, 50) == 50


def test_lognormal_weights_favour_mid_noise(schedule):
    grid = solver_grid(1000, 50)
    weights = lognormal_step_weights(schedule.alphas_cumprod, grid)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-5) and (weights >= 0).all()
    # P_mean = -1.1 puts the median at sigma = 0.33 (t near 100 for SD1.5): low noise levels dominate
    assert weights[:5].sum() > 0.4 and weights[-10:].sum() < 0.1
    t_hi, _ = sample_training_pairs(grid, 2000, torch.Generator().manual_seed(0), index_weights=weights)
    assert (t_hi < 500).float().mean() > 0.6
