#!/usr/bin/env bash
# U-REPA Table 5: the alignment tap of SiT↓-XL/2 (blocks 1-10 on 16×16, 11-26 on 8×8, 27-36
# on 16×16), 100K steps, ODE cfg 1.8. Paper FID: 4: 9.42 | 8: 9.35 | 12: 6.73 | 16: 6.43 |
# 18: 6.25 | 20: 6.36 | 24: 6.77 | 28: 8.40 | 32: 13.10. The sweep ran without the manifold
# loss: its layer-18 row (6.25, IS 156.2) is Table 8's w = 0 row.
USAGE="usage: bash scripts/table5.sh 4|8|12|16|18|20|24|28|32 (any block 1-36 works)"
set -euo pipefail
DATA=${DATA:-data/imagenet256}                # written by scripts/prepare.sh
REF=${REF:-VIRTUAL_imagenet256_labeled.npz}   # ADM's reference batch
NPROC=${NPROC:-8}                             # GPUs
cd "$(dirname "$0")/.."
source scripts/common.sh

[[ $# -eq 1 ]] || usage_error
[[ "$1" =~ ^[0-9]+$ ]] && (( $1 >= 1 && $1 <= 36 )) || usage_error
ablation "ablation-w0-layer$1" --encoder-depth "$1" --manifold-coeff 0
