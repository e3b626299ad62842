"""LoRA adapters on the SD UNet (peft): add, cast, switch off for the teacher, save and load, export.

The adapter is always peft's ``"default"`` adapter, which is what ``UNet2DConditionModel.add_adapter``
creates. Exported files use diffusers' LoRA format with the adapter config in the safetensors metadata,
so ``pipe.load_lora_weights(folder)`` rebuilds the same ``lora_alpha / r`` scale.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor

from cm_lightning.errors import UserError

ADAPTER = "default"

# The diffusers LCM-LoRA script's targets: attention, feed-forward, resnet convs, resampling, time embedding.
DEFAULT_TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)


def add_lora(
    unet: UNet2DConditionModel,
    *,
    rank: int = 64,
    alpha: float = 64,
    dropout: float = 0.0,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
) -> int:
    """Freeze the UNet and add a LoRA adapter (scale ``alpha / rank``); returns the number of trainable params.

    ``init_lora_weights="gaussian"`` as in diffusers' LCM script: A is Gaussian, B is zero, so the adapted
    UNet starts out equal to the base UNet.
    """
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    unet.add_adapter(config, adapter_name=ADAPTER)
    unet._cm_lora_layers = _find_lora_layers(unet)  # listed once: adapters_disabled switches them every teacher call
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def cast_for_training(unet: UNet2DConditionModel, frozen_dtype: torch.dtype) -> None:
    """Frozen params (and buffers) to ``frozen_dtype``; trainable (LoRA) params stay float32 for the optimizer."""
    unet.to(frozen_dtype)
    cast_training_params(unet, dtype=torch.float32)


@contextmanager
def adapters_disabled(unet: UNet2DConditionModel) -> Iterator[UNet2DConditionModel]:
    """The base UNet (the teacher) inside the block, for calls without gradients; each layer's previous on/off state
    is restored after, even on an exception.

    Only the layers' on/off flag is switched. diffusers' ``disable_adapters``/``enable_adapters`` walk every module of
    the UNet and have peft flip ``requires_grad`` on every adapter weight, each way: ~16 ms of host time a switch
    pair at SD1.5 size on a CPU, inside every training step's teacher call (0.6 ms for the flags). Under no_grad
    ``requires_grad`` changes nothing, and both forwards (peft's and ``_merged_forward``) read the flag."""
    layers = getattr(unet, "_cm_lora_layers", None) or _find_lora_layers(unet)
    if not layers:
        raise ValueError("the UNet has no LoRA adapter: call add_lora first")
    previous = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield unet
    finally:
        for layer, flag in zip(layers, previous):
            layer._disable_adapters = flag


def _find_lora_layers(unet: torch.nn.Module) -> list[BaseTunerLayer]:
    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, Tensor]:
    """The adapter's weights in peft's key format (``...to_q.lora_A.weight``), for our own checkpoints."""
    return get_peft_model_state_dict(unet, adapter_name=ADAPTER)


def load_lora_state_dict(unet: UNet2DConditionModel, state: dict[str, Tensor]) -> None:
    """Load weights from :func:`lora_state_dict` into a UNet that has the same adapter (rank and targets).

    A checkpoint that does not fit (other rank, other targets) raises UserError before anything is changed.
    """
    expected = {k: tuple(v.shape) for k, v in lora_state_dict(unet).items()}
    given = {k: tuple(v.shape) for k, v in state.items()}
    if given != expected:
        missing = sorted(expected.keys() - given.keys())
        extra = sorted(given.keys() - expected.keys())
        reshaped = sorted(k for k in expected.keys() & given.keys() if expected[k] != given[k])
        example = (missing + extra + reshaped)[0]
        raise UserError(
            f"LoRA checkpoint does not fit this UNet's adapter: {len(missing)} missing, {len(extra)} unexpected, "
            f"{len(reshaped)} reshaped tensors (e.g. {example}); check lora rank and targets"
        )
    set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)


def lora_config_of(unet: UNet2DConditionModel) -> dict:
    """The adapter's rank, alpha, dropout and sorted target modules, for model cards and logs."""
    config = unet.peft_config[ADAPTER]
    return {
        "rank": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "target_modules": sorted(config.target_modules),
    }


