"""Scaling benchmark: streaming memory, GradCache against the plain batch, batch size and quality.

Three parts, each run as separate processes so every measurement has its own peak memory:

``streaming``
    all-MiniLM-L6-v2 trains ``--steps`` steps of 32 pairs streamed (``streaming=True``) from
    generated JSON Lines files of each ``--rows`` size (default 100k, 1M, 5M rows). Reported:
    the file size, the training process's peak RSS (should not grow with the file) and pairs/s.
``gradcache``
    ``--steps`` steps at each logical batch of ``--batches`` (default 32, 256, 1024), plain and
    with GradCache chunks of ``--chunk`` (default 32) pairs, on generated unique pairs.
    Reported: peak memory (GPU memory on CUDA, else process RSS) and pairs/s; a run that
    runs out of memory is reported as such.
``quality``
    STS-B test Spearman x100 after training on ``--examples`` bundled STS-B train pairs (the
    same number at every batch size) at each logical batch of ``--batches`` with in-batch
    negatives (``ibn_threshold=4``), GradCache chunks of ``--chunk`` above it.

Generated files are cached in ``bench/results/scale_data/``; results go to
``bench/results/scale_bench.json``.

Example:
    .venv/bin/python bench/scale_bench.py                                  # everything
    .venv/bin/python bench/scale_bench.py --only streaming
    .venv/bin/python bench/scale_bench.py --rows 2000,4000 --steps 2 \\
        --batches 8,16 --chunk 4 --examples 32                             # smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common

PARTS = ("streaming", "gradcache", "quality")
BENCH = "scale_bench"
DATA_DIR = _common.RESULTS_DIR / "scale_data"
# fmt: off
WORDS = [
    "river", "stone", "light", "cloud", "quiet", "market", "garden", "paper", "window",
    "silver", "morning", "engine", "forest", "letter", "bridge", "summer", "winter", "music",
    "ocean", "street", "station", "teacher", "doctor", "kitchen", "yellow", "mountain", "village",
    "planet", "rocket", "circle", "island", "orange", "shadow", "thunder", "pocket", "ladder",
]
# fmt: on


def _ints(value: str) -> list[int]:
    return [int(v.replace("_", "")) for v in value.split(",") if v.strip()]


@dataclass(frozen=True)
class ScaleConfig:
    """Settings shared by every run."""

    threads: int
    steps: int
    rows: tuple[int, ...]
    batches: tuple[int, ...]
    chunk: int
    examples: int
    learning_rate: float
    max_length: int = 64
    seed: int = 42


def generate_pairs(rows: int, seed: int = 0) -> Path:
    """A JSON Lines file of ``rows`` distinct scored pairs (cached by size and seed)."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    path = DATA_DIR / f"pairs-{rows}-{seed}.jsonl"
    if path.is_file():
        return path
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i in range(rows):
            words = rng.choices(WORDS, k=8)
            text1 = f"{' '.join(words)} {i}"
            text2 = f"{' '.join(rng.sample(words, k=6))} {i}"
            f.write(json.dumps({"text1": text1, "text2": text2, "label": rng.randint(0, 5)}))
            f.write("\n")
    tmp.rename(path)
    return path


def run_fit(options: dict[str, Any], evaluate: bool) -> dict[str, Any]:
    """Train in this process and return pairs/s, peak GPU memory and the STS-B test score."""
    import torch

    from anglekit import fit

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as out:
        try:
            result = fit(output_dir=out, progress=False, plots=False, dev_data=None, **options)
        except torch.OutOfMemoryError as e:
            return {"oom": True, "error": str(e).splitlines()[0]}
        payload: dict[str, Any] = {
            "oom": False,
            "steps": result.steps,
            "train_seconds": result.train_seconds,
            "pairs_per_s": result.train_examples_per_s,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        }
        if evaluate:
            from anglekit import AnglE
            from anglekit.data import load_sts
            from anglekit.evaluation import evaluate_pairs

            model = AnglE.from_pretrained(str(result.model_dir))
            test = load_sts("stsb:test")
            encode = lambda texts: model.encode(  # noqa: E731
                texts, batch_size=64, normalize=True, show_progress=False
            )
            payload["stsb_test_spearman"] = evaluate_pairs(encode, test).spearman
    return payload


def _worker(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description="one training run (internal)")
    parser.add_argument("--options", required=True, help="fit keyword arguments as JSON")
    parser.add_argument("--evaluate", action="store_true")
    args = parser.parse_args(argv)
    _common.emit_result(run_fit(json.loads(args.options), args.evaluate))
    return 0


def _measure(name: str, options: dict[str, Any], threads: int, evaluate: bool = False) -> dict:
    """Run one training in a fresh process; its peak RSS comes from ``wait4``."""
    cmd = [sys.executable, __file__, "worker", "--options", json.dumps(options)]
    run = _common.run_process(
        cmd + (["--evaluate"] if evaluate else []),
        _common.worker_env(threads),
        _common.log_path(BENCH, name),
    )
    if not run.ok:
        return _common.result_row(name, "failed", error=run.error())
    payload = run.last_json()
    status = "out of memory" if payload.pop("oom") else "ok"
    return _common.result_row(name, status, peak_rss_mb=run.peak_rss_mb, **payload)


