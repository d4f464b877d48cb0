"""Reduced-size benchmark: plain AnglE, Matryoshka and Espresso (ESE) at fewer layers and dims.

all-MiniLM-L6-v2 (packaged) is fine-tuned on STS-B train three ways with the same budget:
``--steps`` (600, 3.3 epochs) optimiser steps of 32 pairs, max length 64, ``--learning-rate``
(1e-4), no warmup, mean pooling, seed 42, anglekit's default precision (bf16 where the CPU
runs it natively), keeping the checkpoint with the best STS-B dev Spearman: by default its
mean over the whole layers x dims grid below (``dev_sizes``), with ``--select full`` at full
size. (``train_bench.py``'s 200 steps at 2e-5 barely move the shallow layers; at full size
the two budgets score alike.)

- ``plain``: the AnglE loss only;
- ``matryoshka``: ``--matryoshka-dims 32,64,128,384`` (weights 1);
- ``ese``: ``--ese`` with the settings in ``ESE_OPTIONS``;
- ``two-layer``: a reference for the 2-layer cells, not an option of one model: the packaged
  model cut to its first 2 layers, then trained alone with the plain loss and the same
  budget (scored on the 2-layer row only).

Each trained model is then cut to 2, 4 and 6 layers (``AnglE.from_pretrained(...,
layers=n)``) and its embeddings to 32, 64, 128 and 384 leading dimensions, and every cell
of that grid is scored on STS-B test (Spearman x100 of cosine); dev is scored too and kept
in the results file, since settings were chosen on dev. Encoding throughput (sentences/s
over the first ``--count`` distinct STS-B train sentences, batch 32, median of 3 passes
after a warm-up) is measured once per layer count: it does not depend on the weights, and
the dimension cut is free.

Runs in the project venv (it imports anglekit). Results go to
``bench/results/espresso_bench.json``.

Example:
    .venv/bin/python bench/espresso_bench.py
    .venv/bin/python bench/espresso_bench.py --only ese --steps 20 --count 200
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common

BENCH = "espresso_bench"
VARIANTS = ("plain", "matryoshka", "ese", "two-layer")
LAYERS = (2, 4, 6)
DIMS = (32, 64, 128, 384)
# bench/README.md, "Fewer layers and dimensions", says how these were chosen.
ESE_OPTIONS: dict[str, Any] = {"ese": True, "ese_compression_size": 64, "ese_distill_w": 5.0}
VARIANT_OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "matryoshka": {"matryoshka_dims": ",".join(map(str, DIMS))},
    "ese": ESE_OPTIONS,
    "two-layer": {},
}
#: Layers the ``two-layer`` reference keeps of the packaged model.
CUT_LAYERS = 2
TARGET = (2, 64)  # the (layers, dims) cell the goals are stated for


@dataclass(frozen=True)
class Config:
    """The run every variant gets."""

    steps: int
    threads: int
    count: int
    learning_rate: float = 1e-4
    batch_size: int = 32
    max_length: int = 64
    seed: int = 42
    layers: tuple[int, ...] = LAYERS
    dims: tuple[int, ...] = DIMS
    select: str = "grid"  # checkpoints by mean dev over the grid, or "full" size only
    variant_options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: dict(VARIANT_OPTIONS)
    )


def train(config: Config, variant: str, output_dir: Path) -> dict[str, Any]:
    """Fine-tune the packaged model with ``variant``'s loss; returns the run's facts."""
    from anglekit import AnglE, fit

    base, layers = str(_common.minilm_folder()), config.layers
    if variant == "two-layer":
        cut = AnglE.from_pretrained(base, pooling="mean", layers=CUT_LAYERS)
        base, layers = str(output_dir / "base"), (CUT_LAYERS,)
        cut.save_pretrained(base)
    result = fit(
        base,
        str(_common.stsb_path("train")),
        dev_data=str(_common.stsb_path("dev")),
        output_dir=str(output_dir),
        max_steps=config.steps,
        batch_size=config.batch_size,
        max_length=config.max_length,
        learning_rate=config.learning_rate,
        pooling="mean",
        seed=config.seed,
        progress=False,
        plots=False,
        dev_sizes=None if config.select == "full" else grid_sizes(config, layers),
        **config.variant_options[variant],
    )
    return {
        "layers": layers,
        "model_dir": result.model_dir,
        "train_pairs_per_s": result.train_examples_per_s,
        "best_step": result.best_step,
        "best_dev_spearman": result.best_dev_spearman,
    }


def grid_sizes(config: Config, layers: Sequence[int]) -> str:
    """The grid as ``fit``'s ``dev_sizes``: ``"2x32,2x64,...,6x384"``."""
    return ",".join(f"{n}x{dims}" for n in layers for dims in config.dims)


