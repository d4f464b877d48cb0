"""Faster CPU encode: short-sequence attention, packed bf16 weights, batches side by side."""

from __future__ import annotations

import copy
import io
import json
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers.integrations.sdpa_attention as sdpa_module
from torch import nn

from anglekit import AnglE, cpu_inference
from anglekit.cpu_inference import (
    SHORT_ATTENTION,
    SHORT_ATTENTION_MAX_TOKENS,
    map_batches,
    packed_linears,
    short_attention,
    use_short_attention,
)

from .conftest import build_tiny_bert

TEXTS = ["a cat sat", "dogs run fast", "hi", "the quick brown fox!"]  # 4..22 tokens


@pytest.fixture
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls that go through transformers' SDPA attention."""
    calls: list[int] = []
    original = sdpa_module.sdpa_attention_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", counted)
    return calls


def _layer() -> nn.Module:
    """An attention layer in eval mode (all the attention function reads of it)."""
    return nn.Module().eval()


def _qkv(batch: int, length: int, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, 3, length, 8, dtype=dtype) for _ in range(3))  # (B, H, T, d)
    mask = torch.ones(batch, 1, length, length, dtype=torch.bool)
    mask[0, ..., length - 3 :] = False  # padding at the end of the first row
    return q, k, v, mask


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_short_attention_matches_sdpa(
    dtype: torch.dtype, tol: float, sdpa_calls: list[int]
) -> None:
    """The short path equals torch's SDPA (float32 reference) with a padding mask and a
    custom scale, and returns (B, T, H, d)."""
    q, k, v, mask = _qkv(4, 7, dtype)
    with torch.inference_mode():
        out, weights = short_attention(_layer(), q, k, v, mask, scaling=0.3)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.3)
    assert weights is None and out.dtype == dtype and sdpa_calls == []
    torch.testing.assert_close(out.float(), ref.transpose(1, 2), atol=tol, rtol=tol)


def test_short_attention_fully_masked_row_is_finite(sdpa_calls: list[int]) -> None:
    """A query that may attend nowhere averages the values instead of giving NaN."""
    q, k, v, mask = _qkv(2, 5)
    mask[1] = False
    with torch.inference_mode():
        out, _ = short_attention(_layer(), q, k, v, mask)
    assert torch.isfinite(out).all() and sdpa_calls == []
    torch.testing.assert_close(out[1], v[1].mean(dim=-2).unsqueeze(0).expand(5, 3, 8))


def test_short_attention_hands_everything_else_to_sdpa(sdpa_calls: list[int]) -> None:
    """Only CPU inference in eval mode on short keys without dropout takes the short path."""
    q, k, v, mask = _qkv(2, 6)
    with torch.inference_mode():
        short_attention(_layer(), q, k, v, mask)
    assert sdpa_calls == []
    long_q, long_k, long_v, long_mask = _qkv(1, SHORT_ATTENTION_MAX_TOKENS + 1)
    causal = _layer()
    causal.is_causal = True
    training = _layer().train()
    cases = [
        lambda: short_attention(_layer(), q, k, v, mask),  # gradients enabled
        lambda: short_attention(_layer(), q, k, v, mask, dropout=0.1),
        lambda: short_attention(training, q, k, v, mask),  # training mode, dropout 0
        lambda: short_attention(_layer(), long_q, long_k, long_v, long_mask),
        lambda: short_attention(_layer(), q, k[:, :1], v[:, :1], mask),  # grouped heads
        lambda: short_attention(causal, q, k, v, None),  # causal without a mask
        lambda: short_attention(_layer(), q, k, v, mask.float()),  # additive mask
    ]
    for i, case in enumerate(cases):
        with torch.inference_mode(i > 0):
            case()
        assert len(sdpa_calls) == i + 1


