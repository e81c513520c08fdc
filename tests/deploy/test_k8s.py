"""deploy/k8s: every overlay renders with `kubectl kustomize`, every object validates against the
Kubernetes schemas (kubernetes-validate, strict) or, for KEDA's CRDs, against KEDA's documented
fields; and what the manifests say about the program (command, config, ports, probe paths,
queues, storage path, metric names) is checked against the program itself."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer.main

from tests.conftest import REPO
from tests.deploy.conftest import K8S, K8S_VERSION, OVERLAYS, by_kind, kustomize, venv_tool, workloads
from tests.deploy.keda import check_keda

OUR_IMAGES = ("unimedvl-gateway", "unimedvl/gateway", "unimedvl-worker-cuda", "unimedvl/worker-cuda")


def validate(obj: dict[str, Any]) -> list[str]:
    """Problems of one rendered object: Kubernetes schema (strict) or the KEDA structural check."""
    if obj.get("apiVersion", "").startswith("keda.sh/"):
        return check_keda(obj)
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        return [f"{path}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {obj.get('apiVersion')} {obj.get('kind')} in Kubernetes {K8S_VERSION}"]
    return []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = rendered[overlay]
    problems = {f"{o['kind']}/{o['metadata']['name']}": validate(o) for o in objs}
    assert {k: v for k, v in problems.items() if v} == {}
    kinds = {o["kind"] for o in objs}
    assert {"StatefulSet", "Deployment", "Service", "Ingress", "PodDisruptionBudget", "ConfigMap"} <= kinds


def test_both_overlays_exist() -> None:
    assert OVERLAYS == ["demo", "production"]


def test_a_broken_manifest_is_caught(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    objs = rendered["production"]
    node = copy.deepcopy(by_kind(objs, "StatefulSet")["unimedvl-node"])
    container = node["spec"]["template"]["spec"]["containers"][0]
    container["imagePullPolcy"] = "Always"  # a misspelt field
    assert any("imagePullPolcy" in p for p in validate(node))
    node = copy.deepcopy(by_kind(objs, "StatefulSet")["unimedvl-node"])
    node["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "11112"  # a string
    assert validate(node)
    pdb = copy.deepcopy(by_kind(objs, "PodDisruptionBudget")["unimedvl-node"])
    pdb["spec"]["minAvailable"] = [1]
    assert validate(pdb)
    # KEDA: a misspelt trigger field, an integer in string-only metadata, a missing target
    scaled = copy.deepcopy(by_kind(objs, "ScaledObject")["unimedvl-worker-gpu"])
    scaled["spec"]["triggers"][0]["metadata"]["queueNmae"] = scaled["spec"]["triggers"][0]["metadata"].pop("queueName")
    scaled["spec"]["triggers"][1]["metadata"]["value"] = 2
    del scaled["spec"]["scaleTargetRef"]
    problems = check_keda(scaled)
    assert any("queueNmae: unknown field" in p for p in problems)
    assert any("queueName is required" in p for p in problems)
    assert any("value must be a string" in p for p in problems)
    assert any("scaleTargetRef.name is required" in p for p in problems)
    # an overlay naming a file that does not exist does not render
    broken = tmp_path / "broken"
    shutil.copytree(K8S, broken)
    kust = broken / "overlays" / "demo" / "kustomization.yaml"
    kust.write_text(kust.read_text().replace("- postgres.yaml", "- postgress.yaml"))
    with pytest.raises(AssertionError, match="postgress.yaml"):
        kustomize(broken / "overlays" / "demo")


# ------------------------------------------------------------------ the manifests against the program
def _our_containers(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload name, pod spec, container) for every container running one of our images."""
    out = []
    for name, w in workloads(objs).items():
        pod = w["spec"]["template"]["spec"]
        for c in pod["containers"]:
            if c["image"].split(":")[0].endswith(OUR_IMAGES):
                out.append((name, pod, c))
    return out


def _parse_cli(command: list[str], args: list[str]) -> tuple[str, dict[str, Any]]:
    """The subcommand and its parsed parameters, through the real `unimedvl` command line."""
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert command == [next(iter(scripts))] and scripts[command[0]] == "dicom_node.cli:app"
    from dicom_node.cli import app

    group = typer.main.get_command(app)
    sub = group.commands.get(args[0])  # type: ignore[attr-defined]
    assert sub is not None, f"`unimedvl {args[0]}` is not a command"
    ctx = sub.make_context(args[0], list(args[1:]))  # raises click.UsageError on unknown options
    return args[0], ctx.params


