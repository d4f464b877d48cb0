"""Training benchmark: angle-emb, sentence-transformers and anglekit fine-tune on STS-B.

The three fine-tune all-MiniLM-L6-v2 on this machine, one after another, and are compared
on quality, speed and memory.

Every system gets the same run: STS-B train, ``--steps`` optimiser steps of 32 pairs,
max length 64, learning rate 2e-5 with linear decay and no warmup, mean pooling, seed 42,
fp32 (plus an anglekit bf16 run), ``--threads`` torch threads. Reported per system:
STS-B test Spearman x100 (cosine) before and after training, training pairs/s
(steps x batch / seconds of the training call), its ratio to angle-emb's, and the
peak resident memory of the process that trained.

Peers run in their own venvs under ``bench/.venvs/`` (created on first use); anglekit
runs through its CLI from the project venv (``make`` creates it). Results go to
``bench/results/train_bench.json`` and worker logs to ``bench/results/logs/``.

Example:
    .venv/bin/python bench/train_bench.py
    .venv/bin/python bench/train_bench.py --only anglekit --steps 20
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common

SYSTEMS = ("angle-emb", "st", "anglekit")
ST_LOSSES = ("AnglELoss", "CoSENTLoss")
REFERENCE = "angle-emb"
BENCH = "train_bench"


@dataclass(frozen=True)
class TrainConfig:
    """The run every system gets."""

    steps: int
    threads: int
    batch_size: int = 32
    max_length: int = 64
    learning_rate: float = 2e-5
    warmup_steps: int = 0
    seed: int = 42

    def worker_args(self) -> list[str]:
        """The shared command-line arguments of the peer training workers."""
        return [
            "--model", str(_common.minilm_folder()),
            "--train-data", str(_common.stsb_path("train")),
            "--test-data", str(_common.stsb_path("test")),
            "--steps", str(self.steps),
            "--batch-size", str(self.batch_size),
            "--max-length", str(self.max_length),
            "--learning-rate", str(self.learning_rate),
            "--warmup-steps", str(self.warmup_steps),
            "--seed", str(self.seed),
            "--threads", str(self.threads),
        ]  # fmt: skip


def bench_angle_emb(config: TrainConfig) -> list[dict]:
    """angle-emb 0.6.1 with its AngleLoss (cosine_w=1, ibn_w=1, angle_w=0.02)."""
    python = _common.ensure_venv(_common.ANGLE_EMB_VENV, _common.ANGLE_EMB_INSTALL)
    args = config.worker_args()
    return [
        _common.run_worker(BENCH, "angle-emb", python, "angle_emb_train.py", args, config.threads)
    ]


def bench_st(config: TrainConfig) -> list[dict]:
    """sentence-transformers with AnglELoss and with CoSENTLoss."""
    python = _common.ensure_venv(_common.ST_VENV, _common.ST_INSTALL)
    return [
        _common.run_worker(
            BENCH,
            f"sentence-transformers {loss}",
            python,
            "st_train.py",
            ["--loss", loss, *config.worker_args()],
            config.threads,
        )
        for loss in ST_LOSSES
    ]


def read_eval_score(path: Path) -> tuple[float, str]:
    """Reads the STS-B score from an ``anglekit eval --json`` file.

    The score is ``rows[0].scores["STS-B"]``; when eval names the task after the data
    file instead (``"test"``) and it is the only score, that one is taken and its key
    is returned so the results record it.

    Returns:
        The score and the key it was read from.

    Raises:
        ValueError: If the file does not follow ``{"rows": [{"scores": {...}}]}`` or the
            STS-B score cannot be told apart.
    """
    document = json.loads(path.read_text(encoding="utf-8"))
    try:
        scores = document["rows"][0]["scores"]
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(f"{path}: expected rows[0].scores, got {str(document)[:300]}") from err
    if "STS-B" in scores:
        return float(scores["STS-B"]), "STS-B"
    if len(scores) == 1:
        key, value = next(iter(scores.items()))
        return float(value), key
    raise ValueError(f"{path}: no 'STS-B' score among {sorted(scores)}")


def read_train_summary(path: Path) -> dict[str, Any]:
    """Reads ``train_summary.json`` and checks the keys the benchmark relies on.

    Raises:
        ValueError: Naming the missing keys.
    """
    if not path.is_file():
        raise ValueError(f"anglekit train wrote no {path}")
    summary = json.loads(path.read_text(encoding="utf-8"))
    missing = [k for k in ("train_pairs_per_s", "train_seconds", "steps") if k not in summary]
    if missing:
        raise ValueError(f"{path}: missing {missing}; has {sorted(summary)}")
    return summary


def anglekit_eval(model_dir: Path, json_path: Path, threads: int) -> tuple[float, str]:
    """Scores ``model_dir`` on STS-B test with ``anglekit eval``.

    Returns:
        The Spearman x100 and the key of the eval JSON it was read from.

    Raises:
        RuntimeError: If the command fails.
    """
    exe = _common.PROJECT_VENV / "bin" / "anglekit"
    command = [exe, "eval", model_dir, "--data", _common.stsb_path("test"), "--json", json_path]
    run = _common.run_process(command, _common.worker_env(threads))
    if not run.ok:
        raise RuntimeError(f"anglekit eval {model_dir}: {run.error()}")
    return read_eval_score(json_path)


def bench_anglekit(config: TrainConfig) -> list[dict]:
    """anglekit's CLI from the project venv, with ``--no-bf16`` (fp32) and ``--bf16``."""
    # anglekit turns bf16 on by default where the CPU runs it natively, so fp32 is explicit.
    variants = (("anglekit fp32", ["--no-bf16"]), ("anglekit bf16", ["--bf16"]))
    exe = _common.PROJECT_VENV / "bin" / "anglekit"
    if not exe.is_file():
        message = f"{exe} not found: run `make` in {_common.REPO_ROOT} to build the project venv"
        print(f"[bench] skipping anglekit: {message}", file=sys.stderr)
        return [_common.result_row(name, "skipped", error=message) for name, _ in variants]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="anglekit-bench-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            before: float | None
            before, _ = anglekit_eval(
                _common.minilm_folder(), tmp / "eval-before.json", config.threads
            )
        except (RuntimeError, ValueError, OSError) as err:
            print(f"[bench] anglekit eval of the base model failed: {err}", file=sys.stderr)
            before = None
        for name, extra in variants:
            output_dir = tmp / name.replace(" ", "-")
            command = [
                exe, "train",
                "--model", _common.minilm_folder(),
                "--train-data", _common.stsb_path("train"),
                "--dev-data", _common.stsb_path("dev"),
                "--output-dir", output_dir,
                "--max-steps", str(config.steps),
                "--batch-size", str(config.batch_size),
                "--max-length", str(config.max_length),
                "--learning-rate", str(config.learning_rate),
                "--pooling", "mean",
                "--seed", str(config.seed),
                *extra,
            ]  # fmt: skip
            run = _common.run_process(
                command,
                _common.worker_env(config.threads),
                _common.log_path(BENCH, name),
            )
            if not run.ok:
                rows.append(_common.result_row(name, "failed", before=before, error=run.error()))
                continue
            try:
                summary = read_train_summary(output_dir / "train_summary.json")
                model_dir = Path(summary.get("model_dir", output_dir / "model"))
                eval_json = tmp / f"eval-{output_dir.name}.json"
                after, score_key = anglekit_eval(model_dir, eval_json, config.threads)
            except (RuntimeError, ValueError, OSError) as err:
                rows.append(_common.result_row(name, "failed", before=before, error=str(err)))
                continue
            rows.append(
                _common.result_row(
                    name,
                    "ok",
                    before=before,
                    after=after,
                    steps=summary["steps"],
                    batch_size=config.batch_size,
                    train_seconds=summary["train_seconds"],
                    train_pairs_per_s=summary["train_pairs_per_s"],
                    peak_rss_mb=run.peak_rss_mb,
                    process_wall_s=run.wall_s,
                    other_cores=run.other_cores,
                    eval_score_key=score_key,
                    best_step=summary.get("best_step"),
                    bf16=summary.get("options", {}).get("bf16"),
                )
            )
    return rows


