"""Options that change when things happen during training: the EMA's update count under gradient accumulation
(the consistency target's EMA and the teacher's) and CT's step-doubling curriculum."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch.utils.data import DataLoader

from cm_lightning.diffusion.grid import curriculum_num_steps
from cm_lightning.diffusion.schedule import NoiseSchedule
from cm_lightning.methods import ConsistencyDistillation
from cm_lightning.methods.ema import EmaWeights
from cm_lightning.shapes.teacher import TeacherTraining

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet_and_schedule(tiny_sd_path):
    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd_path / "unet"))
    config = DDIMScheduler.load_config(str(tiny_sd_path), subfolder="scheduler")
    return unet, NoiseSchedule.from_scheduler_config(config)


def batches(count: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    items = [{"latents": torch.randn(4, 16, 16, generator=generator),
              "text_embeds": torch.randn(77, 32, generator=generator)} for _ in range(count)]
    return DataLoader(items, batch_size=2)


def fit(module, max_steps: int, accumulate: int, callbacks=()) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, callbacks=list(callbacks))
    trainer.fit(module, batches())
    return trainer


def distillation(tiny_sd_path, target: str) -> ConsistencyDistillation:
    unet, schedule = tiny_unet_and_schedule(tiny_sd_path)
    return ConsistencyDistillation(unet, schedule, lora={"rank": 4, "alpha": 4}, target=target,
                                   optimizer=lambda p: torch.optim.SGD(p, lr=1.0), gradient_checkpointing=False,
                                   guidance_min=1.0, guidance_max=1.0)


def test_consistency_ema_updates_once_per_optimizer_step(tiny_sd_path, monkeypatch):
    """decay 0.95 per optimizer step as configured, not 0.95^k under accumulate_grad_batches=k."""
    module = distillation(tiny_sd_path, "ema")
    seen: list[int] = []
    update = module.ema.update
    monkeypatch.setattr(module.ema, "update", lambda: (seen.append(module.global_step), update()))
    trainer = fit(module, max_steps=3, accumulate=2)
    assert trainer.global_step == 3
    assert seen == [1, 2, 3]  # after each optimizer step, with the weights it produced


def test_ema_target_trains_and_starts_as_the_student_target(tiny_sd_path):
    """The EMA starts equal to the student, so the first step's update is the same with either target (the swap
    into the EMA weights, made after the student's forward pass, must leave its backward pass intact)."""
    before, after = {}, {}
    for target in ("ema", "student"):
        L.seed_everything(0)
        module = distillation(tiny_sd_path, target)
        before[target] = [p.detach().clone() for p in module.trainable_parameters()]
        fit(module, max_steps=1, accumulate=1)
        after[target] = [p.detach().clone() for p in module.trainable_parameters()]
    assert max((a - b).abs().max() for a, b in zip(after["student"], before["student"])) > 1e-4  # it did train
    for ema, student in zip(after["ema"], after["student"]):
        torch.testing.assert_close(ema, student, rtol=0, atol=1e-6)


class ZeroEma(L.Callback):
    def on_train_start(self, trainer, module) -> None:
        with torch.no_grad():
            for param in module.ema_unet.parameters():
                param.zero_()


def test_teacher_ema_updates_once_per_optimizer_step(tiny_sd_path):
    """lr 0 keeps the weights w fixed and the EMA starts at 0, so after updates with decays d_i it is
    (1 - prod d_i) w: two optimizer steps (warm-up decays 2/11 and 3/12) whatever the accumulation."""
    unet, schedule = tiny_unet_and_schedule(tiny_sd_path)
    module = TeacherTraining(unet, schedule, optimizer=lambda p: torch.optim.SGD(p, lr=0.0), caption_dropout=0.0)
    fit(module, max_steps=2, accumulate=2, callbacks=[ZeroEma()])
    factor = 1 - (2 / 11) * (3 / 12)
    for ema, weight in zip(module.ema_unet.parameters(), module.unet.parameters()):
        torch.testing.assert_close(ema, factor * weight, rtol=1e-5, atol=1e-7)


def test_curriculum_reaches_every_stage_and_its_end_in_equal_shares():
    """10 -> 50 over 400 steps: 10, 20, 40, 50 from steps 0, 100, 200, 300 (the end is trained a quarter of the
    time, not only on the last step); a power-of-two ratio keeps iCT's own schedule."""
    assert [curriculum_num_steps(s, 400, 10, 50) for s in range(0, 400, 50)] == [10, 10, 20, 20, 40, 40, 50, 50]
    assert curriculum_num_steps(299, 400, 10, 50) == 40 and curriculum_num_steps(300, 400, 10, 50) == 50
    assert [curriculum_num_steps(s, 400, 10, 80) for s in range(0, 400, 50)] == [10, 10, 20, 20, 40, 40, 80, 80]
    assert [curriculum_num_steps(s, 300, 25, 50) for s in (0, 149, 150, 299)] == [25, 25, 50, 50]
    assert curriculum_num_steps(0, 400, 50, 50) == 50 and curriculum_num_steps(10**6, 400, 10, 50) == 50


def test_ema_moves_a_fraction_one_minus_decay_towards_the_weights():
    param = torch.nn.Parameter(torch.full((3,), 2.0))
    ema = EmaWeights([param], decay=0.9)
    with torch.no_grad():
        param.fill_(12.0)
    ema.update()
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 3.0))  # 2 + 0.1 * (12 - 2)
    with ema.swapped():
        assert torch.equal(param.detach(), torch.full((3,), 3.0))
    assert torch.equal(param.detach(), torch.full((3,), 12.0))
