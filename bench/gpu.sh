#!/usr/bin/env bash
# SepEn's GPU benchmark as one prepared run (under 8 minutes on an H100/H200):
#  - a finetuning step, Stable Diffusion 1.4's UNet (random weights) at 512 px (64x64 latents),
#    batch 4, bf16: ours vs the reference loop (losses checked equal in float32 first), median step
#    time, peak memory, achieved TFLOP/s against this card's measured bf16 matmul rate;
#  - the same for Stable Diffusion XL's UNet at 1024 px (128x128 latents, maps at 32x32),
#    batch 2, bf16 (text conditioning and size/crop time ids random, as the encoders are
#    outside a step);
#  - a SepEn finetuning step on full-size MMDiT transformers with random weights, built on the
#    GPU from their published configs (bench/mmdit_step.py): SD3.5 Medium and Large, FLUX.1
#    [dev]; every joint block's text keys trained and captured, 512 px (1024 image tokens), bf16,
#    gradient checkpointing; pairs (batch 4) and joint mode with the norm loss (batch 2):
#    step time and peak memory (the issue's 80-141 GB estimate, measured);
#  - sampling images/s: stock diffusers vs + a SepEn delta vs the test-time methods in sepen's
#    loop (Attend-and-Excite, SepEn at test time) vs diffusers' own A&E pipeline, SD 1.4
#    architecture at 512 px, 50 steps, bf16, one image per call (the paper's peers: A&E ~3.4x).
# Results go to bench/results/<card>.txt (the printed tables) and <card>-*.json.
#
#   bench/gpu.sh            # on the GPU machine
#   bench/gpu.sh --tiny     # the same script on CPU with the tiny model (seconds; the tests run it)
# SEPEN_BENCH_OUT=<folder> writes elsewhere; PYTHON=<interpreter> runs another Python (default
# python3: a machine may have no `python`).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${SEPEN_BENCH_OUT:-bench/results}
py=${PYTHON:-python3}
if [[ "${1:-}" == "--tiny" ]]; then
  device=cpu
  step=(--size tiny --batch 2 --repeats 1 --dtype float32 --ablations)
  xl=(--size sdxl-tiny --batch 2 --repeats 1 --dtype float32 --ablations)
  sampling=(--arch tiny --steps 4 --repeats 1 --dtype float32)
  mmdit=("--arch tiny-sd35 --mode pairs" "--arch tiny-flux --mode joint")
  mmdit_common=(--latent 16 --batch 2 --repeats 1 --dtype float32)
  card="cpu-tiny"
else
  device=cuda
  "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run bench/gpu.sh --tiny on CPU')"
  step=(--size sd14 --latent 64 --batch 4 --repeats 5 --dtype bfloat16 --ablations ours-no-exit)
  xl=(--size sdxl --latent 128 --batch 2 --repeats 3 --dtype bfloat16 --ablations)
  sampling=(--arch sd14 --steps 50 --repeats 3 --dtype bfloat16)
  mmdit=(
    "--arch sd35-medium --mode pairs --batch 4" "--arch sd35-medium --mode joint --batch 2"
    "--arch sd35-large --mode pairs --batch 4" "--arch flux-dev --mode pairs --batch 4"
    "--arch flux-dev --mode joint --batch 2"
  )
  mmdit_common=(--latent 64 --repeats 3 --dtype bfloat16)
  card=$("$py" -c "import torch; print(torch.cuda.get_device_name())")
fi
name=$(printf '%s' "$card" | tr -c 'A-Za-z0-9.-' '_')
mkdir -p "$out"
tmp="$out/.$name.txt.partial"
{
  echo "# $card, $(date -u +%Y-%m-%dT%H:%MZ), torch $("$py" -c 'import torch; print(torch.__version__)')"
  echo "\$ bench/gpu.sh $*"
  "$py" bench/finetune_step.py "${step[@]}" --device "$device" --flops --json "$out/$name-finetune.json"
  echo
  "$py" bench/finetune_step.py "${xl[@]}" --device "$device" --json "$out/$name-finetune-sdxl.json"
  echo
  "$py" bench/sampling_cost.py "${sampling[@]}" --device "$device" --json "$out/$name-sampling.json"
  echo
  k=0
  for row in "${mmdit[@]}"; do
    # shellcheck disable=SC2086 # each row is a list of flags
    "$py" bench/mmdit_step.py $row "${mmdit_common[@]}" --device "$device" \
      --json "$out/$name-mmdit-$k.json"
    k=$((k + 1))
  done
} | tee "$tmp"
mv "$tmp" "$out/$name.txt"
echo "wrote $out/$name.txt"
