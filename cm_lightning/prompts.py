"""Prompt lists: the seed's eight evaluation prompts (the default) or a file of one prompt per line."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import UserError


def seed_prompts() -> list[str]:
    """The seed report's eight prompts ("A sad puppy with large eyes", ...)."""
    return _lines(resources.files("cm_lightning").joinpath("assets/prompts.txt").read_text(encoding="utf-8"))


def read_prompts(prompts: list[str] | str | None = None, prompts_file: str | None = None) -> list[str]:
    """Prompts from a list (or one string), else a file, else the seed's eight."""
    if prompts:
        return [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise UserError(f"prompts_file: '{path}' does not exist")
        found = _lines(path.read_text(encoding="utf-8"))
        if not found:
            raise UserError(f"prompts_file: '{path}' has no prompts (one per line)")
        return found
    return seed_prompts()


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
