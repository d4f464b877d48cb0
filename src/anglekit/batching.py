"""From validated examples to padded training batches.

Texts are tokenised once, up front, and looked up by each batch; batches are padded only to
their own longest text. A batch of ``N`` examples with ``K`` texts each becomes ``N * K`` rows
ordered example by example (``[e0.t0, e0.t1, e1.t0, e1.t1, ...]``) so the loss can view the
pooled embeddings as ``(N, K, D)``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from anglekit.data import Example, TrainData

__all__ = ["AngleCollator", "TokenizedDataset", "length_sorted_batches", "pad_batch"]


def pad_batch(
    ids: Sequence[Sequence[int]], pad_id: int, side: str = "right", multiple: int = 1
) -> dict[str, torch.Tensor]:
    """Pad token id lists to the longest one, rounded up to a multiple of ``multiple``.

    Returns:
        ``input_ids`` and ``attention_mask``, both ``(B, T)`` int64.
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    length = max((len(x) for x in ids), default=0)
    length = -(-length // multiple) * multiple
    # Filled in numpy: a row assignment there costs a microsecond, a torch one about twenty.
    input_ids = np.full((len(ids), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), length), dtype=np.int64)
    for row, x in enumerate(ids):
        cols = slice(length - len(x), length) if side == "left" else slice(0, len(x))
        input_ids[row, cols] = x
        mask[row, cols] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}


class TokenizedDataset(Dataset):
    """Training examples with every distinct text tokenised once.

    A field holding several alternative texts yields one of them, drawn at random, each time
    the example is fetched.
    """

    def __init__(
        self,
        data: TrainData,
        tokenize: Callable[[list[str]], list[list[int]]],
        seed: int = 0,
    ) -> None:
        self.format = data.format
        self.examples = data.examples
        distinct = sorted(
            {t for ex in data.examples for field in ex.texts for t in _options(field)}
        )
        self.token_ids = dict(zip(distinct, tokenize(distinct), strict=True))
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex: Example = self.examples[index]
        texts = [f if isinstance(f, str) else self.rng.choice(f) for f in ex.texts]
        return {"texts": texts, "ids": [self.token_ids[t] for t in texts], "label": ex.label}

    def lengths(self) -> list[int]:
        """Longest tokenised text of each example (the first alternative of a list)."""
        return [max(len(self.token_ids[_options(f)[0]]) for f in ex.texts) for ex in self.examples]


def _options(field: str | tuple[str, ...]) -> tuple[str, ...]:
    return (field,) if isinstance(field, str) else field


class AngleCollator:
    """Pad a list of dataset items into one model batch.

    Args:
        pad_id: the tokenizer's pad token id.
        padding_side: ``"right"`` or ``"left"``.
        drop_duplicates: drop an example when one of its texts already appears earlier in
            the batch, so no text is its own in-batch negative.
        pad_to_multiple_of: round the padded length up to a multiple of this; fewer distinct
            shapes mean fewer cached kernels and less allocator fragmentation.
    """

    def __init__(
        self,
        pad_id: int,
        padding_side: str = "right",
        drop_duplicates: bool = True,
        pad_to_multiple_of: int = 8,
    ):
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side
        self.drop_duplicates = drop_duplicates

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.drop_duplicates:
            seen: set[str] = set()
            kept = []
            for item in items:
                if not seen.intersection(item["texts"]):
                    kept.append(item)
                    seen.update(item["texts"])
            items = kept or items[:1]
        rows = [ids for item in items for ids in item["ids"]]
        batch = pad_batch(rows, self.pad_id, self.padding_side, self.pad_to_multiple_of)
        if items[0]["label"] is not None:
            batch["labels"] = torch.tensor([item["label"] for item in items], dtype=torch.float32)
        return batch


#: What one more forward pass costs besides its tokens, counted in padded tokens: token
#: budgets cut batches to minimise padded tokens plus this much per batch. On
#: all-MiniLM-L6-v2 (onnxruntime int8, 2 cores) a 1 x 8 batch took as long as 33 tokens of a
#: 2,048-token one; 32 and 64 gave the same speed on 2,000 STS-B sentences, 128 and more less.
BATCH_COST_TOKENS = 64


def length_sorted_batches(
    lengths: Sequence[int],
    batch_size: int | None = None,
    max_tokens: int | None = None,
    *,
    workers: int = 1,
) -> list[list[int]]:
    """Group row indices longest first into batches of at most ``batch_size`` rows, or of at
    most ``max_tokens`` padded tokens (rows x longest row; a longer single row goes alone).

    Exactly one of ``batch_size`` and ``max_tokens`` is given. Ties keep input order. With
    ``max_tokens`` the cuts between batches minimise the padded tokens plus
    :data:`BATCH_COST_TOKENS` per batch, rather than filling each batch in turn: filled in
    turn, the first batch of 2,000 STS-B sentences took every row of 16 to 32 tokens, 42%
    padding, and the batches 7% in all (22,856 padded tokens for 21,273); cut this way they
    hold 21,417, and onnxruntime int8 encoded them in 726 ms against 802 (median of 8
    passes). With several ``workers`` (batches run side by side, each taken by the next free
    worker) the budget is lowered evenly until the batches come in whole rounds of
    ``workers``, so that no worker waits alone for the last batch, and the batches come
    largest first.
    """
    if (batch_size is None) == (max_tokens is None):
        raise ValueError("give batch_size or max_tokens_per_batch, not both (or neither)")
    for name, value in (("batch_size", batch_size), ("max_tokens_per_batch", max_tokens)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    if batch_size is not None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches = _cut(order, lengths, max_tokens)
    if workers > 1 and len(batches) > 1:
        padded = sum(_padded(batch, lengths) for batch in batches)
        wanted = math.ceil(padded / max_tokens / workers) * workers
        budget = math.ceil(padded / wanted)
        if budget < max_tokens:
            batches = _cut(order, lengths, budget)
        batches.sort(key=lambda batch: _padded(batch, lengths), reverse=True)
    return batches


def _padded(batch: list[int], lengths: Sequence[int]) -> int:
    """Padded tokens of a batch of rows sorted longest first."""
    return len(batch) * max(lengths[batch[0]], 1)


def _cut(order: list[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Rows in ``order`` (longest first) cut into batches of at most ``max_tokens`` padded
    tokens, with the fewest padded tokens plus :data:`BATCH_COST_TOKENS` per batch.

    Dynamic programming from the last row: ``cost[i]`` is the least for rows ``i`` on, where
    a batch from row ``i`` to before row ``j`` costs ``(j - i) * size[i]`` plus the batch cost.
    A batch that starts among rows of its own first row's length can be taken full: moving
    a row of that length into it from the batch before never costs more. So only batches
    starting at a new length try every end, and the work is linear in the rows plus the
    distinct lengths times the rows a batch holds.
    """
    n = len(order)
    size = [max(lengths[i], 1) for i in order]
    cost = [0] * (n + 1)
    end = [n] * n
    for i in range(n - 1, -1, -1):
        s = size[i]
        last = min(n, i + max(max_tokens // s, 1))
        if i > 0 and size[i - 1] == s:  # inside a run of equal lengths: a full batch
            end[i] = last
            cost[i] = (last - i) * s + BATCH_COST_TOKENS + cost[last]
            continue
        totals = np.arange(1, last - i + 1) * s + np.asarray(cost[i + 1 : last + 1])
        best = int(totals.argmin())
        end[i] = i + 1 + best
        cost[i] = int(totals[best]) + BATCH_COST_TOKENS
    batches, i = [], 0
    while i < n:
        j = end[i]
        batches.append(order[i:j])
        i = j
    return batches
