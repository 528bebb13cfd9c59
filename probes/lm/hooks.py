"""Forward hooks on decoder layers, always removed when the ``with`` block ends.

Vocabulary follows TransformerLens: the site read is ``blocks.{L}.hook_resid_post``, the residual
stream after decoder layer ``L`` (0-based), which equals ``output_hidden_states[L + 1]`` for every
layer but the last (transformers applies the final norm to the last entry of ``hidden_states``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from probes.lm.layers import decoder_layers

HOOK_SITE = "blocks.{layer}.hook_resid_post"

Hook = Callable[[nn.Module, tuple, object], object]


def layer_output(output: object) -> torch.Tensor:
    """The hidden states in a layer's output, whether it returns a tuple (older transformers) or a tensor."""
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


def replace_output(output: object, hidden: torch.Tensor) -> object:
    """``output`` with its hidden states swapped for ``hidden``, keeping the tuple shape if it had one."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def hooks(model: nn.Module, factories: dict[int, Hook], *, layer_path: str | None = None) -> Iterator[None]:
    """Register one forward hook per layer index for the duration of the block."""
    layers = decoder_layers(model, layer_path)
    handles = [layers[index].register_forward_hook(hook) for index, hook in factories.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture(
    model: nn.Module, layers: Sequence[int], *, layer_path: str | None = None
) -> Iterator[dict[int, torch.Tensor]]:
    """Record the listed layers' residual-stream outputs of the last forward pass.

    Yields ``{layer: tensor[batch, pos, d_model]}``, filled in by each forward pass inside the block.
    """
    store: dict[int, torch.Tensor] = {}
    with hooks(model, {layer: _recorder(store, layer) for layer in layers}, layer_path=layer_path):
        yield store


def _recorder(store: dict[int, torch.Tensor], layer: int) -> Hook:
    def hook(module: nn.Module, args: tuple, output: object) -> None:
        store[layer] = layer_output(output).detach()

    return hook


def adding(vector: np.ndarray | torch.Tensor, strength: float, start: int = 0) -> Hook:
    """A hook adding ``strength * vector`` to a layer's output at positions ``start`` on: activation
    steering by transformers' own forward (of one unpadded sequence, or a batch steered everywhere)."""
    vector = torch.as_tensor(vector)

    def hook(module: nn.Module, args: tuple, output: object) -> object:
        hidden = layer_output(output).clone()
        hidden[:, start:] += strength * vector.to(hidden.dtype)
        return replace_output(output, hidden)

    return hook


def projecting(vector: np.ndarray | torch.Tensor, start: int = 0) -> Hook:
    """A hook projecting the unit ``vector`` out of a layer's output at positions ``start`` on:
    ``h <- h - (h . v) v``."""
    unit = torch.as_tensor(vector)

    def hook(module: nn.Module, args: tuple, output: object) -> object:
        hidden = layer_output(output).clone()
        v = unit.to(hidden.dtype)
        hidden[:, start:] -= (hidden[:, start:] @ v)[..., None] * v
        return replace_output(output, hidden)

    return hook
