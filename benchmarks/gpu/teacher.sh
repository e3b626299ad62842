#!/usr/bin/env bash
# Builds the shapes world's teacher on the GPU machine (device tool) and brings it back through $OUT.
# Run from the repo root with .whl carried:  bash benchmarks/gpu/teacher.sh
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CM_LIGHTNING_CACHE=/tmp/cm_cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch; print('torch', torch.__version__)"; date -u; } > "$OUT/machine.txt"
python3 -m cm_lightning.build_teacher out=/tmp/teacher/shapes_teacher vae.steps=2000 \
  'unet_overrides=["experiment=shapes_teacher","trainer.max_steps=30000","trainer.max_time=00:00:06:40"]' \
  hydra.run.dir=/tmp/teacher/run 2>&1 | grep -v -E "it/s\]|s/it\]" | tee "$OUT/build.log" | tail -40
cp /tmp/teacher/run/*.log "$OUT/" 2>/dev/null || true
find /tmp/teacher -name metrics.csv -exec cp {} "$OUT/unet_metrics.csv" \;
tar -C /tmp/teacher -cf "$OUT/teacher_unet.tar" shapes_teacher/unet
tar -C /tmp/teacher -cf "$OUT/teacher_rest.tar" --exclude=shapes_teacher/unet shapes_teacher
# With time to spare in the same call: the SD1.5-scale latent-cache build and read rates (benchmarks/data_rates.py).
[ "${WITH_DATA_RATES:-0}" = 1 ] && timeout 150 python3 benchmarks/data_rates.py --images 5000 --workers 14 \
  --encode-batch 64 --dtype bf16 --out "$OUT/data_rates.json" 2>&1 | grep -v -i warn | tail -25
ls -la "$OUT"
