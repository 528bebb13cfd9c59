"""Requests wrapped the way attackers wrap them: in-the-wild jailbreak templates and adversarial suffixes.

The templates are ``jailbreak_llms``' (Shen et al., CCS 2024), grouped into the families the data names
(``community``); templates outside a named family are not used, so a family can be held out whole. A
request goes into a template's placeholder, or after the template when it has none. A suffix is a
string of random pieces of the kind optimised attacks (GCG and its successors) append.
"""

from __future__ import annotations

import csv
import hashlib
import re
import sys
from pathlib import Path

import numpy as np

PLACEHOLDERS = re.compile(r"\[INSERT PROMPT HERE\]|\[PROMPT\]|\[INPUT\]|\{input\}|\{prompt\}", re.IGNORECASE)
CONTROL = re.compile(r"<\|[^|>]*\|>|<s>|</s>")  # chat-template control-token text: the server reads it literally
MAX_TEMPLATE_CHARS = 4000  # about 1,000 tokens


def hash_order(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def templates(data_dir: Path, per_family: int, max_chars: int = MAX_TEMPLATE_CHARS) -> dict[str, list[str]]:
    """Up to ``per_family`` templates of each named family, in hash order, of at most ``max_chars`` characters
    and without control-token text."""
    csv.field_size_limit(sys.maxsize)  # a few templates are longer than csv's default field limit
    with (data_dir / "jailbreak_llms" / "jailbreak_prompts_filtered.csv").open(newline="", encoding="utf-8") as f:
        records = sorted(csv.DictReader(f), key=lambda r: hash_order(r["prompt"]))
    chosen: dict[str, list[str]] = {}
    for record in records:
        family, text = record["community"], record["prompt"]
        if not family or len(text) > max_chars or CONTROL.search(text):
            continue
        kept = chosen.setdefault(family, [])
        if len(kept) < per_family:
            kept.append(text)
    return chosen


def wrap(template: str, request: str) -> tuple[str, int]:
    """The template with ``request`` in its placeholder, or after it; and the character the request starts at."""
    found = PLACEHOLDERS.search(template)
    if found:
        return template[: found.start()] + request + template[found.end() :], found.start()
    head = template.rstrip() + "\n\n"
    return head + request, len(head)


def suffix(pieces: list[str], rng: np.random.Generator, length: int = 20) -> str:
    """``length`` pieces drawn at random and run together, as an optimised adversarial suffix reads."""
    return "".join(pieces[int(i)] for i in rng.integers(0, len(pieces), size=length))
