#!/bin/bash
# The GPU measurements of issue 15 in one run (docs/gpu-check.md): about 7 minutes on one H100/H200 when
# the targets hold, at most 9.5 (each step has its own timeout; tools/bench.py prints each row as it is measured).
# Everything lands in $OUT (or ./gpu-check).
out=${OUT:-gpu-check}
mkdir -p "$out"
step() {  # step NAME SECONDS COMMAND...: run it, keep its output, say how it ended and how long it took
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "=== $name: $*" | tee "$out/$name.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.txt"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$out/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
B="python -m tools.bench --ppo --preset llama-7b --device cuda --prompt-len 192 --new-tokens 300"

# 1. the GPU tests: captured decoding = eager decoding, checkpointing, the bf16 paths, train.py on the device
step tests 120 python -m pytest -q tests/test_gpu.py -rs
# 2. the plan for the paper's settings (nothing allocated)
step plan 20 python train.py --preset llama-7b --dry-run
# 3. the decoding step and generation without the CUDA graph, for comparison (64 sequences, no update)
step eager 60 $B --rollout-batch 64 --micro-batches --no-cuda-graph
# 4. the paper's settings (rollout 256, step batch 128, micro-batch 16, generate batch 64) with checkpointing:
#    decoding step <= 8 ms, generation <= 15 s, whole-step peak <= 44 GiB, a step <= 90 s, plan within 10%
step paper 160 $B --micro-batches 16 --checkpointing on
# 5. candidates for the fastest step on an 80 GB card (the plan puts both under 74.5 GiB = 80 GB): twice the
#    generation batch, then micro-batch 8 without checkpointing, or 32 with it; target <= 60 s a step
step fast8 105 $B --generate-batch 128 --micro-batches 8 --checkpointing off
step fast32 105 $B --generate-batch 128 --micro-batches 32 --checkpointing on
