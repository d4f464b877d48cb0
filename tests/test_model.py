"""AnglE model: loading, encode, prompts, save/reload, atomic saves."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from anglekit import AnglE, Prompts, cpu_inference
from anglekit.config import CONFIG_NAME
from anglekit.pooling import Pooling

TEXTS = ["a man plays a flute", "hi", "the quick brown fox jumps over the lazy dog", "kids play"]


@pytest.fixture
def model(tiny_bert) -> AnglE:
    return AnglE.from_pretrained(str(tiny_bert), pooling="cls", device="cpu")


def test_encode_shapes_and_dtype(model):
    """A list gives (N, D) float32, a single string gives (D,), an empty list (0, D)."""
    vecs = model.encode(TEXTS)
    assert vecs.shape == (4, 32) and vecs.dtype == np.float32
    assert model.encode("hi").shape == (32,)
    assert model.encode([]).shape == (0, 32)
    assert isinstance(model.encode(TEXTS, to_numpy=False), torch.Tensor)


def test_encode_independent_of_batch_size_and_order(model):
    """Length-sorted batching returns rows in input order, equal for any batch size."""
    full = model.encode(TEXTS, batch_size=32)
    one = model.encode(TEXTS, batch_size=1)
    np.testing.assert_allclose(full, one, atol=1e-5)
    rev = model.encode(TEXTS[::-1], batch_size=3)
    np.testing.assert_allclose(rev[::-1], full, atol=1e-5)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(model.encode(text), full[i], atol=1e-5)


def test_encode_matches_unbatched_forward(model):
    """encode equals a plain forward pass on one unpadded text with CLS pooling."""
    ids = model.tokenizer(TEXTS[2], return_tensors="pt")
    with torch.no_grad():
        hidden = model.backbone(**ids).last_hidden_state[0, 0]
    np.testing.assert_allclose(model.encode(TEXTS[2]), hidden.numpy(), atol=1e-5)


def test_encode_normalize_and_embedding_size(model):
    """normalize gives unit rows; embedding_size keeps the leading dims, then normalises."""
    raw = model.encode(TEXTS)
    unit = model.encode(TEXTS, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    cut = model.encode(TEXTS, embedding_size=8, normalize=True)
    expected = raw[:, :8] / np.linalg.norm(raw[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, atol=1e-5)
    with pytest.raises(ValueError, match="embedding_size"):
        model.encode(TEXTS, embedding_size=33)


def test_encode_rejects_bad_arguments(model):
    """Unknown keywords, non-string texts and bad batch sizes raise clear errors."""
    with pytest.raises(TypeError):
        model.encode(TEXTS, pooling="mean")
    with pytest.raises(TypeError, match="item 1"):
        model.encode(["ok", 3])
    with pytest.raises(ValueError, match="batch_size"):
        model.encode(TEXTS, batch_size=0)


def test_prompt_is_applied(model):
    """A prompt template encodes like the formatted text without a prompt."""
    with_prompt = model.encode("the cat", prompt=Prompts.C)
    formatted = model.encode(Prompts.C.format(text="the cat"))
    np.testing.assert_allclose(with_prompt, formatted, atol=1e-5)
    assert not np.allclose(with_prompt, model.encode("the cat"), atol=1e-3)
    with pytest.raises(ValueError, match="placeholder"):
        model.encode("x", prompt="no placeholder here")


def test_named_prompts(tiny_bert):
    """prompt_name picks a saved template; an unknown name lists the known ones."""
    model = AnglE.from_pretrained(str(tiny_bert), prompts={"query": "C"}, device="cpu")
    np.testing.assert_allclose(
        model.encode("x", prompt_name="query"), model.encode("x", prompt=Prompts.C), atol=1e-6
    )
    with pytest.raises(ValueError, match="query"):
        model.encode("x", prompt_name="doc")


def test_similarity(model):
    """similarity gives a float for two texts and a matrix for lists."""
    s = model.similarity("a man plays", "a man plays")
    assert isinstance(s, float) and s == pytest.approx(1.0, abs=1e-5)
    m = model.similarity(TEXTS, TEXTS[:2])
    assert m.shape == (4, 2)
    assert m[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_save_and_reload_without_arguments(model, tmp_path):
    """A saved model reloads with its pooling, prompt, length and normalisation; same vectors."""
    model = AnglE.from_pretrained(
        str(model.backbone.name_or_path),
        pooling="weighted_mean",
        max_length=16,
        prompt=Prompts.C,
        normalize=True,
        device="cpu",
    )
    before = model.encode(TEXTS)
    model.save_pretrained(tmp_path / "saved")
    files = {p.name for p in (tmp_path / "saved").iterdir()}
    assert {"model.safetensors", CONFIG_NAME, "tokenizer.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    again = AnglE.from_pretrained(str(tmp_path / "saved"), device="cpu")
    assert again.config.pooling is Pooling.WEIGHTED_MEAN
    assert again.config.max_length == 16 and again.config.normalize
    assert again.config.prompt == Prompts.C
    np.testing.assert_allclose(again.encode(TEXTS), before, atol=1e-6)
    saved = json.loads((tmp_path / "saved" / CONFIG_NAME).read_text())
    assert saved["pooling"] == "weighted_mean" and saved["version"]


def test_interrupted_save_keeps_previous_model(model, tmp_path, monkeypatch):
    """A save that fails half-way leaves the earlier model intact and no temp folders."""
    target = tmp_path / "m"
    model.save_pretrained(target)
    before = (target / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model.tokenizer, "save_pretrained", boom)
    with torch.no_grad():
        next(model.backbone.parameters()).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_sentence_transformers_folder_lends_pooling(tiny_bert, tmp_path):
    """A sentence-transformers pooling config selects the pooling when none is given."""
    folder = tmp_path / "st"
    shutil.copytree(tiny_bert, folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False})
    )
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24}))
    model = AnglE.from_pretrained(str(folder), device="cpu")
    assert model.config.pooling is Pooling.MEAN and model.config.max_length == 24
    assert (
        AnglE.from_pretrained(str(folder), pooling="max", device="cpu").config.pooling
        is Pooling.MAX
    )


def test_trust_remote_code_off_by_default(tiny_bert, monkeypatch):
    """from_pretrained never trusts remote code unless asked."""
    import transformers

    seen = []
    original = transformers.AutoModel.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", spy)
    AnglE.from_pretrained(str(tiny_bert), device="cpu")
    AnglE.from_pretrained(str(tiny_bert), device="cpu", trust_remote_code=True)
    assert seen == [False, True]


def test_bf16_weights_close_to_fp32(tiny_bert):
    """bf16 weights give embeddings close to fp32 ones, returned as float32."""
    fp32 = AnglE.from_pretrained(str(tiny_bert), device="cpu").encode(TEXTS, normalize=True)
    bf16_model = AnglE.from_pretrained(str(tiny_bert), dtype="bfloat16", device="cpu")
    assert bf16_model.config.dtype == "bfloat16"
    bf16 = bf16_model.encode(TEXTS, normalize=True)
    assert bf16.dtype == np.float32
    assert np.min(np.sum(fp32 * bf16, axis=1)) > 0.99


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_that_emulates_it_is_warned_about(tiny_bert, monkeypatch, caplog, native):
    """Loading bf16 weights for the CPU warns where bf16 is emulated; float32 never warns."""
    monkeypatch.setattr(cpu_inference, "native_cpu_bf16", lambda: native)
    with caplog.at_level("WARNING", logger="anglekit.cpu_inference"):
        AnglE.from_pretrained(str(tiny_bert), device="cpu")
        assert "emulated" not in caplog.text
        AnglE.from_pretrained(str(tiny_bert), dtype="bfloat16", device="cpu")
    assert ("emulated" in caplog.text) is not native


def test_decoder_defaults_to_last_token_and_gets_a_pad_token(tiny_llama):
    """A causal LM loads with last-token pooling and eos as pad when it has no pad token."""
    model = AnglE.from_pretrained(str(tiny_llama), device="cpu")
    assert model.config.pooling is Pooling.LAST
    assert model.config.backbone_kind.value == "decoder"
    assert model.tokenizer.pad_token_id == model.tokenizer.eos_token_id
    np.testing.assert_allclose(
        model.encode(TEXTS, batch_size=4), model.encode(TEXTS, batch_size=1), atol=1e-5
    )


def test_unknown_dtype_and_missing_model(tiny_bert, tmp_path):
    """An unknown dtype and a missing local folder raise clear errors."""
    with pytest.raises(ValueError, match="dtype"):
        AnglE.from_pretrained(str(tiny_bert), dtype="float8")
    with pytest.raises(OSError):
        AnglE.from_pretrained(str(tmp_path / "nope"))
