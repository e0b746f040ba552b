#!/usr/bin/env bash
# Issue 15's GPU checks, one script for a CUDA machine (MISSION.md section 6; README "Benchmarks"):
#   1. SynC at 8k, 16k and 32k units (dim 16) and NIWT's importance on xlsa17-sized 2048-d features;
#   2. the Split-MNIST MLP loops (plain / naive / modnet) through the tensor data path;
#   3. ResNet-18 on Split-CIFAR-100-shaped data (50,000 x 3x32x32, batch 128), bf16 autocast and channels_last:
#      modnet vs plain and naive, samples/s, peak memory, same-process step-cost ratios.
#   Parts 2 and 3 add "modnet (compiled)" (train.compile=true, Triton kernels; its forward and losses in one
#   graph) and "plain (compiled)": compile seconds, time saved per step and the steps after which the compile pays
#   back; part 2 also "naive (compiled)". Part 3 times only the loops below (bench `loops`):
#   not "modnet (second task)" (a second copy of the 50k images and an epoch of the first task) nor the
#   Avalanche-loader loops (an epoch of per-sample fetches each, 1.8-3x a plain epoch on an H200 before); part 2
#   times every loop, the data path's comparison among them.
#   4. no host sync in a training or evaluation step, on the GPU: tests/test_host_reads.py with
#      MODNET_TEST_DEVICE=cuda (reads of device tensors, and torch.cuda.set_sync_debug_mode over the same
#      spans), its report in OUT_DIR/host_reads.txt (needs the test extras: pip install -e ".[test]").
# Each part writes its own bench.json (with the device name) under OUT_DIR/<part>/, so a part that runs out of
# time loses only itself, and prints its wall seconds (to size the next run: the device tool gives a command
# 10 minutes). PARTS="1 2 3 4" (the default) picks the parts, e.g. PARTS="3" alone, or PARTS="1 2 4" then "3".
# Usage: scripts/gpu_checks.sh [OUT_DIR] [extra overrides for every part]
#   e.g. a CPU dry run at toy size: scripts/gpu_checks.sh /tmp/gpu_dry device=cpu samples.resnet18=256 \
#        samples.mlp=512 sync_sizes=[500] niwt_features.samples=2000 niwt_features.dim=64 ratio_rounds=1
set -euo pipefail
OUT_DIR=${1:-outputs/bench_gpu}
shift || true
PY=${PYTHON:-python3}
common=(device=cuda threads=null epochs=2 repeats=1 niwt=false)
PARTS=${PARTS:-1 2 3 4}
wants() { [[ " $PARTS " == *" $1 "* ]]; }
took() { echo "[gpu_checks] part $1 took $((SECONDS - start)) s (total ${SECONDS} s)"; }
if wants 1; then
    start=$SECONDS
    echo "[gpu_checks] 1/4 SynC and NIWT at scale"
    "$PY" -m modnet.cli bench "${common[@]}" archs=[] sync_sizes=[8000,16000,32000] niwt_features.enabled=true \
        output_dir="$OUT_DIR/scale" "$@"
    took 1
fi
if wants 2; then
    start=$SECONDS
    echo "[gpu_checks] 2/4 MLP loops"
    "$PY" -m modnet.cli bench "${common[@]}" archs=[mlp] ratio_rounds=5 compile=true sync_sizes=[] \
        output_dir="$OUT_DIR/mlp" "$@"
    took 2
fi
if wants 3; then
    start=$SECONDS
    echo "[gpu_checks] 3/4 ResNet-18, CIFAR-100 shape, bf16 + channels_last"
    "$PY" -m modnet.cli bench "${common[@]}" archs=[resnet18] samples.resnet18=50000 batch_size.resnet18=128 \
        amp=true channels_last=true ratio_rounds=3 compile=true second_task=false sync_sizes=[] \
        'loops=[plain,naive,modnet,"modnet (HAT only)","modnet (compiled)","plain (compiled)"]' \
        output_dir="$OUT_DIR/resnet18" "$@"
    took 3
fi
if wants 4; then
    start=$SECONDS
    echo "[gpu_checks] 4/4 host syncs in the training and evaluation steps"
    if [[ " $* " == *" device=cpu "* ]]; then
        echo "[gpu_checks] skipped on device=cpu (the suite runs the CPU version)"
    else
        mkdir -p "$OUT_DIR"
        MODNET_TEST_DEVICE=cuda "$PY" -m pytest tests/test_host_reads.py -q -n 0 > "$OUT_DIR/host_reads.txt" 2>&1 \
            && echo "[gpu_checks] no host sync found" \
            || echo "[gpu_checks] host syncs found or the test failed: see $OUT_DIR/host_reads.txt"
    fi
    took 4
fi
