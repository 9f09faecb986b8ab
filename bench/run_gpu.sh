#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, on one GPU, part by part:
#
#   bash bench/run_gpu.sh OUT_DIR [--repa-src PATH] [PART ...]   # default: every part but quick
#   bash bench/run_gpu.sh OUT_DIR quick                            # the headline figures, first
#   REPA_SRC=PATH bash bench/run_gpu.sh OUT_DIR quick              # same as --repa-src PATH
#
# PART: quick (the headline figures in at most 8 minutes on one H100, compilation included, in
# three sub-parts, each with its own time limit so that a slow one leaves the others' figures:
# quick-train, SiT↓-XL/2 + U-REPA compiled, bf16, batch 32, with the start-up compile check,
# beside REPA's own SiT-XL/2 step in the same process; quick-train-sit, our SiT-XL/2 with REPA's
# recipe beside REPA's step (the architecture-matched ratio); quick-sample, SDE 250 steps,
# batch 64, compiled without CUDA graphs; then one summary table, printed and written to
# OUT_DIR/quick-summary.md; QUICK_LIMITS="TRAIN SIT SAMPLE" seconds, default "210 150 110"), train (SiT↓-XL/2 + U-REPA,
# ours vs REPA's protocol), train-each (each optimisation alone), train-sit (SiT-XL/2 + REPA),
# sample (SDE 250, cfg 1.65 on [0, 0.7], bf16, with the noise and precision comparisons),
# sample-compile, data (the loader against the measured training rate), ops (operation and
# byte counts on the CPU: the estimate table). Each part writes OUT_DIR/PART.txt (what it
# printed) and OUT_DIR/PART.json.
#
# --repa-src PATH (or REPA_SRC): a clone of github.com/sihyun-yu/REPA, for quick, train and
# train-sit. BENCH_SMOKE=1 runs every command on tiny models (seconds on a CPU; the test of
# this script); PYTHON=... picks the interpreter.
set -euo pipefail
out=${1:?usage: bash bench/run_gpu.sh OUT_DIR [--repa-src PATH] [PART ...]}
shift
repa_src=${REPA_SRC:-}
if [ "${1:-}" = --repa-src ]; then
    repa_src=${2:?--repa-src needs a PATH}
    shift 2
fi
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(train train-each train-sit sample sample-compile data ops)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

repa=()
[ -n "$repa_src" ] && repa=(--repa-src "$repa_src")
train_sit=(--model SiT-XL/2 --encoder-depth 8 --manifold-coeff 0)
train_smoke=() sample_smoke=() data_smoke=() ops_smoke=() repa_smoke=()
if [ "${BENCH_SMOKE:-0}" = 1 ]; then
    tiny='{"hidden_size": 32, "depths": [1, 2, 1], "num_heads": 2, "projector_dim": 32}'
    tiny_sit='{"hidden_size": 32, "depth": 2, "num_heads": 2, "projector_dim": 32}'
    tiny_repa='{"hidden_size": 32, "decoder_hidden_size": 32, "depth": 2, "num_heads": 2, "projector_dim": 32, "encoder_depth": 1}'
    small=(--resolution 64 --enc-type dinov2-vit-tiny-random)
    # no compilation: it would take minutes on a CPU
    train_smoke=(--model SiTDown --model-config "$tiny" "${small[@]}" --batch-size 4 --steps 1
                 --rounds 1 --warmup 1 --sync-steps 1 --update-repeats 1 --no-compile)
    train_sit=(--model SiT --model-config "$tiny_sit" --encoder-depth 1 --manifold-coeff 0)
    sample_smoke=(--model SiTDown --model-config "$tiny" --resolution 64
                  --per-proc-batch-size 2 --num-steps 3 --compare-samples 2 --no-compile)
    data_smoke=(--synthetic 48 --global-batch 8 --processes 2 --num-workers 0 --batches 2)
    ops_smoke=(--models SiTDown --model-config "$tiny" "${small[@]}" --batch-size 2
               --sample-batch-size 2)
    repa_smoke=(--repa-model-config "$tiny_repa")
fi
[ ${#repa[@]} -gt 0 ] && repa+=("${repa_smoke[@]}")

bench() {  # bench NAME MODULE ARGS...
    local name=$1 module=$2
    shift 2
    "$python" -m "$module" "$@" --json "$out/$name.json" 2>&1 | tee "$out/$name.txt"
}

limited() {  # limited SECONDS NAME MODULE ARGS...: bench within a time limit; never fails
    local seconds=$1 name=$2 module=$3
    shift 3
    rm -f "$out/$name.json"
    timeout --kill-after=10 "$seconds" "$python" -m "$module" "$@" --json "$out/$name.json" \
        > >(tee "$out/$name.txt") 2>&1 \
        || echo "$name: stopped (exit $?, limit ${seconds} s): see $out/$name.txt" | tee -a "$out/$name.txt"
}

train_rate() {  # images/s of "ours" in OUT_DIR/train.json
    "$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["configs"]["ours"]["images_per_sec"])' "$out/train.json"
}

for part in "${parts[@]}"; do
    case $part in
        quick)
            read -r limit_train limit_sit limit_sample <<< "${QUICK_LIMITS:-210 150 110}"
            quick_train=(--configs ours --steps 10 --rounds 2 --warmup 3 --update-repeats 3
                         --compile)
            limited "$limit_train" quick-train bench.train_speed "${quick_train[@]}" \
                "${train_smoke[@]}" "${repa[@]}"
            limited "$limit_sit" quick-train-sit bench.train_speed "${quick_train[@]}" \
                "${train_smoke[@]}" "${train_sit[@]}" "${repa[@]}"
            limited "$limit_sample" quick-sample bench.sample_speed --batches 1 \
                --no-compare-noise --no-compare-precision --compile --no-cuda-graphs \
                "${sample_smoke[@]}" ;;
        train) bench train bench.train_speed --configs ours,repa-protocol "${train_smoke[@]}" \
            "${repa[@]}" ;;
        train-each) bench train-each bench.train_speed --steps 10 --rounds 2 \
            --configs ours,compile,fp16,no-fused-adamw,online-encoder,log-every-step,sdpa-flash,sdpa-efficient,sdpa-cudnn,sdpa-math \
            "${train_smoke[@]}" ;;
        train-sit) bench train-sit bench.train_speed --configs ours,repa-protocol \
            "${train_smoke[@]}" "${train_sit[@]}" "${repa[@]}" ;;
        sample) bench sample bench.sample_speed "${sample_smoke[@]}" ;;
        sample-compile) bench sample-compile bench.sample_speed --compile --no-compare-noise \
            --no-compare-precision "${sample_smoke[@]}" ;;
        data)
            rate=()  # the ratio needs the training rate of the train part
            [ -f "$out/train.json" ] && rate=(--train-images-per-sec "$(train_rate)")
            bench data bench.data_speed --synthetic 4000 --num-workers 4 "${data_smoke[@]}" \
                "${rate[@]}" ;;
        ops) "$python" -m bench.op_count "${ops_smoke[@]}" 2>&1 | tee "$out/ops.txt" ;;
        *) echo "unknown part $part" >&2; exit 2 ;;
    esac
done
for part in "${parts[@]}"; do  # the summary last, from what the quick parts left
    [ "$part" = quick ] && "$python" -m bench.summary "$out"
done
exit 0
