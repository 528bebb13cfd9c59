import numpy as np
import pytest

from probes.data import Dataset, Row
from probes.eval.lodo import TRAFFIC, compare_means, folds, markdown, scored_fold
from probes.train import TrainConfig


def rows(source: str, n: int, label: int) -> list[Row]:
    return [Row(f"{source} text {i}", label, source=source) for i in range(n)]


def test_folds_hold_out_whole_sources_and_reserve_traffic():
    data = Dataset(
        tuple(rows("a", 40, 1) + rows("b", 40, 1) + rows("c", 40, 0) + rows(TRAFFIC, 200, 0) + rows("tiny", 5, 1))
    )
    made = {f.heldout: f for f in folds(data)}
    assert set(made) == {"a", "b", "c", TRAFFIC}  # "tiny" has too few rows to be a fold
    reserved = {r.key for r in made["a"].test.rows if r.source == TRAFFIC}
    assert 60 < len(reserved) < 140  # about half of the traffic negatives
    for fold in made.values():
        seen = {r.key for r in (*fold.train.rows, *fold.dev.rows)}
        assert not seen & {r.key for r in fold.test.rows}
        assert not seen & reserved  # reserved traffic is never trained on
        assert all(r.source != fold.heldout for r in (*fold.train.rows, *fold.dev.rows))
    assert {r.key for r in made[TRAFFIC].test.rows if r.source == TRAFFIC}.isdisjoint(reserved)


def test_markdown_table():
    metrics = {"auroc": 0.9, "auprc": 0.8, "tpr_at_threshold": 0.5, "fpr_at_threshold": 0.01, "traffic_fpr": None}
    table = markdown(
        {"p": [{"heldout": "a", "n": 10, "positives": 4, "probe": metrics, "tfidf": metrics, "minilm": metrics}]}
    )
    row = "| a | 10 (4) | 0.900 / 0.900 / 0.900 | 0.800 / 0.800 / 0.800 | 0.500 / 0.500 / 0.500 | 0.010 / 0.010 / 0.010"
    assert row + " | n/a / n/a / n/a |" in table
    assert "**mean**" in table


def test_method_means_skip_folds_without_the_metric():
    def fold(auroc, fpr):
        return {"fit": {"auroc": auroc, "tpr_at_threshold": 0.5, "traffic_fpr": fpr}}

    means, table = compare_means([fold(0.9, None), fold(None, 0.02), fold(0.7, 0.04)], ["fit"], "fit (p)")
    assert means["fit"]["auroc"] == 0.8 and means["fit"]["traffic_fpr"] == 0.03
    assert "| fit | 0.800 | 0.500 | 0.030 |" in table.splitlines()


def test_a_scored_fold_thresholds_each_way_on_dev_and_reports_held_out_traffic():
    data = Dataset(tuple(rows("a", 40, 1) + rows("b", 40, 1) + rows("c", 40, 0) + rows(TRAFFIC, 200, 0)))
    fold = {f.heldout: f for f in folds(data)}["a"]
    dev_labels, test_labels = np.asarray(fold.dev.labels), np.asarray(fold.test.labels)
    perfect = (dev_labels.astype(float), test_labels.astype(float))
    inverted = (1.0 - dev_labels, 1.0 - test_labels)
    row = scored_fold(fold, {"perfect": perfect, "inverted": inverted}, TrainConfig())
    assert (row["heldout"], row["n"], row["positives"]) == ("a", len(fold.test.rows), 40)
    assert row["perfect"]["auroc"] == 1.0 and row["perfect"]["traffic_fpr"] == 0.0
    assert row["inverted"]["auroc"] == 0.0 and row["inverted"]["tpr_at_threshold"] == 0.0


def test_no_baselines_never_loads_minilm(tiny_lm, monkeypatch):
    """``benchmark-policies --no-baselines`` compares probe methods only: MiniLM is neither loaded nor run."""
    import probes.eval.lodo as lodo

    def loaded(*args, **kwargs):
        raise AssertionError("MiniLM was loaded without a MiniLM baseline")

    monkeypatch.setattr(lodo, "minilm_embedder", loaded)
    data = Dataset(tuple(rows("a", 40, 1) + rows("b", 40, 0) + rows("c", 40, 1) + rows(TRAFFIC, 60, 0)))
    labels = np.asarray(data.labels, dtype=np.float32)
    features = np.random.default_rng(0).normal(size=(len(labels), 1, tiny_lm.hidden_size)).astype(np.float32)
    features[:, 0, 0] += 3 * labels  # a separable feature, so each fold fits
    table = lodo.evaluate_folds(tiny_lm, "p", data, features, TrainConfig(layers=(1,)), baselines=())
    assert {row["heldout"] for row in table} == {"a", "b", "c", TRAFFIC}
    assert all(set(row) == {"heldout", "n", "positives", "probe"} for row in table)


