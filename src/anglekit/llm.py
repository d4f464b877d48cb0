"""Decoder LLM backbones: LoRA adapters, k-bit loading, bi-directional attention, GGUF.

Everything here needs the ``llm`` extra (``pip install "anglekit[llm]"``) only when used:
peft and bitsandbytes are imported inside the functions that need them, so a bare
``import anglekit`` and encoder models never load them.

A LoRA model's backbone is a :class:`peft.PeftModel` around the transformer body (no LM
head). Saving it writes the adapter only (``adapter_config.json``, ``adapter_model.safetensors``)
beside the anglekit config, which names the backbone it applies to (``adapter_base``, plus
``gguf_file`` when that backbone is a GGUF file), so ``AnglE.from_pretrained(folder)``
rebuilds the model with no arguments. :func:`merge_lora` folds the adapter into the weights
instead, for a plain checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "LoraSettings",
    "apply_lora",
    "backbone_load_options",
    "enable_bidirectional",
    "is_kbit",
    "is_lora",
    "kbit_config",
    "load_adapter",
    "load_adapter_weights",
    "lora_settings",
    "merge_lora",
    "prepare_kbit_training",
    "prepare_lora_training",
]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
KBITS = (4, 8)
# bitsandbytes logs this on every 8-bit matrix product whose input is not float16.
INT8_CAST_LOGGER = "bitsandbytes.autograd._functions"
INT8_CAST_MESSAGE = "MatMul8bitLt: inputs will be cast"
LLM_EXTRA = 'pip install "anglekit[llm]"'


def _import_peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"LoRA adapters need peft: {LLM_EXTRA}") from err
    return peft


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters.

    Attributes:
        r: rank of the update ``B A`` (``A: r x in``, ``B: out x r``).
        alpha: the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter's input.
        target_modules: module names to adapt; ``None`` adapts every linear layer (the
            embedder has no LM head, so the head is never adapted).
    """

    r: int = 32
    alpha: float = 32.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @classmethod
    def parse_targets(cls, value: str | Sequence[str] | None) -> tuple[str, ...] | None:
        """``"q_proj,v_proj"`` or a list to a tuple of names; ``None``/``""`` for all linear."""
        if value is None:
            return None
        names = value.split(",") if isinstance(value, str) else list(value)
        names = [n.strip() for n in names if n.strip()]
        return tuple(names) or None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values for the anglekit config."""
        targets = None if self.target_modules is None else list(self.target_modules)
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": targets,
        }


def is_lora(backbone: nn.Module) -> bool:
    """Whether the backbone carries a peft adapter (without importing peft)."""
    return hasattr(backbone, "peft_config") and hasattr(backbone, "get_base_model")


def apply_lora(backbone: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap a transformer body in a fresh LoRA adapter; only the adapter is trainable.

    Args:
        backbone: the model body (``AutoModel``), possibly k-bit quantised.
        settings: rank, alpha, dropout and target modules.

    Returns:
        The :class:`peft.PeftModel`.
    """
    peft = _import_peft()
    if is_lora(backbone):
        raise ValueError("the backbone already has a LoRA adapter")
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules or ()) or "all-linear",
        bias="none",
    )
    model = peft.get_peft_model(backbone, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA r=%d: %d of %d parameters trainable", settings.r, trainable, total)
    return model


def _body_prefix(backbone: nn.Module) -> str:
    """``model.`` for Llama-style models, ``transformer.`` for GPT-2: the name of the body
    inside ``*ForCausalLM``, which adapters trained on the causal LM put in their keys."""
    return f"{getattr(backbone, 'base_model_prefix', 'model')}."


def _remap_causal_lm_keys(state: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """Adapter keys saved from a ``*ForCausalLM`` (``base_model.model.model.layers...``) to
    the body the embedder holds (``base_model.model.layers...``); LM-head keys are dropped."""
    root = "base_model.model."
    out: dict[str, torch.Tensor] = {}
    dropped = []
    for key, value in state.items():
        if key.startswith(root + prefix):
            out[root + key[len(root + prefix) :]] = value
        elif key.startswith(root + "lm_head"):
            dropped.append(key)
        else:
            out[key] = value
    if dropped:
        logger.warning("ignoring %d adapter tensors of the LM head (%s)", len(dropped), dropped[0])
    return out


def load_adapter_weights(backbone: nn.Module, folder: str | Path) -> None:
    """Load adapter weights (``adapter_model.safetensors`` of ``folder``) into a LoRA backbone.

    Raises:
        RuntimeError: when the file lacks any of the backbone's adapter tensors.
    """
    _import_peft()  # the clear error when the extra is missing
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    state = load_peft_weights(str(folder), device="cpu")
    state = _remap_causal_lm_keys(state, _body_prefix(backbone.get_base_model()))
    result = set_peft_model_state_dict(backbone, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"adapter {folder} does not match the backbone: missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}"
        )


def load_adapter(backbone: nn.Module, adapter: str, *, trainable: bool = False) -> nn.Module:
    """Wrap ``backbone`` in the LoRA adapter saved at ``adapter`` (a folder or hub id).

    Adapters trained on the causal LM (as most published ones are) load onto the body too.

    Returns:
        The :class:`peft.PeftModel`, frozen unless ``trainable``.
    """
    peft = _import_peft()
    config = peft.PeftConfig.from_pretrained(adapter)
    if config.peft_type != peft.PeftType.LORA:
        raise ValueError(f"{adapter}: only LoRA adapters are supported, got {config.peft_type}")
    config.task_type = None  # a plain PeftModel: the body has no LM head
    config.inference_mode = not trainable
    targets = config.target_modules
    if isinstance(targets, list | set) and "lm_head" in targets:
        config.target_modules = sorted(set(targets) - {"lm_head"})
    model = peft.get_peft_model(backbone, config)
    folder = adapter if Path(adapter).is_dir() else _download_adapter(adapter)
    load_adapter_weights(model, folder)
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _download_adapter(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=[ADAPTER_CONFIG, "adapter_model.*"])


def lora_settings(backbone: nn.Module) -> LoraSettings:
    """The LoRA settings of a backbone's (single) adapter."""
    config = next(iter(backbone.peft_config.values()))
    targets = config.target_modules
    if isinstance(targets, str):  # "all-linear" or a regex
        targets = None if targets == "all-linear" else (targets,)
    elif targets is not None:
        targets = tuple(sorted(targets))
    return LoraSettings(
        r=int(config.r),
        alpha=float(config.lora_alpha),
        dropout=float(config.lora_dropout),
        target_modules=targets,
    )


def is_kbit(backbone: nn.Module) -> bool:
    """Whether the (base) weights were quantised while loading (bitsandbytes)."""
    base = backbone.get_base_model() if is_lora(backbone) else backbone
    return getattr(base, "hf_quantizer", None) is not None


def merge_lora(backbone: nn.Module) -> nn.Module:
    """Fold the adapter into the weights: ``W + (alpha / r) B A``; returns the plain body."""
    if not is_lora(backbone):
        raise ValueError("the backbone has no LoRA adapter to merge")
    if is_kbit(backbone):
        raise ValueError("a k-bit backbone cannot be merged; load it in bf16/fp32 to merge")
    return backbone.merge_and_unload()


def kbit_config(bits: int, compute_dtype: torch.dtype) -> Any:
    """A bitsandbytes quantisation config: 4-bit NF4 with double quantisation, or 8-bit.

    Raises:
        ValueError: ``bits`` is not 4 or 8.
        RuntimeError: there is no CUDA device (bitsandbytes k-bit kernels need one); raised
            before bitsandbytes is imported.
    """
    if bits not in KBITS:
        raise ValueError(f"load_kbit must be 4 or 8, got {bits!r}")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"load_kbit={bits} needs a CUDA GPU: bitsandbytes quantises weights with CUDA "
            "kernels and none is available here. Load in bfloat16 or float32 instead."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(f"k-bit loading needs bitsandbytes: {LLM_EXTRA}") from err
    from transformers import BitsAndBytesConfig

    if bits == 8:
        show_int8_cast_warning_once()
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


class _FirstOnly(logging.Filter):
    """Passes the first record whose message starts with ``prefix`` and drops its repeats."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        first, self.seen = not self.seen, True
        return first


def show_int8_cast_warning_once() -> None:
    """Keep bitsandbytes' "inputs will be cast to float16" warning to its first time.

    8-bit layers compute in float16 whatever the model's dtype, and bitsandbytes says so on
    every matrix product: hundreds of identical lines per batch of a bfloat16 model.
    """
    logger = logging.getLogger(INT8_CAST_LOGGER)
    if not any(isinstance(f, _FirstOnly) for f in logger.filters):
        logger.addFilter(_FirstOnly(INT8_CAST_MESSAGE))


def prepare_kbit_training(backbone: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    """QLoRA preparation of a k-bit body before its adapter is added (peft's recipe:
    frozen base, fp32 norms, input gradients for checkpointing)."""
    peft = _import_peft()
    return peft.prepare_model_for_kbit_training(
        backbone, use_gradient_checkpointing=gradient_checkpointing
    )


def _decoder_layers(body: nn.Module) -> nn.ModuleList:
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(
        hasattr(getattr(layer, "self_attn", None), "is_causal") for layer in layers
    ):
        raise ValueError(
            f"bi-directional attention supports Llama, Mistral and Qwen2-style models "
            f"(decoder layers with self_attn.is_causal); {type(body).__name__} is not one"
        )
    return layers


def enable_bidirectional(body: nn.Module, from_layer: int) -> None:
    """Let layers ``from_layer`` and later attend to every real token (BiLLM), in place.

    The body builds one causal mask for all its layers. A forward pre-hook on the body keeps
    the 2-D padding mask of each call; a pre-hook on each chosen layer swaps the causal mask
    for a padding-only one (``masking_utils.create_bidirectional_mask``, for whatever
    attention implementation the model uses), and the layer's attention stops being causal
    (``is_causal = False``) for the case where no mask is materialised.

    Args:
        body: the transformer body (``LlamaModel``, ``MistralModel``, ``Qwen2Model``).
        from_layer: index of the first bi-directional layer; 0 makes all of them so.
    """
    from transformers.masking_utils import create_bidirectional_mask

    layers = _decoder_layers(body)
    if not isinstance(from_layer, int) or not 0 <= from_layer < len(layers):
        raise ValueError(
            f"bidirectional_from must be a layer index in 0..{len(layers) - 1}, got {from_layer!r}"
        )
    if getattr(body, "_anglekit_bidirectional", None) is not None:
        raise ValueError("bi-directional attention is already enabled on this model")
    state: dict[str, Any] = {}

    def keep_padding_mask(module, args, kwargs):
        state["mask"] = kwargs.get("attention_mask")
        state["built"] = None

    def padding_only_mask(module, args, kwargs):
        if state["built"] is None:
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
            state["built"] = (create_bidirectional_mask(body.config, hidden, state["mask"]),)
        kwargs["attention_mask"] = state["built"][0]
        return args, kwargs

    body.register_forward_pre_hook(keep_padding_mask, with_kwargs=True)
    for layer in layers[from_layer:]:
        layer.self_attn.is_causal = False
        layer.register_forward_pre_hook(padding_only_mask, with_kwargs=True)
    body._anglekit_bidirectional = from_layer


def backbone_load_options(
    gguf_file: str | None, load_kbit: int | None, dtype: torch.dtype, device: str
) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments of a GGUF or k-bit backbone (empty for neither).

    A k-bit model is placed on its device while loading (``device_map``); it cannot be moved.
    """
    options: dict[str, Any] = {}
    if gguf_file is not None:
        options["gguf_file"] = gguf_file
    if load_kbit is not None:
        if gguf_file is not None:
            raise ValueError("load_kbit and gguf_file cannot be combined; choose one")
        options["quantization_config"] = kbit_config(load_kbit, dtype)
        options["device_map"] = {"": device}
    return options


def prepare_lora_training(model: Any, settings: LoraSettings, gradient_checkpointing: bool) -> None:
    """Make an :class:`~anglekit.model.AnglE` train a LoRA adapter, in place.

    A backbone that already has an adapter (loaded from a LoRA save) keeps training it; any
    other gets a fresh one, after QLoRA preparation when its weights are k-bit. Only the
    adapter's parameters require grads, so only they reach the optimizer.
    """
    backbone = model.backbone
    if is_lora(backbone):
        for name, p in backbone.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        if is_kbit(backbone):
            backbone = prepare_kbit_training(backbone, gradient_checkpointing)
        backbone = apply_lora(backbone, settings)
    model.backbone = backbone