def score_grid(
    model_dir: Path | str, config: Config, split: str, layer_counts: Sequence[int]
) -> dict[str, float]:
    """Spearman x100 on an STS-B split for every ``layers x dims`` cell, keyed ``"LxD"``."""
    from anglekit import AnglE

    pairs = _common.load_pairs(_common.stsb_path(split))
    labels = [p.label for p in pairs]
    grid: dict[str, float] = {}
    for layers in layer_counts:
        model = AnglE.from_pretrained(str(model_dir), layers=layers, device="cpu")
        emb1 = model.encode([p.text1 for p in pairs], batch_size=64, show_progress=False)
        emb2 = model.encode([p.text2 for p in pairs], batch_size=64, show_progress=False)
        for dims in config.dims:
            grid[f"{layers}x{dims}"] = _common.spearman_x100(emb1[:, :dims], emb2[:, :dims], labels)
    return grid


def throughput(config: Config) -> dict[str, float]:
    """Encoding sentences/s of the packaged model cut to each layer count, keyed by layers."""
    from anglekit import AnglE

    pairs = _common.load_pairs(_common.stsb_path("train"))
    texts = _common.unique_sentences(pairs, config.count)
    speeds: dict[str, float] = {}
    for layers in config.layers:
        model = AnglE.from_pretrained(
            str(_common.minilm_folder()), pooling="mean", layers=layers, device="cpu"
        )
        timing = _common.time_encode(
            lambda batch, m=model: m.encode(batch, batch_size=32, show_progress=False), texts, 3
        )
        speeds[str(layers)] = timing["sentences_per_s"]
    return speeds


def run_variant(config: Config, variant: str, tmp: Path) -> dict[str, Any]:
    """Train one variant and score its grid on test and dev."""
    facts = train(config, variant, tmp / variant)
    model_dir, layers = facts.pop("model_dir"), facts["layers"]
    return _common.result_row(
        variant,
        "ok",
        options=config.variant_options[variant],
        test=score_grid(model_dir, config, "test", layers),
        dev=score_grid(model_dir, config, "dev", layers),
        **facts,
    )


def print_report(rows: Sequence[dict[str, Any]], config: Config) -> None:
    """Print the STS-B test grid of each variant, the throughput and the target check."""
    ok = [r for r in rows if r["status"] == "ok" and r["system"] in VARIANTS]
    headers = ["variant", "layers", *[f"{d} dims" for d in config.dims]]
    table = [
        [
            row["system"],
            str(layers),
            *[_common.fmt(row["test"][f"{layers}x{d}"]) for d in config.dims],
        ]
        for row in ok
        for layers in row["layers"]
    ]
    print("\nSTS-B test Spearman x100")
    _common.print_table(headers, table)
    speed = next((r for r in rows if r["system"] == "throughput" and r["status"] == "ok"), None)
    if speed:
        full = speed["sentences_per_s"][str(max(config.layers))]
        print("\nencode throughput (packaged model, batch 32)")
        _common.print_table(
            ["layers", "sentences/s", f"vs {max(config.layers)} layers"],
            [
                [str(n), _common.fmt(s, 1), _common.fmt(s / full)]
                for n, s in ((int(k), v) for k, v in speed["sentences_per_s"].items())
            ],
        )
    by_name = {r["system"]: r for r in ok}
    cell, full_cell = "{}x{}".format(*TARGET), f"{max(config.layers)}x{max(config.dims)}"
    if "ese" in by_name and cell in by_name["ese"]["test"]:
        ese = by_name["ese"]["test"]
        kept = ese[cell] / ese[full_cell]
        print(f"\nESE at {cell}: {ese[cell]:.2f}, {100 * kept:.1f}% of its {full_cell} score")
        if "plain" in by_name:
            gain = ese[cell] - by_name["plain"]["test"][cell]
            print(f"ESE vs plain at {cell}: {gain:+.2f} points")
        if "two-layer" in by_name and cell in by_name["two-layer"]["test"]:
            alone = by_name["two-layer"]["test"]
            best = max(alone.values())
            print(
                f"{CUT_LAYERS} layers trained alone: {alone[cell]:.2f} at {cell}, best {best:.2f} "
                f"({100 * best / ese[full_cell]:.1f}% of ESE's {full_cell})"
            )
    _common.print_failures(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Train the selected variants, score their grids and write the results file."""
    parser = _common.base_parser(__doc__, (*VARIANTS, "throughput"))
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps (default: 600)")
    parser.add_argument(
        "--learning-rate", type=float, default=1e-4, help="peak learning rate (default: 1e-4)"
    )
    parser.add_argument(
        "--count", type=int, default=2000, help="sentences timed per layer count (default: 2000)"
    )
    parser.add_argument(
        "--select",
        choices=("grid", "full"),
        default="grid",
        help="keep the checkpoint best on mean dev over the grid, or at full size "
        "(default: %(default)s)",
    )
    args = parser.parse_args(argv)
    config = Config(
        steps=args.steps,
        threads=args.threads,
        count=args.count,
        select=args.select,
        learning_rate=args.learning_rate,
    )
    _common.setup_torch(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="anglekit-espresso-") as tmp_name:
        tmp = Path(tmp_name)
        runners = {v: (lambda v=v: [run_variant(config, v, tmp)]) for v in VARIANTS}
        runners["throughput"] = lambda: [
            _common.result_row("throughput", "ok", sentences_per_s=throughput(config))
        ]
        return _common.run_benchmark(
            BENCH, config, args.only, runners, lambda rows: print_report(rows, config)
        )


if __name__ == "__main__":
    sys.exit(main())
