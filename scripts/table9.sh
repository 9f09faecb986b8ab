#!/usr/bin/env bash
# U-REPA Table 9 (appendix): the time-aware projector, 100K steps, ODE cfg 1.8.
# Paper FID: ordinary MLP (the default) 5.72 | time-aware 5.63
USAGE="usage: bash scripts/table9.sh ordinary|time-aware"
set -euo pipefail
DATA=${DATA:-data/imagenet256}                # written by scripts/prepare.sh
REF=${REF:-VIRTUAL_imagenet256_labeled.npz}   # ADM's reference batch
NPROC=${NPROC:-8}                             # GPUs
cd "$(dirname "$0")/.."
source scripts/common.sh

[[ $# -eq 1 ]] || usage_error
case "$1" in
    ordinary) ablation sitdown-xl2-urepa ;;
    time-aware) ablation ablation-time-aware --time-aware-projector ;;
    *) usage_error ;;
esac
