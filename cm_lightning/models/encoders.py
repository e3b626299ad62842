"""The frozen VAE and text encoder: images and prompts in, latents and embeddings out, and back to pixels.

Precision: SD1.5's VAE overflows in float16 (NaN/inf latents and black images), so these run in
float32 or bfloat16 only. Outputs are always float32, whatever the compute dtype.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from cm_lightning.errors import UserError
from cm_lightning.models.components import SDComponents

log = logging.getLogger(__name__)

_SAMPLES_PER_TENSOR = 64  # values of each tensor that go into the weight fingerprint


class FrozenEncoders:
    """The frozen VAE and text encoder: encode images and prompts for the latent cache, decode latents for samples."""

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        identity_source: str = "",
    ):
        if dtype not in (torch.float32, torch.bfloat16):
            raise UserError(
                f"encoders dtype {dtype} is not supported: SD1.5's VAE overflows in float16; use float32 or bfloat16"
            )
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.identity_source = identity_source
        self.scaling_factor: float = float(vae.config.scaling_factor)
        self.vae_scale: int = 2 ** (len(vae.config.block_out_channels) - 1)
        # the two drawing-time calls as plain tensor functions: a Drawer on a GPU replaces them by CUDA-graph replays
        self.text_forward = self._text_encoder_call
        self.decode_forward = self._vae_decode_call
        self._compiled_encode: Callable | None = None  # see compile_image_encoder
        self._compiled_shape: torch.Size | None = None
        self.to(device)

    @classmethod
    def from_components(cls, c: SDComponents, **kwargs) -> FrozenEncoders:
        """Wrap the VAE, text encoder and tokenizer of ``c``; ``identity_source`` defaults to ``c.source``."""
        kwargs.setdefault("identity_source", c.source)
        return cls(c.vae, c.text_encoder, c.tokenizer, **kwargs)

    def to(self, device: str | torch.device) -> FrozenEncoders:
        """Move both networks to ``device`` (in place, keeping the compute dtype); returns self."""
        self.device = torch.device(device)
        for model in (self.vae, self.text_encoder):
            if model.dtype != self.dtype:  # diffusers warns on any dtype cast, even a no-op one
                model.to(self.dtype)
            model.to(self.device)
        # contiguous, not channels-last: measured on an H200 in bf16 (benchmarks/speed.md), channels-last made the
        # encode at batch 64 1.36x and the decode at batch 1 1.2x slower (its GroupNorms), against cuDNN's hope
        self.memory_format = torch.contiguous_format
        return self

    @torch.inference_mode()
    def encode_images(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Pixels [B, 3, H, W] in [-1, 1] -> posterior (mean, std), each [B, C, H/s, W/s] float32.

        Both are already multiplied by ``scaling_factor``: a latent sample is ``mean + std * noise``.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3 or any(n % self.vae_scale for n in pixels.shape[-2:]):
            raise ValueError(
                f"pixels must be [B, 3, H, W], H and W divisible by {self.vae_scale}: {tuple(pixels.shape)}"
            )
        pixels = pixels.to(self.device, self.dtype, non_blocking=True).contiguous(memory_format=self.memory_format)
        if self._compiled_encode is None or self._compiled_shape not in (None, pixels.shape):
            return self._encode_posterior(pixels)
        if self._compiled_shape is not None:
            return self._compiled_encode(pixels)
        try:  # the first call compiles
            encoded = self._compiled_encode(pixels)
        except Exception as error:  # e.g. no C compiler for Triton: never lose a cache build to a compile
            log.warning("cache: compiling the VAE encoder failed (%s: %s); encoding eagerly",
                        type(error).__name__, (str(error).strip().splitlines() or [""])[0])
            self._compiled_encode = None
            return self._encode_posterior(pixels)
        self._compiled_shape = pixels.shape
        return encoded

    def compile_image_encoder(self) -> None:
        """``torch.compile`` :meth:`encode_images`' VAE call, for a cache build. At 512 px its bias adds, GroupNorms,
        SiLUs and cuDNN's layout transposes are memory-bound passes over full-resolution activations, about 70 % of
        the encoder's GPU time (benchmarks/speed.md); Inductor fuses them. Compiled for the first batch shape it
        sees: other shapes (a build's last, partial batch) run eagerly rather than compile again. A compile that
        fails at the first batch leaves a warning and the eager encode."""
        self._compiled_encode = torch.compile(self._encode_posterior, dynamic=False)
        self._compiled_shape = None

    def _encode_posterior(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        posterior = self.vae.encode(pixels).latent_dist
        return (posterior.mean * self.scaling_factor).float(), (posterior.std * self.scaling_factor).float()

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Prompts -> text encoder last_hidden_state [B, 77, D] float32 (padded to 77 tokens, truncated)."""
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        # No attention mask: SD1.5 was trained on the embeddings of the padded sequence.
        # to a GPU as a pinned, queued copy: the host does not wait there for the GPU's earlier work (cache build)
        ids = ids.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else ids.to(self.device)
        return self.text_forward(ids).float()

    @torch.inference_mode()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents [B, C, h, w] -> pixels [B, 3, h*s, w*s] float32, clamped to [-1, 1]."""
        pixels = self.decode_forward(latents.to(self.device, self.dtype) / self.scaling_factor)
        return pixels.float().clamp(-1, 1)

    def _text_encoder_call(self, ids: Tensor) -> Tensor:
        return self.text_encoder(ids)[0]

    def _vae_decode_call(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents).sample

    def identity(self) -> dict:
        """JSON-able description that changes when the encoders would give other outputs (for cache keys).

        Holds the source, class names, compute dtype, a sha256 of both configs and the tokenizer's vocabulary,
        and a sha256 over a strided sample of every weight tensor (cheap even for SD1.5).
        """
        configs = {
            "vae": dict(self.vae.config),
            "text_encoder": self.text_encoder.config.to_dict(),
            "tokenizer": {"vocab": self.tokenizer.get_vocab(), "max_length": self.tokenizer.model_max_length},
        }
        config_json = json.dumps(configs, sort_keys=True, default=str)
        return {
            "source": self.identity_source,
            "vae": type(self.vae).__name__,
            "text_encoder": type(self.text_encoder).__name__,
            "tokenizer": type(self.tokenizer).__name__,
            "dtype": str(self.dtype).removeprefix("torch."),
            "config_sha256": hashlib.sha256(config_json.encode()).hexdigest()[:16],
            "weights_sha256": _weights_fingerprint(self.vae, self.text_encoder),
        }


def _weights_fingerprint(*models: torch.nn.Module) -> str:
    """sha256 (16 hex digits) over names, shapes and ~64 evenly spaced values of every parameter."""
    digest = hashlib.sha256()
    for model in models:
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // _SAMPLES_PER_TENSOR)].float().cpu()
            digest.update(f"{name}{tuple(param.shape)}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
