"""The seed's figure in one command: ``python -m cm_lightning.compare runs.ct=.. runs.cd=.. runs.mcd=..``.

Rows: teacher DDIM at 50 and at 4 steps (with CFG), then CT, CD and MCD at 4 steps; every row starts from the
same noise for each prompt. Writes ``compare.png`` (labelled rows, prompts as column titles).
With ``train_missing=true`` the missing runs are trained first through the real training configs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .cli import compute_device, load_model, one_line_errors, parse_dtype
from .errors import UserError
from .figures import labelled_rows
from .pipeline import Drawer, load_drawer
from .prompts import read_prompts
from .conf_dir import CONF_PATH

log = logging.getLogger("cm_lightning.compare")
METHODS = ("ct", "cd", "mcd")


def train_missing_runs(cfg: DictConfig, out: Path) -> dict[str, str]:
    """Train each method without a run through ``conf/train.yaml`` (same model), return {method: run folder}."""
    from hydra import compose

    from .train import train

    runs = {m: cfg.runs.get(m) for m in METHODS}
    model_choice = HydraConfig.get().runtime.choices.get("model", "sd15")
    for method in [m for m, run in runs.items() if not run]:
        folder = out / "runs" / method
        overrides = [f"method={method}", f"model={model_choice}", *cfg.train_overrides,
                     f"paths.output_dir={folder}", f"paths.cache_dir={cfg.paths.cache_dir}"]
        log.info("training %s: %s", method, " ".join(overrides))
        train(compose(config_name="train", overrides=overrides))
        runs[method] = str(folder)
    return runs


def compare(cfg: DictConfig) -> Path:
    out = Path(cfg.output_dir)
    runs = train_missing_runs(cfg, out) if cfg.train_missing else {m: cfg.runs.get(m) for m in METHODS}
    missing = [m for m in METHODS if not runs[m]]
    if missing:
        raise UserError(f"runs.{missing[0]} is not set: pass runs.ct/cd/mcd=RUN, or train_missing=true")
    prompts = read_prompts(cfg.prompts, cfg.prompts_file)
    device = compute_device(cfg.device)
    dtype = parse_dtype(cfg.dtype, "dtype") if device.type == "cuda" else torch.float32
    encoder_dtype = parse_dtype(cfg.model.encoder_dtype, "model.encoder_dtype")

    teacher, _ = load_drawer(load_model(cfg.model), None, device=device, dtype=dtype, encoder_dtype=encoder_dtype)
    noise = teacher.noise(len(prompts), cfg.seed)
    rows = []
    for steps in cfg.teacher_steps:
        images = teacher.draw(prompts, steps=steps, guidance_scale=cfg.teacher_guidance, noise=noise,
                              seed=cfg.seed, batch_size=cfg.batch_size, progress=True)
        rows.append((f"teacher {steps}", images))
    del teacher
    for method in METHODS:
        student: Drawer
        student, info = load_drawer(load_model(cfg.model), runs[method], device=device, dtype=dtype,
                                    encoder_dtype=encoder_dtype)
        steps = info.sample_steps if method == "mcd" else cfg.steps
        images = student.draw(prompts, steps=steps, guidance_scale=cfg.student_guidance, noise=noise,
                              seed=cfg.seed, batch_size=cfg.batch_size, progress=True)
        rows.append((f"{method.upper()} {steps}", images))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compare.png"
    labelled_rows(rows, column_titles=prompts).save(path)
    log.info("figure written to %s", path)
    return path


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="compare")
@one_line_errors
def main(cfg: DictConfig) -> None:
    print(compare(cfg))


if __name__ == "__main__":
    main()
