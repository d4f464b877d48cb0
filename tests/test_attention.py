"""Attention kernel choice on CPU: the training steps' kernel and encode's short path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers.integrations.sdpa_attention as sdpa_module
from torch import nn

from anglekit import AnglE
from anglekit.attention import (
    MATH_ATTENTION_MAX_TOKENS,
    SHORT_ATTENTION,
    SHORT_ATTENTION_MAX_TOKENS,
    attention_kernels,
    short_attention,
    use_short_attention,
)

TEXTS = ["a cat sat", "dogs run fast", "hi", "the quick brown fox!"]  # 4..22 tokens


@pytest.fixture
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls that go through transformers' SDPA attention."""
    calls: list[int] = []
    original = sdpa_module.sdpa_attention_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", counted)
    return calls


def test_attention_kernels_pick_math_only_for_short_bf16_cpu_batches() -> None:
    """Short bf16 CPU batches disable the fused kernels; anything else leaves torch's choice."""
    assert torch.backends.cuda.flash_sdp_enabled()
    with attention_kernels(torch.device("cpu"), True, MATH_ATTENTION_MAX_TOKENS):
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()
    for device, bf16, length in [
        ("cpu", False, 32),
        ("cpu", True, MATH_ATTENTION_MAX_TOKENS + 1),
        ("cuda", True, 32),
    ]:
        with attention_kernels(torch.device(device), bf16, length):
            assert torch.backends.cuda.flash_sdp_enabled()


def _layer() -> nn.Module:
    """An attention layer in eval mode (all the attention function reads of it)."""
    return nn.Module().eval()


def _qkv(batch: int, length: int, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, 3, length, 8, dtype=dtype) for _ in range(3))  # (B, H, T, d)
    mask = torch.ones(batch, 1, length, length, dtype=torch.bool)
    mask[0, ..., length - 3 :] = False  # padding at the end of the first row
    return q, k, v, mask


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_short_attention_matches_sdpa(
    dtype: torch.dtype, tol: float, sdpa_calls: list[int]
) -> None:
    """The short path equals torch's SDPA (float32 reference) with a padding mask and a
    custom scale, and returns (B, T, H, d)."""
    q, k, v, mask = _qkv(4, 7, dtype)
    with torch.inference_mode():
        out, weights = short_attention(_layer(), q, k, v, mask, scaling=0.3)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.3)
    assert weights is None and out.dtype == dtype and sdpa_calls == []
    torch.testing.assert_close(out.float(), ref.transpose(1, 2), atol=tol, rtol=tol)


def test_short_attention_fully_masked_row_is_finite(sdpa_calls: list[int]) -> None:
    """A query that may attend nowhere averages the values instead of giving NaN."""
    q, k, v, mask = _qkv(2, 5)
    mask[1] = False
    with torch.inference_mode():
        out, _ = short_attention(_layer(), q, k, v, mask)
    assert torch.isfinite(out).all() and sdpa_calls == []
    torch.testing.assert_close(out[1], v[1].mean(dim=-2).unsqueeze(0).expand(5, 3, 8))


def test_short_attention_hands_everything_else_to_sdpa(sdpa_calls: list[int]) -> None:
    """Only CPU inference in eval mode on short keys without dropout takes the short path."""
    q, k, v, mask = _qkv(2, 6)
    with torch.inference_mode():
        short_attention(_layer(), q, k, v, mask)
    assert sdpa_calls == []
    long_q, long_k, long_v, long_mask = _qkv(1, SHORT_ATTENTION_MAX_TOKENS + 1)
    causal = _layer()
    causal.is_causal = True
    training = _layer().train()
    cases = [
        lambda: short_attention(_layer(), q, k, v, mask),  # gradients enabled
        lambda: short_attention(_layer(), q, k, v, mask, dropout=0.1),
        lambda: short_attention(training, q, k, v, mask),  # training mode, dropout 0
        lambda: short_attention(_layer(), long_q, long_k, long_v, long_mask),
        lambda: short_attention(_layer(), q, k[:, :1], v[:, :1], mask),  # grouped heads
        lambda: short_attention(causal, q, k, v, None),  # causal without a mask
        lambda: short_attention(_layer(), q, k, v, mask.float()),  # additive mask
    ]
    for i, case in enumerate(cases):
        with torch.inference_mode(i > 0):
            case()
        assert len(sdpa_calls) == i + 1


def test_from_pretrained_uses_short_attention_and_encodes_as_sdpa(
    tiny_bert, tmp_path, sdpa_calls: list[int]
) -> None:
    """A loaded BERT encodes through the short path, with the same embeddings as SDPA
    (padded batches included), and saves a config without the implementation name."""
    model = AnglE.from_pretrained(str(tiny_bert), pooling="mean")
    assert model.backbone.config._attn_implementation == SHORT_ATTENTION
    short = model.encode(TEXTS, batch_size=4)
    assert sdpa_calls == []
    model.backbone.set_attn_implementation("sdpa")
    sdpa = model.encode(TEXTS, batch_size=4)
    np.testing.assert_allclose(short, sdpa, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "saved")
    assert SHORT_ATTENTION not in (tmp_path / "saved" / "config.json").read_text()
    reloaded = AnglE.from_pretrained(str(tmp_path / "saved"))
    assert reloaded.backbone.config._attn_implementation == SHORT_ATTENTION


def test_bf16_encode_agrees_with_sdpa(tiny_bert) -> None:
    """In bf16 the short path's embeddings agree with SDPA's to a cosine of 0.999."""
    model = AnglE.from_pretrained(str(tiny_bert), pooling="mean", dtype="bfloat16")
    short = model.encode(TEXTS, batch_size=4, normalize=True)
    model.backbone.set_attn_implementation("sdpa")
    sdpa = model.encode(TEXTS, batch_size=4, normalize=True)
    assert (short * sdpa).sum(axis=1).min() > 0.999


def test_training_mode_goes_through_sdpa(tiny_bert, sdpa_calls: list[int]) -> None:
    """Training forwards (gradients, dropout) use SDPA, so training is unchanged."""
    model = AnglE.from_pretrained(str(tiny_bert), pooling="mean").train()
    batch = model.pad(model.tokenize(TEXTS[:2]))
    model(**batch).sum().backward()
    assert len(sdpa_calls) == 2


def test_use_short_attention_leaves_other_implementations(tiny_bert) -> None:
    """A model on eager attention keeps it."""
    from transformers import AutoModel

    eager = AutoModel.from_pretrained(tiny_bert, attn_implementation="eager")
    assert not use_short_attention(eager)
    assert eager.config._attn_implementation == "eager"
    assert json.loads((tiny_bert / "config.json").read_text()).get("_attn_implementation") is None
