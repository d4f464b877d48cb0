"""sentence-transformers export: same embeddings, prompts, pooling and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anglekit import AnglE, Prompts
from anglekit.cli import main
from anglekit.export import export_sentence_transformers

TEXTS = ["a man plays a flute", "hi", "the quick brown fox jumps over the lazy dog", "kids"]
LONG = "word " * 60  # longer than max_length: truncation must agree


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())


def _saved(source, tmp_path, **settings) -> str:
    folder = tmp_path / "model"
    AnglE.from_pretrained(str(source), device="cpu", **settings).save_pretrained(folder)
    return str(folder)


def test_bert_mean_normalized_with_prompts(tiny_bert, tmp_path):
    """BERT, mean pooling, Normalize, default and named prefix prompts: cosine >= 0.9999."""
    from sentence_transformers import SentenceTransformer

    model_dir = _saved(
        tiny_bert,
        tmp_path,
        pooling="mean",
        normalize=True,
        max_length=24,
        prompt=Prompts.C,
        prompts={"doc": "passage: {text}"},
    )
    out = tmp_path / "st"
    export_sentence_transformers(model_dir, out)
    st = SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling", "Normalize"]
    assert st.max_seq_length == 24
    angle = AnglE.from_pretrained(model_dir, device="cpu")
    texts = [*TEXTS, LONG]
    default = st.encode(texts)
    np.testing.assert_allclose(np.linalg.norm(default, axis=1), 1.0, atol=1e-5)
    assert _min_cosine(default, angle.encode(texts)) >= 0.9999
    named = st.encode(texts, prompt_name="doc")
    assert _min_cosine(named, angle.encode(texts, prompt_name="doc")) >= 0.9999
    assert _min_cosine(named, default) < 0.9999  # the prompt really changes the vectors
    # The anglekit config travels along: anglekit loads the folder with the same settings.
    again = AnglE.from_pretrained(str(out), device="cpu")
    assert again.config.prompt == Prompts.C and again.config.normalize
    np.testing.assert_allclose(again.encode(texts), angle.encode(texts), atol=1e-5)


@pytest.mark.parametrize("pooling", ["last", "weighted_mean", "max"])
def test_llama_poolings_and_prompt(tiny_llama, tmp_path, pooling):
    """A decoder (pad token = eos) with each decoder-relevant pooling and a prefix prompt."""
    from sentence_transformers import SentenceTransformer

    model_dir = _saved(tiny_llama, tmp_path, pooling=pooling, max_length=32, prompt="q: {text}")
    out = tmp_path / "st"
    assert main(["-q", "export", "st", model_dir, str(out)]) == 0
    pooling_config = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling_config["pooling_mode"] == {
        "last": "lasttoken",
        "weighted_mean": "weightedmean",
    }.get(pooling, pooling)
    st = SentenceTransformer(str(out), device="cpu")
    angle = AnglE.from_pretrained(model_dir, device="cpu")
    texts = [*TEXTS, LONG]
    assert _min_cosine(st.encode(texts), angle.encode(texts)) >= 0.9999


def test_refusals_are_clear(tiny_llama, tiny_bert, tmp_path, capsys):
    """Suffix templates and poolings without an ST equivalent are refused, nothing written."""
    out = tmp_path / "st"
    prompt_a = _saved(tiny_llama, tmp_path / "a", pooling="last", prompt=Prompts.A)
    with pytest.raises(ValueError, match=r"prompt 'default' .* has text after \{text\}"):
        export_sentence_transformers(prompt_a, out)
    cls_avg = _saved(tiny_bert, tmp_path / "b", pooling="cls_avg")
    assert main(["-q", "export", "st", cls_avg, str(out)]) == 1
    assert "pooling 'cls_avg' has no sentence-transformers equivalent" in capsys.readouterr().err
    index = _saved(tiny_bert, tmp_path / "c", pooling=2)
    with pytest.raises(ValueError, match="token index 2"):
        export_sentence_transformers(index, out)
    assert not out.exists()


def test_onnx_folder_is_refused(tiny_bert, tmp_path):
    """An ONNX export has no torch weights to hand to sentence-transformers: a clear error."""
    onnx_dir = tmp_path / "onnx"
    AnglE.from_pretrained(str(tiny_bert), pooling="mean", backend="onnx").save_pretrained(onnx_dir)
    with pytest.raises(ValueError, match="holds an ONNX export"):
        export_sentence_transformers(str(onnx_dir), tmp_path / "st")
