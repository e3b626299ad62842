#!/usr/bin/env bash
# Builds the shapes world's teacher on the GPU machine (device tool), measures its fidelity, and brings it back
# through $OUT. Run from the repo root with .whl carried:  bash benchmarks/gpu/teacher.sh
#   TRAIN_TIME=00:00:06:00   the UNet's wall-clock cap (the call itself is capped at 10 minutes)
#   CONTINUE=folder          train that teacher's UNet further instead of building a new one
#   BUILD_ARGS="..."         extra build_teacher overrides
#   UNET_ARGS=',"a=b",...'    extra overrides of the UNet's training (quoted list items, each after a comma)
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CM_LIGHTNING_CACHE=/tmp/cm_cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TRAIN_TIME=${TRAIN_TIME:-00:00:06:00}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch; print('torch', torch.__version__)"; date -u; } > "$OUT/machine.txt"
START=()
[ -n "${CONTINUE:-}" ] && START=("continue_from=$CONTINUE")
python3 -m cm_lightning.shapes.build_teacher out=/tmp/teacher/shapes_teacher "${START[@]}" ${BUILD_ARGS:-} \
  "unet_overrides=[\"experiment=shapes_teacher\",\"trainer.max_steps=100000\",\"trainer.max_time=$TRAIN_TIME\",\"+trainer.profiler=simple\"${UNET_ARGS:-}]" \
  hydra.run.dir=/tmp/teacher/run 2>&1 | grep -v -E "it/s\]|s/it\]|img/s\]" | tee "$OUT/build.log" | grep -v "^|" | tail -30
grep -E "^\|  (Action|Total|run_training_batch|\[Strategy\]|\[LightningModule\]|\[_TrainingEpochLoop\]|\[Callback\]RichProgressBar.on_train_batch_end)" \
  "$OUT/build.log" | cut -c1-60,160- || true  # no `head`: its early exit is a SIGPIPE that pipefail makes fatal
find /tmp/teacher -name metrics.csv -exec cp {} "$OUT/unet_metrics.csv" \;
python3 benchmarks/gpu/teacher_eval.py /tmp/teacher/shapes_teacher "$OUT/teacher_eval.json" --prompts 500 2>&1 \
  | grep -E "fidelity|Error" | tee "$OUT/teacher_eval.txt"
tar -C /tmp/teacher -cf "$OUT/teacher_unet.tar" shapes_teacher/unet  # two files: 16 MiB each at most come back
tar -C /tmp/teacher -cf "$OUT/teacher_rest.tar" --exclude=shapes_teacher/unet shapes_teacher
ls -la "$OUT"
