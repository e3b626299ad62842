"""A model ready to draw: SD components, an optional trained LoRA, and the sampler its method needs.

``Drawer`` is what ``sample``, ``compare`` and ``evaluate`` share: prompts in, images out, with the noise
chosen by seed so that rows of a figure (teacher, CT, CD, MCD) start from the same noise.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .diffusion.samplers import Conditioning
from .diffusion.schedule import NoiseSchedule
from .errors import UserError
from .methods.cuda_graphs import CudaGraphNetwork
from .methods.sampler_table import get_sampler
from .methods.sampling import SamplerKind, generate_latents, renoise_generator, unet_network
from .models.compilation import compile_unet_blocks, compile_vae_decoder
from .models.components import SDComponents
from .models.encoders import FrozenEncoders
from .models.lora import ADAPTER, add_lora, load_lora_state_dict, merge_adapter

log = logging.getLogger(__name__)

RUN_SUMMARY = "cm_lightning.json"  # written beside the exported LoRA by train.py


@dataclass
class RunInfo:
    """What a training run says about how to sample it (from ``lora/cm_lightning.json``).

    ``options`` are what the run's sampler records (its table entry's ``records``: e.g. ``num_solver_steps``, and
    ``edges`` for MCD's edge jumps).
    """

    method: str
    sampler: SamplerKind
    sample_steps: int
    options: dict = field(default_factory=dict)
    lora: dict = field(default_factory=dict)
    model: str = ""  # the base model the LoRA was trained on (folder or hub id)

    @classmethod
    def read(cls, folder: Path) -> "RunInfo":
        path = folder / RUN_SUMMARY
        if not path.is_file():
            raise UserError(f"{path}: not found; point at a run's lora/ folder (written by cm_lightning.train)")
        try:
            fields = json.loads(path.read_text())
            # runs written before the sampler table kept the sampler's options at the top level
            legacy = {k: fields.pop(k) for k in ("num_solver_steps", "edges") if k in fields}
            fields["options"] = {**{k: v for k, v in legacy.items() if v is not None}, **fields.get("options", {})}
            info = cls(**fields)
        except (TypeError, AttributeError, json.JSONDecodeError) as error:
            raise UserError(f"{path}: not a cm_lightning run summary ({error})") from None
        get_sampler(info.sampler)  # a sampler this installation does not know is one clear line
        return info

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RUN_SUMMARY).write_text(json.dumps(asdict(self), indent=2))


def resolve_run_folder(path: str | Path) -> Path:
    """A run folder, its ``lora/`` folder, or a checkpoint inside the run -> the ``lora/`` folder."""
    path = Path(path)
    candidates = [path, path / "lora", path.parent.parent / "lora" if path.suffix == ".ckpt" else None]
    for candidate in candidates:
        if candidate is not None and (candidate / RUN_SUMMARY).is_file():
            return candidate
    raise UserError(f"{path}: not a training run (no lora/{RUN_SUMMARY} found in or beside it)")


def apply_trained_lora(unet, path: str | Path) -> RunInfo:
    """Add the run's LoRA to ``unet`` and load its weights: from a ``.ckpt`` if given, else the exported LoRA."""
    from safetensors.torch import load_file

    path = Path(path)
    folder = resolve_run_folder(path)
    info = RunInfo.read(folder)
    add_lora(unet, **info.lora)
    if path.suffix == ".ckpt":
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]  # tensors only: no code runs
        # the module's parameter names carry peft's adapter name (lora_A.default.weight); its state dicts do not
        load_lora_state_dict(unet, {k.removeprefix("unet.").replace(f".{ADAPTER}.", "."): v
                                    for k, v in state.items() if k.startswith("unet.")})
    else:  # the exported file holds peft's keys under diffusers' "unet." prefix
        weights = load_file(folder / "pytorch_lora_weights.safetensors")
        load_lora_state_dict(unet, {k.removeprefix("unet."): v for k, v in weights.items()})
    return info


