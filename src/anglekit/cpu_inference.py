"""Faster ``encode`` on CPU: attention over short sequences, and prepacked bf16 weights.

**Attention.** torch's fused CPU attention kernel does a fixed amount of work per
(sequence, head) pair, which dominates on the short sequences of sentence embedding. In
inference it still beats torch's unfused kernel, whose softmax is slow over rows this short,
but both lose to two matrix products around a softmax written out in float32: on 2 cores,
170 sequences x 12 heads x 12 tokens (32 dims, bf16) took 5.0 ms fused, 9.3 ms unfused,
1.3 ms so. The fused kernel is fastest at multiples of 16 tokens; against it, the short path
took a third of the time below 16 tokens, about the same at 16, 0.7-0.9 of it from 18 to 30
tokens, and three times as long at 32 (32 and 128 sequences). :func:`use_short_attention`
makes a backbone compute attention this way in eval-mode inference on CPU for keys of at most
:data:`SHORT_ATTENTION_MAX_TOKENS` tokens, and through transformers' SDPA attention otherwise
(training mode, gradients, dropout, GPUs, longer sequences, grouped key/value heads, causal
attention without an explicit mask, export tracing). On all-MiniLM-L6-v2 encoding STS-B
sentences in bf16 this made ``encode`` 1.2-1.3x faster at batch 128, and embeddings agree
with SDPA's to a cosine of 0.9999. The short path is registered with transformers as the
attention implementation :data:`SHORT_ATTENTION`, with SDPA's boolean masks; Hugging Face
configs do not store the implementation, so a saved folder loads anywhere as plain SDPA.
(Training steps choose their attention kernel in :mod:`anglekit.cpu_training`.)

**Linear weights.** A bf16 ``nn.Linear`` on CPU hands oneDNN a plain weight, to be brought
into the blocked layout of its AMX / AVX-512 kernels, and first copies the bias into the
output (``aten::copy_`` inside ``addmm``, most of the 12% of a bf16 encode at batch 128 that
went to tensor copies), on every call. :func:`packed_linears` gives each bf16 linear layer
one reordered copy of its weight (``torch.ops.mkldnn._reorder_linear_weight``, as
``torch.compile`` does for frozen CPU models) and runs it with the bias applied inside the
product (``torch.ops.mkldnn._linear_pointwise``), bit for bit the result of ``F.linear``;
BERT-style feed-forward inputs also apply their GELU inside the product. The copy lives as
long as the layer (in a weak mapping beside it, so the model still copies and pickles), is
remade when the weight changes (a training step, a load), and costs once the memory of the
bf16 linear weights. Encoding 2,000 STS-B sentences with all-MiniLM-L6-v2 in bf16, the
median of 12 interleaved passes was 1.13x (batch 32) and 1.08x (batch 128) faster with
packed weights; fusing the GELU took a further 8% off a forward pass of 128 sentences
(fastest of 30). Without those oneDNN operators (another torch build, or a CPU without
AVX-512) layers run as before.

**Fused BERT blocks.** Two more of a BERT layer's steps move into its products: each
sublayer output adds its residual inside the product (oneDNN's binary ``add``), and the
self-attention computes query, key and value in one product on one packed ``(3H, H)``
weight and lays the three out head by head in one copy, where three separate layers needed
three products and three copies before the attention products. On a 2-core Intel Xeon
(AMX), encoding 2,000 STS-B sentences with all-MiniLM-L6-v2 in bf16, the median of 16
interleaved passes went from 3,075 to 3,208 sentences/s at a 2,048-token budget (1.04x) and,
of 10, from 1,789 to 1,972 at batch 32 (1.10x); embeddings agree with the unfused ones to a
cosine of 0.99994.

**Batches side by side.** torch splits every operation over its intra-op threads and waits
for all of them at its end; the many small operations of short-sentence batches (layer
norms, residual adds, the softmax) spend much of their time in those waits. :func:`map_batches`
instead runs whole batches at once on up to :data:`MAX_BATCH_WORKERS` worker threads that
share torch's intra-op threads (torch's kernels release the GIL). Encoding 2,000 STS-B
sentences with all-MiniLM-L6-v2 in bf16 on 2 cores at a 2,048-token budget, 16 interleaved
pairs of passes were 0.94-1.70x faster this way (median 1.19x; the gain is largest when the
machine is slow, which is when threads wait longest), with identical embeddings. On 16
cores (a random model of the same shape, bf16, sentences/s at a 2,048-token budget / at
batch 32): one batch at a time 6,064 / 2,377; 16 workers x 1 thread 6,739 / 1,658 (the GIL
becomes the limit); 8 x 2 7,431 / 3,141; 4 x 4 8,372 / 3,569. On 4 of those cores, 4 x 1
was 1.8x / 1.6x faster than one batch at a time. ``encode`` has each batch write its own
rows of the output in its worker (the calling thread assigning them competed with the
workers: 1.07x, median of 4 pairs of processes on 2 cores) and, with a token budget, lowers
the budget evenly so the batches come in whole rounds of :func:`batch_workers` (see
:func:`anglekit.batching.length_sorted_batches`; 1.05x, median of 16 interleaved passes on
2 cores, where 2,000 sentences made 11 full batches and a small one).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MAX_BATCH_WORKERS",
    "SHORT_ATTENTION",
    "SHORT_ATTENTION_MAX_TOKENS",
    "batch_workers",
    "map_batches",
    "native_cpu_bf16",
    "packed_linears",
    "short_attention",
    "use_short_attention",
    "warn_if_bf16_emulated",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Longest key sequence for which CPU inference takes :func:`short_attention`'s own path.
SHORT_ATTENTION_MAX_TOKENS = 30

#: The attention implementation name :func:`use_short_attention` registers with transformers.
SHORT_ATTENTION = "anglekit_short_sdpa"

#: Most batches :func:`map_batches` runs at once (more workers contend for the GIL).
MAX_BATCH_WORKERS = 4


def _takes_short_path(module: nn.Module, query, key, attention_mask, dropout, kwargs) -> bool:
    return (
        query.device.type == "cpu"
        and key.shape[-2] <= SHORT_ATTENTION_MAX_TOKENS
        and not torch.is_grad_enabled()
        and not module.training  # e.g. GradCache's no-grad pass must match its replay
        and dropout == 0.0
        and not torch.jit.is_tracing()
        and query.shape[1] == key.shape[1]  # no grouped key/value heads
        and (attention_mask is not None or not getattr(module, "is_causal", False))
        and (attention_mask is None or attention_mask.dtype == torch.bool)
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
    )


def short_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: ``softmax(q k^T * scaling + mask) v``.

    On the short path (see the module docstring) the scores and the softmax are float32 and
    the products run in the inputs' dtype; a masked position gets float32's lowest value, so
    a fully masked row averages its values instead of giving NaN. Everything else goes to
    transformers' SDPA attention unchanged.

    Args:
        module: the attention layer (read for ``is_causal``).
        query: ``(B, H, T, d)``.
        key: ``(B, H, S, d)``.
        value: ``(B, H, S, d)``.
        attention_mask: ``(B, 1, T, S)`` boolean, True where attention is allowed, or None.
        dropout: attention dropout probability; above 0 (training mode) SDPA's path.
        scaling: score scale, default ``d ** -0.5``.
        is_causal: passed to SDPA.
        **kwargs: passed to SDPA.

    Returns:
        ``(B, T, H, d)`` outputs and no attention weights.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _takes_short_path(module, query, key, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)).float().mul_(scale)  # (B, H, T, S)
    if attention_mask is not None:
        scores.masked_fill_(~attention_mask, torch.finfo(torch.float32).min)
    probs = scores.sub_(scores.amax(-1, keepdim=True)).exp_()
    probs = probs.div_(probs.sum(-1, keepdim=True))
    out = torch.matmul(probs.to(value.dtype), value)  # (B, H, T, d)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SHORT_ATTENTION, short_attention)
    AttentionMaskInterface.register(SHORT_ATTENTION, sdpa_mask)


def use_short_attention(backbone: nn.Module) -> bool:
    """Switch a transformers model from SDPA attention to :func:`short_attention`.

    Models on another implementation (eager, flash attention, one the user chose) and models
    that do not take pluggable attention functions are left alone.

    Returns:
        Whether the backbone was switched.
    """
    config = getattr(backbone, "config", None)
    if (
        config is None
        or getattr(config, "_attn_implementation", None) != "sdpa"
        or not getattr(backbone, "_supports_attention_backend", False)
    ):
        return False
    _register()
    backbone.set_attn_implementation(SHORT_ATTENTION)
    return True


# Each module's (weight key, packed weights), held beside the module rather than on it: oneDNN's
# packed tensors cannot be copied or pickled, and a model must stay deep-copyable and savable.
_PACKED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[tuple[int, int], ...], Any]] = (
    weakref.WeakKeyDictionary()
)


# Held while packed_linears switches layers in or out, so that blocks opened in several
# threads each switch a whole model or nothing.
_PATCHING = threading.Lock()


def native_cpu_bf16() -> bool:
    """Whether torch runs bf16 products on this CPU with oneDNN's bf16 kernels (AVX-512 or
    AVX-NE-CONVERT). Without them (an AVX2-only CPU) bf16 is emulated, several times slower
    than float32: all-MiniLM-L6-v2 with bf16 weights encoded 47 sentences/s in
    sentence-transformers against 263 in float32 on a 2-core AMD EPYC of that kind."""
    mkldnn = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_is_mkldnn_bf16_supported")
        and bool(mkldnn._is_mkldnn_bf16_supported())
    )


def warn_if_bf16_emulated(fix: str) -> None:
    """Log a warning, naming ``fix``, when bf16 on this CPU would run emulated."""
    if not native_cpu_bf16():
        logger.warning(
            "this CPU has no native bf16 kernels (AVX-512 or AVX-NE-CONVERT): bf16 runs "
            "emulated, several times slower than float32 (%s)",
            fix,
        )


def _packing_available() -> bool:
    """Whether oneDNN's packed bf16 linear kernels run here (on an AVX2-only CPU the weight
    reorder raises)."""
    mkldnn = torch.ops.mkldnn
    return (
        native_cpu_bf16()
        and hasattr(mkldnn, "_reorder_linear_weight")
        and hasattr(mkldnn, "_linear_pointwise")
    )


def _cached(owner: nn.Module, sources: Sequence[torch.Tensor], build: Callable[[], R]) -> R:
    """``build()``, kept for ``owner`` until one of ``sources`` is replaced or changed."""
    key = tuple((t.data_ptr(), t._version) for t in sources)
    cached = _PACKED.get(owner)
    if cached is None or cached[0] != key:
        cached = _PACKED[owner] = (key, build())
    return cached[1]


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def _packed_weight(linear: nn.Linear) -> torch.Tensor:
    """The layer's reordered weight, remade when the weight tensor or its contents changed."""
    return _cached(linear, (linear.weight,), lambda: _reorder(linear.weight))