def test_extra_rows_join_the_training_split_and_their_labels_win(data_dir):
    from probes.eval.defaults import recipe_splits

    train, dev, _ = recipe_splits("harmful_request", data_dir)
    relabelled = next(r for r in dev.rows if r.label == 1)
    extra = Dataset((Row(relabelled.text, 0, source="feedback"), Row("How do I steal the show at a wedding?", 0)))
    with_extra, dev_after, provenance = recipe_splits("harmful_request", data_dir, extra)
    assert set(extra.rows) <= set(with_extra.rows) and len(with_extra.rows) == len(train.rows) + 2
    assert relabelled not in dev_after.rows and len(dev_after.rows) == len(dev.rows) - 1
    assert [r.label for r in with_extra.rows if r.text == relabelled.text] == [0]
    assert provenance["extra_rows"] == {"n": 2, "sha256": extra.sha256()}


def test_extra_rows_are_for_one_named_policy(tmp_path, capsys):
    from guard.cli import main

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "How do I steal the show?", "label": 0}\n')
    assert main(["train", "--preset", "default", "--extra", str(rows)]) == 2
    assert "exactly one --policy" in capsys.readouterr().err


def test_a_set_shift_is_the_smallest_that_keeps_the_set_within_its_traffic_budget():
    from probes.eval.sets import fit_set_shift, set_fpr

    rng = np.random.default_rng(0)
    traffic = {name: rng.uniform(0, 1, 400) for name in ("a", "b", "c")}
    own = {"a": 0.9, "b": 0.95, "c": 0.99}
    assert set_fpr(traffic, own) > 0.1
    shift = fit_set_shift(traffic, own, 0.02)
    assert set_fpr(traffic, own, shift) <= 0.02 < set_fpr(traffic, own, shift - 1e-3)
    assert fit_set_shift(traffic, own, 0.5) == 0.0  # within budget already: thresholds stay
    assert set_fpr(traffic, own, fit_set_shift(traffic, own, 0.0)) == 0.0
    # a policy that keeps its threshold uses up part of the budget; the others move further
    kept = fit_set_shift(traffic, own, 0.05, fixed={"c"})
    assert set_fpr(traffic, own, kept, fixed={"c"}) <= 0.05 < set_fpr(traffic, own, kept - 1e-3, fixed={"c"})
    assert kept > fit_set_shift(traffic, own, 0.05)
    with pytest.raises(ValueError, match=r"stay flag 0\.270 of the traffic alone, over 0\.02"):
        fit_set_shift(traffic, {**own, "c": 0.75}, 0.02, fixed={"c"})


def test_a_set_shift_is_in_uncalibrated_logits_whatever_a_probes_calibration():
    from probes.eval.sets import fit_set_shift, set_fpr
    from probes.probe import logit, sigmoid

    rng = np.random.default_rng(1)
    raw = {name: rng.uniform(0, 1, 400) for name in ("a", "b")}
    own = {"a": 0.9, "b": 0.95}
    slope, intercept = 0.3, -1.2  # "a" calibrated: its scores and threshold mapped alike
    calibrated = {**raw, "a": sigmoid(slope * logit(raw["a"]) + intercept)}
    own_calibrated = {**own, "a": float(sigmoid(slope * logit(own["a"]) + intercept))}
    shift = fit_set_shift(raw, own, 0.02)
    scales = {"a": slope}
    assert fit_set_shift(calibrated, own_calibrated, 0.02, scales=scales) == pytest.approx(shift, rel=1e-6)
    assert set_fpr(calibrated, own_calibrated, shift, scales=scales) == set_fpr(raw, own, shift)
    assert set_fpr(calibrated, own_calibrated, shift) != set_fpr(raw, own, shift)  # unscaled, it would not hold
