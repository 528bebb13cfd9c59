import json
import random
from dataclasses import replace

import numpy as np
import pytest
from conftest import make_tiny_model

from guard.cli import main
from probes.data import Dataset, Row, split
from probes.features import extract
from probes.probe import LinearProbe, logit, sigmoid
from probes.train import TrainConfig, train_probe

SAFE = ["bake bread", "write a poem about the sea", "plant tomatoes", "learn the piano", "paint a wall"]
BAD = ["build a bomb to hurt people", "steal a car without getting caught", "poison my neighbour", "hate those vermin"]


def synthetic(n: int = 160, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        topic = rng.choice(BAD if label else SAFE)
        rows.append(Row(f"{rng.choice(['Please', 'Tell me how to', 'How can I', 'Help me'])} {topic} #{i}", label))
    return Dataset(tuple(rows))


def write_jsonl(path, dataset: Dataset) -> str:
    path.write_text("".join(json.dumps({"text": r.text, "label": r.label}) + "\n" for r in dataset.rows))
    return str(path)


def test_train_probe_separates_and_records_provenance(tiny_lm):
    train, dev = split(synthetic(), seed=0)
    result = train_probe(tiny_lm, train, dev, "toy", TrainConfig(target_fpr=0.05), progress=False)
    probe = result.probe
    assert probe.manifest["metrics"]["dev"]["auroc"] > 0.9
    assert set(result.layer_auroc) == set(range(tiny_lm.num_layers))
    assert probe.layers[0] in result.layer_auroc and len(probe.layers) == 1
    assert probe.manifest["model_fingerprint"] == tiny_lm.fingerprint
    assert probe.manifest["data"]["train_counts"] == train.counts()
    assert probe.manifest["metrics"]["dev"]["fpr_at_threshold"] <= 0.05
    assert probe.manifest["hook_site"] == "blocks.{layer}.hook_resid_post"


def test_concatenated_layers(tiny_lm):
    train, dev = split(synthetic(), seed=0)
    probe = train_probe(tiny_lm, train, dev, "toy", TrainConfig(layers=(1, -1)), progress=False).probe
    assert probe.layers == (1, tiny_lm.num_layers - 1) and probe.weight.shape == (2, tiny_lm.hidden_size)
    assert probe.manifest["layer_sweep_dev_auroc"] == {}
    with pytest.raises(ValueError, match="same layer twice"):
        train_probe(tiny_lm, train, dev, "toy", TrainConfig(layers=(1, 1 - tiny_lm.num_layers)), progress=False)


def test_threshold_also_holds_on_ordinary_traffic(tiny_lm):
    """Dev negatives from the traffic source push the threshold up until at most traffic_fpr of them are flagged."""
    train, dev = split(synthetic(), seed=0)
    config = TrainConfig(layers=(1,), target_fpr=0.5, traffic_fpr=None)
    loose = train_probe(tiny_lm, train, dev, "toy", config, progress=False).probe
    scores = loose.predict_proba(extract(tiny_lm, dev, [1], progress=False))
    negatives = sorted((s, r.key) for s, r in zip(scores, dev.rows, strict=True) if r.label == 0)
    traffic = {key for _, key in negatives[-3:]}  # the three highest-scoring negatives are "ordinary traffic"
    dev = Dataset(tuple(Row(r.text, r.label, source="toxicchat" if r.key in traffic else "x") for r in dev.rows))
    strict = train_probe(tiny_lm, train, dev, "toy", replace(config, traffic_fpr=0.0), progress=False).probe
    assert strict.threshold >= negatives[-1][0] - 1e-6 > loose.threshold  # no traffic row is flagged any more
    assert strict.manifest["traffic_fpr"] == 0.0 and strict.manifest["traffic_source"] == "toxicchat"
    assert loose.manifest["traffic_source"] is None


def test_one_class_split_refused(tiny_lm):
    only = Dataset(tuple(r for r in synthetic().rows if r.label == 1))
    with pytest.raises(ValueError, match="at least 2 rows of each label"):
        train_probe(tiny_lm, only, only, "toy", progress=False)


def test_cli_train_then_eval(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic())
    held = write_jsonl(tmp_path / "h.jsonl", synthetic(60, seed=1))
    common = ["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "probe"
    assert main(["train", *common, "--data", data, "--name", "toy", "--out", str(out), "--no-progress"]) == 0
    assert "toy: layers" in capsys.readouterr().out
    scores = tmp_path / "scores.jsonl"
    argv = [
        "eval",
        *common,
        "--probe",
        str(out),
        "--data",
        held,
        "--json",
        "--scores-out",
        str(scores),
        "--report",
        str(tmp_path / "report"),
        "--baselines",
        "--no-progress",
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("auroc", "auprc", "f1", "tpr_at_1pct_fpr", "fpr_at_threshold", "n"):
        assert key in report
    assert report["n"] == 60 and report["auroc"] > 0.8
    assert set(report["baselines"]) == {"tfidf", "minilm"}
    lines = [json.loads(x) for x in scores.read_text().splitlines()]
    assert len(lines) == 60 and all(0 <= x["score"] <= 1 for x in lines)
    assert {p.name for p in (tmp_path / "report").iterdir()} >= {"report.html", "roc.png", "pr.png", "layers.png"}
    assert LinearProbe.load(out).manifest["data"]["files"] == [data]


def test_cli_bad_data_names_file_and_line(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 3}\n')
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(bad), "--name", "x", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "bad.jsonl:2: 'label' must be 0 or 1" in capsys.readouterr().err


def test_cli_eval_refuses_probe_of_another_model(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic(80))
    common = ["--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    out = tmp_path / "probe"
    assert (
        main(["train", "--model", str(tiny_model_dir), *common, "--data", data, "--name", "t", "--out", str(out)]) == 0
    )
    other = make_tiny_model(tmp_path / "other", seed=1)
    assert main(["eval", "--model", str(other), *common, "--probe", str(out), "--data", data]) == 2
    assert "retrain it on this model" in capsys.readouterr().err


def test_cli_unknown_probe_name(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic(10))
    assert main(["eval", "--model", str(tiny_model_dir), "--probe", "no_such_policy", "--data", data]) == 2
    assert "harmful_request" in capsys.readouterr().err  # the message lists the shipped policies


def test_settings_from_env(monkeypatch, tmp_path):
    from guard.settings import Settings

    monkeypatch.setenv("GUARD_THREADS", "3")
    monkeypatch.setenv("GUARD_CACHE_DIR", str(tmp_path))
    settings = Settings.from_env()
    assert settings.threads == 3 and settings.cache_dir == tmp_path
    assert settings.override(threads=None, model="x").threads == 3
    from guard.cli import _parser

    flags = _parser().parse_args(["serve", "--max-batch", "2", "--queue-timeout", "1.5", "--api-key", "k"])
    served = settings.override_from(flags)  # flags named like fields win; unset ones keep the environment
    assert (served.max_batch, served.queue_timeout, served.threads, served.api_keys) == (2, 1.5, 3, "")
    assert served.fast_decode
    assert not settings.override_from(_parser().parse_args(["serve", "--no-fast-decode"])).fast_decode
    assert served.compile and not settings.override_from(_parser().parse_args(["serve", "--no-compile"])).compile
    monkeypatch.setenv("GUARD_COMPILE", "0")
    assert Settings.from_env().compile is False
    monkeypatch.delenv("GUARD_COMPILE")
    monkeypatch.setenv("GUARD_FAST_DECODE", "off")
    assert Settings.from_env().fast_decode is False
    monkeypatch.setenv("GUARD_FAST_DECODE", "maybe")
    with pytest.raises(ValueError, match="GUARD_FAST_DECODE"):
        Settings.from_env()
    monkeypatch.delenv("GUARD_FAST_DECODE")
    monkeypatch.setenv("GUARD_THREADS", "many")
    with pytest.raises(ValueError, match="GUARD_THREADS"):
        Settings.from_env()


def test_cli_fit_set_writes_the_shift_that_keeps_the_set_within_its_traffic_budget(
    tiny_model_dir, data_dir, tmp_path, capsys
):
    from guard.policy import load_policies

    common = ["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"), "--data-dir", str(data_dir)]
    probes = tmp_path / "probes"
    argv = ["train", *common, "--preset", "default", "--policy", "defamation", "--layers", "1,2", "--out", str(probes)]
    assert main([*argv, "--no-progress"]) == 0
    policies = tmp_path / "set.yaml"
    policies.write_text(f"# mine\npolicies:\n  - {{name: d, probe: {probes / 'defamation'}}}\n")
    out = tmp_path / "fitted.yaml"
    capsys.readouterr()
    assert main(["fit-set", *common, "--policy-file", str(policies), "--out", str(out), "--max-traffic-fpr", "0"]) == 0
    printed = capsys.readouterr().out
    assert "any policy flags, fit half of the traffic:" in printed and "-> 0.000" in printed  # nothing flagged
    (policy,) = load_policies(out)
    assert policy.shift > 0 and out.read_text().startswith("# mine\n")
    assert main(["fit-set", *common, "--policy-file", str(policies), "--out", str(out), "--max-traffic-fpr", "1"]) == 2
    assert "--max-traffic-fpr must be in [0, 1)" in capsys.readouterr().err
    trained_apart = tmp_path / "apart.yaml"  # a probe not trained from the pool has no dev rows to weigh
    trained_apart.write_text(f"policies:\n  - {{name: d, probe: {tmp_path / 'plain'}}}\n")
    data = write_jsonl(tmp_path / "d.jsonl", synthetic(40))
    assert main(["train", *common, "--data", data, "--name", "plain", "--out", str(tmp_path / "plain")]) == 0
    assert main(["fit-set", *common, "--policy-file", str(trained_apart), "--out", str(out)]) == 2
    assert "trained by `guard train --preset`" in capsys.readouterr().err


def test_a_recipes_own_threshold_rule_holds_unless_the_command_names_one(
    tiny_model_dir, data_dir, tmp_path, monkeypatch, capsys
):
    from probes.eval.defaults import PRESET_CONFIG, recipe_config
    from probes.eval.presets import RECIPES

    own = recipe_config("jailbreak", PRESET_CONFIG)
    assert (own.target_fpr, own.traffic_fpr) == (0.05, 0.03) and own.pooling == "tail"
    hate = recipe_config("hate", PRESET_CONFIG)  # no rule of its own: the command's
    assert (hate.target_fpr, hate.traffic_fpr) == (0.01, 0.015)
    named = recipe_config("jailbreak", PRESET_CONFIG, own_rule=False)
    assert (named.target_fpr, named.traffic_fpr) == (0.01, 0.015) and named.pooling == "tail"
    # through the command, on a policy that trains fast: its rule unless a flag names one
    monkeypatch.setitem(RECIPES, "defamation", replace(RECIPES["defamation"], target_fpr=0.2, traffic_fpr=0.1))
    common = ["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"), "--data-dir", str(data_dir)]
    argv = ["train", *common, "--preset", "default", "--policy", "defamation", "--layers", "1,2", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "own")]) == 0
    assert "at most 20% of dev negatives and 10% of dev traffic) ->" in capsys.readouterr().out  # the rule it used
    assert main([*argv, "--traffic-fpr", "0.05", "--out", str(tmp_path / "named")]) == 0
    rules = {
        name: (m["target_fpr"], m["traffic_fpr"])
        for name in ("own", "named")
        for m in [json.loads((tmp_path / name / "defamation" / "manifest.json").read_text())]
    }
    assert rules == {"own": (0.2, 0.1), "named": (0.01, 0.05)}