def _settings(objs: list[dict[str, Any]], pod: dict[str, Any], container: dict[str, Any], params: dict, tmp: Path):
    """The settings the container would load: its config file (from the mounted ConfigMap) and its
    UNIMEDVL_* environment (Secret values from the rendered Secrets, else a placeholder URL)."""
    from dicom_node.config import load_config

    cfg = Path(params["config"])
    mount = next(m for m in container["volumeMounts"] if cfg.is_relative_to(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = by_kind(objs, "ConfigMap")[volume["configMap"]["name"]]
    local = tmp / cfg.name
    local.write_text(configmap["data"][str(cfg.relative_to(mount["mountPath"]))])
    secrets = by_kind(objs, "Secret")
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e:
            ref = e["valueFrom"]["secretKeyRef"] if "valueFrom" in e else e["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]].get("stringData", {}).get(ref["key"], "")
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            secret = secrets.get(ref["name"])
            if secret is not None:
                import base64

                env[e["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
            else:  # production: created by the operator; any well-formed value will do here
                env[e["name"]] = {
                    "UNIMEDVL_DATABASE__URL": "postgresql+psycopg://u:p@db.example.org/unimedvl",
                    "UNIMEDVL_BROKER__URL": "amqp://u:p@mq.example.org:5672//",
                }[e["name"]]
    mp = pytest.MonkeyPatch()
    try:
        for k, v in env.items():
            if k.startswith("UNIMEDVL_"):
                mp.setenv(k, v)
        return load_config(local), env
    finally:
        mp.undo()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_commands_config_ports_and_mounts_match_the_program(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path
) -> None:
    from dicom_node.jobs.worker import worker_queues

    objs = rendered[overlay]
    seen = set()
    for name, pod, c in _our_containers(objs):
        sub, params = _parse_cli(c["command"], c["args"])
        seen.add(sub)
        settings, env = _settings(objs, pod, c, params, tmp_path)
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        # the instance store is on the shared claim, in the node and in every worker
        store = next(p for p in mounts if Path(settings.storage.path).is_relative_to(p))
        assert volumes[mounts[store]["name"]]["persistentVolumeClaim"]["claimName"] == "unimedvl-storage"
        # every path the program writes is a mounted volume (the root filesystem is read-only)
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        for path in (settings.storage.path, settings.model.cache_dir, "/tmp", env.get("HOME", "/tmp")):
            assert any(Path(path).is_relative_to(p) and not mounts[p].get("readOnly") for p in mounts), path
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        gpus = int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
        if sub == "node":
            assert name == "unimedvl-node" and params["api"] is True
            assert ports["dicom"] == settings.node.port
            assert ports["http"] == settings.http.port and settings.http.host == "0.0.0.0"
            assert ports.get("dicom-tls", 0) == settings.node.tls_port
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert c[probe]["httpGet"]["port"] == "http"
            assert gpus == 0
        else:
            assert sub == "worker"
            queues = worker_queues(params["queue"] or None)
            assert params["concurrency"] == 1  # one worker process per GPU
            device = params["device"]
            assert (device == "cuda" and gpus == 1) or (device == "cpu" and gpus == 0), (name, device, gpus)
            assert queues, name
    assert seen == {"node", "worker"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probe_paths_answer_without_login_and_documented_metrics_exist(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from dicom_node.api import create_app
    from dicom_node.console.guard import OPEN_PATHS
    from dicom_node.db import init_db

    objs = rendered[overlay]
    name, pod, c = next(x for x in _our_containers(objs) if x[0] == "unimedvl-node")
    _, params = _parse_cli(c["command"], c["args"])
    settings, _ = _settings(objs, pod, c, params, tmp_path)
    # the same app on a local database and broker (the probes only need the routes to answer)
    settings.database.url = f"sqlite:///{tmp_path / 'index.db'}"
    settings.broker.url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    settings.storage.path = str(tmp_path / "storage")
    Path(settings.storage.path).mkdir()
    settings.destinations = []
    init_db(settings.database.url)
    client = TestClient(create_app(settings), follow_redirects=False)
    paths = {probe: c[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    assert set(paths.values()) <= OPEN_PATHS  # a kubelet cannot log in
    for probe, path in paths.items():
        answer = client.get(path)  # no session, no token
        if probe == "readinessProbe":  # 503 with reasons while degraded (this database has no workers)
            assert answer.status_code in (200, 503) and answer.json()["status"] in ("ok", "degraded")
        else:
            assert answer.status_code == 200 and answer.json()["status"] == "ok"
    # the metric names deploy/k8s/README.md documents are the ones /metrics serves
    documented = set(re.findall(r"`(unimedvl_[a-z_]+)`", (K8S / "README.md").read_text()))
    assert len(documented) >= 5
    served = set(re.findall(r"^# TYPE (unimedvl_[a-z_]+) ", client.get("/metrics").text, re.M))
    served |= {f"{m}_total" for m in served} | {f"{m}_bucket" for m in served}
    # a gauge with no value yet (no worker has been active on this empty database) is not
    # served: it must at least be a metric the node defines
    source = "".join(f.read_text() for f in (REPO / "dicom_node").rglob("*.py"))
    assert {m for m in documented - served if f'"{m}"' not in source} == set()
    assert len(documented & served) >= len(documented) - 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_ingress_and_console_origins_agree(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path
) -> None:
    objs = rendered[overlay]
    pods = {n: w["spec"]["template"] for n, w in workloads(objs).items()}
    services = by_kind(objs, "Service")
    for sname, svc in services.items():
        selected = [t for t in pods.values() if svc["spec"]["selector"].items() <= t["metadata"]["labels"].items()]
        assert selected, f"Service {sname} selects no pod"
        names = {p["name"] for t in selected for c in t["spec"]["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port.get("targetPort") in names, (sname, port)
    dicom = services["unimedvl-dicom"]["spec"]
    # the modality's own address must reach the node (allowed_hosts, per-host connection limit)
    assert dicom["externalTrafficPolicy"] == "Local" and dicom["type"] in ("LoadBalancer", "NodePort")
    assert services["unimedvl-http"]["spec"]["publishNotReadyAddresses"] is True
    assert dicom["publishNotReadyAddresses"] is True
    (ingress,) = by_kind(objs, "Ingress").values()
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["port"]["name"] in {p["name"] for p in services[backend["name"]]["spec"]["ports"]}
    _, pod, c = next(x for x in _our_containers(objs) if x[0] == "unimedvl-node")
    _, params = _parse_cli(c["command"], c["args"])
    settings, _ = _settings(objs, pod, c, params, tmp_path)
    host = ingress["spec"]["rules"][0]["host"]
    tls = bool(ingress["spec"].get("tls"))
    assert settings.console.cookie_secure is tls
    assert f"{'https' if tls else 'http'}://{host}" in settings.console.allowed_origins


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_non_root_with_requests_and_budgets(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = rendered[overlay]
    pdbs = by_kind(objs, "PodDisruptionBudget")
    for name, pod, c in _our_containers(objs):
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0 and sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert pod["automountServiceAccountToken"] is False
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
        labels = workloads(objs)[name]["spec"]["template"]["metadata"]["labels"]
        assert any(p["spec"]["selector"]["matchLabels"].items() <= labels.items() for p in pdbs.values()), name
    for w in workloads(objs).values():
        for c in w["spec"]["template"]["spec"]["containers"]:
            assert c.get("resources", {}).get("requests"), c["name"]


def test_production_uses_external_services_and_shared_storage(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["production"]
    assert by_kind(objs, "Secret") == {}  # credentials are created in the cluster, never in git
    images = {c["image"].split(":")[0] for _, _, c in _our_containers(objs)}
    assert all("postgres" not in i and "rabbitmq" not in i for i in images)
    assert set(by_kind(objs, "StatefulSet")) == {"unimedvl-node"}
    assert by_kind(objs, "PersistentVolumeClaim")["unimedvl-storage"]["spec"]["accessModes"] == ["ReadWriteMany"]
    readme = (K8S / "README.md").read_text()
    refs = set()
    for _, pod, c in _our_containers(objs):
        refs |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "valueFrom" in e}
        refs |= {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    refs |= {i["secretName"] for ing in by_kind(objs, "Ingress").values() for i in ing["spec"].get("tls", [])}
    refs |= {r["name"] for a in by_kind(objs, "TriggerAuthentication").values() for r in a["spec"]["secretTargetRef"]}
    undocumented = {r for r in refs if f"`{r}`" not in readme}
    assert refs and undocumented == set()


def test_keda_scales_each_worker_on_the_queues_it_consumes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from dicom_node.jobs.celery_app import BATCH_QUEUE, GENERATION_QUEUE, UNDERSTANDING_QUEUE
    from dicom_node.jobs.worker import worker_queues

    objs = rendered["production"]
    deployments = by_kind(objs, "Deployment")
    auths = by_kind(objs, "TriggerAuthentication")
    scaled = by_kind(objs, "ScaledObject")
    covered = set()
    targets = [so["spec"]["scaleTargetRef"]["name"] for so in scaled.values()]
    assert len(targets) == len(set(targets)), "two ScaledObjects on one workload"
    for so in scaled.values():
        target = deployments[so["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"] or so["spec"].get("minReplicaCount", 1) == 0
        (c,) = target["spec"]["template"]["spec"]["containers"]
        _, params = _parse_cli(c["command"], c["args"])
        consumed = set(worker_queues(params["queue"] or None))
        triggered = {t["metadata"]["queueName"] for t in so["spec"]["triggers"]}
        assert triggered == consumed, so["metadata"]["name"]
        for t in so["spec"]["triggers"]:
            assert t["authenticationRef"]["name"] in auths
            # the management API counts unacknowledged (running) jobs too, so busy workers stay
            assert (
                t["metadata"]["protocol"] == "http" and t["metadata"].get("excludeUnacknowledged", "false") == "false"
            )
        covered |= triggered
    assert covered == {UNDERSTANDING_QUEUE, GENERATION_QUEUE, BATCH_QUEUE}
    batch = next(so for so in scaled.values() if so["spec"]["triggers"][0]["metadata"]["queueName"] == BATCH_QUEUE)
    assert batch["spec"]["minReplicaCount"] == 0  # scale to zero for the research queue
    # the demo has no KEDA (a single-node cluster without the operator)
    assert not by_kind(rendered["demo"], "ScaledObject")


def test_a_missing_tool_fails_the_test_instead_of_skipping_it() -> None:
    with pytest.raises(pytest.fail.Exception, match="run scripts/setup.sh"):
        venv_tool("no-such-deploy-tool")
