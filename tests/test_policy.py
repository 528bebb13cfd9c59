import json
import re

import pytest

from guard.policy import DEFAULT_POLICY_FILE, Action, PolicyError, Stage, load_policies
from probes.catalog import resolve_probe


def test_default_policy_file_uses_shipped_probes():
    policies = load_policies(DEFAULT_POLICY_FILE)
    assert {p.name for p in policies} >= {"harmful_request", "hate", "self_harm", "weapons", "medical_advice"}
    for policy in policies:
        assert resolve_probe(policy.probe).is_dir()


def test_every_shipped_policy_and_direction_has_an_int8_twin():
    """`make presets` trains both sets; the int8 one is trained on its own model fingerprint."""
    from probes.catalog import SHIPPED_DIR, resolve_direction, shipped_names

    names = shipped_names()
    int8_names = [p.name for p in (SHIPPED_DIR / "int8").iterdir() if (p / "manifest.json").is_file()]
    assert "harmful_reply" in names and sorted(names) == sorted(int8_names)
    fingerprint = {json.loads((SHIPPED_DIR / n / "manifest.json").read_text())["model_fingerprint"] for n in names}
    int8 = {json.loads((SHIPPED_DIR / "int8" / n / "manifest.json").read_text())["model_fingerprint"] for n in names}
    assert len(fingerprint) == len(int8) == 1 and fingerprint != int8
    for name in names:
        assert resolve_probe(name, int8.copy().pop()) == SHIPPED_DIR / "int8" / name
    assert resolve_direction("refusal", int8.copy().pop()) == SHIPPED_DIR / "int8" / "directions" / "refusal"
    assert resolve_direction("refusal", fingerprint.pop()) == SHIPPED_DIR / "directions" / "refusal"


def test_empty_list_means_unguarded(tmp_path):
    path = tmp_path / "none.yaml"
    path.write_text("policies: []")
    assert load_policies(path) == ()


def test_json_and_yaml(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(
        json.dumps(
            {"policies": [{"name": "a", "probe": "hate", "stage": "both", "action": "ablate", "threshold": 0.7}]}
        )
    )
    (policy,) = load_policies(path)
    assert policy.stage is Stage.BOTH and policy.action is Action.ABLATE and policy.threshold == 0.7
    assert policy.on_prompt and policy.on_output


def test_refuse_defaults_to_the_shipped_refusal_direction(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("policies: [{name: a, probe: b, action: refuse}, {name: c, probe: d, action: refuse, strength: 9}]")
    first, second = load_policies(path)
    assert first.action is Action.REFUSE and first.direction == "refusal" and first.strength is None
    assert second.strength == 9.0


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("rules: []", "expected a 'policies' list"),
        ("policies: [{name: a}]", r"policies\[0\]: 'probe' must be"),
        ("policies: [{name: a, probe: b, stage: later}]", "'later' is not a valid Stage"),
        ("policies: [{name: a, probe: b, action: delete}]", "'delete' is not a valid Action"),
        ("policies: [{name: a, probe: b, threshold: 2}]", "between 0 and 1"),
        ("policies: [{name: a, probe: b, colour: red}]", "unknown field"),
        ("policies: [{name: a, probe: b, action: ablate}]", "stage must be 'output' or 'both'"),
        ("policies: [{name: a, probe: b}, {name: a, probe: c}]", "unique"),
        ("policies: [{name: a, probe: b, action: block, strength: 3}]", "is for actions 'refuse' and 'steer'"),
        ("policies: [{name: a, probe: b, stage: both, action: ablate, strength: 3}]", "is for actions 'refuse'"),
        ("policies: [{name: a, probe: b, action: flag, direction: weapons}]", "is for actions 'refuse', 'steer' and"),
        ("policies: [{name: a, probe: b, action: steer, strength: -3}]", "needs a 'direction' and a signed"),
        ("policies: [{name: a, probe: b, action: steer, direction: formal}]", "needs a 'direction' and a signed"),
        ("policies: [{name: a, probe: b, action: refuse, strength: strong}]", "'strength' must be a number"),
        ("policies: [{name: a, probe: b, action: refuse, direction: ''}]", "'direction' must be a non-empty"),
        ("policies: [", "not valid YAML"),
        ("policies: []\nthreshold_shift: high", "'threshold_shift' must be a number"),
        ("policies: [{name: any, probe: b}]", "names the whole set's verdict"),
        ("policies: []\nthreshold_shift: 40", "'threshold_shift' must be a number"),
    ],
)
def test_bad_policy_files(tmp_path, document, message):
    path = tmp_path / "p.yaml"
    path.write_text(document)
    with pytest.raises(PolicyError, match=message):
        load_policies(path)
    with pytest.raises(PolicyError, match="cannot read"):
        load_policies(tmp_path / "missing.yaml")


