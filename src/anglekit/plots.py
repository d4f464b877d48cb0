"""PNG plots of evaluations and training runs (optional extra: ``pip install "anglekit[plot]"``).

* :func:`scatter_plot`: one task's predicted cosine against the gold score, Spearman in the title.
* :func:`suite_bar_chart`: Spearman x100 per task (and the average) for one or more models.
* :func:`training_plots`: the training loss and dev Spearman against the optimizer step, from
  the Trainer's ``log_history``.

Figures are drawn on matplotlib's Agg canvas without ``pyplot``, so no window opens and no
global backend setting changes.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anglekit.data import StsPairs
    from anglekit.evaluation import SuiteResult

__all__ = [
    "INSTALL_HINT",
    "eval_plots",
    "require_matplotlib",
    "scatter_plot",
    "suite_bar_chart",
    "training_plots",
    "write_training_plots",
]

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "anglekit[plot]"'


def require_matplotlib() -> None:
    """Check that matplotlib can be imported.

    Raises:
        ImportError: matplotlib is missing; the message names the install command.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError(f"plots need matplotlib: {INSTALL_HINT}") from e


def _step_axis(ax: Any) -> None:
    """Integer ticks on an optimizer-step x axis."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")


def _figure(width: float = 6.0, height: float = 4.5):
    """A figure on the Agg canvas (no pyplot, no window)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    logger.debug("wrote %s", path)
    return path


