"""The Python API for notebooks and scripts: the same work as the command-line entry points, as functions.

``import cm_lightning`` stays light: these are imported on first use (``cm_lightning.load_pipeline`` etc.).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def compose_config(config_name: str = "train", overrides: Sequence[str] = ()) -> Any:
    """The composed Hydra config of an entry point (``train``, ``sample``, ``export``, ``evaluate``, ...) with
    command-line style ``overrides`` (``["method=mcd", "boundaries=4"]``), from the package's configs. Bad overrides
    raise :class:`cm_lightning.errors.UserError` with the same one line the command line prints."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .config_check import check_command_line
    from .conf_dir import CONF

    check_command_line(config_name, list(overrides))
    if GlobalHydra.instance().is_initialized():  # e.g. called from inside another Hydra app
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=False)


def train_from_config(overrides: Sequence[str] = (), *, output_dir: str | Path | None = None) -> Path:
    """Train as ``python -m cm_lightning.train OVERRIDES`` would, in this process; returns the run folder (its
    ``lora/`` holds the diffusers LoRA). ``output_dir`` (default ``outputs/train/<method>/<time>``) must be new."""
    from datetime import datetime

    from omegaconf import open_dict

    from .train import train

    cfg = compose_config("train", overrides)
    with open_dict(cfg):  # ${hydra:...} and ${now:...} need a running Hydra app: give the folder directly
        cfg.paths.output_dir = str(output_dir or Path("outputs", "train", str(cfg.method.name),
                                                       datetime.now().strftime("%Y-%m-%d_%H-%M-%S")))
    train(cfg)
    return Path(cfg.paths.output_dir)


def sampling_kwargs(run: str | Path) -> dict:
    """The keyword arguments of ``pipe(...)`` that sample ``run`` as it was trained to be sampled (step count or
    MCD's edge timesteps, ``eta``, ``guidance_scale=1.0``): ``pipe(prompt, **cm_lightning.sampling_kwargs(run))``."""
    from .hub import local_lora
    from .methods.sampler_table import get_sampler
    from .pipeline import RunInfo, resolve_run_folder

    folder = resolve_run_folder(local_lora(run))
    info = RunInfo.read(folder)
    total = 1000
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    if scheduler_file.is_file():
        import json

        total = json.loads(scheduler_file.read_text()).get("num_train_timesteps", total)
    arguments = get_sampler(info.sampler).pipeline_arguments(info.sample_steps, info.options, total)
    return {**arguments, "guidance_scale": 1.0}


def load_pipeline(run: str | Path, *, base_model: str | None = None, device: str | None = None, torch_dtype=None,
                  **from_pretrained: Any):
    """A diffusers ``StableDiffusionPipeline`` ready to sample a trained run: the base model, the run's LoRA loaded
    (``load_lora_weights``) and the scheduler its sampler needs (LCMScheduler for CT/CD, TCDScheduler for MCD).

    ``run``: a training run folder, its ``lora/`` folder, an exported folder, or a Hub repo id of an export.
    ``base_model``: default the model the run was trained on (needed for an export of a local model).
    Sample with ``pipe(prompt, **cm_lightning.sampling_kwargs(run))``. Other keywords go to ``from_pretrained``.
    """
    from diffusers import StableDiffusionPipeline

    from .errors import UserError
    from .export import scheduler_for
    from .hub import local_lora
    from .pipeline import RunInfo, resolve_run_folder

    folder = resolve_run_folder(local_lora(run))
    info = RunInfo.read(folder)
    base = base_model or info.model
    if not base or base.startswith("<local>/"):
        raise UserError(f"{run}: trained on a local model ({base or 'not recorded'}); pass base_model=PATH_OR_HUB_ID")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch_dtype, **from_pretrained)
    except OSError as error:
        raise UserError(f"base model '{base}' could not be loaded ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''})") from None
    config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    pipe.scheduler = scheduler_for(info, config)
    pipe.load_lora_weights(str(folder))
    return pipe.to(device) if device else pipe


def export_lora(run: str | Path, out: str | Path, **options: Any) -> Path:
    """Write the Hub-ready folder for ``run`` (``python -m cm_lightning.export``: LoRA, scheduler, model card, sample
    grid); ``options`` are :func:`cm_lightning.export.export_run`'s (base_model, hub_base_model, grid, ...)."""
    from .export import export_run

    return export_run(run, out, **options)