def _runs_packed(x: torch.Tensor) -> bool:
    return not torch.is_grad_enabled() and x.dtype == torch.bfloat16 and x.device.type == "cpu"


def _packed_product(
    linear: nn.Linear,
    x: torch.Tensor,
    attr: str = "none",
    algorithm: str = "",
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W^T + b`` on the packed weight, then oneDNN's pointwise ``attr`` (``"none"``,
    ``"gelu"`` with ``algorithm`` ``"none"`` for erf), or, given ``add``, plus ``add``."""
    bias = None if linear.bias is None else linear.bias.detach()
    weight = _packed_weight(linear)
    if add is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, add, weight, bias, "add")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)


def _packed_forward(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not _runs_packed(x):
        return F.linear(x, linear.weight, linear.bias)
    return _packed_product(linear, x)


def _is_erf_gelu(act: Any) -> bool:
    from transformers.activations import GELUActivation

    return type(act) is GELUActivation and act.act is F.gelu


def _dense_gelu_forward(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    if not _runs_packed(hidden):
        return block.intermediate_act_fn(block.dense(hidden))
    return _packed_product(block.dense, hidden, "gelu", "none")


def _residual_norm_forward(
    block: nn.Module, hidden: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    if block.training or not _runs_packed(hidden):
        return type(block).forward(block, hidden, residual)
    return block.LayerNorm(_packed_product(block.dense, hidden, add=residual))


def _packed_qkv(attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One reordered ``(3H, H)`` weight (and bias) for the query, key and value layers."""
    layers = (attention.query, attention.key, attention.value)
    biases = [layer.bias for layer in layers if layer.bias is not None]

    def build() -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = _reorder(torch.cat([layer.weight for layer in layers]))
        return weight, torch.cat(biases).detach() if biases else None

    return _cached(attention, [layer.weight for layer in layers] + biases, build)


