"""Choose AnglE loss and schedule defaults by STS-B dev Spearman on the benchmark budget.

all-MiniLM-L6-v2 (packaged), STS-B train, 200 steps, batch 32, max length 64, lr 2e-5, mean
pooling, seed 42. Each configuration trains through ``fit`` exactly as ``anglekit train`` does
(dev evaluation every ``--eval-steps``, best dev checkpoint kept); the choice is made on the
best dev Spearman. STS-B test of the kept model is printed beside it for the record only.

    .venv/bin/python bench/tune_loss.py --configs "ibn_w=0" "ibn_threshold=4,warmup_steps=20"
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from anglekit import AnglE, fit
from anglekit.data import load_sts
from anglekit.evaluation import evaluate_pairs

BUDGET = dict(
    max_steps=200,
    batch_size=32,
    max_length=64,
    learning_rate=2e-5,
    pooling="mean",
    seed=42,
    dev_data="stsb:dev",
    progress=False,
    plots=False,
)


def parse_config(spec: str) -> dict[str, float | bool]:
    """``"ibn_w=0,bf16=true"`` -> ``{"ibn_w": 0.0, "bf16": True}``."""
    out: dict[str, float | bool] = {}
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
        else:
            out[key] = int(value) if key.endswith("steps") else float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", required=True, help='e.g. "ibn_w=0,angle_w=1"')
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("bench/results/tune_loss.jsonl"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    test = load_sts("stsb:test")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.configs:
        config = {**BUDGET, "max_steps": args.steps, "eval_steps": args.eval_steps}
        config.update(parse_config(spec))
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = fit(train_data="stsb:train", output_dir=tmp, **config)
            model = AnglE.from_pretrained(str(result.model_dir))
            row = {
                "config": spec,
                "best_dev": result.best_dev_spearman,
                "best_step": result.best_step,
                "test": evaluate_pairs(
                    lambda texts, m=model: m.encode(texts, batch_size=64, normalize=True), test
                ).spearman,
                "pairs_per_s": result.train_examples_per_s,
                "seconds": time.perf_counter() - start,
            }
        print(json.dumps(row), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
