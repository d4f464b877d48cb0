"""``torchrun`` with 2 CPU processes through ``anglekit train``: one writer, same model.

Every run hides CUDA devices, so the comparison is between CPU runs on any machine (on one
GPU, two processes would both claim it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anglekit import AnglE
from anglekit.checkpoints import COMPLETE_MARKER

from .conftest import WORDS, write_jsonl
from .test_scale import _no_dropout_copy

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.mark.slow
def test_torchrun_two_processes_with_gathering_equal_one_process(tiny_bert, tmp_path):
    """2 x batch 3 with gathered negatives trains the model 1 x batch 6 trains; rank 0 writes."""
    model = _no_dropout_copy(tiny_bert, tmp_path / "bert")  # dropout masks differ per process
    rows = [
        {"text1": f"{WORDS[i % 12]} {i}", "text2": f"{WORDS[(i + 3) % 12]} {i}", "label": i % 6}
        for i in range(30)
    ]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    common = [
        *("train", "--model", str(model), "--train-data", str(data), "--dev-data", "none"),
        *("--max-steps", "4", "--save-steps", "2", "--learning-rate", "1e-3"),
        *("--ibn-threshold", "3", "--no-plots", "--no-progress", "--no-bf16"),
        *("--no-group-by-length", "--no-drop-duplicates"),
    ]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}

    def train(*launch: str, batch_size: int, out: Path, extra: tuple[str, ...] = ()) -> str:
        cmd = [*launch, "-m", "anglekit", *common, "--batch-size", str(batch_size)]
        cmd += ["--output-dir", str(out), *extra]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2")
    runs = {}
    for name, extra in (("gathered", ("--gather-across-devices",)), ("local", ())):
        runs[name] = tmp_path / name
        stdout = train(*torchrun, batch_size=3, out=runs[name], extra=extra)
        assert stdout.count("model saved to") == 1  # one process reports
    ckpt = runs["gathered"] / "checkpoint-4"
    assert {"rng_state_0.pth", "rng_state_1.pth", COMPLETE_MARKER} <= {
        p.name for p in ckpt.iterdir()
    }
    summary = json.loads((runs["gathered"] / "train_summary.json").read_text())
    assert summary["options"]["gather_across_devices"] is True
    train(sys.executable, batch_size=6, out=tmp_path / "one")

    def vectors(folder: Path) -> np.ndarray:
        return AnglE.from_pretrained(str(folder / "model"), device="cpu").encode(WORDS)

    one, before = vectors(tmp_path / "one"), AnglE.from_pretrained(str(model)).encode(WORDS)
    moved = np.abs(one - before).max()
    gathered_gap = np.abs(vectors(runs["gathered"]) - one).max()
    local_gap = np.abs(vectors(runs["local"]) - one).max()
    assert moved > 1e-2
    assert gathered_gap < 0.01 * moved  # Adam magnifies float rounding: compare to the update
    assert local_gap > 5 * gathered_gap  # per-device negatives train another model


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    "path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.stem
)
def test_accelerate_configs_load(path):
    """Each launch config parses with accelerate's own loader; DeepSpeed files exist and parse."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 2 and config.distributed_type.value in path.read_text()
    ds_file = (config.deepspeed_config or {}).get("deepspeed_config_file")
    if ds_file:
        ds = json.loads((CONFIGS.parent / ds_file).read_text())
        assert ds["train_micro_batch_size_per_gpu"] == "auto"  # the anglekit flags decide
        if ds["zero_optimization"]["stage"] == 3:
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
