"""Optimizers for Lightning from the run's factories, and learning-rate schedules (Hydra ``_partial_`` targets:
``optimizer -> LRScheduler``)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def lightning_optimizers(params: Iterable[torch.nn.Parameter], optimizer: Callable, lr_scheduler: Callable | None):
    """What ``configure_optimizers`` returns: ``optimizer(params)``, with ``lr_scheduler(optimizer)`` stepped every
    optimizer step when given. Shared by the consistency methods and the teacher's training."""
    opt = optimizer(params)
    if lr_scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_scheduler(opt), "interval": "step"}}


def warmup_constant(optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then the optimizer's lr."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


def clip_gradients(trainer, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                   clip_val: float | None) -> torch.Tensor:
    """Clip the gradients of ``params`` to total norm ``clip_val`` (0 or None: measure only); returns the norm.

    Under fp16 loss scaling with a fused optimizer, Lightning leaves the gradients scaled (the optimizer unscales
    inside its step) and refuses to clip them; unscaling here first keeps clipping in true units, and the
    GradScaler then steps the fused optimizer without a second unscale.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
    if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
        scaler.unscale_(optimizer)
    if clip_val:
        return torch.nn.utils.clip_grad_norm_(params, clip_val)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


class FlatParameters:
    """Many parameters as views of one flat buffer, with their gradients gathered into one flat gradient.

    The optimizer, the gradient clip and the non-finite guard then see one tensor instead of SD1.5's 556 LoRA
    tensors: each pass over a tensor list costs host time per tensor (the fused AdamW walks them in Python), and at
    batch 8 the graphed step waits for that host work (benchmarks/speed.md, session 10). The layers keep their own
    parameters (autograd, the EMA, checkpoints and the export see them as before); only their storage moves.

    Args:
        params: the parameters, all of one device and dtype. Call before anything keeps their old storage: after
            the module's move to its device, before CUDA graphs are captured or blocks compiled.
    """

    def __init__(self, params: list[torch.nn.Parameter]):
        if len({(p.device, p.dtype) for p in params}) != 1:
            raise ValueError("FlatParameters: the parameters must share one device and dtype")
        self.params = params
        self.numels = [p.numel() for p in params]
        buffer = torch.empty(sum(self.numels), device=params[0].device, dtype=params[0].dtype)
        for param, view in zip(params, buffer.split(self.numels)):
            view.copy_(param.detach().reshape(-1))
            param.data = view.view_as(param)
        self.flat = torch.nn.Parameter(buffer)  # what the optimizer updates, in place: the layers read views of it
        self._grads_are_views = False  # the parameters' gradients are views of flat.grad (see gather_grads)

    def gather_grads(self, accumulating: bool = False) -> None:
        """flat.grad <- the parameters' gradients, in order (zeros for a parameter without one).

        ``accumulating`` (more micro-batches follow before the optimizer step): the parameters' gradients become views
        of flat.grad (:func:`gradients_into_one_buffer`), so the next backward accumulates into it in place and
        later calls have nothing to gather."""
        if self._grads_are_views:
            return
        if accumulating:
            self.flat.grad = gradients_into_one_buffer(self.params)
            self._grads_are_views = True
            return
        if self.flat.grad is None:
            self.flat.grad = torch.empty_like(self.flat)
        torch.cat(_flat_grads(self.params), out=self.flat.grad)

    def zero_grad(self) -> None:
        """Drop every gradient (set to None, as ``optimizer.zero_grad()`` does)."""
        for param in self.params:
            param.grad = None
        self.flat.grad = None
        self._grads_are_views = False


def _flat_grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params]


def gradients_into_one_buffer(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Copy the parameters' gradients into one new buffer and make each gradient a view of it; returns the buffer.

    Under gradient accumulation with the student's backward replayed from a CUDA graph: autograd takes the graph's
    output buffers as the gradients themselves (no copy), so the next micro-batch's replay would overwrite them
    before adding to them (g2 + g2 instead of g1 + g2). Views of a buffer of their own accumulate in place, as
    autograd does with any existing gradient."""
    buffer = torch.cat(_flat_grads(params))
    for param, view in zip(params, buffer.split([p.numel() for p in params])):
        param.grad = view.view_as(param)
    return buffer


def flatten_optimizer_state(state: dict, params: list[torch.nn.Parameter]) -> dict:
    """An optimizer ``state_dict`` over ``params`` one by one (a checkpoint from before :class:`FlatParameters`), as
    one over their flat buffer: tensors of each parameter's size are concatenated in order, the rest (AdamW's step
    count) taken from the first parameter."""
    numels = [p.numel() for p in params]
    per_param = [state["state"].get(i, {}) for i in range(len(params))]
    merged = {}
    for key, value in per_param[0].items():
        if torch.is_tensor(value) and value.dim() > 0 and value.numel() == numels[0]:
            merged[key] = torch.cat([entry[key].reshape(-1) for entry in per_param])
        else:
            merged[key] = value.clone() if torch.is_tensor(value) else value
    groups = [{**state["param_groups"][0], "params": [0]}]
    return {"state": {0: merged} if merged else {}, "param_groups": groups}


def split_optimizer_state(state: dict, params: list[torch.nn.Parameter]) -> dict:
    """The inverse of :func:`flatten_optimizer_state`: a flat checkpoint's optimizer state over ``params`` one by one
    (each parameter its own copy of the step count: optimizers increment it in place)."""
    numels = [p.numel() for p in params]
    flat = state["state"].get(0, {})
    entries: dict[int, dict] = {i: {} for i in range(len(params))} if flat else {}
    for key, value in flat.items():
        is_vector = torch.is_tensor(value) and value.dim() > 0 and value.numel() == sum(numels)
        parts = value.split(numels) if is_vector else [value] * len(params)
        for i, (param, part) in enumerate(zip(params, parts)):
            if is_vector:
                entries[i][key] = part.view_as(param).clone()
            else:
                entries[i][key] = part.clone() if torch.is_tensor(part) else part
    groups = [{**state["param_groups"][0], "params": list(range(len(params)))}]
    return {"state": entries, "param_groups": groups}