def save_lora_diffusers(
    unet: UNet2DConditionModel,
    folder: str | Path,
    *,
    weight_name: str = "pytorch_lora_weights.safetensors",
) -> Path:
    """Write the adapter as a diffusers LoRA file that ``pipe.load_lora_weights(folder)`` loads; returns its path.

    Keys are peft's (``unet.<module>.lora_A.weight``), as diffusers' LCM-LoRA script saves them.
    ``convert_state_dict_to_diffusers`` is not used: it renames only the attention keys (``to_q.lora.down``),
    and diffusers' loader, seeing ``lora_A`` keys elsewhere, then silently skips those attention layers.
    The peft config goes into the file's metadata (``unet_lora_adapter_metadata``): without it diffusers
    would assume ``lora_alpha == rank`` and apply the wrong scale whenever they differ.
    """
    state = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(unet).items()}
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        save_directory=str(folder),
        unet_lora_layers=state,
        weight_name=weight_name,
        safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict(),
    )
    return Path(folder) / weight_name


# ---------------------------------------------------------------------------------------------- merged forward
LORA_FORWARDS = ("merged", "merged_fused", "merged_dense_backward", "peft")


def use_merged_lora_forward(unet: torch.nn.Module, low_rank_backward: bool = True, fused_merge: bool = False) -> int:
    """Run every LoRA Linear/Conv2d as ONE base-shaped op on ``W + scale * B @ A``, rebuilt on each call.

    peft's own forward adds ``B(A(x)) * scale`` beside the base op: at SD1.5 size its small rank-r matmuls and
    convolutions, their backward and the extra adds roughly double the cost of a UNet call (issue 10's
    calibration: 52 vs 26 ms at batch 1, 56 vs 31 ms at batch 8). Rebuilding the weight costs one small matmul
    and one pass over W per layer. The backward (``low_rank_backward``, :class:`_MergedLora`) computes the input's
    gradient through W' and the gradients of A and B through the rank-r factors, as peft's unmerged layer does;
    without it autograd forms the full-size gradient of W' (as costly as the forward's matmul) and folds it into A
    and B. Either way the result is the same function with the same gradients (tests pin both to peft). Layers with
    dropout, other LoRA variants, merged or switched-off adapters and mixed-adapter batches keep peft's path.
    ``fused_merge`` (with the rank-r backward) rebuilds W' as one GEMM in the base weights' dtype,
    ``addmm(W, B, A, alpha=scale)``, instead of a float32 B A, a scale, a cast and an add: one pass over W instead
    of about six (measured at SD1.5 size: -3.5 ms in each LoRA phase of a CD step, benchmarks/speed.md session 7; the
    training default, ``lora_forward=merged_fused``); A and B are rounded to that dtype first. Returns the layers
    switched.
    """
    from peft.tuners.lora import layer as lora_layers

    switched = 0
    for module in unet.modules():
        if isinstance(module, (lora_layers.Linear, lora_layers.Conv2d)) and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module._low_rank_backward = low_rank_backward
            module._fused_merge = fused_merge
            module.forward = types.MethodType(_merged_forward, module)
            switched += 1
    return switched


def _merged_forward(layer, x: Tensor, *args, **kwargs) -> Tensor:
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if (layer.disable_adapters or layer.merged or kwargs.get("adapter_names") is not None or args
            or any(a in layer.lora_variant or not isinstance(layer.lora_dropout[a], torch.nn.Identity)
                   for a in adapters)):
        return layer._peft_forward(x, *args, **kwargs)
    base = layer.get_base_layer()
    if layer._low_rank_backward and len(adapters) == 1 and _low_rank_fits(layer, base, adapters[0], x):
        adapter = adapters[0]
        conv = None if isinstance(base, torch.nn.Linear) else (base.stride, base.padding, base.dilation)
        return _MergedLora.apply(x, base.weight, base.bias, layer.lora_A[adapter].weight,
                                 layer.lora_B[adapter].weight, layer.scaling[adapter], conv, layer._fused_merge)
    weight = base.weight
    for adapter in adapters:
        weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
    if isinstance(base, torch.nn.Linear):
        return torch.nn.functional.linear(x, weight, base.bias)
    return base._conv_forward(x, weight, base.bias)


