"""The contract every consistency method (CT, CD, MCD) keeps, in the spirit of diffusers' ``SchedulerCommonTest``.

One base class says what any method must satisfy; each method's class only names the method and adds its own
clause. The network is a fake: a deterministic tiny function of (x_t, t, context) with one peft-adapted layer, so
that the student (adapters on) differs from the teacher (adapters off) as on a real UNet, at no UNet's cost.
diffusers' schedulers are the oracle.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from cm_lightning.diffusion.parameterization import Prediction, lcm_scalings
from cm_lightning.diffusion.schedule import NoiseSchedule
from cm_lightning.methods import ConsistencyDistillation, ConsistencyTraining, MultiBoundaryConsistencyDistillation
from cm_lightning.models.lora import adapters_disabled

SD15 = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}
N = 50  # solver grid: skip 20, t_hi in 19, 39, ..., 999
PAIRS_HI = torch.tensor([999, 799, 279, 539, 19, 39])  # includes the steps onto t = 0 and onto MCD's edges
GUIDANCE = 3.0


class FakeUNet(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """``eps = 0.3 conv(x) + to_q(t / 1000) + mean(context)``: smooth, deterministic, cheap; ``to_q`` takes LoRA."""

    @register_to_config
    def __init__(self, channels: int = 4):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv_in = nn.Conv2d(channels, channels, 1)
        self.to_q = nn.Linear(1, channels)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)

    def forward(self, x, t, encoder_hidden_states):
        shift = self.to_q((t.float() / 1000).view(-1, 1).to(x.dtype))
        context = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=0.3 * self.conv_in(x) + shift[:, :, None, None] + context)


def build(cls, **options):
    schedule = NoiseSchedule.from_scheduler_config(SD15)
    module = cls(FakeUNet(), schedule, lora={"rank": 2, "alpha": 2, "target_modules": ["to_q"]},
                 optimizer=lambda p: torch.optim.SGD(p, lr=0.0), num_solver_steps=N, gradient_checkpointing=False,
                 **options)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # peft starts B at 0 (student = teacher): make them differ
        for name, param in module.unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    module.null_context = torch.randn(7, 8, generator=generator)
    return module


def batch(seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 4, 8, 8, generator=generator)
    noise = torch.randn(6, 4, 8, 8, generator=generator)
    context = torch.randn(6, 7, 8, generator=generator)
    return x0, noise, context, PAIRS_HI, (PAIRS_HI - 1000 // N).clamp(min=0)


def abar() -> torch.Tensor:
    return DDIMScheduler.from_config(SD15).alphas_cumprod


def on_trajectory(x0, noise, t) -> torch.Tensor:
    """x_t of the trajectory through (x0, noise), from diffusers' forward process."""
    return DDPMScheduler.from_config(SD15).add_noise(x0, noise, t)


