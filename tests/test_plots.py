"""Plots of evaluations and training runs, and the quiet progress bars around them."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

from anglekit import fit
from anglekit.cli import main
from anglekit.data import StsPairs
from anglekit.evaluation import run_suite
from anglekit.plots import INSTALL_HINT, training_plots, write_training_plots

from .conftest import write_jsonl

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    """Whether a file exists and starts with the PNG signature."""
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Make ``import matplotlib`` fail, as when the [plot] extra is not installed."""
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_eval_plot_writes_scatter_per_task_and_suite_chart(tiny_bert, tmp_path, sts_rows):
    """eval --plot writes one scatter per model and task, and one bar chart."""
    pytest.importorskip("matplotlib")
    data = write_jsonl(tmp_path / "sts.jsonl", sts_rows)
    plots = tmp_path / "plots"
    assert main(["-q", "eval", str(tiny_bert), "--data", str(data), "--plot", str(plots)]) == 0
    scatters = list(plots.glob("*/sts.png"))
    assert len(scatters) == 1 and is_png(scatters[0])
    assert is_png(plots / "suite.png")


def test_training_plots_from_log_history(tmp_path):
    """Loss and dev Spearman curves are written from Trainer log records; no dev, no dev plot."""
    pytest.importorskip("matplotlib")
    history = [
        {"step": 1, "loss": 2.0, "learning_rate": 1e-3},
        {"step": 2, "loss": 1.5, "learning_rate": 5e-4},
        {"step": 2, "eval_spearman": 40.0, "eval_pearson": 38.0},
        {"step": 4, "eval_spearman": 55.5, "eval_pearson": 50.0},
        {"step": 4, "train_loss": 1.7, "train_runtime": 1.0},
    ]
    written = training_plots(history, tmp_path / "a")
    assert [p.name for p in written] == ["loss.png", "dev_spearman.png"]
    assert all(is_png(p) for p in written)
    written = training_plots(history[:2], tmp_path / "b")
    assert [p.name for p in written] == ["loss.png"]


def test_fit_writes_training_plots(tiny_bert, tmp_path, sts_rows):
    """fit leaves loss and dev Spearman plots in <output_dir>/plots."""
    pytest.importorskip("matplotlib")
    data = write_jsonl(tmp_path / "sts.jsonl", sts_rows)
    fit(
        str(tiny_bert),
        str(data),
        dev_data=str(data),
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        eval_steps=1,
        batch_size=4,
        logging_steps=1,
        progress=False,
        ibn_threshold=4.0,
    )
    assert is_png(tmp_path / "run" / "plots" / "loss.png")
    assert is_png(tmp_path / "run" / "plots" / "dev_spearman.png")


def test_without_matplotlib_training_logs_and_eval_plot_fails(
    no_matplotlib, tiny_bert, tmp_path, caplog, capsys
):
    """Without matplotlib, training plots are a log line and eval --plot is a clear error."""
    history = [{"step": 1, "loss": 1.0}]
    with caplog.at_level(logging.INFO, logger="anglekit.plots"):
        assert write_training_plots(history, tmp_path / "plots") == []
    assert INSTALL_HINT in caplog.text
    assert not (tmp_path / "plots").exists()

    code = main(["-q", "eval", str(tiny_bert), "--data", "x.jsonl", "--plot", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and 'pip install "anglekit[plot]"' in err and "Traceback" not in err


def test_eval_progress_bar_only_when_asked(capsys):
    """run_suite draws a per-task bar when asked, and none on a non-terminal by default."""
    pairs = StsPairs(["a", "b", "c"], ["b", "c", "a"], np.array([1.0, 2.0, 3.0]))
    rng = np.random.default_rng(0)

    def encode(texts: list[str]) -> np.ndarray:
        return rng.normal(size=(len(texts), 4))

    run_suite(encode, {"x": pairs, "y": pairs})  # stderr is captured: not a terminal
    assert "task" not in capsys.readouterr().err
    result = run_suite(encode, {"x": pairs, "y": pairs}, show_progress=True, keep_cosines=True)
    assert "2/2" in capsys.readouterr().err
    assert set(result.cosines) == {"x", "y"} and result.cosines["x"].shape == (3,)
