"""Labeled datasets: reading JSONL/CSV, validating every row, de-duplicating, and a deterministic split.

A row is a user text (``prompt`` absent) or an assistant reply (``text``) to ``prompt``. Labels are
1 (violation) and 0 (acceptable). Bad rows raise :class:`DatasetError` naming file and line; the only
rows ever dropped are exact duplicates, which are counted and reported.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class DatasetError(ValueError):
    """A dataset file or row that cannot be used, with the place to fix it in the message."""


def default_data_dir() -> Path:
    """``GUARD_DATA_DIR``, else ``../shared/data`` next to the working directory."""
    return Path(os.environ.get("GUARD_DATA_DIR", Path.cwd().parent / "shared" / "data"))


@dataclass(frozen=True)
class Row:
    text: str
    label: int
    prompt: str | None = None
    category: str | None = None
    source: str = field(default="", compare=False)

    @property
    def key(self) -> str:
        """Identity of the example (what the model reads), independent of label and provenance."""
        return json.dumps([self.prompt, self.text], ensure_ascii=False)


@dataclass(frozen=True)
class Dataset:
    rows: tuple[Row, ...]
    duplicates_dropped: int = 0

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.rows]

    def counts(self) -> dict[str, int]:
        positives = sum(self.labels)
        return {"n": len(self.rows), "positive": positives, "negative": len(self.rows) - positives}

    def texts_sha256(self) -> str:
        """Order-sensitive hash of what the model reads (prompts and texts, not labels): the feature cache key."""
        digest = hashlib.sha256()
        for row in self.rows:
            digest.update(row.key.encode())
            digest.update(b"\n")
        return digest.hexdigest()

    def sha256(self) -> str:
        """Order-sensitive hash of what a feature cache or a probe depends on: prompts, texts and labels."""
        digest = hashlib.sha256()
        for row in self.rows:
            digest.update(json.dumps([row.prompt, row.text, row.label], ensure_ascii=False).encode())
            digest.update(b"\n")
        return digest.hexdigest()


def make_row(record: dict, where: str, *, text_col: str = "text", label_col: str = "label") -> Row:
    """Validate one record; ``where`` is ``file:line`` for the error message."""
    text = record.get(text_col)
    if not isinstance(text, str) or not text.strip():
        raise DatasetError(f"{where}: missing or empty {text_col!r}")
    label = _parse_label(record.get(label_col), where, label_col)
    prompt = record.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise DatasetError(f"{where}: 'prompt' must be a non-empty string when present")
    category = record.get("category")
    return Row(
        text=text.strip(),
        label=label,
        prompt=prompt.strip() if prompt else None,
        category=str(category) if category not in (None, "") else None,
        source=where.rsplit(":", 1)[0],
    )


def read_dataset(path: str | Path, *, text_col: str = "text", label_col: str = "label") -> list[Row]:
    """Rows of one ``.jsonl`` or ``.csv`` file, every one validated."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        content = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not valid UTF-8 ({exc.reason})") from None
    if path.suffix == ".csv":
        rows = _csv_rows(path, content, text_col, label_col)
    elif path.suffix in {".jsonl", ".json"}:
        rows = _jsonl_rows(path, content, text_col, label_col)
    else:
        raise DatasetError(f"{path}: unsupported format {path.suffix!r} (use .jsonl or .csv)")
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def load_datasets(paths: Sequence[str | Path], *, text_col: str = "text", label_col: str = "label") -> Dataset:
    """Read and merge files; drop exact duplicates (same prompt, text and label), refuse conflicting labels."""
    return deduplicate(row for p in paths for row in read_dataset(p, text_col=text_col, label_col=label_col))


def deduplicate(rows: Iterable[Row]) -> Dataset:
    seen: dict[str, Row] = {}
    dropped = 0
    for row in rows:
        previous = seen.get(row.key)
        if previous is None:
            seen[row.key] = row
        elif previous.label == row.label:
            dropped += 1
        else:
            raise DatasetError(
                f"{row.source}: text {row.text[:60]!r} is labelled {row.label} here and {previous.label} "
                f"in {previous.source}"
            )
    return Dataset(tuple(seen.values()), dropped)


def split(dataset: Dataset, *, dev_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Deterministic train/dev split by a seeded hash of each row's key.

    A row lands on the same side whatever else is in the file or in which order, so adding data never
    moves an existing dev row into training.
    """
    if not 0 < dev_fraction < 1:
        raise ValueError("dev_fraction must be between 0 and 1")
    train: list[Row] = []
    dev: list[Row] = []
    for row in dataset.rows:
        bucket = int.from_bytes(hashlib.sha256(f"{seed}:{row.key}".encode()).digest()[:8], "big") / 2**64
        (dev if bucket < dev_fraction else train).append(row)
    return Dataset(tuple(train)), Dataset(tuple(dev))


def write_jsonl(rows: Iterable[Row], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            record = {"text": row.text, "label": row.label}
            if row.prompt is not None:
                record["prompt"] = row.prompt
            if row.category is not None:
                record["category"] = row.category
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def _parse_label(value: object, where: str, label_col: str) -> int:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, str) and value.strip() in {"0", "1"}:
        value = int(value.strip())
    if isinstance(value, float) and value in (0.0, 1.0):
        value = int(value)
    if value not in (0, 1) or not isinstance(value, int):
        raise DatasetError(f"{where}: {label_col!r} must be 0 or 1, got {value!r}")
    return value


def _jsonl_rows(path: Path, content: str, text_col: str, label_col: str) -> list[Row]:
    rows = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DatasetError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        rows.append(make_row(record, f"{path}:{number}", text_col=text_col, label_col=label_col))
    return rows


def _csv_rows(path: Path, content: str, text_col: str, label_col: str) -> list[Row]:
    reader = csv.DictReader(content.splitlines(keepends=True))
    missing = {text_col, label_col} - set(reader.fieldnames or ())
    if missing:
        raise DatasetError(f"{path}:1: missing column(s) {sorted(missing)}; set --text-col/--label-col")
    # line numbers: header is line 1; reader.line_num tracks physical lines for multi-line quoted cells
    return [make_row(record, f"{path}:{reader.line_num}", text_col=text_col, label_col=label_col) for record in reader]
