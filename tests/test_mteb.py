"""MTEB wrapper: both encode call styles and prompt selection from the saved prompts."""

from __future__ import annotations

from enum import Enum
from types import SimpleNamespace

import numpy as np
import pytest
from torch.utils.data import DataLoader

from anglekit import AnglE
from anglekit.mteb_wrapper import MTEBEncoder, prompt_names

TEXTS = ["a man plays a flute", "hi", "the quick brown fox", "kids play", "rain falls"]


class PromptType(str, Enum):  # the shape of mteb's PromptType
    query = "query"
    document = "document"


@pytest.fixture(scope="module")
def encoder(tiny_llama) -> MTEBEncoder:
    model = AnglE.from_pretrained(
        str(tiny_llama),
        pooling="mean",
        device="cpu",
        prompt="any: {text}",
        prompts={"query": "q: {text}", "passage": "p: {text}", "STSBenchmark": "sts: {text}"},
    )
    return MTEBEncoder(model, batch_size=2)


def test_prompt_name_order(encoder):
    """Task-specific names win over the prompt type; documents map to passage; else default."""
    assert prompt_names("T", PromptType.query) == ["T-query", "T", "query"]
    assert encoder.prompt_name("STSBenchmark", PromptType.query) == "STSBenchmark"
    assert encoder.prompt_name("NFCorpus", PromptType.query) == "query"
    assert encoder.prompt_name("NFCorpus", PromptType.document) == "passage"
    assert encoder.prompt_name("NFCorpus", "passage") == "passage"
    assert encoder.prompt_name("Banking77Classification", None) is None
    with pytest.raises(ValueError, match="unknown prompt_type 'answer'"):
        encoder.prompt_name("T", "answer")


def test_mteb2_dataloader_call(encoder):
    """mteb 2 style: a DataLoader of {'text': [...]} batches, task from task_metadata."""
    loader = DataLoader([{"text": t} for t in TEXTS], batch_size=2)
    got = encoder.encode(
        loader,
        task_metadata=SimpleNamespace(name="NFCorpus"),
        hf_split="test",
        hf_subset="default",
        prompt_type=PromptType.query,
    )
    expected = encoder.model.encode(TEXTS, prompt_name="query", normalize=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    default = encoder.encode(loader, task_metadata=SimpleNamespace(name="Banking77"))
    np.testing.assert_allclose(default, encoder.model.encode(TEXTS, normalize=True), atol=1e-5)
    assert np.abs(got - default).max() > 1e-3  # the query prompt changed the vectors


def test_mteb1_list_call_and_bad_arguments(encoder):
    """mteb 1 style: a list of texts with task_name; unknown keywords and inputs raise."""
    got = encoder.encode(TEXTS, task_name="STSBenchmark", batch_size=3)
    expected = encoder.model.encode(TEXTS, prompt_name="STSBenchmark", normalize=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.shape == (5, 32) and got.dtype == np.float32
    with pytest.raises(TypeError, match=r"unexpected arguments \['convert_to_tensor'\]"):
        encoder.encode(TEXTS, task_name="X", convert_to_tensor=True)
    with pytest.raises(TypeError, match="not one string"):
        encoder.encode("one text", task_name="X")
    with pytest.raises(TypeError, match="got int"):
        encoder.encode([1, 2], task_name="X")
