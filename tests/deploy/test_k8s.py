"""deploy/k8s: every overlay renders with `kubectl kustomize`, every object validates against the
Kubernetes schemas (kubernetes-validate, strict) or, for KEDA's CRDs, against KEDA's documented
fields; and what the manifests say about the program (command, config, ports, probe paths,
queues, storage path, metric names, the workers' remote mode: node_url vs the node's Service,
the token Secret, the README's token commands) is checked against the program itself."""

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

    sub: Any = typer.main.get_command(app)
    rest = list(args)
    while hasattr(sub, "commands"):  # a group (`unimedvl users add ...`): down to the command
        found = sub.commands.get(rest[0])
        assert found is not None, f"`unimedvl {' '.join(args[: len(args) - len(rest) + 1])}` is not a command"
        sub, rest = found, rest[1:]
    ctx = sub.make_context(args[0], rest)  # raises click.UsageError on unknown options
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
                    "UNIMEDVL_WORKER__NODE_TOKEN": "umv_placeholder",
                }[e["name"]]
    mp = pytest.MonkeyPatch()
    try:
        for k, v in env.items():
            if k.startswith("UNIMEDVL_"):
                mp.setenv(k, v)
        return load_config(local), env
    finally:
        mp.undo()


def _is_remote_worker(settings: Any) -> bool:
    """What the worker process would build from these settings: the node's API, no storage path.
    (The engine is created lazily: nothing connects to the placeholder database.)"""
    from dicom_node.jobs.context import WorkerContext
    from dicom_node.jobs.remote import RemoteIO

    ctx = WorkerContext(settings)
    try:
        return ctx.storage is None and isinstance(ctx.job_io, RemoteIO)
    finally:
        ctx.job_io.client.close()  # type: ignore[attr-defined]
        ctx.db.dispose()


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
        claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v}
        written = [settings.model.cache_dir, "/tmp", env.get("HOME", "/tmp")]
        if sub == "node":  # the instance store is the node's claim
            store = next(p for p in mounts if Path(settings.storage.path).is_relative_to(p))
            assert volumes[mounts[store]["name"]]["persistentVolumeClaim"]["claimName"] == "unimedvl-storage"
            written.append(settings.storage.path)
        else:  # remote mode: no worker mounts the instance store, at its path or any other
            assert "unimedvl-storage" not in claims, name
            assert not any(Path(settings.storage.path).is_relative_to(p) for p in mounts), name
            assert _is_remote_worker(settings), name
        # every path the program writes is a mounted volume (the root filesystem is read-only)
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        for path in written:
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


