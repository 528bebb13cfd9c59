"""What every stored artifact (a probe, a direction) shares: a safetensors arrays file beside a JSON
manifest holding the arrays' sha256 and the model fingerprint, checked on every load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """An artifact that is missing, corrupt, or does not belong to the loaded model."""


def check(blob: bytes, manifest: dict[str, Any], what: str, model_fingerprint: str | None) -> None:
    """The arrays match the manifest's sha256, the format is known, and (if given) the model is the one."""
    name = f"{what} {manifest.get('name')!r}"
    if hashlib.sha256(blob).hexdigest() != manifest.get("arrays_sha256"):
        raise ArtifactError(f"{name}: arrays do not match the manifest's sha256 (corrupt)")
    if manifest.get("format") != FORMAT_VERSION:
        raise ArtifactError(f"{name}: unknown artifact format {manifest.get('format')!r}")
    expected = manifest.get("model_fingerprint")
    if model_fingerprint is not None and expected != model_fingerprint:
        raise ArtifactError(
            f"{name} was trained on model {str(expected)[:19]}… but the loaded model is "
            f"{model_fingerprint[:19]}…: retrain it on this model (guard train --model …)"
        )


def write(directory: str | Path, arrays_file: str, blob: bytes, manifest: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / arrays_file).write_bytes(blob)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return directory


def read(directory: str | Path, arrays_file: str, what: str) -> tuple[bytes, dict[str, Any]]:
    directory = Path(directory)
    try:
        blob = (directory / arrays_file).read_bytes()
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(f"{directory} is not a {what} artifact: {exc.filename} is missing") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{directory / MANIFEST_FILE}: not valid JSON ({exc.msg})") from None
    return blob, manifest
