#!/usr/bin/env bash
# REPA appendix K, Table 12: MMDiT ± REPA, text-to-image on MS-COCO 2014 (U-ViT's setup).
# MMDiT-d24/2 (hidden 768, depth 24), CLIP ViT-L/14 text features (77 × 768), one caption drawn
# per image per step, caption dropout 0.1; 150K iterations at batch 256; REPA aligns block 8 to
# DINOv2-B (lambda 0.5, no manifold loss). FID of 30K samples from val2014 captions against the
# val2014 images' statistics, classifier-free guidance w = 2.0 at every step (by the empty
# caption); CLIP score (CLIP ViT-L/14) as an extra column.
# Paper FID: MMDiT 6.05 (ODE, NFE 50) / 5.30 (SDE, NFE 250); MMDiT + REPA 4.73 / 4.14.
# Estimated H100 GPU-hours at 30 % MFU (scripts/gpu_hours.py, rows R12): training about 13 per
# run, sampling 30K images about 0.3 (ODE 50) and 1.7 (SDE 250) per row.
USAGE="usage: bash scripts/table12.sh prepare|mmdit|mmdit-repa  (run prepare first)"
set -euo pipefail
COCO=${COCO:-coco}                            # train2014/, val2014/, annotations/
DATA=${DATA:-data/coco256}                    # train2014: moments, DINOv2-B features, captions
VAL=${VAL:-data/coco256-val}                  # val2014: the captions to sample from
REF=${REF:-coco256-val-ref.npz}               # val2014 images' statistics
NPROC=${NPROC:-8}                             # GPUs
cd "$(dirname "$0")/.."
source scripts/common.sh

[[ $# -eq 1 ]] || usage_error
case "$1" in
    prepare)
        run torchrun --nproc_per_node="$NPROC" preprocessing/prepare.py --source "$COCO/train2014" \
            --captions "$COCO/annotations/captions_train2014.json" --dest "$DATA" --vae ema
        run torchrun --nproc_per_node="$NPROC" preprocessing/prepare.py --source "$COCO/val2014" \
            --captions "$COCO/annotations/captions_val2014.json" --dest "$VAL" --vae ema \
            --enc-type none
        run python evaluations/make_reference.py --source "$COCO/val2014" --out "$REF" \
            --resolution 256
        exit 0 ;;
    mmdit) exp=mmdit-coco; flags=(--proj-coeff 0) ;;
    mmdit-repa) exp=mmdit-repa-coco; flags=(--encoder-depth 8 --manifold-coeff 0) ;;
    *) usage_error ;;
esac
multi=()
if [[ "$NPROC" -gt 1 ]]; then
    multi=(--multi_gpu)
fi
run accelerate launch "${multi[@]}" --num_processes "$NPROC" train.py --data-dir "$DATA" \
    --output-dir "$EXPS" --exp-name "$exp" --model MMDiT-d24/2 --max-train-steps 150000 \
    --resume auto "${flags[@]}"
if [[ "$DRY_RUN" != 1 ]]; then
    mkdir -p "$RESULTS"
fi
for sampler in "ode 50" "sde 250"; do
    read -r mode steps <<< "$sampler"
    dir="$SAMPLES/$exp-0150000-$mode$steps-cfg2"
    run torchrun --nproc_per_node="$NPROC" generate.py --ckpt "$EXPS/$exp/checkpoints/0150000.pt" \
        --sample-dir "$dir" --captions-from "$VAL" --num-fid-samples 30000 --mode "$mode" \
        --num-steps "$steps" --cfg-scale 2.0
    run python evaluations/evaluator.py "$REF" "$dir.npz" --json "$RESULTS/$(basename "$dir").json"
    run python evaluations/clip_score.py "$dir.npz"
done
