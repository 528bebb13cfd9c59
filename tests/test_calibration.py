import numpy as np
import pytest

from probes.eval.calibration import Scored, calibrate, ece, heldout_table
from probes.probe import sigmoid
from tests.test_probe_artifact import make_probe


def folds_of(truth_scale: float, seed: int = 0, n_folds: int = 4, n: int = 600) -> list[Scored]:
    """Folds whose labels follow ``sigmoid(logit / truth_scale)``: a probe overconfident by that factor."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_folds):
        logits = rng.normal(0, 4, size=n)
        labels = (rng.uniform(size=n) < sigmoid(logits / truth_scale)).astype(int)
        scored = (labels, sigmoid(logits))
        out.append(Scored(f"source{k}", scored, scored))
    return out


def test_ece_is_zero_for_matching_frequencies_and_the_gap_otherwise():
    labels = np.array([0, 1, 0, 1, 1, 1, 1, 1, 1, 1])
    assert ece(labels[:2], np.array([0.5, 0.5])) == 0.0
    assert ece(labels, np.full(10, 0.55)) == pytest.approx(0.8 - 0.55)


def test_an_overconfident_probe_gets_platt_scaling_that_lowers_its_held_out_error():
    probe, record = calibrate(make_probe(), folds_of(truth_scale=3.0))
    assert record["method"] == "platt"
    assert record["slope"] == pytest.approx(1 / 3, rel=0.2)
    assert record["heldout_ece"]["platt"] < record["heldout_ece"]["raw"] / 2
    assert probe.manifest["calibration"]["method"] == "platt"
    assert [row["heldout"] for row in record["folds"]] == [f"source{k}" for k in range(4)]


def test_a_probe_already_calibrated_on_held_out_folds_is_left_as_it_is():
    folds = folds_of(truth_scale=1.0, seed=0)  # platt, fitted on three sources, misses the fourth by more
    probe, record = calibrate(make_probe(), folds)
    means = record["heldout_ece"]
    assert record["method"] == "raw" and means["raw"] < means["platt"]
    assert (record["slope"], record["intercept"]) == (1.0, 0.0)
    assert probe.version == make_probe().version  # the arrays bit for bit
    assert means == {m: pytest.approx(np.mean([row[m] for row in heldout_table(folds)])) for m in means}


def test_a_fit_that_ranks_held_out_scores_backwards_is_not_carried():
    flipped = [Scored(f.heldout, f.dev, (1 - f.test[0], f.test[1])) for f in folds_of(truth_scale=1.0)]
    probe, record = calibrate(make_probe(), flipped)
    assert record["platt_fitted"]["slope"] < 0
    assert record["method"] == "raw" and record["heldout_ece"]["platt"] < record["heldout_ece"]["raw"]
    assert probe.threshold == make_probe().threshold
