#!/usr/bin/env bash
# GPU speed check (issue 6), one command, about 5-7 minutes on one H200:
#
#     bash bench/gpu.sh OUTDIR        (or OUT=OUTDIR bash bench/gpu.sh)
#
# Needs torch (CUDA), transformers, peft, accelerate; no internet, no gguf, softprompt not installed (the
# repo's src/ is put on PYTHONPATH). Random-weight Llama-shaped models, random token ids. Writes, per shape,
# OUTDIR/<shape>/gpu_speed.{json,md} (bf16/fp32 matmul peak, tokens/s, MFU, peak GPU memory, softprompt vs
# PEFT PromptTuning + HF Trainer) and OUTDIR/summary.md. Each shape has its own time limit, so a slow or
# failing one never eats the other's results.
# GPU_BENCH_EXTRA="--device cpu --tiny" bash bench/gpu.sh /tmp/g   runs the same script on CPU (smoke test).
set -uo pipefail
OUT_DIR="${1:-${OUT:-gpu-results}}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$HERE"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PYTHONPATH="$HERE/src${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi || true; python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"; } > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"
status=0
# 1B: the product path (shared prefix auto = off on CUDA) vs shared prefix forced on vs PEFT bf16 and PEFT's
# default fp32 Trainer.
timeout "${GPU_1B_TIMEOUT:-240}" python bench/gpu_speed.py --shape 1b --configs softprompt,softprompt-shared,peft-bf16,peft-fp32 \
  --batch-size 16 --steps 10 --warmup 3 --profile ${GPU_BENCH_EXTRA:-} --out "$OUT_DIR/1b" 2>&1 | tee "$OUT_DIR/1b.log" || status=1
# 8B: the product path vs PEFT bf16 (skip with GPU_SKIP_8B=1).
if [ -z "${GPU_SKIP_8B:-}" ]; then
  timeout "${GPU_8B_TIMEOUT:-180}" python bench/gpu_speed.py --shape 8b --configs softprompt,peft-bf16 \
    --batch-size 16 --steps 8 --warmup 2 ${GPU_BENCH_EXTRA:-} --out "$OUT_DIR/8b" 2>&1 | tee "$OUT_DIR/8b.log" || status=1
fi
{ for s in 1b 8b; do [ -f "$OUT_DIR/$s/gpu_speed.md" ] && { echo "### $s"; echo; cat "$OUT_DIR/$s/gpu_speed.md"; echo; }; done; } > "$OUT_DIR/summary.md"
cat "$OUT_DIR/summary.md"
exit $status
