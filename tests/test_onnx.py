"""ONNX backend: export, int8 quantisation, saved folders, CLI, atomic export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anglekit import AnglE, Prompts
from anglekit.cli import main
from anglekit.onnx_backend import ONNX_INFO_NAME, ONNX_NAME, Backend, OnnxBackbone

from .conftest import build_tiny_bert

TEXTS = ["a man plays a flute", "hi", "the quick brown fox jumps over the lazy dog", "kids play"]
FUSED_OPS = {"Attention", "QAttention", "EmbedLayerNormalization", "BiasGelu"}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _op_types(model: AnglE) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load_from_string(model.backbone.model).graph.node}


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    """A 2-layer random RoBERTa (position ids counted from the mask) with a WordPiece vocab."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-roberta"), family="roberta")


@pytest.fixture(scope="module")
def bert_onnx_dir(tiny_bert, tmp_path_factory):
    """A saved float32 ONNX export of the tiny BERT with mean pooling and a prompt."""
    out = tmp_path_factory.mktemp("onnx") / "bert-onnx"
    AnglE.from_pretrained(
        str(tiny_bert), pooling="mean", prompt=Prompts.C, normalize=True, backend="onnx"
    ).save_pretrained(out)
    return out


def test_onnx_matches_torch_encoder(tiny_bert):
    """ONNX float32 encode equals torch encode (mean pooling, any batch size)."""
    torch_model = AnglE.from_pretrained(str(tiny_bert), pooling="mean", device="cpu")
    onnx_model = AnglE.from_pretrained(str(tiny_bert), pooling="mean", backend=Backend.ONNX)
    assert isinstance(onnx_model.backbone, OnnxBackbone)
    assert str(onnx_model.device) == "cpu" and onnx_model.embedding_dim == 32
    assert onnx_model.backbone.info.fused
    assert {"Attention", "EmbedLayerNormalization", "BiasGelu"} <= _op_types(onnx_model)
    assert "SkipLayerNormalization" not in _op_types(onnx_model)
    expected = torch_model.encode(TEXTS)
    np.testing.assert_allclose(onnx_model.encode(TEXTS, batch_size=1), expected, atol=1e-5)
    np.testing.assert_allclose(onnx_model.encode(TEXTS, batch_size=3), expected, atol=1e-5)
    with pytest.raises(ValueError, match="all_layers needs the torch backend"):
        onnx_model.encode(TEXTS, all_layers=True)


def test_torch_steps_between_onnx_calls_run_on_one_thread(bert_onnx_dir, monkeypatch):
    """Padding and pooling around each onnxruntime call use one torch thread (the two thread
    pools would fight over the cores); the caller's count is back afterwards, also after an
    error."""
    import torch

    model = AnglE.from_pretrained(str(bert_onnx_dir))
    forward, seen = model.backbone.forward, []

    def counting(**kwargs):
        seen.append(torch.get_num_threads())
        return forward(**kwargs)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(model.backbone, "forward", counting)
        model.encode(TEXTS, batch_size=2)
        assert seen == [1, 1] and torch.get_num_threads() == 2

        def failing(**kwargs):
            raise RuntimeError("onnxruntime failed")

        monkeypatch.setattr(model.backbone, "forward", failing)
        with pytest.raises(RuntimeError, match="onnxruntime failed"):
            model.encode(TEXTS)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_fused_graph_matches_torch_on_either_padding_side(family, side, tiny_bert, tiny_roberta):
    """The fused attention reads the raw mask: left-padded batches agree with torch too."""
    folder = str(tiny_bert if family == "bert" else tiny_roberta)
    kwargs = {"pooling": "mean", "padding_side": side}
    torch_model = AnglE.from_pretrained(folder, device="cpu", **kwargs)
    onnx_model = AnglE.from_pretrained(folder, backend="onnx", **kwargs)
    assert onnx_model.backbone.info.fused and "Attention" in _op_types(onnx_model)
    np.testing.assert_allclose(
        onnx_model.encode(TEXTS, batch_size=3), torch_model.encode(TEXTS, batch_size=3), atol=1e-5
    )


def test_onnx_matches_torch_decoder_with_prompt(tiny_llama):
    """A decoder with last-token pooling and a mid-string template agrees too."""
    kwargs = {"pooling": "last", "prompt": Prompts.A}
    torch_model = AnglE.from_pretrained(str(tiny_llama), device="cpu", **kwargs)
    onnx_model = AnglE.from_pretrained(str(tiny_llama), backend="onnx", **kwargs)
    assert not onnx_model.backbone.info.fused and not FUSED_OPS & _op_types(onnx_model)
    np.testing.assert_allclose(
        onnx_model.encode(TEXTS, batch_size=2), torch_model.encode(TEXTS), atol=1e-5
    )


def test_int8_close_to_float(tiny_bert):
    """Dynamic int8 stays within cosine 0.99 of float32 and really quantises the graph,
    the fused attention's query/key/value product included; GELU becomes its tanh form."""
    fp32 = AnglE.from_pretrained(str(tiny_bert), pooling="mean", backend="onnx")
    int8 = AnglE.from_pretrained(str(tiny_bert), pooling="mean", backend="onnx", quantize="int8")
    assert int8.backbone.info.quantize == "int8"
    ops = _op_types(int8)
    assert "QAttention" in ops and "Attention" not in ops
    assert "FastGelu" in ops and "BiasGelu" not in ops and "BiasGelu" in _op_types(fp32)
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}
    assert len(int8.backbone.model) < len(fp32.backbone.model)
    assert _cosines(int8.encode(TEXTS), fp32.encode(TEXTS)).min() > 0.99


