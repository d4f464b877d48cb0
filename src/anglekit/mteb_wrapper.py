"""An MTEB-compatible encoder around :class:`~anglekit.model.AnglE`, using its saved prompts.

MTEB (``pip install mteb``) calls ``model.encode`` and says which task and which side of a
retrieval pair it is embedding. :class:`MTEBEncoder` answers both call styles:

- mteb 2: ``encode(inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None)`` where
  ``inputs`` is a ``DataLoader`` of batches ``{"text": [...]}``;
- mteb 1: ``encode(sentences, *, task_name, prompt_type=None)``.

The prompt is chosen from the model's named prompts (``anglekit_config.json``), first match
wins: ``"<task name>-<prompt type>"``, ``"<task name>"``, then the prompt type
(``"query"``; for documents ``"document"``, ``"passage"`` or ``"doc"``); with no match the
model's default prompt applies.

Example:
    >>> import mteb
    >>> model = MTEBEncoder(AnglE.from_pretrained("runs/anglekit/model"))
    >>> mteb.evaluate(model, mteb.get_tasks(tasks=["STSBenchmark"]))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from anglekit.model import AnglE

__all__ = ["MTEBEncoder", "prompt_names"]

DOCUMENT_NAMES = ("document", "passage", "doc")
ACCEPTED_KWARGS = {"batch_size", "show_progress_bar"}


def _value(prompt_type: Any) -> str | None:
    """``PromptType.query`` (an Enum of mteb) or a plain string, as a string."""
    if prompt_type is None:
        return None
    return str(getattr(prompt_type, "value", prompt_type))


def prompt_names(task_name: str | None, prompt_type: Any) -> list[str]:
    """Candidate prompt names, most specific first, for a task and prompt type."""
    kind = _value(prompt_type)
    names = []
    if task_name and kind:
        names.append(f"{task_name}-{kind}")
    if task_name:
        names.append(task_name)
    if kind == "query":
        names.append("query")
    elif kind in DOCUMENT_NAMES:
        names.extend(DOCUMENT_NAMES)
    elif kind is not None:
        raise ValueError(f"unknown prompt_type {kind!r}; expected query or document")
    return names


class MTEBEncoder:
    """Wrap an :class:`AnglE` model for MTEB.

    Args:
        model: the embedder.
        batch_size: texts per forward pass (MTEB's ``batch_size`` overrides it per call).
        normalize: return unit vectors (MTEB scores with cosine either way).
    """

    def __init__(self, model: AnglE, *, batch_size: int = 32, normalize: bool = True) -> None:
        self.model = model
        self.batch_size = batch_size
        self.normalize = normalize

    def prompt_name(self, task_name: str | None, prompt_type: Any = None) -> str | None:
        """The saved prompt name used for this task and prompt type, or ``None``."""
        saved = self.model.config.prompts
        return next((n for n in prompt_names(task_name, prompt_type) if n in saved), None)

    def encode(
        self,
        inputs: Sequence[str] | Iterable[dict[str, Any]],
        *,
        task_metadata: Any = None,
        task_name: str | None = None,
        hf_split: str | None = None,
        hf_subset: str | None = None,
        prompt_type: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Embed MTEB inputs: a list of texts, or a ``DataLoader`` of ``{"text": [...]}``.

        Returns:
            ``(N, D)`` float32 embeddings in input order.
        """
        unknown = sorted(set(kwargs) - ACCEPTED_KWARGS)
        if unknown:
            raise TypeError(f"MTEBEncoder.encode got unexpected arguments {unknown}")
        if task_metadata is not None:
            task_name = getattr(task_metadata, "name", task_name)
        texts = self._texts(inputs)
        return self.model.encode(
            texts,
            batch_size=kwargs.get("batch_size", self.batch_size),
            prompt_name=self.prompt_name(task_name, prompt_type),
            normalize=self.normalize,
            show_progress=kwargs.get("show_progress_bar", False),
        )

    @staticmethod
    def _texts(inputs: Sequence[str] | Iterable[dict[str, Any]]) -> list[str]:
        if isinstance(inputs, str):
            raise TypeError("inputs must be a list of texts or batches, not one string")
        texts: list[str] = []
        for item in inputs:
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, dict) and "text" in item:
                texts.extend(item["text"])
            else:
                raise TypeError(
                    "inputs must hold texts or batches with a 'text' list, got "
                    f"{type(item).__name__}"
                )
        return texts
