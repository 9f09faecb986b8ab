#!/usr/bin/env bash
# REPA appendix J, Table 11: SiT-XL/2 + REPA on ImageNet 512×512. The 256 recipe (tap after
# block 8, lambda 0.5, no manifold loss, batch 256) on 512-px centre crops: SD-VAE latents
# 64×64×4 (1,024 tokens), DINOv2-B run online on the stored pixels resized to 448 px (its
# position embedding interpolated to the 32×32 grid); SDE 250 steps with cfg 1.35 at every step;
# evaluated against ADM's 512 reference batch. One run serves every row (--resume auto): run
# them in the order 80, 100, 200, since steps 400,320 and 500,400 are not milestones and their
# checkpoints are pruned once training goes on.
# Paper FID / sFID / IS: 80 epochs 2.44 / 4.21 / 247.3 | 100 epochs 2.32 / 4.16 / 255.7 |
# 200 epochs 2.08 / 4.19 / 274.6.
# Estimated H100 GPU-hours at 30 % MFU (scripts/gpu_hours.py, rows R11; the online DINOv2-B at
# 448 px adds 106 GMACs per image): training to 80 / 100 / 200 epochs 307 + 20 / 383 + 26 /
# 767 + 51, sampling 25 per row; the three rows together about 890.
USAGE="usage: bash scripts/imagenet512.sh prepare|80|100|200  (epochs; run prepare first)"
set -euo pipefail
IMAGENET=${IMAGENET:-imagenet/train}          # ILSVRC-2012 train: 1000 synset folders
DATA=${DATA:-data/imagenet512}                # moments and pixels at 512 px: `prepare`
REF=${REF:-VIRTUAL_imagenet512.npz}           # ADM's 512 reference batch: `prepare`
NPROC=${NPROC:-8}                             # GPUs
cd "$(dirname "$0")/.."
source scripts/common.sh

[[ $# -eq 1 ]] || usage_error
case "$1" in  # an epoch is 5004 steps of 256 images
    prepare)
        run torchrun --nproc_per_node="$NPROC" preprocessing/prepare.py --source "$IMAGENET" \
            --dest "$DATA" --resolution 512 --vae ema --enc-type none --save-pixels
        if [[ ! -e "$REF" ]]; then
            run curl -L -o "$REF" \
                https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/512/VIRTUAL_imagenet512.npz
        fi
        exit 0 ;;
    80) steps=400320 ;;
    100) steps=500400 ;;
    200) steps=1000800 ;;
    *) usage_error ;;
esac
train_generate_evaluate sit-xl2-repa-512 "$steps" cfg1.35 --model SiT-XL/2 --resolution 512 \
    --encoder-depth 8 --manifold-coeff 0 --enc-type dinov2-vit-b --encoder-mode online
