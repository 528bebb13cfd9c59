"""Where a model keeps its decoder layers: data (attribute paths), not code per architecture."""

from __future__ import annotations

from torch import nn

# Tried in order; the first path that resolves to a ModuleList wins.
LAYER_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi-3
    "model.language_model.layers",  # Gemma 3, multimodal wrappers
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",  # Pythia, GPT-NeoX
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
)


def decoder_layers(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """The model's decoder layers, from ``path`` (dotted attribute path) or the first known layout that fits."""
    for candidate in (path,) if path else LAYER_PATHS:
        module = _resolve(model, candidate)
        if isinstance(module, nn.ModuleList):
            return module
    if path:
        raise ValueError(f"{path!r} does not name a ModuleList of decoder layers on {type(model).__name__}")
    raise ValueError(
        f"don't know where {type(model).__name__} keeps its decoder layers (tried {', '.join(LAYER_PATHS)}); "
        "pass the dotted path with --layer-path (GUARD_LAYER_PATH), e.g. 'model.layers'"
    )


def normalise_layer(index: int, num_layers: int) -> int:
    """Python-style negative indices count from the last layer; anything out of range is an error."""
    resolved = index + num_layers if index < 0 else index
    if not 0 <= resolved < num_layers:
        raise ValueError(f"layer {index} is out of range for a model with {num_layers} decoder layers")
    return resolved


def _resolve(root: nn.Module, dotted: str) -> object | None:
    node: object = root
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node
