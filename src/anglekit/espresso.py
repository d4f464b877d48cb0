"""Embeddings that stay good when cut to fewer layers and fewer dimensions.

Two objectives on top of the AnglE loss ``A(x)`` of :class:`~anglekit.losses.AngleLoss`
(``x`` a ``(N, K, D)`` batch of pooled embeddings):

**Matryoshka** (Kusupati et al., arXiv 2205.13147) trains the leading dimensions of the last
layer's embedding to work on their own:

    ``L_mrl = sum_j  w_j * A(x[..., :d_j])``

**Espresso** (ESE; Li et al., "ESE: Espresso Sentence Embeddings", arXiv 2402.14776) also
trains the shallower layers. With ``x_l`` the pooled output of transformer layer ``l`` of
``L`` (see :mod:`anglekit.layers` for what counts as a layer: the embedding output does not),
``k`` the compression size and ``w_l`` the layer weights of :func:`layer_weights`:

    learn-to-express:  ``L_exp = A(x_L) + 1/(L-1) * sum_{l<L} w_l * A(x_l)``

    learn-to-compress: ``L_cmp = C(x_L) + 1/(L-1) * sum_{l<L} w_l * C(x_l)``,
    ``C(x) = A(x[..., :k]) + lambda * D(x[..., :k], P_k(x))``

    learn-from-the-last-layer: ``L_kd = 1/(L-1) * sum_{l<L} w_l * (S(x_l, x_L) +
    S(x_l[..., :k], x_L))``

    ``L_ese = L_exp + L_cmp + mu * L_kd``

where ``P_k`` is the projection of :func:`pca_targets`, ``D`` the alignment of
:func:`alignment_loss` (MSE plus a KL divergence at temperature ``T``) and ``S`` the
similarity distillation of :func:`similarity_distillation_loss`: each text's in-batch
similarity distribution at a shallower layer is pulled towards the last layer's. ``mu`` is
``ese_distill_w``. With one layer the sums over ``l < L`` are empty. The loss is ``L_mrl`` or
``L_ese``; they cannot be combined.

How this differs from the reference implementation (angle-emb 0.6.1): its student sum runs
over ``hidden_states[0 .. L-2]``, that is the embedding output and layers ``1 .. L-2``,
skipping layer ``L-1``, and applies only ``C`` (not ``A`` on all dimensions) to them; here
it runs over the transformer layers ``1 .. L-1`` and applies both. It has no ``L_kd``: the
labels are its shallower layers' only signal (it can align the last layer to a separate
teacher model instead). With ``L_kd`` every pair of texts in a batch gives the shallower
layers a target, the last layer's similarity, where the labels give one per pair.
Its projection uses a randomised SVD whose component signs change from step to step; here
the decomposition is exact and each component's sign is fixed (see :func:`pca_targets`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anglekit._fields import option
from anglekit.losses import AngleLoss

__all__ = [
    "EspressoConfig",
    "EspressoLoss",
    "LayerSchedule",
    "alignment_loss",
    "compress_loss",
    "ese_loss",
    "layer_weights",
    "matryoshka_loss",
    "pca_targets",
    "similarity_distillation_loss",
]

#: Scale (inverse temperature) of the similarity distributions of the distillation term.
DISTILL_SCALE = 20.0


class LayerSchedule(str, Enum):
    """How the shallower layers ``l = 1 .. L-1`` are weighted in the ESE loss."""

    LOG = "log"  # w_l = 1 / (1 + ln l): the shallowest layer weighs 1, deeper ones less
    UNIFORM = "uniform"  # w_l = 1
    LINEAR = "linear"  # w_l = l / (L - 1): the deepest student weighs 1, the shallowest least


def layer_weights(layers: int, schedule: LayerSchedule | str = LayerSchedule.LOG) -> torch.Tensor:
    """Weights ``w_l`` of the shallower layers ``l = 1 .. layers - 1``.

    ``log`` is the reference's ``1 / (1 + ln(1 + i))`` for student ``i = l - 1``.

    Args:
        layers: ``L``, the number of transformer layers.
        schedule: the :class:`LayerSchedule`.

    Returns:
        ``(L - 1,)`` float32 weights (empty for ``L = 1``).
    """
    schedule = LayerSchedule(schedule)
    depth = torch.arange(1, layers, dtype=torch.float32)  # (L-1,): l = 1 .. L-1
    if schedule is LayerSchedule.LOG:
        return 1.0 / (1.0 + torch.log(depth))
    if schedule is LayerSchedule.UNIFORM:
        return torch.ones_like(depth)
    return depth / max(layers - 1, 1)


@torch.no_grad()
def pca_targets(x: torch.Tensor, k: int) -> torch.Tensor:
    """Project embeddings onto the top ``k`` components of their feature affinity.

    ``M = softmax(X^T X / sqrt(D))`` row-wise (``D x D``), ``M = U S V^T``, and the targets are
    ``X U_k S_k`` (``U_k``, ``S_k`` the top ``k`` singular vectors and values), as in the ESE
    reference. The decomposition is exact (the reference's is randomised) and each column of
    ``U_k`` is signed so that its entry of largest magnitude is positive, so the targets do
    not flip sign between batches. No gradient flows into the targets.

    Args:
        x: ``(B, D)`` embeddings.
        k: number of components, ``1 <= k <= D``.

    Returns:
        ``(B, k)`` float32 targets.
    """
    x = x.float()
    d = x.shape[-1]
    if not 1 <= k <= d:
        raise ValueError(f"compression size must be in 1..{d}, got {k}")
    affinity = torch.softmax(x.T @ x / math.sqrt(d), dim=-1)  # (D, D)
    # M M^T = U S^2 U^T: its eigendecomposition gives U and S twice as fast as an SVD of M.
    eigvals, eigvecs = torch.linalg.eigh(affinity @ affinity.T)  # ascending, (D,), (D, D)
    s = eigvals.flip(0)[:k].clamp(min=0).sqrt()  # (k,)
    u = eigvecs.flip(1)[:, :k]  # (D, k)
    top = u.abs().argmax(dim=0)  # (k,)
    signs = torch.sign(u[top, torch.arange(k, device=u.device)])  # (k,)
    return x @ (u * signs * s)  # (B, k)


def alignment_loss(
    student: torch.Tensor, target: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Align ``student`` rows with ``target`` rows: MSE plus a tempered KL divergence.

    ``D(s, t) = mean((s - t)^2) + T * (1/B) sum_b KL(softmax(t_b / T) || softmax(s_b / T))``

    Args:
        student: ``(B, k)`` the leading dimensions being trained.
        target: ``(B, k)`` what they should match (no gradient is needed through it).
        temperature: ``T > 0``.

    Returns:
        The scalar loss.
    """
    s, t = student.float(), target.float()
    mse = F.mse_loss(s, t)
    log_p = F.log_softmax(s / temperature, dim=-1)  # (B, k)
    q = F.softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_p, q, reduction="batchmean")
    return mse + temperature * kl


