"""The Kubernetes manifests in deploy/kubernetes/: valid, consistent, and safe to stop.

Every manifest is validated offline against the Kubernetes schemas that the
``kubernetes-validate`` package ships (strict: unknown fields are errors), for the
oldest and the newest version it knows. The ServiceMonitor is a Prometheus Operator
CRD with no schema there: its metadata and selector are validated against the
Kubernetes definitions and the rest is checked by reading it. The config watcher
sidecar runs here for real, against a stand-in for the reload endpoint and against a
real service process whose config file is swapped the way the kubelet swaps it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import sys
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import kubernetes_validate
import pytest
import yaml
from aiohttp import web
from redis.asyncio import Redis
from referencing import Registry, Resource

from core.config import Config, parse_config
from devtools.redis_server import RedisProcess, free_port
from service.procs.workers import STOP_GRACE_S
from tests.helpers import REJECT, body_from, holds_for, load_list, wait_for
from tests.procs import BLOCKLIST_CONFIG, ServiceProcess, scrape

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
#: The oldest Kubernetes the manifests are written for, and the newest the validator knows.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
#: Where the config is mounted in the pods (configmap.yaml, deployment.yaml).
CONFIG_DIR = "/etc/callscreen"
#: The Dockerfile's WORKDIR: the repo's files are found under it in the image.
IMAGE_ROOT = "/app/"


def documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((KUBERNETES / name).read_text()) if doc]


def manifests() -> dict[str, list[dict[str, Any]]]:
    """Every Kubernetes manifest file but the kustomization, by file name."""
    return {
        path.name: documents(path.name)
        for path in sorted(KUBERNETES.glob("*.yaml"))
        if path.name != "kustomization.yaml"
    }


def resource(kind: str, name: str) -> dict[str, Any]:
    found = [
        doc
        for docs in manifests().values()
        for doc in docs
        if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_spec(deployment: str) -> dict[str, Any]:
    spec: dict[str, Any] = resource("Deployment", deployment)["spec"]["template"]["spec"]
    return spec


def container(deployment: str, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        c for c in pod_spec(deployment)["containers"] if c["name"] == name
    ]
    assert len(found) == 1, f"{deployment}: {len(found)} containers named {name}"
    return found[0]


def config() -> Config:
    """The config the pods run with, as the service parses it."""
    text = resource("ConfigMap", "callscreen-config")["data"]["config.yaml"]
    return parse_config(yaml.safe_load(text), source="configmap", base_dir=Path(CONFIG_DIR))


def version() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    text: str = project["version"]
    return text


def quantity(text: str) -> float:
    """A Kubernetes CPU or memory quantity (``500m``, ``2``, ``1Gi``) as a number."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi)?", str(text))
    assert found, f"not a quantity: {text}"
    scale = {None: 1, "m": 0.001, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}[found[2]]
    return float(found[1]) * scale


@pytest.mark.parametrize("kubernetes", VERSIONS)
def test_every_manifest_passes_the_kubernetes_schemas(kubernetes: str) -> None:
    checked = set()
    for name, docs in manifests().items():
        for doc in docs:
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # a CRD: see test_the_service_monitor_scrapes_the_jobs_the_alerts_use
            try:
                kubernetes_validate.validate(doc, kubernetes, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = ".".join(str(part) for part in error.path)
                pytest.fail(f"{name}: {doc['kind']} {path}: {error.message}")
            checked.add(doc["kind"])
    wanted = {"Namespace", "ConfigMap", "Secret", "Service", "Deployment"}
    assert wanted | {"PodDisruptionBudget", "HorizontalPodAutoscaler"} <= checked
    # The validator is not a rubber stamp: a misspelt field and a wrong type are refused.
    deployment = copy.deepcopy(resource("Deployment", "callscreen"))
    probe = deployment["spec"]["template"]["spec"]["containers"][0]
    probe["readinesProbe"] = probe.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes, strict=True)
    budget = copy.deepcopy(resource("PodDisruptionBudget", "callscreen"))
    budget["spec"]["selector"] = "app=callscreen"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(budget, kubernetes, strict=True)


