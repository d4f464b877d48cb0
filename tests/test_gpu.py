"""CUDA training and encoding in fp16 and bf16 on tiny in-memory models (skipped without a GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anglekit import AnglE, fit

from .conftest import WORDS, write_jsonl
from .test_llm import build_decoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _fit(model: Path, rows: list[dict], tmp_path: Path, **options):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    return fit(
        str(model),
        str(train),
        dev_data=None,
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        batch_size=4,
        learning_rate=1e-2,
        ibn_threshold=4.0,
        plots=False,
        progress=False,
        **options,
    )


@pytest.mark.parametrize(
    "precision",
    [{"fp16": True}, {"bf16": True}, {"bf16": True, "dtype": "bfloat16"}],
    ids=["fp16-amp", "bf16-amp", "bf16-weights"],
)
def test_bert_trains_on_the_gpu(tiny_bert, tmp_path, sts_rows, precision):
    """Full fine-tuning in each precision moves the embeddings, stays finite, and saves the
    weights in the dtype they were trained in."""
    before = AnglE.from_pretrained(str(tiny_bert), device="cpu").encode(WORDS)
    result = _fit(tiny_bert, sts_rows, tmp_path, **precision)
    trained = AnglE.from_pretrained(str(result.model_dir))
    weight = next(trained.backbone.parameters())
    assert weight.device.type == "cuda"
    assert weight.dtype == getattr(torch, precision.get("dtype", "float32"))
    vecs = trained.encode(WORDS)
    assert np.isfinite(vecs).all()
    assert np.abs(vecs - before).max() > 1e-3


def test_lora_trains_in_fp16_on_a_float16_decoder(tmp_path, sts_rows):
    """fp16 mixed precision on float16 weights works through LoRA: the adapter stays float32."""
    base = build_decoder(tmp_path / "base", "llama")
    before = AnglE.from_pretrained(str(base), prompt="A", device="cpu").encode(WORDS)
    result = _fit(
        base, sts_rows, tmp_path, prompt="A", lora=True, lora_r=4, dtype="float16", fp16=True
    )
    trained = AnglE.from_pretrained(str(result.model_dir))
    dtypes = {n: p.dtype for n, p in trained.backbone.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert torch.float16 in {d for n, d in dtypes.items() if "lora_" not in n}
    vecs = trained.encode(WORDS)
    assert np.isfinite(vecs).all()
    assert np.abs(vecs - before).max() > 1e-3


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_gpu_encode_agrees_with_cpu_float32(tiny_bert, dtype):
    """A model loaded in half precision encodes on the GPU by default, close to float32."""
    reference = AnglE.from_pretrained(str(tiny_bert), device="cpu").encode(WORDS, normalize=True)
    model = AnglE.from_pretrained(str(tiny_bert), dtype=dtype)
    assert next(model.backbone.parameters()).device.type == "cuda"
    vecs = model.encode(WORDS, normalize=True)
    assert vecs.dtype == np.float32
    assert (vecs * reference).sum(-1).min() > 0.99
