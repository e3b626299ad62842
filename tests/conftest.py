"""Shared fixtures: the tiny SD1.5-layout model that stands in for the real one in tests."""

from pathlib import Path

import pytest

from cm_lightning.models.components import SDComponents, load_components
from cm_lightning.models.tiny import ensure_tiny_sd


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny diffusers-layout SD folder (32 px images, 16x16 latents), built once per test session."""
    return ensure_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "model")


@pytest.fixture
def tiny_components(tiny_sd_path: Path) -> SDComponents:
    """A fresh load of the tiny model's parts (float32), free to modify in a test."""
    return load_components(str(tiny_sd_path))
