"""Exact values of each method's training pieces, against diffusers (fp32) and formulas written out here.

The student is the tiny UNet with random, non-zero LoRA weights, so that it differs from the teacher (the base
UNet, loaded afresh here as an independent reference). Pairs are fixed, chosen to include the top of the grid,
the step down to timestep 0 and MCD's segment edges. Guidance is diffusers' g (``u + g (c - u)``), LCM's w + 1.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, UNet2DConditionModel
from torch.utils.data import DataLoader

from cm_lightning.diffusion.schedule import NoiseSchedule
from cm_lightning.methods import base as base_module
from cm_lightning.methods import (
    ConsistencyDistillation,
    ConsistencyTraining,
    MultiBoundaryConsistencyDistillation,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only wait on each other

LORA = {"rank": 4, "alpha": 8, "dropout": 0.0}
TOL = 1e-4
# t_hi per solver grid size N (skip k = 1000 // N); t_lo = t_hi - k, clamped at 0
PAIRS = {50: [999, 779, 539, 279, 39, 19], 25: [999, 759, 399, 359, 79, 39]}
GUIDANCE = torch.tensor([1.0, 2.5, 7.5, 4.0, 3.0, 6.0])  # one g per sample, g = 1 included


def make_method(tiny_sd_path, cls, *, num_solver_steps: int = 50, **options):
    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd_path / "unet"))
    schedule = NoiseSchedule.from_scheduler_config(DDIMScheduler.load_config(str(tiny_sd_path), subfolder="scheduler"))
    module = cls(unet, schedule, lora=LORA, optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
                 num_solver_steps=num_solver_steps, gradient_checkpointing=False, **options)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # peft starts B at 0 (student = teacher): make them differ
        for name, param in module.unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    module.null_context = torch.randn(77, 32, generator=generator)
    return module


@pytest.fixture(scope="module")
def base(tiny_sd_path):
    """The teacher as diffusers loads it (no adapter at all) and the model's own scheduler config."""
    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd_path / "unet")).eval()
    return unet, dict(DDIMScheduler.load_config(str(tiny_sd_path), subfolder="scheduler"))


