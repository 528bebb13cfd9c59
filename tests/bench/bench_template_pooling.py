"""Benchmark: reading a prompt at the chat template's tokens after it, leave-one-dataset-out.

The shipped prompt policies pool the user text's own tokens. When the server prefills a prompt it
also runs the rest of the template up to the assistant's turn (``<|im_end|>``, ``<|im_start|>assistant``
and the newlines): at those positions the model has read the whole request and is about to answer
it, which is where refusal directions are usually read (Arditi et al. 2024). This bench extracts, in
one pass over a policy's rows, every layer's

- ``mean``: mean over the text's own tokens (the shipped pooling);
- ``tail_mean``: mean over the template tokens after the text;
- ``tail_last``: the last of them (the state that predicts the reply's first token);

and compares, on the folds of ``guard benchmark-policies`` (``probes.eval.lodo``) with the shipped threshold
rule (at most 1% of dev negatives and 1.5% of dev ordinary traffic flagged), logistic probes on
layers 9, 15 and 21 of each pooling, on the best single layer of a dev sweep, and on the text mean and
the template tail concatenated. Prints per held-out source and the mean AUROC, TPR at threshold and
FPR on held-out ordinary traffic per method, side by side, and writes JSON. The extracted states are
cached under the guard cache directory (``--refresh`` recomputes them).

    .venv/bin/python tests/bench/bench_template_pooling.py [--policy harmful_request]
        [--out tests/bench/results/template_pooling.json]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
from lodo_report import finish, print_fold
from tqdm.auto import tqdm

from guard.settings import Settings
from probes.data import Dataset
from probes.eval.defaults import PRESET_CONFIG, recipe_splits
from probes.eval.lodo import Fold, folds, scored_fold
from probes.eval.presets import PRESET_LAYERS
from probes.features import row_states
from probes.lm.model import LoadedModel, load_model
from probes.lm.render import encode_row
from probes.probe import sigmoid
from probes.train import _best, _dev_quality, fit_linear

POOLINGS = ("mean", "tail_mean", "tail_last")
METHODS = (
    "mean",
    "tail_mean",
    "tail_last",
    "tail_last_best_layer",
    "mean+tail_mean",
    "mean+tail_last",
)


def template_states(lm: LoadedModel, dataset: Dataset, cache_dir: Path, refresh: bool) -> dict[str, np.ndarray]:
    """``{pooling: [rows, layers, d_model]}`` for every decoder layer, cached on disk."""
    key = hashlib.sha256(f"{lm.fingerprint}:{lm.numeric}:{dataset.texts_sha256()}".encode()).hexdigest()[:24]
    path = cache_dir / "bench" / f"template_pooling_{key}.npz"
    if path.is_file() and not refresh:
        with np.load(path, allow_pickle=False) as stored:
            return {p: stored[p] for p in POOLINGS}
    limit = PRESET_CONFIG.max_text_tokens
    encoded = [encode_row(lm.tokenizer, r.text, max_text_tokens=limit, generation_prompt=True) for r in dataset.rows]
    layers = list(range(lm.num_layers))
    out = {p: np.zeros((len(encoded), len(layers), lm.hidden_size), np.float32) for p in POOLINGS}
    with tqdm(total=len(encoded), desc="extracting", unit="text") as bar:
        for i, row, hidden, split in row_states(lm, encoded, layers):
            states = np.stack([hidden[layer].numpy() for layer in layers], 1)  # [position, layer, d]
            start, end = row.start - split, row.end - split
            out["mean"][i] = states[start:end].mean(0)
            out["tail_mean"][i] = states[end:].mean(0)
            out["tail_last"][i] = states[-1]
            bar.update(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def fitted_logits(fold: Fold, x_train: np.ndarray, x_dev: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, ...]:
    """Logistic regression as ``train_probe`` fits it on given layers (C chosen on dev): dev and test logits."""
    y_train, y_dev = np.asarray(fold.train.labels), np.asarray(fold.dev.labels)
    fits = {c: fit_linear(x_train, y_train, c, PRESET_CONFIG.seed) for c in PRESET_CONFIG.cs}
    best = fits[_best({c: _dev_quality(f.logits(x_dev), y_dev) for c, f in fits.items()})]
    return best.logits(x_dev), best.logits(x_test)


def best_layer(fold: Fold, x_train: np.ndarray, x_dev: np.ndarray) -> int:
    """The layer whose own probe (C = ``sweep_c``) scores best on dev, as ``train_probe``'s sweep picks it."""
    y_train, y_dev = np.asarray(fold.train.labels), np.asarray(fold.dev.labels)
    quality = {}
    for j in range(x_train.shape[1]):
        fit = fit_linear(x_train[:, [j]], y_train, PRESET_CONFIG.sweep_c, PRESET_CONFIG.seed)
        quality[j] = _dev_quality(fit.logits(x_dev[:, [j]]), y_dev)
    return int(_best(quality))


def method_features(states: dict[str, np.ndarray], method: str, fold: Fold, rows) -> np.ndarray:
    """Features ``[n, layers, d]`` of a method for every row (indices ``rows``)."""
    shipped = list(PRESET_LAYERS)
    if method == "tail_last_best_layer":
        layer = best_layer(fold, states["tail_last"][rows(fold.train)], states["tail_last"][rows(fold.dev)])
        print(f"  {fold.heldout}: tail_last best layer {layer}", flush=True)
        return states["tail_last"][:, [layer]]
    return np.concatenate([states[p][:, shipped] for p in method.split("+")], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="harmful_request")
    parser.add_argument("--refresh", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/template_pooling.json"))
    args = parser.parse_args()
    settings = Settings()
    lm = load_model(settings.model, cache_dir=settings.cache_dir, dtype=settings.dtype)
    train, dev, _ = recipe_splits(args.policy, settings.data_dir)
    dataset = Dataset(train.rows + dev.rows)
    if any(r.prompt is not None for r in dataset.rows):
        raise SystemExit(f"{args.policy} scores replies; the template tail after a prompt applies to prompts only")
    states = template_states(lm, dataset, settings.cache_dir, args.refresh)
    index = {row.key: i for i, row in enumerate(dataset.rows)}
    results = []
    for fold in folds(dataset):

        def rows(data: Dataset) -> list[int]:
            return [index[r.key] for r in data.rows]

        scores = {}
        for method in METHODS:
            x = method_features(states, method, fold, rows)
            dev_logits, test_logits = fitted_logits(fold, x[rows(fold.train)], x[rows(fold.dev)], x[rows(fold.test)])
            scores[method] = sigmoid(dev_logits), sigmoid(test_logits)
        row = scored_fold(fold, scores, PRESET_CONFIG)
        results.append(row)
        print_fold(row, METHODS)
    finish(
        results, METHODS, f"pooling ({args.policy})", {"policy": args.policy, "layers": list(PRESET_LAYERS)}, args.out
    )


if __name__ == "__main__":
    main()
