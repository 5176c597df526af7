#!/usr/bin/env bash
# The prepared GPU check of fada_jax (tools/gpu_check.py says what it measures).
# Runs in at most 8 minutes on a fresh GPU machine with only this repository and the
# machine's own JAX. Output: one JSON line per measurement on stdout; gpu_check.jsonl,
# gpu_check.log, nvidia-smi.txt and, for failures, xla_dumps.tar.gz in $OUT.
#   bash tools/gpu_check.sh [--budget=SECONDS] [--only=peak,stage2_bfloat16] [--smoke]
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" >"$OUT/nvidia-smi.txt"
exec "$PYTHON" tools/gpu_check.py --out="$OUT" "$@"
