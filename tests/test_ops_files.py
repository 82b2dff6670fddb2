"""The operations files: dashboard and alerts use exported metrics, compose and Docker wiring.

Docker cannot run here, so docker-compose.yml and the Dockerfile are checked by reading
them: every component is there, every image is pinned, every container has limits and
rotated logs, calls reach the service only through Caddy, handler auth is on, every file
they mount or copy exists in the repo; ``docker-compose config`` (1.29) or ``docker
compose config`` also validates the compose file where one is installed. Prometheus
files are checked by ``promtool``, the Alertmanager config by ``amtool`` and the
Caddyfile by ``caddy`` where they are installed; in CI (``CI`` set) a missing one fails
the test instead, since .ci/run installs them.
"""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry

from core.config import Config, ConfigError, load_config, parse_config
from devtools.redis_server import RedisProcess, free_port
from loader.metrics import LoaderMetrics
from service.edge.auth import check_secrets
from service.metrics import ERROR_KINDS, FALLBACK_REASONS, Metrics
from service.procs.reload import ReloadMetrics
from service.procs.workers import STOP_GRACE_S, SupervisorMetrics
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "callscreen.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
COMPOSE_CONFIG = DEPLOY / "config.compose.yaml"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
ENV_EXAMPLE = DEPLOY / "callscreen.env.example"
CADDYFILE = DEPLOY / "caddy" / "Caddyfile"
#: Every env file compose reads, by the name of the file under deploy/.
ENV_FILES = ("callscreen", "caddy", "grafana", "alertmanager")
#: The variables holding the service's secrets: they reach the service and loader only.
SECRET_VARIABLES = ("CALLSCREEN_ADMIN_TOKENS", "CALLSCREEN_HANDLER_SECRET", "CALLSCREEN_REDIS_URL")
#: The one receiver every alert reaches (deploy/alertmanager/alertmanager.yml).
RECEIVER = "oncall-webhook"
SEVERITIES = {"critical", "warning"}
#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
METRIC = re.compile(r"\b(callscreen_[a-z0-9_]+|up)\b(\{[^}]*\})?")
LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def exported() -> dict[str, set[str]]:
    """Every sample name the service, its supervisor and the loader export, with labels."""
    registry = CollectorRegistry()
    # The compose config has no rate rule; its per-rule series exist only with one.
    data = load_config(COMPOSE_CONFIG).model_dump()
    data["policies"]["fraud"] = {
        "rules": [
            {"name": "tdos", "match": "call_rate", "key": "called", "limit": 1, "window_s": 1}
        ]
    }
    metrics = Metrics(parse_config(data), registry)
    # Node series exist only on a Cluster: give the collector one node to show.
    metrics.redis_health.nodes = lambda: {"127.0.0.1:7000": False}
    SupervisorMetrics(registry, 2)
    ReloadMetrics(registry)
    LoaderMetrics(registry, ["blocklist"], ["blocklist"])
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


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def alert_exprs() -> list[str]:
    return [rule["expr"] for rule in alert_rules()]