def similarity_distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, scale: float = DISTILL_SCALE
) -> torch.Tensor:
    """Pull each text's in-batch similarity distribution towards the teacher's.

    With ``c_ij`` the cosine of texts ``i`` and ``j`` (``i != j``) among the ``M`` texts of a
    batch, ``p_i = softmax_j(s * c^teacher_ij)`` and ``q_i = softmax_j(s * c^student_ij)``:

        ``S = (1/M) sum_i KL(p_i || q_i)``

    No gradient flows into the teacher. Student and teacher may differ in width (a
    compressed student, a full teacher); only their cosines are compared.

    Args:
        student: ``(M, d)`` embeddings being trained.
        teacher: ``(M, D)`` embeddings of the same texts.
        scale: ``s``, the inverse temperature of both distributions.

    Returns:
        The scalar loss (0 for fewer than 3 texts, where each row has one other text).
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{student.shape[0]} student texts but {teacher.shape[0]} teacher texts")
    count = student.shape[0]
    if count < 3:
        return student.float().sum() * 0.0
    off_diagonal = ~torch.eye(count, dtype=torch.bool, device=student.device)  # (M, M)

    def log_probs(x: torch.Tensor) -> torch.Tensor:  # (M, M-1) row-wise log-softmax
        unit = F.normalize(x.float(), dim=-1)  # (M, d)
        cos = (unit @ unit.T)[off_diagonal].view(count, count - 1)
        return F.log_softmax(scale * cos, dim=-1)

    with torch.no_grad():
        target = log_probs(teacher)
    return F.kl_div(log_probs(student), target, reduction="batchmean", log_target=True)


def compress_loss(
    angle: AngleLoss,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    size: int,
    align_w: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Learn-to-compress term of one layer.

    ``C(x) = A(x[..., :k]) + lambda * D(x[..., :k], P_k(x))``

    The alignment compares all ``N * K`` texts of the batch at once.

    Args:
        angle: the AnglE loss ``A``.
        x: ``(N, K, D)`` pooled embeddings of one layer.
        labels: ``(N,)`` labels, or ``None`` (see :class:`~anglekit.losses.AngleLoss`).
        size: ``k``, the compression size.
        align_w: ``lambda``, the alignment weight (0 leaves only ``A``).
        temperature: ``T`` of :func:`alignment_loss`.

    Returns:
        The scalar loss.
    """
    if not 1 <= size <= x.shape[-1]:
        raise ValueError(f"compression size must be in 1..{x.shape[-1]}, got {size}")
    head = x[..., :size]  # (N, K, k)
    loss = angle(head, labels)
    if align_w:
        flat = x.flatten(0, 1)  # (N*K, D)
        target = pca_targets(flat, size)  # (N*K, k)
        loss = loss + align_w * alignment_loss(head.flatten(0, 1), target, temperature)
    return loss


