"""ESE and Matryoshka losses, layer truncation and reduced-size inference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, Qwen2Config, Qwen2Model

from anglekit import AnglE, fit
from anglekit.cli import main
from anglekit.config import CONFIG_NAME
from anglekit.data import StsPairs
from anglekit.espresso import (
    EspressoConfig,
    EspressoLoss,
    LayerSchedule,
    alignment_loss,
    layer_weights,
    parse_sizes,
    pca_targets,
    similarity_distillation_loss,
)
from anglekit.evaluation import evaluate_pairs, evaluate_sizes
from anglekit.layers import layer_outputs, layer_stack, truncate_backbone
from anglekit.losses import AngleLoss
from anglekit.training import SUMMARY_FILE

from .conftest import WORDS, write_jsonl

TEXTS = ["a man plays a flute", "hi", "the quick brown fox jumps over the lazy dog", "kids play"]


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    layers = torch.randn(3, 5, 2, 16, generator=gen)  # (L, N, K, D)
    labels = torch.tensor([0.0, 1.5, 3.0, 4.5, 2.0])
    return layers, labels


def _kl_by_hand(s: torch.Tensor, t: torch.Tensor, temp: float) -> float:
    total = 0.0
    for row_s, row_t in zip(s.tolist(), t.tolist(), strict=True):
        zs = [math.exp(v / temp) for v in row_s]
        zt = [math.exp(v / temp) for v in row_t]
        p = [v / sum(zs) for v in zs]
        q = [v / sum(zt) for v in zt]
        total += sum(qi * (math.log(qi) - math.log(pi)) for pi, qi in zip(p, q, strict=True))
    return total / len(s)


def test_layer_weights_schedules():
    """log is 1/(1+ln l) for l = 1..L-1; uniform is all ones; linear is l/(L-1); L=1 is empty."""
    expected = [1 / (1 + math.log(lay)) for lay in range(1, 6)]
    np.testing.assert_allclose(layer_weights(6).numpy(), expected, rtol=1e-6)
    assert layer_weights(6, "uniform").tolist() == [1.0] * 5
    np.testing.assert_allclose(layer_weights(5, LayerSchedule.LINEAR).numpy(), [0.25, 0.5, 0.75, 1])
    assert layer_weights(1).shape == (0,)


def test_alignment_loss_is_mse_plus_tempered_kl():
    """D(s, t) = mean squared error + T * batch-mean KL(softmax(t/T) || softmax(s/T))."""
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    for temp in (1.0, 2.5):
        pairs = zip(s.flatten().tolist(), t.flatten().tolist(), strict=True)
        mse = sum((a - b) ** 2 for a, b in pairs) / 24
        expected = mse + temp * _kl_by_hand(s, t, temp)
        assert alignment_loss(s, t, temp).item() == pytest.approx(expected, rel=1e-5)
    assert alignment_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_pca_targets_project_on_top_components_with_fixed_signs():
    """Targets are X U_k S_k of softmax(X^T X / sqrt(D)), signs fixed, no gradient."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(10, 8, generator=gen, requires_grad=True)
    out = pca_targets(x, 3)
    assert out.shape == (10, 3) and not out.requires_grad
    affinity = np.exp(x.detach().numpy().T @ x.detach().numpy() / math.sqrt(8))
    affinity /= affinity.sum(axis=1, keepdims=True)
    u, s, _ = np.linalg.svd(affinity)
    for j in range(3):
        col = u[:, j] * np.sign(u[np.abs(u[:, j]).argmax(), j])
        np.testing.assert_allclose(out[:, j].numpy(), x.detach().numpy() @ col * s[j], atol=1e-4)
    np.testing.assert_allclose(pca_targets(-x, 3).numpy(), -out.numpy(), atol=1e-4)  # same axes
    with pytest.raises(ValueError, match="compression size"):
        pca_targets(x, 9)


def test_ese_loss_equals_hand_computed_sum(batch):
    """ESE = A(x_L) + C(x_L) + 1/(L-1) sum_l w_l (A(x_l) + C(x_l)), C = A(head) + lam D."""
    layers, labels = batch
    angle = AngleLoss(angle_w=0.02)
    k, lam, temp = 6, 0.5, 2.0
    config = EspressoConfig(
        ese=True, ese_compression_size=k, ese_align_w=lam, ese_kl_temperature=temp
    )
    got = EspressoLoss(angle, config)(layers, labels).item()

    def c(x):
        flat = x.reshape(-1, 16)
        target = pca_targets(flat, k)
        mse = F.mse_loss(flat[:, :k], target).item()
        return angle(x[..., :k], labels).item() + lam * (
            mse + temp * _kl_by_hand(flat[:, :k], target, temp)
        )

    total = angle(layers[2], labels).item() + c(layers[2])
    weights = [1.0, 1 / (1 + math.log(2))]
    students = [w * (angle(layers[i], labels).item() + c(layers[i])) for i, w in enumerate(weights)]
    total += sum(students) / 2
    assert got == pytest.approx(total, rel=1e-5)


