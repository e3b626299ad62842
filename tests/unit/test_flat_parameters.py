"""The LoRA weights in one flat buffer (``method.flat_parameters``): the optimizer steps one tensor, and training
gives what the parameter-by-parameter layout gives; checkpoints of either layout resume in the other."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch.utils.data import DataLoader

from cm_lightning.diffusion.schedule import NoiseSchedule
from cm_lightning.methods import ConsistencyDistillation
from cm_lightning.methods.latent_module import LatentTrainingModule
from cm_lightning.methods.optim import FlatParameters, flatten_optimizer_state, split_optimizer_state
from cm_lightning.models.lora import lora_state_dict, save_lora_diffusers

pytestmark = pytest.mark.usefixtures("one_thread")


def test_flat_parameters_are_views_of_one_buffer_and_gather_their_gradients():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(1, 5))]
    before = [p.detach().clone() for p in params]
    flat = FlatParameters(params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # same values, shapes
    assert all(p.untyped_storage().data_ptr() == flat.flat.untyped_storage().data_ptr() for p in params)
    with torch.no_grad():
        flat.flat.add_(1.0)  # the optimizer's in-place update reaches every layer's parameter
    assert all(torch.equal(p, b + 1) for p, b in zip(params, before))
    params[0].grad, params[2].grad = torch.ones(3, 2), torch.full((1, 5), 2.0)  # the middle one has none
    flat.gather_grads()
    assert torch.equal(flat.flat.grad, torch.cat([torch.ones(6), torch.zeros(4), torch.full((5,), 2.0)]))
    flat.zero_grad()
    assert flat.flat.grad is None and all(p.grad is None for p in params)


def test_optimizer_state_converts_between_the_layouts():
    """A parameter-by-parameter AdamW state flattened and split again is the same state; each parameter gets its
    own step counter (optimizers increment it in place)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    state = optimizer.state_dict()
    flat = flatten_optimizer_state(state, params)
    assert flat["param_groups"][0]["params"] == [0]
    assert torch.equal(flat["state"][0]["exp_avg"], torch.cat([state["state"][i]["exp_avg"].reshape(-1) for i in (0, 1)]))
    back = split_optimizer_state(flat, params)
    for i in (0, 1):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(back["state"][i][key], state["state"][i][key])
    assert back["state"][0]["step"] is not back["state"][1]["step"]
    assert back["param_groups"][0]["params"] == [0, 1]


def _module(tiny_sd_path, flat: bool) -> ConsistencyDistillation:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd_path / "unet"))
    schedule = NoiseSchedule.from_scheduler_config(DDIMScheduler.load_config(str(tiny_sd_path), subfolder="scheduler"))
    return ConsistencyDistillation(unet, schedule, lora={"rank": 4, "alpha": 4}, flat_parameters=flat,
                                   optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01, fused=True),
                                   gradient_checkpointing=False, guidance_min=1.0, guidance_max=1.0)


def _fit(module, tmp_path, max_steps: int, ckpt_path=None, clip: float | None = None) -> L.Trainer:
    generator = torch.Generator().manual_seed(0)
    items = [{"latents": torch.randn(4, 16, 16, generator=generator),
              "text_embeds": torch.randn(77, 32, generator=generator)} for _ in range(8)]
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=clip, accumulate_grad_batches=2,
                        default_root_dir=str(tmp_path))
    L.seed_everything(0)
    trainer.fit(module, DataLoader(items, batch_size=2), ckpt_path=ckpt_path)
    return trainer


def _assert_same_lora(a, b, tolerance: float) -> None:
    for (name, x), y in zip(lora_state_dict(a.unet).items(), lora_state_dict(b.unet).values()):
        torch.testing.assert_close(x, y, rtol=0, atol=tolerance, msg=name)


def test_a_clipped_flat_step_equals_the_parameter_by_parameter_step(tiny_sd_path, tmp_path):
    """The clip binds (gradient norm > 0.05): one norm over the flat gradient scales as the per-tensor norms do, up to
    float summation order (AdamW's later steps amplify that order's last bits, so one step is compared)."""
    flat, plain = _module(tiny_sd_path, flat=True), _module(tiny_sd_path, flat=False)
    _fit(flat, tmp_path / "flat", max_steps=1, clip=0.05)
    _fit(plain, tmp_path / "plain", max_steps=1, clip=0.05)
    assert flat.trainer.callback_metrics["train/grad_norm"] > 0.05
    _assert_same_lora(flat, plain, 1e-7)


