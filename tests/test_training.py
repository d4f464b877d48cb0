"""fit(): training on tiny models, best-checkpoint selection, resume, option checking."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anglekit import AnglE, TrainOptions, cpu_inference, fit
from anglekit.training import SUMMARY_FILE, fast_bf16, split_options

from .conftest import WORDS, write_jsonl

FAST = dict(
    batch_size=4,
    learning_rate=1e-3,
    logging_steps=1,
    progress=False,
    save_total_limit=5,
    plots=False,
)


@pytest.fixture
def sts_files(tmp_path, sts_rows):
    return write_jsonl(tmp_path / "train.jsonl", sts_rows), write_jsonl(
        tmp_path / "dev.jsonl", sts_rows
    )


def test_fit_scored_pairs_keeps_best_checkpoint(tiny_bert, sts_files, tmp_path):
    """Training changes the weights, evaluates on dev, and saves the best checkpoint."""
    train, dev = sts_files
    before = AnglE.from_pretrained(str(tiny_bert), device="cpu").encode(WORDS)
    result = fit(
        str(tiny_bert),
        str(train),
        dev_data=str(dev),
        output_dir=str(tmp_path / "run"),
        max_steps=6,
        eval_steps=2,
        ibn_threshold=4.0,
        **FAST,
    )
    assert result.steps == 6 and result.model_dir == tmp_path / "run" / "model"
    summary = json.loads((tmp_path / "run" / SUMMARY_FILE).read_text())
    assert summary["best_dev_spearman"] == pytest.approx(result.best_dev_spearman)
    assert summary["loss"]["ibn_threshold"] == 4.0
    assert summary["options"]["bf16"] is fast_bf16()  # "unset" resolved and recorded
    assert result.best_step in (2, 4, 6)
    best = AnglE.from_pretrained(str(result.model_dir), device="cpu")
    ckpt = AnglE.from_pretrained(
        str(tmp_path / "run" / f"checkpoint-{result.best_step}"), device="cpu"
    )
    np.testing.assert_allclose(best.encode(WORDS), ckpt.encode(WORDS), atol=1e-6)
    assert not np.allclose(best.encode(WORDS), before, atol=1e-4)
    assert best.config.pooling.value == "cls"


def test_fit_places_in_batch_threshold_on_the_labels(tiny_bert, sts_files, tmp_path, caplog):
    """Unset, ibn_threshold lands at 4.0 on 0-5 labels; a low one set by hand is warned about."""
    train, _ = sts_files
    common = dict(dev_data=None, max_steps=1, **FAST)
    fit(str(tiny_bert), str(train), output_dir=str(tmp_path / "unset"), **common)
    summary = json.loads((tmp_path / "unset" / SUMMARY_FILE).read_text())
    assert summary["loss"]["ibn_threshold"] == pytest.approx(4.0)
    with caplog.at_level("WARNING", logger="anglekit.training"):
        fit(
            str(tiny_bert),
            str(train),
            output_dir=str(tmp_path / "low"),
            ibn_threshold=0.5,
            **common,
        )
    assert "ibn_threshold=0.5 makes 83% of pairs in-batch positives" in caplog.text
    summary = json.loads((tmp_path / "low" / SUMMARY_FILE).read_text())
    assert summary["loss"]["ibn_threshold"] == 0.5


def test_fit_triplets_and_query_positive(tiny_bert, tmp_path):
    """Triplet and query/positive data train without labels and without a dev set."""
    triplets = [
        {"query": WORDS[i], "positive": WORDS[i + 1], "negative": WORDS[i + 2]} for i in range(8)
    ]
    pairs = [{"query": WORDS[i], "positive": [WORDS[i + 1], WORDS[i + 2]]} for i in range(8)]
    for name, rows in (("triplets", triplets), ("pairs", pairs)):
        data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        result = fit(
            str(tiny_bert),
            str(data),
            dev_data=None,
            output_dir=str(tmp_path / name),
            max_steps=2,
            **FAST,
        )
        assert result.steps == 2 and result.best_dev_spearman is None
        assert (result.model_dir / "model.safetensors").is_file()


def test_resume_continues_from_last_checkpoint(tiny_bert, sts_files, tmp_path):
    """A resumed run starts from the last checkpoint and ends like an uninterrupted one."""
    train, _ = sts_files
    common = dict(dev_data=None, save_steps=2, drop_duplicates=False, **FAST)
    full = fit(str(tiny_bert), str(train), output_dir=str(tmp_path / "full"), max_steps=4, **common)
    fit(str(tiny_bert), str(train), output_dir=str(tmp_path / "cut"), max_steps=4, **common)
    # Simulate a crash after step 2: drop the later checkpoint and the final model.
    import shutil

    shutil.rmtree(tmp_path / "cut" / "checkpoint-4")
    shutil.rmtree(tmp_path / "cut" / "model")
    resumed = fit(
        str(tiny_bert),
        str(train),
        output_dir=str(tmp_path / "cut"),
        max_steps=4,
        resume=True,
        **common,
    )
    assert resumed.steps == 4
    a = AnglE.from_pretrained(str(full.model_dir), device="cpu").encode(WORDS)
    b = AnglE.from_pretrained(str(resumed.model_dir), device="cpu").encode(WORDS)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_unknown_and_invalid_options_raise():
    """Unknown option names and impossible values are refused before any work."""
    with pytest.raises(TypeError, match="lerning_rate"):
        split_options({"lerning_rate": 1e-3})
    with pytest.raises(TypeError, match="unknown training option"):
        fit("x", "y", lerning_rate=1e-3)
    with pytest.raises(ValueError, match="batch_size"):
        TrainOptions(batch_size=0)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        TrainOptions(bf16=True, fp16=True)
    with pytest.raises(ValueError, match="cosine_w"):
        fit("x", "y", cosine_w=-1.0)


def test_bad_training_data_fails_before_training(tiny_bert, tmp_path):
    """Invalid rows stop training with the file and line, and nothing is written."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text1": "a", "text2": "b", "label": 1}\n{"text1": "a", "label": "x"}\n')
    from anglekit.data import DataError

    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        fit(str(tiny_bert), str(bad), dev_data=None, output_dir=str(tmp_path / "out"), **FAST)
    assert not (tmp_path / "out").exists()


