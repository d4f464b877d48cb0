"""The ONNX backend: the backbone exported with ``torch.onnx`` and run by onnxruntime.

Only the backbone (token ids and mask to ``(B, T, H)`` hidden states) goes into the graph;
tokenisation, prompts, length-sorted batching, pooling and normalisation stay in
:meth:`AnglE.encode <anglekit.model.AnglE.encode>`, so an ONNX model encodes exactly like
its torch original. BERT-family graphs are then rewritten by onnxruntime's transformer
optimiser into its fused operators (embeddings with layer norm, attention, GELU with bias),
so the saved graph is for onnxruntime. ``quantize="int8"`` applies onnxruntime's dynamic
quantisation: weights of the matrix multiplications (attention's included) stored as int8,
activations quantised per batch at run time (fastest on CPUs with AVX-512 VNNI or AMX; on a
2-core AVX2-only AMD EPYC int8 encoded 1.3x as fast as float32 ONNX, ``bench/README.md``).

A folder saved from an ONNX model holds ``model.onnx``, ``anglekit_onnx.json`` (how it was
exported), the backbone's ``config.json``, the tokenizer and the anglekit config;
``AnglE.from_pretrained`` picks the ONNX backend for it by itself.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from anglekit._enums import parse_choice

__all__ = [
    "ONNX_INFO_NAME",
    "ONNX_NAME",
    "Backend",
    "OnnxBackbone",
    "OnnxInfo",
    "Quantization",
    "load_onnx_backbone",
]

logger = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
ONNX_INFO_NAME = "anglekit_onnx.json"
OPSET = 17
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "last_hidden_state"
MAX_PROTO_BYTES = 2**31 - 1  # one ONNX protobuf file holds at most 2 GiB
#: Hugging Face model types whose exports onnxruntime's BERT optimiser fuses.
BERT_FAMILY = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra"})
#: onnxruntime fusions left out. Its CPU SkipLayerNormalization kernel took 2.0 ms on a
#: 2,048 x 384 input (2 threads) where the Add and LayerNormalization it replaces took 0.38 ms.
DISABLED_FUSIONS = ("SkipLayerNormFusion",)
INSTALL_HINT = 'pip install "anglekit[onnx]"'
MS_DOMAIN = "com.microsoft"  # onnxruntime's own operators

T = TypeVar("T")


class Backend(str, Enum):
    """What runs the backbone: PyTorch, or onnxruntime on an exported graph (CPU)."""

    TORCH = "torch"
    ONNX = "onnx"


class Quantization(str, Enum):
    """Weight quantisation of an ONNX graph."""

    INT8 = "int8"  # onnxruntime dynamic quantisation, int8 weights


@dataclass(frozen=True)
class OnnxInfo:
    """How an ONNX graph was made (``anglekit_onnx.json``).

    Attributes:
        file: the graph's file name in the folder.
        quantize: ``"int8"`` for a dynamically quantised graph, else ``None``.
        fused: whether onnxruntime's transformer optimiser rewrote the graph into its own
            operators (then only onnxruntime runs it).
        opset: the ONNX opset it was exported with.
        inputs: input names, in order.
        output: output name (the last hidden states).
    """

    file: str = ONNX_NAME
    quantize: str | None = None
    fused: bool = False
    opset: int = OPSET
    inputs: tuple[str, ...] = INPUTS
    output: str = OUTPUT

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> OnnxInfo:
        """Build from saved values; unknown keys or a foreign layout raise."""
        from anglekit.config import from_saved_dict

        info = from_saved_dict(cls, values, source, "ONNX export")
        info = OnnxInfo(**{**asdict(info), "inputs": tuple(info.inputs)})
        if info.inputs != INPUTS or info.output != OUTPUT:
            raise ValueError(
                f"{source}: expected inputs {list(INPUTS)} and output {OUTPUT!r}, got "
                f"{list(info.inputs)} and {info.output!r}"
            )
        if info.quantize is not None:
            parse_quantization(info.quantize)
        return info


def parse_backend(value: str | Backend) -> Backend:
    """A :class:`Backend` from its name; unknown names raise, listing the valid ones."""
    return parse_choice(Backend, value, "backend")


def parse_quantization(value: str | Quantization) -> Quantization:
    """A :class:`Quantization` from its name; unknown names raise."""
    return parse_choice(Quantization, value, "quantize")


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"the ONNX backend needs onnxruntime and onnx: {INSTALL_HINT}") from e
    return onnxruntime


class _HiddenStates(nn.Module):
    """The backbone as a function of ``(input_ids, attention_mask)`` only, for tracing."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs = {"use_cache": False} if getattr(self.backbone.config, "use_cache", False) else {}
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out.last_hidden_state  # (B, T, H)