def batch(num_steps: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 4, 16, 16, generator=generator)
    noise = torch.randn(6, 4, 16, 16, generator=generator)
    context = torch.randn(6, 77, 32, generator=generator)
    t_hi = torch.tensor(PAIRS[num_steps])
    t_lo = (t_hi - 1000 // num_steps).clamp(min=0)
    return x0, noise, context, t_hi, t_lo


def alpha_bar(config: dict) -> torch.Tensor:
    return DDIMScheduler.from_config(config).alphas_cumprod


def ddim_jump_reference(eps: torch.Tensor, x_t: torch.Tensor, t: int, s: int, abar: torch.Tensor) -> torch.Tensor:
    """DDIM (eta = 0) from t to s given eps, written out: x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)."""
    x0 = (x_t - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
    return abar[s].sqrt() * x0 + (1 - abar[s]).sqrt() * eps


@torch.no_grad()
def student_output(module, x, t, context) -> torch.Tensor:
    return module.unet(x, t, encoder_hidden_states=context).sample


# ---------------------------------------------------------------------------------------------- CD and MCD
@pytest.mark.parametrize("num_steps", [50, 25])
@pytest.mark.parametrize("cls", [ConsistencyDistillation, MultiBoundaryConsistencyDistillation])
def test_teacher_step_is_ddim_scheduler_step_on_guided_teacher(tiny_sd_path, base, cls, num_steps, monkeypatch):
    """x_lo = DDIMScheduler.step(u + g (c - u)) of the base UNet at x_hi, from t_hi to t_lo, g per sample."""
    unet, config = base
    module = make_method(tiny_sd_path, cls, num_solver_steps=num_steps, guidance_min=1.0, guidance_max=8.0)
    monkeypatch.setattr(module, "draw_guidance", lambda size, device: GUIDANCE)
    x0, noise, context, t_hi, t_lo = batch(num_steps)
    x_hi = DDPMScheduler.from_config(config).add_noise(x0, noise, t_hi)
    x_lo = module.previous_point(x0, noise, x_hi, t_hi, t_lo, context)

    ddim = DDIMScheduler.from_config(config)
    ddim.set_timesteps(num_steps)  # step() then goes from t to t - 1000 // N
    null = module.null_context[None]
    for i in range(6):
        with torch.no_grad():
            u = unet(x_hi[i : i + 1], t_hi[i], encoder_hidden_states=null).sample
            c = unet(x_hi[i : i + 1], t_hi[i], encoder_hidden_states=context[i : i + 1]).sample
        expected = ddim.step(u + GUIDANCE[i] * (c - u), int(t_hi[i]), x_hi[i : i + 1], eta=0.0).prev_sample
        assert (x_lo[i : i + 1] - expected).abs().max() < TOL, (i, int(t_hi[i]))
    # the LoRA student differs from its teacher here, so a step taken by the student would fail above
    assert (student_output(module, x_hi, t_hi, context) - unet(x_hi, t_hi, encoder_hidden_states=context).sample
            ).abs().max() > 1e-2


def test_unguided_teacher_step_is_the_conditional_teacher_alone(tiny_sd_path, base):
    """g_min = g_max = 1: no CFG pass (the empty prompt is not needed) and x_lo is the DDIM step of c."""
    unet, config = base
    module = make_method(tiny_sd_path, ConsistencyDistillation, guidance_min=1.0, guidance_max=1.0)
    module.null_context = None
    assert module.draw_guidance(6, torch.device("cpu")) == 1.0
    x0, noise, context, t_hi, t_lo = batch(50)
    x_hi = DDPMScheduler.from_config(config).add_noise(x0, noise, t_hi)
    x_lo = module.previous_point(x0, noise, x_hi, t_hi, t_lo, context)
    ddim = DDIMScheduler.from_config(config)
    ddim.set_timesteps(50)
    for i in range(6):
        with torch.no_grad():
            c = unet(x_hi[i : i + 1], t_hi[i], encoder_hidden_states=context[i : i + 1]).sample
        expected = ddim.step(c, int(t_hi[i]), x_hi[i : i + 1], eta=0.0).prev_sample
        assert (x_lo[i : i + 1] - expected).abs().max() < TOL


@pytest.mark.parametrize("cls", [ConsistencyDistillation, MultiBoundaryConsistencyDistillation])
def test_drawn_guidance_is_diffusers_g_within_its_range(tiny_sd_path, cls):
    """teacher_guidance.min/max are g, not LCM's w = g - 1: every draw lies in [min, max] and fills it."""
    module = make_method(tiny_sd_path, cls, guidance_min=2.0, guidance_max=5.0)
    torch.manual_seed(0)
    g = module.draw_guidance(20000, torch.device("cpu"))
    assert g.shape == (20000,)
    assert 2.0 <= g.min() < 2.01 and 4.99 < g.max() <= 5.0
    assert g.mean().item() == pytest.approx(3.5, abs=0.03)
    fixed = make_method(tiny_sd_path, cls, guidance_min=3.0, guidance_max=3.0)
    assert torch.equal(fixed.draw_guidance(4, torch.device("cpu")), torch.full((4,), 3.0))


def test_cd_consistency_and_target_use_lcm_scalings(tiny_sd_path, base):
    """f(x, t) = c_skip x + c_out x0_hat with LCMScheduler's scalings; the target at t_lo = 0 is x_lo itself."""
    _, config = base
    module = make_method(tiny_sd_path, ConsistencyDistillation)
    abar = alpha_bar(config)
    lcm = LCMScheduler.from_config(config)
    _, x_lo, context, _, t_lo = batch(50)
    boundary = module.boundary(t_lo)
    assert torch.equal(boundary, torch.zeros_like(t_lo))
    target = module.target(x_lo, t_lo, context, boundary)
    eps = student_output(module, x_lo, t_lo, context)
    for i, t in enumerate(t_lo.tolist()):
        c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        x0 = (x_lo[i] - (1 - abar[t]).sqrt() * eps[i]) / abar[t].sqrt()
        expected = c_skip * x_lo[i] + c_out * x0
        assert (target[i] - expected).abs().max() < TOL, t
    assert t_lo[-1] == 0 and torch.equal(target[-1], x_lo[-1])


@pytest.mark.parametrize("num_steps,boundaries,edges", [(50, 4, [0, 259, 519, 779]), (25, 3, [0, 359, 719])])
def test_mcd_boundary_is_the_left_edge_of_the_pairs_segment(tiny_sd_path, num_steps, boundaries, edges):
    module = make_method(tiny_sd_path, MultiBoundaryConsistencyDistillation, num_solver_steps=num_steps,
                         num_segments=boundaries)
    assert module.edges.tolist() == edges
    skip = 1000 // num_steps
    t_lo = (torch.arange(1, num_steps + 1) * skip - 1 - skip).clamp(min=0)  # every pair's t_lo
    expected = [max(e for e in edges if e <= t) for t in t_lo.tolist()]
    assert module.boundary(t_lo).tolist() == expected
    # a pair whose t_lo sits on an edge maps to that edge, the pair just above it to the same edge
    assert module.boundary(torch.tensor([edges[1], edges[1] + skip])).tolist() == [edges[1], edges[1]]


@pytest.mark.parametrize("num_steps", [50, 25])
def test_mcd_consistency_jumps_to_the_edge_and_target_is_x_lo_on_an_edge(tiny_sd_path, base, num_steps):
    _, config = base
    module = make_method(tiny_sd_path, MultiBoundaryConsistencyDistillation, num_solver_steps=num_steps)
    abar = alpha_bar(config)
    x_hi, x_lo, context, t_hi, t_lo = batch(num_steps)
    boundary = module.boundary(t_lo)
    on_edge = (t_lo == boundary).tolist()
    assert any(on_edge) and not all(on_edge)
    target = module.target(x_lo, t_lo, context, boundary)
    eps_lo = student_output(module, x_lo, t_lo, context)
    prediction = module.consistency(x_hi, t_hi, module.student(x_hi, t_hi, context), boundary)
    eps_hi = student_output(module, x_hi, t_hi, context)
    for i in range(6):
        s = int(boundary[i])
        if on_edge[i]:
            assert torch.equal(target[i], x_lo[i]), int(t_lo[i])
        else:
            expected = ddim_jump_reference(eps_lo[i], x_lo[i], int(t_lo[i]), s, abar)
            assert (target[i] - expected).abs().max() < TOL, int(t_lo[i])
        # the student's side: x_hi jumps to the boundary of its pair's t_lo (not of t_hi)
        expected_hi = ddim_jump_reference(eps_hi[i], x_hi[i], int(t_hi[i]), s, abar)
        assert (prediction[i] - expected_hi).abs().max() < TOL, int(t_hi[i])


# ---------------------------------------------------------------------------------------------- CT
def test_ct_previous_point_is_the_forward_process_at_t_lo_with_the_same_noise(tiny_sd_path, base, monkeypatch):
    _, config = base
    module = make_method(tiny_sd_path, ConsistencyTraining)
    monkeypatch.setattr(module, "teacher", None)  # CT has no teacher: calling one would fail
    x0, noise, context, t_hi, t_lo = batch(50)
    forward = DDPMScheduler.from_config(config)
    x_hi = forward.add_noise(x0, noise, t_hi)
    x_lo = module.previous_point(x0, noise, x_hi, t_hi, t_lo, context)
    assert (x_lo - forward.add_noise(x0, noise, t_lo)).abs().max() < 1e-5
    # the same noise: x_lo is DDIM's step from x_hi whose x0 and eps are the true ones
    abar = alpha_bar(config)
    for i in range(6):
        jump = ddim_jump_reference(noise[i], x_hi[i], int(t_hi[i]), int(t_lo[i]), abar)
        assert (x_lo[i] - jump).abs().max() < TOL


def test_ct_caption_dropout_swaps_in_the_empty_prompt(tiny_sd_path):
    module = make_method(tiny_sd_path, ConsistencyTraining, caption_dropout=0.25)
    module.null_context = torch.randn(4, 8)
    context = torch.randn(4000, 4, 8)
    torch.manual_seed(0)
    seen = module.training_context(context)
    dropped = (seen == module.null_context).flatten(1).all(dim=1)
    kept = (seen == context).flatten(1).all(dim=1)
    assert torch.equal(dropped, ~kept)  # each row is either its caption or the empty prompt, whole
    assert 0.22 < dropped.float().mean() < 0.28
    module.eval()
    assert torch.equal(module.training_context(context), context)


# ---------------------------------------------------------------------------------------------- one whole step
class LossOf(L.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.loss = outputs["loss"].detach()


@pytest.mark.parametrize("cls", [ConsistencyTraining, ConsistencyDistillation, MultiBoundaryConsistencyDistillation])
def test_training_step_loss_is_pseudo_huber_between_student_at_x_hi_and_target_at_x_lo(
    tiny_sd_path, base, cls, monkeypatch
):
    """One real training step (Lightning, lr 0) on fixed pairs: x_hi is the forward process at t_hi; the loss is the
    mean pseudo-Huber (c = 0.001) between f(x_hi, t_hi) and the target at x_lo, both to the boundary of t_lo."""
    _, config = base
    pairs = batch(50)[3:]
    monkeypatch.setattr(base_module, "sample_training_pairs", lambda grid, size, **kw: (pairs[0].to(grid.device),
                                                                                         pairs[1].to(grid.device)))
    options = {"caption_dropout": 0.0} if cls is ConsistencyTraining else {"guidance_min": 2.0, "guidance_max": 2.0}
    module = make_method(tiny_sd_path, cls, **options)
    seen = {}
    previous_point = module.previous_point

    def capture(x0, noise, x_hi, t_hi, t_lo, context):
        seen.update(x0=x0, noise=noise, x_hi=x_hi, t_hi=t_hi, t_lo=t_lo, context=context)
        seen["x_lo"] = previous_point(x0, noise, x_hi, t_hi, t_lo, context)
        return seen["x_lo"]

    module.previous_point = capture
    x0, _, context, _, _ = batch(50)
    loss = LossOf()
    torch.manual_seed(3)
    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[loss]).fit(
        module, DataLoader([{"latents": x0[i], "text_embeds": context[i]} for i in range(6)], batch_size=6))

    abar = alpha_bar(config)
    t_hi, t_lo = seen["t_hi"], seen["t_lo"]
    assert torch.equal(seen["x0"], x0) and torch.equal(seen["context"], context)
    assert torch.equal(t_hi, pairs[0]) and torch.equal(t_lo, pairs[1])
    expected_x_hi = DDPMScheduler.from_config(config).add_noise(x0, seen["noise"], t_hi)
    assert (seen["x_hi"] - expected_x_hi).abs().max() < 1e-5
    x_hi, x_lo = seen["x_hi"], seen["x_lo"]
    eps_hi, eps_lo = student_output(module, x_hi, t_hi, context), student_output(module, x_lo, t_lo, context)
    lcm = LCMScheduler.from_config(config)
    edges = module.edges.tolist() if cls is MultiBoundaryConsistencyDistillation else [0]
    per_sample = []
    for i in range(6):
        th, tl = int(t_hi[i]), int(t_lo[i])
        s = max(e for e in edges if e <= tl)
        if cls is MultiBoundaryConsistencyDistillation:
            pred = ddim_jump_reference(eps_hi[i], x_hi[i], th, s, abar)
            target = ddim_jump_reference(eps_lo[i], x_lo[i], tl, s, abar)
        else:
            def lcm_f(x, eps, t):
                c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
                return c_skip * x + c_out * (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()

            pred, target = lcm_f(x_hi[i], eps_hi[i], th), lcm_f(x_lo[i], eps_lo[i], tl)
        target = x_lo[i] if tl == s else target
        per_sample.append((((pred - target) ** 2 + 1e-6).sqrt() - 1e-3).mean())
    assert loss.loss.item() == pytest.approx(torch.stack(per_sample).mean().item(), rel=1e-4, abs=1e-7)
