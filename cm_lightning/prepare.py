"""Build a latent cache ahead of training: ``python -m cm_lightning.prepare data=coco5k data.root=PATH``.

Composes the same config as ``cm_lightning.train`` (so the cache key is the one training will look for),
loads only the frozen VAE and text encoder, and encodes on the GPU when there is one, with a progress bar.
"""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig

from .cli import build, checked_command_line, compute_device, load_model, one_line_errors, parse_dtype
from .config_check import check_train_config
from .models.encoders import FrozenEncoders
from .conf_dir import CONF_PATH


def prepare(cfg: DictConfig) -> str:
    check_train_config(cfg)  # before any weights are read
    datamodule = build(cfg.data.datamodule)  # checks the data's paths and settings, also before the weights
    components = load_model(cfg.model)
    encoders = FrozenEncoders.from_components(
        components, device=compute_device(cfg.trainer.accelerator),  # (the build itself runs without cuDNN's autotuner)
        dtype=parse_dtype(cfg.model.encoder_dtype, "model.encoder_dtype"),
    )
    datamodule.attach_encoders(encoders)
    started = time.perf_counter()
    summary = datamodule.cache.build()
    seconds = time.perf_counter() - started
    return f"{summary}\nbuilt in {seconds:.1f} s\n{datamodule.cache.path}"


@checked_command_line("train")
@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="train")
@one_line_errors
def main(cfg: DictConfig) -> None:
    print(prepare(cfg))


if __name__ == "__main__":
    main()