@contextmanager
def _eager_attention(backbone: nn.Module) -> Iterator[None]:
    """Trace attention as plain products and softmax, the pattern onnxruntime fuses."""
    switch = getattr(backbone, "set_attn_implementation", None)  # absent in older transformers
    before = getattr(backbone.config, "_attn_implementation", None)
    if switch is None or before in (None, "eager"):
        yield
        return
    switch("eager")
    try:
        yield
    finally:
        switch(before)


def export_backbone(backbone: nn.Module) -> bytes:
    """Trace a Hugging Face backbone to an ONNX graph with dynamic batch and length axes.

    Uses the TorchScript-based ``torch.onnx.export`` with eager attention, whose graphs
    onnxruntime's optimiser fuses (attention, layer norm, GELU) best.

    Returns:
        The serialised ``ModelProto``.
    """
    size = sum(p.numel() * p.element_size() for p in backbone.parameters())
    if size >= MAX_PROTO_BYTES:
        raise ValueError(
            f"the backbone has {size / 2**30:.1f} GiB of weights; an ONNX export holds at most "
            "2 GiB in one file, so use the torch backend for this model"
        )
    vocab = int(backbone.config.vocab_size)
    input_ids = torch.arange(16).reshape(2, 8) % vocab  # (2, 8)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0  # one padded row, so masking is traced
    axes = {0: "batch", 1: "sequence"}
    module = _HiddenStates(backbone).float().eval()
    with (
        tempfile.TemporaryDirectory(prefix="anglekit-onnx-") as tmp,
        warnings.catch_warnings(),
        _eager_attention(backbone),
    ):
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow
        path = Path(tmp) / ONNX_NAME
        torch.onnx.export(
            module,
            (input_ids, attention_mask),
            str(path),
            input_names=list(INPUTS),
            output_names=[OUTPUT],
            dynamic_axes={name: axes for name in (*INPUTS, OUTPUT)},
            opset_version=OPSET,
            dynamo=False,
        )
        return path.read_bytes()


def _rewrite(model: bytes, tool: Callable[[Path, Path], T]) -> tuple[bytes, T]:
    """Run an onnxruntime tool that reads one ONNX file and writes another.

    The optimiser and the quantiser log each fusion and node removal (dozens of records per
    export) and advise pre-processing, so records below errors are held back while they run;
    failures still raise.

    Returns:
        The rewritten graph and what ``tool(source, target)`` returned.
    """
    with tempfile.TemporaryDirectory(prefix="anglekit-onnx-") as tmp:
        source, target = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        source.write_bytes(model)
        logging.disable(logging.WARNING)
        try:
            result = tool(source, target)
        finally:
            logging.disable(logging.NOTSET)
        return target.read_bytes(), result


