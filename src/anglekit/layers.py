"""Access to a backbone's stack of transformer layers: per-layer outputs and truncation.

Hugging Face models keep their transformer layers in one ``nn.ModuleList`` whose name
depends on the architecture: ``encoder.layer`` (BERT, RoBERTa, MiniLM), ``layers`` (Llama,
Mistral, Qwen2, Gemma), ``h`` (GPT-2, Falcon, BLOOM), ``decoder.layers`` (OPT), ``block``
(T5 encoders). :func:`layer_stack` finds it generically: the ``nn.ModuleList`` with as many
entries as the config's ``num_hidden_layers``, the shallowest such list if several match.

"Layer ``l``" means the output of the ``l``-th transformer layer, ``l = 1 .. L``. The
embedding output (``hidden_states[0]`` of ``output_hidden_states=True``) is not a layer.
Decoders usually apply a final norm after their last layer (``norm`` in Llama, ``ln_f`` in
GPT-2); a backbone truncated to ``l`` layers applies it to layer ``l``'s output, so
:func:`layer_outputs` does the same: its ``l``-th entry is exactly what the backbone cut to
``l`` layers returns as ``last_hidden_state``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["final_norm", "layer_outputs", "layer_stack", "num_layers", "truncate_backbone"]

# Modules applied to the last layer's output before ``last_hidden_state``, by name, as
# siblings of the layer list (Llama/Mistral/Qwen2/Gemma, GPT-2/Falcon, OPT/GPT-NeoX, Phi).
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


def num_layers(backbone: nn.Module) -> int:
    """The number of transformer layers the backbone's config declares."""
    count = getattr(backbone.config, "num_hidden_layers", None)
    if not isinstance(count, int) or count < 1:
        raise ValueError(
            f"{type(backbone).__name__}'s config has no num_hidden_layers; cannot find its layers"
        )
    return count


def layer_stack(backbone: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted name and the ``nn.ModuleList`` of the backbone's transformer layers.

    Raises:
        ValueError: If no ``nn.ModuleList`` has ``num_hidden_layers`` entries.
    """
    count = num_layers(backbone)
    found = [
        (name, module)
        for name, module in backbone.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count
    ]
    if not found:
        raise ValueError(
            f"{type(backbone).__name__} has no module list of its {count} layers; "
            "layer truncation supports models that keep their layers in one nn.ModuleList"
        )
    return min(found, key=lambda item: item[0].count("."))


def final_norm(backbone: nn.Module) -> nn.Module | None:
    """The norm applied after the last layer (a sibling of the layer list), if any."""
    name, _ = layer_stack(backbone)
    parent = backbone.get_submodule(name.rpartition(".")[0])
    for attr in FINAL_NORM_NAMES:
        module = getattr(parent, attr, None)
        if isinstance(module, nn.Module):
            return module
    return None


def layer_outputs(
    backbone: nn.Module, hidden_states: tuple[torch.Tensor, ...], last: torch.Tensor
) -> torch.Tensor:
    """Stack the outputs of layers ``1 .. L`` as a truncated backbone would return them.

    Args:
        backbone: the model that produced ``hidden_states``.
        hidden_states: its ``output_hidden_states=True`` tuple of ``L + 1`` ``(B, T, H)``
            tensors: the embedding output, then layers ``1 .. L``.
        last: its ``(B, T, H)`` ``last_hidden_state``, taken as layer ``L``'s output.

    Returns:
        ``(L, B, T, H)``: entry ``l - 1`` is layer ``l``'s output, with the final norm
        applied to the shallower layers too.
    """
    count = num_layers(backbone)
    if len(hidden_states) != count + 1:
        raise ValueError(f"expected {count + 1} hidden states, got {len(hidden_states)}")
    norm = final_norm(backbone)
    inner = hidden_states[1:-1]
    if norm is not None:
        inner = tuple(norm(h) for h in inner)
    return torch.stack([*inner, last])  # (L, B, T, H)


def truncate_backbone(backbone: nn.Module, layers: int) -> None:
    """Keep only the first ``layers`` transformer layers, in place, and update the config.

    The config's ``num_hidden_layers`` (and per-layer lists such as ``layer_types``) are cut
    to match, so ``save_pretrained`` writes a smaller model that reloads as such.

    Raises:
        ValueError: If ``layers`` is not in ``1 .. num_hidden_layers``.
    """
    count = num_layers(backbone)
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= count:
        raise ValueError(f"layers must be an integer in 1..{count}, got {layers!r}")
    if layers == count:
        return
    name, stack = layer_stack(backbone)
    parent_name, _, attr = name.rpartition(".")
    setattr(backbone.get_submodule(parent_name), attr, stack[:layers])
    config = backbone.config
    config.num_hidden_layers = layers
    for key, value in list(vars(config).items()):
        if key.endswith("layer_types") and isinstance(value, list) and len(value) == count:
            setattr(config, key, value[:layers])
