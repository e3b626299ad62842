"""Step timing and a per-phase profile of training, for speed work (``benchmarks/speed.py`` adds it to ``train``).

``StepProfiler`` times the optimizer steps after the warm-up as a user's wall clock sees a run: one CUDA
synchronisation before the first timed step and one after the last, the mean step between them (the host queues
work ahead as in any run; ``sync_every_step`` synchronises after each step instead and takes the median). Inside
the step, the GPU time of each phase: the method's own phases (teacher, target, student forward, loss: marked by
:meth:`ConsistencyModule.phase`) and Lightning's (backward, optimizer), from CUDA events, which do not stall the GPU.
"""

from __future__ import annotations

import cProfile
import gc
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
        kernel_trace: trace this many steps after the warm-up with ``torch.profiler`` and write the device time
            by kernel family (matmul, convolution, attention, normalisation, elementwise...) and the top kernels
            to ``<out>.kernels.txt`` (``kernel_ms_per_step`` in the summary). The timed steps start after the traced
            ones (the tracer slows the host).
        timed_steps: time only this many steps after the warm-up (0: every step to the end), so that a long run
            (the seed's 1,000-step job) gives its step time without the grids, validation and checkpoints that
            come later in it.

    The summary also holds ``gc``: the collections of Python's garbage collector during training, and the host time
    they took (a full collection over a large object graph stalls the step that triggers it). And ``milestones``:
    the wall clock (unix seconds) at Lightning's setup, fit start, train start and the end of the first step, so the
    time to the first step splits into its parts.
    """

    def __init__(self, out: str, skip: int = 10, phases: bool = True, host_profile: bool = False,
                 sync_every_step: bool = False, kernel_trace: int = 0, timed_steps: int = 0):
        self.out, self.skip, self.phases, self.sync_every_step = Path(out), skip, phases, sync_every_step
        self.timed_steps = timed_steps
        self.host = cProfile.Profile() if host_profile else None
        self._host_steps = 0
        self.kernel_trace = kernel_trace
        self._tracer = None
        self.kernels: dict | None = None
        self.milestones: dict[str, float] = {}
        self._window: list[float] = []  # synchronised clock before the first timed step and after the last
        self.steps: list[dict] = []
        self._marks: _Marks | None = None
        self._last_end: float | None = None
        self._fit_start = time.perf_counter()
        self._first_step_at: float | None = None
        self._peak = 0.0
        self.gc = {"collections": 0, "full_collections": 0, "seconds": 0.0, "longest_seconds": 0.0}
        self._gc_started: float | None = None

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

    def _gc_event(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            seconds = time.perf_counter() - self._gc_started
            self._gc_started = None
            self.gc["collections"] += 1
            self.gc["full_collections"] += info.get("generation") == 2
            self.gc["seconds"] += seconds
            self.gc["longest_seconds"] = max(self.gc["longest_seconds"], seconds)

    # ------------------------------------------------------------------ Lightning's hooks
    def setup(self, trainer, module, stage: str) -> None:
        module.step_profiler = self
        self.milestones["setup"] = time.time()

    def on_fit_start(self, trainer, module) -> None:
        self.milestones["fit_start"] = time.time()  # the module's setup done: weights cast, compiled, moved

    def on_train_start(self, trainer, module) -> None:
        self._cuda = module.device.type == "cuda"
        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._train_start = time.perf_counter()
        self._last_end = self._train_start
        self.milestones["train_start"] = time.time()  # the module's on_fit_start done: CUDA graphs captured
        gc.callbacks.append(self._gc_event)

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._data_seconds = time.perf_counter() - self._last_end  # the loader's next() and the host-to-device copy
        if len(self.steps) == self.skip + self.kernel_trace and not self._window:
            self._sync()
            self._window.append(time.perf_counter())
        if self.kernel_trace and len(self.steps) == self.skip and self._tracer is None:
            self._tracer = KernelTracer(self._cuda)
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
        # the timed steps only: under Python 3.12 cProfile and the kernel tracer's stack recording cannot both run
        if self.host is not None and len(self.steps) >= self.skip + self.kernel_trace:
            self.host.enable()
            self._host_steps += 1

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.host is not None:
            self.host.disable()
        if self._marks is not None:
            self._marks.end("optimizer")
            self._marks.end("step")
        # before the clock is read: writing the trace is charged to the traced step, not the next one
        if self._tracer is not None and self.kernels is None:
            if self._tracer.count_step() == self.kernel_trace:
                self.kernels = self._tracer.finish(self.out.with_suffix(".kernels.txt"))
        window_ends = 0 < trainer.max_steps <= trainer.global_step or (
            self.timed_steps > 0 and len(self.steps) + 1 == self.skip + self.kernel_trace + self.timed_steps)
        if self.sync_every_step or self._first_step_at is None or (window_ends and len(self._window) == 1):
            self._sync()
        now = time.perf_counter()
        if self._first_step_at is None:
            self._first_step_at, self._first_step_unix = now, time.time()
            self.milestones["first_step_end"] = self._first_step_unix
        if window_ends and len(self._window) == 1:
            self._window.append(now)
        record = {"step": trainer.global_step, "wall": now - self._last_end, "data": self._data_seconds}
        if self._marks is not None:
            record["marks"] = self._marks  # read once the GPU has passed them (at the end)
            record["peak_gib"] = self._marks.peaks
            self._peak = max([self._peak, *self._marks.peaks.values()])
        self.steps.append(record)
        self._last_end = now

    def _stop_counting_gc(self) -> None:
        if self._gc_event in gc.callbacks:
            gc.callbacks.remove(self._gc_event)

    def on_exception(self, trainer, module, exception) -> None:
        self._stop_counting_gc()

    def on_train_end(self, trainer, module) -> None:
        module.step_profiler = None
        self._stop_counting_gc()
        self._sync()
        if len(self._window) == 1:  # stopped before max_steps (max_time, an error): the window ends here
            self._window.append(time.perf_counter())
        if self._tracer is not None and self.kernels is None:  # stopped before the traced steps were done
            self.kernels = self._tracer.finish(self.out.with_suffix(".kernels.txt"))
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
                f"host time inside the optimizer phase of {self._host_steps} steps\n"
                + text.getvalue())

    # ------------------------------------------------------------------ the summary
    def summary(self, module) -> dict:
        first = self.skip + self.kernel_trace
        timed = self.steps[first:first + self.timed_steps if self.timed_steps else None] or self.steps
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
            "milestones": self.milestones,
            "gc": {k: round(v, 4) if isinstance(v, float) else v for k, v in self.gc.items()},
            "kernel_ms_per_step": self.kernels,
            "steps": self.steps,
        }


# ------------------------------------------------------------------------------------------------ kernel families
_FAMILIES = (  # first match wins: kernel names from cuBLAS / cuDNN / CUTLASS / flash-attention / Triton / ATen
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("layout transform", ("nchwtonhwc", "nhwctonchw")),  # cuDNN's, around each convolution of an NCHW tensor
    ("convolution", ("conv", "implicit_gemm", "wgrad", "dgrad", "nchw", "nhwc", "winograd", "fprop")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "splitk", "aten::mm", "addmm", "bmm")),
    ("normalisation", ("norm", "moments", "computeinternalgradients")),
    ("optimizer", ("adam", "foreach", "multi_tensor", "l2norm")),
    ("copy / cast", ("copy", "memcpy", "memset", "catarray", "fill")),
    ("reduction", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "triton", "silu", "gelu", "pointwise", "aten::mul",
                     "aten::add", "aten::div", "aten::sub")),
)


def kernel_family(name: str) -> str:
    """The family a device kernel's name belongs to (``other`` when none matches)."""
    lowered = _short_kernel_name(name).lower()  # a template's full name may hold words such as 'nocast'
    return next((family for family, keys in _FAMILIES if any(k in lowered for k in keys)), "other")


def _short_kernel_name(name: str, width: int = 160) -> str:
    """A kernel's name cut to ``width``; ATen's elementwise templates keep the functor that says what they compute."""
    if "elementwise_kernel" in name and "<" in name:
        inner = [part for part in name.replace("<", " ").replace(">", " ").replace(",", " ").split()
                 if "::" in part and "gpu_kernel" not in part and "elementwise_kernel" not in part]
        name = name.split("<", 1)[0] + " <" + " ".join(inner[:4]) + ">"
    return name[:width]


def _runs_on(event, device: str) -> bool:
    return str(event.device_type).rsplit(".", 1)[-1] == device  # DeviceType.CUDA / DeviceType.CPU


class KernelTracer:
    """``torch.profiler`` over a few steps: device time by kernel family (CPU-side op time where there is no GPU).

    ``count_step()`` after each step; ``finish(path)`` writes the tables and returns the families' ms per step."""

    def __init__(self, cuda: bool, with_stack: bool = True):
        from torch.profiler import ProfilerActivity, profile

        self.cuda, self.steps = cuda, 0
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        # stacks: which lines launched the time (key_averages reads them only under the verbose config)
        verbose = torch._C._profiler._ExperimentalConfig(verbose=True)
        self.profile = profile(activities=activities, with_stack=with_stack, experimental_config=verbose)
        self.profile.__enter__()

    def count_step(self) -> int:
        self.steps += 1
        return self.steps

    def finish(self, path: Path) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
        self.profile.__exit__(None, None, None)
        steps = max(1, self.steps)
        rows = []  # (name, family, ms per step, calls per step)
        for event in self.profile.key_averages():
            if getattr(event, "is_user_annotation", False):  # ranges such as the optimizer step's, not kernels
                continue
            if self.cuda:
                if not _runs_on(event, "CUDA"):
                    continue
                micros = event.self_device_time_total
            else:  # CPU: the ops' own host time stands in (no kernels to read)
                if not event.key.startswith("aten::"):
                    continue
                micros = event.self_cpu_time_total
            rows.append((event.key, kernel_family(event.key), micros / 1000 / steps, event.count / steps))
        families: dict[str, float] = {}
        for _, family, ms, _ in rows:
            families[family] = families.get(family, 0.0) + ms
        total = sum(families.values())
        lines = [f"{'device' if self.cuda else 'host (no GPU)'} time per step over {self.steps} traced steps: "
                 f"{total:.1f} ms", "", "family           ms/step   share"]
        for family, ms in sorted(families.items(), key=lambda item: -item[1]):
            lines.append(f"{family:<16} {ms:8.2f}  {ms / total if total else 0:6.1%}")
        lines += ["", "  ms/step  calls/step  family          kernel (ATen's templated names shortened to their functor)"]
        for name, family, ms, calls in sorted(rows, key=lambda row: -row[2])[:60]:
            lines.append(f"{ms:9.2f} {calls:10.1f}  {family:<15} {_short_kernel_name(name)}")
        try:
            lines += self._ops_table(steps)
        except Exception as error:  # a diagnostic: never lose the run's other results to it
            lines.append(f"(the ops table failed: {error})")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return {"total": round(total, 2), **{k: round(v, 2) for k, v in sorted(families.items())}}

    def _ops_table(self, steps: int) -> list[str]:
        """ATen ops by the device time of the kernels they launched (host time on the CPU), with their callers."""
        def own_time(event) -> float:
            return event.self_device_time_total if self.cuda else event.self_cpu_time_total

        lines = ["", f"ops by the {'device time of the kernels they launch' if self.cuda else 'host time'}, with the "
                 "Python lines that called them", "  ms/step  calls/step  op <- callers"]
        grouped: dict[tuple, list[float]] = {}  # (op, callers) -> [time, calls], over every module instance
        for event in self.profile.key_averages(group_by_stack_n=12):
            if not _runs_on(event, "CPU") or not event.key.startswith("aten::"):
                continue
            frames = tuple(f for f in event.stack if "torch/" not in f and not f.startswith(("<built-in", "nn.Module")))
            entry = grouped.setdefault((event.key, frames[:3]), [0.0, 0.0])
            entry[0] += own_time(event)
            entry[1] += event.count
        for (op, frames), (micros, calls) in sorted(grouped.items(), key=lambda item: -item[1][0])[:40]:
            if micros > 0:
                lines.append(f"{micros / 1000 / steps:9.2f} {calls / steps:10.1f}  {op}  <- {' <- '.join(frames)}")
        return lines