def fuse_bert(model: bytes, config: Any) -> bytes | None:
    """onnxruntime's transformer optimiser on a BERT-family graph; ``None`` for other models.

    Embeddings and their layer norm, each attention block (one packed product for query, key
    and value, then attention as one operator) and GELU with its bias become onnxruntime's
    fused operators. The attention mask stays a raw ``(B, T)`` mask, so either padding side
    works. Residual additions keep their own layer norms (see ``DISABLED_FUSIONS``). On
    all-MiniLM-L6-v2 (2,000 STS-B sentences, 2,048-token batches, 2 threads) float32 went
    from 539 to 660 sentences/s with identical embeddings (cosine 1.000000).
    """
    if getattr(config, "model_type", None) not in BERT_FAMILY:
        return None
    _onnxruntime()
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = False
    options.use_raw_attention_mask(True)

    def optimise(source: Path, target: Path) -> dict[str, int]:
        fused = optimize_model(
            str(source),
            model_type="bert",
            num_heads=int(config.num_attention_heads),
            hidden_size=int(config.hidden_size),
            optimization_options=options,
            opt_level=0,  # onnxruntime's own graph fusions run when a session loads it
            use_gpu=False,
        )
        fused.save_model_to_file(str(target))
        return {op: n for op, n in fused.get_fused_operator_statistics().items() if n}

    graph, counts = _rewrite(model, optimise)
    logger.info("onnxruntime fused %s", counts or "nothing")
    return graph


def quantize_int8(model: bytes) -> bytes:
    """Dynamic int8 quantisation of an ONNX graph with onnxruntime's quantiser, and GELU by
    its tanh approximation.

    Only the matrix multiplications with constant weights (and fused attention's packed
    query/key/value product) are quantised: int8 weights with one scale per output channel,
    activations uint8 with a range taken from each batch at run time (so int8 outputs depend
    slightly on which texts share a batch). onnxruntime runs them with VNNI/AMX integer
    kernels; embedding tables stay float32. On all-MiniLM-L6-v2 this measured 81.81 STS-B
    test Spearman against 82.03 in float32 (2,048-token batches); one scale per weight
    tensor was a little faster and lost 0.25-0.4 points.

    In a quantised graph GELU is computed in its tanh form (onnxruntime's ``FastGelu``, which
    takes the same input and bias as the exact ``BiasGelu``): on all-MiniLM-L6-v2 (2,000
    STS-B sentences, 2,048-token budget, 2 cores with AVX-512 VNNI) encoding went from 2,624
    to 2,822 sentences/s (median of 5 pairs of processes), the STS-B test score from 81.70 to
    81.78; the approximation is off by at most 5e-4, far less than the quantisation.
    Float32 graphs keep the exact form, so they encode as torch does.
    """
    _onnxruntime()
    import onnx
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load_from_string(model)
    for node in graph.graph.node:
        if node.op_type == "BiasGelu" and node.domain == MS_DOMAIN:
            node.op_type = "FastGelu"  # same inputs (x, bias)
    model = graph.SerializeToString()

    def quantize(source: Path, target: Path) -> None:
        quantize_dynamic(
            source,
            target,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Attention"],
            # DefaultTensorType: the fused operators' outputs have no inferred type
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT},
        )

    graph, _ = _rewrite(model, quantize)
    return graph


@contextmanager
def torch_on_one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread while onnxruntime runs the backbone.

    After each call, onnxruntime's threads and torch's OpenMP threads both spin for a while
    waiting for more work, so the small torch steps between two onnxruntime calls (padding,
    pooling, copying rows out) fought over the same cores: on all-MiniLM-L6-v2 int8 (2,000
    STS-B sentences, 2,048-token batches, 2 cores) one thread for those steps encoded 2,603
    sentences/s against 2,171 (median of 10 passes each, interleaved). The caller's thread
    count is restored on exit.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def session_options(threads: int | None = None) -> Any:
    """onnxruntime settings for embedding: all graph fusions, one sequential stream.

    Args:
        threads: intra-op threads; default torch's thread count, so both backends get the
            same cores (``OMP_NUM_THREADS`` and ``torch.set_num_threads`` apply to both).
    """
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return options