def ese_loss(
    angle: AngleLoss,
    layers: torch.Tensor,
    labels: torch.Tensor | None,
    size: int,
    weights: torch.Tensor,
    align_w: float = 1.0,
    temperature: float = 1.0,
    distill_w: float = 0.0,
) -> torch.Tensor:
    """The Espresso loss ``L_exp + L_cmp + mu * L_kd`` (formulas in the module docstring).

    Args:
        angle: the AnglE loss ``A``.
        layers: ``(L, N, K, D)`` pooled embeddings of layers ``1 .. L``.
        labels: ``(N,)`` labels, or ``None``.
        size: ``k``, the compression size.
        weights: ``(L - 1,)`` weights of layers ``1 .. L-1`` (:func:`layer_weights`).
        align_w: ``lambda``, weight of the alignment to the projection.
        temperature: ``T`` of the alignment's KL divergence.
        distill_w: ``mu``, weight of the distillation from the last layer (0: none).

    Returns:
        The scalar loss.
    """
    count = layers.shape[0]
    if weights.shape != (count - 1,):
        raise ValueError(f"expected {count - 1} layer weights, got {tuple(weights.shape)}")

    def both(x: torch.Tensor) -> torch.Tensor:  # A(x) + C(x)
        return angle(x, labels) + compress_loss(angle, x, labels, size, align_w, temperature)

    teacher = layers[-1].flatten(0, 1)  # (N*K, D)

    def student(x: torch.Tensor) -> torch.Tensor:  # A(x) + C(x) + mu S(x) + mu S(x[:k])
        loss = both(x)
        if distill_w:
            flat = x.flatten(0, 1)  # (N*K, D)
            loss = loss + distill_w * (
                similarity_distillation_loss(flat, teacher)
                + similarity_distillation_loss(flat[:, :size], teacher)
            )
        return loss

    loss = both(layers[-1])
    if count > 1:
        students = [w * student(layers[i]) for i, w in enumerate(weights.tolist())]
        loss = loss + torch.stack(students).sum() / (count - 1)
    return loss


def matryoshka_loss(
    angle: AngleLoss,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    dims: tuple[int, ...],
    weights: tuple[float, ...],
) -> torch.Tensor:
    """The Matryoshka loss ``sum_j w_j * A(x[..., :d_j])``.

    Args:
        angle: the AnglE loss ``A``.
        x: ``(N, K, D)`` pooled embeddings.
        labels: ``(N,)`` labels, or ``None``.
        dims: the leading-dimension sizes ``d_j``, each at most ``D``.
        weights: ``w_j``, one per size.

    Returns:
        The scalar loss.
    """
    if len(dims) != len(weights):
        raise ValueError(f"{len(dims)} Matryoshka sizes but {len(weights)} weights")
    too_big = [d for d in dims if d > x.shape[-1]]
    if too_big:
        raise ValueError(f"Matryoshka sizes {too_big} exceed the embedding size {x.shape[-1]}")
    terms = [w * angle(x[..., :d], labels) for d, w in zip(dims, weights, strict=True)]
    return torch.stack(terms).sum()


