"""Encoding benchmark: sentences/s of sentence-transformers and anglekit on this machine.

Each system encodes the first 2,000 distinct STS-B sentences (train.jsonl, text1 then
text2 of each pair, in file order) at batch 32 in its own process, after one warm-up
pass; a round's speed comes from the median of 3 timed passes. All rows run in turn,
``--rounds`` times (default 3), and each reports its median round: this machine's speed
drifts by up to 2x over minutes, and round-robin order lets every row share the slow
spells. Each also scores STS-B test (Spearman x100 of cosine) with the same model, so a
fast wrong encoder shows.

Systems:

- ``st``: sentence-transformers, torch backend, fp32 and bf16 weights, and bf16 at batch
  256, its fastest batch size here of 32-512 (``bench/.venvs/st``, created on first use).
- ``st-onnx``: sentence-transformers' ONNX backend, fp32 and its dynamic int8 export for
  AVX-512 VNNI (``bench/.venvs/st-onnx``: the ONNX backend's optimum-onnx pins
  transformers 4, so pip resolves sentence-transformers 5 there).
- ``anglekit``: ``AnglE.encode`` with the torch backend (fp32, bf16, and bf16 at batch 128,
  its fastest batch size here of 64-256) and the ONNX backend (fp32, int8); bf16 and int8
  also with a token budget per batch (2,048 padded tokens by default) instead of batch 32.
  From the project venv (``make``).

bf16 rows run only where torch has bf16 matrix kernels for the CPU (``--bf16``): on an
AVX2-only CPU they are emulated (sentence-transformers bf16 measured 47 sentences/s there,
against 263 in float32) and would take most of the run.

The table gives each row's ratio to sentence-transformers' torch fp32 row and to its
fastest row, and the target check: anglekit's fastest row against sentence-transformers'
fastest, with the Spearman lost. Rows a few minutes apart can meet different machine
speeds, so the two fastest rows then run head to head: ``--pairs`` times (default 5) one
process of each back to back, in alternating order, and each pair gives one ratio; the
median pair decides the target. Results go to ``bench/results/encode_bench.json``.

Example:
    .venv/bin/python bench/encode_bench.py
    .venv/bin/python bench/encode_bench.py --only anglekit
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common

SYSTEMS = ("st", "st-onnx", "anglekit")
REFERENCE = "sentence-transformers"
BENCH = "encode_bench"
#: sentence-transformers rows: system -> (variant, batch size or None for the shared one).
ST_VARIANTS = {
    "st": (("torch", None), ("bf16", None), ("bf16", 256)),
    "st-onnx": (("onnx", None), ("onnx-int8", None)),
}
#: anglekit rows: name -> worker arguments.
ANGLEKIT_ROWS = {
    "anglekit": [],
    "anglekit bf16": ["--dtype", "bfloat16"],
    "anglekit bf16, batch 128": ["--dtype", "bfloat16", "--batch-size", "128"],
    "anglekit bf16, token budget": [
        "--dtype", "bfloat16", "--max-tokens-per-batch", "{budget}",
    ],
    "anglekit ONNX": ["--backend", "onnx"],
    "anglekit ONNX int8": ["--backend", "onnx", "--quantize", "int8"],
    "anglekit ONNX int8, token budget": [
        "--backend", "onnx", "--quantize", "int8", "--max-tokens-per-batch", "{budget}",
    ],
}  # fmt: skip
#: Most Spearman points the fastest anglekit row may lose against ST torch fp32.
MAX_POINTS_LOST = 0.5
#: Why bf16 rows are left out on a CPU without bf16 matrix kernels.
NO_BF16 = (
    "this CPU has no bf16 matrix kernels (oneDNN needs AVX-512 or AVX-NE-CONVERT): bf16 runs "
    "emulated, several times slower than float32 (--bf16 yes runs it anyway)"
)


@dataclass(frozen=True)
class EncodeConfig:
    """The workload every system gets."""

    threads: int
    count: int = 2000
    batch_size: int = 32
    repetitions: int = 3
    max_tokens_per_batch: int = 2048
    bf16: bool = True  # run the bf16 rows

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


@dataclass(frozen=True)
class Row:
    """One table row: the worker process that measures it."""

    name: str
    python: Path
    script: str
    args: list[str]

    def run(self, threads: int) -> dict[str, Any]:
        """Runs the worker once; returns its result row."""
        return _common.run_worker(BENCH, self.name, self.python, self.script, self.args, threads)


def bench_st(config: EncodeConfig, system: str, rows: dict[str, Row]) -> list[dict]:
    """sentence-transformers: torch fp32 and bf16 (``st``), or ONNX fp32 and int8 (``st-onnx``).
    Each row's worker is also recorded in ``rows``."""
    venv, install = {
        "st": (_common.ST_VENV, _common.ST_INSTALL),
        "st-onnx": (_common.ST_ONNX_VENV, _common.ST_ONNX_INSTALL),
    }[system]
    python = _common.ensure_venv(venv, install)
    results = []
    for variant, batch_size in ST_VARIANTS[system]:
        name = REFERENCE if variant == "torch" else f"{REFERENCE} {variant}"
        args = ["--variant", variant, *config.worker_args()]
        if batch_size is not None:  # the later --batch-size wins
            name += f", batch {batch_size}"
            args += ["--batch-size", str(batch_size)]
        if variant == "bf16" and not config.bf16:
            results.append(_common.result_row(name, "skipped", error=NO_BF16))
            continue
        rows[name] = Row(name, python, "st_encode.py", args)
        results.append(rows[name].run(config.threads))
    return results


