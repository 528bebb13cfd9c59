"""The probe artifact: a linear probe stored as plain arrays plus a JSON manifest, never a pickle.

On disk a probe is a directory holding ``probe.safetensors`` (``weight``, ``bias``, ``mean``, ``scale``,
``direction``; one row per layer read) and ``manifest.json`` (name, version, model fingerprint, layers,
hook site, pooling, threshold, metrics, data provenance, library versions, the arrays' sha256).

The score of pooled features ``x[layer, d_model]`` is ``sigmoid(sum(weight * (x - mean) / scale) + bias)``;
a row is flagged when the score is strictly above ``threshold``. ``direction`` is the difference of
class means per layer (violating minus acceptable), in raw residual-stream units, for ablation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from probes import artifact
from probes.artifact import FORMAT_VERSION, ArtifactError

ARRAYS_FILE = "probe.safetensors"
# Manifest keys written from the probe's own fields; on load they are checked and not kept twice.
_DERIVED_KEYS = {"format", "name", "layers", "pooling", "threshold", "arrays_sha256"}


ProbeError = ArtifactError  # a probe artifact that is missing, corrupt, or of another model


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -500, 500)))


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def shifted(threshold: float, shift: float) -> float:
    """A probability threshold moved by ``shift`` logits: how a policy set's ``threshold_shift`` applies."""
    return float(sigmoid(logit(threshold) + shift)) if shift else threshold