@dataclass
class Drawer:
    """Draws images for prompts with one sampler. Latents are in the VAE's scaled space."""

    unet: torch.nn.Module
    encoders: FrozenEncoders
    schedule: NoiseSchedule
    sampler: SamplerKind
    options: dict = field(default_factory=dict)  # the sampler's options: the run's, and the model's timestep spacing
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    cuda_graphs: bool = True  # on a GPU, replay each UNet call from a captured CUDA graph (launch-bound at batch 1)
    compile: bool = False  # torch.compile the UNet's blocks and the VAE decoder (under the graphs): compile time first
    latent_size: tuple[int, int] | None = None  # (h, w) of the latents to draw; None: the UNet's sample_size square

    def __post_init__(self) -> None:
        network = unet_network(self.unet)
        self.network = network
        self._null_context: torch.Tensor | None = None  # the empty prompt's embedding, encoded once
        if self.compile:
            compile_unet_blocks(self.unet)
            compile_vae_decoder(self.encoders.vae)
        if self.cuda_graphs and self.device.type == "cuda":
            # at batch 1 every call is launch-bound: the text encoder and the VAE decoder too, not only the UNet
            self.network = CudaGraphNetwork(network)
            for name in ("text_forward", "decode_forward"):
                call = getattr(self.encoders, name)
                if not isinstance(call, CudaGraphNetwork):  # encoders shared by several drawers: wrapped once
                    setattr(self.encoders, name, CudaGraphNetwork(call))

    def null_context(self) -> torch.Tensor:
        """The empty prompt's embedding [1, L, D] on the drawing device and dtype (encoded on first use)."""
        if self._null_context is None:
            self._null_context = self.encoders.encode_prompts([""]).to(self.device, self.dtype)
        return self._null_context

    @classmethod
    def from_components(
        cls, components: SDComponents, sampler: SamplerKind, *, device="cpu", dtype=torch.float32,
        encoder_dtype=torch.float32, options: dict | None = None, cuda_graphs: bool = True, compile: bool = False,
    ) -> "Drawer":
        config = components.scheduler_config
        unet = components.unet.to(device=device, dtype=dtype).eval()
        encoders = FrozenEncoders.from_components(components, device=device, dtype=encoder_dtype)
        model_options = {"timestep_spacing": config.get("timestep_spacing", "leading"),
                         "steps_offset": config.get("steps_offset", 0)}
        return cls(
            unet, encoders, NoiseSchedule.from_scheduler_config(config), sampler,
            options={**model_options, **(options or {})}, device=torch.device(device), dtype=dtype,
            cuda_graphs=cuda_graphs, compile=compile,
        )

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        size = self.unet.config.sample_size
        height, width = self.latent_size or (size, size)
        return (batch, self.unet.config.in_channels, height, width)

    def noise(self, count: int, seed: int) -> torch.Tensor:
        """Start noise for ``count`` images, image i from seed ``seed + i`` (independent of batch size), on the CPU."""
        shape = self.latent_shape(1)[1:]
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(count)])

    @torch.no_grad()
    def draw_latents(
        self, prompts: list[str], *, steps: int, guidance_scale: float = 1.0, seed: int = 0,
        noise: torch.Tensor | None = None, generator: torch.Generator | None = None, batch_size: int = 16,
        progress: bool = False, negative_prompt: str | None = None,
    ) -> torch.Tensor:
        """Final latents [N, C, h, w] (float32, CPU) for ``prompts``, from ``noise`` or from ``seed``.

        ``negative_prompt`` replaces the empty prompt as guidance's unconditional branch (used when g != 1).

        ``generator`` feeds the multistep sampler's re-noising; by default one seeded per batch from ``seed``,
        so that a rerun gives the same images whatever else ran before.
        """
        noise = self.noise(len(prompts), seed) if noise is None else noise
        null = (self.encoders.encode_prompts([negative_prompt])[0].to(self.device, self.dtype) if negative_prompt
                else self.null_context()[0])
        out = []
        starts = range(0, len(prompts), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc=f"{self.sampler} x{steps}", unit="batch")
        for start in starts:
            context = self.encoders.encode_prompts(prompts[start : start + batch_size]).to(self.device, self.dtype)
            x = noise[start : start + batch_size].to(self.device, self.dtype)
            batch_generator = generator or renoise_generator(seed, start, self.device)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                latents = generate_latents(
                    self.unet, self.schedule, self.sampler, x, Conditioning(context, null, guidance_scale),
                    steps=steps, generator=batch_generator, network=self.network, **self.options,
                )
            out.append(latents.float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Latents -> images [N, 3, H, W] in [-1, 1], float32 on the CPU."""
        return torch.cat([
            self.encoders.decode_latents(latents[i : i + batch_size].to(self.device)).clamp(-1, 1).cpu()
            for i in range(0, latents.shape[0], batch_size)
        ])

    def draw(self, prompts: list[str], *, steps: int, batch_size: int = 16, **kwargs) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1] for ``prompts`` (see :meth:`draw_latents` for the options)."""
        return self.decode(self.draw_latents(prompts, steps=steps, batch_size=batch_size, **kwargs), batch_size)


def load_drawer(
    components: SDComponents, run: str | Path | None, *, device="cpu", dtype=torch.float32,
    encoder_dtype=torch.float32, merge_lora: bool = True, cuda_graphs: bool = True, compile: bool = False,
) -> tuple[Drawer, RunInfo | None]:
    """The teacher (``run`` None: DDIM with adapters absent) or a trained student (its run folder or checkpoint).

    ``merge_lora`` folds the LoRA into the UNet's weights once (in the drawing dtype), so a student call costs
    what a base UNet call costs; ``cuda_graphs`` replays the UNet calls from CUDA graphs on a GPU; ``compile``
    compiles the UNet's blocks and the VAE decoder first (see ``models/compilation.py``).
    """
    if run is None:
        drawer = Drawer.from_components(components, "ddim", device=device, dtype=dtype, encoder_dtype=encoder_dtype,
                                        cuda_graphs=cuda_graphs, compile=compile)
        return drawer, None
    info = apply_trained_lora(components.unet, run)
    if merge_lora:
        components.unet.to(device=device, dtype=dtype)
        merge_adapter(components.unet)
    drawer = Drawer.from_components(
        components, info.sampler, device=device, dtype=dtype, encoder_dtype=encoder_dtype, options=info.options,
        cuda_graphs=cuda_graphs, compile=compile,
    )
    return drawer, info
