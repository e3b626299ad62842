"""The training progress bar: optimizer steps to ``trainer.max_steps``, with rate and ETA, across epochs.

Lightning's own bar counts batches of the current epoch (``Epoch 0/-2`` when only ``max_steps`` bounds a run) and
restarts every epoch, so it says nothing about when a step-bounded run ends.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf


def total_steps(trainer: L.Trainer) -> int | None:
    """The run's optimizer steps: ``max_steps``, else epochs x batches per epoch / accumulation (None: unknown)."""
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps
    batches, epochs = convert_inf(trainer.num_training_batches), trainer.max_epochs
    if batches is None or epochs is None or epochs < 0:
        return None
    return epochs * (batches // max(1, trainer.accumulate_grad_batches))


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole run: ``train: 40%|####      | 400/1000 [02:10<03:15, 3.07step/s, loss=...]``.

    Counts ``trainer.global_step`` (optimizer steps, so gradient accumulation does not inflate it), starts at the
    resumed step, and keeps going across epochs; validation bars are Lightning's own. Written to a file or a pipe
    (not a terminal), it redraws at most every ``log_interval_s`` seconds.
    """

    def __init__(self, *args, log_interval_s: float = 30.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_interval_s = log_interval_s

    def on_train_start(self, trainer, pl_module) -> None:
        bar = self.init_train_tqdm()
        bar.unit, bar.desc = "step", "train"
        # a log file, not a terminal: a line every 30 s, not 10 a second (a disabled bar, as on ranks > 0, has no file)
        if not bar.disable and not getattr(bar.fp, "isatty", lambda: False)():
            bar.mininterval = self.log_interval_s
        bar.reset(total=total_steps(trainer))
        bar.initial = bar.n = trainer.global_step
        bar.refresh()
        self.train_progress_bar = bar

    def on_train_epoch_start(self, trainer, *_) -> None:
        pass  # one bar across epochs

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is None or bar.disable or step == bar.n:
            return
        # the loss shown is read from the GPU (a synchronisation, which stalls the host's queue of work), so only
        # on logging steps; the count moves every step, redrawn at most every ``mininterval`` seconds by tqdm
        if trainer._logger_connector.should_update_logs or step == bar.total:
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        if step % self.refresh_rate == 0 or step == bar.total:
            bar.update(step - bar.n)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)

    def on_train_end(self, trainer, pl_module) -> None:
        bar = self.train_progress_bar
        if not bar.disable:
            bar.n = trainer.global_step
            bar.refresh()
        bar.close()
