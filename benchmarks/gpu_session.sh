#!/usr/bin/env bash
# Everything that needs GPUs, in one call on a 4-GPU host (nvidia-h200-x4), results in $OUT:
#
#   bash benchmarks/gpu_session.sh            # $OUT defaults to ./gpu-results
#
# 1. tests/gpu (attention incl. the Triton precompile, engine, kvtransfer, serve on two GPUs);
# 2. the KV hand-off: per-phase latency over NCCL, and the exposed transfer of a 2048-token
#    prompt (early and late offers against colocated; NCCL, and zmq where the KV moves layer by
#    layer) on GPUs 0,1;
# 3. benchmarks/disagg.py: disaggregated + adaptive on GPUs 0,1 while colocated runs on 2,3.
# Each step logs to $OUT/<step>.log and goes on when one fails; the last lines summarise.
set -u
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
: >"$OUT/summary.txt"

step() {  # step NAME COMMAND...: run it, keep its log and exit status
    local name=$1
    shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s" >>"$OUT/summary.txt"
    tail -n 15 "$OUT/$name.log"
}

nvidia-smi -L >"$OUT/gpus.txt" 2>&1
step gpu-tests python -m pytest -q tests/gpu
step kv-latency python benchmarks/kv_latency.py --backend nccl --device cuda --layout llama --blocks 8,128 \
    --engine busy --engine-sleep-us 2000 --early --switch-interval 0.0005
CUDA_VISIBLE_DEVICES=0,1 step exposed python benchmarks/exposed_transfer.py --gpu --requests 30 \
    --out "$OUT/exposed-transfer.json"
CUDA_VISIBLE_DEVICES=0,1 step exposed-zmq python benchmarks/exposed_transfer.py --gpu --kv-transport zmq \
    --requests 30 --out "$OUT/exposed-transfer-zmq.json"
CUDA_VISIBLE_DEVICES=0,1 step disagg-pair0 python benchmarks/disagg.py --modes disaggregated,adaptive \
    --out "$OUT/disagg-a.json" --no-plot &
CUDA_VISIBLE_DEVICES=2,3 step disagg-pair1 python benchmarks/disagg.py --modes colocated \
    --out "$OUT/disagg-b.json" --no-plot
wait
cat "$OUT/summary.txt"
