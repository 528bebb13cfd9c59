"""An HTML report of an evaluation: metrics table (probe vs baselines), ROC, precision-recall, layer sweep."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from sklearn.metrics import precision_recall_curve, roc_curve

from probes.eval.evaluate import Evaluation
from probes.probe import LinearProbe

_COLUMNS = ("auroc", "auprc", "f1", "tpr_at_threshold", "fpr_at_threshold", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "n")


def write_report(directory: Path, probe: LinearProbe, evaluation: Evaluation, labels: list[int], title: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    curves = {"probe": evaluation.probe.scores, **{k: v.scores for k, v in evaluation.baselines.items()}}
    images = []
    if min(labels) != max(labels):
        images += [
            _curve_png(directory / "roc.png", labels, curves, "roc"),
            _curve_png(directory / "pr.png", labels, curves, "pr"),
        ]
    sweep = probe.manifest.get("layer_sweep_dev_auroc") or {}
    if sweep:
        images.append(_layer_png(directory / "layers.png", {int(k): v for k, v in sweep.items()}, probe.layers))
    rows = {"probe": evaluation.probe.metrics, **{k: v.metrics for k, v in evaluation.baselines.items()}}
    page = _page(title, probe, rows, [p.name for p in images])
    path = directory / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _curve_png(path: Path, labels: list[int], curves: dict, kind: str) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, scores in curves.items():
        if kind == "roc":
            x, y, _ = roc_curve(labels, scores)
        else:
            y, x, _ = precision_recall_curve(labels, scores)
        ax.plot(x, y, label=name)
    ax.set_xlabel("false-positive rate" if kind == "roc" else "recall")
    ax.set_ylabel("true-positive rate" if kind == "roc" else "precision")
    ax.set_title("ROC" if kind == "roc" else "Precision-recall")
    ax.legend(loc="lower right" if kind == "roc" else "lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _layer_png(path: Path, sweep: dict[int, float], chosen: tuple[int, ...]) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    layers = sorted(sweep)
    ax.plot(layers, [sweep[k] for k in layers], marker="o")
    for layer in chosen:
        ax.axvline(layer, color="grey", linestyle="--")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("dev AUROC")
    ax.set_title("Layer sweep (dashed: chosen)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def _page(title: str, probe: LinearProbe, rows: dict[str, dict], images: list[str]) -> str:
    head = "".join(f"<th>{c}</th>" for c in _COLUMNS)
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>{''.join(f'<td>{_fmt(m.get(c))}</td>' for c in _COLUMNS)}</tr>"
        for name, m in rows.items()
    )
    figures = "".join(f'<img src="{html.escape(i)}" alt="{html.escape(i)}">' for i in images)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;text-align:right}}
td:first-child{{text-align:left}}table{{border-collapse:collapse}}tr:nth-child(even){{background:#f3f3f3}}
img{{margin:1em 1em 0 0}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>probe <b>{html.escape(probe.name)}</b> version {html.escape(probe.version)}, layers {list(probe.layers)},
pooling {html.escape(probe.pooling)}, threshold {probe.threshold:.4f}
(target FPR {probe.manifest.get("target_fpr")})</p>
<table><tr><th></th>{head}</tr>{body}</table>
<div>{figures}</div></body></html>
"""
