#!/usr/bin/env bash
# The shapes-world quality table on one GPU (device tool), in one call:
#   1. build the students' latent cache once (prepare),
#   2. train CT, CD, MCD K=2/4/8 from the shipped teacher, as five processes sharing the GPU (the small
#      UNet is launch-bound, so they overlap well); same config, same steps cap and wall-clock cap,
#   3. evaluate every row on 2 x 2,000 prompts (train-distribution and held-out prompts),
#   4. check that the validation metric (val/teacher_gap, each run's last, against the teacher's DDIM 50 at the same
#      g as the table's) ranks the runs as the table does, MCD-4 < CD-4 < CT-4: $OUT/ranking.md and ranking.json.
#   MCD-8 uses PCM's edge rule (EDGE_RULE8=pcm): iCD's leaves a top segment of one grid point at K = 8, N = 50
#   (docs/design.md); CT-4 is also evaluated with CFG at each g of CT_SWEEP (empty: no sweep).
# Run from the repo root with .whl carried:  bash benchmarks/gpu/quality.sh
# The training-seed spread of some rows:  RUNS='ct cd mcd4' SEEDS='43 44' bash benchmarks/gpu/quality.sh (one table each)
set -uo pipefail
[ -n "${SKIP_INSTALL:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1  # SKIP_INSTALL: done by the caller
# W&B (the default logger) where the image lacks it: pip resolves against what is installed, adds only what is missing
[ -n "${SKIP_INSTALL:-}" ] || [ ! -d .whl/wandb ] || python3 -c 'import wandb' 2>/dev/null || python3 -m pip install -q --no-index --find-links .whl/wandb wandb || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CM_LIGHTNING_CACHE=/tmp/cm_cache
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; RUNS_ROOT=/tmp/quality_runs; mkdir -p "$RUNS_ROOT"
STEPS=${STEPS:-2000}; MAX_TIME=${MAX_TIME:-00:00:04:45}; EDGE_RULE8=${EDGE_RULE8:-pcm}; CT_SWEEP=${CT_SWEEP-2,3,4,5}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch; print('torch', torch.__version__)"; date -u; } > "$OUT/machine.txt"
# 0. the teacher's guidance scale (or G=... given): the g (diffusers' form) with the best 50-step fidelity on 500 train prompts
[ -n "${G:-}" ] || G=$(python3 - <<'PY' 2>/dev/null | tail -1
import json, os
from cm_lightning.shapes.table import PromptSet, Row, evaluate_rows
sets = [PromptSet.from_shapes("train", "train", 500, 99)]
rows = [Row(f"g={g}", None, 50, g) for g in (1.5, 2.0, 3.0, 5.0, 7.5)]
res, _ = evaluate_rows("cm_lightning/assets/shapes_teacher", rows, sets, reference="g=1.5", device="cuda", batch_size=500)
open(os.environ["OUT"] + "/guidance_sweep.json", "w").write(json.dumps(res, indent=1))
print(max(res, key=lambda r: r["fidelity"])["guidance"])
PY
)
echo "teacher guidance chosen: g=$G"; [ -n "$G" ] || G=3.0
COMMON=(experiment=shapes_distill teacher_guidance.min=$G teacher_guidance.max=$G data.datamodule.num_workers=2 data.datamodule.progress=false
        trainer.max_time=$MAX_TIME batch_size=256 lora.rank=32 optimizer.lr=3e-4 callbacks.validation.teacher_guidance=$G
        ${QUALITY_EXTRA:-})   # QUALITY_EXTRA: more overrides for every run, e.g. method.module.half_precision_roles=[]
python3 -m cm_lightning.prepare "${COMMON[@]}" hydra.run.dir=$RUNS_ROOT/prepare 2>&1 | tail -3
start=$(date +%s)
# STEPS caps every method; STEPS_CT caps CT alone (an equal-steps rerun of a table whose CT ran more steps)
declare -A METHOD=([ct]="method=ct trainer.max_steps=${STEPS_CT:-$STEPS}" [cd]="method=cd trainer.max_steps=$STEPS"
                   [mcd2]="method=mcd boundaries=2 trainer.max_steps=$STEPS" [mcd4]="method=mcd boundaries=4 trainer.max_steps=$STEPS"
                   [mcd8]="method=mcd boundaries=8 method.module.edge_rule=$EDGE_RULE8 trainer.max_steps=$STEPS")
# RUNS: which rows to train; SEEDS: one table per training seed (e.g. SEEDS="43 44"), all runs at once on the GPU,
# each seed's runs under $RUNS_ROOT/s<seed> and its table under $OUT/eval_s<seed>; empty: the config's seed, $OUT/eval
RUN_NAMES=(${RUNS:-ct cd mcd2 mcd4 mcd8}); SEED_LIST=(${SEEDS:-default})
folder() { [ "$1" = default ] && echo "$RUNS_ROOT" || echo "$RUNS_ROOT/s$1"; }
for seed in "${SEED_LIST[@]}"; do
  dir=$(folder $seed); mkdir -p "$dir"; extra=(); [ "$seed" = default ] || extra=(seed=$seed)
  for name in "${RUN_NAMES[@]}"; do
    python3 -m cm_lightning.train "${COMMON[@]}" ${METHOD[$name]} "${extra[@]}" paths.output_dir=$dir/$name \
      hydra.run.dir=$dir/$name > "$dir/$name.log" 2>&1 &
  done
done
wait
echo "training wall: $(( $(date +%s) - start )) s"
for seed in "${SEED_LIST[@]}"; do
  dir=$(folder $seed); [ "$seed" = default ] && eval_out=$OUT/eval || eval_out=$OUT/eval_s$seed
  for name in "${RUN_NAMES[@]}"; do
    echo "== $name (seed $seed): $(grep -c . $dir/$name/csv/version_0/metrics.csv 2>/dev/null) metric rows; last:"; tail -1 $dir/$name/csv/version_0/metrics.csv 2>/dev/null
    grep -E "Error|error:|max_steps|Time limit" "$dir/$name.log" | tail -3
  done | tee -a "$OUT/training_summary.txt"
  given=(); for name in "${RUN_NAMES[@]}"; do given+=(runs.$name=$dir/$name); done
  python3 -m cm_lightning.shapes.evaluate "${given[@]}" guidance=$G "ct_guidance_sweep=[$CT_SWEEP]" ${EVAL_EXTRA:-} output_dir=$eval_out \
    hydra.run.dir=$dir/eval 2>&1 | grep -v -E "it/s|s/it" | tail -30
  python3 benchmarks/quality_ranking.py --runs $dir --results $eval_out/results.json --out ${eval_out%/eval*}$( [ "$seed" = default ] || echo /ranking_s$seed )
done
logs=(); for seed in "${SEED_LIST[@]}"; do d=$(folder $seed); for name in "${RUN_NAMES[@]}"; do logs+=(${d#$RUNS_ROOT/}/$name ${d#$RUNS_ROOT/}/$name.log); done; done
tar -C $RUNS_ROOT -cf "$OUT/train_logs.tar" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='*.pt' --exclude=wandb "${logs[@]}"
ls -la "$OUT" "$OUT"/eval*
