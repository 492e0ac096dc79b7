#!/usr/bin/env bash
# The GPU figures of docs/memory.md and docs/inference.md in one run (under 10 minutes on one H100-class GPU):
#   1. paper-size prediction (1072 x 470 x 470) of a two-stage model of paper widths, 240^3 windows:
#      time, peak RSS and peak GPU memory (benchmarks/paper_predict.py);
#   2. `meunet bench memory --device cuda` at paper scale (160^3 local, 240^3 context, batch 1): measured
#      peak and activation bytes of the five configurations;
#   3. a short paper-scale training-speed run (160^3 patches, batch 2, bf16, checkpointing;
#      benchmarks/train_speed.py).
# Needs the project's environment already installed (`make .venv/.installed`, or PYTHON=... pointing at an
# interpreter with meunet and a CUDA torch); it installs nothing. CI never runs it.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # JSON files go to OUT_DIR (default gpu_check_out)
#   DEVICE=cpu SMALL=1 bash benchmarks/gpu_check.sh /tmp/g   # the same steps, tiny, on a CPU (a dry run)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
if [[ -n "${SMALL:-}" ]]; then
    predict=(--shape 64 64 64 --window 48 --widths 8 16 32 64 64)
    memory=(--patch 32 --widths 8,16,32,64,64)
    train=(--widths 8 16 32 64 64 --patch 32 --batch 2 --shape 48 48 48 --iterations 6)
else
    predict=(--shape 1072 470 470 --window 240 --widths 16 32 64 128 128)
    memory=(--patch 160)
    train=(--widths 16 32 64 128 128 --patch 160 --batch 2 --shape 240 240 240 --iterations 30 --checkpointing)
fi
precision=bf16
[[ "$DEVICE" == cpu ]] && precision=fp32
if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
echo "== 1. paper-size prediction, two stages"
"$PYTHON" benchmarks/paper_predict.py --device "$DEVICE" --stages 2 "${predict[@]}" --json "$OUT/paper_predict.json"
echo "== 2. bench memory on the device"
"$PYTHON" -m meunet.cli bench memory --device "$DEVICE" "${memory[@]}" --json "$OUT/bench_memory.json" --force
echo "== 3. paper-scale training speed"
"$PYTHON" benchmarks/train_speed.py --device "$DEVICE" --precision "$precision" "${train[@]}" \
    --json "$OUT/train_speed.json"
echo "wrote $OUT/paper_predict.json $OUT/bench_memory.json $OUT/train_speed.json"