def _numbers(value: Any, kind: type, name: str) -> tuple | None:
    """``"32,64"``, ``[32, 64]`` or ``None`` as a tuple of ``kind`` (or ``None``)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        return tuple(kind(str(item).strip()) for item in items)
    except ValueError:
        raise ValueError(
            f"{name}={value!r} must be a comma-separated list of {kind.__name__}s"
        ) from None


def parse_sizes(value: Any) -> tuple[tuple[int, int], ...]:
    """``"2x64,6x384"``, ``[(2, 64), (6, 384)]`` or ``None`` as (layers, dims) cells (``()``
    for ``None``).

    Raises:
        ValueError: an item is not ``<layers>x<dims>`` with both at least 1.
    """
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    cells = []
    for item in items:
        parts = item.strip().lower().split("x") if isinstance(item, str) else item
        try:
            layers, dims = (int(n) for n in parts)
        except (TypeError, ValueError):  # not two numbers
            layers = dims = 0
        if layers < 1 or dims < 1:
            raise ValueError(f"size {item!r} must be <layers>x<dims>, e.g. 2x64")
        cells.append((layers, dims))
    return tuple(cells)


@dataclass(frozen=True)
class EspressoConfig:
    """Options for training embeddings that work at fewer layers and dimensions.

    ``ese=True`` trains with :func:`ese_loss`; ``matryoshka_dims`` trains with
    :func:`matryoshka_loss`; neither keeps the plain AnglE loss. Lists are given as tuples
    or as comma-separated strings (``"32,64,128,384"``), as on the command line.

    Attributes:
        ese: train with the Espresso loss (all layers, first ``ese_compression_size`` dims).
        ese_compression_size: ``k``, the leading dimensions trained to stand alone.
        ese_schedule: weights of the shallower layers (:class:`LayerSchedule`).
        ese_align_w: ``lambda``, weight of the alignment to the projection (0: none).
        ese_kl_temperature: ``T`` of the alignment's KL divergence.
        ese_distill_w: ``mu``, weight of distilling the last layer's in-batch similarities
            into the shallower layers (0: none).
        matryoshka_dims: leading-dimension sizes, e.g. ``(32, 64, 128, 384)``; include the
            full size to keep training the whole embedding.
        matryoshka_weights: one weight per size; default 1 each.
    """

    ese: bool = option(False, "train with the Espresso (ESE) loss over layers and dimensions")
    ese_compression_size: int = option(128, "ESE: leading dimensions trained to stand alone")
    ese_schedule: LayerSchedule = option(
        LayerSchedule.LOG.value,
        "ESE: shallower layer weights: log (1/(1+ln l)), uniform, linear",
    )
    ese_align_w: float = option(1.0, "ESE: weight of aligning the leading dims to their PCA")
    ese_kl_temperature: float = option(1.0, "ESE: temperature of the alignment's KL term")
    ese_distill_w: float = option(
        0.0, "ESE: weight of distilling the last layer's in-batch similarities into shallower ones"
    )
    matryoshka_dims: tuple[int, ...] | str | None = option(
        None, "Matryoshka: comma-separated leading-dimension sizes, e.g. 32,64,128,384"
    )
    matryoshka_weights: tuple[float, ...] | str | None = option(
        None, "Matryoshka: one comma-separated weight per size (default 1 each)"
    )

    def __post_init__(self) -> None:
        problems = []
        try:
            object.__setattr__(self, "ese_schedule", LayerSchedule(self.ese_schedule))
        except ValueError:
            valid = ", ".join(s.value for s in LayerSchedule)
            problems.append(f"ese_schedule={self.ese_schedule!r} must be one of {valid}")
        parsed: dict[str, tuple | None] = {}
        for name, kind in (("matryoshka_dims", int), ("matryoshka_weights", float)):
            try:
                parsed[name] = _numbers(getattr(self, name), kind, name)
                object.__setattr__(self, name, parsed[name])
            except ValueError as e:
                problems.append(str(e))
                parsed[name] = None  # reported; the checks below skip it
        dims, weights = parsed["matryoshka_dims"], parsed["matryoshka_weights"]
        if not isinstance(self.ese, bool):
            problems.append(f"ese={self.ese!r} must be True or False")
        if self.ese_compression_size < 1:
            problems.append(f"ese_compression_size must be >= 1, got {self.ese_compression_size}")
        for name in ("ese_align_w", "ese_kl_temperature", "ese_distill_w"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                problems.append(f"{name}={value!r} must be a finite number >= 0")
        if not self.ese_kl_temperature > 0:
            problems.append("ese_kl_temperature must be > 0")
        if dims is not None and (not dims or min(dims) < 1):
            problems.append(f"matryoshka_dims must be positive sizes, got {dims}")
        if self.matryoshka_weights is not None and self.matryoshka_dims is None:
            problems.append("matryoshka_weights needs matryoshka_dims")
        if weights is not None and dims is not None and len(weights) != len(dims):
            problems.append(f"{len(dims)} matryoshka_dims but {len(weights)} matryoshka_weights")
        if weights is not None and any(not (math.isfinite(w) and w >= 0) for w in weights):
            problems.append(f"matryoshka_weights must be finite and >= 0, got {weights}")
        if self.ese and self.matryoshka_dims is not None:
            problems.append("choose ese or matryoshka_dims, not both")
        if problems:
            raise ValueError("invalid espresso/matryoshka settings: " + "; ".join(problems))

    @property
    def active(self) -> bool:
        """Whether these options change the loss at all."""
        return self.ese or self.matryoshka_dims is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values of the options that apply (empty when neither is on)."""
        if self.ese:
            names = [f.name for f in fields(self) if f.name.startswith("ese")]
        elif self.matryoshka_dims is not None:
            names = ["matryoshka_dims", "matryoshka_weights"]
        else:
            return {}
        out = {name: getattr(self, name) for name in names}
        if self.ese:
            out["ese_schedule"] = self.ese_schedule.value
        else:
            out["matryoshka_dims"] = list(self.matryoshka_dims)
            out["matryoshka_weights"] = list(
                self.matryoshka_weights or (1.0,) * len(self.matryoshka_dims)
            )
        return out


