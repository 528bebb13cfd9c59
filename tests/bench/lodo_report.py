"""Output shared by the leave-one-dataset-out method benches: a line per fold, then the means, as a table and JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from probes.eval.lodo import compare_means


def print_fold(row: dict, methods: Sequence[str]) -> None:
    """A fold's held-out source and each method's metrics (those that apply)."""
    shown = {m: {k: v for k, v in row[m].items() if v is not None} for m in methods}
    print(row["heldout"], json.dumps(shown), flush=True)


def finish(results: list[dict], methods: Sequence[str], title: str, report: dict, out: Path) -> None:
    """Print the methods' means over the folds and write ``report`` with the folds and the means to ``out``."""
    means, table = compare_means(results, methods, title)
    print("\n" + table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**report, "folds": results, "means": means}, indent=2) + "\n")