def bench_anglekit(config: EncodeConfig, rows: dict[str, Row]) -> list[dict]:
    """anglekit ``AnglE.encode`` with mean pooling: torch fp32/bf16, ONNX fp32/int8. Each
    row's worker is also recorded in ``rows``."""
    python = _common.venv_python(_common.PROJECT_VENV)
    if not python.is_file():
        message = f"{python} not found: run `make` in {_common.REPO_ROOT} to build the project venv"
        print(f"[bench] skipping anglekit: {message}", file=sys.stderr)
        return [_common.result_row(name, "skipped", error=message) for name in ANGLEKIT_ROWS]
    results = []
    for name, extra in ANGLEKIT_ROWS.items():
        if "bfloat16" in extra and not config.bf16:
            results.append(_common.result_row(name, "skipped", error=NO_BF16))
            continue
        extra = [a.format(budget=config.max_tokens_per_batch) for a in extra]
        args = ["--system", name, *config.worker_args(), *extra]  # a later flag wins
        rows[name] = Row(name, python, "anglekit_encode.py", args)
        results.append(rows[name].run(config.threads))
    return results


def head_to_head(
    config: EncodeConfig, rows: dict[str, Row], results: Sequence[dict[str, Any]], pairs: int
) -> dict[str, Any]:
    """Runs sentence-transformers' and anglekit's fastest rows back to back ``pairs`` times,
    alternating which goes first, and prints the ratio of each pair and their median.

    Returns:
        ``{"head_to_head": ...}`` for the results file, or ``{}`` when either row is missing.
    """
    theirs, ours = _fastest(results, REFERENCE), _fastest(results, "anglekit")
    if not (pairs and theirs and ours):
        return {}
    first, second = rows[theirs["system"]], rows[ours["system"]]
    print(f"\nhead to head, {pairs} pairs: {second.name} vs {first.name}")
    speeds, ratios = [], []
    for number in range(pairs):
        order = (first, second) if number % 2 == 0 else (second, first)
        runs = {row.name: row.run(config.threads) for row in order}
        failed = [r for r in runs.values() if r["status"] != "ok"]
        if failed:
            print(f"{failed[0]['system']} failed: {failed[0].get('error')}")
            return {"head_to_head": {"error": failed[0].get("error")}}
        pair = [runs[first.name]["sentences_per_s"], runs[second.name]["sentences_per_s"]]
        speeds.append(pair)
        ratios.append(pair[1] / pair[0])
        print(
            f"  pair {number + 1}: {pair[0]:,.0f} vs {pair[1]:,.0f} sentences/s: {ratios[-1]:.2f}x"
        )
    median = statistics.median(ratios)
    lost = _points_lost(results, ours)
    met = median >= 2 and lost is not None and lost <= MAX_POINTS_LOST
    print(
        f"median pair: {median:.2f}x; target (>= 2x ST's fastest, <= {MAX_POINTS_LOST} points "
        f"lost): {'met' if met else 'not met'}"
    )
    return {
        "head_to_head": {
            "sentence_transformers": first.name,
            "anglekit": second.name,
            "sentences_per_s": speeds,
            "ratios": ratios,
            "median_ratio": median,
        }
    }


