"""Step timing and a per-phase profile of training, for speed work (``benchmarks/speed.py`` adds it to ``train``).

``StepProfiler`` times every optimizer step (CUDA-synchronised at the step's end, as a user's wall clock sees it)
and, inside the step, the GPU time of each phase: the method's own phases (teacher, target, student forward,
loss: marked by :meth:`ConsistencyModule.phase`) and Lightning's (backward, optimizer). Phase times come from
CUDA events, which do not stall the GPU; "idle" is the part of the step the GPU spent waiting for the host.
"""

from __future__ import annotations

import json
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
    """

    def __init__(self, out: str, skip: int = 10, phases: bool = True):
        self.out, self.skip, self.phases = Path(out), skip, phases
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

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._data_seconds = time.perf_counter() - self._last_end  # the loader's next() and the host-to-device copy
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

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self._marks is not None:
            self._marks.end("optimizer")
            self._marks.end("step")
        if self._cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._first_step_at is None:
            self._first_step_at, self._first_step_unix = now, time.time()
        record = {"step": trainer.global_step, "wall": now - self._last_end, "data": self._data_seconds}
        if self._marks is not None:
            record["gpu"] = self._marks.seconds()
            record["peak_gib"] = self._marks.peaks
            self._peak = max([self._peak, *self._marks.peaks.values()])
        self.steps.append(record)
        self._last_end = now

    def on_train_end(self, trainer, module) -> None:
        module.step_profiler = None
        summary = self.summary(module)
        # every rank's trainable weights, summed: under DDP they must agree (the gradients were all-reduced)
        summary["trainable_sum"] = float(sum(p.detach().double().sum() for p in module.parameters() if p.requires_grad))
        summary["world_size"] = trainer.world_size
        out = self.out if trainer.global_rank == 0 else self.out.with_suffix(f".rank{trainer.global_rank}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1))

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
        return {
            "steps_timed": len(timed),
            "step_seconds": median([s["wall"] for s in timed]),
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
