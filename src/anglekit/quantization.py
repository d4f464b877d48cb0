"""Output precisions of ``encode``: float32, scalar int8/uint8, and packed sign bits.

Scalar quantisation maps each dimension ``d`` linearly from its range ``[lo_d, hi_d]`` onto
256 levels:

    u = clip(round((x - lo_d) / s_d), 0, 255),   s_d = (hi_d - lo_d) / 255

``uint8`` returns ``u``; ``int8`` returns ``u - 128``. The ranges come from calibration
embeddings when given (use a few thousand embeddings of typical texts, and the same
calibration for every call whose outputs are compared), else from the embeddings being
quantised, so that one call's outputs are comparable only among themselves.

Binary quantisation keeps the sign of each dimension, ``b_d = [x_d > 0]``, and packs 8 bits
per byte, first dimension in the most significant bit (``numpy.packbits``), giving
``ceil(D / 8)`` bytes: ``ubinary`` as uint8, ``binary`` as int8 (the byte minus 128).
Hamming distance between packed codes approximates angular distance.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

from anglekit._enums import parse_choice

__all__ = ["Precision", "parse_precision", "quantize_embeddings"]


class Precision(str, Enum):
    """The dtype ``encode`` returns."""

    FLOAT32 = "float32"
    INT8 = "int8"
    UINT8 = "uint8"
    BINARY = "binary"
    UBINARY = "ubinary"


def parse_precision(value: str | Precision) -> Precision:
    """A :class:`Precision` from its name; unknown names raise, listing the valid ones."""
    return parse_choice(Precision, value, "precision")


def _scalar_ranges(
    embeddings: np.ndarray, calibration: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    source = embeddings if calibration is None else np.asarray(calibration, dtype=np.float32)
    if source.ndim != 2 or source.shape[1] != embeddings.shape[1] or len(source) == 0:
        raise ValueError(
            f"calibration must be a non-empty (N, {embeddings.shape[1]}) array, "
            f"got shape {source.shape}"
        )
    lo = source.min(axis=0)  # (D,)
    step = (source.max(axis=0) - lo) / 255.0  # (D,)
    return lo, np.where(step > 0, step, 1.0)


def quantize_embeddings(
    embeddings: np.ndarray,
    precision: str | Precision,
    calibration: np.ndarray | None = None,
) -> np.ndarray:
    """Quantise ``(N, D)`` float embeddings (see the module docstring for the formulas).

    Args:
        embeddings: ``(N, D)`` float array.
        precision: the output precision.
        calibration: ``(M, D)`` float embeddings whose per-dimension ranges scale the
            ``int8``/``uint8`` levels; default: the ranges of ``embeddings`` themselves.
            Not used (and refused) for the other precisions.

    Returns:
        ``(N, D)`` float32/int8/uint8, or ``(N, ceil(D / 8))`` int8/uint8 for the binary
        precisions.
    """
    precision = parse_precision(precision)
    x = np.asarray(embeddings, dtype=np.float32)  # (N, D)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {x.shape}")
    scalar = precision in (Precision.INT8, Precision.UINT8)
    if calibration is not None and not scalar:
        raise ValueError(f"calibration only applies to int8 and uint8, not {precision.value}")
    if precision is Precision.FLOAT32:
        return x
    if scalar:
        if len(x) == 0:
            return np.zeros(x.shape, dtype=np.uint8 if precision is Precision.UINT8 else np.int8)
        lo, step = _scalar_ranges(x, calibration)
        levels = np.clip(np.rint((x - lo) / step), 0, 255).astype(np.uint8)  # (N, D)
        if precision is Precision.UINT8:
            return levels
        return (levels.astype(np.int16) - 128).astype(np.int8)
    packed = np.packbits(x > 0, axis=-1)  # (N, ceil(D / 8)) uint8
    if precision is Precision.UBINARY:
        return packed
    return (packed.astype(np.int16) - 128).astype(np.int8)
