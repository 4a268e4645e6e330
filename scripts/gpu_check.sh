#!/usr/bin/env bash
# Every GPU path of nanoKimi in one call, in under 4 minutes on one GPU; one line per path:
#   PASS|FAIL  path  seconds  what it printed last
# bf16 and fp16 (GradScaler, per-expert GEMM loop) training, torch.compile, sampling, eval, a Kimi Linear (KDA) run,
# FSDP2 over NCCL with one rank, and nanoGPT's GPU recipe through `bench compare --quick`. Needs a prepared char
# dataset: DATA (default data/shakespeare_char), or INPUT=path/to/tinyshakespeare.txt to prepare it first. OUT
# (default out/gpu-check) receives the runs and the logs. Exit status: the number of failed paths.
#   bash scripts/gpu_check.sh     # DEVICE=cpu: the same paths, small, on the CPU (NCCL and the GPU recipe skip)
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DATA=${DATA:-data/shakespeare_char}
OUT=${OUT:-out/gpu-check}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
failed=0

check() {  # check NAME COMMAND...: run it, log it, print one line
    local name=$1; shift
    local log="$OUT/$name.log" start=$SECONDS
    if "$@" >"$log" 2>&1; then status=PASS; else status=FAIL; failed=$((failed + 1)); fi
    printf '%s  %-22s %4ds  %s\n' "$status" "$name" $((SECONDS - start)) "$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-150)"
}
skip() { printf 'SKIP  %-22s        %s\n' "$1" "$2"; }

if [ -n "${INPUT:-}" ]; then
    check prepare $PYTHON -m nanokimi prepare shakespeare_char --input="$INPUT" --out="$DATA"
fi
check environment $PYTHON -c "import torch; from nanokimi.hardware import describe; print(torch.__version__, describe('$DEVICE'))"
if [ "$DEVICE" = cuda ]; then  # the GPU preset at nanoGPT's GPU shape; on the CPU a smoke test of the script itself
    SHAPE=(shakespeare-char --max_iters=60 --batch_size=32 --block_size=256)
else
    SHAPE=(shakespeare-char-cpu --max_iters=10 --batch_size=4 --block_size=64)
fi
RUN=("${SHAPE[@]}" --data="$DATA" --device=$DEVICE --eval_interval=1000 --eval_iters=5 --progress=False --overwrite)
check train-bf16 $PYTHON -m nanokimi train "${RUN[@]}" --dtype=bfloat16 --out_dir="$OUT/bf16"
check train-fp16 $PYTHON -m nanokimi train "${RUN[@]}" --dtype=float16 --out_dir="$OUT/fp16"
check train-compile $PYTHON -m nanokimi train "${RUN[@]}" --compile --out_dir="$OUT/compile"
check sample $PYTHON -m nanokimi sample "$OUT/bf16" --device=$DEVICE --max_new_tokens=200
# Kimi Linear: 3 KDA layers + 1 MLA (the CPU run's shape), bf16 autocast around KDA's fp32 delta rule, then decoding
check train-kda-bf16 $PYTHON -m nanokimi train kimi-linear-shakespeare-char-cpu --data="$DATA" --device=$DEVICE \
    --max_iters=20 --eval_interval=1000 --eval_iters=5 --progress=False --overwrite --dtype=bfloat16 --out_dir="$OUT/kda"
check sample-kda $PYTHON -m nanokimi sample "$OUT/kda" --device=$DEVICE --max_new_tokens=200
check eval $PYTHON -m nanokimi eval "$OUT/bf16" --data="$DATA" --device=$DEVICE --batches=20
if [ "$DEVICE" = cuda ]; then
    check fsdp-nccl-1rank $PYTHON -m nanokimi torchrun --standalone --nproc_per_node=1 train "${RUN[@]}" --fsdp \
        --out_dir="$OUT/fsdp"
    # every GPU of the machine, one process each: the token all-to-all over NCCL (16 experts: 1, 2, 4, 8 or 16 GPUs)
    GPUS=$($PYTHON -c "import torch; print(torch.cuda.device_count())")
    check fsdp-ep-nccl $PYTHON -m nanokimi torchrun --standalone --nproc_per_node="$GPUS" train "${RUN[@]}" \
        --grad_accum="$GPUS" --fsdp --ep --out_dir="$OUT/fsdp-ep"
    check compare-gpu-quick $PYTHON -m nanokimi bench --report="$OUT/BENCHMARKS.md" compare --recipe=gpu --quick \
        --data="$DATA" --out="$OUT/compare"
else
    skip fsdp-nccl-1rank "NCCL needs a GPU"
    skip fsdp-ep-nccl "NCCL needs a GPU"
    skip compare-gpu-quick "nanoGPT's GPU recipe needs CUDA"
fi
exit $failed