def print_report(rows: Sequence[dict]) -> None:
    """Prints the comparison table and any failures under it."""
    reference = next(
        (r["train_pairs_per_s"] for r in rows if r["system"] == REFERENCE and r["status"] == "ok"),
        None,
    )
    table = [
        [
            row["system"],
            _common.fmt(row.get("before")),
            _common.fmt(row.get("after")),
            _common.fmt(row.get("train_pairs_per_s"), 1),
            _common.fmt(_common.ratio(row.get("train_pairs_per_s"), reference)),
            _common.fmt(row.get("peak_rss_mb"), 0),
            _common.fmt(row.get("other_cores")),
            row["status"],
        ]
        for row in rows
    ]
    headers = [
        "system",
        "STS-B before",
        "STS-B after",
        "train pairs/s",
        f"vs {REFERENCE}",
        "peak RSS MB",
        "other load",
        "status",
    ]
    print()
    _common.print_table(headers, table)
    _common.print_failures(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the selected systems and writes ``bench/results/train_bench.json``."""
    parser = _common.base_parser(__doc__, SYSTEMS)
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps (default: 200)")
    args = parser.parse_args(argv)
    config = TrainConfig(steps=args.steps, threads=args.threads)
    runners = {
        "angle-emb": lambda: bench_angle_emb(config),
        "st": lambda: bench_st(config),
        "anglekit": lambda: bench_anglekit(config),
    }
    return _common.run_benchmark(BENCH, config, args.only, runners, print_report)


if __name__ == "__main__":
    sys.exit(main())