@pytest.mark.parametrize("resume_flat", [True, False])
def test_flat_training_equals_parameter_by_parameter_training_and_resumes_across_layouts(tiny_sd_path, tmp_path,
                                                                                         resume_flat):
    """Accumulated AdamW steps: the same LoRA either way; a checkpoint written in one layout resumes in the other
    (its AdamW moments regrouped) and trains on exactly as when resumed in its own layout. The flat run's LoRA
    (views of one buffer) exports."""
    flat = _module(tiny_sd_path, flat=True)
    _fit(flat, tmp_path / "flat", max_steps=2)
    assert len(flat.trainer.optimizers[0].param_groups[0]["params"]) == 1
    plain = _module(tiny_sd_path, flat=False)
    _fit(plain, tmp_path / "plain", max_steps=2)
    assert len(plain.trainer.optimizers[0].param_groups[0]["params"]) == len(plain.trainable_parameters()) > 1
    _assert_same_lora(flat, plain, 0.0)
    assert not torch.equal(lora_state_dict(flat.unet)[next(iter(lora_state_dict(flat.unet)))],
                           lora_state_dict(_module(tiny_sd_path, flat=True).unet)[next(iter(lora_state_dict(flat.unet)))])
    assert save_lora_diffusers(flat.unet, tmp_path / "lora").is_file()

    checkpoint = next((tmp_path / ("flat" if not resume_flat else "plain")).rglob("*.ckpt"))  # the other layout's
    across = _module(tiny_sd_path, flat=resume_flat)
    _fit(across, tmp_path / "across", max_steps=4, ckpt_path=str(checkpoint))
    same = _module(tiny_sd_path, flat=not resume_flat)
    _fit(same, tmp_path / "same", max_steps=4, ckpt_path=str(checkpoint))
    moved = [(a - b).abs().max() for a, b in zip(lora_state_dict(same.unet).values(),
                                                 lora_state_dict(flat.unet).values())]
    assert max(moved) > 0  # steps 3 and 4 trained
    _assert_same_lora(across, same, 0.0)


class _ReplayedBackward(torch.autograd.Function):
    """A backward that, like a CUDA graph's replay, writes its weight gradient into one buffer it reuses every call
    and hands that buffer to autograd (which keeps it as the gradient itself: no copy)."""

    @staticmethod
    def forward(ctx, x, weight, buffer):
        ctx.save_for_backward(x)
        ctx.buffer = buffer
        return x @ weight

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        ctx.buffer.copy_(x.t() @ grad)
        return None, ctx.buffer.detach(), None


class _Regression(LatentTrainingModule):
    def __init__(self, replayed: bool, flat: bool):
        super().__init__()
        torch.manual_seed(0)
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(3, 2)) for _ in range(2)])
        self.buffers_ = [torch.zeros(3, 2) for _ in self.weights]
        self.replayed, self.flat_parameters = replayed, flat
        self.schedule = NoiseSchedule(alphas_cumprod=torch.linspace(0.99, 0.01, 10))
        self.optimizer_factory = lambda p: torch.optim.SGD(p, lr=0.1)
        self.lr_scheduler_factory, self.null_context = None, None

    def backward_reuses_buffers(self) -> bool:
        return self.replayed

    def training_step(self, batch, batch_idx):
        x, y = batch
        outputs = [(_ReplayedBackward.apply(x, w, b) if self.replayed else x @ w)
                   for w, b in zip(self.weights, self.buffers_)]
        return sum(((out - y) ** 2).mean() for out in outputs)


@pytest.mark.parametrize("flat", [True, False])
def test_accumulated_gradients_survive_a_backward_that_reuses_its_output_buffers(flat):
    """Under accumulate_grad_batches=2 a replayed (graphed) backward's reused gradient buffers must not be overwritten
    by the next micro-batch before it adds to them: the weights end as with an ordinary backward."""
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, generator=generator), torch.randn(4, 2, generator=generator)) for _ in range(4)]

    def trained(replayed: bool) -> list[torch.Tensor]:
        module = _Regression(replayed, flat)
        L.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False).fit(module, DataLoader(data, batch_size=None))
        return [w.detach().clone() for w in module.weights]

    for replayed, ordinary in zip(trained(True), trained(False)):
        torch.testing.assert_close(replayed, ordinary)
