"""Model FLOPs for the throughput meter (methods/flops.py): the meta-device count of a UNet call is the real UNet's,
and a training sample costs what each method's step runs."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cm_lightning.diffusion.schedule import NoiseSchedule
from cm_lightning.methods import flops
from cm_lightning.models.components import load_components


def counted(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def test_the_meta_count_of_a_unet_call_is_the_real_unets_with_its_lora(tiny_sd_path):
    from cm_lightning.models.lora import add_lora

    unet = load_components(str(tiny_sd_path)).unet
    add_lora(unet, rank=4, alpha=8)
    forward, forward_backward = flops.unet_call_flops(unet, (4, 16, 16), (77, unet.config.cross_attention_dim))
    x, context = torch.randn(1, 4, 16, 16), torch.randn(1, 77, unet.config.cross_attention_dim)

    def call():
        return unet(x, torch.tensor([500]), encoder_hidden_states=context).sample

    with sdpa_kernel(SDPBackend.MATH):  # attention as matmuls, as on the meta device (the fused CPU kernel is uncounted)
        assert forward == counted(call) > 0
        assert forward_backward == counted(lambda: call().sum().backward())
    assert 2 * forward < forward_backward < 3 * forward  # activation and LoRA gradients; no frozen-weight gradients
    bigger, _ = flops.unet_call_flops(unet, (4, 32, 32), (77, unet.config.cross_attention_dim))
    assert bigger > 3 * forward  # the shapes are the batch's: 4x the pixels, about 4x the convolutions


@pytest.mark.parametrize("method, guidance, teacher_forwards", [
    ("ct", None, 0), ("cd", (1.0, 1.0), 1), ("cd", (2.0, 4.0), 2), ("mcd", (3.0, 3.0), 2)])
def test_a_training_sample_counts_the_teacher_target_and_student(method, guidance, teacher_forwards, tiny_sd_path,
                                                                   monkeypatch):
    from cm_lightning.methods.cd import ConsistencyDistillation
    from cm_lightning.methods.ct import ConsistencyTraining
    from cm_lightning.methods.mcd import MultiBoundaryConsistencyDistillation

    components = load_components(str(tiny_sd_path))
    schedule = NoiseSchedule.from_scheduler_config(components.scheduler_config)
    kinds = {"ct": ConsistencyTraining, "cd": ConsistencyDistillation, "mcd": MultiBoundaryConsistencyDistillation}
    extra = {} if guidance is None else {"guidance_min": guidance[0], "guidance_max": guidance[1]}
    module = kinds[method](components.unet, schedule, lora={"rank": 2, "alpha": 2}, optimizer=torch.optim.AdamW,
                           **extra)
    monkeypatch.setattr(flops, "unet_call_flops", lambda unet, latent, context: (1000, 2500))
    batch = {"latents": torch.zeros(3, 4, 16, 16), "text_embeds": torch.zeros(3, 77, 32)}
    assert flops.teacher_forwards_per_sample(module) == teacher_forwards
    assert flops.training_flops_per_sample(module, batch) == (teacher_forwards + 1) * 1000 + 2500


def test_the_peak_is_the_dense_one_for_an_h200_and_lightnings_elsewhere(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert flops.peak_flops(torch.device("cuda"), torch.bfloat16) == 989.4e12  # Lightning's table lacks the name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert flops.peak_flops(torch.device("cuda"), torch.bfloat16) == 312e12  # Lightning's table
    assert flops.peak_flops(torch.device("cpu"), torch.float32) is None  # no CPU peak: FLOP/s without MFU


def test_the_flop_rate_counts_every_batch_when_the_monitor_updates_only_on_some():
    """flops_per_batch is one batch's: an update after 3 batches adds 3 batches' FLOPs (a monitor that reads the clock
    only on logging steps); updated every batch, it is Lightning's own rate."""
    from cm_lightning.loggers import PerBatchFlops

    sparse, dense = PerBatchFlops(window_size=2), PerBatchFlops(window_size=4)
    for batches in (3, 6):  # batches 1-3 then 4-6, one second each
        sparse.update(time=batches, batches=batches, samples=2 * batches, flops=100)
    for batches in (3, 4, 5, 6):
        dense.update(time=batches, batches=batches, samples=2 * batches, flops=100)
    assert sparse.compute()["device/flops_per_sec"] == dense.compute()["device/flops_per_sec"] == 100.0
    sparse.reset()
    sparse.update(time=1, batches=1, samples=2, flops=100)
    sparse.update(time=2, batches=2, samples=4, flops=100)
    assert sparse.compute()["device/flops_per_sec"] == 100.0  # counted from 0 again after a reset