def test_from_pretrained_uses_short_attention_and_encodes_as_sdpa(
    tiny_bert, tmp_path, sdpa_calls: list[int]
) -> None:
    """A loaded BERT encodes through the short path, with the same embeddings as SDPA
    (padded batches included), and saves a config without the implementation name."""
    model = AnglE.from_pretrained(str(tiny_bert), pooling="mean", device="cpu")
    assert model.backbone.config._attn_implementation == SHORT_ATTENTION
    short = model.encode(TEXTS, batch_size=4)
    assert sdpa_calls == []
    model.backbone.set_attn_implementation("sdpa")
    sdpa = model.encode(TEXTS, batch_size=4)
    np.testing.assert_allclose(short, sdpa, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "saved")
    assert SHORT_ATTENTION not in (tmp_path / "saved" / "config.json").read_text()
    reloaded = AnglE.from_pretrained(str(tmp_path / "saved"))
    assert reloaded.backbone.config._attn_implementation == SHORT_ATTENTION


def test_bf16_encode_agrees_with_sdpa(tiny_bert) -> None:
    """In bf16 the short path's embeddings agree with SDPA's to a cosine of 0.999."""
    model = AnglE.from_pretrained(str(tiny_bert), pooling="mean", dtype="bfloat16")
    short = model.encode(TEXTS, batch_size=4, normalize=True)
    model.backbone.set_attn_implementation("sdpa")
    sdpa = model.encode(TEXTS, batch_size=4, normalize=True)
    assert (short * sdpa).sum(axis=1).min() > 0.999


def test_training_mode_goes_through_sdpa(tiny_bert, sdpa_calls: list[int]) -> None:
    """Training forwards (gradients, dropout) use SDPA, so training is unchanged."""
    model = AnglE.from_pretrained(str(tiny_bert), pooling="mean").train()
    batch = model.pad(model.tokenize(TEXTS[:2]))
    model(**batch).sum().backward()
    assert len(sdpa_calls) == 2


def test_use_short_attention_leaves_other_implementations(tiny_bert) -> None:
    """A model on eager attention keeps it."""
    from transformers import AutoModel

    eager = AutoModel.from_pretrained(tiny_bert, attn_implementation="eager")
    assert not use_short_attention(eager)
    assert eager.config._attn_implementation == "eager"
    assert json.loads((tiny_bert / "config.json").read_text()).get("_attn_implementation") is None


needs_packing = pytest.mark.skipif(
    not cpu_inference._packing_available(),
    reason="oneDNN's packed bf16 linears need AVX-512 or AVX-NE-CONVERT",
)


def _bf16_bert(tiny_bert) -> nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(tiny_bert, dtype=torch.bfloat16).eval()


def test_packing_is_off_where_onednn_cannot_reorder_bf16_weights() -> None:
    """On a CPU whose oneDNN build refuses bf16 weight reorders (AVX2 only), packing is off."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=torch.bfloat16))
    except (RuntimeError, AttributeError):
        assert not cpu_inference._packing_available()


@needs_packing
def test_packed_linears_match_plain_layers_and_restore_them(tiny_bert) -> None:
    """Every bf16 linear layer runs packed inside the block (the BERT feed-forward input with
    its GELU fused), outputs match the plain model to bf16 rounding, and afterwards the
    layers are plain again."""
    model = _bf16_bert(tiny_bert)
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    ids = torch.tensor([[2, 10, 11, 12, 3, 0], [2, 13, 14, 3, 0, 0]])
    mask = (ids != 0).long()
    with torch.inference_mode():
        plain = model(input_ids=ids, attention_mask=mask).last_hidden_state
        with packed_linears(model) as switched:
            assert switched == len(linears) > 0
            assert all("forward" in vars(m) for m in linears)
            assert all("forward" in vars(layer.intermediate) for layer in model.encoder.layer)
            packed = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not any("forward" in vars(m) for m in model.modules())
    torch.testing.assert_close(packed.float(), plain.float(), atol=0.05, rtol=0.02)
    assert not torch.equal(packed, plain)


def _ids(lengths: list[int], longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of rows of the given lengths (CLS ... SEP), padded to ``longest``."""
    torch.manual_seed(1)
    ids = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(5, 60, (length,))
        ids[row, 0], ids[row, length - 1] = 2, 3
    return ids, (ids != 0).long()


def _fused_blocks(model: nn.Module) -> list[nn.Module]:
    return [
        block
        for layer in model.encoder.layer
        for block in (layer.attention.self, layer.attention.output, layer.output)
    ]


