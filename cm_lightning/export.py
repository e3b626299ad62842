"""Export a trained run for diffusers: ``python -m cm_lightning.export run=PATH [out=DIR]``.

Writes ``pytorch_lora_weights.safetensors`` (diffusers LoRA format, ``lora_alpha`` kept in its metadata),
``scheduler/scheduler_config.json`` (the run's sampler's diffusers scheduler, from the sampler table: LCMScheduler
for CT and CD; TCDScheduler for MCD, to be called with ``eta=0`` and the edge timesteps), the run's training config, and a model card (README.md) saying how to load it.
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


def model_card(info: RunInfo, base_model: str, num_train_timesteps: int) -> str:
    scheduler = get_sampler(info.sampler).scheduler
    edges = f"\n- segment edges: {info.options['edges']}" if info.options.get("edges") else ""
    return f"""# {info.method.upper()} LoRA for {base_model}

Trained with cm_lightning ({info.method}); samples in {info.sample_steps} steps.

- base model: `{base_model}`
- LoRA: rank {info.lora.get("rank")}, alpha {info.lora.get("alpha")}
- solver grid: {info.options.get("num_solver_steps", "n/a")} DDIM steps{edges}
- scheduler: `{scheduler}` (config in `scheduler/`)

```python
from diffusers import StableDiffusionPipeline, {scheduler}

pipe = StableDiffusionPipeline.from_pretrained("{base_model}")
pipe.scheduler = {scheduler}.from_pretrained("PATH/TO/THIS/FOLDER", subfolder="scheduler")
pipe.load_lora_weights("PATH/TO/THIS/FOLDER")
image = pipe("A sad puppy with large eyes", {sampling_call(info, num_train_timesteps)}).images[0]
```

The training configuration is in `train_config.yaml`.
"""


def export_run(run: str | Path, out: str | Path, *, base_model: str | None = None) -> Path:
    """Write the diffusers-ready folder for ``run`` (a run folder, its lora/ folder or a .ckpt) into ``out``.

    The folder is written whole (a temporary sibling renamed into place); its card and configs carry no absolute
    local paths (a local base model is named ``<local>/<folder name>``); non-finite weights are never written.
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
        if (folder / "train_config.yaml").is_file():
            config = OmegaConf.to_container(OmegaConf.load(folder / "train_config.yaml"), resolve=False)
            OmegaConf.save(OmegaConf.create(portable(config)), tmp / "train_config.yaml")
        replace(info, model=shared_model).write(tmp)
        (tmp / "README.md").write_text(model_card(info, shared_model, base_config.get("num_train_timesteps", 1000)))
    log.info("exported %s (%s) to %s", info.method, base_model, out)
    return out


@checked_command_line("export")
@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="export")
@one_line_errors
def main(cfg: DictConfig) -> None:
    if not cfg.run:
        raise UserError("run: pass the training run to export, e.g. run=outputs/train/mcd/2026-01-01_12-00-00")
    out = cfg.out or str(Path(cfg.run if Path(cfg.run).is_dir() else Path(cfg.run).parent) / "export")
    print(export_run(cfg.run, out, base_model=cfg.base_model))


if __name__ == "__main__":
    main()