def test_production_uses_external_services_and_secrets(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["production"]
    assert by_kind(objs, "Secret") == {}  # credentials are created in the cluster, never in git
    images = {c["image"].split(":")[0] for _, _, c in _our_containers(objs)}
    assert all("postgres" not in i and "rabbitmq" not in i for i in images)
    assert set(by_kind(objs, "StatefulSet")) == {"unimedvl-node"}
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


# ------------------------------------------------------------------ workers without the shared volume
WORKERS = {"unimedvl-worker-gpu", "unimedvl-worker-understanding"}
TOKEN_SECRET = {"name": "unimedvl-worker-token", "key": "token"}


def _claims(pod: dict[str, Any]) -> set[str]:
    return {v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_node_storage_is_read_write_once_and_no_worker_mounts_it(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objs = rendered[overlay]
    claim = by_kind(objs, "PersistentVolumeClaim")["unimedvl-storage"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    users = {n for n, w in workloads(objs).items() if "unimedvl-storage" in _claims(w["spec"]["template"]["spec"])}
    assert users == {"unimedvl-node"}
    workers = {n for n, _, c in _our_containers(objs) if c["args"][0] == "worker"}
    assert workers == (WORKERS | {"unimedvl-worker-batch"} if overlay == "production" else WORKERS)
    # no other claim is ReadWriteMany except the research batch outputs (autoscaling component)
    pvcs = by_kind(objs, "PersistentVolumeClaim")
    rwx = {n for n, pvc in pvcs.items() if "ReadWriteMany" in pvc["spec"]["accessModes"]}
    assert rwx == ({"unimedvl-batch"} if overlay == "production" else set())
    if overlay == "production":
        # a batch's --out folder (written by the batch workers, results.parquet by the driver in
        # the node pod) is the same writable path on the same claim in both pods
        at = {}
        for name in ("unimedvl-node", "unimedvl-worker-batch"):
            pod = workloads(objs)[name]["spec"]["template"]["spec"]
            vol = next(
                v["name"]
                for v in pod["volumes"]
                if v.get("persistentVolumeClaim", {}).get("claimName") == "unimedvl-batch"
            )
            (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == vol]
            assert not mount.get("readOnly")
            at[name] = mount["mountPath"]
        assert len(set(at.values())) == 1, at
        assert f"--out {at['unimedvl-node']}/" in (K8S / "README.md").read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_worker_reaches_the_node_service_with_the_token_secret(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path
) -> None:
    from urllib.parse import urlsplit

    objs = rendered[overlay]
    namespace = by_kind(objs, "Namespace")
    (ns,) = namespace
    services = by_kind(objs, "Service")
    node = by_kind(objs, "StatefulSet")["unimedvl-node"]["spec"]["template"]
    (node_c,) = [c for c in node["spec"]["containers"] if c["name"] == "node"]
    _, node_params = _parse_cli(node_c["command"], node_c["args"])
    node_settings, _ = _settings(objs, node["spec"], node_c, node_params, tmp_path)
    assert not node_settings.worker.node_url  # the node itself is not a remote worker
    node_ports = {p["name"]: p["containerPort"] for p in node_c["ports"]}
    checked = 0
    for name, pod, c in _our_containers(objs):
        if c["args"][0] != "worker":
            continue
        env = {e["name"]: e for e in c["env"]}
        assert env["UNIMEDVL_WORKER__NODE_TOKEN"]["valueFrom"]["secretKeyRef"] == TOKEN_SECRET, name
        url = urlsplit(env["UNIMEDVL_WORKER__NODE_URL"]["value"])
        assert url.scheme == "http" and url.path in ("", "/"), name
        # SERVICE, SERVICE.NAMESPACE or SERVICE.NAMESPACE.svc[.cluster.local], in this namespace
        host = (url.hostname or "").removesuffix(".cluster.local").removesuffix(".svc").split(".")
        assert len(host) == 1 or host[1:] == [ns], (name, url.hostname)
        svc = services[host[0]]
        assert svc["metadata"]["namespace"] == ns
        assert svc["spec"]["selector"].items() <= node["metadata"]["labels"].items(), "not the node's Service"
        (port,) = [p for p in svc["spec"]["ports"] if p["port"] == url.port]
        assert node_ports[port["targetPort"]] == node_settings.http.port
        # the settings the container would load: remote mode, the same URL, the token
        settings, _ = _settings(objs, pod, c, _parse_cli(c["command"], c["args"])[1], tmp_path)
        assert settings.worker.node_url == url.geturl() and settings.worker.node_token
        checked += 1
    assert checked >= 2


def _documented_token_commands() -> tuple[list[list[str]], list[str]]:
    """From deploy/k8s/README.md "The worker token": the `unimedvl ...` commands run in the node
    pod (after `kubectl ... exec ... --`) and the `kubectl create secret` line, split as a shell would."""
    import shlex

    readme = (K8S / "README.md").read_text()
    section = readme.split("## The worker token", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    execs, secret = [], []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if "exec" in words and "--" in words:
            execs.append([*words[:-1], words[-1].removesuffix(")")])  # TOKEN=$(kubectl ... )
        if "create" in words and "secret" in words:
            secret = words
    return execs, secret


def test_documented_worker_token_commands_create_a_worker_token(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The README's commands, run through the real CLI on a local database, give one line: a
    token of a worker-role user; the Secret they create is the one the workers read."""
    from typer.testing import CliRunner

    from dicom_node.cli import app
    from dicom_node.console.auth import token_principal
    from dicom_node.db import make_engine

    execs, secret = _documented_token_commands()
    assert len(execs) == 2 and secret, "the README's token block changed shape"
    # the main README's Kubernetes subsection shows the same commands
    block = (K8S / "README.md").read_text().split("## The worker token", 1)[1].split("```", 2)[1]
    main = (REPO / "README.md").read_text().split("### Kubernetes", 1)[1]
    assert [line for line in block.strip().splitlines() if line not in main] == []
    node = by_kind(rendered["production"], "StatefulSet")["unimedvl-node"]
    config = _parse_cli(["unimedvl"], node["spec"]["template"]["spec"]["containers"][0]["args"])[1]["config"]
    db = tmp_path / "index.db"
    cfg = tmp_path / "unimedvl.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///{db}"\n[storage]\npath = "{tmp_path / "s"}"\n')
    outputs = []
    for words in execs:
        # the pod is the node StatefulSet's only pod; stdin goes in with -i where a password is piped
        assert f"{node['metadata']['name']}-0" in words, words
        args = words[words.index("--") + 1 :]
        assert args[0] == "unimedvl"
        _, params = _parse_cli(args[:1], args[1:])
        assert str(params["config"]) == str(config)
        local = [str(cfg) if a == str(config) else a for a in args[1:]]
        stdin = "x" * 32 + "\n" if params.get("password_stdin") else None
        if params.get("password_stdin"):
            assert "-i" in words[: words.index("--")], "a piped password needs kubectl exec -i"
        result = CliRunner().invoke(app, local, input=stdin)
        assert result.exit_code == 0, result.output
        outputs.append(result.stdout)
    token = outputs[-1].strip()
    assert "\n" not in token and token, outputs[-1]  # $(...) captures exactly the token
    principal = token_principal(make_engine(f"sqlite:///{db}"), token)
    assert principal is not None and principal.role == "worker"
    # the node's app lets this token retrieve (404: nothing stored) but not read console pages
    from fastapi.testclient import TestClient

    from dicom_node.api import create_app
    from dicom_node.config import load_config

    settings = load_config(cfg)
    settings.broker.url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    settings.destinations = []
    Path(settings.storage.path).mkdir()
    client = TestClient(create_app(settings), follow_redirects=False)
    bearer = {"Authorization": f"Bearer {token}"}
    assert client.get("/dicomweb/studies/1.2.3/series/1.2.3.4", headers=bearer).status_code == 404
    assert client.get("/dicomweb/studies/1.2.3/series/1.2.3.4").status_code == 401
    assert client.get("/api/jobs", headers=bearer).status_code == 403
    # kubectl create secret generic unimedvl-worker-token --from-literal=token=...
    assert secret[secret.index("generic") + 1] == TOKEN_SECRET["name"]
    literal = next(w for w in secret if w.startswith("--from-literal="))
    assert literal.removeprefix("--from-literal=").split("=", 1)[0] == TOKEN_SECRET["key"]
