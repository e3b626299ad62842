"""Callbacks that make a run survive: what a checkpoint must carry to resume exactly, and non-finite steps.

Added by ``cm_lightning.train`` to every run (not a config choice: ``callbacks=none`` keeps them).
"""

from __future__ import annotations

import lightning as L
import torch

from .. import rng
from ..errors import UserError
from ..outputs import IDENTITY_KEY, check_finite


class RunState(L.Callback):
    """What every checkpoint carries beyond Lightning's own state, so that a resumed run is the run that was
    interrupted: the run identity (method, model, LoRA rank, K: checked before resuming), every random generator,
    and the data position (epoch, batches already trained in it), from which the datamodule's
    :class:`~cm_lightning.data.datamodule.ResumableSampler` starts mid-epoch."""

    def __init__(self, identity: dict):
        self.identity = identity
        self.epoch, self.batches = 0, 0  # batches of `epoch` already trained
        self.resume_at: tuple[int, int] | None = None
        self.saved_at_step: int | None = None  # the global step of the newest checkpoint written

    def on_train_start(self, trainer, module) -> None:
        # after the loader is built, before its first iteration; Lightning skips on_train_epoch_start when it
        # restarts mid-epoch, so the resumed epoch is set up here
        sampler = getattr(trainer.datamodule, "sampler", None)
        if self.resume_at is not None and self.resume_at[0] == trainer.current_epoch:
            self.epoch, self.batches = self.resume_at
            if sampler is not None:
                sampler.skip_batches(self.batches)
        self.resume_at = None

    def on_train_epoch_start(self, trainer, module) -> None:
        self.epoch, self.batches = trainer.current_epoch, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.batches += 1  # before ModelCheckpoint's save (Lightning runs checkpoint callbacks last)

    def on_train_epoch_end(self, trainer, module) -> None:
        self.epoch, self.batches = trainer.current_epoch + 1, 0

    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        checkpoint[IDENTITY_KEY] = dict(self.identity)
        checkpoint["rng"] = rng.capture()
        checkpoint["data_position"] = {"epoch": self.epoch, "batches": self.batches}
        self.saved_at_step = trainer.global_step

    def on_load_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        if "rng" in checkpoint:
            rng.restore(checkpoint["rng"])
        if "data_position" in checkpoint:
            self.resume_at = (checkpoint["data_position"]["epoch"], checkpoint["data_position"]["batches"])


class StepSeeds(L.Callback):
    """Seed the training randomness (timesteps, noise, guidance draws) of every micro-batch from (seed, optimizer
    step, shard), where shard = rank * accumulate_grad_batches + micro-batch. R ranks at batch b then draw exactly
    what one process at batch b with R-fold gradient accumulation draws, on the same data (the sampler shards the
    same way): DDP and accumulation give the same LoRA, and a resumed step draws what it drew before."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        accumulate = trainer.accumulate_grad_batches
        shard = trainer.global_rank * accumulate + batch_idx % accumulate
        torch.manual_seed(((self.seed * 1_000_003 + trainer.global_step) * 65_537 + shard) % 2**63)


class NonFiniteTraining(UserError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class NonFiniteSteps(L.Callback):
    """Skip every optimizer step whose loss or gradient is non-finite, count them, and stop after
    ``max_consecutive`` in a row. No host sync on the hot path: the flags and counters live on the device.

    The skip is exact (parameters and optimizer state untouched): a fused optimizer (``AdamW(fused=True)``, the
    default here) is handed the flag as ``found_inf``, the protocol GradScaler uses, and skips on the device; under
    16-mixed the GradScaler skips non-finite gradients itself (a non-finite loss poisons the gradients so it does).
    Any other optimizer falls back to one sync per step: its gradients are dropped, so it skips those parameters.
    The counters are read at logging steps (``trainer.log_every_n_steps``) and when training ends; a checkpoint
    with a non-finite trainable tensor is refused, so it is never written.
    """

    def __init__(self, max_consecutive: int = 10):
        if max_consecutive < 1:
            raise UserError(f"max_nonfinite_steps={max_consecutive} must be >= 1")
        self.max_consecutive = max_consecutive
        self._state: dict[str, torch.Tensor] | None = None

    def _counters(self, device) -> dict[str, torch.Tensor]:
        if self._state is None:
            zero = torch.zeros((), dtype=torch.long, device=device)
            self._state = {"loss_bad": torch.zeros((), dtype=torch.bool, device=device), "total": zero.clone(),
                           "run": zero.clone(), "run_start": zero.clone(), "last_was_loss": zero.clone()}
        return self._state

    def on_before_backward(self, trainer, module, loss) -> None:
        state = self._counters(loss.device)
        state["loss_bad"] |= ~torch.isfinite(loss.detach())  # several micro-batches under accumulation

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        state = self._counters(grads[0].device)
        loss_bad = state["loss_bad"].to(grads[0].device)
        bad = loss_bad | ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # GradScaler skips steps with non-finite gradients: make a bad loss one of them
            torch._foreach_mul_(grads, torch.where(loss_bad, float("nan"), 1.0).to(grads[0].dtype))
        elif getattr(optimizer, "_step_supports_amp_scaling", False):  # fused: skipped on the device
            optimizer.found_inf, optimizer.grad_scale = bad.float(), None
        elif bool(bad):  # the fallback's one sync: params without a gradient are left alone by the optimizer
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        step = torch.as_tensor(trainer.global_step, device=bad.device)
        state["total"] += bad
        state["run"] = (state["run"] + 1) * bad
        state["run_start"] = torch.where(state["run"] == 1, step, state["run_start"])
        state["last_was_loss"] = loss_bad.long()
        state["loss_bad"] = torch.zeros_like(state["loss_bad"])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        for optimizer in trainer.optimizers:
            if getattr(optimizer, "found_inf", None) is not None and getattr(trainer.precision_plugin, "scaler",
                                                                              None) is None:
                del optimizer.found_inf, optimizer.grad_scale
        if self._state is None:
            return
        module.log("train/nonfinite_steps", self._state["total"].float())  # a device tensor: read when logged
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self.check(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        if self._state is not None:
            self.check(trainer, module)

    def check(self, trainer, module) -> None:
        """Stop the run when the last ``max_consecutive`` optimizer steps were all skipped (one sync)."""
        run = int(self._state["run"])
        if run < self.max_consecutive:
            return
        start, was_loss = int(self._state["run_start"]), bool(self._state["last_was_loss"])
        what = "loss" if was_loss else "gradient"
        precision = str(trainer.precision)
        cause = ("fp16 overflow: try trainer.precision=bf16-mixed" if precision.startswith("16")
                 else "a learning rate too high for this run (optimizer.lr) or a bad batch")
        raise NonFiniteTraining(f"stopped at step {trainer.global_step}: the last {run} optimizer steps (from step "
                                f"{start}) had a non-finite {what} and were skipped; likely cause: {cause}")

    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        check_finite({n: p for n, p in module.named_parameters() if p.requires_grad},
                     f"a checkpoint at step {trainer.global_step}")
