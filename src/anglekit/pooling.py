"""Pooling: from token hidden states to one vector per text.

Every strategy respects the attention mask (padding never contributes) and never modifies its
inputs. ``last`` finds the last real token whatever the padding side.
"""

from __future__ import annotations

from enum import Enum

import torch

__all__ = ["Pooling", "parse_pooling", "pool"]


class Pooling(str, Enum):
    """Pooling strategies; an ``int`` pooling takes the hidden state at that token index."""

    CLS = "cls"
    CLS_AVG = "cls_avg"
    CLS_MAX = "cls_max"
    MEAN = "mean"
    MAX = "max"
    LAST = "last"
    WEIGHTED_MEAN = "weighted_mean"


ALIASES = {"avg": Pooling.MEAN}


def parse_pooling(value: str | int | Pooling) -> Pooling | int:
    """A :class:`Pooling`, an alias (``avg``) or a token index (``3``, ``-1``, ``"3"``)."""
    if isinstance(value, Pooling):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value in ALIASES:
            return ALIASES[value]
        try:
            return Pooling(value)
        except ValueError:
            pass
        try:
            return int(value)
        except ValueError:
            pass
    valid = ", ".join([p.value for p in Pooling] + list(ALIASES))
    raise ValueError(f"unknown pooling {value!r}; valid: {valid}, or a token index")


def _mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def _max(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    fill = torch.finfo(hidden.dtype).min
    return hidden.masked_fill(~mask.bool().unsqueeze(-1), fill).max(1).values


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index of the last real token of each row, for left or right padding."""
    length = mask.shape[1]
    return length - 1 - mask.flip(1).long().argmax(1)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling | int | str) -> torch.Tensor:
    """Pool ``(B, T, H)`` hidden states under a ``(B, T)`` attention mask into ``(B, H)``.

    Args:
        hidden: ``(B, T, H)`` the backbone's last hidden states.
        mask: ``(B, T)`` 1 for real tokens, 0 for padding.
        pooling: the strategy, or a token index.

    Returns:
        ``(B, H)`` one vector per row.
    """
    pooling = parse_pooling(pooling)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if isinstance(pooling, int):
        return hidden[:, pooling]
    if pooling is Pooling.CLS:
        return hidden[:, 0]
    if pooling is Pooling.MEAN:
        return _mean(hidden, mask)
    if pooling is Pooling.MAX:
        return _max(hidden, mask)
    if pooling is Pooling.CLS_AVG:
        return (hidden[:, 0] + _mean(hidden, mask)) / 2
    if pooling is Pooling.CLS_MAX:
        return (hidden[:, 0] + _max(hidden, mask)) / 2
    if pooling is Pooling.LAST:
        return hidden[rows, last_token_index(mask)]
    if pooling is Pooling.WEIGHTED_MEAN:
        # Position-weighted mean (SGPT): the k-th real token weighs k.
        m = mask.to(hidden.dtype)
        weights = (m.cumsum(1) * m).unsqueeze(-1)  # (B, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    raise ValueError(f"unknown pooling {pooling!r}")