def _fused_qkv_forward(
    attention: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if (
        attention.training
        or not _runs_packed(hidden_states)
        or kwargs.get("cache") is not None
        or kwargs.get("past_key_values") is not None
        or kwargs.get("encoder_hidden_states") is not None
    ):
        return type(attention).forward(attention, hidden_states, attention_mask, **kwargs)
    for name in ("cache", "past_key_values", "encoder_hidden_states"):
        kwargs.pop(name, None)
    batch, length = hidden_states.shape[:2]
    heads, size = attention.num_attention_heads, attention.attention_head_size
    weight, bias = _packed_qkv(attention)
    qkv = torch.ops.mkldnn._linear_pointwise(hidden_states, weight, bias, "none", [], "")
    # (3, B, H, T, d) in one copy: the attention products then read contiguous heads
    query, key, value = qkv.view(batch, length, 3, heads, size).permute(2, 0, 3, 1, 4).contiguous()
    out, _ = short_attention(
        attention, query, key, value, attention_mask, scaling=attention.scaling, **kwargs
    )
    return out.reshape(batch, length, heads * size), None


def _packable_layers(module: nn.Module) -> list[nn.Linear]:
    """The module's plain CPU bf16 linear layers, none where oneDNN packing is missing."""
    if not _packing_available():
        return []
    return [
        m
        for m in module.modules()
        if type(m) is nn.Linear
        and m.weight.dtype == torch.bfloat16
        and m.weight.device.type == "cpu"
        and "forward" not in vars(m)
    ]


def _dense_gelu_blocks(module: nn.Module, layers: list[nn.Linear]) -> list[nn.Module]:
    """BERT-style feed-forward inputs: blocks whose only children are a packed ``dense``
    layer and an exact (erf) GELU, so their forward is ``gelu(dense(x))``."""
    packed = {id(layer) for layer in layers}
    return [
        m
        for m in module.modules()
        if set(dict(m.named_children())) == {"dense", "intermediate_act_fn"}
        and id(m.dense) in packed
        and _is_erf_gelu(m.intermediate_act_fn)
        and "forward" not in vars(m)
    ]


@functools.cache
def _forward_parameters(cls: type[nn.Module]) -> tuple[str, ...]:
    """The parameter names of a module class's ``forward`` after ``self`` (read once per
    class: ``packed_linears`` asks on every ``encode``)."""
    return tuple(inspect.signature(cls.forward).parameters)[1:]


def _residual_norm_blocks(module: nn.Module, layers: list[nn.Linear]) -> list[nn.Module]:
    """BERT-style sublayer outputs: ``forward(hidden_states, input_tensor)`` over only a
    packed ``dense`` layer, a dropout and a ``LayerNorm``, so their forward is
    ``LayerNorm(dropout(dense(hidden_states)) + input_tensor)``."""
    packed = {id(layer) for layer in layers}
    return [
        m
        for m in module.modules()
        if set(dict(m.named_children())) == {"dense", "dropout", "LayerNorm"}
        and id(m.dense) in packed
        and type(m.dropout) is nn.Dropout
        and type(m.LayerNorm) is nn.LayerNorm
        and _forward_parameters(type(m)) == ("hidden_states", "input_tensor")
        and "forward" not in vars(m)
    ]


def _fused_qkv_blocks(module: nn.Module, layers: list[nn.Linear]) -> list[nn.Module]:
    """BERT-style self-attention on :data:`SHORT_ATTENTION`: packed ``query``, ``key`` and
    ``value`` layers of one input width, a dropout, and no causal mask."""
    packed = {id(layer) for layer in layers}
    blocks = []
    for m in module.modules():
        if set(dict(m.named_children())) != {"query", "key", "value", "dropout"}:
            continue
        projections = (m.query, m.key, m.value)
        if (
            all(id(p) in packed for p in projections)
            and len({p.in_features for p in projections}) == 1
            and len({p.bias is None for p in projections}) == 1
            and getattr(getattr(m, "config", None), "_attn_implementation", None) == SHORT_ATTENTION
            and not getattr(m, "is_causal", True)
            and isinstance(getattr(m, "scaling", None), float)
            and {p.out_features for p in projections}
            == {getattr(m, "num_attention_heads", 0) * getattr(m, "attention_head_size", 0)}
            and _forward_parameters(type(m))[:2] == ("hidden_states", "attention_mask")
            and "forward" not in vars(m)
        ):
            blocks.append(m)
    return blocks


@contextlib.contextmanager
def packed_linears(module: nn.Module) -> Iterator[int]:
    """Inside the block, the module's CPU bf16 ``nn.Linear`` layers run on packed weights
    without gradients (see the module docstring); with gradients they run as ``F.linear``.

    Layers of other classes (LoRA layers, quantised layers) and layers whose ``forward`` is
    already replaced on the instance (accelerate's device hooks, or this block open in
    another thread's ``encode``, which then runs unpacked) are left alone. In BERT-style
    layers, outside training mode, three kinds of block also change: a feed-forward input
    (only ``dense`` and an erf GELU) applies the GELU inside the product, a sublayer output
    (``dense``, dropout, ``LayerNorm``) adds its residual inside the product, and a
    self-attention on :data:`SHORT_ATTENTION` computes query, key and value in one product
    on one packed weight, then :func:`short_attention`. oneDNN rounds once to bf16 after a
    fused GELU or add, where the plain layers round before and after, so these outputs
    differ by bf16 rounding.

    Yields:
        The number of layers switched.
    """
    with _PATCHING:
        layers = _packable_layers(module)
        found = [
            (layers, _packed_forward),
            (_dense_gelu_blocks(module, layers), _dense_gelu_forward),
            (_residual_norm_blocks(module, layers), _residual_norm_forward),
            (_fused_qkv_blocks(module, layers), _fused_qkv_forward),
        ]
        patches = [(m, functools.partial(forward, m)) for ms, forward in found for m in ms]
        for patched, forward in patches:
            patched.forward = forward
    try:
        yield len(layers)
    finally:
        with _PATCHING:
            for patched, forward in patches:
                if vars(patched).get("forward") is forward:
                    del patched.forward


def batch_workers() -> int:
    """How many batches :func:`map_batches` runs side by side here (given that many): one
    per intra-op thread of the caller, at most :data:`MAX_BATCH_WORKERS`."""
    return min(torch.get_num_threads(), MAX_BATCH_WORKERS)


def map_batches(fn: Callable[[T], R], batches: Sequence[T]) -> Iterator[R]:
    """``map(fn, batches)`` with the batches run side by side on CPU worker threads.

    Workers: :func:`batch_workers`, at most one per batch, sharing the caller's intra-op
    threads (``torch.get_num_threads()``) evenly between them.
    Each call of ``fn`` runs under the caller's grad, inference-mode and CPU autocast
    settings, which torch keeps per thread. With one thread or one batch this is ``map`` in
    the calling thread. Results come in the order of ``batches``.
    """
    threads = torch.get_num_threads()
    workers = min(batch_workers(), len(batches))
    if workers < 2:
        yield from map(fn, batches)
        return
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    def call(batch: T) -> R:
        with (
            torch.inference_mode(inference),
            torch.set_grad_enabled(grad),
            torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]),
        ):
            return fn(batch)

    pool = ThreadPoolExecutor(
        workers, initializer=torch.set_num_threads, initargs=(threads // workers,)
    )
    try:
        yield from pool.map(call, batches)
    finally:
        pool.shutdown(cancel_futures=True)
        # torch's thread count is per thread, but threads started later copy the count most
        # recently set anywhere (here, the workers'): set the caller's again.
        torch.set_num_threads(threads)