def test_ese_loss_single_layer_and_no_alignment(batch):
    """With one layer only the last-layer terms remain; align_w=0 drops the alignment."""
    layers, labels = batch
    angle = AngleLoss()
    config = EspressoConfig(ese=True, ese_compression_size=8, ese_align_w=0.0)
    got = EspressoLoss(angle, config)(layers[-1:], labels)
    expected = angle(layers[-1], labels) + angle(layers[-1][..., :8], labels)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_matryoshka_loss_equals_weighted_sum(batch):
    """Matryoshka = sum_j w_j A(x[..., :d_j]); default weights are 1."""
    x, labels = batch[0][-1], batch[1]
    angle = AngleLoss()
    config = EspressoConfig(matryoshka_dims="4,8,16", matryoshka_weights="1,0.5,2")
    loss = EspressoLoss(angle, config)
    expected = sum(w * angle(x[..., :d], labels).item() for d, w in ((4, 1.0), (8, 0.5), (16, 2.0)))
    assert loss(x, labels).item() == pytest.approx(expected, rel=1e-6)
    plain = EspressoLoss(angle, EspressoConfig(matryoshka_dims=(8, 16)))
    expected = angle(x[..., :8], labels).item() + angle(x, labels).item()
    assert plain(x, labels).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="exceed"):
        EspressoLoss(angle, EspressoConfig(matryoshka_dims="32"))(x, labels)


