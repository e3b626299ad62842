#!/usr/bin/env bash
# Latent-cache build rate and training read rate at SD1.5 scale on the GPU machine (device tool).
# Run from the repo root with .whl carried:  bash benchmarks/gpu/data_rates.sh
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; date -u; } > "$OUT/data_machine.txt"
for batch in 32 64; do
  python3 benchmarks/data_rates.py --images 5000 --workers 14 --encode-batch $batch --dtype bf16 \
    --out "$OUT/data_rates_b$batch.json" 2>&1 | grep -v -i warn | tail -30
done
