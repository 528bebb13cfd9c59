"""Scoring a reply while it streams: an exponential moving average of a probe's per-token logits.

A reply probe is trained on mean-pooled reply features, but a server has to decide at every token,
before the reply is whole. The running mean of the token logits is the pooled score so far; its
highest value over a stream is dominated by the noise of the first tokens. An exponential moving
average (``e_1 = z_1``, ``e_t = (1 - alpha) e_(t-1) + alpha z_t``, score ``sigmoid(e_t + bias)``) held up
better on every unseen source (docs/policies.md, ``tests/bench/bench_reply_scoring.py``).

A stream fires at its first token above the threshold, so the threshold must be set on the highest
score of each dev stream, not on the pooled dev scores: ``calibrate`` does that and records the
scorer in the probe's manifest (``stream``), which the server reads.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from probes.data import Dataset
from probes.features import token_states
from probes.lm.model import LoadedModel
from probes.metrics import threshold_for_fpr
from probes.probe import LinearProbe, sigmoid

EMA_ALPHA = 0.1


def ema(logits: np.ndarray, alpha: float = EMA_ALPHA) -> np.ndarray:
    """The moving average after each token of ``logits`` (``[tokens]``)."""
    out = np.empty(len(logits), dtype=np.float64)
    for t, z in enumerate(logits):
        out[t] = z if t == 0 else (1 - alpha) * out[t - 1] + alpha * z
    return out


def traces(lm: LoadedModel, probe: LinearProbe, data: Dataset, alpha: float = EMA_ALPHA) -> list[np.ndarray]:
    """Per row of ``data``, the probe's streamed score after each of its text's tokens."""
    weight, bias = probe.folded()
    out: list[np.ndarray] = [np.zeros(0)] * len(data.rows)
    max_tokens = int(probe.manifest.get("max_text_tokens", 256))
    for i, states in token_states(lm, data, probe.layers, max_text_tokens=max_tokens):
        logits = np.einsum("tld,ld->t", states.astype(np.float64), weight)
        out[i] = sigmoid(ema(logits, alpha) + bias)
    return out


def is_reply_data(data: Dataset) -> bool:
    """Rows that are replies to a prompt: what an output-stage probe streams over."""
    return bool(data.rows) and all(row.prompt is not None for row in data.rows)


def calibrate(
    lm: LoadedModel, probe: LinearProbe, dev: Dataset, target_fpr: float, alpha: float = EMA_ALPHA
) -> LinearProbe:
    """``probe`` with a streamed threshold: at most ``target_fpr`` of dev negatives fire at any token."""
    peaks = np.array([t.max() if t.size else 0.0 for t in traces(lm, probe, dev, alpha)])
    labels = np.asarray(dev.labels)
    threshold = threshold_for_fpr(peaks[labels == 0], target_fpr)
    stream = {
        "scorer": "ema",
        "alpha": alpha,
        "threshold": threshold,
        "dev_tpr": float((peaks[labels == 1] > threshold).mean()),
        "dev_fpr": float((peaks[labels == 0] > threshold).mean()),
    }
    return replace(probe, manifest={**probe.manifest, "stream": stream})