class OnnxBackbone(nn.Module):
    """A backbone run by onnxruntime, with the ``AutoModel`` interface ``AnglE`` uses.

    ``forward(input_ids=, attention_mask=)`` returns an object with ``last_hidden_state``
    (a float32 CPU tensor); ``config`` is the Hugging Face config; ``save_pretrained`` writes
    the graph beside that config.

    Args:
        model: the serialised ONNX graph.
        config: the backbone's Hugging Face config.
        info: how the graph was made.
        threads: onnxruntime intra-op threads (default: torch's).
    """

    def __init__(self, model: bytes, config: Any, info: OnnxInfo, threads: int | None = None):
        super().__init__()
        ort = _onnxruntime()
        self.model = model
        self.config = config
        self.info = info
        self.session = ort.InferenceSession(
            model,
            sess_options=session_options(threads),
            providers=["CPUExecutionProvider"],
            disabled_optimizers=list(DISABLED_FUSIONS),
        )

    @classmethod
    def from_torch(cls, backbone: nn.Module, quantize: str | Quantization | None = None):
        """Export a torch backbone (and quantise it when asked)."""
        level = None if quantize is None else parse_quantization(quantize)
        plain = export_backbone(backbone)
        fused = fuse_bert(plain, backbone.config)
        model = plain if fused is None else fused
        if level is Quantization.INT8:
            model = quantize_int8(model)
        info = OnnxInfo(quantize=None if level is None else level.value, fused=fused is not None)
        logger.info("exported the backbone to ONNX (%s)", level.value if level else "float32")
        return cls(model, backbone.config, info)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any):
        """``(B, T)`` ids and mask to ``last_hidden_state`` ``(B, T, H)`` float32."""
        from transformers.modeling_outputs import BaseModelOutput

        if kwargs:
            raise TypeError(f"the ONNX backbone takes no {sorted(kwargs)}")
        feeds = {
            "input_ids": input_ids.cpu().numpy(),
            "attention_mask": attention_mask.cpu().numpy(),
        }
        (hidden,) = self.session.run([OUTPUT], feeds)  # (B, T, H)
        return BaseModelOutput(last_hidden_state=torch.from_numpy(hidden))

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """ONNX graphs are for inference only."""
        raise RuntimeError("an ONNX backbone cannot be trained; load the torch model instead")

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> None:
        """Write ``model.onnx``, ``anglekit_onnx.json`` and the Hugging Face ``config.json``."""
        directory = Path(directory)
        (directory / self.info.file).write_bytes(self.model)
        info = {**asdict(self.info), "inputs": list(self.info.inputs)}
        (directory / ONNX_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        self.config.save_pretrained(directory)


def load_onnx_backbone(
    path: str,
    hf_config: Any,
    saved: dict[str, Any] | None,
    *,
    quantize: str | Quantization | None = None,
    trust_remote_code: bool = False,
) -> OnnxBackbone:
    """The ONNX backbone of a model folder: its saved graph, or a fresh export.

    Args:
        path: the model folder (or hub id, for a fresh export).
        hf_config: the backbone's Hugging Face config.
        saved: the folder's ``anglekit_onnx.json`` values, or ``None`` when it has no graph.
        quantize: ``"int8"`` to quantise; a saved float32 graph is quantised on load.
        trust_remote_code: passed to ``AutoModel`` for a fresh export.
    """
    level = None if quantize is None else parse_quantization(quantize)
    if saved is None:
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(
            path, config=hf_config, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
        return OnnxBackbone.from_torch(backbone, level)
    info = OnnxInfo.from_dict(saved, source=f"{path}/{ONNX_INFO_NAME}")
    file = Path(path) / info.file
    if not file.is_file():
        raise FileNotFoundError(f"{path}/{ONNX_INFO_NAME} names {info.file}, which is missing")
    model = file.read_bytes()
    if level is Quantization.INT8 and info.quantize is None:
        model = quantize_int8(model)
        info = OnnxInfo(**{**asdict(info), "quantize": level.value})
    return OnnxBackbone(model, hf_config, info)