def test_loaded_model_refuses_loading_options(tiny_bert, sts_files, tmp_path):
    """Options that only apply to loading are refused with an AnglE object, not ignored."""
    model = AnglE.from_pretrained(str(tiny_bert), device="cpu")
    train, _ = sts_files
    with pytest.raises(ValueError, match="pooling"):
        fit(model, str(train), pooling="mean", output_dir=str(tmp_path / "x"), **FAST)


def test_fp16_with_float16_trainable_weights_fails_before_training(tiny_bert, sts_files, tmp_path):
    """fp16 mixed precision cannot unscale float16 gradients: refused, naming the fix."""
    train, _ = sts_files
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="trainable parameters are float16.*lora=True"):
        fit(str(tiny_bert), str(train), dtype="float16", fp16=True, output_dir=str(out), **FAST)
    assert not out.exists()


@pytest.mark.parametrize("native", [False, True])
def test_fit_warns_of_bf16_on_a_cpu_that_emulates_it(
    tiny_bert, sts_files, tmp_path, caplog, monkeypatch, native
):
    """bf16 asked for on a CPU without native bf16 kernels is warned about, not refused."""
    monkeypatch.setattr(cpu_inference, "native_cpu_bf16", lambda: native)
    train, _ = sts_files
    with caplog.at_level("WARNING", logger="anglekit.cpu_inference"):
        fit(
            str(tiny_bert),
            str(train),
            output_dir=str(tmp_path),
            dev_data=None,
            max_steps=1,
            bf16=True,
            **FAST,
        )
    assert ("runs emulated" in caplog.text) is (not native and not torch.cuda.is_available())
    assert json.loads((tmp_path / SUMMARY_FILE).read_text())["options"]["bf16"] is True
