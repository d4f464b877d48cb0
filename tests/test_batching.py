"""Tests for anglekit.batching (padding, tokenise-once dataset, collator) and anglekit.prompts."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from anglekit.batching import AngleCollator, TokenizedDataset, pad_batch
from anglekit.data import DataFormat, Example, TrainData
from anglekit.prompts import Prompts, apply_prompt, resolve_prompt


class CountingTokenizer:
    """A fake tokenize function: one id per character, recording every text it is asked for."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> list[list[int]]:
        self.calls.append(list(texts))
        return [[ord(c) for c in text] for text in texts]


def ids(text: str) -> list[int]:
    """What CountingTokenizer gives for one text."""
    return [ord(c) for c in text]


def scored(*pairs: tuple[str, str, float]) -> TrainData:
    """Scored-pairs training data from (text1, text2, label) tuples."""
    examples = [Example((a, b), label) for a, b, label in pairs]
    return TrainData(DataFormat.SCORED_PAIRS, examples, "test")


# --- pad_batch -----------------------------------------------------------------------------------


def test_pad_batch_right():
    """Right padding puts pad ids after each row and zeros in the mask there."""
    out = pad_batch([[5, 6, 7], [8], [9, 10]], pad_id=99)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 99, 99], [9, 10, 99]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert out["input_ids"].dtype == out["attention_mask"].dtype == torch.int64


