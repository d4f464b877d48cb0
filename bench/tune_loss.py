"""Choose AnglE loss defaults by STS-B dev Spearman on the benchmark budget.

all-MiniLM-L6-v2 (packaged), STS-B train, 200 steps, batch 32, max length 64, lr 2e-5, mean
pooling, seed 42; each configuration is scored on STS-B dev (never test) after training.

    .venv/bin/python bench/tune_loss.py --configs "cosine_w=1,ibn_w=0" "ibn_threshold=4"
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
    dev_data=None,
    progress=False,
    save_steps=10_000,
)


def parse_config(spec: str) -> dict[str, float | bool]:
    """``"ibn_w=0,bf16=true"`` -> ``{"ibn_w": 0.0, "bf16": True}``."""
    out: dict[str, float | bool] = {}
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        out[key] = value.lower() == "true" if value.lower() in ("true", "false") else float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--test", action="store_true", help="also report STS-B test")
    parser.add_argument(
        "--curve",
        type=int,
        default=0,
        help="also score a checkpoint saved every N steps (dev, and test with --test)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/tune_loss.jsonl"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dev, test = load_sts("stsb:dev"), load_sts("stsb:test")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.configs:
        config = parse_config(spec)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = fit(
                train_data="stsb:train",
                output_dir=tmp,
                **{**BUDGET, "max_steps": args.steps, **config},
            )
            model = AnglE.from_pretrained(str(result.model_dir))

            def encode(texts, model=model):
                return model.encode(texts, batch_size=64, normalize=True)

            row = {
                "config": spec,
                "dev": evaluate_pairs(encode, dev).spearman,
                "pairs_per_s": result.train_examples_per_s,
                "seconds": time.perf_counter() - start,
            }
            if args.test:
                row["test"] = evaluate_pairs(encode, test).spearman
            for ckpt in sorted(Path(tmp).glob("checkpoint-*"), key=lambda p: int(p.name[11:])):
                m = AnglE.from_pretrained(str(ckpt))

                def enc(texts, m=m):
                    return m.encode(texts, batch_size=64, normalize=True)

                point = {"step": int(ckpt.name[11:]), "dev": evaluate_pairs(enc, dev).spearman}
                if args.test:
                    point["test"] = evaluate_pairs(enc, test).spearman
                row.setdefault("curve", []).append(point)
        print(json.dumps(row), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
