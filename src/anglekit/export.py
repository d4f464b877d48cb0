"""Export a model for other runtimes: an ONNX folder, or a sentence-transformers folder.

Both folders keep what makes the model an AnglE embedder (pooling, prompts, maximum length,
normalisation), so they encode like the original:

- :func:`export_onnx` writes a folder that ``AnglE.from_pretrained`` loads with the ONNX
  backend (see :mod:`anglekit.onnx_backend`).
- :func:`export_sentence_transformers` writes a folder that ``SentenceTransformer(folder)``
  loads with its own modules only: ``Transformer`` (maximum length), ``Pooling`` (the
  matching mode) and ``Normalize`` when the model normalises. Prompt templates become
  sentence-transformers prompts, which are prefixes, so a template with text after
  ``{text}`` (such as ``Prompts.A``) and poolings that sentence-transformers lacks
  (``cls_avg``, ``cls_max``, token indices) are refused with the reason.
"""

from __future__ import annotations

import logging
import tempfile
from enum import Enum
from pathlib import Path

from anglekit._files import atomic_directory
from anglekit.config import AngleConfig
from anglekit.onnx_backend import Backend, Quantization
from anglekit.pooling import Pooling

__all__ = ["ExportFormat", "export_onnx", "export_sentence_transformers", "st_prompts"]

logger = logging.getLogger(__name__)

#: anglekit pooling -> sentence-transformers ``Pooling`` mode (same maths, right padding).
ST_POOLING_MODES = {
    Pooling.CLS: "cls",
    Pooling.MEAN: "mean",
    Pooling.MAX: "max",
    Pooling.LAST: "lasttoken",
    Pooling.WEIGHTED_MEAN: "weightedmean",
}
DEFAULT_PROMPT_NAME = "default"
ST_HINT = 'pip install "anglekit[st]"'


class ExportFormat(str, Enum):
    """Targets of ``anglekit export``."""

    ONNX = "onnx"
    ST = "st"


def export_onnx(
    model: str, output: str | Path, *, quantize: str | Quantization | None = None
) -> Path:
    """Export ``model`` (folder or hub id) to an ONNX model folder, written atomically.

    Args:
        model: the model to export.
        output: the folder to write; an existing one is replaced only once the new one is
            complete.
        quantize: ``"int8"`` for dynamic int8 quantisation.

    Returns:
        The output folder.
    """
    from anglekit.model import AnglE

    angle = AnglE.from_pretrained(model, backend=Backend.ONNX, quantize=quantize)
    angle.save_pretrained(output)
    return Path(output)


def _split_template(template: str) -> tuple[str, str]:
    """The text before and after ``{text}`` in a template (which is already validated)."""
    marker = "\x00"
    before, after = template.format(text=marker).split(marker)
    return before, after


def st_prompts(config: AngleConfig) -> tuple[dict[str, str], str | None]:
    """sentence-transformers prompts (prefixes) for the model's templates.

    Returns:
        The named prompts and the default prompt's name (``None`` without a default).

    Raises:
        ValueError: a template has text after ``{text}``, or the default prompt's name
            collides with a named prompt.
    """
    templates = dict(config.prompts)
    default = None
    if config.prompt is not None:
        if DEFAULT_PROMPT_NAME in templates and templates[DEFAULT_PROMPT_NAME] != config.prompt:
            raise ValueError(
                f"the model has a named prompt {DEFAULT_PROMPT_NAME!r} and a different default "
                "prompt; sentence-transformers needs a name for the default, rename that prompt"
            )
        templates[DEFAULT_PROMPT_NAME] = config.prompt
        default = DEFAULT_PROMPT_NAME
    prompts = {}
    for name, template in templates.items():
        before, after = _split_template(template)
        if after:
            raise ValueError(
                f"prompt {name!r} ({template!r}) has text after {{text}}; sentence-transformers "
                "prompts are prefixes only, so this model cannot be exported to it (use the "
                "anglekit or ONNX export instead)"
            )
        prompts[name] = before
    return prompts, default


def _st_pooling_mode(pooling: Pooling | int) -> str:
    if pooling not in ST_POOLING_MODES:
        valid = ", ".join(p.value for p in ST_POOLING_MODES)
        name = pooling.value if isinstance(pooling, Pooling) else f"token index {pooling}"
        raise ValueError(
            f"pooling {name!r} has no sentence-transformers equivalent; exportable: {valid}"
        )
    return ST_POOLING_MODES[pooling]


def export_sentence_transformers(model: str, output: str | Path) -> Path:
    """Export ``model`` (folder or hub id) to a sentence-transformers folder, atomically.

    The folder also keeps the anglekit config, so ``AnglE.from_pretrained`` loads it back
    with the same settings.

    Args:
        model: the model to export.
        output: the folder to write.

    Returns:
        The output folder.
    """
    try:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.base.modules import Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling as STPooling
    except ImportError as e:
        raise ImportError(f"exporting to sentence-transformers needs it: {ST_HINT}") from e
    from anglekit.model import AnglE

    angle = AnglE.from_pretrained(model, device="cpu", backend=Backend.TORCH)
    config = angle.config
    if config.padding_side != "right":
        raise ValueError("only right-padded models export to sentence-transformers")
    mode = _st_pooling_mode(config.pooling)  # refuse before any work
    prompts, default = st_prompts(config)
    with tempfile.TemporaryDirectory(prefix="anglekit-st-") as staging:
        angle.save_pretrained(staging)  # weights, tokenizer (with its pad token), config
        transformer = Transformer(staging, max_seq_length=config.max_length)
        modules = [transformer, STPooling(angle.embedding_dim, pooling_mode=mode)]
        if config.normalize:
            modules.append(Normalize())
        st_model = SentenceTransformer(
            modules=modules, prompts=prompts, default_prompt_name=default, device="cpu"
        )
        with atomic_directory(output) as tmp:
            st_model.save(str(tmp))
            config.save(tmp)
    logger.info("exported %s to sentence-transformers at %s", model, output)
    return Path(output)
