"""Resume after a crash: SIGKILL mid-run, ``--resume``, same final model; no half checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from anglekit import AnglE
from anglekit.checkpoints import COMPLETE_MARKER, last_complete_checkpoint
from anglekit.cli import main

from .conftest import WORDS, write_jsonl

SRC = Path(__file__).resolve().parents[1] / "src"
RUN = "import sys; from anglekit.cli import main; sys.exit(main(sys.argv[1:]))"


def _args(model: Path, data: Path, out: Path) -> list[str]:
    return [
        "train",
        *("--model", str(model), "--train-data", str(data), "--output-dir", str(out)),
        *("--dev-data", "none", "--max-steps", "24", "--save-steps", "4", "--batch-size", "4"),
        *("--learning-rate", "1e-3", "--save-total-limit", "2", "--logging-steps", "5"),
        *("--ibn-threshold", "3", "--no-bf16", "--no-plots", "--no-progress"),
    ]


@pytest.fixture
def rows():
    # 30 distinct pairs: several epochs in 24 steps, so resume crosses epoch boundaries.
    return [
        {"text1": f"{WORDS[i % 12]} {i}", "text2": f"{WORDS[(i + 3) % 12]} {i}", "label": i % 6}
        for i in range(30)
    ]


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_bert, rows, tmp_path):
    """A run killed with SIGKILL after a checkpoint, then resumed, ends with the same model."""
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    cut = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, *_args(tiny_bert, data, cut)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while last_complete_checkpoint(cut, remove_incomplete=False) is None:
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (cut / "model").exists()  # it really was cut short
    killed_at = int(Path(last_complete_checkpoint(cut, remove_incomplete=False)).name.split("-")[1])
    assert killed_at < 24

    import torch

    torch.set_num_threads(1)
    assert main([*_args(tiny_bert, data, cut), "--resume"]) == 0
    assert main(_args(tiny_bert, data, tmp_path / "full")) == 0
    summary = json.loads((cut / "train_summary.json").read_text())
    assert summary["steps"] == 24
    a = AnglE.from_pretrained(str(tmp_path / "full" / "model"), device="cpu").encode(WORDS)
    b = AnglE.from_pretrained(str(cut / "model"), device="cpu").encode(WORDS)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_resume_skips_a_checkpoint_cut_short_while_saving(tiny_bert, rows, tmp_path):
    """A checkpoint without its completion marker (a kill during its save) is never resumed."""
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    args = _args(tiny_bert, data, out)
    args[args.index("--max-steps") + 1] = "8"
    assert main(args) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert all((p / COMPLETE_MARKER).is_file() for p in out.glob("checkpoint-*"))
    # A save of step 12 killed halfway: weights written, trainer state truncated, no marker.
    half = out / "checkpoint-12"
    shutil.copytree(out / "checkpoint-8", half)
    (half / COMPLETE_MARKER).unlink()
    (half / "trainer_state.json").write_text('{"global_step": 1')
    shutil.rmtree(out / "model")
    assert last_complete_checkpoint(out, remove_incomplete=False) == str(out / "checkpoint-8")
    args[args.index("--max-steps") + 1] = "12"
    assert main([*args, "--resume"]) == 0
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 12
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12 and (out / "checkpoint-12" / COMPLETE_MARKER).is_file()
    assert not (out / "checkpoint-4").exists()  # rotation still keeps save_total_limit=2