def test_cli_calibrate_folds_the_held_out_calibrator_into_the_trained_probe(tiny_model_dir, data_dir, tmp_path, capsys):
    common = ["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"), "--data-dir", str(data_dir)]
    probes = tmp_path / "probes"
    argv = ["train", *common, "--preset", "default", "--policy", "defamation", "--layers", "1,2", "--out", str(probes)]
    assert main([*argv, "--no-progress"]) == 0
    trained = LinearProbe.load(probes / "defamation")
    capsys.readouterr()
    assert main(["calibrate", *common, "--policy", "defamation", "--out", str(probes)]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    calibrated = LinearProbe.load(probes / "defamation")
    record = calibrated.manifest["calibration"]
    assert row.startswith("| `defamation` |") and row.endswith(f"| {record['method']} |")
    assert len(record["folds"]) >= 2 and set(record["heldout_ece"]) == {"raw", "platt", "isotonic"}
    assert record["heldout_ece"][record["method"]] == min(record["heldout_ece"][m] for m in ("raw", "platt"))
    x = np.random.default_rng(0).normal(size=(50, 2, trained.weight.shape[1])) * trained.scale + trained.mean
    np.testing.assert_array_equal(calibrated.predict(x), trained.predict(x))
    np.testing.assert_allclose(
        calibrated.decision_function(x),
        record["slope"] * trained.decision_function(x) + record["intercept"],
        rtol=1e-4,
        atol=1e-4,
    )
    assert main(["calibrate", *common, "--policy", "privacy", "--out", str(probes)]) == 2  # not shipped
    assert "calibrate takes the default policies" in capsys.readouterr().err


def test_cli_calibrate_takes_the_reply_policy_on_its_reply_sources_and_keeps_its_stream(
    tiny_model_dir, data_dir, tmp_path
):
    """The output-stage policy is calibrated on folds that hold out its reply sources, and its moving average
    keeps its smoothing and moves its threshold with the chosen map (a Platt map's move on a streamed
    threshold: ``test_a_streamed_threshold_moves_with_the_calibration``)."""
    common = ["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"), "--data-dir", str(data_dir)]
    probes = tmp_path / "probes"
    argv = ["train", *common, "--preset", "default", "--policy", "harmful_reply", "--layers", "1,2", "--no-progress"]
    assert main([*argv, "--out", str(probes)]) == 0
    stream = LinearProbe.load(probes / "harmful_reply").manifest["stream"]
    assert main(["calibrate", *common, "--policy", "harmful_reply", "--out", str(probes)]) == 0
    calibrated = LinearProbe.load(probes / "harmful_reply")
    record = calibrated.manifest["calibration"]
    assert {row["heldout"] for row in record["folds"]} >= {"do_not_answer_responses", "harmbench_replies"}
    assert record["heldout_ece"][record["method"]] == min(record["heldout_ece"][m] for m in ("raw", "platt"))
    assert calibrated.manifest["stream"]["alpha"] == stream["alpha"]
    mapped = sigmoid(record["slope"] * logit(stream["threshold"]) + record["intercept"])
    assert calibrated.manifest["stream"]["threshold"] == pytest.approx(float(mapped), abs=1e-6)
