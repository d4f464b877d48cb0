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

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _common

SYSTEMS = ("st", "anglekit")
REFERENCE = "sentence-transformers"


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


def run_worker(system: str, python: Path, script: str, args: Sequence[str], threads: int) -> dict:
    """Runs an encoding worker and turns its JSON line into a result row."""
    run = _common.run_process(
        [python, _common.PEERS_DIR / script, *args],
        _common.worker_env(threads),
        _common.log_path("encode_bench", system.replace(" ", "_")),
    )
    if not run.ok:
        return {"system": system, "status": "failed", "error": run.error()}
    payload = run.last_json()
    payload.pop("system", None)
    return {"system": system, "status": "ok", "peak_rss_mb": run.peak_rss_mb, **payload}


def bench_st(config: EncodeConfig) -> list[dict]:
    """sentence-transformers, torch backend, fp32."""
    python = _common.ensure_venv(_common.ST_VENV, _common.ST_INSTALL)
    return [run_worker(REFERENCE, python, "st_encode.py", config.worker_args(), config.threads)]


def bench_anglekit(config: EncodeConfig) -> list[dict]:
    """anglekit ``AnglE.encode`` with mean pooling, fp32 and bf16 weights."""
    python = _common.venv_python(_common.PROJECT_VENV)
    names = {"float32": "anglekit", "bfloat16": "anglekit bf16"}
    if not python.is_file():
        message = f"{python} not found: run `make` in {_common.REPO_ROOT} to build the project venv"
        print(f"[bench] skipping anglekit: {message}", file=sys.stderr)
        return [{"system": name, "status": "skipped", "error": message} for name in names.values()]
    return [
        run_worker(
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
    headers = ["system", "sentences/s", "vs ST torch", "STS-B test", "peak RSS MB", "status"]
    table = [
        [
            row["system"],
            _common.fmt(row.get("sentences_per_s"), 0),
            _common.fmt(_common.ratio(row.get("sentences_per_s"), reference)),
            _common.fmt(row.get("stsb_test")),
            _common.fmt(row.get("peak_rss_mb"), 0),
            row["status"],
        ]
        for row in rows
    ]
    print()
    _common.print_table(headers, table)
    for row in rows:
        if row["status"] != "ok":
            print(f"\n{row['system']} {row['status']}: {row.get('error')}")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the selected systems and writes ``bench/results/encode_bench.json``."""
    parser = _common.base_parser(__doc__.splitlines()[0], SYSTEMS)
    args = parser.parse_args(argv)
    config = EncodeConfig(threads=args.threads)
    runners = {"st": bench_st, "anglekit": bench_anglekit}
    report = _common.Report(
        "encode_bench", [sys.executable, *sys.argv], {**asdict(config), "systems": args.only}
    )
    for system in args.only:
        try:
            report.results.extend(runners[system](config))
        except (subprocess.CalledProcessError, OSError, ValueError) as err:
            report.results.append(
                {"system": system, "status": "failed", "error": f"{type(err).__name__}: {err}"}
            )
    print_report(report.results)
    print(f"\nresults written to {report.write()}")
    return 0 if all(r["status"] != "failed" for r in report.results) else 1


if __name__ == "__main__":
    sys.exit(main())
