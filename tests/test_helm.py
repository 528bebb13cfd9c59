"""The Helm chart: rendered with Helm's own Go SDK (helm-python-sdk), validated against Kubernetes schemas."""

from __future__ import annotations

import json
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from guard.policy import load_policies
from guard.settings import Settings

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "guard"
KUBERNETES = "1.30.0"  # native sidecars (initContainers with restartPolicy: Always) are GA from 1.29
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # Prometheus Operator kinds: no core schema to check


def render(values: dict | None = None) -> list[dict]:
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values or {}, name="demo", namespace="ai")
    docs = []
    for name, text in rendered.items():
        if name.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    return docs


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} documents"
    return found[0]


def guard_container(docs: list[dict]) -> dict:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    containers = pod["containers"] + pod.get("initContainers", [])
    return next(c for c in containers if c["name"] == "guard")


def test_lint_passes():
    assert helm.lint(str(CHART))["errors"] == []


def test_default_render_is_valid_and_hardened():
    docs = render()
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Service"]
    pod = one(docs, "Deployment")["spec"]["template"]
    container = guard_container(docs)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8000"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/opt/guard/cache/registry-last-known-good", "/opt/guard/cache/inductor", "/tmp"} <= mounts  # its writes
    assert one(docs, "Service")["spec"]["ports"][0]["targetPort"] == "http"


def test_environment_is_what_guard_reads():
    """Every GUARD_* variable the chart sets is a Settings field (or the registry key) and parses."""
    values = {"guard": {"threads": 4, "dtype": "bfloat16", "maxBatch": 16, "reloadInterval": 2.5, "compile": False}}
    env = guard_container(render(values))["env"]
    plain = {e["name"]: e["value"] for e in env if "value" in e and e["name"].startswith("GUARD_")}
    settings = Settings.from_env(plain)
    assert (settings.threads, settings.dtype, settings.max_batch, settings.reload_interval) == (4, "bfloat16", 16, 2.5)
    assert settings.compile is False
    assert settings.host == "0.0.0.0" and settings.port == 8000
    known = {f"GUARD_{name.upper()}" for name in Settings.__dataclass_fields__} | {"GUARD_REGISTRY_KEY"}
    assert {e["name"] for e in env if e["name"].startswith("GUARD_")} <= known


def test_policies_configmap_loads_and_rolls_the_pods(tmp_path):
    text = (ROOT / "guard" / "policies.yaml").read_text().replace("action: flag", "action: block")
    docs = render({"policies": text})
    path = tmp_path / "policies.yaml"
    path.write_text(one(docs, "ConfigMap")["data"]["policies.yaml"])
    assert {p.action.value for p in load_policies(path)} == {"block"}
    env = {e["name"]: e.get("value") for e in guard_container(docs)["env"]}
    mount = next(m for m in guard_container(docs)["volumeMounts"] if m["name"] == "policies")
    assert env["GUARD_POLICY_FILE"] == f"{mount['mountPath']}/policies.yaml"
    checksum = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/policies"]
    other = render({"policies": text + "\n# changed\n"})
    assert one(other, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/policies"] != checksum


def test_secrets_inline_and_existing():
    docs = render({"secrets": {"apiKeys": ["k1", "k2"], "redisUrl": "redis://redis:6379/0"}})
    secret = one(docs, "Secret")
    assert secret["stringData"] == {"api-keys": "k1,k2", "redis-url": "redis://redis:6379/0"}
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in guard_container(docs)["env"] if "valueFrom" in e}
    assert refs["GUARD_API_KEYS"] == {"name": secret["metadata"]["name"], "key": "api-keys", "optional": True}
    docs = render({"secrets": {"existingSecret": "guard-prod"}})
    assert not [d for d in docs if d["kind"] == "Secret"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in guard_container(docs)["env"] if "valueFrom" in e}
    names = ("GUARD_API_KEYS", "GUARD_REGISTRY_KEY", "GUARD_REDIS_URL", "GUARD_METRICS_KEY", "GUARD_ADMIN_KEY")
    assert refs == dict.fromkeys(names, "guard-prod")


def test_a_metrics_key_reaches_guard_and_the_service_monitor():
    docs = render({"secrets": {"metricsKey": "m1"}, "metrics": {"serviceMonitor": {"enabled": True}}})
    secret = one(docs, "Secret")
    assert secret["stringData"] == {"metrics-key": "m1"}
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in guard_container(docs)["env"] if "valueFrom" in e}
    assert refs["GUARD_METRICS_KEY"]["key"] == "metrics-key"
    endpoint = one(docs, "ServiceMonitor")["spec"]["endpoints"][0]
    assert endpoint["authorization"]["credentials"] == {
        "name": secret["metadata"]["name"],
        "key": "metrics-key",
        "optional": True,
    }


def test_capture_settings_and_the_admin_key_reach_guard():
    docs = render({"secrets": {"adminKey": "a1"}, "guard": {"capture": True, "captureSample": 0.05}})
    assert one(docs, "Secret")["stringData"] == {"admin-key": "a1"}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in guard_container(docs)["env"]}
    assert env["GUARD_CAPTURE"] == "true" and env["GUARD_CAPTURE_SAMPLE"] == "0.05"
    assert env["GUARD_ADMIN_KEY"]["secretKeyRef"]["key"] == "admin-key"


@pytest.mark.parametrize("native", [False, True])
def test_sidecar_mode(native):
    app = {
        "name": "app",
        "image": "example/app:1",
        "env": [{"name": "OPENAI_BASE_URL", "value": "http://127.0.0.1:8000/v1"}],
    }
    docs = render({"app": {"containers": [app], "nativeSidecar": native}})
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == (["app"] if native else ["guard", "app"])
    if native:
        assert [c["name"] for c in pod["initContainers"]] == ["guard"]
        assert pod["initContainers"][0]["restartPolicy"] == "Always"
    else:
        assert "initContainers" not in pod and "restartPolicy" not in pod["containers"][0]


def test_monitoring_objects_are_the_deploy_files():
    docs = render(
        {
            "metrics": {
                "serviceMonitor": {"enabled": True},
                "prometheusRule": {"enabled": True},
                "grafanaDashboard": {"enabled": True},
            },
            "podDisruptionBudget": {"enabled": True},
            "autoscaling": {"enabled": True},
        }
    )
    assert one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "http"
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert one(docs, "PrometheusRule")["spec"] == alerts
    dashboard = one(docs, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    expected = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "guard.json").read_text())
    assert json.loads(dashboard["data"]["guard.json"]) == expected
    assert one(docs, "HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 4
    assert "replicas" not in one(docs, "Deployment")["spec"]  # the autoscaler owns it
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1


@pytest.mark.parametrize(
    "values",
    [
        {"guard": {"dtype": "int4"}},
        {"guard": {"compile": "yes"}},
        {"guard": {"port": 0}},
        {"secrets": {"redisUrl": "localhost:6379"}},
        {"app": {"containers": [{"image": "no-name"}]}},
        {"guard": {"captureSample": 2}},
    ],
)
def test_schema_refuses_bad_values(values):
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmValuesError):
        chart.render(values, name="demo", namespace="ai")
