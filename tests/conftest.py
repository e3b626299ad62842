"""Shared fixtures (the only place for them: no test module imports another): the real configs' folder, the tiny
SD1.5-layout model that stands in for the real one, a run folder with random LoRA weights, toy frozen encoders, the
shipped shapes judge."""

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cm_lightning.models.components import SDComponents, load_components
from cm_lightning.models.tiny import ensure_tiny_sd

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(scope="session")
def conf_dir() -> Path:
    """The configs users run (``conf/``): tests compose these, overridden to run fast on a CPU."""
    return CONF


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny diffusers-layout SD folder (32 px images, 16x16 latents), built once per test session."""
    return ensure_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "model")


@pytest.fixture
def tiny_components(tiny_sd_path: Path) -> SDComponents:
    """A fresh load of the tiny model's parts (float32), free to modify in a test."""
    return load_components(str(tiny_sd_path))


@pytest.fixture
def lora_unet(tiny_sd_path: Path):
    """A factory ``make(dropout=0.0)`` for the tiny model's UNet with a peft LoRA adapter (rank 4, alpha 8) whose
    weights are random and non-zero (B too), so the adapter changes the output."""
    from cm_lightning.models.lora import add_lora

    def make(dropout: float = 0.0):
        unet = load_components(str(tiny_sd_path)).unet
        add_lora(unet, rank=4, alpha=8, dropout=dropout)
        generator = torch.Generator().manual_seed(0)
        for param in unet.parameters():
            if param.requires_grad:
                param.data = torch.randn(param.shape, generator=generator) * 0.05
        return unet

    return make


@pytest.fixture
def trained_run(tiny_sd_path: Path, tmp_path: Path):
    """A factory ``make(method, sampler, sample_steps=4, num_solver_steps=50, edges=None)`` for a run folder as
    train.py writes it (``tmp_path / "run"``), with random (non-zero) LoRA weights standing in for trained ones
    (rank 4, alpha 8: alpha != rank, so a dropped lora_alpha changes what is drawn)."""
    from cm_lightning.models.lora import add_lora, save_lora_diffusers
    from cm_lightning.pipeline import RunInfo

    lora = {"rank": 4, "alpha": 8, "dropout": 0.0}

    def make(method: str, sampler: str, sample_steps: int = 4, num_solver_steps: int = 50,
             edges: list[int] | None = None) -> Path:
        components = load_components(str(tiny_sd_path))
        add_lora(components.unet, **lora)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in components.unet.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        folder = tmp_path / "run"
        save_lora_diffusers(components.unet, folder / "lora")
        options = {"num_solver_steps": num_solver_steps, **({"edges": edges} if edges is not None else {})}
        RunInfo(method, sampler, sample_steps, options, lora, str(tiny_sd_path)).write(folder / "lora")
        return folder

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one thread: on 2 shared cores, 2 threads made the judge's tests up to 40x slower (threads
    waiting on each other), while 1 thread costs little on an idle machine. Modules opt in with usefixtures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def judge():
    """The shipped shapes judge, frozen."""
    from cm_lightning.shapes.judge import load_judge

    return load_judge()


class FakeEncoders:
    """The FrozenEncoders interface at toy size: a fixed random strided conv as the VAE, a hash-seeded
    embedding per prompt as the text encoder. Counts calls; can fail on the Nth image batch."""

    scaling_factor = 0.5
    vae_scale = 4

    def __init__(self, dim: int = 8, tag: str = "fake-v1", fail_on_call: int | None = None):
        self.dim, self.tag, self.fail_on_call = dim, tag, fail_on_call
        self.device = torch.device("cpu")
        g = torch.Generator().manual_seed(0)
        self.weight = torch.randn(8, 3, self.vae_scale, self.vae_scale, generator=g)
        self.image_calls = self.prompt_calls = 0

    def encode_images(self, pixels):
        self.image_calls += 1
        if self.image_calls == self.fail_on_call:
            raise RuntimeError("simulated crash while encoding")
        mean, log_std = F.conv2d(pixels, self.weight * 0.1, stride=self.vae_scale).chunk(2, dim=1)
        return mean * self.scaling_factor, 0.05 + log_std.sigmoid() * self.scaling_factor

    def encode_prompts(self, prompts):
        self.prompt_calls += 1
        seeds = [int(hashlib.sha256(p.encode()).hexdigest()[:12], 16) for p in prompts]
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return torch.stack([torch.randn(77, self.dim, generator=g) for g in gens])

    def identity(self):
        return {"name": "fake", "tag": self.tag, "dim": self.dim}

    @property
    def calls(self):
        return self.image_calls + self.prompt_calls


@pytest.fixture
def fake_encoders():
    """The :class:`FakeEncoders` class: call it (with its options) for a fresh instance."""
    return FakeEncoders
