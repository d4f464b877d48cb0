"""Shared fixtures: tiny models and tokenizers built in code, never downloaded."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_vocab() -> dict[str, int]:
    """A character-level WordPiece vocabulary: any lowercase word tokenises."""
    chars = list(string.ascii_lowercase + string.digits + ".,!?'\"-:{}")
    return {w: i for i, w in enumerate(SPECIALS + chars + ["##" + c for c in chars])}


def build_tiny_bert(folder: Path, seed: int = 0, family: str = "bert") -> Path:
    """Save a 2-layer, 32-d random BERT (or RoBERTa) and its WordPiece tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=wordpiece_vocab())
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        family,
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        # RoBERTa counts positions from pad_token_id + 1
        max_position_embeddings=128 if family == "bert" else 130,
        pad_token_id=tokenizer.pad_token_id,
    )
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random BERT encoder (shared, read-only: copy before changing)."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random Llama decoder whose tokenizer has no pad token."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    chars = list(string.ascii_lowercase + string.digits + " .,!?'\"-:{}")
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON Lines."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


WORDS = [
    "a man plays a flute",
    "a woman is cooking",
    "the cat sleeps",
    "kids play soccer",
    "a dog runs fast",
    "the sun is bright",
    "a car drives by",
    "birds sing loudly",
    "she reads a book",
    "he writes code",
    "rain falls today",
    "the train is late",
]


@pytest.fixture
def sts_rows() -> list[dict]:
    """Twelve scored pairs with graded 0-5 labels."""
    return [
        {"text1": WORDS[i], "text2": WORDS[(i + 1) % len(WORDS)], "label": float(i % 6)}
        for i in range(len(WORDS))
    ]
