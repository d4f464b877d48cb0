"""Faster training steps on CPU: bulk-drawn dropout masks, the attention kernel, and frozen
weights cast once.

**Dropout.** On CPU, ``torch.nn.functional.dropout`` draws its mask one element at a time
from torch's Mersenne Twister, then multiplies in two more passes. In a training step that
is expensive: with a LoRA adapter on every linear layer, SmolLM2-135M applies 210 dropouts
per forward, and drawing their masks took 28% of the step on 2 cores; the hidden dropouts of
a bf16 all-MiniLM-L6-v2 step took 15%.

:class:`FastDropout` draws a mask as raw 64-bit words of numpy's SFC64 generator, four 16-bit
uniforms ``u`` per word, and keeps an element when ``u >= round(p * 2**16)``: the drop
probability is ``p`` to within ``2**-17``, and kept elements are scaled by the exact inverse
of the keep probability, so the expected output equals the input. Backward multiplies by the
same mask, kept as one byte per element (torch keeps the mask in the input's dtype).

Each call seeds its generator with a number drawn from torch's CPU generator, so
``torch.manual_seed`` fixes every mask, and whatever restores torch's RNG state (activation
checkpointing's recomputation, GradCache's replay) gets the same masks again. Off CPU, in
eval mode, or with ``p`` 0 or 1 the module is exactly :class:`torch.nn.Dropout`.

**Attention.** In bf16, torch's fused CPU attention kernel is slower than the unfused
("math") one on short sequences: forward and backward of 32 sequences x 12 heads x 32 tokens
took 29 ms fused vs 12 ms unfused here, at 128 tokens 35 vs 21 ms, at 512 tokens 35 vs 47 ms
(fp32: fused is as fast or faster at every length). The fused backward alone took a fifth of
a SmolLM2 LoRA step. :func:`attention_kernels` picks the unfused kernel for bf16 CPU steps
on batches of at most :data:`MATH_ATTENTION_MAX_TOKENS` tokens and leaves the choice to torch
otherwise.

**Frozen weights.** Under autocast a weight that does not require grad is cast to bf16 at
every use; only trainable weights have their casts cached. With a LoRA adapter nearly every
linear weight is frozen: a SmolLM2-135M step cast 105 M weights in the forward and again in
the recomputation of activation checkpointing; keeping bf16 copies made its steps about a
tenth faster. :class:`FrozenWeightCasts` keeps one bf16 copy of each frozen linear weight
(what autocast computes, bit for bit) and swaps it in for the duration of a training step;
outside steps (evaluation, saving) the model holds its own weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager

import numpy as np
import torch
from torch import nn

__all__ = [
    "MATH_ATTENTION_MAX_TOKENS",
    "FastDropout",
    "FrozenWeightCasts",
    "attention_kernels",
    "use_fast_dropout",
]

#: Longest batch (in tokens) for which bf16 CPU steps use the unfused attention kernel.
MATH_ATTENTION_MAX_TOKENS = 256

_LEVELS = 1 << 16  # resolution of the per-element uniforms


def keep_mask(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """A boolean mask of ``shape`` keeping each element with probability ``1 - p``, and the
    scale ``1 / P(keep)`` for the kept elements."""
    threshold = round(p * _LEVELS)
    count = shape.numel()
    seed = int(torch.randint(0, 2**63 - 1, (1,)).item())
    words = np.random.SFC64(seed).random_raw(-(-count // 4))  # (ceil(n / 4),) uint64
    uniforms = words.view(np.uint16)[:count].reshape(tuple(shape))
    return torch.from_numpy(uniforms >= threshold), _LEVELS / (_LEVELS - threshold)


class _MaskedScale(torch.autograd.Function):
    """``x * keep * scale``, saving only the boolean mask for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return (x * keep.to(x.dtype)).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return (grad * keep.to(grad.dtype)).mul_(ctx.scale), None, None


class FastDropout(nn.Dropout):
    """:class:`torch.nn.Dropout` with bulk-drawn masks on CPU (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p in (0.0, 1.0) or x.device.type != "cpu":
            return super().forward(x)
        keep, scale = keep_mask(x.shape, self.p)
        return _MaskedScale.apply(x, keep, scale)


def use_fast_dropout(module: nn.Module) -> int:
    """Replace every :class:`torch.nn.Dropout` inside ``module`` with a :class:`FastDropout`
    of the same ``p``, in place; returns how many were replaced."""
    targets = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Dropout
    ]
    for parent, name, child in targets:
        fast = FastDropout(child.p)
        fast.train(child.training)
        setattr(parent, name, fast)
    return len(targets)


def attention_kernels(device: torch.device, bf16: bool, length: int) -> AbstractContextManager:
    """The attention kernel choice for one training step (forward, backward and any
    recomputation), as a context manager: the unfused kernel for bf16 on CPU at up to
    :data:`MATH_ATTENTION_MAX_TOKENS` tokens, torch's own choice otherwise."""
    if device.type != "cpu" or not bf16 or length > MATH_ATTENTION_MAX_TOKENS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


class FrozenWeightCasts:
    """Low-precision copies of a module's frozen linear weights and biases, swapped in on
    demand (see the module docstring). The copies are made at the first swap, so weights
    loaded before it (a resumed checkpoint) are the ones copied."""

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        self.module = module
        self.dtype = dtype
        self._pairs: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] | None = None

    def _frozen(self) -> list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]:
        params = {
            id(p): p  # a parameter shared by two layers is copied once
            for m in self.module.modules()
            if isinstance(m, nn.Linear)
            for p in (m.weight, m.bias)
            if p is not None and not p.requires_grad and p.dtype == torch.float32
        }
        return [(p, p.data, p.data.to(self.dtype)) for p in params.values()]

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the frozen linear parameters hold their low-precision copies."""
        if self._pairs is None:
            self._pairs = self._frozen()
        for param, _, low in self._pairs:
            param.data = low
        try:
            yield
        finally:
            for param, full, _ in self._pairs:
                param.data = full
