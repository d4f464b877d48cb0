"""Streaming data: sharding, deterministic shuffling, validation errors, training through fit."""

from __future__ import annotations

import json
import resource
from itertools import islice

import pytest
import torch

from anglekit import fit
from anglekit.data import DataError
from anglekit.streaming import StreamingDataset

from .conftest import write_jsonl


def _tokenize(texts):
    return [[len(t), *map(ord, t[:3])] for t in texts]


@pytest.fixture
def pairs(tmp_path):
    rows = [{"text1": f"first {i}", "text2": f"second {i}", "label": i % 5} for i in range(50)]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def _take(ds, n):
    it = iter(ds)
    return [next(it)["texts"][0] for _ in range(n)]


def test_shards_are_disjoint_and_cover_the_file(pairs):
    """Shards of 2 devices x 2 workers split one pass into disjoint parts covering every row."""
    seen = []
    for index in range(4):
        ds = StreamingDataset(pairs, _tokenize, shuffle_buffer=1)
        seen.append([ex.texts[0] for ex in ds.examples((index, 4))])
    flat = [t for part in seen for t in part]
    assert sorted(flat) == sorted(f"first {i}" for i in range(50)) and len(set(flat)) == 50
    assert seen[1][:2] == ["first 1", "first 5"]


def test_shuffle_is_deterministic_per_seed_and_reshuffles_each_pass(pairs):
    """One seed gives one order; another seed another; each pass over the file is reshuffled."""
    a = _take(StreamingDataset(pairs, _tokenize, seed=1, shuffle_buffer=8), 100)
    b = _take(StreamingDataset(pairs, _tokenize, seed=1, shuffle_buffer=8), 100)
    c = _take(StreamingDataset(pairs, _tokenize, seed=2, shuffle_buffer=8), 100)
    assert a == b and a != c
    assert sorted(a[:50]) == sorted(a[50:]) and a[:50] != a[50:]
    assert a[:50] != [f"first {i}" for i in range(50)]


def test_items_match_the_collator_layout(tmp_path):
    """Items carry texts, token ids and labels; CSV labels are parsed; lists pick one text."""
    path = tmp_path / "q.csv"
    path.write_text("query,positive\nhello,world\nfoo,bar\n")
    ds = StreamingDataset(path, _tokenize, shuffle_buffer=1)
    item = next(iter(ds))
    assert item == {
        "texts": ["hello", "world"],
        "ids": _tokenize(["hello", "world"]),
        "label": None,
    }
    lists = write_jsonl(tmp_path / "l.jsonl", [{"query": "q", "positive": ["x", "y"]}] * 4)
    picked = {i["texts"][1] for i in islice(StreamingDataset(lists, _tokenize), 40)}
    assert picked == {"x", "y"}


def test_bad_row_names_file_line_and_field(tmp_path):
    """A bad row deep in the stream stops it with the file, line and field."""
    rows = [{"text1": "a", "text2": "b", "label": 1}] * 5 + [
        {"text1": "a", "text2": "", "label": 1}
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad\.jsonl:6: field 'text2' is empty"):
        _take(StreamingDataset(path, _tokenize), 10)
    other = tmp_path / "x.jsonl"
    other.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(DataError, match=r"x\.jsonl:1: cannot tell the data format"):
        StreamingDataset(other, _tokenize)
    with pytest.raises(ValueError, match="streaming reads"):
        StreamingDataset(tmp_path, _tokenize)


def test_multi_worker_loader_is_deterministic(pairs):
    """Two DataLoader workers read disjoint halves; the batch order repeats for a seed."""
    from torch.utils.data import DataLoader

    def order():
        ds = StreamingDataset(pairs, _tokenize, seed=3, shuffle_buffer=4)
        loader = DataLoader(ds, batch_size=5, num_workers=2, collate_fn=lambda b: b)
        batches = list(islice(loader, 10))  # one pass: 50 rows
        return [[i["texts"][0] for i in b] for b in batches]

    first, second = order(), order()
    assert first == second
    assert sorted(t for b in first for t in b) == sorted(f"first {i}" for i in range(50))


def test_two_devices_with_two_workers_each_split_the_file(pairs):
    """Per device (rank, world size) and per worker, each row is read by exactly one loader."""
    from torch.utils.data import DataLoader

    seen = []
    for rank, rows in ((0, 26), (1, 24)):  # one pass: shards 0-1 hold 13 rows, 2-3 hold 12
        ds = StreamingDataset(pairs, _tokenize, shuffle_buffer=1)
        ds.devices = (rank, 2)  # as the trainer records them
        loader = DataLoader(ds, batch_size=None, num_workers=2)
        seen.append([item["texts"][0] for item in islice(loader, rows)])
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"first {i}" for i in range(50))


def test_fit_streams_and_needs_max_steps(tiny_bert, pairs, tmp_path):
    """fit trains from a stream for max_steps; without max_steps it refuses. The in-batch
    threshold is placed on the labels of the first shuffle buffer (0-4: at 3.2)."""
    with pytest.raises(ValueError, match="max_steps"):
        fit(str(tiny_bert), str(pairs), streaming=True, output_dir=str(tmp_path / "x"))
    result = fit(
        str(tiny_bert),
        str(pairs),
        streaming=True,
        max_steps=3,
        batch_size=4,
        dev_data=None,
        output_dir=str(tmp_path / "run"),
        shuffle_buffer=16,
        progress=False,
        plots=False,
    )
    assert result.steps == 3
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["data"]["examples"] is None and summary["options"]["streaming"] is True
    assert summary["loss"]["ibn_threshold"] == pytest.approx(3.2)


@pytest.mark.slow
def test_million_row_file_trains_a_few_steps(tiny_bert, tmp_path):
    """A generated 1,000,000-row file trains through the stream with bounded memory."""
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        for i in range(1_000_000):
            f.write(json.dumps({"text1": f"row {i} a", "text2": f"row {i} b", "label": i % 5}))
            f.write("\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = fit(
        str(tiny_bert),
        str(path),
        streaming=True,
        max_steps=5,
        batch_size=8,
        dev_data=None,
        output_dir=str(tmp_path / "run"),
        progress=False,
        plots=False,
    )
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert result.steps == 5
    assert grown_mb < 0.5 * path.stat().st_size / 2**20  # the file was never loaded whole
    assert torch.isfinite(torch.tensor(result.train_examples_per_s))


def test_streaming_resume_continues_at_the_data_position(tiny_bert, pairs, tmp_path):
    """A streamed run resumed from a checkpoint ends like an uninterrupted one."""
    import shutil

    import numpy as np

    from anglekit import AnglE

    from .conftest import WORDS

    common = dict(
        streaming=True,
        max_steps=6,
        save_steps=3,
        batch_size=4,
        learning_rate=1e-3,
        dev_data=None,
        shuffle_buffer=8,
        bf16=False,
        progress=False,
        plots=False,
    )
    full = fit(str(tiny_bert), str(pairs), output_dir=str(tmp_path / "full"), **common)
    fit(str(tiny_bert), str(pairs), output_dir=str(tmp_path / "cut"), **common)
    shutil.rmtree(tmp_path / "cut" / "checkpoint-6")
    shutil.rmtree(tmp_path / "cut" / "model")
    resumed = fit(
        str(tiny_bert), str(pairs), output_dir=str(tmp_path / "cut"), resume=True, **common
    )
    a = AnglE.from_pretrained(str(full.model_dir), device="cpu").encode(WORDS)
    b = AnglE.from_pretrained(str(resumed.model_dir), device="cpu").encode(WORDS)
    np.testing.assert_allclose(a, b, atol=1e-4)
