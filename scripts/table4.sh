#!/usr/bin/env bash
# U-REPA Table 4: SiT↓-XL/2 + U-REPA, SDE 250 steps, cfg 1.65 on t in [0, 0.7] (--preset
# paper-main). Paper FID: 200 epochs 1.48 | 400 epochs 1.41. One run serves both (and Table 3's
# SiT↓-XL/2 row): each call trains it further if needed. Run 200 before 400: step 1,000,800 is
# not a milestone, so its checkpoint is pruned once training goes on.
USAGE="usage: bash scripts/table4.sh 200|400"
set -euo pipefail
DATA=${DATA:-data/imagenet256}                # written by scripts/prepare.sh
REF=${REF:-VIRTUAL_imagenet256_labeled.npz}   # ADM's reference batch
NPROC=${NPROC:-8}                             # GPUs
cd "$(dirname "$0")/.."
source scripts/common.sh

[[ $# -eq 1 ]] || usage_error
case "$1" in  # an epoch is 5004 steps of 256 images (ImageNet's 1,281,167, last batch dropped)
    200) steps=1000800 ;;
    400) steps=2001600 ;;
    *) usage_error ;;
esac
train_generate_evaluate sitdown-xl2-urepa "$steps" paper-main --model SiTDown-XL/2