def test_saved_folder_loads_onnx_with_settings(tiny_bert, bert_onnx_dir):
    """The export keeps config and tokenizer; from_pretrained picks the ONNX backend."""
    assert (bert_onnx_dir / ONNX_NAME).is_file() and (bert_onnx_dir / "config.json").is_file()
    assert not list(bert_onnx_dir.glob("*.safetensors"))
    loaded = AnglE.from_pretrained(str(bert_onnx_dir))
    assert isinstance(loaded.backbone, OnnxBackbone)
    assert loaded.config.prompt == Prompts.C and loaded.config.normalize
    reference = AnglE.from_pretrained(
        str(tiny_bert), pooling="mean", prompt=Prompts.C, normalize=True, device="cpu"
    )
    np.testing.assert_allclose(loaded.encode(TEXTS), reference.encode(TEXTS), atol=1e-5)


def test_saved_float_graph_quantised_on_load(bert_onnx_dir):
    """quantize='int8' on a saved float32 export quantises it in memory."""
    model = AnglE.from_pretrained(str(bert_onnx_dir), quantize="int8")
    assert model.backbone.info.quantize == "int8"
    assert {"QAttention", "FastGelu"} <= _op_types(model)
    saved = json.loads((bert_onnx_dir / ONNX_INFO_NAME).read_text())
    assert saved["quantize"] is None and saved["fused"] is True


def test_info_without_fused_key_loads(bert_onnx_dir, tmp_path):
    """An export description written before ``fused`` existed still loads (as unfused)."""
    import shutil

    folder = tmp_path / "older"
    shutil.copytree(bert_onnx_dir, folder)
    info = json.loads((folder / ONNX_INFO_NAME).read_text())
    del info["fused"]
    (folder / ONNX_INFO_NAME).write_text(json.dumps(info))
    model = AnglE.from_pretrained(str(folder))
    assert model.backbone.info.fused is False
    assert model.encode(TEXTS).shape == (4, 32)


def test_bad_backend_arguments(tiny_bert, bert_onnx_dir):
    """Unknown backends, quantize without ONNX and ONNX with bf16 or CUDA are refused."""
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'; valid: torch, onnx"):
        AnglE.from_pretrained(str(tiny_bert), backend="tensorrt")
    with pytest.raises(ValueError, match="backend='onnx'"):
        AnglE.from_pretrained(str(tiny_bert), quantize="int8")
    with pytest.raises(ValueError, match="holds an ONNX export"):
        AnglE.from_pretrained(str(bert_onnx_dir), backend="torch")
    with pytest.raises(ValueError, match="unknown quantize 'int4'"):
        AnglE.from_pretrained(str(tiny_bert), backend="onnx", quantize="int4")
    with pytest.raises(ValueError, match="float32 on the CPU"):
        AnglE.from_pretrained(str(tiny_bert), backend="onnx", dtype="bfloat16")
    model = AnglE.from_pretrained(str(bert_onnx_dir))
    with pytest.raises(RuntimeError, match="cannot be trained"):
        model.gradient_checkpointing_enable()


def test_cli_export_int8_round_trip(tiny_bert, tmp_path, capsys):
    """anglekit export onnx --int8 writes a folder that encode loads and runs."""
    source = tmp_path / "model"
    AnglE.from_pretrained(str(tiny_bert), pooling="cls").save_pretrained(source)
    out = tmp_path / "onnx-int8"
    assert main(["-q", "export", "onnx", str(source), str(out), "--int8"]) == 0
    assert json.loads((out / ONNX_INFO_NAME).read_text())["quantize"] == "int8"
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    vecs = tmp_path / "vecs.npy"
    assert main(["-q", "encode", str(out), "--input", str(texts), "--output", str(vecs)]) == 0
    assert np.load(vecs).shape == (4, 32)
    codes = tmp_path / "codes.npy"
    args = ["-q", "encode", str(out), "--input", str(texts), "--output", str(codes)]
    assert main([*args, "--precision", "ubinary", "--max-tokens-per-batch", "64"]) == 0
    assert np.load(codes).shape == (4, 4) and np.load(codes).dtype == np.uint8
    assert main(["-q", "export", "st", str(source), str(out), "--int8"]) == 1
    assert "--int8 applies to onnx" in capsys.readouterr().err


def test_failed_export_keeps_previous_folder(bert_onnx_dir, tiny_bert, tmp_path, monkeypatch):
    """An export that fails half way leaves the earlier export untouched and no debris."""
    import shutil

    import anglekit.onnx_backend as onnx_backend

    out = tmp_path / "export"
    shutil.copytree(bert_onnx_dir, out)
    before = (out / ONNX_NAME).read_bytes()

    def broken_write(self, directory, **kwargs):
        (directory / ONNX_NAME).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(onnx_backend.OnnxBackbone, "save_pretrained", broken_write)
    assert main(["-q", "export", "onnx", str(tiny_bert), str(out)]) == 1
    assert (out / ONNX_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
