#!/usr/bin/env bash
# REPA Table 2: the target encoder (and the alignment depth) of SiT-L/2 + REPA, 400K steps, REPA's
# loss (tap after block 8, lambda 0.5, no manifold loss), encoders run online on stored pixels;
# SDE 250 steps without guidance; then `python -m analysis` on the 400K checkpoint: linear
# probing of block 8 (Acc.) and its CKNNA to the target encoder, on ImageNet val.
# Paper FID / Acc.: vanilla 18.8 / - | mae-l 12.5 / 57.3 | dino-b 11.9 / 59.3 | mocov3-l 11.9 /
# 63.0 | jepa-h 11.6 / 62.1 | clip-l 11.0 / 67.2 | siglip-l 10.2 / 68.8 | dinov2-b 9.7 / 65.7 |
# dinov2-l 10.0 / 68.1 | dinov2-g 9.8 / 65.7; DINOv2-L at depth 6, 10, 12, 14, 16: 10.3, 10.5,
# 11.2, 11.6, 12.1 / 66.2, 68.6, 69.4, 70.0, 71.1 (dinov2-s is not in the paper).
# Estimated H100 GPU-hours per row at 30 % MFU (scripts/gpu_hours.py's model; the online encoder
# adds its forward pass on 256 images per step): training 48 + sampling 2 + encoder: vanilla 0,
# dinov2-s 1, dino-b and dinov2-b 4, mae-l, mocov3-l, clip-l, siglip-l and dinov2-l 15, jepa-h
# 31, dinov2-g 56 (50 to 106 per row); the analysis (1.3M + 10K images, one t) under 1. The
# eleven rows: about 720; a depthK row: 64.
USAGE="usage: bash scripts/table2.sh prepare|vanilla|mae-l|dino-b|mocov3-l|jepa-h|clip-l|siglip-l|dinov2-s|dinov2-b|dinov2-l|dinov2-g|depthK (DINOv2-L at block K)"
set -euo pipefail
IMAGENET=${IMAGENET:-imagenet/train}          # ILSVRC-2012 train: 1000 synset folders
IMAGENET_VAL=${IMAGENET_VAL:-imagenet/val}    # ILSVRC-2012 val, sorted into the same folders
DATA=${DATA:-data/imagenet256-pixels}         # moments and pixels, no features: `prepare`
VAL_DATA=${VAL_DATA:-data/imagenet256-val}    # the same for the 50K val images: `prepare`
REF=${REF:-VIRTUAL_imagenet256_labeled.npz}   # ADM's reference batch (scripts/prepare.sh)
NPROC=${NPROC:-8}                             # GPUs
# RCG's MoCo v3 ViT-L checkpoint, as REPA uses (timm has no MoCo v3 weights)
MOCOV3_WEIGHTS=${MOCOV3_WEIGHTS:-ckpts/mocov3_vitl.pth}
cd "$(dirname "$0")/.."
source scripts/common.sh

# Train, sample and evaluate row EXP with encoder ENC, then analyse block 8 against ANALYSED.
table2_row() {
    local exp=$1 enc=$2 analysed=$3 depth=$4
    shift 4
    local weights=()  # the encoders timm has no weights for: a local file
    [[ "$enc" == mocov3-* ]] && weights=(--enc-weights "$MOCOV3_WEIGHTS")
    train_generate_evaluate "$exp" 400000 nocfg --model SiT-L/2 --encoder-depth "$depth" \
        --manifold-coeff 0 --enc-type "$enc" "${weights[@]}" "$@"
    run torchrun --nproc_per_node="$NPROC" -m analysis \
        --ckpt "$EXPS/$exp/checkpoints/0400000.pt" --data-dir "$DATA" --val-data-dir "$VAL_DATA" \
        --layers "$depth" --timesteps 0.5 --enc-type "$analysed" "${weights[@]}" \
        --output-dir "$RESULTS/$exp-analysis"
}

encoder_row() {
    table2_row "table2-sit-l2-$1" "$2" "$2" "${3:-8}" --encoder-mode online
}

[[ $# -eq 1 ]] || usage_error
case "$1" in
    prepare)
        for split in "$IMAGENET:$DATA" "$IMAGENET_VAL:$VAL_DATA"; do
            run torchrun --nproc_per_node="$NPROC" preprocessing/prepare.py --source "${split%%:*}" \
                --dest "${split#*:}" --vae ema --enc-type none --save-pixels
        done ;;
    # no alignment; analysed against DINOv2-B
    vanilla) table2_row table2-sit-l2-vanilla none dinov2-vit-b 8 --proj-coeff 0 ;;
    mae-l) encoder_row mae-l mae-vit-l ;;
    dino-b) encoder_row dino-b dinov1-vit-b ;;
    mocov3-l) encoder_row mocov3-l mocov3-vit-l ;;
    jepa-h) encoder_row jepa-h jepa-vit-h ;;
    clip-l) encoder_row clip-l clip-vit-L ;;
    siglip-l) encoder_row siglip-l siglip-vit-L ;;
    dinov2-s|dinov2-b|dinov2-l|dinov2-g) encoder_row "$1" "dinov2-vit-${1#dinov2-}" ;;
    depth*)
        [[ "${1#depth}" =~ ^[0-9]+$ ]] && (( ${1#depth} >= 1 && ${1#depth} <= 24 )) || usage_error
        encoder_row "dinov2-l-depth${1#depth}" dinov2-vit-l "${1#depth}" ;;
    *) usage_error ;;
esac
