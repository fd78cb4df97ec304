#!/usr/bin/env bash
# What issue 13 still needs from one GPU (nvidia-h200), as one device call per step (each under
# the 10-minute limit of a call; results and logs in $OUT, to copy into benchmarks/results):
#
#   bash benchmarks/gpu_session_1gpu.sh tests     # tests/gpu (those one GPU runs; logprobs under graphs)
#   bash benchmarks/gpu_session_1gpu.sh serving   # serving_gpu.py: offline vs HTTP at the defaults (colocated,
#                                                 # 1P1D), 1P1D unspaced, colocated with the router alone
#   bash benchmarks/gpu_session_1gpu.sh fronts    # the same with --http-processes 4 (is the router the limit?)
#   bash benchmarks/gpu_session_1gpu.sh engine    # gpu_engine.py: decode MBU, prefill MFU at 1x2048
#
# The device has no fastapi/uvicorn/pyzmq/openai: carry .whl (../shared/offline-wheels.sh, and
# py-spy distro jiter sniffio httpx2 httpcore2 truststore openai uvloop httptools: a pip install of
# pdserve brings uvloop and httptools, and the router is slower without them) and set PDSERVE_COMMIT.
set -u
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >"$OUT/pip.log" 2>&1
    export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L >"$OUT/gpus.txt" 2>&1
gpu=$(grep -o 'H[0-9]\+' "$OUT/gpus.txt" | head -1 | tr H h)  # h100, h200: the result files' suffix
gpu=${gpu:-gpu}
case "${1:-}" in
    tests) timeout 560 python -m pytest -q tests/gpu -p no:cacheprovider --durations=10 2>&1 | tail -40 ;;
    serving) timeout 580 python benchmarks/serving_gpu.py --out "$OUT/serving-$gpu.json" --logs "$OUT/logs" \
        --configs colocated,1p1d,1p1d-unpaced,colocated-router-alone \
        --variant '1p1d-unpaced=1p1d:--shared-gpu-step-interval 0' \
        --variant 'colocated-router-alone=colocated:--http-processes 1' \
        --profile "$OUT/profile" --profile-configs colocated 2>&1 | tail -40 ;;
    fronts) timeout 580 python benchmarks/serving_gpu.py --serve-flags '--http-processes 4' \
        --out "$OUT/serving-$gpu-fronts4.json" --logs "$OUT/logs" 2>&1 | tail -40 ;;
    engine) timeout 580 python benchmarks/gpu_engine.py --skip throughput,transfer --out "$OUT/engine-$gpu.json" \
        2>&1 | tail -40 ;;
    *) echo "usage: $0 tests|serving|fronts|engine" >&2; exit 2 ;;
esac
