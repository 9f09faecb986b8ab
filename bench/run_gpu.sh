#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, on one GPU, part by part:
#
#   bash bench/run_gpu.sh OUT_DIR [PART ...]      # default: every part, in this order
#   bash bench/run_gpu.sh OUT_DIR quick           # the headline figures only, first
#
# PART: quick (SiT↓-XL/2 + U-REPA training images/s, MFU, peak memory, syncs per step and the
# optimiser + EMA share, then sampling samples/s and MFU: few rounds, no compilation, meant to
# fit a short loan of a GPU), train (SiT↓-XL/2 + U-REPA, ours vs REPA's protocol), train-each (each optimisation
# alone), train-sit (SiT-XL/2 + REPA), sample (SDE 250, cfg 1.65 on [0, 0.7], bf16, with the
# noise and precision comparisons), sample-compile, data (the loader against the measured
# training rate). Each part writes OUT_DIR/PART.txt (what it printed) and OUT_DIR/PART.json.
# No part has been timed on a GPU yet; each compiles its model first where it compiles.
set -euo pipefail
out=${1:?usage: bash bench/run_gpu.sh OUT_DIR [PART ...]}
shift
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(train train-each train-sit sample sample-compile data)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

bench() {  # bench NAME MODULE ARGS...
    local name=$1 module=$2
    shift 2
    set -o pipefail
    "$python" -m "$module" "$@" --json "$out/$name.json" 2>&1 | tee "$out/$name.txt"
}

train_rate() {  # images/s of "ours" in OUT_DIR/train.json
    "$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["configs"]["ours"]["images_per_sec"])' "$out/train.json"
}

for part in "${parts[@]}"; do
    case $part in
        quick)
            bench quick-train bench.train_speed --configs ours --steps 10 --rounds 2 --warmup 3
            bench quick-sample bench.sample_speed --batches 1 --no-compare-noise \
                --no-compare-precision ;;
        train) bench train bench.train_speed --configs ours,repa-protocol ;;
        train-each) bench train-each bench.train_speed --steps 10 --rounds 2 \
            --configs ours,compile,fp16,no-fused-adamw,online-encoder,log-every-step,sdpa-flash,sdpa-efficient,sdpa-cudnn,sdpa-math ;;
        train-sit) bench train-sit bench.train_speed --model SiT-XL/2 --encoder-depth 8 \
            --manifold-coeff 0 --configs ours,repa-protocol ;;
        sample) bench sample bench.sample_speed ;;
        sample-compile) bench sample-compile bench.sample_speed --compile --no-compare-noise \
            --no-compare-precision ;;
        data)
            rate=()  # the ratio needs the training rate of the train part
            [ -f "$out/train.json" ] && rate=(--train-images-per-sec "$(train_rate)")
            bench data bench.data_speed --synthetic 4000 --num-workers 4 "${rate[@]}" ;;
        *) echo "unknown part $part" >&2; exit 2 ;;
    esac
done
