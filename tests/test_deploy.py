"""Deployment files against the real tools: promtool, and a real Prometheus scraping a real guard server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from serverproc import Server, free_port
from test_engine import probe_for

pytestmark = pytest.mark.deploy

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="prometheus/promtool not installed (make services installs them)",
)


@needs_prometheus
def test_promtool_accepts_config_and_rules():
    for args in (
        ["check", "config", str(DEPLOY / "prometheus/prometheus.yml")],
        ["check", "rules", str(DEPLOY / "prometheus/alerts.yml")],
    ):
        result = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def _referenced_metrics() -> set[str]:
    exprs = [
        t["expr"]
        for p in json.loads((DEPLOY / "grafana/dashboards/guard.json").read_text())["panels"]
        for t in p["targets"]
    ]
    exprs.append((DEPLOY / "prometheus/alerts.yml").read_text())
    names = set(re.findall(r"\b(guard_[a-z_]+)", "\n".join(exprs)))
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}


def test_dashboard_is_provisionable():
    dashboard = json.loads((DEPLOY / "grafana/dashboards/guard.json").read_text())
    assert dashboard["uid"] == "guard-overview"
    assert all(p["datasource"]["uid"] == "prometheus" for p in dashboard["panels"])
    assert "${DS_PROMETHEUS}" not in json.dumps(dashboard)  # provisioning does not resolve __inputs
    assert "uid: prometheus" in (DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text()


@needs_prometheus
@pytest.mark.server
def test_prometheus_scrapes_guard_and_every_referenced_metric_exists(tmp_path, tiny_lm, tiny_model_dir):
    probe_for(tiny_lm).save(tmp_path / "probe")
    (tmp_path / "policies.json").write_text(
        json.dumps({"policies": [{"name": "toy", "probe": str(tmp_path / "probe"), "stage": "both", "action": "flag"}]})
    )
    guard = Server(
        "--model",
        str(tiny_model_dir),
        "--policy-file",
        str(tmp_path / "policies.json"),
        env={"GUARD_CACHE_DIR": str(tmp_path / "cache"), "GUARD_COMPILE": "0", "GUARD_DTYPE": "float32"},
        log=tmp_path / "guard.log",
    )
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: guard\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{guard.port}']}}]\n"
    )
    prometheus = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        body = {"model": tiny_model_dir.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert httpx.post(guard.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
        exposition = httpx.get(guard.url + "/metrics").text
        missing = {m for m in _referenced_metrics() if m not in exposition}
        assert not missing, f"dashboard/alerts reference metrics guard does not export: {missing}"
        deadline = time.monotonic() + 60
        value = None
        while time.monotonic() < deadline:
            try:  # while Prometheus starts, it refuses connections or answers 503 in plain text
                response = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": "guard_ready"})
                result = response.json()["data"]["result"] if response.status_code == 200 else []
                if result:
                    value = result[0]["value"][1]
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        assert value == "1"
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=20)
        guard.stop()


def test_the_dockerfiles_python_steps_import_what_exists():
    """The image runs Python snippets at build time; each module they import must exist in this tree (the
    image cannot be built here, so a moved module would only show when someone builds it)."""
    import importlib.util

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    snippets = re.findall(r'python -c "([^"]+)"', dockerfile)
    modules = [m for snippet in snippets for m in re.findall(r"from ([\w.]+) import|import ([\w.]+)", snippet)]
    names = [a or b for a, b in modules]
    assert names, "no python -c step found"
    for name in names:
        assert importlib.util.find_spec(name) is not None, name
    assert "dtype='int8'" in dockerfile  # the default numeric path's calibration is cached in the image
