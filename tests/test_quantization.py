"""Output precisions (int8/uint8/binary) and token-budget batches of encode."""

from __future__ import annotations

import math

import numpy as np
import pytest

from anglekit import AnglE
from anglekit.batching import BATCH_COST_TOKENS, length_sorted_batches
from anglekit.quantization import Precision, quantize_embeddings

TEXTS = [
    "a man plays a flute",
    "hi",
    "the quick brown fox jumps over the lazy dog",
    "kids play",
    "rain",
    "the train is late again today",
]


def _scalar_reference(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """uint8 levels by a plain loop over rows and dimensions."""
    out = np.zeros(x.shape, dtype=np.uint8)
    for d in range(x.shape[1]):
        lo, hi = ref[:, d].min(), ref[:, d].max()
        step = (hi - lo) / 255 if hi > lo else 1.0
        for n in range(x.shape[0]):
            out[n, d] = min(255, max(0, round(float((x[n, d] - lo) / step))))
    return out


def test_scalar_quantisation_matches_loop():
    """uint8 maps each dim's [min, max] onto 0..255; int8 is the same minus 128."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5)).astype(np.float32)
    x[:, 2] = 0.5  # a constant dimension maps to level 0
    uint8 = quantize_embeddings(x, "uint8")
    assert uint8.dtype == np.uint8
    np.testing.assert_array_equal(uint8, _scalar_reference(x, x))
    assert uint8.min(axis=0)[[0, 1, 3, 4]].tolist() == [0] * 4
    assert uint8.max(axis=0)[[0, 1, 3, 4]].tolist() == [255] * 4
    int8 = quantize_embeddings(x, Precision.INT8)
    assert int8.dtype == np.int8
    np.testing.assert_array_equal(int8.astype(np.int16), uint8.astype(np.int16) - 128)


def test_calibration_ranges_and_clipping():
    """Calibration ranges scale the levels; values outside them clip to 0 or 255."""
    rng = np.random.default_rng(1)
    calibration = rng.normal(size=(50, 4)).astype(np.float32)
    x = np.concatenate([calibration[:3], np.full((1, 4), 100.0), np.full((1, 4), -100.0)])
    got = quantize_embeddings(x, "uint8", calibration=calibration)
    np.testing.assert_array_equal(got, _scalar_reference(x, calibration))
    assert got[3].tolist() == [255] * 4 and got[4].tolist() == [0] * 4
    with pytest.raises(ValueError, match=r"calibration must be a non-empty \(N, 4\)"):
        quantize_embeddings(x, "int8", calibration=calibration[:, :3])
    with pytest.raises(ValueError, match="calibration only applies to int8 and uint8"):
        quantize_embeddings(x, "binary", calibration=calibration)


def test_binary_packs_sign_bits():
    """binary keeps x > 0 as bits, 8 per byte, first dim in the high bit; 10 dims -> 2 bytes."""
    x = np.array([[1, -1, 2, 0, -3, 4, 5, -6, 7, 0.1]], dtype=np.float32)
    ubinary = quantize_embeddings(x, "ubinary")
    assert ubinary.dtype == np.uint8 and ubinary.shape == (1, 2)
    assert ubinary.tolist() == [[0b10100110, 0b11000000]]
    binary = quantize_embeddings(x, "binary")
    assert binary.dtype == np.int8 and binary.tolist() == [[0b10100110 - 128, 0b11000000 - 128]]


def test_unknown_precision_lists_valid():
    """An unknown precision names the valid ones."""
    with pytest.raises(ValueError, match="unknown precision 'fp8'; valid: float32, int8"):
        quantize_embeddings(np.zeros((1, 2)), "fp8")


@pytest.fixture(scope="module")
def model(tiny_bert) -> AnglE:
    return AnglE.from_pretrained(str(tiny_bert), pooling="mean", device="cpu")


def test_encode_precisions(model):
    """encode applies the precision after truncation and normalisation, for lists and one text."""
    full = model.encode(TEXTS, normalize=True, embedding_size=16)
    for name in ("int8", "uint8", "binary", "ubinary"):
        got = model.encode(TEXTS, normalize=True, embedding_size=16, precision=name)
        np.testing.assert_array_equal(got, quantize_embeddings(full, name))
    calibration = model.encode(TEXTS[:3], normalize=True, embedding_size=16)
    got = model.encode(
        TEXTS, normalize=True, embedding_size=16, precision="uint8", calibration=calibration
    )
    np.testing.assert_array_equal(got, quantize_embeddings(full, "uint8", calibration))
    assert model.encode("hi", precision="binary").shape == (4,)
    assert model.encode(TEXTS, precision="int8", to_numpy=False).dtype.is_signed
    with pytest.raises(ValueError, match="unknown precision"):
        model.encode(TEXTS, precision="float16")


def test_length_sorted_batches_budget():
    """Batches go longest first and hold at most max_tokens padded tokens (or one row)."""
    lengths = [5, 1, 9, 3, 3, 20, 2]
    assert length_sorted_batches(lengths, batch_size=3) == [[5, 2, 0], [3, 4, 6], [1]]
    batches = length_sorted_batches(lengths, max_tokens=10)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert batches[0] == [5]  # 20 tokens: over the budget, alone
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert lengths[batch[0]] == longest
        assert len(batch) == 1 or len(batch) * longest <= 10
    assert batches == [[5], [2], [0, 3], [4, 6, 1]]
    with pytest.raises(ValueError, match="not both"):
        length_sorted_batches(lengths, batch_size=2, max_tokens=10)
    with pytest.raises(ValueError, match="max_tokens_per_batch must be a positive integer"):
        length_sorted_batches(lengths, max_tokens=0)


def _least_cost(lengths: list[int], budget: int) -> int:
    """Padded tokens plus the batch cost of the best cut, trying every batch (quadratic)."""
    sizes = sorted((max(n, 1) for n in lengths), reverse=True)
    best = [0] + [math.inf] * len(sizes)
    for j in range(1, len(sizes) + 1):
        for i in range(j):
            if j - i == 1 or (j - i) * sizes[i] <= budget:
                best[j] = min(best[j], best[i] + (j - i) * sizes[i] + BATCH_COST_TOKENS)
    return best[-1]


def padded_tokens(batches: list[list[int]], lengths: list[int]) -> list[int]:
    return [len(b) * max(lengths[b[0]], 1) for b in batches]


def test_token_budget_cuts_cost_the_least():
    """The cuts cost what the best of all cuts into contiguous batches costs (padded tokens
    plus BATCH_COST_TOKENS each), within the budget and with every row once."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        lengths = [int(n) for n in rng.integers(0, 40, size=rng.integers(1, 40))]
        budget = int(rng.integers(1, 400))
        batches = length_sorted_batches(lengths, max_tokens=budget)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        padded = padded_tokens(batches, lengths)
        assert all(len(b) == 1 or p <= budget for b, p in zip(batches, padded, strict=True))
        assert sum(padded) + BATCH_COST_TOKENS * len(batches) == _least_cost(lengths, budget)


def test_token_budget_batches_share_evenly_between_workers():
    """With several workers the batches come largest first, each within the budget, and
    taken by the next free worker they keep every worker equally busy (within 5%); one
    worker keeps the budget as given."""
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(5, 33, size=2000)]
    plain = length_sorted_batches(lengths, max_tokens=2048)
    assert plain == length_sorted_batches(lengths, max_tokens=2048, workers=1)
    for workers in (2, 3, 4):
        batches = length_sorted_batches(lengths, max_tokens=2048, workers=workers)
        assert sorted(i for b in batches for i in b) == list(range(2000))
        padded = padded_tokens(batches, lengths)
        assert max(padded) <= 2048 and padded == sorted(padded, reverse=True)
        busy = [0] * workers
        for p in padded:  # the next free worker takes the next batch
            busy[busy.index(min(busy))] += p
        assert max(busy) <= 1.05 * sum(padded) / workers


def test_token_budget_encode_matches_fixed_batches(model):
    """Token-budget batches give the same embeddings as fixed batches."""
    expected = model.encode(TEXTS, batch_size=2)
    for budget in (1, 30, 10_000):
        got = model.encode(TEXTS, max_tokens_per_batch=budget)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        model.encode(TEXTS, batch_size=4, max_tokens_per_batch=64)
