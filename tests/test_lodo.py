from probes.data import Dataset, Row
from probes.lodo import TRAFFIC, compare_means, folds, markdown


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
    metrics = {"auroc": 0.9, "tpr_at_threshold": 0.5, "traffic_fpr": None}
    table = markdown(
        {"p": [{"heldout": "a", "n": 10, "positives": 4, "probe": metrics, "tfidf": metrics, "minilm": metrics}]}
    )
    assert "| a | 10 (4) | 0.900 / 0.900 / 0.900 | 0.500 / 0.500 / 0.500 | n/a / n/a / n/a |" in table
    assert "**mean**" in table


def test_method_means_skip_folds_without_the_metric():
    def fold(auroc, fpr):
        return {"fit": {"auroc": auroc, "tpr_at_threshold": 0.5, "traffic_fpr": fpr}}

    means, table = compare_means([fold(0.9, None), fold(None, 0.02), fold(0.7, 0.04)], ["fit"], "fit (p)")
    assert means["fit"]["auroc"] == 0.8 and means["fit"]["traffic_fpr"] == 0.03
    assert "| fit | 0.800 | 0.500 | 0.030 |" in table.splitlines()