def _slug(name: str) -> str:
    """A file-name-safe version of a model or task name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "model"


def scatter_plot(
    cosines: Sequence[float] | np.ndarray,
    gold: Sequence[float] | np.ndarray,
    path: str | Path,
    *,
    task: str,
    spearman: float,
    model: str | None = None,
) -> Path:
    """Scatter of predicted cosine (y) against gold score (x) for one task.

    Args:
        cosines: ``(N,)`` predicted cosine similarities.
        gold: ``(N,)`` gold scores.
        path: the PNG to write.
        task: task name for the title.
        spearman: Spearman x100 for the title.
        model: model name for the title.

    Returns:
        ``path``.
    """
    cosines = np.asarray(cosines, dtype=np.float64)  # (N,)
    gold = np.asarray(gold, dtype=np.float64)  # (N,)
    fig = _figure()
    ax = fig.add_subplot()
    alpha = 0.7 if len(gold) < 500 else 0.25
    ax.scatter(gold, cosines, s=12, alpha=alpha, edgecolors="none")
    score = "nan" if math.isnan(spearman) else f"{spearman:.2f}"
    ax.set_title(f"{task}: Spearman x100 = {score}  (n={len(gold)})")
    if model:
        fig.suptitle(model, fontsize="small")
    ax.set_xlabel("gold similarity score")
    ax.set_ylabel("predicted cosine similarity")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(True, alpha=0.3)
    return _save(fig, Path(path))


def suite_bar_chart(rows: Sequence[tuple[str, SuiteResult]], path: str | Path) -> Path:
    """Grouped bars of Spearman x100 per task and the average, one colour per model.

    Tasks without data or with an undefined (NaN) score get no bar for that model.

    Args:
        rows: ``(model name, result)`` pairs, as for :func:`anglekit.evaluation.format_table`.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    tasks = list(dict.fromkeys(name for _, result in rows for name in result.scores))
    columns = [*tasks, "Avg"]
    fig = _figure(width=min(16.0, max(6.0, 0.7 * len(columns) * len(rows) + 2)), height=4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(rows)
    x = np.arange(len(columns))
    for i, (model, result) in enumerate(rows):
        values = [
            c.spearman if (c := result.scores.get(t)) is not None else math.nan for t in tasks
        ]
        values.append(math.nan if result.avg is None else result.avg)
        heights = np.array(values, dtype=np.float64)
        ok = np.isfinite(heights)
        bars = ax.bar(x[ok] + (i - (len(rows) - 1) / 2) * width, heights[ok], width, label=model)
        ax.bar_label(bars, fmt="%.2f", fontsize="x-small", padding=2)
    ax.set_xticks(x, columns)
    ax.set_xlabel("task")
    ax.set_ylabel("Spearman x100 (cosine vs gold)")
    ax.set_title("STS evaluation")
    ax.axhline(0, color="black", linewidth=0.8)
    low = min(0.0, *(b.get_height() for b in ax.patches)) if ax.patches else 0.0
    ax.set_ylim(min(low * 1.15, 0.0), 105)
    ax.grid(True, axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=min(3, len(rows)), fontsize="small")
    return _save(fig, Path(path))


def eval_plots(
    rows: Sequence[tuple[str, SuiteResult]],
    datasets: Mapping[str, StsPairs | None],
    directory: str | Path,
) -> list[Path]:
    """Write a scatter per model and task, and the suite's bar chart.

    Layout: ``<dir>/<model>/<task>.png`` (from ``SuiteResult.cosines``, so run the suite with
    ``keep_cosines=True``) and ``<dir>/suite.png``.

    Args:
        rows: ``(model name, result)`` pairs.
        datasets: the evaluated sets (for the gold scores), as given to ``run_suite``.
        directory: where to write.

    Returns:
        The files written.

    Raises:
        ValueError: a result was computed without its cosines.
    """
    require_matplotlib()
    out = Path(directory)
    written = []
    for model, result in rows:
        if result.cosines is None:
            raise ValueError(f"no per-pair cosines for {model}: run_suite(keep_cosines=True)")
        for task, cos in result.cosines.items():
            pairs = datasets[task]
            corr = result.scores[task]
            written.append(
                scatter_plot(
                    cos,
                    pairs.scores,
                    out / _slug(model) / f"{_slug(task)}.png",
                    task=task,
                    spearman=math.nan if corr is None else corr.spearman,
                    model=model,
                )
            )
    written.append(suite_bar_chart(rows, out / "suite.png"))
    return written


def training_plots(log_history: Sequence[Mapping[str, Any]], directory: str | Path) -> list[Path]:
    """Plot the training loss and the dev Spearman against the step.

    Args:
        log_history: the Trainer's ``state.log_history``: records with ``step`` and ``loss``
            (training) or ``eval_spearman`` (evaluation).
        directory: where to write ``loss.png`` and (with evaluations) ``dev_spearman.png``.

    Returns:
        The files written (none when there was nothing to plot).
    """
    require_matplotlib()
    out = Path(directory)
    written = []
    loss = [(r["step"], r["loss"]) for r in log_history if "loss" in r and "step" in r]
    dev = [(r["step"], r["eval_spearman"]) for r in log_history if "eval_spearman" in r]
    if loss:
        fig = _figure()
        ax = fig.add_subplot()
        steps, values = zip(*loss, strict=True)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        _step_axis(ax)
        ax.set_ylabel("training loss (AnglE objective)")
        ax.set_title("Training loss")
        ax.grid(True, alpha=0.3)
        written.append(_save(fig, out / "loss.png"))
    if dev:
        fig = _figure()
        ax = fig.add_subplot()
        steps, values = zip(*dev, strict=True)
        ax.plot(steps, values, marker="o", markersize=4)
        finite = [(s, v) for s, v in dev if math.isfinite(v)]
        if finite:
            best_step, best = max(finite, key=lambda sv: sv[1])
            ax.plot([best_step], [best], marker="*", markersize=14, linestyle="none")
            ax.annotate(
                f"best {best:.2f} @ step {best_step}",
                (best_step, best),
                textcoords="offset points",
                xytext=(0, 10),
                ha="center",
            )
        _step_axis(ax)
        ax.set_ylabel("dev Spearman x100")
        ax.set_title("Dev Spearman during training")
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.1, y=0.2)
        written.append(_save(fig, out / "dev_spearman.png"))
    return written


def write_training_plots(
    log_history: Sequence[Mapping[str, Any]], directory: str | Path
) -> list[Path]:
    """:func:`training_plots`, or a log line saying how to get plots when matplotlib is absent.

    Returns:
        The files written; none without matplotlib.
    """
    try:
        require_matplotlib()
    except ImportError:
        logger.info("no training plots: matplotlib is not installed (%s)", INSTALL_HINT)
        return []
    written = training_plots(log_history, directory)
    if written:
        logger.info("wrote training plots to %s", Path(directory))
    return written
