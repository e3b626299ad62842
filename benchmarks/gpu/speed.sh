#!/usr/bin/env bash
# Speed and memory at SD1.5 scale on one GPU (device tool), in one call: benchmarks/speed.py (prepare, train variants
# with the step profiler, the diffusers-style reference loop, sampling latency, and the 1,000-step job if time allows).
# Run from the repo root with .whl carried:  bash benchmarks/gpu/speed.sh
set -uo pipefail
[ -n "${SKIP_INSTALL:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1  # SKIP_INSTALL: done by the caller
# W&B (the default logger) where the image lacks it: pip resolves against what is installed, adds only what is missing
[ -n "${SKIP_INSTALL:-}" ] || [ ! -d .whl/wandb ] || python3 -c 'import wandb' 2>/dev/null || python3 -m pip install -q --no-index --find-links .whl/wandb wandb || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# Python's bytecode cache, as on any installed machine: the device image compiled ~2,200 modules from source in every
# process (call 23's start-up profile: 6.6 s under the profiler); the first process here writes the cache
bytecode_was="PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE:-unset} PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-unset}"
unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/pycache}
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# the CUDA driver's JIT cache (PTX compiled for this card, kept across processes): its size before and after tells
# whether the first process's longer start-up is kernels compiled once per machine
jit_cache() { echo "$1: CUDA JIT cache $(du -sk ${CUDA_CACHE_PATH:-$HOME/.nv/ComputeCache} 2>/dev/null | cut -f1) KiB"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch; print('torch', torch.__version__)"; nproc; date -u; echo "bytecode cache before: $bytecode_was"; jit_cache start; } > "$OUT/speed_machine.txt"
# IMPORT_TIMES=1: the train entry point's imports, timed twice (the first also writes the bytecode cache)
[ -z "${IMPORT_TIMES:-}" ] || for i in 1 2; do python3 -c "import time; t = time.time(); import cm_lightning.train; print('import cm_lightning.train: %.1f s' % (time.time() - t))" >> "$OUT/speed_machine.txt" 2>&1; done
# the fast paths' GPU-only tests first (CUDA graphs: outputs and gradients equal to the eager calls)
# (plugin autoload off: a plugin in the device image needs another pytest than the carried one)
[ -n "${SKIP_GPU_TESTS:-}" ] || PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fast_paths.py ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} > "$OUT/gpu_tests.txt" 2>&1; tail -4 "$OUT/gpu_tests.txt"
python3 benchmarks/speed.py --work ${WORK:-/tmp/speed} --out "$OUT/speed.json" --budget-s ${BUDGET_S:-540} "$@" 2>&1 | tee "$OUT/speed.log" | grep -v -i -E "warn|it/s]" | tail -60
{ jit_cache end; echo "bytecode cache at the end: $(du -sk $PYTHONPYCACHEPREFIX 2>/dev/null | cut -f1) KiB"; } >> "$OUT/speed_machine.txt"
tar -C ${WORK:-/tmp/speed} -czf "$OUT/speed_logs.tgz" --exclude='*.safetensors' --exclude='*.ckpt' --exclude='*.png' --exclude='*.prof' --exclude=cache --exclude=model --exclude=coco --exclude=wandb runs prepare.log $(cd ${WORK:-/tmp/speed} && ls *.log *.txt) 2>/dev/null
ls -la "$OUT"
