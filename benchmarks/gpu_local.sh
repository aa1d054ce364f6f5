#!/usr/bin/env bash
# The GPU scenario on a machine with no network: install the carried wheels, run, write to OUT.
# Usage: bash benchmarks/gpu_local.sh ASSETS OUT   (ASSETS from `python -m benchmarks.gpu_local prepare ASSETS`)
set -euo pipefail
assets=${1:?assets folder}
out=${2:?output folder}
python -m pip install --no-index --no-deps --find-links "$assets/wheels" tenacity platformdirs bpe-openai \
  >"$out/pip.log" 2>&1 || { echo "wheel install failed: see $out/pip.log"; exit 1; }
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=$PWD python -m benchmarks.gpu_local run "$assets" "$out" 2>&1 \
  | tee "$out/run.log"
