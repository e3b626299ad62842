"""Train CT, CD or MCD: ``python -m cm_lightning.train method=mcd boundaries=4``.

Composes ``conf/train.yaml``, loads the model (SD1.5 or a local diffusers folder), builds the latent cache through
the datamodule's frozen encoders, trains the LoRA with Lightning, then writes the last checkpoint and the LoRA in
diffusers format under the run folder (``outputs/train/<method>/<time>/``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
import torch
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from .cli import build, checked_command_line, compute_device, load_model, one_line_errors, parse_dtype
from .config_check import check_train_config
from .diffusion.schedule import NoiseSchedule
from .errors import UserError
from .models.encoders import FrozenEncoders
from .methods.guards import NonFiniteSteps, RunState, StepSeeds
from .methods.sampler_table import get_sampler
from .models.components import save_model_folder
from .models.lora import lora_state_dict, save_lora_diffusers
from .outputs import (check_finite, check_resume_identity, refuse_overwrite, resolve_ckpt_path, run_identity,
                      whole_folder)
from .pipeline import RunInfo
from .conf_dir import CONF_PATH
from .loggers import finish_runs
from .sweeps import write_job_metrics

log = logging.getLogger("cm_lightning.train")


def build_module(cfg: DictConfig, components) -> L.LightningModule:
    """The method's LightningModule over the model's UNet, with the run's LoRA, optimizer and schedule."""
    # objects go in through the partial, not through instantiate (which would turn dataclasses into configs)
    # lists arrive as plain lists (not ListConfig): hyperparameters go into checkpoints loaded weights_only
    factory = build(cfg.method.module, _partial_=True, _convert_="all")
    objects = dict(
        unet=components.unet,
        schedule=NoiseSchedule.from_scheduler_config(components.scheduler_config),
        optimizer=instantiate(cfg.optimizer),
        lr_scheduler=instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
    )
    if cfg.method.get("uses_lora", True):
        objects["lora"] = OmegaConf.to_container(cfg.lora, resolve=True)
    try:
        return factory(**objects)
    except (TypeError, ValueError) as error:  # a config value the method refuses (unknown key, K out of range)
        raise UserError(f"method={cfg.method.name}: {error}") from None


def run_info(cfg: DictConfig, module) -> RunInfo:
    """What sample/export need to know about this run: the method, its sampler and the options the sampler's table
    entry says a run records (solver grid size, MCD's edges)."""
    return RunInfo(
        method=cfg.method.name,
        sampler=module.sampler_kind,
        sample_steps=module.default_sample_steps(),
        options=get_sampler(module.sampler_kind).recorded(module.sampler_options()),
        lora=OmegaConf.to_container(cfg.lora, resolve=True),
        model=str(cfg.model.pretrained),
    )


def supported_precision(precision: str, device: torch.device) -> str:
    """``bf16-mixed`` on a GPU without bf16 (T4, V100) becomes ``16-mixed`` (fp16 with loss scaling), said once."""
    if precision.startswith("bf16") and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("trainer.precision=%s: this GPU has no bf16; training in 16-mixed (fp16 + loss scaling)", precision)
        return "16-mixed"
    return precision


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job from a composed config; returns the final logged metrics."""
    check_train_config(cfg)  # before any weights are read
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    refuse_overwrite(output_dir, ckpt_path)
    if ckpt_path:
        check_resume_identity(ckpt_path, run_identity(cfg))
    L.seed_everything(cfg.seed, workers=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 leftovers on tensor cores
    datamodule = build(cfg.data.datamodule)  # checks the data's paths before any weights are read
    components = load_model(cfg.model)
    device = compute_device(cfg.trainer.accelerator)
    encoders = FrozenEncoders.from_components(
        components, device=device, dtype=parse_dtype(cfg.model.encoder_dtype, "model.encoder_dtype")
    )
    datamodule.attach_encoders(encoders)
    module = build_module(cfg, components)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    log.info("%s: %s trainable parameters", cfg.method.name, f"{trainable:,}")

    # nodes without a _target_ are an experiment's settings for a callback or logger that was switched off
    callbacks = [build(c) for c in (cfg.get("callbacks") or {}).values() if "_target_" in c]
    loggers = [build(c) for c in (cfg.get("logger") or {}).values() if "_target_" in c]
    for logger in loggers:  # the whole resolved config is the run's config (W&B's config panel, hparams.yaml)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    if not loggers:  # logger=none: a learning-rate monitor has nowhere to write
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    run_state = RunState(run_identity(cfg))
    callbacks += [run_state, StepSeeds(cfg.seed), NonFiniteSteps(cfg.max_nonfinite_steps)]
    for callback in callbacks:  # validation draws the teacher's reference with the model's own DDIM spacing
        if hasattr(callback, "bind_scheduler_config"):
            callback.bind_scheduler_config(components.scheduler_config)
    precision = supported_precision(str(cfg.trainer.precision), device)
    trainer: L.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False, precision=precision)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    last = output_dir / "checkpoints" / "last.ckpt"
    if not last_checkpoint_is_final(trainer, run_state, last):
        trainer.save_checkpoint(last)
    if trainer.is_global_zero:
        if not cfg.method.get("uses_lora", True):  # a whole new model (method=teacher): the base folder, new UNet
            folder = save_model_folder(cfg.model.pretrained, module.exported_unet, output_dir / "model")
            OmegaConf.save(cfg, folder / "train_config.yaml", resolve=True)
            log.info("model written to %s", folder)
        else:
            with whole_folder(output_dir / "lora") as lora_dir, module.weights_for_export():
                check_finite(lora_state_dict(components.unet), "the LoRA")
                save_lora_diffusers(components.unet, lora_dir)
                run_info(cfg, module).write(lora_dir)
                OmegaConf.save(cfg, lora_dir / "train_config.yaml", resolve=True)
            log.info("LoRA weights written to %s", output_dir / "lora")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    finish_runs(loggers)
    if trainer.is_global_zero:  # what a sweep's summary table reads (cm_lightning.sweeps)
        write_job_metrics(output_dir, metrics, steps=trainer.global_step)
    return metrics


def last_checkpoint_is_final(trainer: L.Trainer, run_state: RunState, last: Path) -> bool:
    """Whether ModelCheckpoint already wrote ``last`` at the final step (then saving it again would only cost
    another write of the LoRA, its optimizer state and EMA, ~1 GB at SD1.5 size)."""
    callback = trainer.checkpoint_callback
    # the same answer on every rank (no look at the files, which only rank 0 writes): under DDP a rank that saved
    # while another did not would wait in the save's barrier forever
    return (isinstance(callback, ModelCheckpoint) and bool(callback.save_last)
            and run_state.saved_at_step == trainer.global_step
            and Path(callback.last_model_path or "").name == last.name
            and os.path.realpath(callback.dirpath or "") == os.path.realpath(last.parent))


@checked_command_line("train")
@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="train")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return optimized_value(metrics, cfg.get("optimized_metric"))


def optimized_value(metrics: dict[str, float], name: str | None) -> float | None:
    """What a sweeper (Optuna) optimises: ``optimized_metric`` (the validation's teacher gap by default)."""
    if not name:
        return None
    if name not in metrics:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:  # a sweeper may need it
            log.warning("optimized_metric=%s was not logged (logged: %s); is callbacks.validation on?", name,
                        ", ".join(sorted(metrics)) or "nothing")
        return None
    return metrics[name]


if __name__ == "__main__":
    main()
