"""Speed and memory at SD1.5 scale, through the real entry points, in one process tree (issue 10).

What it measures, each section written to ``--out`` (JSON) as soon as it is done, so a run cut short keeps what it has:
  machine   the card, torch, and its measured bf16 matmul rate (the MFU denominator);
  prepare   ``python -m cm_lightning.prepare`` on a generated COCO-layout folder: images/s of the cache build;
            (``prepare_trace``: the same build traced in-process, GPU kernel time against wall time per batch;
            ``prepare_nobenchmark``: a second build into a cache of its own, with ``trainer.benchmark=false``: since
            14595a2 the build never autotunes, so it equals ``prepare``; call 13 measured the difference before;
            ``prepare_compiled`` / ``prepare_compiled_warm``: builds of their own with the VAE encode compiled
            (``data.datamodule.compile_image_encoder=true``), cold, then from the Inductor cache the first filled;
            each also reports its rate after the first batch, where the compile and the workers' start-up are);
  train     ``python -m cm_lightning.train`` per variant (method, LoRA forward, precision, checkpointing) with the
            ``StepProfiler`` callback: median step, samples/s, MFU, peak memory, per-phase GPU time, first step;
  reference a loop written the way diffusers' LCM-LoRA example trains (two UNet copies, VAE + text encode every
            step, separate cond/uncond teacher passes, fp16 autocast with a grad scaler), same card, same call;
  sample    ``load_drawer(...).draw`` (what ``sample`` runs) end to end, prompts to pixels on the host, for the MCD
            and CD students at batch 1 and 8 and the teacher's 50-step and 4-step CFG DDIM, before and after the
            fast paths;
  job       (if the time budget allows) the seed's whole job, 1,000 MCD steps, command to exported LoRA, with MCD's
            training row timed inside it (``mcd_row``: --steps steps after --skip); the sampling draws MCD with its
            LoRA when there is no MCD row;
  unet_calls (a calibration) issue 10's table of single UNet calls, eager: base, LoRA unmerged, merged;
  late      the late train variants, while the budget lasts (last, unless --sections places them).
The sections run in the order ``--sections`` lists them, each only where its estimated time (``ESTIMATED_SECONDS``)
fits in what is left of the budget (--budget-s).
``--scale tiny`` runs the same on the tiny model on a CPU in about two minutes (to check the script, not to time).
Usage: python benchmarks/speed.py --work /tmp/speed --out speed.json [--scale sd15|tiny] [--budget-s 560]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import date
from pathlib import Path

import torch

UNET_TFLOP_PER_SAMPLE = 0.803  # SD1.5 UNet forward at 512 px (64x64 latents, 77 tokens), counted in environment.md
# UNet forward-equivalents per sample in one step, counting a backward as two forwards (issue 10's convention):
# CD/MCD: teacher cond + uncond (2), target (1), student forward + backward (3); CT: no teacher.
FORWARDS_PER_SAMPLE = {"cd": 6, "mcd": 6, "ct": 4}
STARTED = time.perf_counter()
# about how long a section or a row takes on the H200 (call 27: reference 36, sample 45, unet_calls 41 s);
# one starts only where it fits what is left of the budget
ESTIMATED_SECONDS = {"reference": 40, "sample": 50, "unet_calls": 45, "row": 40, "ckpt_row": 36}


# ------------------------------------------------------------------------------------------------ helpers
def elapsed() -> float:
    return time.perf_counter() - STARTED


def save(results: dict, out: Path) -> None:
    out.write_text(json.dumps(results, indent=1, default=str))


def matmul_tflops(device: torch.device) -> float | None:
    """Measured bf16 dense matmul rate (8192^3, median of 20), the card's practical peak."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def write_inputs(work: Path, scale: str, images: int) -> tuple[Path, Path]:
    """A model folder (random SD1.5 weights, or the tiny model) and a COCO-layout folder of generated JPEGs, written
    side by side (the weights' initialisation and writes, and PIL's JPEG encoding, release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        coco = pool.submit(write_images, work, scale, images)
        return write_model(work, scale), coco.result()


def write_model(work: Path, scale: str) -> Path:
    model = work / "model"
    if scale == "sd15":
        from cm_lightning.models.sd15_architecture import write_random_sd15

        if not (model / "model_index.json").is_file():
            write_random_sd15(model, device="cuda" if torch.cuda.is_available() else "cpu")
    else:
        from cm_lightning.models.tiny import ensure_tiny_sd

        ensure_tiny_sd(model)
    return model


def write_images(work: Path, scale: str, images: int) -> Path:
    from cm_lightning.data.synthetic import write_coco_folder

    coco = work / "coco"
    if not (coco / "annotations").is_dir():
        size = (640, 480) if scale == "sd15" else (48, 40)
        write_coco_folder(coco, images, image_size=size, captions_per_image=1)
    return coco


def base_overrides(scale: str, model: Path, coco: Path, images: int, workers: int) -> list[str]:
    common = [f"model.pretrained={model}", "data=coco5k", f"data.root={coco}",
              f"data.datamodule.source.num_pairs={images}", "data.datamodule.progress=false"]
    if scale == "sd15":
        return ["model=local", "model.resolution=512", "model.encoder_dtype=bf16", "trainer=gpu",
                f"data.datamodule.num_workers={workers}", "data.datamodule.encode_batch_size=64", *common]
    return ["model=local", "model.resolution=32", "trainer=cpu", "data.datamodule.num_workers=0", "lora.rank=4",
            *common]


def run(cmd: list[str], log: Path, env: dict, timeout: float | None = None) -> tuple[int, float, str]:
    started = time.perf_counter()
    with log.open("w") as handle:
        try:
            code = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = -9
    return code, time.perf_counter() - started, log.read_text()[-3000:]


# ------------------------------------------------------------------------------------------------ sections
def measure_prepare(args, overrides: list[str], env: dict, name: str = "prepare") -> dict:
    """`prepare` into a cache folder of its own (``name``), so that a second variant builds instead of reusing."""
    cmd = [sys.executable, "-m", "cm_lightning.prepare", *overrides, f"hydra.run.dir={args.work}/{name}_run"]
    env = env if name == "prepare" else {**env, "CM_LIGHTNING_CACHE": str(args.work / f"cache_{name}")}
    code, wall, tail = run(cmd, args.work / f"{name}.log", env)
    match = re.search(r"built in ([\d.]+) s", tail)
    seconds = float(match.group(1)) if match else None
    first = re.search(r"the first batch ([\d.]+) s", tail)  # workers' start-up (and a compile) in it
    first_batch = float(first.group(1)) if first else None
    batch = 64 if args.scale == "sd15" else 32  # data.datamodule.encode_batch_size (base_overrides; coco5k.yaml)
    rest = args.images - batch if args.images > batch else None
    return {"command": " ".join(cmd[1:]), "returncode": code, "wall_seconds": round(wall, 1),
            "build_seconds": seconds, "images": args.images, "first_batch_seconds": first_batch,
            "images_per_s": round(args.images / seconds, 1) if seconds else None,
            "images_per_s_after_first_batch": round(rest / (seconds - first_batch), 1)
            if seconds and first_batch is not None and rest and seconds > first_batch else None,
            "log_tail": tail[-600:]}


TRAIN_VARIANTS = {
    # name: overrides (on top of each method's defaults)
    # the defaults before issue 10: peft's LoRA forward, fp16 with loss scaling, foreach AdamW, no graphs
    "cd_before_ckpt": ["method=cd", "method.module.lora_forward=peft", "trainer.precision=16-mixed",
                       "method.module.gradient_checkpointing=true", "method.module.cuda_graphs=false",
                       "optimizer.fused=false"],
    "cd_before": ["method=cd", "method.module.lora_forward=peft", "trainer.precision=16-mixed",
                  "method.module.gradient_checkpointing=false", "method.module.cuda_graphs=false",
                  "optimizer.fused=false"],
    "cd_nographs": ["method=cd", "method.module.cuda_graphs=false"],
    "cd_peft_bf16": ["method=cd", "method.module.lora_forward=peft", "method.module.gradient_checkpointing=false"],
    "cd_merged_fp16": ["method=cd", "trainer.precision=16-mixed", "method.module.gradient_checkpointing=false"],
    "cd": ["method=cd"],
    "cd_ckpt": ["method=cd", "method.module.gradient_checkpointing=true"],
    "mcd_ckpt": ["method=mcd", "boundaries=4", "method.module.gradient_checkpointing=true"],
    "ct_ckpt": ["method=ct", "method.module.gradient_checkpointing=true"],
    "mcd": ["method=mcd", "boundaries=4"],
    "ct": ["method=ct"],
    "cd_compile": ["method=cd", "method.module.compile_blocks=true"],
    # session 4: which UNet calls leave autocast (default: teacher and target), channels-last convolutions
    "cd_autocast_all": ["method=cd", "method.module.half_precision_roles=[]"],
    "cd_half_student": ["method=cd", "method.module.half_precision_roles=[teacher,target,student]"],
    "cd_channels_last": ["method=cd", "method.module.channels_last=true"],
    # issue 14: one GPU against DDP over two (nvidia-h200-x2), CUDA graphs on and off
    "mcd_ddp2": ["method=mcd", "boundaries=4", "trainer=ddp", "trainer.devices=2"],
    "mcd_ddp2_nographs": ["method=mcd", "boundaries=4", "trainer=ddp", "trainer.devices=2",
                          "method.module.cuda_graphs=false"],
    "mcd_nographs": ["method=mcd", "boundaries=4", "method.module.cuda_graphs=false"],
    "cd_half_student_cl": ["method=cd", "method.module.half_precision_roles=[teacher,target,student]",
                           "method.module.channels_last=true"],
    # session 5: the rank-r LoRA backward (now the default) against autograd's dense dW'; cuDNN's autotuner off;
    # the optimizer phase's host time under cProfile (its own run: the profiler slows that phase)
    "cd_dense_backward": ["method=cd", "method.module.lora_forward=merged_dense_backward"],
    "cd_nobenchmark": ["method=cd", "trainer.benchmark=false"],
    "cd_host_profile": ["method=cd", "+callbacks.step_profiler.host_profile=true"],
    "cd_synced": ["method=cd", "+callbacks.step_profiler.sync_every_step=true"],  # session 4's timing method
    # session 6: the device time by kernel family (torch.profiler over 3 steps; the timed steps follow them; eager,
    # so that no kernel hides inside a graph: the kernels are the same), and regional compilation under the graphs,
    # run twice: cold, then from the compile cache the first run filled
    "cd_trace": ["method=cd", "method.module.cuda_graphs=false", "+callbacks.step_profiler.kernel_trace=3"],
    "cd_compile_warm": ["method=cd", "method.module.compile_blocks=true"],
    "cd_trace_graphs": ["method=cd", "+callbacks.step_profiler.kernel_trace=3"],  # kernels replayed from graphs
    "cd_cl_trace": ["method=cd", "method.module.cuda_graphs=false", "method.module.channels_last=true",
                    "+callbacks.step_profiler.kernel_trace=3"],
    "cd_merged_fused": ["method=cd", "method.module.lora_forward=merged_fused"],  # W' as one bf16 GEMM (= cd now)
    "cd_merged": ["method=cd", "method.module.lora_forward=merged"],  # session 6's default: fp32 B A, cast, add
    # session 9: what compile_blocks=auto does for a long run (>= 10,000 steps): the blocks compiled (whole
    # transformers and ResNet blocks, static shapes) in channels-last; cold, then from the Inductor cache
    "cd_compile_cl": ["method=cd", "method.module.compile_blocks=true", "method.module.channels_last=true"],
    "cd_compile_cl_warm": ["method=cd", "method.module.compile_blocks=true", "method.module.channels_last=true"],
    "mcd_compile_cl": ["method=mcd", "boundaries=4", "method.module.compile_blocks=true",
                       "method.module.channels_last=true"],
    "ct_compile_cl": ["method=ct", "method.module.compile_blocks=true", "method.module.channels_last=true"],
    "cd_sdpa_default": ["method=cd", "method.module.sdpa_backends={student:default,teacher:default,target:default}"],
    # start-up: cuDNN's attention builds an execution plan per shape at the first call (flash needs none)
    "cd_flash": ["method=cd", "method.module.sdpa_backends={student:flash,teacher:flash,target:flash}"],
    # session 10: where a process's time to its first step goes (cProfile over STARTUP_STEPS steps: see
    # measure_train); the second runs later in the call, after other training processes warmed the host's caches
    "cd_startup": ["method=cd"],
    "cd_startup_later": ["method=cd"],
    # session 10: cuDNN's autotuner (trainer.benchmark=true, the default before call 24) against its heuristics (the
    # default since), on the graphed step and on the eager checkpointed step
    "cd_benchmark": ["method=cd", "trainer.benchmark=true"],
    "cd_ckpt_benchmark": ["method=cd", "method.module.gradient_checkpointing=true", "trainer.benchmark=true"],
    # session 10: the LoRA weights as ~1,700 tensors for the optimizer (before flat_parameters, the default since)
    "cd_noflat": ["method=cd", "method.module.flat_parameters=false"],
}


def profiler_overrides(profile: Path, skip: int, timed_steps: int = 0) -> list[str]:
    """The Hydra overrides that add ``StepProfiler`` to a ``train`` command."""
    return ["+callbacks.step_profiler._target_=cm_lightning.methods.profiling.StepProfiler",
            f"+callbacks.step_profiler.out={profile}", f"+callbacks.step_profiler.skip={skip}",
            *([f"+callbacks.step_profiler.timed_steps={timed_steps}"] if timed_steps else [])]


def train_row(args, folder: Path, overrides: list[str], t0: float, tflops: float | None) -> dict:
    """A training row from the profile ``StepProfiler`` wrote into ``folder``: step, MFU, memory, phases."""
    summary = json.loads((folder / "profile.json").read_text())
    step = summary["step_seconds"]
    devices = next((int(o.split("=")[1]) for o in overrides if o.startswith("trainer.devices=")), 1)
    result = {}
    ranks = [json.loads(p.read_text()) for p in sorted(folder.glob("profile.rank*.json"))]
    if ranks:  # DDP: every rank's step and its weights (equal when the gradients were all-reduced)
        result["rank_step_ms"] = [round(r["step_seconds"] * 1000, 1) for r in [summary, *ranks]]
        result["ranks_weights_agree"] = all(abs(r["trainable_sum"] - summary["trainable_sum"])
                                            <= 1e-6 * max(1.0, abs(summary["trainable_sum"])) for r in ranks)
        result["trainable_sums"] = [r["trainable_sum"] for r in [summary, *ranks]]
    method = next(o.split("=")[1] for o in overrides if o.startswith("method="))
    flops = FORWARDS_PER_SAMPLE[method] * UNET_TFLOP_PER_SAMPLE * args.batch if args.scale == "sd15" else None
    result.update({
        "devices": devices, "step_ms": round(step * 1000, 1), "samples_per_s": round(args.batch * devices / step, 1),
        "steps_timed": summary["steps_timed"],
        "tflop_per_step": flops, "mfu": round(flops / step / tflops, 3) if flops and tflops else None,
        "peak_memory_gib": summary["peak_memory_gib"], "phase_peak_memory_gib": summary["phase_peak_memory_gib"],
        "gpu_phase_ms": {k: round(v * 1000, 1) for k, v in summary["gpu_phase_seconds"].items()},
        "data_ms": round(summary["data_seconds"] * 1000, 2),
        "seconds_to_first_step": round(summary["first_step_end_unix"] - t0, 1),
        "lora": str(folder / "lora"),
    })
    return result


STARTUP_STEPS = 3  # a start-up profile's run: the first step (captures, autotuning) and two more


def measure_train(args, name: str, overrides: list[str], env: dict, tflops: float | None) -> dict:
    """One training row; a variant named ``*_startup*`` runs under cProfile for STARTUP_STEPS steps instead, and
    reports where its time to the first step went (imports, loading, setup, the first step's parts)."""
    folder = args.work / "runs" / name
    startup = "_startup" in name
    steps, skip = (STARTUP_STEPS, 1) if startup else (args.steps, args.skip)
    if "_ckpt" in name and args.ckpt_steps:  # checkpointed steps are eager and steady: fewer of them suffice
        steps, skip = args.ckpt_steps, args.ckpt_skip
    python = [sys.executable, "-m", "cProfile", "-o", str(folder / "startup.prof")] if startup else [sys.executable]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [*python, "-m", "cm_lightning.train", *overrides, f"batch_size={args.batch}",
           f"trainer.max_steps={steps}", "trainer.log_every_n_steps=10", "~callbacks.sample_grid",
           *(["~callbacks.validation"] if args.no_row_validation else []),
           f"paths.output_dir={folder}", f"hydra.run.dir={folder}", *profiler_overrides(folder / "profile.json",
                                                                                     skip)]
    t0 = time.time()
    code, wall, tail = run(cmd, args.work / f"train_{name}.log", env,
                           timeout=max(60.0, args.budget_s - elapsed()))
    result = {"command": " ".join(cmd[1:]), "returncode": code, "process_seconds": round(wall, 1)}
    if startup and (folder / "startup.prof").is_file():
        result["startup"] = startup_split(folder, t0)
    if code != 0 or not (folder / "profile.json").is_file():
        return {**result, "log_tail": tail}
    return {**result, **train_row(args, folder, overrides, t0, tflops)}


# the calls a start-up splits into (cProfile's cumulative seconds; file:function as pstats names them). The frames
# around train() are left out: under the device's Python 3.12 the profile does not time them (they read ~0 s)
STARTUP_PARTS = {
    "load_model": ("cm_lightning/cli.py", "load_model"),
    "frozen encoders to the device": ("cm_lightning/models/encoders.py", "from_components"),
    "build_module (LoRA added)": ("cm_lightning/train.py", "build_module"),
    "loggers' hyperparameters (W&B init)": ("lightning/pytorch/loggers/wandb.py", "log_hyperparams"),
    "trainer.fit": ("lightning/pytorch/trainer/trainer.py", "fit"),
    "datamodule prepare_data (cache check)": ("cm_lightning/data/datamodule.py", "prepare_data"),
    "datamodule setup": ("cm_lightning/data/datamodule.py", "setup"),
    "module setup (cast, compile decision)": ("cm_lightning/methods/base.py", "setup"),
    "module on_fit_start": ("cm_lightning/methods/base.py", "on_fit_start"),
    "training_step (all steps)": ("cm_lightning/methods/base.py", "training_step"),
    "student graphs (make_graphed_callables)": ("torch/cuda/graphs.py", "make_graphed_callables"),
    "teacher / target graphs (CudaGraphNetwork._capture)": ("cm_lightning/methods/cuda_graphs.py", "_capture"),
    "backward (all steps)": ("torch/_tensor.py", "backward"),
    "export (save_lora_diffusers)": ("cm_lightning/models/lora.py", "save_lora_diffusers"),
    "checkpoint save": ("lightning/pytorch/trainer/trainer.py", "save_checkpoint"),
    "loggers' finish (W&B)": ("cm_lightning/loggers.py", "finish_runs"),
}


def startup_split(folder: Path, t0: float) -> dict:
    """The start-up profile's parts (``STARTUP_PARTS``, cumulative seconds) and its top functions (startup.txt)."""
    import io
    import pstats

    stats = pstats.Stats(str(folder / "startup.prof"))
    parts: dict[str, float] = {}
    for label, (path, function) in STARTUP_PARTS.items():
        seconds = [row[3] for (file, _, func), row in stats.stats.items() if file.endswith(path) and func == function]
        if seconds:
            parts[label] = round(max(seconds), 2)  # the outermost call's cumulative time (recursion counted once)
    text = io.StringIO()
    pstats.Stats(str(folder / "startup.prof"), stream=text).sort_stats("cumulative").print_stats(120)
    (folder / "startup.txt").write_text(text.getvalue())
    return {"parts_seconds": parts, "profiled_seconds": round(stats.total_tt, 1)}


def measure_sampling(args, runs: dict, device: torch.device) -> dict:
    """End-to-end draw latency (prompts -> pixels on the host) through ``load_drawer``, as ``sample`` runs it."""
    from cm_lightning.models.components import load_components
    from cm_lightning.pipeline import load_drawer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # (case, LoRA, [(row name, steps, guidance)]): the teacher's drawer draws its 50-step and its 4-step CFG DDIM
    cases = [("mcd", runs.get("mcd"), [("mcd", 4, 1.0)]), ("cd", runs.get("cd"), [("cd", 4, 1.0)]),
             ("teacher", None, [("teacher", 50, 7.5), ("teacher4", 4, 7.5)])]
    out = {}
    for case, run_dir, rows in cases:
        if (case != "teacher" and run_dir is None) or case not in args.sample_cases.split(","):
            continue
        for mode in args.sample_modes.split(","):
            fast = mode.startswith("fast")
            # as `sample` runs (cli.compute_device): cuDNN's autotuner on, except in the modes before it
            torch.backends.cudnn.benchmark = mode in ("fast", "fast_compile")
            components = load_components(str(args.work / "model"))
            started = time.perf_counter()
            drawer, _ = load_drawer(components, run_dir, device=device, dtype=dtype, encoder_dtype=dtype,
                                    merge_lora=fast, cuda_graphs=fast, compile=mode == "fast_compile")
            for (name, steps, guidance), batch in ((row, batch) for row in rows for batch in (1, 8)):
                prompts = ["A sad puppy with large eyes"] * batch
                repeats = 3 if steps > 10 else 10
                times = []
                for i in range(2 + repeats):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if i == 1:  # loading, and the first draw's compilation and graph capture
                        first = time.perf_counter() - started
                    step_started = time.perf_counter()
                    drawer.draw(prompts, steps=steps, guidance_scale=guidance, seed=i, batch_size=batch)
                    if i >= 2:
                        times.append(time.perf_counter() - step_started)
                key = f"{name}_{mode}_b{batch}"
                out[key] = {"steps": steps, "guidance": guidance, "median_ms": round(statistics.median(times) * 1000, 1),
                            "min_ms": round(min(times) * 1000, 1), "seconds_to_first_draw": round(first, 1)}
                started = time.perf_counter()
                print(key, out[key], flush=True)
            del drawer, components
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def trace_prepare(args, overrides: list[str]) -> dict:
    """A diagnostic (the rate itself is `prepare`'s, above): the same cache build, in this process, under
    ``torch.profiler``, into a fresh cache folder: kernel time per batch of ``encode_batch_size`` against the build's
    wall time per batch, i.e. how long the GPU waits for the host between batches. Writes prepare.kernels.txt."""
    from cm_lightning.api import compose_config
    from cm_lightning.methods.profiling import KernelTracer
    from cm_lightning.prepare import prepare

    os.environ["CM_LIGHTNING_CACHE"] = str(args.work / "cache_traced")  # a fresh build, not the cached one
    cfg = compose_config("train", overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tracer = KernelTracer(device.type == "cuda", with_stack=False)  # no stacks: keep the host's loop as fast as untraced
    summary = prepare(cfg)
    wall = float(re.search(r"built in ([\d.]+) s", summary).group(1))  # the build, not the model's loading
    batch = int(cfg.data.datamodule.encode_batch_size)
    tracer.steps = -(-args.images // batch)  # the tables per batch
    kernels = tracer.finish(args.work / "prepare.kernels.txt")
    per_batch = wall / tracer.steps * 1000
    out = {"batches": tracer.steps, "wall_ms_per_batch": round(per_batch, 1), "kernel_ms_per_batch": kernels,
           "gpu_idle_ms_per_batch": round(per_batch - kernels["total"], 1), "summary": summary.splitlines()[0],
           "note": "wall is the build's own clock (first batch's cuDNN autotuning and the workers' start included)"}
    print("prepare trace", out, flush=True)
    return out


def calibrate_vae_layout(args, device: torch.device) -> dict:
    """A side calibration (not an entry point) to choose the VAE's memory format: FrozenEncoders' encode at batch 64
    (the cache build) and decode at batch 1 (drawing), channels-last against contiguous, and contiguous with cuDNN's
    autotuner (what the entry points use now), median of 5 / 10."""
    if device.type != "cuda":
        return {}
    from cm_lightning.models.components import load_components
    from cm_lightning.models.encoders import FrozenEncoders

    encoders = FrozenEncoders.from_components(load_components(str(args.work / "model")), device=device,
                                              dtype=torch.bfloat16)
    pixels = torch.rand(64, 3, 512, 512, device=device) * 2 - 1
    latents = torch.randn(1, 4, 64, 64, device=device)
    out = {}
    for name, layout, autotune in (("channels_last", torch.channels_last, False),
                                   ("contiguous", torch.contiguous_format, False),
                                   ("contiguous_autotuned", torch.contiguous_format, True)):
        torch.backends.cudnn.benchmark = autotune
        encoders.vae.to(memory_format=layout)
        encoders.memory_format = layout
        for label, call, repeats in (("encode_b64_ms", lambda: encoders.encode_images(pixels), 5),
                                     ("decode_b1_ms", lambda: encoders.decode_latents(latents), 10)):
            times = []
            for i in range(2 + repeats):
                torch.cuda.synchronize()
                started = time.perf_counter()
                call()
                torch.cuda.synchronize()
                if i >= 2:
                    times.append((time.perf_counter() - started) * 1000)
            out[f"{name}_{label}"] = round(statistics.median(times), 1)
    print("vae layout", out, flush=True)
    return out


def calibrate_attention(args, device: torch.device) -> dict:
    """A side calibration (not an entry point) to choose the attention kernel: the SD1.5 UNet (bf16, eager) with
    each of torch's SDPA backends forced, as the teacher calls it (batch 16, no grad) and as the student trains
    (batch 8, forward + backward), median of 5 after 2 warm-ups, CUDA events. Head dims are 40 / 80 / 160."""
    if device.type != "cuda":
        return {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cm_lightning.models.components import load_components

    unet = load_components(str(args.work / "model")).unet.to(device, torch.bfloat16).eval().requires_grad_(False)
    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    out = {}
    for name, backend in backends.items():
        for label, batch, grad in (("forward_b16_ms", 16, False), ("forward_backward_b8_ms", 8, True)):
            x = torch.randn(batch, 4, 64, 64, device=device, dtype=torch.bfloat16, requires_grad=grad)
            t = torch.full((batch,), 500, device=device)
            context = torch.randn(batch, 77, 768, device=device, dtype=torch.bfloat16)

            def call():
                with torch.set_grad_enabled(grad):
                    y = unet(x, t, context).sample
                    if grad:
                        y.float().square().mean().backward()

            try:
                with sdpa_kernel([backend]) if backend is not None else nullcontext():
                    times = []
                    for i in range(7):
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        call()
                        end.record()
                        torch.cuda.synchronize()
                        if i >= 2:
                            times.append(start.elapsed_time(end))
                out[f"{name}_{label}"] = round(statistics.median(times), 1)
            except RuntimeError as error:  # a backend that does not take these shapes
                out[f"{name}_{label}"] = f"failed: {str(error).splitlines()[0][:160]}"
    print("attention", out, flush=True)
    unet = None  # (the closures above read it) freed before the next section
    torch.cuda.empty_cache()
    return out


def calibrate_unet_calls(args, device: torch.device) -> dict:
    """A side calibration (not an entry point): issue 10's table of single UNet calls, eager, re-measured in this
    call: the SD1.5 UNet (bf16) alone at batch 1 / 8 / 16; with the default LoRA (r 64, the 14 target kinds, bf16)
    unmerged as peft runs it, at batch 1 / 8, and its forward + backward at batch 8; the same LoRA in the project's
    training forward (``lora_forward=merged_fused``: one op on W + s B A, the rank-r backward; LoRA in float32 under
    bf16 autocast, as ``train`` runs the student without its CUDA graphs), forward + backward at batch 8; and merged
    into the weights (what drawing runs), batch 1. Each call between two synchronisations, median of 10 after 3
    warm-ups (5 for the backward rows). (The compiled rows of
    the issue's table are the compiled paths' rows: ``cd_compile_cl`` and ``sample compile=true``.)"""
    from cm_lightning.models.components import load_components
    from cm_lightning.models.lora import add_lora, cast_for_training, merge_adapter, use_merged_lora_forward

    bf16 = torch.bfloat16  # (on a CPU, --scale tiny checks the code; the times mean nothing there)
    unet = load_components(str(args.work / "model")).unet.to(device, bf16).eval().requires_grad_(False)
    config = unet.config

    def median_ms(call, repeats: int = 10) -> float:
        times = []
        for i in range(3 + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times.append((time.perf_counter() - started) * 1000)
        return round(statistics.median(times), 1)

    def unet_call(batch: int, backward: bool = False, autocast: bool = False):
        x = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, device=device, dtype=bf16)
        t = torch.full((batch,), 500, device=device)
        context = torch.randn(batch, 77, config.cross_attention_dim, device=device, dtype=bf16)

        def call():
            with torch.set_grad_enabled(backward), torch.autocast(device.type, bf16, enabled=autocast):
                y = unet(x, t, context).sample
            if backward:
                y.float().square().mean().backward()
        return call

    out = {f"base_forward_b{b}_ms": median_ms(unet_call(b)) for b in (1, 8, 16)}
    add_lora(unet)  # peft's unmerged forward, every weight bf16
    unet.to(bf16)
    out.update({f"lora_peft_forward_b{b}_ms": median_ms(unet_call(b)) for b in (1, 8)})
    out["lora_peft_forward_backward_b8_ms"] = median_ms(unet_call(8, backward=True), repeats=5)
    cast_for_training(unet, bf16)  # the training student: LoRA float32, frozen weights bf16, autocast
    use_merged_lora_forward(unet, fused_merge=True)
    out["lora_merged_fused_forward_backward_b8_ms"] = median_ms(unet_call(8, backward=True, autocast=True), repeats=5)
    unet.to(bf16)
    merge_adapter(unet)
    out["lora_merged_into_weights_forward_b1_ms"] = median_ms(unet_call(1))
    print("unet calls", out, flush=True)
    unet = None
    torch.cuda.empty_cache()
    return out


def measure_job(args, overrides: list[str], env: dict, tflops: float | None) -> dict:
    """The seed's job, command to exported LoRA, with ``StepProfiler`` timing ``args.steps`` steps after
    ``args.skip`` inside it: the job's own MCD row (``train_row``), from the same process."""
    folder = args.work / "runs" / "job"
    mcd = ["method=mcd", "boundaries=4"]
    cmd = [sys.executable, "-m", "cm_lightning.train", *mcd, *overrides, f"paths.output_dir={folder}",
           f"hydra.run.dir={folder}", *profiler_overrides(folder / "profile.json", args.skip, args.steps)]
    t0 = time.time()
    code, wall, tail = run(cmd, args.work / "job.log", env, timeout=max(60.0, args.budget_s - elapsed()))
    result = {"command": " ".join(cmd[1:]), "returncode": code, "wall_seconds": round(wall, 1),
              "lora_written": (folder / "lora" / "pytorch_lora_weights.safetensors").is_file(), "log_tail": tail[-600:]}
    if code == 0 and (folder / "profile.json").is_file():
        result["mcd_row"] = train_row(args, folder, mcd + overrides, t0, tflops)
    return result


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scale", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=10)
    parser.add_argument("--variants", default="cd_before,cd,cd_nographs,mcd,ct,cd_ckpt,cd_before_ckpt")
    parser.add_argument("--ckpt-steps", type=int, default=0, help="steps of the *_ckpt rows (0: --steps)")
    parser.add_argument("--ckpt-skip", type=int, default=6, help="warm-up steps of the *_ckpt rows (with --ckpt-steps)")
    parser.add_argument("--reference-steps", type=int, default=0, help="steps of the reference loop (0: --steps)")
    parser.add_argument("--reference-skip", type=int, default=6, help="its warm-up steps (with --reference-steps)")
    parser.add_argument("--workers", type=int, default=8, help="cache-build DataLoader workers")
    parser.add_argument("--late-variants", default="cd_compile,cd_peft_bf16,cd_merged_fp16",
                        help="train variants run after sampling and the reference loop, while time remains")
    parser.add_argument("--sections", default="prepare,train,reference,job,sample",
                        help="what to run, in this order; 'late' places the late variants (else they run last)")
    parser.add_argument("--reference", default="no_ckpt,ckpt", help="reference loop variants")
    parser.add_argument("--budget-s", type=float, default=560, help="stop starting new sections after this")
    parser.add_argument("--sample-cases", default="mcd,cd,teacher", help="what the sample section draws")
    parser.add_argument("--no-row-validation", action="store_true",
                        help="train rows without the end-of-run validation (the job keeps it): its teacher drawing and "
                             "scoring come after the timed steps and cost ~8 s a process")
    parser.add_argument("--sample-modes", default="plain,fast",
                        help="plain (eager, LoRA unmerged), fast (the defaults), fast_noautotune (cuDNN autotuner off), "
                             "fast_compile (UNet blocks and VAE decoder compiled under the graphs)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = {**os.environ, "CM_LIGHTNING_CACHE": str(args.work / "cache"), "PYTHONUNBUFFERED": "1"}
    tflops = matmul_tflops(device)
    results: dict = {"date": date.today().isoformat(), "torch": torch.__version__, "scale": args.scale,
                     "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "bf16_matmul_tflops": tflops, "batch": args.batch, "steps": args.steps, "skip": args.skip,
                     "command": " ".join(sys.argv)}
    model, coco = write_inputs(args.work, args.scale, args.images)
    results["inputs_seconds"] = round(elapsed(), 1)
    overrides = base_overrides(args.scale, model, coco, args.images, args.workers)
    results["train"] = {}

    def fits(seconds: float) -> bool:
        return elapsed() + seconds <= args.budget_s

    def prepare_section(name: str, extra: list[str]) -> None:
        if elapsed() < args.budget_s:
            results[name] = measure_prepare(args, overrides + extra, env, name)
            save(results, args.out)
            print(name, {k: results[name].get(k) for k in ("images_per_s", "images_per_s_after_first_batch",
                                                           "first_batch_seconds", "returncode")}, flush=True)

    def train_variants(names: str) -> None:
        for name in filter(None, names.split(",")):
            if not fits(ESTIMATED_SECONDS["ckpt_row" if "_ckpt" in name and args.ckpt_steps else "row"]):
                results["train"][name] = "skipped: time budget"
                continue
            results["train"][name] = measure_train(args, name, overrides + TRAIN_VARIANTS[name], env, tflops)
            save(results, args.out)
            r = results["train"][name]
            print(name, {k: r.get(k) for k in ("step_ms", "mfu", "peak_memory_gib", "gpu_phase_ms", "returncode")},
                  flush=True)

    def reference_section() -> None:
        from reference_lcm_loop import measure_reference

        torch.backends.cudnn.benchmark = False  # as diffusers' LCM-LoRA script leaves it
        steps, skip = (args.reference_steps, args.reference_skip) if args.reference_steps else (args.steps, args.skip)
        results["reference"] = measure_reference(model, device, batch=args.batch, steps=steps, skip=skip,
                                                 resolution=512 if args.scale == "sd15" else 32,
                                                 gradient_checkpointing=tuple(c == "ckpt" for c in args.reference.split(",")))
        save(results, args.out)
        print("reference", results["reference"], flush=True)

    def job_section() -> None:
        cd = results["train"].get("cd")
        # without a CD row yet: the last measured job (260 s, speed.md) with some margin
        estimate = (cd["step_ms"] / 1000 * 1000 + 60) if isinstance(cd, dict) and "step_ms" in cd else 300
        if args.scale == "tiny":
            estimate = 0
        if elapsed() + estimate >= args.budget_s:
            results["job"] = f"skipped: estimated {estimate} s, {elapsed():.0f} s of the {args.budget_s} s budget used"
            return
        steps = ["trainer.max_steps=1000"] if args.scale == "sd15" else ["trainer.max_steps=20"]
        results["job"] = measure_job(args, overrides + steps, env, tflops)
        save(results, args.out)
        job = results["job"]
        print("job", {k: job.get(k) for k in ("wall_seconds", "returncode", "lora_written")},
              {k: job.get("mcd_row", {}).get(k) for k in ("step_ms", "mfu", "seconds_to_first_step")}, flush=True)

    def sample_section() -> None:
        # the LoRAs of this call's rows; MCD's from the job (MCD K=4 at the defaults) when there is no MCD row, else
        # from the checkpointed MCD row (the drawing does not depend on how the LoRA was trained)
        runs = {name: results["train"][name]["lora"] for name in ("mcd", "cd")
                if isinstance(results["train"].get(name), dict) and "lora" in results["train"][name]}
        job = results.get("job")
        if "mcd" not in runs and isinstance(job, dict) and job.get("lora_written"):
            runs["mcd"] = str(args.work / "runs" / "job" / "lora")
        ckpt = results["train"].get("mcd_ckpt")
        if "mcd" not in runs and isinstance(ckpt, dict) and "lora" in ckpt:
            runs["mcd"] = ckpt["lora"]
        results["sample"] = measure_sampling(args, runs, device)
        save(results, args.out)

    calibrations = {"prepare_trace": lambda: trace_prepare(args, overrides),
                    "vae_layout": lambda: calibrate_vae_layout(args, device),
                    "attention": lambda: calibrate_attention(args, device),
                    "unet_calls": lambda: calibrate_unet_calls(args, device)}
    # the sections run in the order --sections gives them; each starts only while the budget lasts
    results["section_seconds"] = {}  # each section's wall time, to plan what fits in one call
    for section in args.sections.split(","):
        section_started = elapsed()
        if section == "prepare":
            prepare_section("prepare", [])
        elif section == "prepare_nobenchmark":  # a second, independent build (see the docstring)
            prepare_section(section, ["trainer.benchmark=false"])
        elif section in ("prepare_compiled", "prepare_compiled_warm"):  # cold, then from the Inductor cache
            prepare_section(section, ["data.datamodule.compile_image_encoder=true"])
        elif section in calibrations and fits(ESTIMATED_SECONDS.get(section, 0)):
            results[section] = calibrations[section]()
            save(results, args.out)
        elif section == "train":
            train_variants(args.variants)
        elif section == "late":
            train_variants(args.late_variants)
        elif not fits(ESTIMATED_SECONDS.get(section, 0)):
            results[section] = "skipped: time budget"
        elif section == "reference":
            reference_section()
        elif section == "job":
            job_section()
        elif section == "sample":
            sample_section()
        else:
            raise SystemExit(f"--sections: unknown section {section!r}")
        results["section_seconds"][section] = round(elapsed() - section_started, 1)
    if "train" in args.sections.split(",") and "late" not in args.sections.split(","):  # extras, while it lasts
        train_variants(args.late_variants)
    results["total_seconds"] = round(elapsed(), 1)
    save(results, args.out)
    print(json.dumps({k: v for k, v in results.items() if k != "train"}, indent=1, default=str)[:4000])


if __name__ == "__main__":
    main()
