"""Tensor handles for Python objects that compiled code reaches through an operator.

``torch.compile`` cannot trace some objects (torch's packed int8 weights, a pass's Python callbacks),
so an operator that needs one takes a handle instead: a 0-d tensor, a graph input like any other, so
one compiled graph serves every module holding one. The registry holds its objects weakly: an entry
leaves with its object.
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