def _common_options(cfg: ScaleConfig) -> dict[str, Any]:
    return {
        "model": str(_common.minilm_folder()),
        "max_length": cfg.max_length,
        "learning_rate": cfg.learning_rate,
        "seed": cfg.seed,
        "logging_steps": 10**6,
        "save_steps": 10**6,
        "ibn_threshold": 4.0,
    }


def run_streaming(cfg: ScaleConfig) -> list[dict[str, Any]]:
    """Peak RSS of streamed training over files of each size."""
    rows = []
    for n in cfg.rows:
        path = generate_pairs(n)
        options = {
            **_common_options(cfg),
            "train_data": str(path),
            "streaming": True,
            "max_steps": cfg.steps,
            "batch_size": 32,
        }
        row = _measure(f"streaming-{n}", options, cfg.threads)
        rows.append({**row, "part": "streaming", "rows": n, "file_mb": path.stat().st_size / 2**20})
    return rows


def run_gradcache(cfg: ScaleConfig) -> list[dict[str, Any]]:
    """Plain against GradCache at each logical batch size."""
    path = generate_pairs(max(max(cfg.batches) * cfg.steps * 2, 10_000))
    rows = []
    for batch in cfg.batches:
        for cached in (False, True):
            options = {
                **_common_options(cfg),
                "train_data": str(path),
                "streaming": True,
                "max_steps": cfg.steps,
                "batch_size": batch,
                "gradcache_chunk_size": cfg.chunk if cached else None,
            }
            name = f"{'gradcache' if cached else 'plain'}-{batch}"
            row = _measure(name, options, cfg.threads)
            rows.append({**row, "part": "gradcache", "batch": batch, "gradcache": cached})
    return rows


def run_quality(cfg: ScaleConfig) -> list[dict[str, Any]]:
    """STS-B test Spearman after the same number of examples at each batch size."""
    rows = []
    for batch in cfg.batches:
        steps = max(1, round(cfg.examples / batch))
        options = {
            **_common_options(cfg),
            "train_data": "stsb:train",
            "max_steps": steps,
            "batch_size": batch,
            "gradcache_chunk_size": cfg.chunk if batch > cfg.chunk else None,
        }
        row = _measure(f"quality-{batch}", options, cfg.threads, evaluate=True)
        rows.append({**row, "part": "quality", "batch": batch, "examples": steps * batch})
    return rows


def print_tables(rows: Sequence[dict[str, Any]]) -> None:
    """One table per part."""
    f = _common.fmt
    parts = {row.get("part") for row in rows}
    if "streaming" in parts:
        print("\nStreaming: peak RSS while training 32-pair steps from a file")
        _common.print_table(
            ["rows", "file MB", "peak RSS MB", "pairs/s", "status"],
            [
                [f"{r['rows']:,}", f(r["file_mb"], 0), f(r.get("peak_rss_mb"), 0),
                 f(r.get("pairs_per_s"), 1), r["status"]]
                for r in rows if r.get("part") == "streaming"
            ],
        )  # fmt: skip
    if "gradcache" in parts:
        print("\nGradCache against the plain batch")
        _common.print_table(
            ["logical batch", "mode", "peak RSS MB", "peak GPU MB", "pairs/s", "status"],
            [
                [str(r["batch"]), "gradcache" if r["gradcache"] else "plain",
                 f(r.get("peak_rss_mb"), 0), f(r.get("peak_gpu_mb"), 0),
                 f(r.get("pairs_per_s"), 1), r["status"]]
                for r in rows if r.get("part") == "gradcache"
            ],
        )  # fmt: skip
    if "quality" in parts:
        print("\nSTS-B test Spearman x100 after the same number of training examples")
        _common.print_table(
            ["batch", "steps", "examples", "STS-B test", "status"],
            [
                [str(r["batch"]), str(r.get("steps", "-")), str(r["examples"]),
                 f(r.get("stsb_test_spearman")), r["status"]]
                for r in rows if r.get("part") == "quality"
            ],
        )  # fmt: skip
    _common.print_failures(rows)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return _worker(argv[1:])
    parser = _common.base_parser(__doc__, PARTS)
    parser.add_argument("--steps", type=int, default=50, help="steps per streaming/gradcache run")
    parser.add_argument("--rows", type=_ints, default=[100_000, 1_000_000, 5_000_000])
    parser.add_argument("--batches", type=_ints, default=[32, 256, 1024])
    parser.add_argument("--chunk", type=int, default=32, help="GradCache chunk (pairs)")
    parser.add_argument("--examples", type=int, default=8192, help="training pairs (quality)")
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    args = parser.parse_args(argv)
    cfg = ScaleConfig(
        threads=args.threads,
        steps=args.steps,
        rows=tuple(args.rows),
        batches=tuple(args.batches),
        chunk=args.chunk,
        examples=args.examples,
        learning_rate=args.learning_rate,
    )
    runners = {
        "streaming": lambda: run_streaming(cfg),
        "gradcache": lambda: run_gradcache(cfg),
        "quality": lambda: run_quality(cfg),
    }
    return _common.run_benchmark(BENCH, cfg, args.only, runners, print_tables)


if __name__ == "__main__":
    sys.exit(main())
