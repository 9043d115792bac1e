#!/usr/bin/env bash
# The one prepared GPU run (about 9 minutes on one H200): speed vs PEFT (bench/gpu.sh, issue 6), then the
# scale check through torchrun + FSDP + activation checkpointing (bench/gpu_scale.py, issue 7).
#     bash bench/gpu_all.sh OUTDIR
set -uo pipefail
OUT_DIR="${1:-${OUT:-gpu-results}}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$HERE"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
GPU_1B_TIMEOUT="${GPU_1B_TIMEOUT:-200}" GPU_8B_TIMEOUT="${GPU_8B_TIMEOUT:-150}" bash bench/gpu.sh /tmp/gpu-speed
for f in env.txt summary.md; do cp /tmp/gpu-speed/$f "$OUT_DIR/" 2>/dev/null; done
for s in 1b 8b; do
  cp /tmp/gpu-speed/$s/gpu_speed.json "$OUT_DIR/speed-$s.json" 2>/dev/null
  cat /tmp/gpu-speed/$s/profile-*.txt > "$OUT_DIR/profile-$s.txt" 2>/dev/null || rm -f "$OUT_DIR/profile-$s.txt"
done  # the device tool returns at most 8 files: env, summary, 2 json, 2 profiles, scale json
timeout "${GPU_SCALE_TIMEOUT:-170}" python3 -m torch.distributed.run --standalone --nproc_per_node 1 bench/gpu_scale.py \
  --shape "${GPU_SCALE_SHAPE:-8b}" --steps "${GPU_SCALE_STEPS:-200}" --batch-size 8 --seq-len 512 --out "$OUT_DIR" 2>&1 | tail -40
