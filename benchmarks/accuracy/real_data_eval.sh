#!/usr/bin/env bash
# Reproduces the real-data tables of docs/results.md (needs ../shared/datasets).
set -euo pipefail
MT=../shared/datasets/magnetic_tile
MP=../shared/datasets/mpdd_metal_plate/data_supervised/metal_plate
DC=${DC:-.venv/bin/dualclip}
for TTA in ${TTA_MODES:---no-tta --tta}; do
  $DC eval --dataset folder --name magnetic_tile --normal "$MT/MT_Free/Imgs/*.jpg" \
    --anomalous "$MT/MT_Blowhole/Imgs/*.jpg" --anomalous "$MT/MT_Crack/Imgs/*.jpg" --anomalous "$MT/MT_Fray/Imgs/*.jpg" \
    --mask-suffix .png --mask-threshold 127 --max-normal 100 --max-anomalous 100 --backbone effnet-lite0 --k 1 $TTA --seeds 0,1,2 \
    --quiet --out runs/eval/magnetic_tile$TTA
  $DC eval --dataset folder --name metal_plate --images "$MP/test/images" --masks "$MP/test/masks" \
    --backbone effnet-lite0 --k 1 $TTA --seeds 0,1,2 --quiet --out runs/eval/mpdd_metal_plate$TTA
done
