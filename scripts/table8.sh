#!/usr/bin/env bash
# U-REPA Table 8: the manifold-loss weight w, 100K steps, ODE cfg 1.8.
# Paper FID: w = 0: 6.25 | 2: 5.81 | 3 (the default): 5.72 | 4: 5.79
USAGE="usage: bash scripts/table8.sh 0|2|3|4"
set -euo pipefail
DATA=${DATA:-data/imagenet256}                # written by scripts/prepare.sh
REF=${REF:-VIRTUAL_imagenet256_labeled.npz}   # ADM's reference batch
NPROC=${NPROC:-8}                             # GPUs
cd "$(dirname "$0")/.."
source scripts/common.sh

[[ $# -eq 1 ]] || usage_error
case "$1" in
    3) ablation sitdown-xl2-urepa ;;
    0) ablation ablation-w0-layer18 --encoder-depth 18 --manifold-coeff 0 ;;  # = Table 5, 18
    2 | 4) ablation "ablation-w$1" --manifold-coeff "$1" ;;
    *) usage_error ;;
esac
