"""Step timing and a per-phase profile of training, for speed work (``benchmarks/speed.py`` adds it to ``train``).

``StepProfiler`` times the optimizer steps after the warm-up as a user's wall clock sees a run: one CUDA
synchronisation before the first timed step and one after the last, the mean step between them (the host queues
work ahead as in any run; ``sync_every_step`` synchronises after each step instead and takes the median). Inside
the step, the GPU time of each phase: the method's own phases (teacher, target, student forward, loss: marked by
:meth:`ConsistencyModule.phase`) and Lightning's (backward, optimizer), from CUDA events, which do not stall the GPU.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import lightning as L
import torch


class _Marks:
    """Named (start, end) pairs of CUDA events (or host clocks on the CPU) for one step."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: list[tuple[str, object, object]] = []
        self._open: dict[str, object] = {}
        self.peaks: dict[str, float] = {}  # the largest memory allocated during each phase, GiB

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self, name: str) -> None:
        if self.cuda and name != "step":
            torch.cuda.reset_peak_memory_stats()
        self._open[name] = self._now()

    def end(self, name: str) -> None:
        if name in self._open:
            self.marks.append((name, self._open.pop(name), self._now()))
            if self.cuda and name != "step":
                self.peaks[name] = max(self.peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)

    def seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, start, end in self.marks:
            elapsed = start.elapsed_time(end) / 1000 if self.cuda else end - start
            out[name] = out.get(name, 0.0) + elapsed
        return out


class StepProfiler(L.Callback):
    """Write per-step wall time, per-phase GPU time and peak memory to ``out`` (JSON) at the end of training.

    Args:
        out: the JSON file to write.
        skip: steps left out of the medians (warm-up: allocator growth, cuDNN autotuning, compilation).
        phases: also time the phases inside the step (adds a few CUDA events per phase; no synchronisation).
        sync_every_step: synchronise after every step and report the median step (the earlier method: it
            stalls the host's queue each step, so it reads high wherever the host has work between steps).
        host_profile: profile the host (cProfile) inside the optimizer phase of the timed steps, where the GPU
            waits on Python (clipping, the optimizer's step, Lightning's and the callbacks' hooks), and write the
            functions by cumulative time to ``<out>.host.txt``.
    """

    def __init__(self, out: str, skip: int = 10, phases: bool = True, host_profile: bool = False,
                 sync_every_step: bool = False):
        self.out, self.skip, self.phases, self.sync_every_step = Path(out), skip, phases, sync_every_step
        self.host = cProfile.Profile() if host_profile else None
        self._window: list[float] = []  # synchronised clock before the first timed step and after the last
        self.steps: list[dict] = []
        self._marks: _Marks | None = None
        self._last_end: float | None = None
        self._fit_start = time.perf_counter()
        self._first_step_at: float | None = None
        self._peak = 0.0

    # ------------------------------------------------------------------ the module's own phases
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._marks is None:
            yield
            return
        self._marks.start(name)
        try:
            yield
        finally:
            self._marks.end(name)

    # ------------------------------------------------------------------ Lightning's hooks
    def setup(self, trainer, module, stage: str) -> None:
        module.step_profiler = self

    def on_train_start(self, trainer, module) -> None:
        self._cuda = module.device.type == "cuda"
        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._train_start = time.perf_counter()
        self._last_end = self._train_start

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._data_seconds = time.perf_counter() - self._last_end  # the loader's next() and the host-to-device copy
        if len(self.steps) == self.skip and not self._window:
            self._sync()
            self._window.append(time.perf_counter())
        self._marks = _Marks(self._cuda) if self.phases else None
        if self._marks is not None:
            self._marks.start("step")

    def on_before_backward(self, trainer, module, loss) -> None:
        if self._marks is not None:
            self._marks.start("backward")

    def on_after_backward(self, trainer, module) -> None:
        if self._marks is not None:
            self._marks.end("backward")

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if self._marks is not None:
            self._marks.start("optimizer")
        if self.host is not None and len(self.steps) >= self.skip:
            self.host.enable()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.host is not None:
            self.host.disable()
        if self._marks is not None:
            self._marks.end("optimizer")
            self._marks.end("step")
        last = 0 < trainer.max_steps <= trainer.global_step
        if self.sync_every_step or self._first_step_at is None or (last and len(self._window) == 1):
            self._sync()
        now = time.perf_counter()
        if self._first_step_at is None:
            self._first_step_at, self._first_step_unix = now, time.time()
        if last and len(self._window) == 1:
            self._window.append(now)
        record = {"step": trainer.global_step, "wall": now - self._last_end, "data": self._data_seconds}
        if self._marks is not None:
            record["marks"] = self._marks  # read once the GPU has passed them (at the end)
            record["peak_gib"] = self._marks.peaks
            self._peak = max([self._peak, *self._marks.peaks.values()])
        self.steps.append(record)
        self._last_end = now

    def on_train_end(self, trainer, module) -> None:
        module.step_profiler = None
        self._sync()
        if len(self._window) == 1:  # stopped before max_steps (max_time, an error): the window ends here
            self._window.append(time.perf_counter())
        for record in self.steps:
            if "marks" in record:
                record["gpu"] = record.pop("marks").seconds()
        summary = self.summary(module)
        # every rank's trainable weights, summed: under DDP they must agree (the gradients were all-reduced)
        summary["trainable_sum"] = float(sum(p.detach().double().sum() for p in module.parameters() if p.requires_grad))
        summary["world_size"] = trainer.world_size
        out = self.out if trainer.global_rank == 0 else self.out.with_suffix(f".rank{trainer.global_rank}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1))
        if self.host is not None:
            text = io.StringIO()
            pstats.Stats(self.host, stream=text).sort_stats("cumulative").print_stats(45)
            out.with_suffix(".host.txt").write_text(
                f"host time inside the optimizer phase of {max(0, len(self.steps) - self.skip)} steps\n"
                + text.getvalue())

    # ------------------------------------------------------------------ the summary
    def summary(self, module) -> dict:
        timed = self.steps[self.skip:] or self.steps
        median = lambda values: statistics.median(values) if values else None  # noqa: E731
        phases: dict[str, float] = {}
        peaks: dict[str, float] = {}
        if timed and "gpu" in timed[0]:
            names = {n for s in timed for n in s["gpu"]}
            phases = {n: median([s["gpu"].get(n, 0.0) for s in timed]) for n in sorted(names)}
            peaks = {n: max(s["peak_gib"].get(n, 0.0) for s in timed) for n in sorted(names) if n != "step"}
        window = (self._window[1] - self._window[0]) / len(timed) if len(self._window) == 2 and timed else None
        return {
            "steps_timed": len(timed),
            "step_seconds": median([s["wall"] for s in timed]) if self.sync_every_step or window is None else window,
            "timing": "median of synchronised steps" if self.sync_every_step or window is None else
                      "mean over the timed steps between two synchronisations",
            "data_seconds": median([s["data"] for s in timed]),
            "gpu_phase_seconds": phases,
            "phase_peak_memory_gib": peaks,
            # phases reset the allocator's peak counter, so the step's peak is the largest phase peak
            "peak_memory_gib": (max(self._peak, torch.cuda.max_memory_allocated() / 2**30) if self._cuda else None),
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if self._cuda else None,
            "seconds_to_first_step_end": (self._first_step_at or 0) - self._fit_start,
            "first_step_end_unix": getattr(self, "_first_step_unix", None),
            "train_seconds": (self._last_end or 0) - self._train_start,
            "steps": self.steps,
        }
