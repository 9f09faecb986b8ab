#!/usr/bin/env bash
# U-REPA Table 7: where the projector upsamples, 100K steps, ODE cfg 1.8.
# Paper FID: after the MLP (the default) 5.72 | before 5.84 | within (pixel shuffle) 6.36
USAGE="usage: bash scripts/table7.sh after|before|within"
set -euo pipefail
DATA=${DATA:-data/imagenet256}                # written by scripts/prepare.sh
REF=${REF:-VIRTUAL_imagenet256_labeled.npz}   # ADM's reference batch
NPROC=${NPROC:-8}                             # GPUs
cd "$(dirname "$0")/.."
source scripts/common.sh

[[ $# -eq 1 ]] || usage_error
case "$1" in
    after) ablation sitdown-xl2-urepa ;;
    before | within) ablation "ablation-upsample-$1" --projector-upsample "$1" ;;
    *) usage_error ;;
esac
