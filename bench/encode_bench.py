"""Encoding benchmark: sentences/s of sentence-transformers and anglekit on this machine.

Each system encodes the first 2,000 distinct STS-B sentences (train.jsonl, text1 then
text2 of each pair, in file order) at batch 32 in its own process, after one warm-up
pass; the reported speed comes from the median of 3 timed passes. Each also scores
STS-B test (Spearman x100 of cosine) with the same model, so a fast wrong encoder shows.

Systems: sentence-transformers (torch backend, fp32; ``bench/.venvs/st``, created on
first use) and anglekit ``AnglE.encode`` in fp32 and bf16 (project venv, ``make``).
Results go to ``bench/results/encode_bench.json``.

Example:
    .venv/bin/python bench/encode_bench.py
    .venv/bin/python bench/encode_bench.py --only anglekit
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import _common

SYSTEMS = ("st", "anglekit")
REFERENCE = "sentence-transformers"
BENCH = "encode_bench"


@dataclass(frozen=True)
class EncodeConfig:
    """The workload every system gets."""

    threads: int
    count: int = 2000
    batch_size: int = 32
    repetitions: int = 3

    def worker_args(self) -> list[str]:
        """The shared command-line arguments of the encoding workers."""
        return [
            "--model", str(_common.minilm_folder()),
            "--sentences-from", str(_common.stsb_path("train")),
            "--count", str(self.count),
            "--test-data", str(_common.stsb_path("test")),
            "--batch-size", str(self.batch_size),
            "--repetitions", str(self.repetitions),
            "--threads", str(self.threads),
        ]  # fmt: skip


def bench_st(config: EncodeConfig) -> list[dict]:
    """sentence-transformers, torch backend, fp32."""
    python = _common.ensure_venv(_common.ST_VENV, _common.ST_INSTALL)
    args = config.worker_args()
    return [_common.run_worker(BENCH, REFERENCE, python, "st_encode.py", args, config.threads)]


def bench_anglekit(config: EncodeConfig) -> list[dict]:
    """anglekit ``AnglE.encode`` with mean pooling, fp32 and bf16 weights."""
    python = _common.venv_python(_common.PROJECT_VENV)
    names = {"float32": "anglekit", "bfloat16": "anglekit bf16"}
    if not python.is_file():
        message = f"{python} not found: run `make` in {_common.REPO_ROOT} to build the project venv"
        print(f"[bench] skipping anglekit: {message}", file=sys.stderr)
        return [_common.result_row(name, "skipped", error=message) for name in names.values()]
    return [
        _common.run_worker(
            BENCH,
            name,
            python,
            "anglekit_encode.py",
            ["--dtype", dtype, *config.worker_args()],
            config.threads,
        )
        for dtype, name in names.items()
    ]


def print_report(rows: Sequence[dict[str, Any]]) -> None:
    """Prints the comparison table and any failures under it."""
    reference = next(
        (r["sentences_per_s"] for r in rows if r["system"] == REFERENCE and r["status"] == "ok"),
        None,
    )
    headers = [
        "system",
        "sentences/s",
        "vs ST torch",
        "STS-B test",
        "peak RSS MB",
        "other load",
        "status",
    ]
    table = [
        [
            row["system"],
            _common.fmt(row.get("sentences_per_s"), 0),
            _common.fmt(_common.ratio(row.get("sentences_per_s"), reference)),
            _common.fmt(row.get("stsb_test")),
            _common.fmt(row.get("peak_rss_mb"), 0),
            _common.fmt(row.get("other_cores")),
            row["status"],
        ]
        for row in rows
    ]
    print()
    _common.print_table(headers, table)
    _common.print_failures(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the selected systems and writes ``bench/results/encode_bench.json``."""
    parser = _common.base_parser(__doc__, SYSTEMS)
    args = parser.parse_args(argv)
    config = EncodeConfig(threads=args.threads)
    runners = {"st": lambda: bench_st(config), "anglekit": lambda: bench_anglekit(config)}
    return _common.run_benchmark(BENCH, config, args.only, runners, print_report)


if __name__ == "__main__":
    sys.exit(main())