class MethodContract:
    """What every consistency method must satisfy. Subclasses set ``method`` (and ``options``)."""

    method: type
    options: dict = {}

    def module(self):
        return build(self.method, **self.options)

    def test_boundary_maps_into_the_pairs_segment(self):
        module = self.module()
        _, _, _, _, t_lo = batch()
        boundary = module.boundary(t_lo)
        assert (boundary <= t_lo).all() and (boundary >= 0).all()

    def test_target_equals_x_lo_on_a_boundary_and_not_elsewhere(self):
        module = self.module()
        x0, noise, context, t_hi, t_lo = batch()
        x_lo = on_trajectory(x0, noise, t_lo)
        boundary = module.boundary(t_lo)
        target = module.target(x_lo, t_lo, context, boundary)
        on = t_lo == boundary
        assert on.any() and (~on).any()  # the pairs test both cases
        assert torch.equal(target[on], x_lo[on])  # exactly, not up to rounding
        assert (target[~on] - x_lo[~on]).abs().amax(dim=(1, 2, 3)).min() > 1e-3

    def test_target_is_the_students_consistency_output_without_gradient(self):
        module = self.module()
        x0, noise, context, t_hi, t_lo = batch()
        x_lo = on_trajectory(x0, noise, t_lo)
        boundary = module.boundary(t_lo)
        target = module.target(x_lo, t_lo, context, boundary)
        direct = module.consistency(x_lo, t_lo, module.student(x_lo, t_lo, context), boundary)
        off = t_lo != boundary
        assert not target.requires_grad and direct.requires_grad
        assert torch.allclose(target[off], direct[off].detach(), atol=1e-6)

    def perfect_student(self, module, x0):
        """A student that is an exact consistency function of the trajectory through (x0, noise of x_t)."""
        raise NotImplementedError

    def test_loss_is_zero_at_the_fixed_point_and_positive_off_it(self, monkeypatch):
        """Exact teacher (its eps is the trajectory's noise), perfect student: x_lo stays on the trajectory and the
        student's output at x_hi equals its target at x_lo, so the training step's loss vanishes."""
        module = self.module()
        x0, _, context, _, _ = batch()
        abar_ = module.schedule.alphas_cumprod

        def exact_teacher(x_t, t, context, guidance_scale):
            a, s = abar_[t].sqrt().view(-1, 1, 1, 1), (1 - abar_[t]).sqrt().view(-1, 1, 1, 1)
            return Prediction(x0, (x_t - a * x0) / s)

        monkeypatch.setattr(module, "teacher", exact_teacher)
        monkeypatch.setattr(module, "student", self.perfect_student(module, x0))
        monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
        monkeypatch.setattr(type(module), "trainer", property(lambda self: SimpleNamespace(log_every_n_steps=1)))
        torch.manual_seed(0)
        loss = module.training_step({"latents": x0, "text_embeds": context}, 0)
        assert loss.item() < 1e-6

        perfect = self.perfect_student(module, x0)

        def inconsistent(x_t, t, context, role="student"):  # x0_hat off by 0.1 at every other solver step: t_hi and t_lo disagree
            pred = perfect(x_t, t, context)
            return Prediction(pred.x0 + 0.1 * ((t // 20) % 2).view(-1, 1, 1, 1), pred.eps)

        monkeypatch.setattr(module, "student", inconsistent)
        assert module.training_step({"latents": x0, "text_embeds": context}, 0).item() > 1e-4


def lcm_perfect_student(module, x0):
    """f(x_t, t) = c_skip x_t + c_out x0_hat equal to the trajectory's point at t = 0 (LCM's boundary)."""
    abar_ = module.schedule.alphas_cumprod

    def student(x_t, t, context, role="student"):
        a, s = abar_[t].sqrt().view(-1, 1, 1, 1), (1 - abar_[t]).sqrt().view(-1, 1, 1, 1)
        noise = (x_t - a * x0) / s
        at_zero = abar_[0].sqrt() * x0 + (1 - abar_[0]).sqrt() * noise
        c_skip, c_out = (c.view(-1, 1, 1, 1) for c in lcm_scalings(t))
        return Prediction((at_zero - c_skip * x_t) / c_out, noise)

    return student


class TestConsistencyTraining(MethodContract):
    method = ConsistencyTraining
    options = {"caption_dropout": 0.0}

    def perfect_student(self, module, x0):
        return lcm_perfect_student(module, x0)

    def test_x_lo_is_the_oracle_ddim_step(self):
        """CT's x_lo is the DDIM step whose eps is the true noise, i.e. diffusers' forward process at t_lo."""
        module = self.module()
        x0, noise, context, t_hi, t_lo = batch()
        x_hi = on_trajectory(x0, noise, t_hi)
        x_lo = module.previous_point(x0, noise, x_hi, t_hi, t_lo, context)
        assert torch.allclose(x_lo, on_trajectory(x0, noise, t_lo), atol=1e-5)
        ddim = DDIMScheduler.from_config(SD15)
        ddim.set_timesteps(N)
        for i in range(len(t_hi)):
            step = ddim.step(noise[i:i + 1], int(t_hi[i]), x_hi[i:i + 1]).prev_sample
            assert torch.allclose(x_lo[i:i + 1], step, atol=1e-4)


class TeacherStepContract(MethodContract):
    def test_x_lo_is_a_guided_ddim_scheduler_step_of_the_teacher(self):
        module = self.module()
        x0, noise, context, t_hi, t_lo = batch()
        x_hi = on_trajectory(x0, noise, t_hi)
        x_lo = module.previous_point(x0, noise, x_hi, t_hi, t_lo, context)
        ddim = DDIMScheduler.from_config(SD15)
        ddim.set_timesteps(N)  # leading spacing: the previous timestep of t is t - 20, abar_0 below 0
        with torch.no_grad(), adapters_disabled(module.unet):
            uncond = module.unet(x_hi, t_hi, encoder_hidden_states=module.null_context.expand_as(context)).sample
            cond = module.unet(x_hi, t_hi, encoder_hidden_states=context).sample
        guided = uncond + GUIDANCE * (cond - uncond)
        for i in range(len(t_hi)):
            step = ddim.step(guided[i:i + 1], int(t_hi[i]), x_hi[i:i + 1]).prev_sample
            assert torch.allclose(x_lo[i:i + 1], step, atol=1e-4), int(t_hi[i])

    def test_the_teacher_is_the_base_network_not_the_student(self):
        module = self.module()
        x0, noise, context, t_hi, t_lo = batch()
        x_hi = on_trajectory(x0, noise, t_hi)
        assert not torch.allclose(module.teacher(x_hi, t_hi, context, 1.0).eps, module.student(x_hi, t_hi, context).eps)


class TestConsistencyDistillation(TeacherStepContract):
    method = ConsistencyDistillation
    options = {"guidance_min": GUIDANCE, "guidance_max": GUIDANCE}

    def perfect_student(self, module, x0):
        return lcm_perfect_student(module, x0)


class TestMultiBoundaryConsistencyDistillation(TeacherStepContract):
    method = MultiBoundaryConsistencyDistillation
    options = {"guidance_min": GUIDANCE, "guidance_max": GUIDANCE, "num_segments": 4}

    def perfect_student(self, module, x0):
        """The exact (x0, eps) of the trajectory: its DDIM jump lands on the trajectory at the segment's edge."""
        abar_ = module.schedule.alphas_cumprod

        def student(x_t, t, context, role="student"):
            a, s = abar_[t].sqrt().view(-1, 1, 1, 1), (1 - abar_[t]).sqrt().view(-1, 1, 1, 1)
            return Prediction(x0, (x_t - a * x0) / s)

        return student

    def test_consistency_output_lands_on_its_segments_edge(self):
        """f(x_t, t; s) is the DDIM jump to the left edge s of t's segment: a point of the trajectory at s."""
        module = self.module()
        x0, noise, context, t_hi, t_lo = batch()
        boundary = module.boundary(t_lo)
        edges = [0, 259, 519, 779]
        assert module.edges.tolist() == edges
        for t, s in zip(t_lo.tolist(), boundary.tolist()):
            assert s == max(e for e in edges if e <= t)
        x_hi = on_trajectory(x0, noise, t_hi)
        exact = Prediction(x0, noise)  # what a perfect network predicts on this trajectory
        assert torch.allclose(module.consistency(x_hi, t_hi, exact, boundary), on_trajectory(x0, noise, boundary),
                              atol=1e-5)
        # with the fake network: the jump (x0_hat, eps_hat) -> s written out with diffusers' abar
        pred = module.student(x_hi, t_hi, context)
        a = abar()[boundary].sqrt().view(-1, 1, 1, 1)
        s = (1 - abar()[boundary]).sqrt().view(-1, 1, 1, 1)
        assert torch.allclose(module.consistency(x_hi, t_hi, pred, boundary), a * pred.x0 + s * pred.eps, atol=1e-5)