def test_pad_batch_left():
    """Left padding puts pad ids before each row, keeping the real tokens at the end."""
    out = pad_batch([[5, 6, 7], [8], [9, 10]], pad_id=0, side="left")
    assert out["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


def test_pad_batch_equal_lengths_and_empty():
    """Rows of equal length need no padding; an empty batch gives (0, 0) tensors."""
    out = pad_batch([[1, 2], [3, 4]], pad_id=0, side="left")
    assert out["input_ids"].tolist() == [[1, 2], [3, 4]]
    assert out["attention_mask"].tolist() == [[1, 1], [1, 1]]
    assert pad_batch([], pad_id=0)["input_ids"].shape == (0, 0)


# --- TokenizedDataset ----------------------------------------------------------------------------


def test_dataset_tokenizes_each_distinct_text_once():
    """Texts repeated across examples and fields (and inside lists) are tokenised exactly once."""
    data = TrainData(
        DataFormat.TRIPLETS,
        [
            Example(("q1", "shared", "n1")),
            Example(("shared", ("q1", "alt"), "n1")),
            Example(("q3", "shared", ("n1", "alt"))),
        ],
        "test",
    )
    tok = CountingTokenizer()
    ds = TokenizedDataset(data, tok)
    assert len(tok.calls) == 1
    requested = tok.calls[0]
    assert Counter(requested) == Counter({"q1": 1, "shared": 1, "n1": 1, "alt": 1, "q3": 1})
    assert ds.token_ids["shared"] == ids("shared")
    assert len(tok.calls) == 1  # fetching items never tokenises again
    for i in range(len(ds)):
        ds[i]
    assert len(tok.calls) == 1


def test_dataset_item_contents():
    """An item carries its texts, their token ids in field order, and its label."""
    ds = TokenizedDataset(scored(("hello", "hi", 4.5), ("a", "bb", 0.0)), CountingTokenizer())
    assert len(ds) == 2
    assert ds[0] == {"texts": ["hello", "hi"], "ids": [ids("hello"), ids("hi")], "label": 4.5}
    assert ds[1]["label"] == 0.0


def test_dataset_draws_among_alternatives():
    """A list field yields every alternative over many draws, reproducibly for a given seed."""
    data = TrainData(DataFormat.QUERY_POSITIVE, [Example(("q", ("p1", "p2", "p3")))], "test")
    draws = [TokenizedDataset(data, CountingTokenizer(), seed=7) for _ in range(2)]
    seq = [[ds[0]["texts"][1] for _ in range(200)] for ds in draws]
    assert seq[0] == seq[1]  # same seed, same draws
    assert set(seq[0]) == {"p1", "p2", "p3"}
    assert all(ds[0]["texts"][0] == "q" for ds in draws)  # single strings are never drawn
    item = draws[0][0]
    assert item["ids"][1] == ids(item["texts"][1])  # ids follow the drawn text
    other = TokenizedDataset(data, CountingTokenizer(), seed=8)
    assert [other[0]["texts"][1] for _ in range(200)] != seq[0]


def test_dataset_lengths():
    """lengths() is each example's longest text in tokens, using a list's first alternative."""
    data = TrainData(
        DataFormat.QUERY_POSITIVE,
        [Example(("abc", "de")), Example(("a", ("bcdef", "bcdefghijk"))), Example(("xy", "z"))],
        "test",
    )
    assert TokenizedDataset(data, CountingTokenizer()).lengths() == [3, 5, 2]


# --- AngleCollator -------------------------------------------------------------------------------


def test_collator_interleaves_texts_example_by_example():
    """Rows are [e0.t0, e0.t1, e1.t0, e1.t1, ...] so embeddings view as (N, K, D)."""
    ds = TokenizedDataset(scored(("aa", "b", 1.0), ("ccc", "dd", 2.0)), CountingTokenizer())
    batch = AngleCollator(pad_id=0, pad_to_multiple_of=1)([ds[0], ds[1]])
    assert batch["input_ids"].tolist() == [
        ids("aa") + [0],
        ids("b") + [0, 0],
        ids("ccc"),
        ids("dd") + [0],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [1.0, 2.0] and batch["labels"].dtype == torch.float32


def test_collator_left_padding():
    """padding_side='left' pads each row at its start."""
    ds = TokenizedDataset(scored(("aa", "b", 1.0)), CountingTokenizer())
    batch = AngleCollator(pad_id=-1, padding_side="left", pad_to_multiple_of=1)([ds[0]])
    assert batch["input_ids"].tolist() == [ids("aa"), [-1, *ids("b")]]
    assert batch["attention_mask"].tolist() == [[1, 1], [0, 1]]


def test_collator_drops_example_with_earlier_text():
    """With drop_duplicates an example re-using any earlier text (any field) is dropped."""
    data = scored(
        ("a", "b", 1.0), ("c", "d", 2.0), ("b", "e", 3.0), ("f", "c", 4.0), ("g", "h", 5.0)
    )
    ds = TokenizedDataset(data, CountingTokenizer())
    items = [ds[i] for i in range(5)]
    batch = AngleCollator(pad_id=0, drop_duplicates=True, pad_to_multiple_of=1)(items)
    assert batch["labels"].tolist() == [1.0, 2.0, 5.0]
    assert batch["input_ids"][:, 0].tolist() == [ord(c) for c in "abcdgh"]
    kept = AngleCollator(pad_id=0, drop_duplicates=False, pad_to_multiple_of=1)(items)
    assert kept["labels"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert kept["input_ids"].shape[0] == 10


def test_collator_labels_only_for_scored_pairs():
    """Query/positive and triplet batches carry no labels; triplets give 3 rows per example."""
    qp = TrainData(DataFormat.QUERY_POSITIVE, [Example(("q1", "p1")), Example(("q2", "p2"))], "t")
    batch = AngleCollator(pad_id=0, pad_to_multiple_of=1)(
        [item for item in TokenizedDataset(qp, CountingTokenizer())]
    )
    assert "labels" not in batch and batch["input_ids"].shape == (4, 2)
    tr = TrainData(DataFormat.TRIPLETS, [Example(("q", "p", "n")), Example(("r", "s", "t"))], "t")
    batch = AngleCollator(pad_id=0, pad_to_multiple_of=1)(
        [item for item in TokenizedDataset(tr, CountingTokenizer())]
    )
    assert "labels" not in batch
    assert batch["input_ids"][:, 0].tolist() == [ord(c) for c in "qpnrst"]


# --- prompts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["A", "B", "C"])
def test_resolve_prompt_catalogue_names(name):
    """A catalogue name resolves to its template, which holds one {text} placeholder."""
    template = resolve_prompt(name)
    assert template == getattr(Prompts, name)
    assert template.count("{text}") == 1


def test_resolve_prompt_custom_template_and_none():
    """A custom template with {text} is returned as is; None stays None."""
    assert resolve_prompt("query: {text}") == "query: {text}"
    assert resolve_prompt(None) is None


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("Summarize this sentence", "no {text} placeholder"),
        ("D", "no {text} placeholder"),  # not a catalogue name
        ("{{text}}", "no {text} placeholder"),  # escaped braces: the text would never appear
        ("{sentence}: {text}", "not a valid template"),
        ("{}: {text}", "not a valid template"),
        ("{text", "not a valid template"),
    ],
)
def test_resolve_prompt_rejects_bad_templates(template, message):
    """Templates without a usable {text}, or with other fields, raise ValueError quoting them."""
    with pytest.raises(ValueError, match=message) as info:
        resolve_prompt(template)
    assert repr(template) in str(info.value)


def test_apply_prompt():
    """apply_prompt fills each text into the template; braces in texts stay literal."""
    assert apply_prompt(Prompts.A, ["a cat", "x {y}"]) == [
        'Summarize sentence "a cat" in one word:"',
        'Summarize sentence "x {y}" in one word:"',
    ]
    texts = ["a", "b"]
    same = apply_prompt(None, texts)
    assert same == texts and same is not texts  # a copy: callers may mutate it


def test_pad_to_multiple_rounds_length_up():
    """Padding to a multiple of 8 rounds 5 tokens up to 8 and keeps the mask exact."""
    batch = pad_batch([[1, 2, 3, 4, 5], [6]], pad_id=0, multiple=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].sum(1).tolist() == [5, 1]
    assert pad_batch([[1] * 8], pad_id=0, multiple=8)["input_ids"].shape == (1, 8)
