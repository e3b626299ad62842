"""Regional ``torch.compile``: each repeated block of a network compiled in place, so blocks of one shape share their
compiled code and compiling takes a fraction of a whole-model compile (SD1.5's UNet: 167 s whole, issue 10).

The compiled blocks keep their modules' parameters, so CUDA graphs captured around them (``methods/cuda_graphs.py``)
replay the compiled kernels and still read the weights in place. Inductor's cache (``TORCHINDUCTOR_CACHE_DIR``,
by default under the system's temporary folder) makes a second run on the same machine compile from the cache.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

# compile_blocks=auto compiles for runs of at least this many planned optimizer steps. Measured on an H200 (SD1.5,
# CD, batch 8; benchmarks/speed.md session 9): the blocks compiled with channels-last save 26-35 ms a step and cost
# ~250-320 s more before the first step on a cold Inductor cache (~70 s from a warm one): break-even ~7,000-12,500
# steps cold, ~2,000-2,700 warm.
AUTO_COMPILE_MIN_STEPS = 10_000


def compiles_blocks(setting: bool | str, device_type: str, max_steps: int, measured_setup: bool) -> bool:
    """Whether training compiles the UNet's blocks: ``compile_blocks`` as given, or for ``auto`` on a GPU, for runs of
    at least ``AUTO_COMPILE_MIN_STEPS`` planned steps (``max_steps``; -1, a run bounded by time alone, does not
    count) in the measured setup (``measured_setup``: one GPU, the UNet calls replayed from CUDA graphs; not under
    gradient checkpointing, an EMA target or DDP, where the compile's gain is not measured)."""
    if setting != "auto":
        return bool(setting)
    return device_type == "cuda" and max_steps >= AUTO_COMPILE_MIN_STEPS and measured_setup


def _allow_variants(count: int) -> None:
    # one compiled function serves every block of a class; each shape, grad mode and caller adds a variant
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.7
    setattr(config, limit, max(getattr(config, limit), count))


def compile_unet_blocks(unet: torch.nn.Module) -> int:
    """``torch.compile`` every transformer and ResNet block in place; returns how many (regional compilation).

    The transformer region is the whole ``Transformer2DModel`` (its GroupNorm, the NCHW <-> token permutes, proj_in
    and proj_out around the attention blocks), not only diffusers' ``_repeated_blocks`` (``BasicTransformerBlock``):
    those outer ops are memory-bound glue too, and in channels-last an eager GroupNorm copies back to NCHW. SD1.5 has
    one attention block per transformer, so the count of compiled shapes is the same.
    """
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    blocks = [m for m in unet.modules() if isinstance(m, (Transformer2DModel, ResnetBlock2D))]
    # the blocks of one class share one compiled function per shape and role (teacher, target, student): SD1.5
    # needs more than dynamo's default of 8 variants per function before it gives up and runs the rest eagerly
    # static shapes: with dynamo's default, the second block shape of a class recompiles one symbolic-shape graph for
    # every later shape, whose kernels are slower than static ones (and which Inductor failed to lower for CPU)
    _allow_variants(128)
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)


def eager_blocks():
    """Inside: compiled blocks run their eager code. For a training run's sampling (grids, validation): a few calls
    of other shapes, where compiling each new shape would cost far more than it saves. (torch < 2.6 has no stance:
    there the sampling compiles its shapes.)"""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else nullcontext()


def compile_vae_decoder(vae: torch.nn.Module) -> None:
    """``torch.compile`` the VAE decoder in place, whole: one call per drawn batch, and its full-resolution
    GroupNorm + SiLU pairs outside the blocks (norm_out, conv_act) are memory-bound kernels compilation can fuse."""
    vae.decoder.compile()
