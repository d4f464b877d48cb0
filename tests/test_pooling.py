"""Tests for anglekit.pooling on hidden states equal to the token position (outputs by hand)."""

from __future__ import annotations

import pytest
import torch

from anglekit.pooling import Pooling, last_token_index, parse_pooling, pool

LENGTHS = [4, 2, 1]  # real tokens per row; T = 4


def position_hidden(offset_per_row: float = 10.0) -> torch.Tensor:
    """(3, 4, 2): hidden[b, t, 0] = t + 10 b and channel 1 = channel 0 + 100."""
    t = torch.arange(4, dtype=torch.float32)[None, :]  # (1, T)
    b = torch.arange(3, dtype=torch.float32)[:, None]  # (B, 1)
    base = t + offset_per_row * b  # (B, T)
    return torch.stack([base, base + 100], dim=-1)  # (B, T, 2)


def mask(side: str) -> torch.Tensor:
    """(3, 4) attention mask for LENGTHS with right or left padding."""
    rows = []
    for n in LENGTHS:
        real, pad = [1] * n, [0] * (4 - n)
        rows.append(real + pad if side == "right" else pad + real)
    return torch.tensor(rows)


def expect(channel0: list[float]) -> torch.Tensor:
    """(3, 2) expected output from the hand-computed channel-0 values."""
    c0 = torch.tensor(channel0)
    return torch.stack([c0, c0 + 100], dim=-1)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal shape and dtype, and values equal up to float32 rounding."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.allclose(actual, expected, rtol=1e-6, atol=1e-6), (actual, expected)


# Hand-computed from hidden = t + 10 b with LENGTHS [4, 2, 1]:
#   row 0 holds 0,1,2,3; right padding: row 1 holds 10,11, row 2 holds 20;
#   left padding: row 1 holds 12,13 (positions 2,3), row 2 holds 23 (position 3).
#   weighted_mean weighs the k-th real token by k: row 0 (0*1+1*2+2*3+3*4)/10 = 2.
RIGHT = {
    Pooling.CLS: [0.0, 10.0, 20.0],
    Pooling.MEAN: [1.5, 10.5, 20.0],
    Pooling.MAX: [3.0, 11.0, 20.0],
    Pooling.CLS_AVG: [0.75, 10.25, 20.0],
    Pooling.CLS_MAX: [1.5, 10.5, 20.0],
    Pooling.LAST: [3.0, 11.0, 20.0],
    Pooling.WEIGHTED_MEAN: [2.0, (10 * 1 + 11 * 2) / 3, 20.0],
}
LEFT = {
    Pooling.MEAN: [1.5, 12.5, 23.0],
    Pooling.MAX: [3.0, 13.0, 23.0],
    Pooling.LAST: [3.0, 13.0, 23.0],
    Pooling.WEIGHTED_MEAN: [2.0, (12 * 1 + 13 * 2) / 3, 23.0],
}


def test_every_strategy_has_a_right_padding_case():
    """The table above covers every Pooling member, so a new strategy needs a new expectation."""
    assert set(RIGHT) == set(Pooling)


@pytest.mark.parametrize("strategy", list(RIGHT))
def test_pool_right_padding(strategy):
    """Each strategy on right-padded rows gives the hand-computed values; padding is ignored."""
    out = pool(position_hidden(), mask("right"), strategy)
    assert_same(out, expect(RIGHT[strategy]))


@pytest.mark.parametrize("strategy", list(LEFT))
def test_pool_left_padding(strategy):
    """Mask-aware strategies on left-padded rows use only the trailing real tokens."""
    out = pool(position_hidden(), mask("left"), strategy)
    assert_same(out, expect(LEFT[strategy]))


def test_last_token_index_both_sides():
    """last_token_index finds the last real token with right and with left padding."""
    assert last_token_index(mask("right")).tolist() == [3, 1, 0]
    assert last_token_index(mask("left")).tolist() == [3, 3, 3]


def test_bool_mask_same_as_int_mask():
    """A boolean attention mask pools exactly like the 0/1 integer one."""
    for strategy in Pooling:
        for side in ("right", "left"):
            a = pool(position_hidden(), mask(side), strategy)
            b = pool(position_hidden(), mask(side).bool(), strategy)
            assert torch.equal(a, b), (strategy, side)


@pytest.mark.parametrize(
    ("index", "expected"), [(0, [0, 10, 20]), (1, [1, 11, 21]), (-1, [3, 13, 23])]
)
def test_pool_token_index(index, expected):
    """An int pooling takes the hidden state at that position (negative counts from the end)."""
    out = pool(position_hidden(), mask("right"), index)
    assert_same(out, expect([float(x) for x in expected]))


@pytest.mark.parametrize("side", ["right", "left"])
def test_max_pooling_negative_values_padding_never_wins(side):
    """With every real value negative, zero-valued or larger padding never becomes the max."""
    hidden = position_hidden() - 1000.0  # all real values far below 0
    m = mask(side)
    hidden = hidden.masked_fill(~m.bool().unsqueeze(-1), 0.0)  # padding 0 > any real value
    out = pool(hidden, m, Pooling.MAX)
    base = RIGHT[Pooling.MAX] if side == "right" else LEFT[Pooling.MAX]
    assert_same(out, expect(base) - 1000.0)
    out = pool(hidden, m, Pooling.CLS_MAX)
    if side == "right":
        cls_max = [(x - 1000.0) for x in RIGHT[Pooling.CLS_MAX]]
        assert_same(out, expect(cls_max))


def test_mean_ignores_padding_values():
    """Huge values in padding positions change no mask-aware pooling."""
    m = mask("right")
    noisy = position_hidden().masked_fill(~m.bool().unsqueeze(-1), 1e6)
    for strategy in (Pooling.MEAN, Pooling.MAX, Pooling.LAST, Pooling.WEIGHTED_MEAN):
        assert_same(pool(noisy, m, strategy), pool(position_hidden(), m, strategy))


def test_pool_does_not_mutate_inputs():
    """No strategy modifies the hidden states or the mask in place."""
    hidden, m = position_hidden(), mask("left")
    hidden_before, mask_before = hidden.clone(), m.clone()
    for strategy in [*Pooling, 0, -1]:
        pool(hidden, m, strategy)
    assert torch.equal(hidden, hidden_before)
    assert torch.equal(m, mask_before)


def test_pool_bf16_keeps_dtype():
    """bf16 hidden states pool to bf16 with the same (exactly representable) values."""
    out = pool(position_hidden().bfloat16(), mask("right"), Pooling.MEAN)
    assert out.dtype == torch.bfloat16
    assert_same(out.float(), expect(RIGHT[Pooling.MEAN]))


# --- parse_pooling -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("cls", Pooling.CLS),
        ("weighted_mean", Pooling.WEIGHTED_MEAN),
        ("avg", Pooling.MEAN),
        (Pooling.LAST, Pooling.LAST),
        ("3", 3),
        ("-1", -1),
        (2, 2),
    ],
)
def test_parse_pooling_accepts(value, expected):
    """Names, the avg alias, Pooling members and token indices (int or string) parse."""
    result = parse_pooling(value)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize("value", ["junk", "MEAN ", "", True, 1.5, None])
def test_parse_pooling_rejects_with_valid_list(value):
    """Junk raises ValueError naming the value and listing every valid choice."""
    with pytest.raises(ValueError) as info:
        parse_pooling(value)
    message = str(info.value)
    assert repr(value) in message
    for choice in [*(p.value for p in Pooling), "avg", "token index"]:
        assert choice in message
