"""Export a trained run for diffusers: ``python -m cm_lightning.export run=PATH [out=DIR]``.

Writes ``pytorch_lora_weights.safetensors`` (diffusers LoRA format, ``lora_alpha`` kept in its metadata),
``scheduler/scheduler_config.json`` (the run's sampler's diffusers scheduler, from the sampler table: LCMScheduler
for CT and CD; TCDScheduler for MCD, to be called with ``eta=0`` and the edge timesteps), the run's training config, a sample grid drawn with the exported LoRA, and a Hub model card (README.md: YAML metadata
with base_model, library_name, tags and pipeline_tag; how to load and sample it; the training settings).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import hydra
from omegaconf import DictConfig

from .cli import checked_command_line, one_line_errors
from .conf_dir import CONF_PATH
from .errors import UserError
from .methods.sampler_table import get_sampler
from .outputs import check_finite, portable, whole_folder
from .pipeline import RunInfo, apply_trained_lora, resolve_run_folder
from .prompts import seed_prompts

log = logging.getLogger("cm_lightning.export")
WEIGHTS = "pytorch_lora_weights.safetensors"


def scheduler_for(info: RunInfo, base_config: dict):
    """The diffusers scheduler that reproduces the run's own sampler (its entry in the sampler table)."""
    sampler = get_sampler(info.sampler)
    return sampler.scheduler_class().from_config(base_config, **sampler.scheduler_config(info.options))


def sampling_call(info: RunInfo, num_train_timesteps: int) -> str:
    """The keyword arguments of ``pipe(...)`` that sample the run as it was trained to be sampled."""
    arguments = get_sampler(info.sampler).pipeline_arguments(info.sample_steps, info.options, num_train_timesteps)
    return ", ".join(f"{k}={v!r}" for k, v in {**arguments, "guidance_scale": 1.0}.items())


CARD_TEMPLATE = """---
{{ card_data }}
---

{{ body }}
"""
GRID_FILE = "sample_grid.png"


def _training_settings(config: dict | None, info: RunInfo) -> list[tuple[str, object]]:
    """The settings a reader needs to judge or repeat the run, from its train_config.yaml (already portable)."""
    config = config or {}
    method, trainer, optimizer = config.get("method") or {}, config.get("trainer") or {}, config.get("optimizer") or {}
    data = config.get("data") or {}
    rows = [("method", info.method), ("boundaries K", config.get("boundaries")),
            ("teacher guidance g", config.get("teacher_guidance")),
            ("steps", trainer.get("max_steps")), ("batch size", config.get("batch_size")),
            ("gradient accumulation", trainer.get("accumulate_grad_batches")), ("precision", trainer.get("precision")),
            ("optimizer lr", optimizer.get("lr")), ("LoRA rank / alpha", f"{info.lora.get('rank')} / {info.lora.get('alpha')}"),
            ("solver grid", f"{info.options.get('num_solver_steps')} DDIM steps" if info.options.get("num_solver_steps") else None),
            ("segment edges", info.options.get("edges")), ("loss", (method.get("module") or {}).get("loss")),
            ("data", data.get("name")), ("seed", config.get("seed"))]
    return [(k, v) for k, v in rows if v not in (None, "", {})]


def model_card(info: RunInfo, base_model: str, num_train_timesteps: int, *, config: dict | None = None,
               hub_base_model: str | None = None, grid_prompts: list[str] | None = None):
    """The export's README.md as a ``huggingface_hub.ModelCard``: YAML metadata the Hub reads (base_model,
    library_name, tags, pipeline_tag, a widget showing the sample grid) and the text: how to load and sample it,
    the training settings. ``hub_base_model`` names the base model in the metadata (a Hub id); a local base model
    is left out of the metadata (the Hub would reject it) and named ``<local>/<folder>`` in the text."""
    from huggingface_hub import ModelCard, ModelCardData

    sampler = get_sampler(info.sampler)
    scheduler = sampler.scheduler
    hub_id = hub_base_model or (base_model if not base_model.startswith("<local>") else None)
    tags = ["text-to-image", "stable-diffusion", "lora", "diffusers", "cm_lightning", info.method,
            "consistency-distillation" if info.method in ("cd", "mcd") else "consistency-training"]
    widget = ([{"text": prompt, "output": {"url": GRID_FILE}} for prompt in grid_prompts[:1]]
              if grid_prompts else None)
    data = ModelCardData(base_model=hub_id, library_name="diffusers", pipeline_tag="text-to-image",
                         tags=tags, inference=True, widget=widget)
    shown_base = hub_id or base_model
    edges = f", segment edges {info.options['edges']}" if info.options.get("edges") else ""
    settings = "\n".join(f"| {k} | {v} |" for k, v in _training_settings(config, info))
    grid = (f"![samples]({GRID_FILE})\n\n{info.sample_steps}-step samples, guidance 1.0, seed 0 (image i from seed i), "
            "prompts: " + "; ".join(f"*{p}*" for p in grid_prompts) + "\n\n") if grid_prompts else ""
    body = f"""# {info.method.upper()} LoRA for {shown_base}

A LoRA for `{shown_base}` trained with cm_lightning by {info.method.upper()}: it draws in
{info.sample_steps} steps instead of 50, without classifier-free guidance (`guidance_scale=1.0`; the guidance is
distilled into the weights).

{grid}## Use

Sample with `{scheduler}` (its config is in `scheduler/`{edges}): {sampler_note(info)}

```python
from diffusers import StableDiffusionPipeline, {scheduler}

pipe = StableDiffusionPipeline.from_pretrained("{shown_base}")
pipe.scheduler = {scheduler}.from_pretrained("THIS_REPO_OR_FOLDER", subfolder="scheduler")
pipe.load_lora_weights("THIS_REPO_OR_FOLDER")
image = pipe("A sad puppy with large eyes", {sampling_call(info, num_train_timesteps)}).images[0]
```

`THIS_REPO_OR_FOLDER` is this folder, or its Hub repository id once uploaded
(`huggingface-cli upload USER/NAME THIS_FOLDER`). With cm_lightning installed:
`cm_lightning.load_pipeline("THIS_REPO_OR_FOLDER")` returns the pipeline with its scheduler set.

## Training

| setting | value |
|---|---|
{settings}

The whole configuration is in `train_config.yaml`; the sampler's settings are in `cm_lightning.json`.
"""
    return ModelCard.from_template(data, template_str=CARD_TEMPLATE, body=body)


