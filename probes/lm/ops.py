"""The ``guard::`` torch operators, through which compiled code calls back into Python, and the handles they take.

``torch.compile`` cannot trace some objects (torch's packed int8 weights, a pass's Python callbacks),
so an operator that needs one takes a handle instead: a 0-d tensor, a graph input like any other, so
one compiled graph serves every module holding one. The registry holds its objects weakly: an entry
leaves with its object.

- ``guard::attend(query, key, value, handle, layer)``: the current pass's attention, which also extends
  the cache (``probes.lm.step``); ``handle`` stands for an object whose ``callbacks`` are ``(attend, on_layer)``.
- ``guard::layer_out(hidden, handle, layer)``: a layer's output handed to the pass's ``on_layer``.
- ``guard::int8_linear(x, handle, out_features)``: torch's int8 product (``probes.lm.quantize``);
  ``handle`` stands for a ``probes.lm.quantize.PackedInt8``.

Their arguments may be buffers the compiled code reuses once it has read them, so what outlives a call
is a copy: the cache's new keys and values and the hidden state the callback keeps; so is what they
return (contiguous, as declared).
"""

from __future__ import annotations

import itertools
import weakref

import torch

_OBJECTS: weakref.WeakValueDictionary[int, object] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def handle(obj: object) -> torch.Tensor:
    """A new handle for ``obj`` (kept as a buffer by its holder)."""
    key = next(_KEYS)
    _OBJECTS[key] = obj
    return torch.tensor(key)


def resolve(key: torch.Tensor) -> object:
    """The object ``key`` stands for (``KeyError`` once it is gone)."""
    return _OBJECTS[int(key)]


_LIBRARY = torch.library.Library("guard", "DEF")
_LIBRARY.define("attend(Tensor query, Tensor key, Tensor value, Tensor handle, int layer) -> Tensor")
_LIBRARY.define("layer_out(Tensor hidden, Tensor handle, int layer) -> Tensor")
_LIBRARY.define("int8_linear(Tensor x, Tensor handle, int out_features) -> Tensor")


def _attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, handle: torch.Tensor, layer: int
) -> torch.Tensor:
    attend, _ = resolve(handle).callbacks
    return _copy(attend(layer, query, key, value))


def _layer_out(hidden: torch.Tensor, handle: torch.Tensor, layer: int) -> torch.Tensor:
    _, on_layer = resolve(handle).callbacks
    return _copy(hidden if on_layer is None else on_layer(layer, _copy(hidden)))


def _int8_linear(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    packed = resolve(handle)
    return torch.ops.quantized.linear_dynamic(x, packed.packed, packed.reduce_range)


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone(memory_format=torch.contiguous_format)


_LIBRARY.impl("attend", _attend, "CPU")
_LIBRARY.impl("layer_out", _layer_out, "CPU")
_LIBRARY.impl("int8_linear", _int8_linear, "CPU")
torch.library.register_fake("guard::attend", lambda query, *_: query.new_empty(query.shape), lib=_LIBRARY)
torch.library.register_fake("guard::layer_out", lambda hidden, *_: hidden.new_empty(hidden.shape), lib=_LIBRARY)
torch.library.register_fake(
    "guard::int8_linear", lambda x, handle, out_features: x.new_empty((x.shape[0], out_features)), lib=_LIBRARY
)