def _attention_inputs(longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 hidden states ``(3, T, 32)`` of unit scale and SDPA's boolean mask, with the
    second and third rows padded."""
    torch.manual_seed(2)
    hidden = torch.randn(3, longest, 32).to(torch.bfloat16)
    lengths = torch.tensor([longest, longest - 2, 3])
    keys = torch.arange(longest)[None, :] < lengths[:, None]  # (B, S)
    return hidden, keys[:, None, None, :].expand(3, 1, longest, longest)


@needs_packing
@pytest.mark.parametrize("longest", [6, SHORT_ATTENTION_MAX_TOKENS + 4])
def test_fused_attention_and_residual_blocks_match_plain_bert(
    tiny_bert, longest: int, sdpa_calls: list[int]
) -> None:
    """On short attention, a BERT layer's self-attention runs one fused query/key/value
    product and its two sublayer outputs add the residual inside the product: each block's
    output and the model's match the plain ones to bf16 rounding, sequences past the short
    path still go through SDPA, and afterwards every block is plain again."""
    model = _bf16_bert(tiny_bert)
    assert use_short_attention(model)
    layer = model.encoder.layer[0]
    hidden, mask = _attention_inputs(longest)
    ids, ids_mask = _ids([longest, longest - 2, 3], longest)

    def run() -> list[torch.Tensor]:
        attended = layer.attention.self(hidden, mask)[0]
        return [
            attended,
            layer.attention.output(attended, hidden),
            layer.output(layer.intermediate(hidden), hidden),
            model(input_ids=ids, attention_mask=ids_mask).last_hidden_state,
        ]

    with torch.inference_mode():
        plain = run()
        calls = len(sdpa_calls)
        with packed_linears(model):
            assert all("forward" in vars(block) for block in _fused_blocks(model))
            fused = run()
    long_rows = longest > SHORT_ATTENTION_MAX_TOKENS
    assert len(sdpa_calls) - calls == (1 + len(model.encoder.layer) if long_rows else 0)
    assert not any("forward" in vars(m) for m in model.modules())
    real = ids_mask.bool()
    plain[-1], fused[-1] = plain[-1][real], fused[-1][real]
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=4e-3, rtol=2e-2)


@needs_packing
def test_fused_blocks_are_plain_with_gradients_or_in_training(tiny_bert) -> None:
    """With gradients the fused blocks run their own forward, bit for bit, and without
    gradients in training mode they still apply dropout; the fused query/key/value weight
    follows a change to one of the three layers."""
    model = _bf16_bert(tiny_bert)
    use_short_attention(model)
    attention = model.encoder.layer[0].attention.self
    hidden, mask = _attention_inputs(6)

    def forward() -> torch.Tensor:
        torch.manual_seed(0)
        return model(inputs_embeds=hidden, attention_mask=mask[:, 0, 0].long()).last_hidden_state

    model.train()
    plain = forward()
    with torch.no_grad():
        plain_no_grad = forward()
    with packed_linears(model):
        torch.testing.assert_close(forward(), plain, atol=0, rtol=0)
        with torch.no_grad():  # the fused GELU still runs: bf16 rounding apart
            torch.testing.assert_close(forward(), plain_no_grad, atol=0.02, rtol=0.02)
        model.eval()
        with torch.inference_mode():
            before = attention(hidden, mask)[0]
            with torch.no_grad():
                attention.value.weight.mul_(2)
            fused = attention(hidden, mask)[0]
    with torch.inference_mode():
        changed = attention(hidden, mask)[0]
    torch.testing.assert_close(fused.float(), changed.float(), atol=4e-3, rtol=2e-2)
    assert not torch.allclose(fused.float(), before.float(), atol=1e-2)


@needs_packing
@pytest.mark.parametrize("family", ["roberta", "electra", "xlm-roberta"])
def test_fused_blocks_cover_bert_family_encoders(
    family: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encoders built like BERT get the same fused blocks (two residual outputs and one
    self-attention per layer) and encode as they do without them."""
    model = AnglE.from_pretrained(str(build_tiny_bert(tmp_path, family=family)), dtype="bfloat16")
    layers = cpu_inference._packable_layers(model.backbone)
    assert len(cpu_inference._residual_norm_blocks(model.backbone, layers)) == 4
    assert len(cpu_inference._fused_qkv_blocks(model.backbone, layers)) == 2
    fused = model.encode(TEXTS, normalize=True)
    for name in ("_residual_norm_blocks", "_fused_qkv_blocks"):
        monkeypatch.setattr(cpu_inference, name, lambda module, layers: [])
    assert (fused * model.encode(TEXTS, normalize=True)).sum(axis=1).min() > 0.9999


def test_blocks_of_other_shapes_keep_their_forward() -> None:
    """A block with the sublayer output's children but another forward signature, and a
    self-attention on plain SDPA, are not fused."""

    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(8, 8).to(torch.bfloat16)
            self.dropout = nn.Dropout(0.0)
            self.LayerNorm = nn.LayerNorm(8).to(torch.bfloat16)

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return self.LayerNorm(self.dense(hidden_states))

    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertSelfAttention

    config = BertConfig(hidden_size=8, num_attention_heads=2, attn_implementation="sdpa")
    attention = BertSelfAttention(config).to(torch.bfloat16)
    model = nn.ModuleList([Other(), attention])
    with packed_linears(model) as switched:
        assert switched == 4 * cpu_inference._packing_available()
        assert "forward" not in vars(model[0]) and "forward" not in vars(attention)


def test_packed_linear_is_exact_and_follows_weight_changes() -> None:
    """A packed layer gives F.linear's bf16 result bit for bit, also after its weight
    changes in place; with gradients it is plain F.linear."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 24).to(torch.bfloat16)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    with packed_linears(layer) as switched:
        assert switched == int(cpu_inference._packing_available())
        with torch.inference_mode():
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        with torch.no_grad():
            layer.weight.mul_(2)
        with torch.inference_mode():
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert layer(x).requires_grad


def test_packed_linears_leave_other_layers_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 layers, layers with their own instance forward, and every layer when the
    oneDNN operators are missing stay as they are."""
    fp32 = nn.Linear(4, 4)
    hooked = nn.Linear(4, 4).to(torch.bfloat16)
    hooked.forward = lambda x: x  # as accelerate's device hooks replace it
    with packed_linears(nn.Sequential(fp32, hooked)) as switched:
        assert switched == 0
    assert "forward" not in vars(fp32) and "forward" in vars(hooked)
    monkeypatch.setattr(cpu_inference, "_packing_available", lambda: False)
    with packed_linears(nn.Linear(4, 4).to(torch.bfloat16)) as switched:
        assert switched == 0


def test_bf16_encode_with_packed_weights_matches_plain_encode(
    tiny_bert, monkeypatch: pytest.MonkeyPatch
) -> None:
    """encode in bf16 gives the same embeddings with and without packed weights, and the
    model can still be copied and pickled after it."""
    model = AnglE.from_pretrained(str(tiny_bert), pooling="mean", dtype="bfloat16")
    packed = model.encode(TEXTS, batch_size=4, normalize=True)
    copy.deepcopy(model)  # packed weights are not held on the model
    torch.save(model.backbone, io.BytesIO())
    monkeypatch.setattr(cpu_inference, "_packing_available", lambda: False)
    plain = model.encode(TEXTS, batch_size=4, normalize=True)
    assert (packed * plain).sum(axis=1).min() > 0.999


@needs_packing
def test_lora_decoder_encodes_identically_with_packed_base_weights(
    tiny_llama, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a LoRA adapter the plain base layers run packed and the embeddings are
    unchanged bit for bit (a Llama has no fused GELU)."""
    pytest.importorskip("peft")
    from anglekit.llm import LoraSettings, apply_lora

    model = AnglE.from_pretrained(str(tiny_llama), dtype="bfloat16", device="cpu")
    model.backbone = apply_lora(model.backbone, LoraSettings(r=2))
    with packed_linears(model.backbone) as switched:
        assert switched > 0
    packed = model.encode(TEXTS, batch_size=2)
    monkeypatch.setattr(cpu_inference, "_packing_available", lambda: False)
    np.testing.assert_array_equal(model.encode(TEXTS, batch_size=2), packed)


@pytest.fixture
def two_threads():
    """torch at 2 intra-op threads for the test, then as before."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _thread_count_of_a_new_thread() -> int:
    box: list[int] = []
    thread = threading.Thread(target=lambda: box.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return box[0]


def test_map_batches_runs_batches_side_by_side_with_the_callers_settings(two_threads):
    """Two workers of one intra-op thread each, in the caller's inference and autocast modes;
    results in order; afterwards the caller and threads started later have 2 threads again."""
    seen = []

    def fn(i: int) -> int:
        time.sleep(0.01)  # releases the GIL, as torch's kernels do: both workers take batches
        seen.append(
            (
                threading.get_ident(),
                torch.get_num_threads(),
                torch.is_inference_mode_enabled(),
                torch.is_autocast_enabled("cpu"),
            )
        )
        return i * i

    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert list(map_batches(fn, range(8))) == [i * i for i in range(8)]
    workers = {ident for ident, *_ in seen}
    assert len(workers) == 2 and threading.get_ident() not in workers
    assert {tuple(rest) for _, *rest in seen} == {(1, True, True)}
    assert torch.get_num_threads() == 2
    assert _thread_count_of_a_new_thread() == 2


def test_map_batches_is_map_with_one_thread_or_one_batch(two_threads):
    """One batch, or one intra-op thread: everything runs in the calling thread."""
    caller = threading.get_ident()
    assert list(map_batches(lambda i: threading.get_ident(), [0])) == [caller]
    torch.set_num_threads(1)
    assert list(map_batches(lambda i: threading.get_ident(), range(3))) == [caller] * 3


def test_map_batches_passes_errors_on_and_restores_threads(two_threads):
    """A failing batch raises in the caller; stopping early does not hang; threads restored."""

    def fn(i: int) -> int:
        if i == 3:
            raise ValueError("batch 3")
        return i

    with pytest.raises(ValueError, match="batch 3"):
        list(map_batches(fn, range(6)))
    results = map_batches(fn, range(3))
    assert next(results) == 0
    results.close()
    assert torch.get_num_threads() == 2
    assert _thread_count_of_a_new_thread() == 2


def test_encode_agrees_on_one_and_two_threads(tiny_bert, two_threads):
    """Batches side by side (2 threads) give the embeddings of one thread, in input order."""
    model = AnglE.from_pretrained(str(tiny_bert), pooling="mean", device="cpu")
    texts = [f"{t} {i}" for i in range(10) for t in TEXTS]
    two = model.encode(texts, batch_size=4)
    torch.set_num_threads(1)
    one = model.encode(texts, batch_size=4)
    np.testing.assert_allclose(two, one, atol=1e-6)
    np.testing.assert_allclose(two[5], model.encode(texts[5]), atol=1e-6)


def test_map_batches_caps_its_workers_and_shares_the_threads():
    """Eight threads over many batches: MAX_BATCH_WORKERS workers of 8 / workers threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(8)
    seen = set()

    def fn(i: int) -> int:
        time.sleep(0.01)
        seen.add((threading.get_ident(), torch.get_num_threads()))
        return i

    try:
        assert list(map_batches(fn, range(16))) == list(range(16))
    finally:
        torch.set_num_threads(before)
    assert len(seen) == cpu_inference.MAX_BATCH_WORKERS
    assert {n for _, n in seen} == {8 // cpu_inference.MAX_BATCH_WORKERS}


def test_encodes_in_several_threads_at_once_agree(tiny_bert):
    """Concurrent encodes of one bf16 model (one packs, the others run unpacked) give the
    sequential embeddings, and every layer gets its own forward back."""
    model = AnglE.from_pretrained(str(tiny_bert), dtype="bfloat16", device="cpu")
    texts = [f"{t} {i}" for i in range(6) for t in TEXTS]
    reference = model.encode(texts, batch_size=8)
    results, errors = [], []

    def work() -> None:
        try:
            for _ in range(5):
                results.append(model.encode(texts, batch_size=8))
        except Exception as err:  # reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(results) == 15
    for vecs in results:
        np.testing.assert_allclose(vecs, reference, atol=2e-2)  # packed vs unpacked: bf16 rounding
    assert not any("forward" in vars(m) for m in model.modules())
