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

from lightning.pytorch.callbacks import ThroughputMonitor

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
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    if wandb.run is not None:  # left open by an earlier run in this process that failed: WandbLogger would reuse it
        wandb.finish()
    return WandbLogger(**kwargs)


def finish_runs(loggers) -> None:
    """End this run's W&B run, so the next job of an in-process sweep starts its own (WandbLogger would reuse it)."""
    import sys

    if "wandb" in sys.modules and any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        sys.modules["wandb"].finish()


def batch_size_of(batch: dict) -> int:
    """Samples in a training batch (the datamodule's dict of latents and text embeddings)."""
    return int(batch["latents"].shape[0])


class SamplesPerSecond(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` (``train/device/samples_per_sec`` and ``batches_per_sec``; across devices too under DDP,
    and MFU where the module sets ``flops_per_batch`` on a GPU Lightning knows) over the datamodule's batches,
    without its warning when no FLOP count is set."""

    def __init__(self, **kwargs: Any):
        super().__init__(batch_size_fn=batch_size_of, **kwargs)

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._module_has_flops = hasattr(pl_module, "flops_per_batch")

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
