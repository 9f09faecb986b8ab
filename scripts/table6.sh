#!/usr/bin/env bash
# U-REPA Table 6: how the 8×8 tap meets DINOv2's 16×16 grid, 100K steps, ODE cfg 1.8.
# Paper FID: upsample (U-Net ↑2, the default) 5.72 | pool (DINOv2 ↓2) 5.99
USAGE="usage: bash scripts/table6.sh upsample|pool"
set -euo pipefail
DATA=${DATA:-data/imagenet256}                # written by scripts/prepare.sh
REF=${REF:-VIRTUAL_imagenet256_labeled.npz}   # ADM's reference batch
NPROC=${NPROC:-8}                             # GPUs
cd "$(dirname "$0")/.."
source scripts/common.sh

[[ $# -eq 1 ]] || usage_error
case "$1" in
    upsample) ablation sitdown-xl2-urepa ;;
    pool) ablation ablation-align-pool --align-resolution pool ;;
    *) usage_error ;;
esac