def _low_rank_fits(layer, base, adapter: str, x: Tensor) -> bool:
    """Whether :class:`_MergedLora` computes this layer: a frozen base, plain Linear (W stored out x in) or Conv2d
    (one group, zero padding, B a 1x1 conv), input in the weight's dtype (outside autocast, as training runs)."""
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return False
    if x.dtype != base.weight.dtype or torch.is_autocast_enabled(x.device.type):
        return False
    if isinstance(base, torch.nn.Linear):
        return not getattr(layer, "fan_in_fan_out", False)
    return (isinstance(base, torch.nn.Conv2d) and base.groups == 1 and base.padding_mode == "zeros"
            and isinstance(base.padding, tuple) and tuple(base.dilation) == (1, 1)
            and tuple(layer.lora_B[adapter].weight.shape[2:]) == (1, 1))


class _MergedLora(torch.autograd.Function):
    """y = op(x, W + s B A) + bias for a frozen W, with the backward of peft's unmerged layer.

    The forward is one base-shaped op (Linear or Conv2d: ``conv`` = (stride, padding, dilation), else None). The
    backward gives dx through W' and dA, dB through the rank-r factors: u = A x, dB = s g u^T, v = B^T g,
    dA = s v x^T (convolutions: A's kernel and stride, B 1x1), instead of the full-size dW' = g x^T that autograd
    would form and fold into A and B: at SD1.5 size that dW' costs as much as the forward's matmul.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, conv, fused=False):
        rank = lora_a.shape[0]
        b2, a2 = lora_b.reshape(lora_b.shape[0], rank), lora_a.reshape(rank, -1)
        if fused:  # W + scale B A in one GEMM, in W's dtype
            merged = torch.addmm(weight.reshape(weight.shape[0], -1), b2.to(weight.dtype), a2.to(weight.dtype),
                                 alpha=scale).reshape(weight.shape)
        else:
            merged = weight + ((b2 @ a2).reshape(weight.shape) * scale).to(weight.dtype)
        if conv is None:
            y = torch.nn.functional.linear(x, merged, bias)
        else:
            y = torch.nn.functional.conv2d(x, merged, bias, *conv)
        ctx.save_for_backward(x, merged, lora_a, lora_b)
        ctx.scale, ctx.conv = scale, conv
        return y

    @staticmethod
    def backward(ctx, grad):
        x, merged, lora_a, lora_b = ctx.saved_tensors
        scale, conv = ctx.scale, ctx.conv
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        grad_x = grad_a = grad_b = None
        if conv is None:
            if ctx.needs_input_grad[0]:
                grad_x = grad @ merged
            x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
            grad_b = (g2.t() @ (x2 @ a.t())) * scale  # out x r
            grad_a = ((g2 @ b).t() @ x2) * scale  # r x in
        else:
            stride, padding, dilation = conv
            if ctx.needs_input_grad[0]:
                grad_x = torch.nn.grad.conv2d_input(x.shape, merged, grad, stride, padding, dilation)
            u = torch.nn.functional.conv2d(x, a, None, stride, padding, dilation)  # A's conv: N x r x H' x W'
            grad_b = torch.nn.grad.conv2d_weight(u, lora_b.shape, grad) * scale
            v = torch.nn.functional.conv2d(grad, b.transpose(0, 1))  # B^T g: N x r x H' x W'
            grad_a = torch.nn.grad.conv2d_weight(x, lora_a.shape, v, stride, padding, dilation) * scale
        return grad_x, None, None, grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), None, None, None


def merge_adapter(unet: torch.nn.Module) -> None:
    """Fold the adapter into the base weights, in their dtype (for drawing: no LoRA op is left in a UNet call)."""
    for module in unet.modules():
        if isinstance(module, BaseTunerLayer) and not module.merged:
            module.merge(adapter_names=[ADAPTER])
