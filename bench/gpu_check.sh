#!/usr/bin/env bash
# The checks that need the GPU machine, in one call (see ../shared/ENVIRONMENT.md): the load bench against
# the real multi-process server on CUDA (the issue's bar: end to end >= 0.5x engine only at batch 32 with
# 128 clients, K = 1, 4, 8 front ends, bf16 + channels_last), then engine throughput on CUDA in fp32 and
# bf16, each contiguous and channels_last (the engine's default now; fp32 with it never measured), then the CPU figures on two pinned cores of that quiet machine for reference, then JPEGs decoded by
# the front ends against the engine on the GPU.
#
# Here first: `make gpu-wheels` (what that image lacks: fastapi, uvicorn, pydantic, pyzmq..., as wheels for
# its Python 3.12, at the versions the project's venv tests), then a dry run of the set-up and the load
# bench on the CPU with the image's Python (DEVICE=cpu WORKERS=1 PY=python3.12 bash bench/gpu_check.sh).
# There: bash bench/gpu_check.sh, with gpu_wheels carried (the device tool's `carry`); results in $OUT.
# Every step has a time limit, so one that hangs cannot use up the session's device time, and a step that
# fails is noted in $OUT/failed.txt while the others still run (there is one try).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check}
DEVICE=${DEVICE:-cuda}  # cpu: the dry run on a machine without a GPU
WORKERS=${WORKERS:-1,4,8}
SITE=${SITE:-/tmp/gpu_check_site}
mkdir -p "$OUT"

# 1. The missing packages, from the carried wheels (that machine has no network), into a directory of
# their own: the image's Python may be externally managed, and its torch must stay the one it has.
MISSING="import fastapi, uvicorn, httptools, pydantic_settings, multipart, zmq, msgpack"
if ! PYTHONPATH=$SITE "$PY" -c "$MISSING" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --find-links gpu_wheels --target "$SITE" gpu_wheels/*.whl
fi
# (the server's processes inherit this)
export PYTHONPATH=$SITE:$PWD
"$PY" -c "import sys, torch, torchvision, fastapi, uvicorn, pydantic, zmq
print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__,
      'fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, 'pydantic', pydantic.VERSION,
      'pyzmq', zmq.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/versions.txt"
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    DTYPE=(--dtype bfloat16 --channels-last)
else
    DTYPE=()
fi

# 2. The bar: the real server, K front ends, 128 closed-loop clients, batches of up to 32.
timeout 420 "$PY" -m bench.serve_load --quick --device "$DEVICE" "${DTYPE[@]}" --workers "$WORKERS" \
    --clients 128 --batch 32 --skip-memory --cold-domains 1 2>&1 | tee "$OUT/serve_load.txt" ||
    echo "serve_load: rc $?" | tee -a "$OUT/failed.txt"
[ "$DEVICE" = cuda ] || exit 0

# 3. The engine alone on CUDA, then on two of the machine's cores.
for dtype in "fp32" "fp32 --channels-last" "bf16" "bf16 --channels-last"; do
    # shellcheck disable=SC2086  # the channels_last flag rides along with its dtype
    timeout 120 "$PY" -m bench.engine --quick --device cuda --dtype $dtype 2>&1 |
        tee "$OUT/engine_cuda_${dtype// /}.txt" || echo "engine $dtype: rc $?" | tee -a "$OUT/failed.txt"
done
OMP_NUM_THREADS=2 timeout 120 taskset -c 0,1 "$PY" -m bench.engine --quick --device cpu 2>&1 |
    tee "$OUT/engine_cpu2.txt" || echo "engine cpu: rc $?" | tee -a "$OUT/failed.txt"

# 4. Last (what the call's limit may cut): JPEGs at K = 4, decoded by the front ends, then by the engine
# on the GPU (MD_ENGINE_JPEG_DECODE: batched nvJPEG, server/device_jpeg.py).
for decoder in "" "--engine-jpeg-decode"; do
    # shellcheck disable=SC2086  # an empty flag is no flag
    timeout 150 "$PY" -m bench.serve_load --quick --device "$DEVICE" "${DTYPE[@]}" --workers 4 --clients 128 \
        --batch 32 --skip-memory --cold-domains 1 --image-format jpeg $decoder 2>&1 |
        tee "$OUT/serve_load_jpeg${decoder:+_engine}.txt" || echo "jpeg $decoder: rc $?" | tee -a "$OUT/failed.txt"
done