def _reference(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """sentence-transformers' torch fp32 row, if it ran."""
    return next((r for r in rows if r["system"] == REFERENCE and r["status"] == "ok"), None)


def _points_lost(rows: Sequence[dict[str, Any]], ours: dict[str, Any]) -> float | None:
    reference = _reference(rows)
    return None if reference is None else reference["stsb_test"] - ours["stsb_test"]


def _fastest(rows: Sequence[dict[str, Any]], prefix: str) -> dict[str, Any] | None:
    ok = [r for r in rows if r["status"] == "ok" and r["system"].startswith(prefix)]
    return max(ok, key=lambda r: r["sentences_per_s"], default=None)


def print_report(rows: Sequence[dict[str, Any]]) -> None:
    """Prints the comparison table, the target check and any failures under it."""
    reference = _reference(rows)
    reference_speed = reference["sentences_per_s"] if reference else None
    st_best = _fastest(rows, REFERENCE)
    best_speed = st_best["sentences_per_s"] if st_best else None
    headers = [
        "system",
        "sentences/s",
        "vs ST torch",
        "vs ST fastest",
        "STS-B test",
        "peak RSS MB",
        "other load",
        "status",
    ]
    table = [
        [
            row["system"],
            _common.fmt(row.get("sentences_per_s"), 0),
            _common.fmt(_common.ratio(row.get("sentences_per_s"), reference_speed)),
            _common.fmt(_common.ratio(row.get("sentences_per_s"), best_speed)),
            _common.fmt(row.get("stsb_test")),
            _common.fmt(row.get("peak_rss_mb"), 0),
            _common.fmt(row.get("other_cores")),
            row["status"],
        ]
        for row in rows
    ]
    print()
    _common.print_table(headers, table)
    ours = _fastest(rows, "anglekit")
    if ours and st_best and reference:
        lost = _points_lost(rows, ours)
        speedup = ours["sentences_per_s"] / st_best["sentences_per_s"]
        print(
            f"\nfastest rows: {ours['system']} is {speedup:.2f}x {st_best['system']} and loses "
            f"{lost:.2f} points against {REFERENCE}"
        )
    _common.print_failures(rows)


def _bf16_rows(choice: str) -> bool:
    if choice != "auto":
        return choice == "yes"
    try:
        from anglekit.cpu_inference import native_cpu_bf16
    except ImportError:  # a driver python without anglekit cannot tell; keep them
        print("[bench] anglekit not importable here: bf16 rows run (--bf16 no skips them)")
        return True
    return native_cpu_bf16()


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the selected systems and writes ``bench/results/encode_bench.json``."""
    parser = _common.base_parser(__doc__, SYSTEMS)
    parser.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=EncodeConfig.max_tokens_per_batch,
        help="token budget of the token-budget row (default: %(default)s)",
    )
    parser.add_argument(
        "--count", type=int, default=EncodeConfig.count, help="sentences (default: %(default)s)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="run all rows this often, round-robin; each row reports its median round "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=5,
        help="head-to-head pairs of the two fastest rows after the rounds, 0 for none "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--bf16",
        choices=("auto", "yes", "no"),
        default="auto",
        help="run the bf16 rows; auto: where torch has bf16 kernels for this CPU "
        "(default: %(default)s)",
    )
    args = parser.parse_args(argv)
    config = EncodeConfig(
        threads=args.threads,
        max_tokens_per_batch=args.max_tokens_per_batch,
        count=args.count,
        bf16=_bf16_rows(args.bf16),
    )
    rows: dict[str, Row] = {}
    runners = {
        "st": lambda: bench_st(config, "st", rows),
        "st-onnx": lambda: bench_st(config, "st-onnx", rows),
        "anglekit": lambda: bench_anglekit(config, rows),
    }
    return _common.run_benchmark(
        BENCH,
        config,
        args.only,
        runners,
        print_report,
        args.rounds,
        "sentences_per_s",
        follow_up=lambda results: head_to_head(config, rows, results, args.pairs),
    )


if __name__ == "__main__":
    sys.exit(main())
