#!/usr/bin/env bash
# Preprocess ImageNet once for every table: ADM centre crops at 256 px -> SD-VAE (ft-EMA)
# moments and DINOv2-B features in $DATA (resumable: re-run after an interruption). Then fetch
# ADM's reference batch for the evaluator into $REF.
USAGE="usage: bash scripts/prepare.sh  (IMAGENET=path/to/imagenet/train, an ImageFolder tree)"
set -euo pipefail
IMAGENET=${IMAGENET:-imagenet/train}          # 1000 synset folders of ILSVRC-2012 train
DATA=${DATA:-data/imagenet256}
REF=${REF:-VIRTUAL_imagenet256_labeled.npz}
NPROC=${NPROC:-8}                             # GPUs
cd "$(dirname "$0")/.."
source scripts/common.sh

[[ $# -eq 0 ]] || usage_error
run torchrun --nproc_per_node="$NPROC" preprocessing/prepare.py --source "$IMAGENET" \
    --dest "$DATA" --vae ema --enc-type dinov2-vit-b
if [[ ! -e "$REF" ]]; then
    run curl -L -o "$REF" \
        https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz
fi
