"""``make demo``: distil the shipped shapes teacher with MCD (K = 4) on the CPU, then judge it against the teacher.

Writes the run (checkpoint, LoRA), ``table.md``, ``results.json`` and the comparison figures under
``outputs/demo/<time>/``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra import compose
from omegaconf import DictConfig

from ..cli import one_line_errors
from .evaluate import evaluate
from ..conf_dir import CONF_PATH

log = logging.getLogger("cm_lightning.shapes.demo")


def demo(cfg: DictConfig) -> Path:
    from ..train import train

    run = Path(cfg.output_dir) / "run"
    overrides = [*cfg.train_overrides, f"paths.output_dir={run}", f"paths.cache_dir={cfg.paths.cache_dir}"]
    log.info("training: %s", " ".join(overrides))
    train(compose(config_name="train", overrides=overrides))
    cfg.runs.mcd4 = str(run)
    return evaluate(cfg)


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="demo")
@one_line_errors
def main(cfg: DictConfig) -> None:
    print(demo(cfg))


if __name__ == "__main__":
    main()
