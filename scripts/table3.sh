#!/usr/bin/env bash
# U-REPA Table 3 (ImageNet 256, no guidance: SDE 250 steps, cfg 1), one row per call.
# Paper FID: sitdown-b 15.3 | sitdown-l 5.8 | sitdown-xl 5.4 | sit-b 24.4 | sit-l 8.4 | sit-xl 5.9
USAGE="usage: bash scripts/table3.sh sitdown-b|sitdown-l|sitdown-xl|sit-b|sit-l|sit-xl"
set -euo pipefail
DATA=${DATA:-data/imagenet256}                # written by scripts/prepare.sh
REF=${REF:-VIRTUAL_imagenet256_labeled.npz}   # ADM's reference batch
NPROC=${NPROC:-8}                             # GPUs
cd "$(dirname "$0")/.."
source scripts/common.sh

[[ $# -eq 1 ]] || usage_error
case "$1" in
    # U-REPA: SiT↓ with the defaults (tap at the middle block, MLP then upsample, w = 3)
    sitdown-b) train_generate_evaluate sitdown-b2-urepa 400000 nocfg --model SiTDown-B/2 ;;
    sitdown-l) train_generate_evaluate sitdown-l2-urepa 400000 nocfg --model SiTDown-L/2 ;;
    sitdown-xl) train_generate_evaluate sitdown-xl2-urepa 400000 nocfg --model SiTDown-XL/2 ;;
    # REPA baselines, REPA's recipe: tap after block 4 (B) or 8 (L, XL), no manifold loss
    sit-b) train_generate_evaluate sit-b2-repa 400000 nocfg \
        --model SiT-B/2 --encoder-depth 4 --manifold-coeff 0 ;;
    sit-l) train_generate_evaluate sit-l2-repa 700000 nocfg \
        --model SiT-L/2 --encoder-depth 8 --manifold-coeff 0 ;;
    sit-xl) train_generate_evaluate sit-xl2-repa 4000000 nocfg \
        --model SiT-XL/2 --encoder-depth 8 --manifold-coeff 0 ;;
    *) usage_error ;;
esac