def test_kustomization_applies_every_manifest_but_the_secret_with_this_version() -> None:
    kustomization = documents("kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    # The Secret is made once by hand: applying an empty one later would blank it.
    assert listed == set(manifests()) - {"secret.example.yaml"}
    (image,) = kustomization["images"]
    assert image["name"] == "callscreen" and image["newTag"] == version()
    namespace = resource("Namespace", kustomization["namespace"])
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for docs in manifests().values():
        for doc in docs:
            if doc["kind"] == "Deployment":
                for each in doc["spec"]["template"]["spec"]["containers"]:
                    assert each["image"] == f"callscreen:{version()}", each["name"]


def test_a_stopping_pod_keeps_serving_until_the_endpoints_forgot_it_then_drains() -> None:
    spec = pod_spec("callscreen")
    service = container("callscreen", "service")
    command = service["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    assert pre_stop_s >= 3, "endpoint removal takes a few seconds to reach every node"
    # The kubelet waits for the preStop hook and then the supervisor's own stop (the
    # drain, then SIGKILL of a worker that overran) before it kills anything.
    assert spec["terminationGracePeriodSeconds"] >= pre_stop_s + STOP_GRACE_S + 5
    strategy = resource("Deployment", "callscreen")["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_probes_use_the_handler_port_and_workers_match_the_cpu() -> None:
    settings = config()
    service = container("callscreen", "service")
    ports = {port["name"]: port["containerPort"] for port in service["ports"]}
    assert ports == {"http": settings.server.port, "operator": settings.server.admin_port}
    assert service["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert service["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert service["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert service["args"][-2:] == ["--config", f"{CONFIG_DIR}/config.yaml"]
    # Several workers, one per core of the pod's CPU (a quota is invisible to the process).
    resources_ = service["resources"]
    assert settings.server.workers > 1
    assert settings.server.workers == quantity(resources_["limits"]["cpu"])
    # Guaranteed QoS for the pod: requests equal limits in every container.
    for each in pod_spec("callscreen")["containers"]:
        assert each["resources"]["requests"] == each["resources"]["limits"], each["name"]
    # The loader: `loader run`, its metrics port the one the config names.
    loader = container("callscreen-loader", "loader")
    assert loader["args"][:3] == ["python", "-m", "loader"] and loader["args"][-1] == "run"
    assert loader["ports"] == [{"name": "metrics", "containerPort": settings.loader.metrics_port}]
    assert settings.loader.metrics_host == "0.0.0.0" and settings.server.host == "0.0.0.0"
    assert resource("Deployment", "callscreen-loader")["spec"]["strategy"] == {"type": "Recreate"}


def test_pods_run_as_the_images_user_on_a_read_only_root() -> None:
    uid = re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert uid
    for deployment in ("callscreen", "callscreen-loader"):
        spec = pod_spec(deployment)
        assert spec["automountServiceAccountToken"] is False
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == int(uid[1])
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        for each in spec["containers"]:
            context = each["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, each["name"]
            assert context["allowPrivilegeEscalation"] is False, each["name"]
            assert context["capabilities"]["drop"] == ["ALL"], each["name"]
            assert {"limits", "requests"} <= set(each["resources"]), each["name"]
            for mount in each["volumeMounts"]:
                # A subPath mount is never updated: the reload would not see a change.
                assert "subPath" not in mount, mount
                if not mount.get("readOnly"):  # the only writable places: scratch space
                    assert "emptyDir" in volumes[mount["name"]], mount
    # The workers share the numbers lists through /dev/shm, which must be memory.
    mounts = {m["mountPath"]: m["name"] for m in container("callscreen", "service")["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod_spec("callscreen")["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert config().cache.share_dir == "/dev/shm"
    assert {"/tmp", f"{CONFIG_DIR}"} <= set(mounts)


def test_the_config_map_is_a_valid_config_with_secrets_from_the_secret() -> None:
    settings = config()
    # Handler auth on; every variable the config names is a key of the Secret, and the
    # Secret in the repo is an example with every value empty.
    assert settings.auth.enabled and settings.auth.secret_env
    secret = resource("Secret", "callscreen")["stringData"]
    named = {settings.auth.secret_env, settings.admin.tokens_env, "CALLSCREEN_REDIS_URL"}
    assert named <= set(secret)
    assert set(secret.values()) == {""}, "secret.example.yaml must hold no secret"
    for deployment, name in (("callscreen", "service"), ("callscreen-loader", "loader")):
        assert container(deployment, name)["envFrom"] == [{"secretRef": {"name": "callscreen"}}]
    # List sources in the image are files the Dockerfile copies from the repo.
    dockerfile = (ROOT / "Dockerfile").read_text()
    for spec in settings.lists.values():
        assert spec.source
        path = settings.resolve_source(spec.source)
        if path.startswith(IMAGE_ROOT):
            relative = path.removeprefix(IMAGE_ROOT)
            assert (ROOT / relative).is_file(), path
            assert f"COPY {relative.split('/')[0]} " in dockerfile, path
    # Both Deployments mount this ConfigMap where their --config points.
    for deployment in ("callscreen", "callscreen-loader"):
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        assert volumes["config"]["configMap"]["name"] == "callscreen-config"


def test_services_budget_and_autoscaler_select_the_service_pods() -> None:
    labels = resource("Deployment", "callscreen")["spec"]["template"]["metadata"]["labels"]
    for name in ("callscreen", "callscreen-metrics"):
        selector = resource("Service", name)["spec"]["selector"]
        assert selector.items() <= labels.items(), name
    # The handler's Service carries the handler port only; operators' ports stay apart.
    assert [p["targetPort"] for p in resource("Service", "callscreen")["spec"]["ports"]] == ["http"]
    assert [
        p["targetPort"] for p in resource("Service", "callscreen-metrics")["spec"]["ports"]
    ] == ["operator"]
    budget = resource("PodDisruptionBudget", "callscreen")["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    autoscaler = resource("HorizontalPodAutoscaler", "callscreen")["spec"]
    assert autoscaler["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "callscreen"
    }  # fmt: skip
    (metric,) = autoscaler["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] < 100
    # The budget leaves a pod up whenever the autoscaler's minimum is running.
    assert autoscaler["minReplicas"] > budget["maxUnavailable"]
    assert resource("Deployment", "callscreen")["spec"]["replicas"] == autoscaler["minReplicas"]


def kubernetes_definitions() -> Registry[Any]:
    folder = f"kubernetes-json-schema/v{kubernetes_validate.latest_version()}-local-strict"
    text = resources.files("kubernetes_validate").joinpath(f"{folder}/_definitions.json")
    definitions = Resource.from_contents(json.loads(text.read_text()))
    registry: Registry[Any] = definitions @ Registry()
    return registry


def check_definition(value: Any, definition: str) -> None:
    schema = {"$ref": f"https://kubernetes.io/api/_definitions.json#/$defs/{definition}"}
    validator = jsonschema.Draft202012Validator(schema, registry=kubernetes_definitions())
    validator.validate(value)


def test_the_service_monitor_scrapes_the_jobs_the_alerts_use() -> None:
    monitor = resource("ServiceMonitor", "callscreen")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    spec = monitor["spec"]
    # What the Kubernetes schemas can say about it.
    check_definition(monitor["metadata"], "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
    check_definition(spec["selector"], "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector")
    with pytest.raises(jsonschema.ValidationError):  # the check does refuse a bad selector
        check_definition(
            {"matchLabels": ["a"]}, "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"
        )
    # The rest, by reading: the fields the operator knows, on Services that exist.
    assert set(spec) <= {"jobLabel", "selector", "endpoints", "namespaceSelector"}
    selected = [
        doc
        for docs in manifests().values()
        for doc in docs
        if doc["kind"] == "Service"
        and spec["selector"]["matchLabels"].items() <= doc["metadata"]["labels"].items()
    ]
    assert {doc["metadata"]["name"] for doc in selected} == {
        "callscreen-metrics",
        "callscreen-loader",
    }
    settings = config()
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["path"] == "/metrics"
        for service in selected:
            ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
            assert endpoint["port"] in ports, service["metadata"]["name"]
            assert ports[endpoint["port"]] in (
                settings.server.admin_port,
                settings.loader.metrics_port,
            )
    # Prometheus names each job after the Service's jobLabel: the jobs the alerts watch.
    jobs = {service["metadata"]["labels"][spec["jobLabel"]] for service in selected}
    alert_jobs = set(re.findall(r'job="([^"]+)"', ALERTS.read_text()))
    assert jobs == alert_jobs == {"callscreen", "callscreen-loader"}


def watcher_source() -> str:
    text: str = resource("ConfigMap", "callscreen-config-watcher")["data"]["watch.py"]
    return text


def test_the_watcher_sidecar_runs_the_script_with_the_first_admin_token() -> None:
    watcher = container("callscreen", "config-watcher")
    assert watcher["args"] == ["python", "-u", "/opt/watcher/watch.py"]
    mounts = {m["name"]: m["mountPath"] for m in watcher["volumeMounts"]}
    assert mounts == {"config": CONFIG_DIR, "watcher": "/opt/watcher"}
    (env,) = watcher["env"]
    assert env["name"] == config().admin.tokens_env
    assert env["valueFrom"]["secretKeyRef"] == {"name": "callscreen", "key": env["name"]}
    # It calls the operator listener of its own pod (pods share one network namespace).
    default = re.search(r'"WATCH_RELOAD_URL", "([^"]+)"', watcher_source())
    assert default and default[1] == f"http://127.0.0.1:{config().server.admin_port}/v1/reload"


def swap_in(folder: Path, text: str, generation: int) -> None:
    """Replace config.yaml the way the kubelet does: a new folder, then one symlink swap."""
    data = folder / f"..gen_{generation}"
    data.mkdir()
    (data / "config.yaml").write_text(text)
    link = folder / "..data_tmp"
    link.symlink_to(data.name)
    link.replace(folder / "..data")
    if not (folder / "config.yaml").is_symlink():
        (folder / "config.yaml").symlink_to("..data/config.yaml")


async def test_the_watcher_asks_its_pod_to_reload_once_per_config_change(tmp_path: Path) -> None:
    calls: list[str] = []
    status = {"code": 200}

    async def reload(request: web.Request) -> web.Response:
        calls.append(request.headers.get("Authorization", ""))
        return web.json_response({"reloaded": status["code"] == 200}, status=status["code"])

    app = web.Application()
    app.router.add_post("/v1/reload", reload)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    folder = tmp_path / "config"
    folder.mkdir()
    swap_in(folder, "policies: {}\n", 1)
    script = tmp_path / "watch.py"
    script.write_text(watcher_source())
    env = {
        **os.environ,
        "CALLSCREEN_ADMIN_TOKENS": "first-token, second-token",
        "WATCH_CONFIG": str(folder / "config.yaml"),
        "WATCH_RELOAD_URL": f"http://127.0.0.1:{port}/v1/reload",
        "WATCH_INTERVAL_S": "0.05",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-u", str(script), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout
    try:
        await asyncio.wait_for(process.stdout.readline(), timeout=30)  # "watching ..."
        # A change while the service does not answer: retried until it is delivered.
        swap_in(folder, "policies: {a: 1}\n", 2)
        line = await asyncio.wait_for(process.stdout.readline(), timeout=10)
        assert b"not delivered" in line, line
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()

        async def called(count: int) -> bool:
            return len(calls) >= count

        async def called_exactly(count: int) -> bool:
            return len(calls) == count

        await wait_for(lambda: called(1), timeout_s=10)
        assert calls == ["Bearer first-token"]
        # Unchanged: no more calls over ten of the watcher's intervals.
        await holds_for(lambda: called_exactly(1), 0.5, what="one reload call")
        # A config the service refuses is asked for once, not again and again.
        status["code"] = 422
        swap_in(folder, "policies: {b: 2}\n", 3)
        await wait_for(lambda: called(2), timeout_s=10)
        await holds_for(lambda: called_exactly(2), 0.5, what="two reload calls")
        # The next change is delivered again.
        status["code"] = 200
        swap_in(folder, "policies: {c: 3}\n", 4)
        await wait_for(lambda: called(3), timeout_s=10)
        assert calls[-1] == "Bearer first-token"
    finally:
        process.kill()
        await process.wait()
        await runner.cleanup()


async def start_watcher(script: Path, env: dict[str, str]) -> Any:
    """The watcher script (written at ``script``) as a process, once it says it watches."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-u", str(script), env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout
    await asyncio.wait_for(process.stdout.readline(), timeout=30)  # "watching ..."
    return process


async def test_the_watcher_reloads_a_real_service_when_the_kubelet_swaps_its_config(
    tmp_path: Path, redis_server: RedisProcess, redis: Redis
) -> None:
    """The sidecar and a real supervisor with 2 workers, config swapped as by the kubelet:
    a valid policy reaches every worker; an invalid one is refused and the last good
    policy keeps answering."""
    await load_list(redis, "blocklist", "numbers", ["5162065613"])
    token = "watcher-test-token-0123456789"
    admin_port = free_port()
    server = {**BLOCKLIST_CONFIG["server"], "admin_port": admin_port}
    folder = tmp_path / "config"
    service = ServiceProcess(
        folder,
        redis_server.url,
        workers=2,
        overrides={"server": server},
        env={"CALLSCREEN_ADMIN_TOKENS": token},
    )
    first: dict[str, Any] = yaml.safe_load(service.config_path.read_text())
    service.config_path.unlink()  # the kubelet's layout: config.yaml -> ..data/config.yaml
    swap_in(folder, yaml.safe_dump(first), 1)
    watch_only = copy.deepcopy(first)
    watch_only["policies"]["default"]["rules"][0]["dry_run"] = True  # blocked caller passes
    invalid = {**copy.deepcopy(first), "default_policy": "nonexistent"}
    watcher = None
    try:
        service.start()
        await service.ready()
        script = tmp_path / "watch.py"
        script.write_text(watcher_source())
        watcher = await start_watcher(
            script,
            {
                "CALLSCREEN_ADMIN_TOKENS": token,
                "WATCH_CONFIG": str(service.config_path),
                "WATCH_RELOAD_URL": f"http://127.0.0.1:{admin_port}/v1/reload",
                "WATCH_INTERVAL_S": "0.1",
            },
        )
        assert watcher.stdout
        async with aiohttp.ClientSession() as session:

            async def answers() -> list[Any]:
                found = []
                for _ in range(6):  # both workers
                    body = body_from("15162065613")
                    async with session.post(f"{service.url}/tg/main", json=body) as response:
                        assert response.status == 200
                        found.append(await response.json())
                return found

            assert await answers() == [REJECT] * 6
            swap_in(folder, yaml.safe_dump(watch_only), 2)
            line = await asyncio.wait_for(watcher.stdout.readline(), timeout=30)
            assert b"reload answered 202" in line, line

            async def switched() -> bool:
                return await answers() == [[]] * 6

            await wait_for(switched, timeout_s=10.0, interval_s=0.1)
            swap_in(folder, yaml.safe_dump(invalid), 3)
            line = await asyncio.wait_for(watcher.stdout.readline(), timeout=30)
            assert b"reload answered 422" in line, line

            async def refused() -> bool:
                return "config reload refused" in service.log_text()

            await wait_for(refused, timeout_s=10.0, interval_s=0.1)
            assert "default_policy: unknown policy 'nonexistent'" in service.log_text()
            for _ in range(3):  # the last good policy answers on, in every worker
                assert await answers() == [[]] * 6
        samples = await scrape(f"http://127.0.0.1:{admin_port}")
        assert samples['callscreen_config_reload_total{outcome="applied"}'] == 1
        assert samples['callscreen_config_reload_total{outcome="invalid"}'] == 1
    finally:
        if watcher is not None:
            watcher.kill()
            await watcher.wait()
        service.stop()
