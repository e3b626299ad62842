"""CUDA graphs for UNet calls: a captured graph launches a whole UNet call at once instead of ~1,000 kernels from Python.

Why: at SD1.5 size and batch 8 the eager UNet is bound by the host, not the GPU. The first speed run
(benchmarks/speed.md) timed a base UNet forward of batch 8 at about the same cost as batch 1, and every phase of a
training step well above its arithmetic. Graph replay removes the host from the loop. Two tools:

- :class:`CudaGraphNetwork` for calls without gradients (the teacher, the stop-gradient target, drawing):
  one graph per input shape, inputs copied into static buffers, replayed.
- :class:`GraphedStudent` for the student's forward AND backward (``torch.cuda.make_graphed_callables``): the LoRA
  gradients come out of the backward graph. Only the first input shape is captured (a full set of activations
  per graph); any other shape (an epoch's short last batch) runs eagerly.

Graphs read weights in place, so they stay valid while the optimizer updates the LoRA tensors in place, and
merged-LoRA layers rebuild W + scale B A inside the graph from the current A and B. What a graph cannot follow:
weights swapped for other tensors (an EMA target), changed adapter state between capture and replay (each graph
is used under one state only), data-dependent host decisions inside the UNet (there are none in diffusers' UNet).
"""

from __future__ import annotations

import logging
import time

import torch

from ..models.attention import sdpa_preference

log = logging.getLogger(__name__)


def _autocast(dtype: torch.dtype | None):
    # autocast's cache of cast weights must stay out of a capture (torch refuses it in make_graphed_callables)
    if dtype is None:
        return torch.autocast("cuda", enabled=False)
    return torch.autocast("cuda", dtype=dtype, cache_enabled=False)


class CudaGraphNetwork:
    """``net(*tensors) -> tensor`` (a UNet's ``(x_t, t, context)``, a VAE decoder, a text encoder) replayed from a
    captured CUDA graph, one graph per input shape (no gradients).

    A UNet call at batch 1 is launch-bound (issue 10: 28 ms eager for ~1 ms of arithmetic at 512 px). The first
    call of each shape runs the network twice on a side stream to warm up, then captures it; later calls copy the
    inputs into the graph's buffers and replay. Off the GPU it calls ``net`` directly.

    Args:
        net: the network; it must not change between calls except in place.
        autocast_dtype: capture under autocast in this dtype (training's mixed precision), or None for no
            autocast (drawing: the UNet is already in its drawing dtype).
    """

    def __init__(self, net, autocast_dtype: torch.dtype | None = None):
        self.net = net
        self.autocast_dtype = autocast_dtype
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if inputs[0].device.type != "cuda":
            return self.net(*inputs)
        key = tuple((tuple(v.shape), v.dtype) for v in inputs) + (torch.is_grad_enabled(),)
        if key not in self.graphs:
            try:
                started = time.perf_counter()
                self.graphs[key] = self._capture(inputs)
                # a one-off per shape (warm-up calls with cuDNN's autotuning, then the capture): the run's start-up
                log.info("CUDA graph captured for a batch of %d in %.1f s", inputs[0].shape[0],
                         time.perf_counter() - started)
            except RuntimeError as error:  # never lose a run to a capture: say so once and stay eager
                log.warning("CUDA graph capture failed (%s); running eagerly", str(error).splitlines()[0])
                self.graphs[key] = None
        if self.graphs[key] is None:
            return self.net(*inputs)
        graph, buffers, output = self.graphs[key]
        for buffer, value in zip(buffers, inputs):
            buffer.copy_(value)
        graph.replay()
        return output.clone()

    @torch.no_grad()
    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> tuple:
        buffers = tuple(v.clone() for v in inputs)
        with _autocast(self.autocast_dtype):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.net(*buffers)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                output = self.net(*buffers)
        self.pool = graph.pool()
        return graph, buffers, output


class _UNetCall(torch.nn.Module):
    """The UNet as ``(x_t, t, context) -> output`` of tensors only, as ``make_graphed_callables`` needs."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.conv_in.weight.dtype
        return self.unet(x.to(dtype), t, encoder_hidden_states=context.to(dtype)).sample.float()


class GraphedStudent:
    """The student's ``net(x_t, t, context)`` with its forward and backward replayed from CUDA graphs.

    Captured at the first call (that shape only); calls of another shape or without gradients run the plain
    network. ``autocast_dtype`` is the training precision's half dtype (or None for fp32); ``sdpa`` the attention
    kernel to prefer (``models/attention.py``).
    """

    def __init__(self, unet: torch.nn.Module, autocast_dtype: torch.dtype | None, sdpa: str = "default"):
        self.call = _UNetCall(unet)
        self.autocast_dtype = autocast_dtype
        self.sdpa = sdpa  # the attention kernel preference (models/attention.py), captured with the graphs
        self.graphed = None
        self.key: tuple | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(v.shape), v.dtype) for v in (x, t, context))
        # not `unet.training`: Lightning keeps a submodule loaded in eval mode in eval mode while it trains (the
        # UNet has no dropout or batch norm to change), so that test kept the student off its graphs
        usable = x.device.type == "cuda" and torch.is_grad_enabled()
        if usable and self.graphed is None:
            self.key = key
            try:
                started = time.perf_counter()
                with _autocast(self.autocast_dtype), sdpa_preference(self.sdpa):
                    self.graphed = torch.cuda.make_graphed_callables(
                        _UNetCall(self.call.unet), (x.detach().clone(), t.clone(), context.detach().clone()),
                        num_warmup_iters=3, allow_unused_input=True,
                    )
                log.info("CUDA graphs of the student's forward and backward captured in %.1f s",
                         time.perf_counter() - started)
            except RuntimeError as error:  # never lose a run to a capture: say so once and stay eager
                log.warning("CUDA graph capture of the student failed (%s); running it eagerly",
                            str(error).splitlines()[0])
                self.graphed = False
        if usable and self.graphed and key == self.key:
            return self.graphed(x, t, context)
        # eager, in the same precision and with the same attention kernels as the graph would have run
        with _autocast(self.autocast_dtype), sdpa_preference(self.sdpa):
            return self.call(x, t, context)
