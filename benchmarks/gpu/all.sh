#!/usr/bin/env bash
# Issues 10 and 12 in ONE device call, one workload per GPU (no GPU shared; the host's cores are). On 3+ GPUs (x4):
#   GPU 0: speed.sh: cache build, training rows (CD, MCD, CT, checkpointed CD), the reference loop, sampling latency
#   GPU 1: speed.sh: the seed's whole 1,000-step job, command to exported LoRA (after building its own cache)
#   GPU 2: quality.sh: the shapes-world runs with validation, their table and the validation metric's ranking
# On 2 GPUs (x2) GPU 1 runs SECOND: quality (default), job, or speed (speed.sh with SECOND_ARGS, its own work folder).
# Run from the repo root with .whl carried:  bash benchmarks/gpu/all.sh   (env: SPEED_ARGS, SECOND, SECOND_ARGS, JOB_ARGS,
# QUALITY_MAX_TIME, QUALITY_GPU_TESTS_K; JOB_SKIP_GPU_TESTS= runs the GPU tests before the job; JOB_BUDGET_S;
# THEN_ARGS, THEN_GPU_TESTS_K, THEN_BUDGET_S: a second speed.sh on the job's GPU after the job)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ ! -d .whl/wandb ] || python3 -c 'import wandb' 2>/dev/null || python3 -m pip install -q --no-index --find-links .whl/wandb wandb || exit 1
export SKIP_INSTALL=1
ROOT=${OUT:-/tmp/out}; mkdir -p "$ROOT"
SPEED_ARGS=${SPEED_ARGS:---sections prepare,train,reference,sample --images 2048 --workers 14 --steps 30 --skip 10 --variants cd,mcd,ct,cd_ckpt --late-variants mcd_ckpt,ct_ckpt --reference no_ckpt --sample-cases mcd,cd,teacher --sample-modes fast}
# GPU 0 skips the GPU-only tests unless SKIP_GPU_TESTS= is given (call 12 lost its last rows to their 196 s):
# run them on the second GPU (QUALITY_GPU_TESTS_K, JOB_SKIP_GPU_TESTS=)
CUDA_VISIBLE_DEVICES=0 SKIP_GPU_TESTS=${SKIP_GPU_TESTS-1} OUT=$ROOT/speed WORK=/tmp/speed0 BUDGET_S=${BUDGET_S:-440} bash benchmarks/gpu/speed.sh $SPEED_ARGS > "$ROOT/gpu0_speed.txt" 2>&1 &
SECOND=${SECOND:-quality}
if [ "$(nvidia-smi -L | wc -l)" -ge 3 ]; then JOB_GPU=1 QUALITY_GPU=2
else case $SECOND in job) JOB_GPU=1 QUALITY_GPU=;; quality) JOB_GPU= QUALITY_GPU=1;; *) JOB_GPU= QUALITY_GPU=;; esac; fi
# THEN_ARGS: a second speed.sh on the job's GPU after the job (own work folder; THEN_GPU_TESTS_K: GPU tests first)
[ -z "$JOB_GPU" ] || { CUDA_VISIBLE_DEVICES=$JOB_GPU OUT=$ROOT/job WORK=/tmp/speed1 SKIP_GPU_TESTS=${JOB_SKIP_GPU_TESTS-1} BUDGET_S=${JOB_BUDGET_S:-560} bash benchmarks/gpu/speed.sh ${JOB_ARGS:---sections prepare,job --images 2048 --workers 10} > "$ROOT/gpu_job.txt" 2>&1
  [ -z "${THEN_ARGS:-}" ] || CUDA_VISIBLE_DEVICES=$JOB_GPU OUT=$ROOT/then WORK=/tmp/speed2 SKIP_GPU_TESTS=$([ -n "${THEN_GPU_TESTS_K:-}" ] || echo 1) GPU_TESTS_K="${THEN_GPU_TESTS_K:-}" BUDGET_S=${THEN_BUDGET_S:-200} bash benchmarks/gpu/speed.sh $THEN_ARGS > "$ROOT/gpu_then.txt" 2>&1; } &
# QUALITY_GPU_TESTS_K: GPU-only tests (tests/unit/test_fast_paths.py -k ...) on the quality GPU before its runs
quality_gpu_tests() {
  [ -n "${QUALITY_GPU_TESTS_K:-}" ] || return 0
  PYTHONPATH=/tmp/site:$PWD PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -m pytest -q -p no:cacheprovider tests/unit/test_fast_paths.py -k "$QUALITY_GPU_TESTS_K"
  # the cache build's overlap test must fail when the build reads its copies without waiting for them
  PYTHONPATH=/tmp/site:$PWD PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -c 'import sys, torch, pytest; torch.cuda.Event.synchronize = lambda self: None; code = pytest.main(["-q", "-p", "no:cacheprovider", "tests/unit/test_fast_paths.py", "-k", "cache_build"]); print("race mutant:", "caught" if code == 1 else "NOT caught", code)'
}
[ -z "$QUALITY_GPU" ] || { export CUDA_VISIBLE_DEVICES=$QUALITY_GPU; quality_gpu_tests > "$ROOT/gpu_tests.txt" 2>&1
  OUT=$ROOT/quality MAX_TIME=${QUALITY_MAX_TIME:-00:00:03:45} CT_SWEEP= bash benchmarks/gpu/quality.sh > "$ROOT/gpu_quality.txt" 2>&1; } &
[ "$SECOND" != speed ] || CUDA_VISIBLE_DEVICES=1 OUT=$ROOT/speed1 WORK=/tmp/speed1 SKIP_GPU_TESTS=1 BUDGET_S=${BUDGET_S:-440} bash benchmarks/gpu/speed.sh ${SECOND_ARGS:-} > "$ROOT/gpu1_speed.txt" 2>&1 &
wait
# the device tool brings back at most 8 files (16 MiB each): one tarball per workload beside the three logs
for part in speed speed1 job then quality; do
  [ -d "$ROOT/$part" ] && tar -C "$ROOT" -cf "$ROOT/$part.tar" "$part" && rm -rf "${ROOT:?}/$part"
done
ls -la "$ROOT"
tail -25 "$ROOT/gpu0_speed.txt"; tail -25 "$ROOT/gpu1_speed.txt" 2>/dev/null; tail -8 "$ROOT/gpu_job.txt" 2>/dev/null
tail -12 "$ROOT/gpu_then.txt" 2>/dev/null; tail -20 "$ROOT/gpu_quality.txt" 2>/dev/null; tail -6 "$ROOT/gpu_tests.txt" 2>/dev/null