def test_loss_backpropagates_in_bf16(batch):
    """bf16 embeddings (distillation on) give a finite float32 loss; gradients reach each layer."""
    layers, labels = batch
    x = layers.to(torch.bfloat16).requires_grad_()
    config = EspressoConfig(ese=True, ese_compression_size=8, ese_distill_w=1.0)
    loss = EspressoLoss(AngleLoss(), config)(x, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(x.grad[i].abs().sum() > 0 for i in range(3))


def test_config_validation_reports_all_problems():
    """Bad settings raise one error naming each of them."""
    with pytest.raises(ValueError) as err:
        EspressoConfig(
            ese=True,
            ese_schedule="cubic",
            matryoshka_dims="32,x",
            ese_kl_temperature=0.0,
        )
    message = str(err.value)
    assert "ese_schedule='cubic'" in message and "matryoshka_dims" in message
    assert "ese_kl_temperature" in message
    with pytest.raises(ValueError, match="not both"):
        EspressoConfig(ese=True, matryoshka_dims="32")
    with pytest.raises(ValueError, match="2 matryoshka_dims but 1"):
        EspressoConfig(matryoshka_dims="32,64", matryoshka_weights="1")
    assert EspressoConfig().to_dict() == {}
    assert EspressoConfig(matryoshka_dims="8,16").to_dict() == {
        "matryoshka_dims": [8, 16],
        "matryoshka_weights": [1.0, 1.0],
    }


def _bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


def _qwen2():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=60,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return Qwen2Model(config).eval()


def _gpt2():
    torch.manual_seed(0)
    return GPT2Model(GPT2Config(vocab_size=60, n_embd=32, n_layer=4, n_head=4)).eval()


@pytest.mark.parametrize(
    ("build", "stack"), [(_bert, "encoder.layer"), (_qwen2, "layers"), (_gpt2, "h")]
)
def test_truncation_equals_running_first_layers(build, stack):
    """A backbone cut to N layers returns what layer N of the whole one does (final norm and
    all), for encoders and decoders alike; the config's layer counts follow."""
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    full = build()
    assert layer_stack(full)[0] == stack
    with torch.no_grad():
        out = full(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        per_layer = layer_outputs(full, out.hidden_states, out.last_hidden_state)
    assert per_layer.shape == (4, 2, 7, 32)  # (L, B, T, H)
    torch.testing.assert_close(per_layer[-1], out.hidden_states[-1])
    for n in (1, 2, 3):
        cut = build()
        truncate_backbone(cut, n)
        assert len(layer_stack(cut)[1]) == n and cut.config.num_hidden_layers == n
        for value in (getattr(cut.config, "layer_types", None) or [None] * n,):
            assert len(value) == n
        with torch.no_grad():
            hidden = cut(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(hidden, per_layer[n - 1], atol=1e-5, rtol=1e-4)
    if stack == "encoder.layer":  # no final norm: layer N is hidden_states[N] itself
        torch.testing.assert_close(per_layer[1], out.hidden_states[2])
    with pytest.raises(ValueError, match=r"1\.\.4"):
        truncate_backbone(build(), 5)


def test_model_all_layers_forward_matches_truncated_models(tiny_llama):
    """AnglE.forward(all_layers=True)[l-1] equals the pooled output of the model cut to l."""
    model = AnglE.from_pretrained(str(tiny_llama), device="cpu")
    batch = model.pad(model.tokenize(TEXTS))
    with torch.no_grad():
        layers = model(**batch, all_layers=True)
        assert layers.shape == (2, 4, 32)
        torch.testing.assert_close(layers[-1], model(**batch))
        cut = AnglE.from_pretrained(str(tiny_llama), device="cpu", layers=1)
        torch.testing.assert_close(cut(**batch), layers[0], atol=1e-5, rtol=1e-4)


def test_from_pretrained_layers_and_embedding_size_survive_save(tiny_bert, tmp_path):
    """layers and embedding_size chosen at load are saved and applied on reload."""
    whole = AnglE.from_pretrained(str(tiny_bert), pooling="mean", device="cpu")
    batch = whole.pad(whole.tokenize(TEXTS))
    with torch.no_grad():
        first_layer = whole(**batch, all_layers=True)[0]
    cut = AnglE.from_pretrained(
        str(tiny_bert), pooling="mean", device="cpu", layers=1, embedding_size=8
    )
    vecs = cut.encode(TEXTS)
    assert vecs.shape == (4, 8) and cut.embedding_dim == 8
    np.testing.assert_allclose(vecs, first_layer[:, :8].numpy(), atol=1e-5)
    assert cut.encode(TEXTS, embedding_size=32).shape == (4, 32)
    cut.save_pretrained(tmp_path / "cut")
    saved = json.loads((tmp_path / "cut" / CONFIG_NAME).read_text())
    assert saved["layers"] == 1 and saved["embedding_size"] == 8
    hf = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert hf["num_hidden_layers"] == 1
    again = AnglE.from_pretrained(str(tmp_path / "cut"), device="cpu")
    assert again.config.layers == 1 and len(layer_stack(again.backbone)[1]) == 1
    np.testing.assert_allclose(again.encode(TEXTS), vecs, atol=1e-5)
    with pytest.raises(ValueError, match="layers must be"):
        AnglE.from_pretrained(str(tmp_path / "cut"), device="cpu", layers=2)
    with pytest.raises(ValueError, match="exceeds the hidden size"):
        AnglE.from_pretrained(str(tiny_bert), device="cpu", embedding_size=33)


def test_truncate_layers_on_decoder_model_roundtrip(tiny_llama, tmp_path):
    """truncate_layers on a Llama embedder saves a 1-layer model that encodes the same."""
    model = AnglE.from_pretrained(str(tiny_llama), device="cpu").truncate_layers(1)
    assert model.config.layers == 1 and model.backbone.config.num_hidden_layers == 1
    vecs = model.encode(TEXTS)
    model.save_pretrained(tmp_path / "llama1")
    again = AnglE.from_pretrained(str(tmp_path / "llama1"), device="cpu")
    np.testing.assert_allclose(again.encode(TEXTS), vecs, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "recorded"),
    [
        ({"ese": True, "ese_compression_size": 8}, {"ese": True, "ese_compression_size": 8}),
        (
            {"ese": True, "ese_compression_size": 8, "ese_distill_w": 2.0},
            {"ese": True, "ese_distill_w": 2.0},
        ),
        ({"matryoshka_dims": "8,32"}, {"matryoshka_dims": [8, 32]}),
    ],
)
def test_fit_with_ese_or_matryoshka_records_the_choice(tiny_bert, tmp_path, options, recorded):
    """fit trains with the ESE / Matryoshka loss and records it in the summary and card."""
    rows = [{"text1": w, "text2": TEXTS[i % 4], "label": float(i % 6)} for i, w in enumerate(WORDS)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    before = AnglE.from_pretrained(str(tiny_bert), device="cpu").encode(TEXTS)
    result = fit(
        str(tiny_bert),
        str(train),
        dev_data=None,
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        batch_size=4,
        learning_rate=1e-3,
        progress=False,
        plots=False,
        **options,
    )
    summary = json.loads((tmp_path / "run" / SUMMARY_FILE).read_text())
    assert recorded.items() <= summary["loss"].items()
    card = json.loads((result.model_dir / "anglekit_card.json").read_text())
    assert recorded.items() <= card["loss"]["size"].items()
    readme = (result.model_dir / "README.md").read_text()
    assert f"{next(iter(recorded))}=" in readme.split("fewer layers or dimensions:")[1]
    after = AnglE.from_pretrained(str(result.model_dir), device="cpu").encode(TEXTS)
    assert not np.allclose(after, before, atol=1e-4)


def test_cli_train_flags_reach_the_espresso_options(monkeypatch):
    """`anglekit train --ese --ese-schedule uniform` passes the options on to fit."""
    import anglekit.training

    seen = {}

    def fake_fit(**kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(anglekit.training, "fit", fake_fit)
    argv = ["train", "--ese", "--ese-schedule", "uniform", "--ese-distill-w", "5"]
    assert main([*argv, "--matryoshka-dims", "none"]) == 1
    assert seen["ese"] is True and seen["ese_schedule"] == "uniform"
    assert seen["ese_distill_w"] == 5.0
    assert seen["matryoshka_dims"] is None and seen["ese_compression_size"] == 128
    assert main(["train", "--ese"]) == 1
    assert seen["ese_schedule"] == "log"  # the default, as its value
    assert seen["ese_distill_w"] == 0.0


def test_cli_encode_with_fewer_layers_and_dims(tiny_bert, tmp_path):
    """`anglekit encode --layers 1 --embedding-size 8` writes what the cut model encodes."""
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "v.npy"
    argv = ["-q", "encode", str(tiny_bert), "--input", str(tmp_path / "in.txt")]
    assert main([*argv, "--output", str(out), "--layers", "1", "--embedding-size", "8"]) == 0
    expected = AnglE.from_pretrained(str(tiny_bert), layers=1, device="cpu").encode(TEXTS)
    np.testing.assert_allclose(np.load(out), expected[:, :8], atol=1e-5)


def test_encode_all_layers_gives_every_depth(tiny_bert):
    """encode(all_layers=True)[l-1] is the encoding of the model cut to l layers; dims,
    normalisation and single texts apply as in a plain encode."""
    model = AnglE.from_pretrained(str(tiny_bert), pooling="mean", device="cpu")
    every = model.encode(TEXTS, all_layers=True, batch_size=3)
    assert every.shape == (2, 4, 32)
    np.testing.assert_allclose(every[-1], model.encode(TEXTS), atol=1e-6)
    cut = AnglE.from_pretrained(str(tiny_bert), pooling="mean", device="cpu", layers=1)
    np.testing.assert_allclose(every[0], cut.encode(TEXTS), atol=1e-5)
    small = model.encode(TEXTS, all_layers=True, embedding_size=8, normalize=True)
    assert small.shape == (2, 4, 8)
    np.testing.assert_allclose(np.linalg.norm(small, axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(model.encode(TEXTS[1], all_layers=True), every[:, 1], atol=1e-6)
    with pytest.raises(ValueError, match="float32"):
        model.encode(TEXTS, all_layers=True, precision="int8")


def test_parse_sizes():
    """layers x dims cells from text or pairs; malformed or non-positive cells refused."""
    assert parse_sizes("2x64, 6X384") == ((2, 64), (6, 384))
    assert parse_sizes([(4, 128)]) == ((4, 128),)
    assert parse_sizes(None) == ()
    for bad in ("2x", "0x64", "2x64x3", "two", [(1,)]):
        with pytest.raises(ValueError, match="<layers>x<dims>"):
            parse_sizes(bad)


def test_evaluate_sizes_scores_each_cell_from_one_encoding():
    """Each (layers, dims) cell equals evaluate_pairs on that slice; one encode call."""
    rng = np.random.default_rng(0)
    texts = [f"t{i}" for i in range(12)]
    every = rng.normal(size=(3, 12, 16))
    table = {t: i for i, t in enumerate(texts)}
    pairs = StsPairs(texts[:6], texts[6:], np.arange(6.0))
    calls = []

    def encode_layers(batch):
        calls.append(batch)
        return every[:, [table[t] for t in batch]]

    scores = evaluate_sizes(encode_layers, pairs, [(1, 4), (3, 16)])
    assert len(calls) == 1 and set(scores) == {(1, 4), (3, 16)}
    for (layers, dims), corr in scores.items():
        cell = every[layers - 1, :, :dims]
        want = evaluate_pairs(lambda b, cell=cell: cell[[table[t] for t in b]], pairs)
        assert corr.spearman == pytest.approx(want.spearman)
    assert scores[(1, 4)].spearman != pytest.approx(scores[(3, 16)].spearman)


def test_fit_keeps_the_checkpoint_best_over_dev_sizes(tiny_bert, tmp_path):
    """With dev_sizes the kept checkpoint's score is the mean over the cells, each logged."""
    rows = [{"text1": w, "text2": TEXTS[i % 4], "label": float(i % 6)} for i, w in enumerate(WORDS)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    dev = write_jsonl(tmp_path / "dev.jsonl", rows)
    options = dict(
        dev_data=str(dev), max_steps=4, eval_steps=2, batch_size=4, learning_rate=1e-3,
        progress=False, plots=False, ese=True, ese_compression_size=8,
    )  # fmt: skip
    result = fit(
        str(tiny_bert), str(train), output_dir=str(tmp_path / "run"), dev_sizes="1x8,2x32",
        **options,
    )  # fmt: skip
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_spearman" in e]
    assert [e["step"] for e in evals] == [2, 4]
    for e in evals:
        cells = (e["eval_spearman_1x8"], e["eval_spearman_2x32"])
        assert e["eval_spearman"] == pytest.approx(sum(cells) / 2)
    assert result.best_dev_spearman == pytest.approx(max(e["eval_spearman"] for e in evals))
    with pytest.raises(ValueError, match="3x8 exceed this model's 2 layers x 32 dims"):
        fit(str(tiny_bert), str(train), output_dir=str(tmp_path / "x"), dev_sizes="3x8", **options)
    with pytest.raises(ValueError, match="dev_sizes: size 'x8'"):
        fit(str(tiny_bert), str(train), output_dir=str(tmp_path / "x"), dev_sizes="x8", **options)


def _distill_by_hand(student: torch.Tensor, teacher: torch.Tensor, scale: float) -> float:
    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in b)
        )

    def scaled_cosines(x: torch.Tensor) -> torch.Tensor:  # row i: s * cos(x_i, x_j), j != i
        rows = x.tolist()
        return torch.tensor(
            [[scale * cos(a, b) for j, b in enumerate(rows) if j != i] for i, a in enumerate(rows)],
            dtype=torch.float64,
        )

    return _kl_by_hand(scaled_cosines(student), scaled_cosines(teacher), 1.0)


def test_similarity_distillation_is_kl_of_in_batch_cosine_softmaxes():
    """S = mean_i KL(softmax_j(s cos_t) || softmax_j(s cos_s)) over j != i; no grad to teacher."""
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(6, 4, generator=gen, requires_grad=True)
    teacher = torch.randn(6, 16, generator=gen, requires_grad=True)  # widths may differ
    for scale in (1.0, 20.0):
        got = similarity_distillation_loss(student, teacher, scale)
        expected = _distill_by_hand(student.detach(), teacher.detach(), scale)
        assert got.item() == pytest.approx(expected, rel=1e-4)
    got.backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    same = torch.randn(5, 8, generator=gen)
    assert similarity_distillation_loss(same, 3 * same).item() == pytest.approx(0.0, abs=1e-6)
    assert similarity_distillation_loss(same[:2], same[:2]).item() == 0.0  # one other text
    with pytest.raises(ValueError, match="teacher texts"):
        similarity_distillation_loss(same, same[:4])


def test_ese_loss_adds_weighted_distillation_of_shallower_layers(batch):
    """distill_w adds 1/(L-1) sum_l w_l mu (S(x_l, x_L) + S(x_l[:k], x_L)) and nothing else."""
    layers, labels = batch
    angle, k, mu = AngleLoss(), 6, 0.7
    base = EspressoLoss(angle, EspressoConfig(ese=True, ese_compression_size=k))
    with_kd = EspressoLoss(
        angle, EspressoConfig(ese=True, ese_compression_size=k, ese_distill_w=mu)
    )
    teacher = layers[-1].reshape(-1, 16)
    weights = [1.0, 1 / (1 + math.log(2))]
    extra = 0.0
    for i, w in enumerate(weights):
        flat = layers[i].reshape(-1, 16)
        pair = _distill_by_hand(flat, teacher, 20.0) + _distill_by_hand(flat[:, :k], teacher, 20.0)
        extra += w * mu * pair
    got = with_kd(layers, labels).item() - base(layers, labels).item()
    assert got == pytest.approx(extra / 2, rel=1e-4)
    with pytest.raises(ValueError, match="ese_distill_w"):
        EspressoConfig(ese=True, ese_distill_w=-1.0)
