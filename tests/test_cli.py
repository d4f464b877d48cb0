"""The anglekit command, run in-process through main(argv)."""

from __future__ import annotations

import json
from dataclasses import fields

import numpy as np
import pytest

from anglekit.cli import build_parser, main
from anglekit.losses import LossConfig
from anglekit.training import TrainOptions

from .conftest import WORDS, write_jsonl


def test_train_flags_cover_every_option():
    """Every TrainOptions and LossConfig field is a train flag with the same default."""
    parser = build_parser()
    args = parser.parse_args(["train"])
    for f in [*fields(TrainOptions), *fields(LossConfig)]:
        assert getattr(args, f.name) == f.default, f.name
    args = parser.parse_args(
        [
            "train",
            "--bf16",
            "--no-drop-duplicates",
            "--dev-data",
            "none",
            "--max-steps",
            "7",
            "--ibn-threshold",
            "4",
        ]
    )
    assert args.bf16 is True and args.drop_duplicates is False and args.dev_data is None
    assert args.max_steps == 7 and args.ibn_threshold == 4.0


def test_train_help_has_examples(capsys):
    """train --help prints usage examples."""
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_train_eval_encode_round_trip(tiny_bert, tmp_path, sts_rows, capsys):
    """train writes a model, eval prints and writes its Spearman, encode writes its vectors."""
    train = write_jsonl(tmp_path / "train.jsonl", sts_rows)
    out = tmp_path / "run"
    code = main(
        [
            "-q",
            "train",
            "--model",
            str(tiny_bert),
            "--train-data",
            str(train),
            "--dev-data",
            str(train),
            "--output-dir",
            str(out),
            "--max-steps",
            "2",
            "--eval-steps",
            "1",
            "--batch-size",
            "4",
            "--ibn-threshold",
            "4",
        ]
    )
    assert code == 0
    assert "model saved to" in capsys.readouterr().out
    model_dir = out / "model"

    code = main(
        [
            "-q",
            "eval",
            str(tiny_bert),
            str(model_dir),
            "--data",
            str(train),
            "--json",
            str(tmp_path / "eval.json"),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    result = json.loads((tmp_path / "eval.json").read_text())
    assert [row["model"] for row in result["rows"]] == [str(tiny_bert), str(model_dir)]
    score = result["rows"][1]["scores"]["train"]
    assert -100 <= score <= 100 and f"{score:.2f}" in table

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(WORDS[:5]) + "\n")

    def encode(output: str, *extra: str) -> int:
        argv = ["-q", "encode", str(model_dir), "--input", str(texts), "--output", output]
        return main([*argv, *extra])

    assert encode(str(tmp_path / "v.npy"), "--normalize") == 0
    vecs = np.load(tmp_path / "v.npy")
    assert vecs.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert encode(str(tmp_path / "v.jsonl")) == 0
    lines = (tmp_path / "v.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["text"] == WORDS[0] and len(lines) == 5


def test_errors_are_one_line_and_nonzero(tiny_bert, tmp_path, capsys):
    """Bad data, a missing file and a bad flag value exit non-zero with a readable message."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text1": "a", "text2": "", "label": 1}\n')
    assert main(["-q", "train", "--model", str(tiny_bert), "--train-data", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "text2" in err and "Traceback" not in err

    assert main(["-q", "eval", str(tiny_bert), "--data", str(tmp_path / "missing.jsonl")]) == 1
    assert "missing.jsonl" in capsys.readouterr().err

    assert (
        main(
            [
                "-q",
                "encode",
                str(tiny_bert),
                "--input",
                str(bad),
                "--output",
                str(tmp_path / "x.txt"),
            ]
        )
        == 1
    )
    assert "--output" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--batch-size", "many"])
    assert exit_info.value.code == 2


def test_train_closes_the_process_group(tiny_bert, tmp_path, capsys):
    """``train`` ends a launcher's process group itself, also when it fails, so no
    communication thread is left for the interpreter's shutdown to abort on."""
    import torch.distributed as dist

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text1": "a", "label": 1}\n')
    try:
        assert main(["-q", "train", "--model", str(tiny_bert), "--train-data", str(bad)]) == 1
        assert "bad.jsonl:1" in capsys.readouterr().err
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
