"""Regional ``torch.compile``: each repeated block of a network compiled in place, so blocks of one shape share their
compiled code and compiling takes a fraction of a whole-model compile (SD1.5's UNet: 167 s whole, issue 10).

The compiled blocks keep their modules' parameters, so CUDA graphs captured around them (``methods/cuda_graphs.py``)
replay the compiled kernels and still read the weights in place. Inductor's cache (``TORCHINDUCTOR_CACHE_DIR``,
by default under the system's temporary folder) makes a second run on the same machine compile from the cache.
"""

from __future__ import annotations

import torch


def _allow_variants(count: int) -> None:
    # one compiled function serves every block of a class; each shape, grad mode and caller adds a variant
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.7
    setattr(config, limit, max(getattr(config, limit), count))


def compile_unet_blocks(unet: torch.nn.Module) -> int:
    """``torch.compile`` every transformer and ResNet block in place; returns how many (regional compilation)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    blocks = [m for m in unet.modules() if isinstance(m, (BasicTransformerBlock, ResnetBlock2D))]
    # the blocks of one class share one compiled function per shape and role (teacher, target, student): SD1.5
    # needs more than dynamo's default of 8 variants per function before it gives up and runs the rest eagerly
    _allow_variants(64)
    for block in blocks:
        block.compile()
    return len(blocks)


def compile_vae_decoder(vae: torch.nn.Module) -> None:
    """``torch.compile`` the VAE decoder in place, whole: one call per drawn batch, and its full-resolution
    GroupNorm + SiLU pairs outside the blocks (norm_out, conv_act) are memory-bound kernels compilation can fuse."""
    vae.decoder.compile()
