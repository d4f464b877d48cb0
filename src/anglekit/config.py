"""The anglekit config saved beside a model's weights (``anglekit_config.json``).

It holds everything needed to rebuild the embedder on top of the backbone: pooling, prompts,
maximum length, normalisation, backbone kind, dtype. ``AnglE.from_pretrained`` reads it back,
so a saved model encodes identically with no arguments.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from anglekit.pooling import Pooling, parse_pooling
from anglekit.prompts import resolve_prompt

__all__ = ["CONFIG_NAME", "AngleConfig", "BackboneKind", "from_saved_dict", "load_saved"]

CONFIG_NAME = "anglekit_config.json"
T = TypeVar("T")


def from_saved_dict(cls: type[T], values: dict[str, Any], source: str, what: str) -> T:
    """Build dataclass ``cls`` from saved JSON values, refusing keys it does not know."""
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{source}: unknown {what} key(s) {unknown}")
    return cls(**values)


def load_saved(cls: type[T], path: Path) -> T | None:
    """Read a JSON file saved by ``cls`` (which has ``from_dict``), or ``None`` if absent."""
    if not path.is_file():
        return None
    return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), source=str(path))


class BackboneKind(str, Enum):
    """How the backbone attends: bidirectional encoder or causal decoder."""

    ENCODER = "encoder"
    DECODER = "decoder"


@dataclass
class AngleConfig:
    """Settings of an AnglE embedder that are not part of the backbone's own config.

    Attributes:
        pooling: pooling strategy or token index.
        max_length: texts are truncated to this many tokens.
        prompt: template applied to every text unless ``encode`` names another.
        prompts: named templates, e.g. ``{"query": Prompts.C}``, chosen with ``prompt_name``.
        normalize: ``encode`` returns unit vectors unless told otherwise.
        backbone_kind: encoder or decoder.
        dtype: weight dtype the model was saved in (``float32``, ``bfloat16``, ``float16``).
        padding_side: where the tokenizer pads.
        base_model: the model the weights were trained from, for reference.
        version: the anglekit version that wrote the config.
        lora: LoRA settings (``r``, ``alpha``, ``dropout``, ``target_modules``) when the
            folder holds an adapter rather than full weights.
        adapter_base: the backbone (folder or hub id) the saved adapter applies to.
        gguf_file: the GGUF file in ``adapter_base`` that backbone loads from.
        bidirectional_from: decoder layers from this index on attend in both directions.
        layers: the backbone was cut to its first ``layers`` transformer layers
            (:meth:`~anglekit.model.AnglE.truncate_layers`); ``None`` when it is whole.
        embedding_size: ``encode`` keeps this many leading dimensions unless told otherwise;
            ``None`` keeps them all.
    """

    pooling: Pooling | int = Pooling.CLS
    max_length: int = 512
    prompt: str | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    normalize: bool = False
    backbone_kind: BackboneKind = BackboneKind.ENCODER
    dtype: str = "float32"
    padding_side: str = "right"
    base_model: str | None = None
    version: str | None = None
    lora: dict[str, Any] | None = None
    adapter_base: str | None = None
    gguf_file: str | None = None
    bidirectional_from: int | None = None
    layers: int | None = None
    embedding_size: int | None = None

    def __post_init__(self) -> None:
        self.pooling = parse_pooling(self.pooling)
        self.backbone_kind = BackboneKind(self.backbone_kind)
        self.prompt = resolve_prompt(self.prompt)
        self.prompts = {name: resolve_prompt(t) for name, t in self.prompts.items()}
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {self.max_length!r}")
        for name in ("layers", "embedding_size"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.bidirectional_from is not None and (
            not isinstance(self.bidirectional_from, int) or self.bidirectional_from < 0
        ):
            raise ValueError(
                f"bidirectional_from must be a layer index >= 0, got {self.bidirectional_from!r}"
            )
        if self.lora is not None and self.adapter_base is None:
            raise ValueError("a config with LoRA settings must name its adapter_base")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (enums as their strings)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, Enum):
                out[key] = value.value
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> AngleConfig:
        """Build from saved values; unknown keys raise."""
        return from_saved_dict(cls, values, source, "anglekit config")

    def save(self, directory: str | Path) -> None:
        """Write ``anglekit_config.json`` into ``directory``."""
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> AngleConfig | None:
        """Read ``anglekit_config.json`` from ``directory``, or ``None`` if there is none."""
        return load_saved(cls, Path(directory) / CONFIG_NAME)
