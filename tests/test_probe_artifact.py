import json

import numpy as np
import pytest

from probes.artifact import MANIFEST_FILE
from probes.metrics import binary_metrics, threshold_for_fpr
from probes.probe import ARRAYS_FILE, LinearProbe, ProbeError


def make_probe(layers=(3, 7), d=8, seed=0) -> LinearProbe:
    rng = np.random.default_rng(seed)
    shape = (len(layers), d)
    return LinearProbe(
        name="unit",
        layers=tuple(layers),
        weight=rng.normal(size=shape).astype(np.float32),
        bias=0.25,
        mean=rng.normal(size=shape).astype(np.float32),
        scale=rng.uniform(0.5, 2, size=shape).astype(np.float32),
        direction=rng.normal(size=shape).astype(np.float32),
        threshold=0.7,
        manifest={"model_fingerprint": "sha256:abc", "metrics": {"dev": {"auroc": 0.9}}},
    )


def test_round_trip_is_equal(tmp_path):
    probe = make_probe()
    loaded = LinearProbe.load(probe.save(tmp_path / "p"))
    assert loaded == probe
    assert loaded.version == probe.version and len(probe.version) == 12
    manifest = json.loads((tmp_path / "p" / MANIFEST_FILE).read_text())
    assert manifest["version"] == probe.version and manifest["layers"] == [3, 7]
    assert loaded != make_probe(seed=1)


def test_no_pickle_in_artifact(tmp_path):
    make_probe().save(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == sorted([ARRAYS_FILE, MANIFEST_FILE])
    assert b"pickle" not in (tmp_path / "p" / ARRAYS_FILE).read_bytes()


def test_corrupt_arrays_refused(tmp_path):
    path = make_probe().save(tmp_path / "p")
    blob = bytearray((path / ARRAYS_FILE).read_bytes())
    blob[-1] ^= 0xFF
    (path / ARRAYS_FILE).write_bytes(bytes(blob))
    with pytest.raises(ProbeError, match="corrupt"):
        LinearProbe.load(path)


def test_fingerprint_mismatch_refused(tmp_path):
    path = make_probe().save(tmp_path / "p")
    assert LinearProbe.load(path, model_fingerprint="sha256:abc")
    with pytest.raises(ProbeError, match="retrain it on this model"):
        LinearProbe.load(path, model_fingerprint="sha256:other")


def test_shipped_name_resolves_to_the_variant_of_the_serving_model(tmp_path, monkeypatch):
    """Shipped policies exist per numeric path (float32 at the top, int8 under int8/): the fingerprint picks."""
    import dataclasses

    import probes.catalog as catalog

    monkeypatch.setattr(catalog, "SHIPPED_DIR", tmp_path)
    base = make_probe().save(tmp_path / "unit")
    quantised = dataclasses.replace(make_probe(seed=1), manifest={"model_fingerprint": "sha256:int8"})
    quantised.save(tmp_path / "int8" / "unit")
    assert catalog.resolve_probe("unit", "sha256:int8") == tmp_path / "int8" / "unit"
    assert catalog.resolve_probe("unit", "sha256:abc") == base == catalog.resolve_probe("unit")
    assert catalog.load_shipped("unit", model_fingerprint="sha256:int8").threshold == quantised.threshold
    with pytest.raises(ProbeError, match="retrain it on this model"):
        catalog.load_shipped("unit", model_fingerprint="sha256:other")
    with pytest.raises(ProbeError, match="neither a probe directory nor a shipped policy"):
        catalog.resolve_probe("missing")


def test_missing_files_and_bad_manifest(tmp_path):
    with pytest.raises(ProbeError, match="is missing"):
        LinearProbe.load(tmp_path)
    path = make_probe().save(tmp_path / "p")
    (path / MANIFEST_FILE).write_text("{")
    with pytest.raises(ProbeError, match="not valid JSON"):
        LinearProbe.load(path)


def test_folded_weights_match_standardised_scoring():
    probe = make_probe()
    x = np.random.default_rng(2).normal(size=(5, 2, 8))
    expected = ((x - probe.mean) / probe.scale * probe.weight).sum(axis=(1, 2)) + probe.bias
    np.testing.assert_allclose(probe.decision_function(x), expected, rtol=1e-5)
    np.testing.assert_array_equal(probe.predict(x), (probe.predict_proba(x) > probe.threshold).astype(int))
    with pytest.raises(ValueError, match="shape"):
        probe.decision_function(x[:, :1])


def test_threshold_for_fpr_bounds_false_positives():
    rng = np.random.default_rng(0)
    negatives = rng.random(1000)
    for target in (0.0, 0.01, 0.05, 0.2):
        t = threshold_for_fpr(negatives, target)
        assert (negatives > t).mean() <= target
        assert (negatives >= t).mean() > target or target == 0.0


def test_binary_metrics_known_values():
    m = binary_metrics([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9], threshold=0.5)
    assert m["auroc"] == 0.75 and m["f1"] == 0.5 and m["fpr_at_threshold"] == 0.5 and m["tpr_at_threshold"] == 0.5
    assert m["n"] == 4 and m["n_positive"] == 2
    single = binary_metrics([1, 1], [0.2, 0.9], threshold=0.5)
    assert single["auroc"] is None and single["tpr_at_threshold"] == 0.5


def test_a_direction_round_trips_and_refuses_corruption_and_another_model(tmp_path):
    from probes.artifact import ArtifactError
    from probes.direction import ARRAYS_FILE as DIRECTION_FILE
    from probes.direction import Direction, from_means

    rng = np.random.default_rng(0)
    positive, negative = rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
    made = from_means("refusal", positive, negative, layer=1, strength=2.5, model_fingerprint="sha256:abc")
    assert np.allclose(np.linalg.norm(made.vectors, axis=1), 1.0)
    assert np.allclose(made.norms, np.linalg.norm(positive - negative, axis=1), rtol=1e-6)
    made.save(tmp_path / "d")
    loaded = Direction.load(tmp_path / "d", model_fingerprint="sha256:abc")
    assert loaded.layer == 1 and loaded.strength == 2.5 and np.array_equal(loaded.vectors, made.vectors)
    assert loaded.version == made.version
    with pytest.raises(ArtifactError, match="retrain it on this model"):
        Direction.load(tmp_path / "d", model_fingerprint="sha256:other")
    blob = bytearray((tmp_path / "d" / DIRECTION_FILE).read_bytes())
    blob[-1] ^= 1
    (tmp_path / "d" / DIRECTION_FILE).write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="corrupt"):
        Direction.load(tmp_path / "d")


