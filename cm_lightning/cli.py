"""What every entry point shares: one-line errors for bad input, and building the model from its config."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .errors import UserError

T = TypeVar("T")

def asset_path(name: str) -> str:
    """A file or folder shipped in the package (``cm_lightning/assets/<name>``); the ``${asset:...}`` resolver."""
    from importlib import resources

    return str(resources.files("cm_lightning") / "assets" / name)


OmegaConf.register_new_resolver("asset", asset_path, replace=True)
from . import sweeps  # noqa: E402,F401  (registers the job_dirname / run_name / run_group resolvers)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def one_line_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Run an entry point; a :class:`UserError` becomes ``error: <message>`` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def checked_command_line(config_name: str):
    """Put outside ``@hydra.main``: the command line is checked before Hydra composes it, so a bad group option
    or key is one ``error:`` line and exit code 2 instead of Hydra's multi-line listing."""

    def wrap(hydra_main: Callable[[], T]) -> Callable[[], T]:
        @functools.wraps(hydra_main)
        def main():
            from .config_check import check_command_line

            try:
                check_command_line(config_name, sys.argv[1:])
            except UserError as error:
                print(f"error: {error}", file=sys.stderr)
                sys.exit(2)
            return hydra_main()

        return main

    return wrap


def build(node: DictConfig, **kwargs):
    """``hydra.utils.instantiate`` that lets a :class:`UserError` through as itself, and turns a wrong or missing
    config key (a TypeError from the target) into a one-line UserError naming the target."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        while cause is not None and not isinstance(cause, (UserError, TypeError)):
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, TypeError):
            raise UserError(f"{node.get('_target_', 'config')}: {cause}") from None
        raise


def parse_dtype(name: str, field: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"{field}={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def compute_device(accelerator: str = "auto", cudnn_benchmark: bool = True) -> torch.device:
    """This process's device: its local GPU when one is asked for (or 'auto') and present, else the CPU.

    On a GPU, ``cudnn_benchmark`` lets cuDNN time its convolution algorithms once per shape and keep the fastest
    (``train`` then hands the choice to the trainer's ``benchmark``, off by default: under the CUDA graphs the
    heuristics' kernels were as fast and the timing cost seconds of start-up): drawing runs at fixed shapes, so the
    search is paid once.
    """
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        torch.backends.cudnn.benchmark = cudnn_benchmark
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if accelerator in ("gpu", "cuda"):
        raise UserError("trainer.accelerator=gpu but no CUDA device is visible; use trainer=cpu")
    return torch.device("cpu")


def load_model(model_cfg: DictConfig):
    """Build the model folder if the config says how (model=tiny), then load its SD components."""
    from .models.components import load_components

    if model_cfg.get("build"):
        build(model_cfg.build)
    return load_components(model_cfg.pretrained, revision=model_cfg.get("revision"), variant=model_cfg.get("variant"))
