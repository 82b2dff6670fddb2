"""The operations files: dashboard and alerts use exported metrics, compose and Docker wiring.

Docker cannot run here, so docker-compose.yml and the Dockerfile are checked by reading
them: every component is there and every file they mount or copy exists in the repo.
Prometheus files are also checked by ``promtool`` where it is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from core.config import load_config
from loader.metrics import LoaderMetrics
from service.metrics import Metrics
from service.workers import SupervisorMetrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "callscreen.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
COMPOSE_CONFIG = DEPLOY / "config.compose.yaml"
#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
METRIC = re.compile(r"\b(callscreen_[a-z0-9_]+|up)\b(\{[^}]*\})?")
LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def exported() -> dict[str, set[str]]:
    """Every sample name the service, its supervisor and the loader export, with labels."""
    registry = CollectorRegistry()
    Metrics(load_config(COMPOSE_CONFIG), registry)
    SupervisorMetrics(registry, 2)
    LoaderMetrics(registry, ["blocklist"])
    names: dict[str, set[str]] = {"up": set()}
    for family in registry.collect():
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    for labels in names.values():
        labels.discard("le")
        labels.update(TARGET_LABELS)
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    return exprs


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_queried_metric_and_label_is_exported(source: str) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    metrics = exported()
    used = set()
    for expr in exprs:
        for name, selector in METRIC.findall(expr):
            assert name in metrics, f"{source}: {name} is not exported ({expr})"
            labels = set(LABEL.findall(selector))
            assert labels <= metrics[name], (
                f"{source}: {name} has no label {labels - metrics[name]}"
            )
            used.add(name)
    if source == "dashboard":  # the panels the issue asks for
        for wanted in (
            "callscreen_request_duration_seconds_bucket",
            "callscreen_decisions_total",
            "callscreen_on_error_total",
            "callscreen_errors_total",
            "callscreen_redis_duration_seconds_bucket",
            "callscreen_list_entries",
            "callscreen_loader_last_success_timestamp_seconds",
        ):
            assert wanted in used, wanted


def test_alerts_cover_latency_fallbacks_stale_sync_and_down() -> None:
    rules = {
        rule["alert"]: rule["expr"]
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
    }
    assert "callscreen_request_duration_seconds_bucket" in rules["CallscreenLatencyNearTimeout"]
    assert "callscreen_on_error_total" in rules["CallscreenOnErrorFallbacks"]
    assert "last_success_timestamp" in rules["CallscreenListSyncStale"]
    assert 'up{job="callscreen"}' in rules["CallscreenDown"]
    # The jobs the alerts watch are the jobs Prometheus scrapes.
    jobs = {job["job_name"] for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    assert set(re.findall(r'job="([^"]+)"', "\n".join(rules.values()))) <= jobs


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_config_rules_and_rule_tests(tmp_path: Path) -> None:
    for command in (
        ["check", "config", str(PROMETHEUS)],
        ["check", "rules", str(ALERTS)],
        ["test", "rules", str(ALERT_TESTS)],
    ):
        run = subprocess.run(["promtool", *command], capture_output=True, text=True, check=False)
        assert run.returncode == 0, run.stdout + run.stderr
    # The dashboard's queries parse too: as recording rules, with Grafana's variables set.
    queries = [
        expr.replace("$__rate_interval", "1m").replace("$trunk_group", ".*")
        for expr in dashboard_exprs()
        if not expr.startswith("label_values(")
    ]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{n}", "expr": q} for n, q in enumerate(queries)
    ]}]}  # fmt: skip
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    run = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_grafana_provisioning_points_at_the_dashboard_and_datasource() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    uids = {source["uid"] for source in sources["datasources"]}
    dashboard = json.loads(DASHBOARD.read_text())
    used = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert used == uids
    providers = yaml.safe_load((provisioning / "dashboards" / "callscreen.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    grafana = compose()["services"]["grafana"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in grafana["volumes"]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_names_every_component_and_mounts_only_repo_files() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "service", "loader", "prometheus", "grafana"}
    for name, spec in services.items():
        assert "healthcheck" in spec, f"{name} has no health check"
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        for env_file in spec.get("env_file", []):
            path = env_file["path"]
            assert not env_file.get("required", True), f"{name}: {path} must be optional"
            assert not (ROOT / path).exists(), f"{path} holds secrets: keep it out of the repo"
            assert f"{path}\n" in (ROOT / ".gitignore").read_text()
    redis = services["redis"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "redis-cli" in redis["healthcheck"]["test"]
    assert "/readyz" in " ".join(services["service"]["healthcheck"]["test"])
    assert services["loader"]["command"][-1] == "run"


def test_compose_commands_use_the_compose_config() -> None:
    services = compose()["services"]
    for name in ("service", "loader"):
        command = services[name]["command"]
        config_path = command[command.index("--config") + 1]
        mounted = {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]}
        assert mounted[f"/app/{config_path}"] == "./deploy/config.compose.yaml"
    config = load_config(COMPOSE_CONFIG)
    assert config.server.host == "0.0.0.0"
    assert config.loader.metrics_host == "0.0.0.0"
    assert config.server.workers != 1  # several workers
    for spec in config.lists.values():
        assert spec.source and Path(config.resolve_source(spec.source)).is_file()
        assert spec.interval_s  # the loader syncs it on a schedule
    scrape = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    ports = {str(c.get("port", "")) for job in scrape for c in job.get("dns_sd_configs", [])}
    ports |= {t.split(":")[1] for job in scrape for c in job.get("static_configs", [])
              for t in c["targets"]}  # fmt: skip
    assert ports == {str(config.server.port), str(config.loader.metrics_port)}


def test_dockerfile_builds_the_service_and_the_loader() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            source = line.split()[1]
            assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    for package in ("core", "service", "loader"):
        assert f"COPY {package} ./{package}" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "deploy/callscreen.env"} <= set(ignored)