def tool(name: str) -> str:
    """The path of a command-line tool: skip without it, but fail in CI, which installs it."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed, and .ci/run should have installed it")
        pytest.skip(f"{name} is not installed")
    return path


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)


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
            "callscreen_rate_peak",
            "callscreen_rate_limit",
        ):
            assert wanted in used, wanted
    else:  # label values the alerts select on are ones the service counts
        values = "\n".join(exprs)
        for kind in re.findall(r'kind="([^"]+)"', values):
            assert kind in ERROR_KINDS, kind
        for reason in re.findall(r'reason!?="([^"]+)"', values):
            assert reason in FALLBACK_REASONS, reason


def test_alerts_cover_latency_fallbacks_stale_sync_down_lost_lists_and_overload() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    exprs = {name: rule["expr"] for name, rule in rules.items()}
    assert "callscreen_request_duration_seconds_bucket" in exprs["CallscreenLatencyNearTimeout"]
    assert "callscreen_on_error_total" in exprs["CallscreenOnErrorFallbacks"]
    assert "last_success_timestamp" in exprs["CallscreenListSyncStale"]
    assert 'up{job="callscreen"}' in exprs["CallscreenDown"]
    # Lists lost from Redis: critical, and not also reported as an ordinary fallback.
    assert 'callscreen_on_error_total{reason="list_lost"}' in exprs["CallscreenListLost"]
    assert rules["CallscreenListLost"]["labels"]["severity"] == "critical"
    assert 'reason!="list_lost"' in exprs["CallscreenOnErrorFallbacks"]
    assert 'callscreen_errors_total{kind="overloaded"}' in exprs["CallscreenOverloaded"]
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["annotations"]["summary"], name
    # The jobs the alerts watch are the jobs Prometheus scrapes.
    jobs = {job["job_name"] for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    assert set(re.findall(r'job="([^"]+)"', "\n".join(exprs.values()))) <= jobs


def test_every_alert_has_a_rule_test_where_it_fires_and_one_where_it_does_not() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    cases = [
        case
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    assert {case["alertname"] for case in cases} <= set(rules), "a test of an unknown alert"
    for name, rule in rules.items():
        own = [case for case in cases if case["alertname"] == name]
        firing = [alert for case in own for alert in case["exp_alerts"]]
        assert firing, f"no test where {name} fires"
        assert any(not case["exp_alerts"] for case in own), f"no test where {name} is quiet"
        for alert in firing:  # with the rule's labels and every one of its annotations
            assert rule["labels"].items() <= alert["exp_labels"].items(), name
            assert set(alert["exp_annotations"]) == set(rule["annotations"]), name


def test_promtool_accepts_config_rules_and_rule_tests(tmp_path: Path) -> None:
    promtool = tool("promtool")
    for command in (
        ["check", "config", str(PROMETHEUS)],  # rule_files are relative to the config's folder
        ["check", "rules", str(ALERTS)],
        ["test", "rules", str(ALERT_TESTS)],
    ):
        done = run(promtool, *command)
        assert done.returncode == 0, done.stdout + done.stderr
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
    done = run(promtool, "check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def duration_s(text: str) -> float:
    """An Alertmanager duration (``1h30m``, ``10s``) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w)", text)
    assert "".join(n + u for n, u in parts) == text, f"not a duration: {text}"
    return sum(int(n) * units[u] for n, u in parts)


def alertmanager() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(ALERTMANAGER.read_text())
    return data


def test_alertmanager_routes_to_a_webhook_whose_url_is_not_in_the_repo() -> None:
    config = alertmanager()
    route = config["route"]
    receivers = {receiver["name"]: receiver for receiver in config["receivers"]}
    assert route["receiver"] == RECEIVER
    assert {sub["receiver"] for sub in route.get("routes", [])} <= set(receivers)
    webhooks = receivers[RECEIVER]["webhook_configs"]
    assert webhooks
    for webhook in webhooks:  # the URL comes from a file, never from this one
        assert "url" not in webhook
        assert webhook["url_file"].startswith("/")
    # Critical alerts are sent sooner and repeated more often than the rest.
    critical = [sub for sub in route["routes"] if sub.get("matchers") == ['severity="critical"']]
    assert len(critical) == 1
    for timing in ("group_wait", "group_interval", "repeat_interval"):
        assert duration_s(critical[0][timing]) < duration_s(route[timing]), timing
    # Compose writes that file from the environment, which the example documents.
    command = " ".join(compose()["services"]["alertmanager"]["command"])
    for webhook in webhooks:
        assert f"> {webhook['url_file']}" in command
    assert "ALERTMANAGER_WEBHOOK_URL" in command
    assert "ALERTMANAGER_WEBHOOK_URL=" in (DEPLOY / "alertmanager.env.example").read_text()
    # Its comments send the reader to the env file the container really reads.
    named = set(re.findall(r"deploy/[a-z]+\.env\b", ALERTMANAGER.read_text()))
    assert named and named <= set(compose()["services"]["alertmanager"]["env_file"]), named


