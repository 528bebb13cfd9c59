"""The direction artifact: a behaviour's direction in the residual stream, one unit vector per layer.

On disk a direction is a directory holding ``direction.safetensors`` (``vectors`` ``[n_layers, d_model]``
unit-normalised, ``norms`` the raw difference of means' length at each layer, ``layers``) and
``manifest.json``: name, the recommended layer and strength for steering, the model fingerprint,
the table the choice was made on, data provenance, the arrays' sha256. Steering adds
``strength * vectors[layer]`` to the residual stream after the chosen layer; ablation projects a
layer's vector out (``probes.artifact`` checks the checksum and the fingerprint on every load).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from probes import artifact
from probes.artifact import FORMAT_VERSION

ARRAYS_FILE = "direction.safetensors"
_DERIVED_KEYS = {"format", "kind", "name", "layers", "layer", "strength", "arrays_sha256"}


@dataclass(frozen=True, eq=False)
class Direction:
    name: str
    layers: tuple[int, ...]
    vectors: np.ndarray  # [n_layers, d_model], unit length
    norms: np.ndarray  # [n_layers]: the difference of means' length, the residual stream's own scale
    layer: int  # the layer steering adds at
    strength: float  # the recommended strength there, in residual-stream units
    manifest: dict[str, Any] = field(default_factory=dict)

    def vector(self, layer: int) -> np.ndarray:
        return self.vectors[self.layers.index(layer)]

    @property
    def version(self) -> str:
        return str(self.manifest.get("version") or hashlib.sha256(self.to_bytes()[0]).hexdigest()[:12])

    @property
    def model_fingerprint(self) -> str:
        return str(self.manifest.get("model_fingerprint", ""))

    def to_bytes(self) -> tuple[bytes, dict[str, Any]]:
        blob = st_save(
            {
                "vectors": np.ascontiguousarray(self.vectors, dtype=np.float32),
                "norms": np.asarray(self.norms, dtype=np.float32),
                "layers": np.asarray(self.layers, dtype=np.int64),
            }
        )
        digest = hashlib.sha256(blob).hexdigest()
        manifest = {
            **self.manifest,
            "format": FORMAT_VERSION,
            "kind": "direction",
            "name": self.name,
            "layers": list(self.layers),
            "layer": self.layer,
            "strength": self.strength,
            "arrays_sha256": digest,
        }
        return blob, manifest

    def save(self, directory: str | Path) -> Path:
        return artifact.write(directory, ARRAYS_FILE, *self.to_bytes())

    @classmethod
    def from_bytes(cls, blob: bytes, manifest: dict[str, Any], *, model_fingerprint: str | None = None) -> Direction:
        artifact.check(blob, manifest, "direction", model_fingerprint)
        arrays = st_load(blob)
        layers = tuple(int(x) for x in arrays["layers"])
        layer = int(manifest["layer"])
        if layer not in layers:
            raise artifact.ArtifactError(f"direction {manifest.get('name')!r}: layer {layer} has no vector")
        return cls(
            name=str(manifest["name"]),
            layers=layers,
            vectors=arrays["vectors"],
            norms=arrays["norms"],
            layer=layer,
            strength=float(manifest["strength"]),
            manifest={k: v for k, v in manifest.items() if k not in _DERIVED_KEYS},
        )

    @classmethod
    def load(cls, directory: str | Path, *, model_fingerprint: str | None = None) -> Direction:
        blob, manifest = artifact.read(directory, ARRAYS_FILE, "direction")
        return cls.from_bytes(blob, manifest, model_fingerprint=model_fingerprint)


def from_means(
    name: str, positive: np.ndarray, negative: np.ndarray, layer: int, strength: float, **manifest: Any
) -> Direction:
    """A direction from mean activations ``[n_layers, d_model]`` (layers ``0..n-1``) of the behaviour and its
    absence: their difference, normalised per layer."""
    difference = positive.astype(np.float64) - negative.astype(np.float64)
    norms = np.linalg.norm(difference, axis=1)
    vectors = difference / np.where(norms > 0, norms, 1.0)[:, None]
    layers = tuple(range(difference.shape[0]))
    return Direction(name, layers, vectors.astype(np.float32), norms.astype(np.float32), layer, strength, manifest)
