"""Tiny Stable Diffusion models: the SD1.5 classes and folder layout with toy sizes and random weights.

Nothing can be downloaded here, so tests and smoke runs load these through the very code path that
loads SD1.5 (`load_components`, `StableDiffusionPipeline.from_pretrained`). A bigger variant (more
channels and layers) can serve as the teacher of the procedural shapes world.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from cm_lightning.errors import UserError
from cm_lightning.models.tokenizer import DEFAULT_WORDS, MODEL_MAX_LENGTH, write_clip_tokenizer

# SD1.5's noise schedule (its scheduler_config.json), with the DDIM class.
SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
}
SD15_VAE_SCALING_FACTOR = 0.18215
BUILD_RECORD = "tiny_sd_build.json"  # the settings a folder was built with, checked on reuse


@dataclass(frozen=True)
class TinySDSpec:
    """Sizes of a tiny SD model. ``image_size`` is in pixels; the latent is ``image_size // 2**(len(vae_channels)-1)``."""

    image_size: int = 32
    seed: int = 0
    unet_channels: tuple[int, ...] = (32, 64)  # one down/up block per entry; the last has no attention
    layers_per_block: int = 1
    attention_head_dim: int = 8  # diffusers' (legacy) name: SD1.5 uses it as the number of heads
    norm_num_groups: int = 8
    text_hidden_size: int = 32
    text_layers: int = 2
    text_heads: int = 4
    vae_channels: tuple[int, ...] = (32, 64)
    prediction_type: str = "epsilon"
    # "text" adds a pooled text embedding to the timestep embedding (diffusers' TextTimeEmbedding, as Kandinsky
    # does): a global conditioning path beside cross-attention, which a few-million-parameter UNet needs to
    # learn its prompts in minutes. SD1.5 itself uses None.
    addition_embed_type: str | None = None

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_scale

    def check(self) -> None:
        """Raise UserError for sizes the architecture cannot take."""
        unet_stride = 2 ** (len(self.unet_channels) - 1)
        if self.image_size % (self.vae_scale * unet_stride):
            raise UserError(
                f"tiny model: image_size {self.image_size} must be divisible by "
                f"{self.vae_scale * unet_stride} (VAE x UNet downsampling)"
            )
        for name in ("unet_channels", "vae_channels"):
            bad = [c for c in getattr(self, name) if c % self.norm_num_groups]
            if bad:
                raise UserError(
                    f"tiny model: {name} {bad} not divisible by norm_num_groups {self.norm_num_groups}"
                )


def build_tiny_sd(folder: str | Path, *, words: tuple[str, ...] = DEFAULT_WORDS, **sizes) -> Path:
    """Write a diffusers-layout SD folder (unet, vae, text_encoder, tokenizer, scheduler, model_index.json).

    ``sizes`` are :class:`TinySDSpec`'s fields (its defaults for any left out); ``words`` become single tokens.
    Weights are random and depend only on ``seed``. The folder is built in a temporary sibling and renamed
    into place, so a build that is interrupted never looks complete. ``folder`` must not exist yet (or be empty).
    """
    spec = _spec(sizes)
    spec.check()
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise UserError(
            f"tiny model: '{folder}' already exists and is not empty; remove it or pick another folder"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.building-{uuid.uuid4().hex[:8]}"
    try:
        _write_model(tmp, spec, words)
        if folder.exists():
            folder.rmdir()  # empty, checked above
        os.rename(tmp, folder)
    except OSError:
        # Another process may have finished the same folder first: use theirs.
        if not (folder / "model_index.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def ensure_tiny_sd(folder: str | Path, **kwargs) -> Path:
    """Return ``folder``, building it with :func:`build_tiny_sd` unless a complete build is already there.

    A complete folder built with other settings raises UserError instead of being silently reused.
    """
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        return build_tiny_sd(folder, **kwargs)
    words = kwargs.pop("words", DEFAULT_WORDS)
    wanted = _record(_spec(kwargs), words)
    record = folder / BUILD_RECORD
    built = json.loads(record.read_text()) if record.is_file() else None
    if built is not None:  # a record from before a field existed was built with that field's default
        built = {**_record(TinySDSpec(), words), **built}
    if built != wanted:
        raise UserError(
            f"tiny model: '{folder}' was built with other settings than {kwargs or 'the defaults'}; "
            "delete it to rebuild"
        )
    return folder


def _spec(sizes: dict) -> TinySDSpec:
    """The spec from keyword sizes (lists from a config become tuples)."""
    return TinySDSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in sizes.items()})


def _record(spec: TinySDSpec, words: tuple[str, ...]) -> dict:
    """The build's settings as JSON data (tuples become lists), for comparing with the saved record."""
    return json.loads(json.dumps({**asdict(spec), "words": list(words)}))


def _write_model(root: Path, spec: TinySDSpec, words: tuple[str, ...]) -> None:
    write_clip_tokenizer(root / "tokenizer", words)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    # fork_rng: building a model must not move the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        _unet(spec).save_pretrained(root / "unet")
        torch.manual_seed(spec.seed + 1)
        _vae(spec).save_pretrained(root / "vae")
        torch.manual_seed(spec.seed + 2)
        _text_encoder(spec, tokenizer).save_pretrained(root / "text_encoder")
    DDIMScheduler(**{**SD15_SCHEDULER, "prediction_type": spec.prediction_type}).save_pretrained(
        root / "scheduler"
    )
    (root / "model_index.json").write_text(json.dumps(_model_index(), indent=2))
    (root / BUILD_RECORD).write_text(json.dumps(_record(spec, words), indent=2))


def _unet(spec: TinySDSpec) -> UNet2DConditionModel:
    n = len(spec.unet_channels)
    return UNet2DConditionModel(
        sample_size=spec.latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.layers_per_block,
        attention_head_dim=spec.attention_head_dim,
        cross_attention_dim=spec.text_hidden_size,
        norm_num_groups=spec.norm_num_groups,
        addition_embed_type=spec.addition_embed_type,
        # diffusers' default of 64 pooling heads needs a text width of at least 64 (the shapes teacher's)
        addition_embed_type_num_heads=min(64, spec.text_hidden_size),
    )


def _vae(spec: TinySDSpec) -> AutoencoderKL:
    n = len(spec.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=spec.norm_num_groups,
        sample_size=spec.image_size,
        scaling_factor=SD15_VAE_SCALING_FACTOR,
    )


def _text_encoder(spec: TinySDSpec, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden_size,
        intermediate_size=4 * spec.text_hidden_size,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=spec.text_hidden_size,
        hidden_act="quick_gelu",  # as SD1.5's CLIP ViT-L/14 text tower
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _model_index() -> dict:
    """SD1.5's model_index.json, with the safety checker and feature extractor left out (null)."""
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