@dataclass(frozen=True, eq=False)
class LinearProbe:
    name: str
    layers: tuple[int, ...]
    weight: np.ndarray  # [n_layers, d_model], acting on standardised features
    bias: float
    mean: np.ndarray  # [n_layers, d_model]
    scale: np.ndarray  # [n_layers, d_model]
    direction: np.ndarray  # [n_layers, d_model]
    threshold: float
    pooling: str = "mean"
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def stream(self) -> tuple[float, float] | None:
        """``(alpha, threshold)`` of the moving average a server scores a streamed reply with
        (``probes.stream``); ``None``: the running mean, at ``threshold``."""
        stream = self.manifest.get("stream")
        return None if stream is None else (float(stream["alpha"]), float(stream["threshold"]))

    @property
    def calibration_slope(self) -> float:
        """The slope of the calibration folded into the probe (1 without one). A policy set's ``threshold_shift``
        is in the probe's uncalibrated logits, so it moves this probe's threshold by the shift times this."""
        return float(self.manifest.get("calibration", {}).get("slope", 1.0))

    # -- scoring ---------------------------------------------------------------------------------------
    def decision_function(self, features: np.ndarray) -> np.ndarray:
        """Logits for features ``[n, n_layers, d_model]`` (the layers in ``self.layers``, in that order)."""
        if features.ndim != 3 or features.shape[1:] != self.weight.shape:
            raise ValueError(f"features must have shape [n, {len(self.layers)}, {self.weight.shape[1]}]")
        weight, bias = self.folded()
        return np.einsum("nld,ld->n", features.astype(np.float64), weight) + bias

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return sigmoid(self.decision_function(features))

    def predict(self, features: np.ndarray) -> np.ndarray:
        return (self.predict_proba(features) > self.threshold).astype(np.int64)

    def folded(self) -> tuple[np.ndarray, float]:
        """Weight and bias on raw features, standardisation folded in: what the server multiplies by."""
        weight = self.weight.astype(np.float64) / self.scale
        return weight, float(self.bias - (weight * self.mean).sum())

    @property
    def version(self) -> str:
        """The manifest's version if one was set (e.g. by a registry), else the arrays' sha256 prefix."""
        return str(self.manifest.get("version") or hashlib.sha256(st_save(self._arrays())).hexdigest()[:12])

    @property
    def model_fingerprint(self) -> str:
        return str(self.manifest.get("model_fingerprint", ""))

    # -- value semantics -------------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LinearProbe):
            return NotImplemented
        return (
            self._scalars() == other._scalars()
            and all(
                np.array_equal(a, b) for a, b in zip(self._arrays().values(), other._arrays().values(), strict=True)
            )
            and self.manifest == other.manifest
        )

    __hash__ = None  # type: ignore[assignment]

    def _scalars(self) -> tuple:
        return (self.name, self.layers, self.bias, self.threshold, self.pooling)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "weight": np.ascontiguousarray(self.weight, dtype=np.float32),
            "bias": np.asarray([self.bias], dtype=np.float64),
            "mean": np.ascontiguousarray(self.mean, dtype=np.float32),
            "scale": np.ascontiguousarray(self.scale, dtype=np.float32),
            "direction": np.ascontiguousarray(self.direction, dtype=np.float32),
            "layers": np.asarray(self.layers, dtype=np.int64),
            "threshold": np.asarray([self.threshold], dtype=np.float64),
        }

    # -- storage ---------------------------------------------------------------------------------------
    def to_bytes(self) -> tuple[bytes, dict[str, Any]]:
        """The arrays file and the full manifest (with their sha256 and the content-derived version)."""
        blob = st_save(self._arrays())
        digest = hashlib.sha256(blob).hexdigest()
        manifest = {
            **self.manifest,
            "format": FORMAT_VERSION,
            "name": self.name,
            "layers": list(self.layers),
            "pooling": self.pooling,
            "threshold": self.threshold,
            "arrays_sha256": digest,
            "version": self.manifest.get("version") or digest[:12],
        }
        return blob, manifest

    def save(self, directory: str | Path) -> Path:
        return artifact.write(directory, ARRAYS_FILE, *self.to_bytes())

    @classmethod
    def from_bytes(cls, blob: bytes, manifest: dict[str, Any], *, model_fingerprint: str | None = None) -> LinearProbe:
        """Rebuild from the arrays file and manifest, checking the checksum and (if given) the model fingerprint."""
        artifact.check(blob, manifest, "probe", model_fingerprint)
        arrays = st_load(blob)
        kept = {k: v for k, v in manifest.items() if k not in _DERIVED_KEYS}
        if kept.get("version") == manifest["arrays_sha256"][:12]:
            del kept["version"]
        return cls(
            name=str(manifest["name"]),
            layers=tuple(int(x) for x in arrays["layers"]),
            weight=arrays["weight"],
            bias=float(arrays["bias"][0]),
            mean=arrays["mean"],
            scale=arrays["scale"],
            direction=arrays["direction"],
            threshold=float(arrays["threshold"][0]),
            pooling=str(manifest.get("pooling", "mean")),
            manifest=kept,
        )

    @classmethod
    def load(cls, directory: str | Path, *, model_fingerprint: str | None = None) -> LinearProbe:
        blob, manifest = artifact.read(directory, ARRAYS_FILE, "probe")
        return cls.from_bytes(blob, manifest, model_fingerprint=model_fingerprint)

    def calibrated(self, slope: float, intercept: float, record: dict[str, Any]) -> LinearProbe:
        """The probe whose logit is ``slope * logit + intercept`` of the uncalibrated probe's (``slope`` > 0),
        folded into its weight, bias and threshold: it flags the same rows and scores calibrated. ``record``
        (with ``slope`` and ``intercept``) goes to the manifest's ``calibration``; a probe calibrated before
        is first taken back to its uncalibrated logit."""
        if not slope > 0:
            raise ValueError(f"a calibration's slope must be positive, not {slope}")
        before = self.manifest.get("calibration") or {"slope": 1.0, "intercept": 0.0}
        factor = slope / before["slope"]
        offset = intercept - factor * before["intercept"]
        manifest = {k: v for k, v in self.manifest.items() if k not in ("version", "calibration")}
        manifest["calibration"] = {**record, "slope": slope, "intercept": intercept}
        if (factor, offset) == (1.0, 0.0):  # the arrays as they are, bit for bit
            return replace(self, manifest=manifest)
        if "stream" in manifest:  # a moving average of the logit moves with it
            stream = manifest["stream"]
            manifest["stream"] = {**stream, "threshold": float(sigmoid(factor * logit(stream["threshold"]) + offset))}
        return replace(
            self,
            weight=self.weight * factor,
            bias=self.bias * factor + offset,
            threshold=float(sigmoid(factor * logit(self.threshold) + offset)),
            manifest=manifest,
        )

    def with_threshold(self, threshold: float, **manifest_updates: Any) -> LinearProbe:
        manifest = {k: v for k, v in self.manifest.items() if k != "version"}
        return replace(self, threshold=threshold, manifest={**manifest, **manifest_updates})
