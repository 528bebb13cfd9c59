"""The probes shipped inside the package (``probes/shipped``): finding one by name for a model's fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

from probes.probe import LinearProbe, ProbeError

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"


def shipped_home(numeric: str) -> Path:
    """Where the shipped probes of a numeric path live: int8 has a fingerprint of its own, bfloat16 shares float32's."""
    return SHIPPED_DIR / "int8" if numeric == "int8" else SHIPPED_DIR


def shipped_names() -> list[str]:
    return (
        sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "manifest.json").is_file()) if SHIPPED_DIR.is_dir() else []
    )


def resolve_probe(reference: str | Path, model_fingerprint: str | None = None) -> Path:
    """A probe directory from a path, or from the name of a shipped default policy.

    Shipped policies exist per numeric path with its own fingerprint (``shipped/<name>`` for float32
    and bfloat16, ``shipped/int8/<name>``): the one trained on ``model_fingerprint`` wins.
    """
    shipped = [p for p in sorted(SHIPPED_DIR.glob(f"*/{reference}")) if p.parent.name != "directions"]
    found = _resolve(reference, model_fingerprint, (SHIPPED_DIR / str(reference), *shipped))
    if found is None:
        raise ProbeError(
            f"{reference!r} is neither a probe directory nor a shipped policy ({', '.join(shipped_names()) or 'none'})"
        )
    return found


def resolve_direction(reference: str | Path, model_fingerprint: str | None = None) -> Path:
    """A direction directory from a path, or a shipped direction's name (``shipped/[int8/]directions/<name>``)."""
    shipped = (SHIPPED_DIR / "directions" / str(reference), *sorted(SHIPPED_DIR.glob(f"*/directions/{reference}")))
    found = _resolve(reference, model_fingerprint, shipped)
    if found is None:
        raise ProbeError(f"{reference!r} is neither a direction directory nor a shipped direction")
    return found


def _resolve(reference: str | Path, model_fingerprint: str | None, shipped) -> Path | None:
    """``reference`` if it is an artifact directory, else the shipped candidate for the model, else any."""
    path = Path(reference)
    if (path / "manifest.json").is_file():
        return path
    found = [candidate for candidate in shipped if (candidate / "manifest.json").is_file()]
    for candidate in found:
        if json.loads((candidate / "manifest.json").read_text()).get("model_fingerprint") == model_fingerprint:
            return candidate
    return found[0] if found else None  # loading it with a fingerprint check then says which model it is for


def load_shipped(name: str, *, model_fingerprint: str | None = None) -> LinearProbe:
    return LinearProbe.load(resolve_probe(name, model_fingerprint), model_fingerprint=model_fingerprint)
