#!/usr/bin/env bash
# The checks that need the GPU machine, in one call (see ../shared/ENVIRONMENT.md): engine throughput on
# CUDA in fp32 and bf16, plus the CPU figures on two pinned cores of that quiet machine for reference.
# Usage there: bash bench/gpu_check.sh  (uses the image's python3; results also under $OUT if set)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
OMP_NUM_THREADS=2 taskset -c 0,1 "$PY" -m bench.engine --quick --device cpu | tee "$OUT/engine_cpu2.txt"
"$PY" -m bench.engine --device cuda --dtype fp32 | tee "$OUT/engine_cuda_fp32.txt"
"$PY" -m bench.engine --device cuda --dtype bf16 | tee "$OUT/engine_cuda_bf16.txt"
"$PY" -m bench.engine --device cuda --dtype bf16 --channels-last | tee "$OUT/engine_cuda_bf16_cl.txt"
