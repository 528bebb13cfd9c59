"""Batched activation extraction: pooled residual-stream features for every row, cached on disk.

Batches are sorted by length and right-padded after a shared prefix: the chat template's system
prompt and role marker are the same for every row, so their KV cache is computed once and reused,
and right padding keeps each row's position ids exactly as they are when it runs alone (features do
not depend on what else is in the batch). The LM head is never run: the base model is enough.

Pooling (the server computes each online):
- ``mean``: mean over the text's own tokens. For a prompt, computed once after prefill; for a reply,
  the server keeps a running mean over the tokens generated so far, so a linear probe's logit is the
  mean of per-token logits.
- ``last``: the text's last token.
- ``tail``: a user text's last template token before the assistant's turn (the text rendered with the
  generation prompt, as the server prefills it): where the model has read the request and is about
  to answer, the position Arditi et al. (2024) read refusal directions at. A request wrapped in a
  long jailbreak template barely moves the mean over the text, but the model's state here still
  reads it (``tests/bench/bench_jailbreak.py``).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from probes.data import Dataset
from probes.lm.hooks import capture
from probes.lm.model import LoadedModel
from probes.lm.render import Encoded, encode_row

POOLINGS = ("mean", "last", "tail")  # what a probe may pool or read (the server computes each online)
_CACHE_FORMAT = 1


def extract(
    lm: LoadedModel,
    dataset: Dataset,
    layers: Sequence[int],
    *,
    pooling: str = "mean",
    max_text_tokens: int = 256,
    batch_tokens: int = 2048,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Pooled features ``[n_rows, n_layers, d_model]`` (float32) for ``layers`` (decoder-layer indices)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    path = None
    if cache_dir is not None:
        key = _cache_key(f"{lm.fingerprint}:{lm.numeric}", dataset.texts_sha256(), layers, pooling, max_text_tokens)
        path = cache_dir / "features" / f"{key}.npy"
        if path.is_file():
            return np.load(path, allow_pickle=False)
    features = np.zeros((len(dataset.rows), len(layers), lm.hidden_size), dtype=np.float32)
    with tqdm(total=len(dataset.rows), desc="extracting", unit="text", disable=not progress) as bar:
        encoded = _encode(lm, dataset, max_text_tokens, generation_prompt=pooling == "tail")
        for batch, rows, hidden, offset in batched_states(lm, encoded, layers, batch_tokens):
            for j, layer in enumerate(layers):
                for k, (i, row) in enumerate(zip(batch, rows, strict=True)):
                    end = len(row.ids) if pooling == "tail" else row.end
                    features[i, j] = pool(hidden[layer][k], row.start - offset, end - offset, pooling).numpy()
            bar.update(len(batch))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, features, allow_pickle=False)
        tmp.replace(path)
    return features


def pool(hidden: torch.Tensor, start: int, end: int, pooling: str) -> torch.Tensor:
    """Pool ``hidden[pos, d_model]`` over the half-open span ``[start, end)`` (``last``, ``tail``: its last)."""
    if pooling == "mean":
        return hidden[start:end].mean(dim=0)
    return hidden[end - 1]


def token_states(
    lm: LoadedModel,
    dataset: Dataset,
    layers: Sequence[int],
    *,
    max_text_tokens: int = 256,
    batch_tokens: int = 2048,
) -> Iterator[tuple[int, np.ndarray]]:
    """Per row, unpooled: ``(row index, [text tokens, n_layers, d_model])`` (float32), batched as ``extract`` does.

    For methods that score tokens rather than a pooled row (``tests/bench/bench_window_pooling.py``);
    the mean over a row's tokens is its ``mean``-pooled feature.
    """
    for batch, rows, hidden, offset in batched_states(lm, _encode(lm, dataset, max_text_tokens), layers, batch_tokens):
        for k, (i, row) in enumerate(zip(batch, rows, strict=True)):
            span = [hidden[layer][k, row.start - offset : row.end - offset] for layer in layers]
            yield i, torch.stack(span, 1).numpy()


def _encode(lm: LoadedModel, dataset: Dataset, max_text_tokens: int, generation_prompt: bool = False) -> list[Encoded]:
    return [
        encode_row(lm.tokenizer, r.text, r.prompt, max_text_tokens=max_text_tokens, generation_prompt=generation_prompt)
        for r in dataset.rows
    ]


def batched_states(
    lm: LoadedModel, encoded: list[Encoded], layers: Sequence[int], batch_tokens: int = 2048
) -> Iterator[tuple[list[int], list[Encoded], dict[int, torch.Tensor], int]]:
    """Per batch of rows of similar length: their indices, encodings, hidden states and shared prefix length.

    ``hidden[layer][k, p]`` is the state of ``rows[k].ids[offset + p]``; positions past a row's ids are padding.
    """
    prefixes: dict[tuple[int, ...], DynamicCache] = {}
    for batch in _batches(encoded, batch_tokens):
        rows = [encoded[i] for i in batch]
        yield batch, rows, *_batch_states(lm, rows, layers, prefixes)


def _batch_states(
    lm: LoadedModel, rows: list[Encoded], layers: Sequence[int], prefixes: dict[tuple[int, ...], DynamicCache]
) -> tuple[dict[int, torch.Tensor], int]:
    """``{layer: [batch, position, d_model]}`` (float32) after the batch's shared prefix, and the prefix's length."""
    shared = _shared_prefix(rows)
    cache = None
    if shared:
        if shared not in prefixes:
            prefixes[shared] = _prefix_cache(lm, shared)
        cache = copy.deepcopy(prefixes[shared])
        cache.batch_repeat_interleave(len(rows))
    offset = len(shared)
    width = max(len(r.ids) for r in rows) - offset
    ids = torch.full((len(rows), width), lm.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), offset + width), dtype=torch.long)
    mask[:, :offset] = 1
    for i, row in enumerate(rows):
        ids[i, : len(row.ids) - offset] = torch.tensor(row.ids[offset:])
        mask[i, offset : len(row.ids)] = 1
    with torch.inference_mode(), capture(lm.model, layers, layer_path=lm.layer_path) as store:
        lm.model.base_model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=cache is not None)
    return {layer: store[layer].float() for layer in layers}, offset


def _shared_prefix(rows: list[Encoded]) -> tuple[int, ...]:
    """Longest common token prefix of the batch that stops before any row's scored span."""
    limit = min(r.start for r in rows)
    first = rows[0].ids
    n = 0
    while n < limit and all(r.ids[n] == first[n] for r in rows):
        n += 1
    return tuple(first[:n])


def _prefix_cache(lm: LoadedModel, prefix: tuple[int, ...]) -> DynamicCache:
    cache = DynamicCache(config=lm.model.config)
    with torch.inference_mode():
        lm.model.base_model(input_ids=torch.tensor([prefix]), cache=cache, use_cache=True)
    return cache


def _batches(encoded: list[Encoded], batch_tokens: int) -> list[list[int]]:
    """Index batches of similar length, each at most ``batch_tokens`` padded tokens (and at least one row)."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if current and len(encoded[index].ids) * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def _cache_key(fingerprint: str, data_hash: str, layers: Sequence[int], pooling: str, max_text_tokens: int) -> str:
    spec = [_CACHE_FORMAT, fingerprint, data_hash, list(layers), pooling, max_text_tokens]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:32]