def test_a_calibrated_probe_flags_the_same_rows_scoring_the_mapped_logit(tmp_path):
    probe = make_probe()
    x = np.random.default_rng(3).normal(size=(200, 2, 8))
    calibrated = probe.calibrated(0.4, -0.3, {"method": "platt"})
    np.testing.assert_allclose(calibrated.decision_function(x), 0.4 * probe.decision_function(x) - 0.3, rtol=1e-5)
    np.testing.assert_array_equal(calibrated.predict(x), probe.predict(x))
    assert calibrated.manifest["calibration"] == {"method": "platt", "slope": 0.4, "intercept": -0.3}
    assert LinearProbe.load(calibrated.save(tmp_path / "c")) == calibrated
    assert calibrated.version != probe.version
    # calibrating again maps the uncalibrated logit, whatever the probe carried before
    again = calibrated.calibrated(2.0, 0.5, {"method": "platt"})
    np.testing.assert_allclose(again.decision_function(x), 2.0 * probe.decision_function(x) + 0.5, rtol=1e-4)
    np.testing.assert_allclose(again.threshold, probe.calibrated(2.0, 0.5, {}).threshold, rtol=1e-6)
    with pytest.raises(ValueError, match="slope"):
        probe.calibrated(0.0, 0.0, {})


def test_a_streamed_threshold_moves_with_the_calibration():
    probe = make_probe()
    streamed = probe.with_threshold(probe.threshold, stream={"alpha": 0.1, "threshold": 0.8})
    calibrated = streamed.calibrated(0.5, 1.0, {})
    expected = 1 / (1 + np.exp(-(0.5 * np.log(0.8 / 0.2) + 1.0)))
    assert calibrated.stream == pytest.approx((0.1, expected))