def amtool_readable_config(amtool: str, tmp_path: Path) -> Path:
    """alertmanager.yml as the installed amtool can load it.

    ``url_file`` in webhook_configs came with Alertmanager 0.26 (the stack runs 0.27);
    Debian 12's amtool is 0.25 and rejects it. For such an amtool the file is checked
    with that one key swapped for a placeholder ``url``; everything else is as written.
    """
    version = re.search(r"version (\d+)\.(\d+)", run(amtool, "--version").stdout)
    assert version, "amtool --version printed no version"
    text = ALERTMANAGER.read_text()
    if (int(version[1]), int(version[2])) < (0, 26):
        text, swapped = re.subn(r"\burl_file: \S+", "url: http://webhook.invalid/", text)
        assert swapped == len(alertmanager()["receivers"][0]["webhook_configs"])
    path = tmp_path / "alertmanager.yml"
    path.write_text(text)
    return path


def test_amtool_accepts_the_config_and_routes_every_alert_to_the_webhook(
    tmp_path: Path,
) -> None:
    amtool = tool("amtool")
    config = amtool_readable_config(amtool, tmp_path)
    done = run(amtool, "check-config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    for rule in alert_rules():
        severity = rule["labels"]["severity"]
        done = run(
            amtool, "config", "routes", "test", f"--config.file={config}", "--tree",
            f"--verify.receivers={RECEIVER}", f"alertname={rule['alert']}", f"severity={severity}",
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.split()[-1] == RECEIVER, done.stdout
        # --tree shows the route taken: critical ones take the faster one.
        assert ('{severity="critical"}' in done.stdout) == (severity == "critical"), done.stdout


def test_prometheus_sends_alerts_to_the_compose_alertmanager() -> None:
    alerting = yaml.safe_load(PROMETHEUS.read_text())["alerting"]
    targets = [
        target
        for manager in alerting["alertmanagers"]
        for static in manager["static_configs"]
        for target in static["targets"]
    ]
    assert targets
    service = compose()["services"]["alertmanager"]
    assert service["image"].startswith("prom/alertmanager:")
    command = " ".join(service["command"])
    listen = re.search(r"--web\.listen-address=(\S*):(\d+)", command)
    assert listen and listen[1] in ("", "0.0.0.0"), "Alertmanager must listen on every address"
    for target in targets:
        assert target == f"alertmanager:{listen[2]}"
    config_file = re.search(r"--config\.file=(\S+)", command)
    assert config_file
    assert f"./deploy/alertmanager/alertmanager.yml:{config_file[1]}:ro" in service["volumes"]


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
    assert set(services) == {
        "caddy", "redis", "service", "loader", "prometheus", "alertmanager", "grafana"
    }  # fmt: skip
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    for name, spec in services.items():
        assert "healthcheck" in spec, f"{name} has no health check"
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        for path in spec.get("env_file", []):
            # The short form (a path) for docker-compose 1.29: the file must exist, made
            # from the example; it holds secrets, so git ignores it.
            assert isinstance(path, str), f"{name}: env_file {path} needs Compose 2.24"
            assert (ROOT / f"{path}.example").is_file(), f"{path} has no example"
            assert path in ignored, f"{path} holds secrets: keep it out of the repo"
    if (ROOT / ".git").exists() and shutil.which("git"):
        for env in ENV_FILES:
            tracked = run("git", "-C", str(ROOT), "ls-files", f"deploy/{env}.env")
            assert tracked.stdout == "", f"deploy/{env}.env holds secrets: keep it out of git"
    redis = services["redis"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "redis-cli" in redis["healthcheck"]["test"]
    assert "/readyz" in " ".join(services["service"]["healthcheck"]["test"])
    assert services["loader"]["command"][-1] == "run"


def test_each_container_gets_only_its_own_secrets_and_ops_tools_stay_private() -> None:
    services = compose()["services"]
    env_files = {name: spec.get("env_file", []) for name, spec in services.items()}
    # The admin tokens and handler secrets reach the service and the loader only.
    assert env_files["service"] == env_files["loader"] == ["deploy/callscreen.env"]
    assert env_files["grafana"] == ["deploy/grafana.env"]
    assert env_files["alertmanager"] == ["deploy/alertmanager.env"]
    assert env_files["caddy"] == ["deploy/caddy.env"]
    for example in ("grafana", "alertmanager", "caddy"):
        text = (DEPLOY / f"{example}.env.example").read_text()
        for variable in SECRET_VARIABLES:
            assert variable not in text, f"{example}.env.example names {variable}"
    # No default Grafana password: it refuses to start without one.
    grafana = " ".join(services["grafana"]["command"])
    assert "GF_SECURITY_ADMIN_PASSWORD" in grafana and "exit 1" in grafana
    assert "GF_SECURITY_ADMIN_PASSWORD" not in services["grafana"].get("environment", {})
    # Prometheus, Alertmanager and Grafana: published on the host's loopback only.
    for name in ("prometheus", "alertmanager", "grafana"):
        for port in services[name]["ports"]:
            assert str(port).startswith("127.0.0.1:"), f"{name} published on every interface"
    # The service publishes nothing: calls come through Caddy, and the operator listener
    # (admin API, explain, /metrics) stays on the compose network.
    config = load_config(COMPOSE_CONFIG)
    assert config.server.admin_port not in (None, config.server.port)
    assert "ports" not in services["service"]
    assert "ports" not in services["loader"] and "ports" not in services["redis"]


def test_compose_pins_every_image() -> None:
    data = compose()
    assert "version" not in data  # obsolete in Compose v2; 1.29 reads the file without it
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, spec in data["services"].items():
        image = spec["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest" and re.fullmatch(r"v?\d+\.\d+\.\d+(-[a-z0-9.]+)?", tag), (
            f"{name}: {image} is not pinned to a version"
        )
        if "build" in spec:  # built from this repo: tagged with its version
            assert tag == version, f"{name}: {image} is not tagged {version} (pyproject.toml)"


def test_dockerfile_pins_its_base_image_to_an_exact_version() -> None:
    bases = re.findall(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert bases
    for base in bases:
        image, _, digest = base.partition("@")
        repository, _, tag = image.rpartition(":")
        assert repository == "python", base
        # An exact patch release on a named Debian release: python:3.11-slim floated.
        assert re.fullmatch(r"3\.11\.\d+-slim-[a-z]+", tag), f"{base} is not an exact version"
        if digest:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), base
    # The Python it runs is one the project supports.
    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert wanted == ">=3.11"


def size_bytes(text: str) -> int:
    """A compose size (``512m``, ``1g``) in bytes."""
    found = re.fullmatch(r"(\d+)([kmg])", text)
    assert found, f"not a size: {text}"
    return int(found[1]) << {"k": 10, "m": 20, "g": 30}[found[2]]


def test_every_container_has_cpu_and_memory_limits_and_rotated_logs() -> None:
    services = compose()["services"]
    for name, spec in services.items():
        # Service-level keys, not deploy.resources: docker-compose 1.29 ignores the
        # latter without --compatibility.
        assert 0 < float(spec["cpus"]) <= 4, f"{name} has no CPU limit"
        assert size_bytes(str(spec["mem_limit"])) >= 64 << 20, f"{name} has no memory limit"
        assert "deploy" not in spec, name
        logging = spec["logging"]
        assert logging["driver"] == "json-file", name
        assert size_bytes(logging["options"]["max-size"]) <= 100 << 20, name
        assert int(logging["options"]["max-file"]) >= 2, f"{name}: logs not rotated"
    # The service runs one worker per core its quota gives it (a quota is invisible to
    # the process), and its memory covers /dev/shm, where the workers share the lists.
    service = services["service"]
    assert load_config(COMPOSE_CONFIG).server.workers == int(float(service["cpus"]))
    assert size_bytes(str(service["mem_limit"])) > size_bytes(str(service["shm_size"]))


def test_handler_auth_is_on_in_compose_and_its_secret_comes_from_the_env_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = load_config(COMPOSE_CONFIG)
    assert config.auth.enabled and config.auth.secret_env == "CALLSCREEN_HANDLER_SECRET"
    for group in config.trunk_groups.values():  # no trunk group opened again
        assert group.auth is None
    # The example names the variable, with no value: no secret lives in the repo.
    example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )  # fmt: skip
    assert example["CALLSCREEN_HANDLER_SECRET"] == ""
    # Without the secret the service refuses to start, naming the variable.
    monkeypatch.delenv("CALLSCREEN_HANDLER_SECRET", raising=False)
    with pytest.raises(ConfigError, match="CALLSCREEN_HANDLER_SECRET"):
        check_secrets(config)


async def test_the_compose_config_refuses_calls_without_the_handler_secret(
    redis_server: RedisProcess,
    make_client: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "compose-test-secret-0123456789"
    monkeypatch.setenv("CALLSCREEN_HANDLER_SECRET", secret)
    monkeypatch.setenv("CALLSCREEN_REDIS_URL", redis_server.url)
    config: Config = load_config(COMPOSE_CONFIG)
    client = await make_client(config)
    body = json.dumps({"From": [{"user": "15162065613"}]})
    refused = await client.post("/tg/main", data=body)
    assert refused.status == 401
    wrong = await client.post("/k/not-the-secret/tg/main", data=body)
    assert wrong.status == 401
    answered = await client.post(f"/k/{secret}/tg/main", data=body)
    assert answered.status == 200, await answered.text()
    assert isinstance(await answered.json(), list)
    # The container health check reaches /readyz without the secret.
    assert (await client.get("/healthz")).status == 200


def caddyfile() -> str:
    """The Caddyfile without its comments."""
    lines = (line.split("#", 1)[0].rstrip() for line in CADDYFILE.read_text().splitlines())
    return "\n".join(line for line in lines if line)


def test_caddy_terminates_tls_in_front_of_every_service_replica() -> None:
    services = compose()["services"]
    caddy = services["caddy"]
    config = load_config(COMPOSE_CONFIG)
    # Caddy holds the public ports; its Caddyfile and certificate store are mounted.
    assert sorted(str(port) for port in caddy["ports"]) == ["443:443", "80:80"]
    assert "./deploy/caddy/Caddyfile:/etc/caddy/Caddyfile:ro" in caddy["volumes"]
    assert any(volume.endswith(":/data") for volume in caddy["volumes"])
    assert "service" in caddy["depends_on"]
    text = caddyfile()
    # The site is the domain from caddy.env (automatic HTTPS), never plain http://.
    site = re.search(r"^(\S+) \{$", text, re.MULTILINE)
    assert site and site[1].startswith("{$CALLSCREEN_DOMAIN"), text
    assert "http://" not in text
    assert "CALLSCREEN_DOMAIN=" in (DEPLOY / "caddy.env.example").read_text()
    # Every replica, found by the compose DNS name, on the handler port.
    dynamic = re.search(r"dynamic a \{\s*name (\S+)\s*port (\d+)", text)
    assert dynamic and dynamic[1] == "service" and dynamic[2] == str(config.server.port)
    # No access log: a secret in the handler URL must not be written anywhere.
    assert not re.search(r"^\s*log\b", text, re.MULTILINE)


async def test_calls_through_caddy_reach_the_service_over_tls_with_the_secret(
    tmp_path: Path,
    redis_server: RedisProcess,
    make_client: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The shipped Caddyfile in front of the service with the compose config.

    Changed only where this machine differs from the compose network: the replicas'
    DNS name is localhost and their port the test server's; Caddy listens on free ports,
    its admin endpoint too, and signs with its own local CA without adding it to the
    system's trust store (the client does not verify the certificate).
    """
    caddy = tool("caddy")
    secret = "compose-test-secret-0123456789"
    monkeypatch.setenv("CALLSCREEN_HANDLER_SECRET", secret)
    monkeypatch.setenv("CALLSCREEN_REDIS_URL", redis_server.url)
    client = await make_client(load_config(COMPOSE_CONFIG))
    https_port, http_port, admin_port = free_port(), free_port(), free_port()
    text = CADDYFILE.read_text()
    text, found = re.subn(
        r"name service\n(\s*)port 8080", rf"name localhost\n\1port {client.port}", text
    )
    assert found == 1
    text, found = re.subn(
        r"^\{\n", f"{{\n\tadmin 127.0.0.1:{admin_port}\n\thttps_port {https_port}\n"
        f"\thttp_port {http_port}\n\tlocal_certs\n\tskip_install_trust\n", text, count=1,
        flags=re.MULTILINE,
    )  # fmt: skip
    assert found == 1
    config = tmp_path / "Caddyfile"
    config.write_text(text)
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data"),
           "XDG_CONFIG_HOME": str(tmp_path / "config"), "CALLSCREEN_DOMAIN": "localhost"}  # fmt: skip
    log_path = tmp_path / "caddy.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            caddy, "run", "--adapter", "caddyfile", "--config", str(config),
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    body = json.dumps({"From": [{"user": "15162065613"}]})
    url = f"https://localhost:{https_port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def answers() -> bool:
                assert process.returncode is None, log_path.read_text()
                try:
                    async with session.get(f"{url}/healthz", ssl=False) as answer:
                        return answer.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(answers, timeout_s=60, interval_s=0.2)
            async with session.post(f"{url}/tg/main", data=body, ssl=False) as answer:
                assert answer.status == 401
            async with session.post(f"{url}/k/{secret}/tg/main", data=body, ssl=False) as answer:
                assert answer.status == 200, await answer.text()
                assert isinstance(await answer.json(), list)
            # Plain HTTP is only a redirect to HTTPS, never the handler itself.
            async with session.post(
                f"http://localhost:{http_port}/k/{secret}/tg/main", data=body,
                allow_redirects=False,
            ) as answer:  # fmt: skip
                assert answer.status in (301, 308), answer.status
                assert answer.headers["Location"].startswith("https://")
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), timeout=30)
    # No access log: the secret in the URL was written nowhere.
    assert secret not in log_path.read_text()


def test_caddy_accepts_the_caddyfile(tmp_path: Path) -> None:
    caddy = tool("caddy")
    for domain in ("", "screen.example.com"):
        env = {**os.environ, "HOME": str(tmp_path), "CALLSCREEN_DOMAIN": domain}
        if not domain:
            del env["CALLSCREEN_DOMAIN"]
        done = subprocess.run(
            [caddy, "adapt", "--adapter", "caddyfile", "--config", str(CADDYFILE), "--validate"],
            capture_output=True, text=True, check=False, timeout=120, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        server = json.loads(done.stdout)["apps"]["http"]["servers"]["srv0"]
        assert server["listen"] == [":443"]
        hosts = server["routes"][0]["match"][0]["host"]
        assert hosts == [domain or "localhost"]
        proxy = server["routes"][0]["handle"][0]["routes"][0]["handle"][0]
        assert proxy["handler"] == "reverse_proxy"
        assert proxy["dynamic_upstreams"]["source"] == "a"


def test_the_service_scales_without_a_fixed_host_port() -> None:
    service = compose()["services"]["service"]
    config = load_config(COMPOSE_CONFIG)
    assert "container_name" not in service  # one name cannot be given to several replicas
    assert "ports" not in service  # no host port to clash: Caddy reaches each by DNS
    # Prometheus scrapes every replica: Docker's DNS has one A record per container.
    scrape = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    job = next(job for job in scrape if job["job_name"] == "callscreen")
    assert job["dns_sd_configs"] == [
        {"names": ["service"], "type": "A", "port": config.server.admin_port,
         "refresh_interval": "30s"}
    ]  # fmt: skip


def compose_commands() -> list[list[str]]:
    """Compose programs on this machine: docker-compose (1.29) and the docker plugin."""
    found = []
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    if shutil.which("docker") and run("docker", "compose", "version").returncode == 0:
        found.append(["docker", "compose"])
    return found


@pytest.mark.skipif(not compose_commands(), reason="neither docker-compose nor docker compose")
def test_compose_validates_the_file(tmp_path: Path) -> None:
    # In a copy: the env file must exist (it is made from the example), and the repo's
    # own deploy/callscreen.env, which may hold secrets, is neither needed nor read.
    (tmp_path / "deploy").mkdir()
    for env in ENV_FILES:
        example = DEPLOY / f"{env}.env.example"
        (tmp_path / "deploy" / f"{env}.env").write_text(example.read_text())
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    for command in compose_commands():
        done = run(*command, "--project-directory", str(tmp_path),
                   "-f", str(tmp_path / "docker-compose.yml"), "config", "-q")  # fmt: skip
        assert done.returncode == 0, f"{' '.join(command)}: {done.stdout}{done.stderr}"


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
    assert ports == {str(config.server.admin_port), str(config.loader.metrics_port)}


def test_dockerfile_builds_the_service_and_the_loader() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            source = line.split()[1]
            assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    for package in ("core", "service", "loader"):
        assert f"COPY {package} ./{package}" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "deploy/callscreen.env", "*.env"} <= set(ignored)


SYSTEMD = DEPLOY / "systemd"


def unit(name: str) -> dict[str, str]:
    """A systemd unit's [Service] section (each key once in these files)."""
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string((SYSTEMD / name).read_text())
    return dict(parser["Service"])


def test_systemd_units_drain_on_stop_and_cap_memory() -> None:
    service, loader = unit("callscreen.service"), unit("callscreen-loader.service")
    assert " -m service --config " in service["ExecStart"]
    assert " -m loader --config " in loader["ExecStart"] and loader["ExecStart"].endswith(" run")
    config_of = {u["ExecStart"].split("--config ")[1].split()[0] for u in (service, loader)}
    assert len(config_of) == 1, "the service and the loader read different configs"
    # systemd waits for the supervisor's own drain and kill before it kills anything,
    # and signals the supervisor alone: it forwards SIGTERM to its workers itself.
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    assert float(service["TimeoutStopSec"]) > STOP_GRACE_S
    for each in (service, loader):
        assert each["EnvironmentFile"] == "/etc/callscreen.env"  # secrets: never in the unit
        assert each["User"] != "root" and each["NoNewPrivileges"] == "yes"
        assert re.fullmatch(r"\d+[MG]", each["MemoryMax"])
        assert each["ProtectSystem"] == "strict"


def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # In a copy that runs this checkout's Python as this user: verify checks both exist.
    for path in SYSTEMD.glob("*.service"):
        text = path.read_text().replace("/opt/callscreen/.venv/bin/python", sys.executable)
        text = re.sub(r"^(User|Group)=.*$", "", text, flags=re.MULTILINE)
        (tmp_path / path.name).write_text(text)
    done = run(analyze, "verify", *(str(p) for p in sorted(tmp_path.glob("*.service"))))
    assert done.returncode == 0 and not done.stderr.strip(), done.stdout + done.stderr
