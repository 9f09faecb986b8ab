#!/usr/bin/env bash
# U-REPA Table 10 (appendix): the schedule λ(t) of the alignment terms, 100K steps, ODE cfg 1.8.
# Paper FID: constant (the default) 5.72 | rise max(1, t+0.5) 5.85 | fall max(1, -t+1.5) 5.72 |
# dip min(1, max(-2t+1.5, 2t-0.5)) 5.58
USAGE="usage: bash scripts/table10.sh constant|rise|fall|dip"
set -euo pipefail
DATA=${DATA:-data/imagenet256}                # written by scripts/prepare.sh
REF=${REF:-VIRTUAL_imagenet256_labeled.npz}   # ADM's reference batch
NPROC=${NPROC:-8}                             # GPUs
cd "$(dirname "$0")/.."
source scripts/common.sh

[[ $# -eq 1 ]] || usage_error
case "$1" in
    constant) ablation sitdown-xl2-urepa ;;
    rise | fall | dip) ablation "ablation-lambda-$1" --lambda-schedule "$1" ;;
    *) usage_error ;;
esac
