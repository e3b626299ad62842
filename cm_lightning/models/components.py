"""Loading the parts of a Stable Diffusion model from a diffusers-layout folder or a cached hub id.

Failures that mean "the user pointed at the wrong thing" (not a model folder, a hub id that is not in
the local cache with no network) become one-line :class:`UserError`s instead of library stack traces.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from transformers import CLIPTextModel, CLIPTokenizer

from cm_lightning.errors import UserError

# What the libraries raise for a missing file, an unreachable or unknown repo, or a malformed repo id.
_LOAD_ERRORS = (OSError, EntryNotFoundError, HFValidationError)


@dataclass
class SDComponents:
    """The parts of an SD1.5-style model. The UNet, VAE and text encoder are in the dtype they were loaded in."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict  # the model's scheduler/scheduler_config.json as a dict
    source: str  # the folder or hub id it came from


def load_components(
    pretrained: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> SDComponents:
    """Load UNet, VAE, text encoder, tokenizer and scheduler config from ``pretrained``.

    ``pretrained`` is a local diffusers folder or a hub id (``owner/name``). A hub id is looked up in the
    local Hugging Face cache first; the network is tried only if it is not there and offline mode is off.
    ``variant`` picks weight files such as ``fp16``; ``dtype`` is the dtype all three networks end up in.
    """
    pretrained = str(pretrained)
    if not pretrained.strip():
        raise UserError("model.pretrained is empty: give a diffusers model folder or a hub id")
    if _looks_like_path(pretrained):
        folder = Path(pretrained).expanduser()
        if not (folder / "unet" / "config.json").is_file():
            raise UserError(
                f"model.pretrained: '{pretrained}' is not a diffusers model folder (no unet/config.json)"
            )
        try:
            return _load(str(folder), pretrained, revision, variant, dtype, local_files_only=True)
        except _LOAD_ERRORS as e:
            raise UserError(
                f"model.pretrained: '{pretrained}' could not be loaded: {_first_line(e)}"
            ) from None
    try:
        return _load(pretrained, pretrained, revision, variant, dtype, local_files_only=True)
    except _LOAD_ERRORS:
        pass  # not (fully) cached: the libraries' message here misleads ("no file named config.json")
    if _offline():
        raise UserError(
            f"model.pretrained: '{pretrained}' is not in the local Hugging Face cache and offline mode is on "
            "(HF_HUB_OFFLINE); pass a local diffusers folder"
        ) from None
    try:
        return _load(pretrained, pretrained, revision, variant, dtype, local_files_only=False)
    except _LOAD_ERRORS as e:
        raise UserError(
            f"model.pretrained: '{pretrained}' is not in the local Hugging Face cache and the hub could not be "
            f"reached or has no such model ({_first_line(e)}); pass a local diffusers folder"
        ) from None


def _load(
    where: str,
    source: str,
    revision: str | None,
    variant: str | None,
    dtype: torch.dtype,
    *,
    local_files_only: bool,
) -> SDComponents:
    common = {"revision": revision, "local_files_only": local_files_only}
    weights = {**common, "variant": variant}
    return SDComponents(
        unet=UNet2DConditionModel.from_pretrained(where, subfolder="unet", torch_dtype=dtype, **weights),
        vae=AutoencoderKL.from_pretrained(where, subfolder="vae", torch_dtype=dtype, **weights),
        text_encoder=CLIPTextModel.from_pretrained(where, subfolder="text_encoder", dtype=dtype, **weights),
        tokenizer=CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", **common),
        scheduler_config=dict(DDIMScheduler.load_config(where, subfolder="scheduler", **common)),
        source=source,
    )


def _looks_like_path(pretrained: str) -> bool:
    """A path, not a hub id: starts with / . ~, has more than one '/', or its first part exists on disk."""
    if pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1:
        return True
    return Path(pretrained).exists() or Path(Path(pretrained).parts[0]).exists()


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so a later setting counts.
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return env or hub_constants.HF_HUB_OFFLINE


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def save_model_folder(base: str | Path, unet: UNet2DConditionModel, out: str | Path,
                      dtype: torch.dtype = torch.float16) -> Path:
    """A diffusers folder: every part of ``base`` (a local folder) but the UNet, which is ``unet`` saved in ``dtype``.

    Written into a temporary sibling and renamed, so an interrupted save never looks like a model.
    """
    import shutil
    import uuid

    base, out = Path(base), Path(out)
    tmp = out.parent / f".{out.name}.saving-{uuid.uuid4().hex[:8]}"
    shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("unet", "*.building-*"))
    copy = type(unet).from_config(unet.config)
    copy.load_state_dict({k: v.detach().cpu() for k, v in unet.state_dict().items()})
    copy.to(dtype).save_pretrained(tmp / "unet")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