class EspressoLoss(nn.Module):
    """The ESE or Matryoshka loss around an :class:`~anglekit.losses.AngleLoss`.

    For ESE the model must give the pooled output of every layer, ``(L, N, K, D)``
    (:attr:`layerwise` is true); for Matryoshka the usual ``(N, K, D)``.

    Example:
        >>> loss_fn = EspressoLoss(AngleLoss(), EspressoConfig(ese=True, ese_compression_size=8))
        >>> loss = loss_fn(torch.randn(6, 4, 2, 16), torch.rand(4) * 5)  # 6 layers, 4 pairs
    """

    def __init__(self, angle: AngleLoss, config: EspressoConfig) -> None:
        super().__init__()
        if not config.active:
            raise ValueError("EspressoLoss needs ese=True or matryoshka_dims")
        self.angle = angle
        self.config = config

    @property
    def layerwise(self) -> bool:
        """Whether the loss takes every layer's embeddings."""
        return self.config.ese

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None):
        """The loss of ``(L, N, K, D)`` (ESE) or ``(N, K, D)`` (Matryoshka) embeddings."""
        c = self.config
        if c.ese:
            if embeddings.dim() != 4:
                raise ValueError(f"ESE needs (L, N, K, D) embeddings, got {embeddings.shape}")
            weights = layer_weights(embeddings.shape[0], c.ese_schedule)
            return ese_loss(
                self.angle,
                embeddings,
                labels,
                c.ese_compression_size,
                weights,
                c.ese_align_w,
                c.ese_kl_temperature,
                c.ese_distill_w,
            )
        weights = c.matryoshka_weights or (1.0,) * len(c.matryoshka_dims)
        return matryoshka_loss(self.angle, embeddings, labels, c.matryoshka_dims, weights)
