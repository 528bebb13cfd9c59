"""Batched activation extraction: pooled residual-stream features for every row, cached on disk.

Every row goes through the model the way the server prefills a prompt (``row_states``): the chat
template's system prompt and role marker, the same for every row, are computed once and reused, and
the rest goes through the model's step in the server's chunks, several rows packed in one pass. So a
row's features do not depend on what else is in its batch, and on int8 a prompt's features are bitwise
the states the server scores it on.

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

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from probes.data import Dataset
from probes.lm.model import LoadedModel
from probes.lm.prefix import PrefixCache, chunk_end, split_at
from probes.lm.render import Encoded, encode_row
from probes.lm.step import Segment

POOLINGS = ("mean", "last", "tail")  # what a probe may pool or read (the server computes each online)
_CACHE_FORMAT = 2


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
        encoded = _encode(lm, dataset, max_text_tokens, tail=pooling == "tail")
        for i, row, hidden, split in row_states(lm, encoded, layers, batch_tokens):
            end = len(row.ids) if pooling == "tail" else row.end
            for j, layer in enumerate(layers):
                features[i, j] = pool(hidden[layer], row.start - split, end - split, pooling).numpy()
            bar.update(1)
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
    for i, row, hidden, split in row_states(lm, _encode(lm, dataset, max_text_tokens), layers, batch_tokens):
        yield i, torch.stack([hidden[layer][row.start - split : row.end - split] for layer in layers], 1).numpy()


def _encode(lm: LoadedModel, dataset: Dataset, max_text_tokens: int, tail: bool = False) -> list[Encoded]:
    """User texts rendered with the generation prompt, as the server prefills them (the text's own states do not
    depend on it, but where the chunks end does, and int8 rounds by chunk); ``tail``: every row (user texts only)."""
    return [
        encode_row(
            lm.tokenizer, r.text, r.prompt, max_text_tokens=max_text_tokens, generation_prompt=tail or r.prompt is None
        )
        for r in dataset.rows
    ]


def row_states(
    lm: LoadedModel, encoded: list[Encoded], layers: Sequence[int], batch_tokens: int = 2048
) -> Iterator[tuple[int, Encoded, dict[int, torch.Tensor], int]]:
    """Per row, in order: its index, encoding, hidden states ``{layer: [len(ids) - split, d_model]}`` (float32)
    of ``ids[split:]``, and ``split``.

    Each row goes through the model as the server prefills a prompt: its prefix up to ``split`` looked up
    (computed once), the rest in chunks (``probes.lm.prefix``) through the model's step, several rows'
    chunks packed in one pass of at most ``batch_tokens`` tokens.
    """
    step = lm.step()
    prefixes = PrefixCache(step, lm.model.config)
    template = _template_prefix(lm)
    splits = [_split(row, template) for row in encoded]
    for batch in _batches(encoded, splits, batch_tokens):
        segments = []
        for index in batch:
            row, start = encoded[index], splits[index]
            cache = prefixes.segment(row.ids, start).cache
            while start < len(row.ids):
                stop = chunk_end(len(row.ids), start, splits[index])
                segments.append(Segment(row.ids[start:stop], cache))
                start = stop
        kept = _Kept(layers)
        with torch.inference_mode():
            step.prefill(segments, kept)
        hidden = {layer: kept.states(layer) for layer in layers}
        offset = 0
        for index in batch:
            n = len(encoded[index].ids) - splits[index]
            yield index, encoded[index], {layer: hidden[layer][offset : offset + n] for layer in layers}, splits[index]
            offset += n


class _Kept:
    """A prefill's layer callback that keeps the layers asked for (one token a row) and changes nothing."""

    def __init__(self, layers: Sequence[int]) -> None:
        self.parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if layer in self.parts:
            self.parts[layer].append(hidden[:, 0].float())
        return hidden

    def states(self, layer: int) -> torch.Tensor:
        return torch.cat(self.parts[layer])


def _template_prefix(lm: LoadedModel) -> tuple[int, ...]:
    """The chat template's tokens before a user text: every row's prefix, a reply's too."""
    probe = encode_row(lm.tokenizer, "Hello.")
    return probe.ids[: probe.start]


def _split(row: Encoded, template: tuple[int, ...]) -> int:
    """After the template's tokens before the user text, which every row shares: where the server splits a
    user text (``probes.lm.prefix.split_at``), and a reply's prompt."""
    shared = 0
    while shared < min(len(template), row.start) and row.ids[shared] == template[shared]:
        shared += 1
    return split_at(shared)


def _batches(encoded: list[Encoded], splits: list[int], batch_tokens: int) -> list[list[int]]:
    """Consecutive rows whose tokens after their split come to at most ``batch_tokens`` (one row at least)."""
    batches: list[list[int]] = [[]]
    tokens = 0
    for index, row in enumerate(encoded):
        n = len(row.ids) - splits[index]
        if batches[-1] and tokens + n > batch_tokens:
            batches.append([])
            tokens = 0
        batches[-1].append(index)
        tokens += n
    return [batch for batch in batches if batch]


def _cache_key(fingerprint: str, data_hash: str, layers: Sequence[int], pooling: str, max_text_tokens: int) -> str:
    spec = [_CACHE_FORMAT, fingerprint, data_hash, list(layers), pooling, max_text_tokens]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:32]