def test_a_steer_policy_names_its_direction_and_a_signed_strength(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("policies: [{name: a, probe: b, action: steer, direction: formal, strength: -12.5}]")
    (policy,) = load_policies(path)
    assert policy.action is Action.STEER and policy.direction == "formal" and policy.strength == -12.5
    assert policy.steers and not load_policies(DEFAULT_POLICY_FILE)[0].steers


def test_an_ablate_policy_ablates_along_its_probe_unless_it_names_a_direction(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "policies: [{name: a, probe: b, stage: output, action: ablate},"
        " {name: c, probe: d, stage: both, action: ablate, direction: weapons}, {name: e, probe: f, action: refuse}]"
    )
    own, directed, refuse = load_policies(path)
    assert (own.along, directed.along, refuse.along) == (None, "weapons", "refusal")
    assert not directed.steers


def test_dials_name_a_direction_and_its_bounds(tmp_path):
    from guard.policy import Dial, load_dials

    path = tmp_path / "p.yaml"
    path.write_text("policies: []\ndials: [{name: polite, direction: refusal, min: -5, max: 40}]")
    assert load_dials(path) == (Dial("polite", "refusal", -5.0, 40.0),)
    path.write_text("policies: []")
    assert load_dials(path) == ()
    path.write_text("policies: []\ndials: [{name: polite, min: 5, max: 1}]")
    with pytest.raises(PolicyError, match="min < max"):
        load_dials(path)


def test_policy_sets_name_subsets_of_the_policies(tmp_path):
    from guard.policy import ALL, PolicySet, load_sets

    path = tmp_path / "p.json"
    entries = [{"name": "a", "probe": "hate"}, {"name": "b", "probe": "weapons"}]
    path.write_text(json.dumps({"policies": entries, "sets": {"only_b": ["b"]}}))
    sets = load_sets(path, load_policies(path))
    assert sets == {ALL: PolicySet(ALL, frozenset({"a", "b"})), "only_b": PolicySet("only_b", frozenset({"b"}))}
    for bad, message in (
        ({"x": ["c"]}, "unknown policies ['c']"),
        ({"all": ["a"]}, "other than 'all'"),
        ({"x": "a"}, "expected a list of policy names"),
        (["a"], "'sets' must map set names"),
    ):
        path.write_text(json.dumps({"policies": entries, "sets": bad}))
        with pytest.raises(PolicyError, match=re.escape(message)):
            load_sets(path, load_policies(path))


def test_api_keys_name_their_policy_set():
    from guard.settings import Settings

    assert Settings(api_keys="k1, k2:narrow ,k3:").api_key_sets == {"k1": "all", "k2": "narrow", "k3": "all"}
    assert Settings().api_key_sets == {}
    assert Settings().override(api_keys="k4:narrow").api_key_sets == {"k4": "narrow"}  # parsed again on a copy
    with pytest.raises(ValueError, match="empty before its ':'"):
        Settings(api_keys=":narrow")


def test_a_threshold_shift_moves_the_prompt_flags_and_is_written_back_with_the_header(tmp_path):
    from guard.policy import with_shift

    path = tmp_path / "p.yaml"
    path.write_text(
        "# my set\n# two lines\npolicies:\n  - {name: a, probe: b}\n  - {name: r, probe: s, stage: output}\n"
        "  - {name: k, probe: b, action: block}\nthreshold_shift: 1.5\n"
    )
    # the traffic is prompts, and a block keeps the threshold it was validated at
    assert [(p.name, p.shift) for p in load_policies(path)] == [("a", 1.5), ("r", 0.0), ("k", 0.0)]
    out = tmp_path / "out.yaml"
    out.write_text(with_shift(path, 0.25))
    assert out.read_text().startswith("# my set\n# two lines\npolicies:")
    assert [p.shift for p in load_policies(out)] == [0.25, 0.0, 0.0]
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps({"policies": [{"name": "a", "probe": "b"}]}))
    assert json.loads(with_shift(as_json, 2.0))["threshold_shift"] == 2.0
