"""Model FLOPs of a training step, for Lightning's ThroughputMonitor: ``train/device/flops_per_sec``, and
``train/device/mfu`` where the device's peak is known (``peak_flops``).

One UNet call is counted once, by torch's ``FlopCounterMode`` on a meta-device UNet built from the model's config
with the run's LoRA (no weights, no memory, no device time), at the first batch's latent and text shapes. On the meta
device attention runs as its matmuls, so it is counted on every machine (the CPU's fused attention kernel is not
in torch's FLOP table). A training sample costs
  - the teacher's forward: 2 with CFG (conditional and unconditional, one doubled batch), 1 at g = 1, 0 for CT (its
    x_lo is the oracle's: no network);
  - the target's forward: 1;
  - the student's forward and backward, counted as such (the backward's activation gradients through the frozen
    UNet plus the LoRA weights' gradients: about 2.2 forwards on the tiny model).
These are model FLOPs, with the adapter counted as peft computes it (x A^T B^T beside the frozen weight's matmul):
what the merged-LoRA forward or gradient checkpointing's recomputation add is not counted, as MFU's convention is.
"""

from __future__ import annotations

import copy

import torch

# Dense peak FLOP/s per device for chips Lightning's table lacks or lists at their sparse peak: the H200 is the H100
# SXM's GH100 compute (NVIDIA's datasheets: 989 TFLOP/s dense bf16/fp16, 495 tf32, 67 fp32); Lightning knows only
# "H200 SXM1"/"NVL1" names, at 2x (with sparsity), and not the plain "NVIDIA H200".
DENSE_PEAKS = {"h200": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tfloat32": 494.7e12,
                        torch.float32: 66.9e12}}


def unet_call_flops(unet, latent_shape: tuple[int, ...], context_shape: tuple[int, ...]) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of one sample through ``unet`` (a diffusers UNet2DConditionModel, with
    its peft adapters if it has any: their configs are copied, their weights trainable as in training)."""
    from lightning.fabric.utilities.throughput import measure_flops

    with torch.device("meta"):
        meta = type(unet).from_config(unet.config)
        meta.requires_grad_(False)
        for name, config in getattr(unet, "peft_config", {}).items():
            meta.add_adapter(copy.deepcopy(config), adapter_name=name)
    x = torch.empty(1, *latent_shape, device="meta")
    t = torch.full((1,), 500, device="meta", dtype=torch.long)  # any timestep: the cost does not depend on it
    context = torch.empty(1, *context_shape, device="meta")

    def forward() -> torch.Tensor:
        return meta(x, t, encoder_hidden_states=context).sample

    if not any(p.requires_grad for p in meta.parameters()):  # no adapter: the backward still reaches the input
        x.requires_grad_(True)
    return measure_flops(meta, forward), measure_flops(meta, forward, loss_fn=torch.Tensor.sum)


def teacher_forwards_per_sample(module) -> int:
    """UNet forwards per sample that the method's teacher step makes (see the module docstring)."""
    from .cd import TeacherStep

    if not isinstance(module, TeacherStep):
        return 0  # CT: the oracle's DDIM step from the shared noise
    return 1 if module.guidance_min == module.guidance_max == 1.0 else 2


def training_flops_per_sample(module, batch: dict) -> int:
    """Model FLOPs of one training sample of ``module`` (a ConsistencyModule) at ``batch``'s shapes."""
    forward, forward_backward = unet_call_flops(module.unet, tuple(batch["latents"].shape[1:]),
                                                tuple(batch["text_embeds"].shape[1:]))
    return (teacher_forwards_per_sample(module) + 1) * forward + forward_backward  # teacher, target, student


def peak_flops(device: torch.device, dtype) -> float | None:
    """The device's dense peak FLOP/s at ``dtype``: ours for the chips in DENSE_PEAKS, else Lightning's table's (None
    where it has none, e.g. any CPU: then MFU is not logged, FLOP/s is)."""
    from lightning.fabric.utilities.throughput import get_available_flops

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for chip, peaks in DENSE_PEAKS.items():
            if chip in name:
                if dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest":
                    dtype = "tfloat32"
                return peaks.get(dtype)
    return get_available_flops(device, dtype)