def sampler_note(info: RunInfo) -> str:
    if info.sampler == "edge_jumps":
        return ("one deterministic jump per segment (`eta=0`, the segment edges as `timesteps`), so the step count is "
                f"the number of segments, {info.sample_steps}.")
    return f"multistep consistency sampling; {info.sample_steps} steps as trained, other step counts work too."


def export_run(run: str | Path, out: str | Path, *, base_model: str | None = None, hub_base_model: str | None = None,
               grid_prompts: list[str] | None = None, grid: bool = True, device: str = "auto") -> Path:
    """Write the diffusers-ready folder for ``run`` (a run folder, its lora/ folder or a .ckpt) into ``out``.

    The folder is written whole (a temporary sibling renamed into place); its card and configs carry no absolute
    local paths (a local base model is named ``<local>/<folder name>``); non-finite weights are never written.
    ``grid`` draws ``grid_prompts`` (default: the first four of the seed's prompts) with the exported LoRA, seed 0,
    into ``sample_grid.png`` (shown by the card); ``hub_base_model`` names a Hub id as the card's base_model.
    """
    from diffusers import DDIMScheduler
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    run, out = Path(run), Path(out)
    folder = resolve_run_folder(run)
    if folder.resolve() == out.resolve():
        raise UserError(f"out={out} is the run's own lora/ folder; export into another folder")
    info = RunInfo.read(folder)
    base_model = base_model or info.model
    try:
        base_config = dict(DDIMScheduler.load_config(base_model, subfolder="scheduler"))
    except OSError as error:
        raise UserError(f"base model '{base_model}': no scheduler config found ({error.__class__.__name__})") from None
    shared_model = portable(base_model)
    with whole_folder(out) as tmp:
        if run.suffix == ".ckpt":  # re-save the checkpoint's LoRA weights in diffusers format
            from .models.components import load_components
            from .models.lora import lora_state_dict, save_lora_diffusers

            components = load_components(base_model)
            apply_trained_lora(components.unet, run)
            check_finite(lora_state_dict(components.unet), f"an export of {run}")
            save_lora_diffusers(components.unet, tmp)
        else:
            check_finite(load_file(folder / WEIGHTS), f"an export of {folder / WEIGHTS}")
            shutil.copy2(folder / WEIGHTS, tmp / WEIGHTS)
        scheduler = scheduler_for(info, {k: v for k, v in base_config.items() if k != "_name_or_path"})
        scheduler.save_pretrained(tmp / "scheduler")
        config = None
        if (folder / "train_config.yaml").is_file():
            config = portable(OmegaConf.to_container(OmegaConf.load(folder / "train_config.yaml"), resolve=False))
            OmegaConf.save(OmegaConf.create(config), tmp / "train_config.yaml")
        replace(info, model=shared_model).write(tmp)
        if grid:
            grid_prompts = list(grid_prompts or seed_prompts()[:4])
            _draw_grid(base_model, tmp, grid_prompts, info.sample_steps, device).save(tmp / GRID_FILE)
        card = model_card(info, shared_model, base_config.get("num_train_timesteps", 1000), config=config,
                          hub_base_model=hub_base_model, grid_prompts=grid_prompts if grid else None)
        card.save(tmp / "README.md")
    log.info("exported %s (%s) to %s", info.method, base_model, out)
    return out


def _draw_grid(base_model: str, folder: Path, prompts: list[str], steps: int, device: str):
    """The exported LoRA's own samples, drawn from the folder just written (so the grid shows what loads)."""
    import torch

    from .cli import compute_device
    from .figures import image_grid
    from .models.components import load_components
    from .pipeline import load_drawer

    device = compute_device(device)
    drawer, _ = load_drawer(load_components(base_model), folder, device=device,
                            dtype=torch.float16 if device.type == "cuda" else torch.float32)
    images = drawer.draw(prompts, steps=steps, guidance_scale=1.0, seed=0, batch_size=len(prompts))
    return image_grid(images, columns=min(len(prompts), 4))


@checked_command_line("export")
@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="export")
@one_line_errors
def main(cfg: DictConfig) -> None:
    if not cfg.run:
        raise UserError("run: pass the training run to export, e.g. run=outputs/train/mcd/2026-01-01_12-00-00")
    out = cfg.out or str(Path(cfg.run if Path(cfg.run).is_dir() else Path(cfg.run).parent) / "export")
    print(export_run(cfg.run, out, base_model=cfg.base_model, hub_base_model=cfg.hub_base_model,
                     grid=cfg.grid, grid_prompts=cfg.grid_prompts, device=cfg.device))


if __name__ == "__main__":
    main()
