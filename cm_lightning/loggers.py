"""Loggers and the throughput meter, built from ``conf/logger/*`` and ``conf/callbacks/*``.

W&B never prompts and never needs a network: without an API key (``WANDB_API_KEY``, or ``wandb login``'s entry in
``~/.netrc``) the run is logged offline into the run folder (``wandb sync`` uploads it later). wandb itself is
imported only when the wandb logger is built.
"""

from __future__ import annotations

import logging
import netrc
import os
from typing import Any
from urllib.parse import urlparse

from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ThroughputMonitor

from .errors import UserError

log = logging.getLogger(__name__)


def wandb_has_credentials() -> bool:
    """An API key in the environment, or ``wandb login``'s entry for the W&B host in ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_logger(**kwargs: Any):
    """Lightning's ``WandbLogger``, offline when there is no API key (``WANDB_MODE`` set by you wins)."""
    if not os.environ.get("WANDB_MODE") and not wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"
        log.info("W&B: no API key (WANDB_API_KEY or `wandb login`): logging offline under %s; "
                 "`wandb sync` uploads it later", kwargs.get("save_dir", "."))
    try:
        import wandb
    except ImportError:
        raise UserError("logger: W&B (the default logger) is not installed here: `pip install wandb`, or log "
                        "without it: logger=csv (or logger=tensorboard, logger=none)") from None
    from lightning.pytorch.loggers import WandbLogger

    if wandb.run is not None:  # left open by an earlier run in this process that failed: WandbLogger would reuse it
        wandb.finish()
    return WandbLogger(**kwargs)


def finish_runs(loggers) -> None:
    """End this run's W&B run, so the next job of an in-process sweep starts its own (WandbLogger would reuse it)."""
    import sys

    if "wandb" in sys.modules and any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        sys.modules["wandb"].finish()


def log_image(loggers, key: str, image, caption: str, step: int) -> None:
    """An image (a PIL grid) to every logger that shows images: W&B's ``log_image`` (with its caption), TensorBoard's
    ``add_image`` (tag ``key``, at ``step``). CSV has no images (the grids are saved as files beside it)."""
    import numpy as np
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[image], caption=[caption], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, np.asarray(image.convert("RGB")), global_step=step, dataformats="HWC")


def batch_size_of(batch: dict) -> int:
    """Samples in a training batch (the datamodule's dict of latents and text embeddings)."""
    return int(batch["latents"].shape[0])


class PerBatchFlops(Throughput):
    """Lightning's ``Throughput`` given the FLOPs of one batch (the module's ``flops_per_batch``): it counts them once
    per batch since the previous update, so the FLOP rate stays right when the monitor updates only on some batches
    (e.g. on the steps that log, to spare a GPU synchronisation per batch)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._last_batches = 0

    def update(self, *, time: float, batches: int, samples: int, lengths: int | None = None,
               flops: int | None = None) -> None:
        if flops is not None:
            flops = flops * (batches - self._last_batches)
        self._last_batches = batches
        super().update(time=time, batches=batches, samples=samples, lengths=lengths, flops=flops)

    def reset(self) -> None:
        super().reset()
        self._last_batches = 0


class SamplesPerSecond(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` over the datamodule's batches: ``train/device/samples_per_sec`` and
    ``batches_per_sec`` (across devices too under DDP), ``train/device/flops_per_sec`` from the model FLOPs of a
    training sample (``methods/flops.py``, counted once at the first batch) and ``train/device/mfu`` where the
    device's dense peak is known (``peak_flops``, else ours for the H200, else Lightning's table; none for a CPU).

    Args:
        count_flops: set the module's ``flops_per_batch`` (a module that sets its own keeps it); off: no FLOP/s, no MFU.
        peak_flops: the device's peak FLOP/s at the run's precision, for MFU on a chip no table knows.
    """

    def __init__(self, count_flops: bool = True, peak_flops: float | None = None, **kwargs: Any):
        super().__init__(batch_size_fn=batch_size_of, **kwargs)
        self.count_flops, self.peak_flops = count_flops, peak_flops

    def setup(self, trainer, pl_module, stage: str) -> None:
        import warnings

        from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

        from .methods.flops import peak_flops as device_peak

        peak = self.peak_flops or device_peak(trainer.strategy.root_device,
                                              _plugin_to_compute_dtype(trainer.precision_plugin))
        with warnings.catch_warnings():
            if peak:  # Lightning's own look-up warns for chips its table lacks (the plain "NVIDIA H200")
                warnings.simplefilter("ignore")
            super().setup(trainer, pl_module, stage)
        self.available_flops = peak
        self._throughputs = {stage: PerBatchFlops(available_flops=peak, world_size=trainer.world_size, **self.kwargs)
                             for stage in self._throughputs}
        self._module_has_flops = hasattr(pl_module, "flops_per_batch")  # and no warning when there is none

    def _update(self, trainer, pl_module, batch, iter_num: int) -> None:
        # Lightning's monitor synchronises the GPU after every batch to read its clock: that empties the queue each
        # step, and the GPU idles while the next step's Python runs. Here each batch is counted, and the clock (one
        # synchronisation) is read only on the steps that log: the same rates, over windows of log_every_n_steps.
        if trainer._logger_connector.should_update_logs:
            super()._update(trainer, pl_module, batch, iter_num)
            return
        stage = trainer.state.stage
        self._samples[stage] += self.batch_size_fn(batch)
        self._batches[stage] += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        from .methods.base import ConsistencyModule
        from .methods.flops import training_flops_per_sample

        if self.count_flops and not self._module_has_flops and isinstance(pl_module, ConsistencyModule):
            pl_module.flops_per_batch = training_flops_per_sample(pl_module, batch) * batch_size_of(batch)
            self._module_has_flops = True
            log.info("model FLOPs per training batch: %.4g (train/device/flops_per_sec%s)", pl_module.flops_per_batch,
                     f", MFU against {self.available_flops:.4g} FLOP/s" if self.available_flops else "; no MFU: "
                     "the device's peak is unknown (callbacks.throughput.peak_flops=)")
