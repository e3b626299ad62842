"""A LoRA given as a local folder or a Hugging Face Hub repo id: made a local folder before anything reads it."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UserError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def local_lora(ref: str | Path) -> Path:
    """``ref`` as a local path: itself when it exists, else a Hub repo id (``user/name``) downloaded (or found in
    the local Hugging Face cache). A run folder, its ``lora/`` folder, a ``.ckpt`` and an export all work."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if not _REPO_ID.match(str(ref)):
        raise UserError(f"run={ref}: no such file or folder (nor a Hub repo id like user/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(ref), allow_patterns=["*.json", "*.safetensors", "*.yaml", "*.md",
                                                                   "scheduler/*"]))
    except Exception as error:  # noqa: BLE001 - hub errors (offline, 404, auth) are many types; one line each
        raise UserError(f"run={ref}: not a local path, and the Hub repo could not be fetched "
                        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
