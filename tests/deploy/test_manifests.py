"""Static checks of the cluster deployment under deploy/ (Dockerfile, kustomize manifests, secret templates).

No Docker engine, kubectl or cluster runs here, so these tests are what keeps the manifests honest: they read the
YAML as kustomize would find it and hold it against the code itself (documented settings, service ports, each
service's settings validation, the Triton command line `aidc up` uses, the torch pin). Overlays' patches are read,
not applied. The image's health check runs for real against a gRPC server requiring mutual TLS.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import importlib.util
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import jsonschema
import pytest
import yaml
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.cli.main import documented_settings
from services.mesh.certs import init_certificates
from services.mesh.config import SERVICE_NAMES, MeshSettings, load_settings, parse_address
from services.mesh.peers import parse_proxies
from services.platform.components import Platform, S3Credentials, triton_argv
from services.platform.config import PlatformSettings
from services.serving.triton import restricted_protocol_flags
from tests.conftest import ROOT, free_port

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
DATASTORES = K8S / "datastores"
GPU = K8S / "overlays" / "gpu"
SECRETS = K8S / "secrets" / "secrets.example.yaml"
DOCKER = DEPLOY / "docker"

#: Read by the image (entrypoint, health check), not by a settings class.
IMAGE_VARIABLES = {"AIDC_SERVICE"}
#: The uid the Dockerfile runs as; every pod of our image must run as it.
IMAGE_UID = 10001
WORKLOADS = ("Deployment", "StatefulSet", "Job")
#: Triton flags whose values depend on the site (paths, addresses, ports, timeouts), not on behaviour.
TRITON_SITE_FLAGS = {
    "--model-repository",
    "--backend-directory",
    "--grpc-address",
    "--grpc-port",
    "--exit-timeout-secs",
    "--trace-config opentelemetry,url",
}
#: How Triton admits only the platform differs by site. `aidc up`: mutual TLS with a CA of Triton's own, no HTTP
#: endpoint, no metrics (a secret on Triton's command line would be readable by every local user). A cluster: the
#: restricted-protocol secret from a Secret (visible only inside Triton's pod), HTTP for the kubelet's probes of
#: health, metrics for Prometheus, and a NetworkPolicy.
TRITON_LOCAL_ACCESS_FLAGS = {
    "--grpc-use-ssl",
    "--grpc-use-ssl-mutual",
    "--grpc-root-cert",
    "--grpc-server-cert",
    "--grpc-server-key",
    "--allow-http",
    "--allow-metrics",
}
TRITON_CLUSTER_ACCESS_FLAGS = {
    "--grpc-restricted-protocol",
    "--http-restricted-api",
    "--http-address",
    "--http-port",
    "--metrics-address",
    "--metrics-port",
}
#: Flags the GPU overlay tunes: `aidc up` runs on CPU with the GPU pools off.
TRITON_GPU_FLAGS = {"--pinned-memory-pool-byte-size", "--cuda-memory-pool-byte-size", "--allow-gpu-metrics"}


# -- reading the tree ---------------------------------------------------------------------------------------------


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _kustomization(directory: Path) -> dict[str, Any]:
    return _yaml_docs(directory / "kustomization.yaml")[0]


def _generator_files(entry: dict[str, Any]) -> list[str]:
    """The files a configMapGenerator/secretGenerator entry reads (``key=path`` names the key)."""
    return [item.split("=", 1)[-1] for item in [*entry.get("files", []), *entry.get("envs", [])]]


def _resources(directory: Path) -> list[dict[str, Any]]:
    """Every object a kustomization's resources and components declare, recursively (patches not applied)."""
    kustomization = _kustomization(directory)
    docs: list[dict[str, Any]] = []
    for entry in [*kustomization.get("resources", []), *kustomization.get("components", [])]:
        path = (directory / entry).resolve()
        docs.extend(_resources(path) if path.is_dir() else _yaml_docs(path))
    return docs


def _named(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def _pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod template: the workloads' and each group of a RayCluster (its head and worker groups)."""
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in WORKLOADS:
            yield name, doc["spec"]["template"]["spec"]
        elif doc["kind"] == "RayCluster":
            yield f"{name}/head", doc["spec"]["headGroupSpec"]["template"]["spec"]
            for group in doc["spec"]["workerGroupSpecs"]:
                yield f"{name}/{group['groupName']}", group["template"]["spec"]


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _env_file(path: Path) -> dict[str, str]:
    """A kustomize env file: KEY=VALUE lines, # comments."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            out[key.strip()] = value
    return out


def _container(docs: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    pod = _named(docs, "Deployment")[deployment]["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == deployment)


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _requirement(requirements: list[str], name: str) -> str:
    return next(r for r in requirements if re.match(rf"{re.escape(name)}\b", r))


@functools.cache
def _all() -> list[dict[str, Any]]:
    """What `kubectl apply -k overlays/gpu` creates (before its patches)."""
    return _resources(GPU)


@functools.cache
def _base_docs() -> list[dict[str, Any]]:
    return _resources(BASE)


@functools.cache
def _config() -> dict[str, str]:
    """The aidc-config ConfigMap."""
    return _env_file(BASE / "aidc.env")


KUSTOMIZATIONS = sorted(K8S.rglob("kustomization.yaml"))


#: Every service's tenant endpoint port on a cluster (the Gateway's backends).
TENANT_PORT = 8443
GATEWAY_CRDS = ROOT / "tests" / "deploy" / "crds" / "gateway-api-v1.4.1"
#: KubeRay v1.7.0's RayCluster CRD (ray-operator/config/crd/bases; gzipped: 0.9 MB of schema).
KUBERAY_CRDS = ROOT / "tests" / "deploy" / "crds" / "kuberay-v1.7.0"


def _default_port(service: str) -> int:
    return parse_address(MeshSettings().address_of(service))[1]


# -- files and references -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    assert _yaml_docs(path), f"{path} is empty"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: str(p.parent.relative_to(K8S)))
def test_kustomizations_reference_existing_files(kustomization: Path) -> None:
    directory = kustomization.parent
    spec = _yaml_docs(kustomization)[0]
    for entry in spec.get("resources", []):
        path = directory / entry
        assert path.is_file() or (path / "kustomization.yaml").is_file(), f"{kustomization}: missing resource {entry}"
    for entry in spec.get("components", []):
        assert _kustomization(directory / entry)["kind"] == "Component", f"{entry} is not a kustomize Component"
    for patch in spec.get("patches", []):
        assert (directory / patch["path"]).is_file(), f"{kustomization}: missing patch {patch['path']}"
    for generator in [*spec.get("configMapGenerator", []), *spec.get("secretGenerator", [])]:
        for name in _generator_files(generator):
            assert (directory / name).is_file(), f"{kustomization}: missing generator file {name}"


def test_every_manifest_is_used_and_no_secret_is_applied() -> None:
    """A manifest no kustomization names is dead; a Secret in the applied set would overwrite the real one."""
    used = {kustomization.resolve() for kustomization in KUSTOMIZATIONS}
    for kustomization in KUSTOMIZATIONS:
        spec = _yaml_docs(kustomization)[0]
        entries = [*spec.get("resources", []), *(p["path"] for p in spec.get("patches", []))]
        entries += [name for g in spec.get("configMapGenerator", []) for name in _generator_files(g)]
        used |= {(kustomization.parent / entry).resolve() for entry in entries}
    manifests = {p.resolve() for p in K8S.rglob("*.yaml")} - {SECRETS.resolve()}
    assert manifests <= used, f"not referenced by any kustomization: {sorted(map(str, manifests - used))}"
    assert SECRETS.resolve() not in used
    assert not [doc for doc in _all() if doc["kind"] == "Secret"]


def test_every_object_lands_in_the_aidc_namespace() -> None:
    for directory in (BASE, GPU):
        assert _kustomization(directory)["namespace"] == "aidc"
    assert _named(_all(), "Namespace").keys() == {"aidc"}


# -- the mesh services --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_each_service_has_a_deployment_and_a_service_on_its_port(service: str) -> None:
    port = _default_port(service)
    container = _container(_all(), service)
    _, metrics_port = parse_address(_config()["AIDC_METRICS_ADDR"])
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [
        ("grpc", port),
        ("tenant", TENANT_PORT),
        ("metrics", metrics_port),
    ]
    # Prometheus scrapes it over mutual TLS, checking the certificate's name (the service's cluster name).
    monitor = _named(_all(), "PodMonitor")[f"aidc-{service}"]["spec"]
    assert monitor["selector"]["matchLabels"]["app.kubernetes.io/name"] == service
    [endpoint] = monitor["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["scheme"]) == ("metrics", "https")
    assert endpoint["tlsConfig"]["serverName"] == f"{service}.aidc.svc"
    assert {"name": "AIDC_SERVICE", "value": service} in container["env"]
    assert container["image"].split(":")[0] == "aidc"
    assert {"configMapRef": {"name": "aidc-config"}} in container["envFrom"]
    ports = {p["name"]: p["port"] for p in _named(_all(), "Service")[service]["spec"]["ports"]}
    assert ports == {"grpc": port, "tenant": TENANT_PORT}
    assert _config()[f"AIDC_{service.upper()}_ADDR"] == f"{service}.aidc.svc:{port}"
    assert _config()[f"AIDC_{service.upper()}_TENANT_ADDR"] == f"{service}.aidc.svc:{TENANT_PORT}"


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_probes_run_the_image_health_check(service: str) -> None:
    """The kubelet's gRPC probe can't present a client certificate; the in-container check can."""
    container = _container(_all(), service)
    assert container["readinessProbe"]["exec"]["command"] == ["aidc-healthcheck"]
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["aidc-healthcheck", "--live"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["tls"] == _config()["AIDC_CERTS_DIR"]
    pod = _named(_all(), "Deployment")[service]["spec"]["template"]["spec"]
    tls = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == f"aidc-tls-{service}"


def _env_names() -> set[str]:
    names = set(_config())
    for _, pod in _pod_specs(_all()):
        names |= {var["name"] for container in _containers(pod) for var in container.get("env", [])}
    return names


def test_every_aidc_and_otel_variable_set_is_a_documented_setting() -> None:
    documented = {s.env for s in documented_settings()}
    ours = {name for name in _env_names() if name.startswith(("AIDC_", "OTEL_"))}
    assert ours - IMAGE_VARIABLES <= documented, f"undocumented: {sorted(ours - IMAGE_VARIABLES - documented)}"


def _settings_class(service: str) -> type[MeshSettings]:
    module = importlib.import_module(f"services.{service}.config")
    classes = [getattr(module, name) for name in module.__all__]
    return next(c for c in classes if isinstance(c, type) and issubclass(c, MeshSettings))


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_config_passes_each_service_settings_validation(service: str) -> None:
    settings = load_settings(_settings_class(service), _config())
    url = settings.database_url_for(service)
    assert url.startswith("postgresql+psycopg://") and ":" not in url.split("//")[1].split("@")[0], "no password"
    database = url.rsplit("/", 1)[1]
    assert f"CREATE DATABASE {database};" in (DATASTORES / "postgres-databases.sql").read_text(encoding="utf-8")


def test_cluster_settings_differ_from_laptop_defaults_where_they_must() -> None:
    settings = load_settings(MeshSettings, _config())
    assert settings.host == "0.0.0.0", "services must listen beyond loopback in a pod"
    assert settings.client_auth == "require"
    assert _config()["AIDC_SERVING_FLAVOUR"] == "libtorch"
    assert _config()["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.aidc.svc:4317"


# -- every pod ----------------------------------------------------------------------------------------------------


def test_every_container_has_resources_and_a_pinned_image() -> None:
    version = _pyproject()["project"]["version"]
    for workload, pod in _pod_specs(_all()):
        for container in _containers(pod):
            where = f"{workload}/{container['name']}"
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= container["resources"][bound].keys(), f"{where}: {bound}"
            name, _, tag = container["image"].rpartition(":")
            assert name and tag and tag != "latest" and "/" not in tag, f"{where}: unpinned {container['image']}"
            if name == "aidc":
                assert tag == version, f"{where}: aidc image tag {tag} is not the project version {version}"
    for image in _kustomization(GPU)["images"]:
        assert image["newTag"] == version


def test_every_pod_meets_the_restricted_pod_security_standard() -> None:
    labels = _named(_all(), "Namespace")["aidc"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload, pod in _pod_specs(_all()):
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["seccompProfile"]["type"] == "RuntimeDefault", workload
        assert pod["automountServiceAccountToken"] is False, workload
        for container in _containers(pod):
            own = container["securityContext"]
            assert own["allowPrivilegeEscalation"] is False and own["capabilities"]["drop"] == ["ALL"], workload
            if container["image"].startswith("aidc:"):
                assert context["runAsUser"] == IMAGE_UID and own["readOnlyRootFilesystem"] is True, workload


def test_secret_references_have_templates_with_placeholders_only() -> None:
    templates = {doc["metadata"]["name"]: doc["stringData"] for doc in _yaml_docs(SECRETS)}
    for values in templates.values():
        assert all(value.startswith("REPLACE_WITH_") for value in values.values())
    for workload, pod in _pod_specs(_all()):
        for container in _containers(pod):
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in templates.get(ref["name"], {}), f"{workload}: no template for {ref}"
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in templates, f"{workload}: no template for {volume}"
    for service in SERVICE_NAMES:
        assert set(templates[f"aidc-tls-{service}"]) == {"ca.pem", f"{service}.pem", f"{service}-key.pem"}
    # The CA's key signs identities: it must never be handed to a pod.
    assert not [key for values in templates.values() for key in values if key == "ca-key.pem"]


# -- the tenant endpoint: one address through the Gateway API ------------------------------------------------------


def _closed(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists properties: the API server would silently prune a
    misspelt field, so a check must refuse it."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            closed["additionalProperties"] = False
    return closed


@functools.cache
def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the served version's openAPIV3Schema (closed to unknown fields, metadata aside), from
    the vendored upstream CRDs (Gateway API's, KubeRay's)."""
    schemas = {}
    for path in sorted([*GATEWAY_CRDS.glob("*.yaml"), *KUBERAY_CRDS.glob("*.yaml.gz")]):
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
        crd = next(doc for doc in yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if doc)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version["served"] and not version.get("deprecated"):
                schema = _closed(version["schema"]["openAPIV3Schema"])
                schema["properties"]["metadata"] = {"type": "object"}
                schemas[f"{group}/{version['name']}", kind] = schema
    return schemas


def _gateway_objects() -> list[dict[str, Any]]:
    return [doc for doc in _all() if doc["apiVersion"].startswith("gateway.networking.k8s.io/")]


def test_gateway_api_objects_validate_against_the_upstream_crds() -> None:
    """Gateway API v1.4.1's standard-channel CRDs (vendored in tests/deploy/crds): every object's fields and values
    are what the API server would accept, checked offline (CEL rules aside)."""
    schemas = _crd_schemas()
    objects = _gateway_objects()
    assert {doc["kind"] for doc in objects} == {"Gateway", "GRPCRoute", "BackendTLSPolicy"}
    for doc in objects:
        schema = schemas[doc["apiVersion"], doc["kind"]]
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
        assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: {[e.message for e in errors]}"
    # The check refuses what the API server would prune or reject: a misspelt field.
    route = next(doc for doc in objects if doc["kind"] == "GRPCRoute")
    misspelt = {**route, "spec": {**route["spec"], "parentRef": route["spec"]["parentRefs"]}}
    assert list(jsonschema.Draft7Validator(schemas[route["apiVersion"], "GRPCRoute"]).iter_errors(misspelt))


def _ray_cluster(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [cluster] = [doc for doc in docs if doc["kind"] == "RayCluster"]
    return cluster


def _ray_gpu_patch() -> dict[str, Any]:
    """The gpu overlay's JSON patch of the RayCluster: the GPU worker group it adds."""
    [entry] = [e for e in _kustomization(GPU)["patches"] if e.get("target", {}).get("kind") == "RayCluster"]
    assert entry["target"]["name"] == _ray_cluster(_base_docs())["metadata"]["name"]
    [op] = [op for op in _yaml_docs(GPU / entry["path"])[0] if op["op"] == "add"]
    assert op["path"] == "/spec/workerGroupSpecs/-"
    return dict(op["value"])


def test_the_ray_cluster_validates_against_kuberays_crd() -> None:
    """The base's RayCluster, and with the gpu overlay's worker group added, as the API server would take them."""
    cluster = _ray_cluster(_base_docs())
    schema = _crd_schemas()[cluster["apiVersion"], "RayCluster"]
    with_gpu = {
        **cluster,
        "spec": {**cluster["spec"], "workerGroupSpecs": [*cluster["spec"]["workerGroupSpecs"], _ray_gpu_patch()]},
    }
    for doc in (cluster, with_gpu):
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
        assert not errors, [e.message for e in errors]
    misspelt = {**cluster, "spec": {**cluster["spec"], "workerGroupSpec": cluster["spec"]["workerGroupSpecs"]}}
    assert list(jsonschema.Draft7Validator(schema).iter_errors(misspelt))


def test_the_scheduler_runs_its_ray_pool_on_the_ray_cluster_from_a_driver_only_node() -> None:
    """aidc.env points the scheduler at the RayCluster's head service; fine-tunes go to that pool; the scheduler pod
    joins Ray offering nothing (so its drivers connect through a local raylet, and it is no pool node); the head
    offers nothing either; the image's Ray is the cluster's; job directories are one volume at one path everywhere."""
    docs = _base_docs()
    cluster = _ray_cluster(docs)
    host, port = parse_address(_config()["AIDC_SCHEDULER_RAY_ADDRESS"])
    assert (host, port) == (f"{cluster['metadata']['name']}-head-svc.aidc.svc", 6379)
    config = _config()
    assert (
        config["AIDC_TRAINING_DEFAULT_POOL"] == load_settings(_settings_class("scheduler"), config).scheduler_ray_pool
    )
    assert config["AIDC_SCHEDULER_REGISTER_LOCAL_NODE"] == "false"  # nothing runs inside the scheduler's pod
    ray_pin = _requirement(_pyproject()["project"]["optional-dependencies"]["ray"], "ray")
    assert ray_pin.endswith(f"=={cluster['spec']['rayVersion']}")
    assert '".[ray]"' in (DOCKER / "Dockerfile").read_text(encoding="utf-8"), "the image must be able to be a Ray node"
    head = cluster["spec"]["headGroupSpec"]["rayStartParams"]
    assert head["num-cpus"] == "0" and head["num-gpus"] == "0"

    scheduler = _named(docs, "Deployment")["scheduler"]["spec"]["template"]["spec"]
    [sidecar] = scheduler["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: up before the scheduler, restarted if it dies
    command = " ".join(sidecar["command"])
    assert "ray start" in command and "--num-cpus=0" in command and "--num-gpus=0" in command and "--block" in command
    assert "$AIDC_SCHEDULER_RAY_ADDRESS" in command and sidecar["envFrom"] == [
        {"configMapRef": {"name": "aidc-config"}}
    ]
    main = next(c for c in scheduler["containers"] if c["name"] == "scheduler")
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}.items() >= {"tmp": "/tmp"}.items()
    assert mounts["tmp"] == "/tmp"  # Ray's session directory (the raylet's socket) is shared

    training = _named(docs, "Deployment")["training"]["spec"]["template"]["spec"]
    pods = {"training": training, "scheduler": scheduler}
    pods |= {f"ray/{g['groupName']}": g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]}
    pods["ray/gpu"] = _ray_gpu_patch()["template"]["spec"]
    for name, pod in pods.items():
        [claim] = [
            v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "training-data"
        ]
        paths = {m["mountPath"] for c in _containers(pod) for m in c.get("volumeMounts", []) if m["name"] == claim}
        assert paths == {config["AIDC_DATA_DIR"]}, name


def test_the_gateway_routes_each_service_by_its_grpc_service_name_to_its_tenant_port() -> None:
    objects = _gateway_objects()
    gateway = _named(objects, "Gateway")["aidc"]
    (listener,) = gateway["spec"]["listeners"]
    assert (listener["protocol"], listener["tls"]["mode"]) == ("HTTPS", "Terminate")
    (certificate,) = listener["tls"]["certificateRefs"]
    templates = {doc["metadata"]["name"]: doc for doc in _yaml_docs(SECRETS)}
    assert templates[certificate["name"]]["type"] == "kubernetes.io/tls"
    routes = _named(objects, "GRPCRoute")
    policies = _named(objects, "BackendTLSPolicy")
    for service in SERVICE_NAMES:
        names = {f"aidc.{service}.v1.{service.capitalize()}Service"} | (
            {"inference.GRPCInferenceService"} if service == "serving" else set()
        )
        route = routes[service]["spec"]
        assert route["parentRefs"] == [{"name": "aidc", "sectionName": listener["name"]}]
        (rule,) = route["rules"]
        assert {m["method"]["service"] for m in rule["matches"]} == names
        assert {m["method"]["type"] for m in rule["matches"]} == {"Exact"}
        for name in names:  # each is a service the platform serves
            assert descriptor_pool.Default().FindServiceByName(name) is not None
        assert rule["backendRefs"] == [{"name": service, "port": TENANT_PORT}]
        # The hop from the Gateway is TLS too, checked against the mesh CA and the service's cluster name (the name
        # deploy/README.md re-issues each certificate with); the Gateway presents no certificate.
        policy = policies[f"{service}-tenant"]["spec"]
        assert policy["targetRefs"] == [{"group": "", "kind": "Service", "name": service, "sectionName": "tenant"}]
        assert policy["validation"]["hostname"] == f"{service}.aidc.svc"
    covered = {
        name
        for route in routes.values()
        for m in route["spec"]["rules"][0]["matches"]
        for name in [m["method"]["service"]]
    }
    assert len(covered) == len(SERVICE_NAMES) + 1


def test_only_the_gateway_reaches_the_tenant_ports_and_auth_trusts_only_it() -> None:
    policy = _named(_all(), "NetworkPolicy")["tenant-endpoints"]["spec"]
    assert policy["podSelector"] == {"matchLabels": {"app.kubernetes.io/component": "mesh"}}
    mesh_rule, tenant_rule = policy["ingress"]
    _, metrics_port = parse_address(_config()["AIDC_METRICS_ADDR"])
    mutual_tls = {_default_port(s) for s in SERVICE_NAMES} | {metrics_port}  # each wants a mesh client certificate
    assert "from" not in mesh_rule and {p["port"] for p in mesh_rule["ports"]} == mutual_tls
    assert tenant_rule["ports"] == [{"port": TENANT_PORT}] and tenant_rule["from"][0]["namespaceSelector"]
    proxies = parse_proxies(_config()["AIDC_AUTH_TRUSTED_PROXIES"])
    assert proxies and all(network.is_private for network in proxies)


# -- Triton -------------------------------------------------------------------------------------------------------


def _flags(argv: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``--flag=value`` -> {flag: value}; ``--trace-config key=value`` -> {"--trace-config key": value}."""
    out: dict[str, str] = {}
    args = iter(argv)
    for arg in args:
        if arg == "--trace-config":
            key, _, value = next(args).partition("=")
            out[f"--trace-config {key}"] = value
        else:
            flag, _, value = arg.partition("=")
            out[flag] = value
    return out


def _local_triton_flags() -> dict[str, str]:
    """The flags `aidc up` starts Triton with (argv[0] is the binary)."""
    platform = Platform(mesh=MeshSettings(), platform=PlatformSettings(), credentials=S3Credentials("id", "secret"))
    return _flags(triton_argv(platform)[1:])


@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_triton_runs_like_aidc_up(variant: str) -> None:
    """Same flags as services/platform/components.triton_argv; only site-specific values (and GPU pools) differ."""
    container = _container(_base_docs(), "triton")
    args = container["args"]
    if variant == "gpu":
        args = _container(_yaml_docs(GPU / "triton-gpu.yaml"), "triton")["args"]
    assert container["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    cluster, local = _flags(args), _local_triton_flags()
    assert cluster.keys() - TRITON_CLUSTER_ACCESS_FLAGS == local.keys() - TRITON_LOCAL_ACCESS_FLAGS
    assert TRITON_CLUSTER_ACCESS_FLAGS <= cluster.keys() and TRITON_LOCAL_ACCESS_FLAGS <= local.keys()
    free = TRITON_SITE_FLAGS | TRITON_CLUSTER_ACCESS_FLAGS | (TRITON_GPU_FLAGS if variant == "gpu" else set())
    assert {k: v for k, v in cluster.items() if k not in free} == {
        k: v for k, v in local.items() if k not in free | TRITON_LOCAL_ACCESS_FLAGS
    }
    restricted = [a for a in args if a.startswith(("--grpc-restricted-protocol=", "--http-restricted-api="))]
    assert tuple(restricted) == restricted_protocol_flags("$(TRITON_ACCESS_KEY)")
    assert cluster["--model-control-mode"] == "explicit" and cluster["--trace-config mode"] == "opentelemetry"
    assert cluster["--model-repository"] == _config()["AIDC_MODEL_REPOSITORY"]
    assert cluster["--trace-config opentelemetry,url"] == "http://otel-collector.aidc.svc:4318/v1/traces"
    services = _named(_all(), "Service")
    assert {"name": "otlp-http", "port": 4318, "targetPort": "otlp-http"} in services["otel-collector"]["spec"]["ports"]
    triton_ports = {p["name"]: p["port"] for p in services["triton"]["spec"]["ports"]}
    assert int(cluster["--grpc-port"]) == triton_ports["grpc"] == parse_address(_config()["AIDC_TRITON_GRPC_ADDR"])[1]
    assert int(cluster["--http-port"]) == triton_ports["http"]
    assert int(cluster["--metrics-port"]) == triton_ports["metrics"]


def test_only_serving_reaches_triton_with_the_access_secret() -> None:
    """The access secret reaches Triton (substituted into its restricted-protocol arguments) and the serving service
    (a file it reads) and no other pod; the NetworkPolicy admits only serving to Triton's gRPC and HTTP ports and
    only the monitoring namespace's Prometheus to its metrics; the kubelet probes health, which stays open."""
    docs = _all()
    triton = _container(docs, "triton")
    [key] = [v for v in triton["env"] if v["name"] == "TRITON_ACCESS_KEY"]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "aidc-triton-access", "key": "access-key"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert triton[probe]["httpGet"]["path"].startswith("/v2/health/")
    serving = _container(docs, "serving")
    key_file = Path(next(v["value"] for v in serving["env"] if v["name"] == "AIDC_TRITON_ACCESS_KEY_FILE"))
    pod = _named(docs, "Deployment")["serving"]["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "aidc-triton-access"]
    [mount] = [m for m in serving["volumeMounts"] if m["name"] == volume["name"]]
    assert Path(mount["mountPath"]) == key_file.parent and mount["readOnly"] is True
    templates = {doc["metadata"]["name"]: doc["stringData"] for doc in _yaml_docs(SECRETS)}
    assert key_file.name in templates["aidc-triton-access"]
    holders = {
        workload
        for workload, spec in _pod_specs(docs)
        if "aidc-triton-access" in str(spec.get("volumes", [])) + str(_containers(spec))
    }
    assert holders == {"Deployment/triton", "Deployment/serving"}

    policy = _named(docs, "NetworkPolicy")["triton"]["spec"]
    assert policy["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "triton"}}
    assert policy["policyTypes"] == ["Ingress"]
    admitted = {
        port["port"]: rule["from"] for rule in policy["ingress"] for port in rule["ports"]
    }  # every rule names its sources: none is open to the whole namespace
    assert all(rule.get("from") for rule in policy["ingress"])
    services = _named(docs, "Service")
    ports = {p["name"]: p["port"] for p in services["triton"]["spec"]["ports"]}
    serving_only = [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "serving"}}}]
    assert admitted[ports["grpc"]] == admitted[ports["http"]] == serving_only
    assert admitted[ports["metrics"]] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ]
    assert set(admitted) == set(ports.values())


def test_gpu_overlay_gives_triton_a_gpu_and_the_ray_cluster_gpu_workers() -> None:
    """The base runs on any cluster (CPU); the overlay's patches add a GPU to containers that exist in the base, and
    a group of GPU workers to the Ray cluster, like its CPU workers but for the GPU (where fine-tunes train)."""
    patched = set()
    for patch in _kustomization(GPU)["patches"]:
        if "target" in patch:
            continue  # the RayCluster's JSON patch, below
        for doc in _yaml_docs(GPU / patch["path"]):
            target = _named(_base_docs(), doc["kind"])[doc["metadata"]["name"]]
            if "containers" not in doc["spec"].get("template", {}).get("spec", {}):
                continue  # a patch of no container (training-replicas.yaml)
            names = {c["name"] for c in target["spec"]["template"]["spec"]["containers"]}
            for container in doc["spec"]["template"]["spec"]["containers"]:
                assert container["name"] in names
                if container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") == 1:
                    patched.add(container["name"])
    assert patched == {"triton"}
    for _, pod in _pod_specs(_base_docs()):
        assert not any("nvidia.com/gpu" in str(c["resources"]) for c in pod["containers"])
    gpu = _ray_gpu_patch()
    [container] = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    [cpu] = _ray_cluster(_base_docs())["spec"]["workerGroupSpecs"]
    [cpu_container] = cpu["template"]["spec"]["containers"]
    same = ("image", "readinessProbe", "livenessProbe", "securityContext", "volumeMounts")
    assert {k: container[k] for k in same} == {k: cpu_container[k] for k in same}
    assert gpu["template"]["spec"]["securityContext"] == cpu["template"]["spec"]["securityContext"]


def _pod_labels(deployment: str) -> dict[str, str]:
    return dict(_named(_base_docs(), "Deployment")[deployment]["spec"]["template"]["metadata"]["labels"])


def test_gpu_overlay_runs_two_replicas_of_each_service_and_a_disruption_budget_each() -> None:
    """Two pods of every mesh service, of which a voluntary disruption (a drain) may take only one at a time."""
    counts = {r["name"]: r["count"] for r in _kustomization(GPU)["replicas"]}
    assert counts == dict.fromkeys(SERVICE_NAMES, 2)
    budgets = _named(_all(), "PodDisruptionBudget")
    assert budgets.keys() == set(SERVICE_NAMES)
    for service, budget in budgets.items():
        assert budget["apiVersion"] == "policy/v1"
        assert budget["spec"] == {"minAvailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": service}}}
        assert budget["spec"]["selector"]["matchLabels"].items() <= _pod_labels(service).items()
        # No other workload's pods match (the budget would count them).
        others = [name for name in _named(_all(), "Deployment") if name != service]
        assert not any(budget["spec"]["selector"]["matchLabels"].items() <= _pod_labels(o).items() for o in others)


def test_only_the_serving_gateway_autoscales_on_request_rate_and_cpu_from_two_pods() -> None:
    """On its request rate (a custom metric of the Prometheus adapter's rules, tests/deploy/test_alerts.py) and CPU;
    Triton stays one pod, whose models serving loads."""
    autoscalers = _named(_all(), "HorizontalPodAutoscaler")
    assert autoscalers.keys() == {"serving"}
    spec = autoscalers["serving"]["spec"]
    assert autoscalers["serving"]["apiVersion"] == "autoscaling/v2"
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "serving"}
    counts = {r["name"]: r["count"] for r in _kustomization(GPU)["replicas"]}
    assert spec["minReplicas"] == counts["serving"] == 2 < spec["maxReplicas"]
    assert spec["minReplicas"] > _named(_all(), "PodDisruptionBudget")["serving"]["spec"]["minAvailable"]
    rate, metric = spec["metrics"]
    assert rate["type"] == "Pods" and rate["pods"]["metric"]["name"] == "aidc_gateway_inferences_per_second"
    assert rate["pods"]["target"]["type"] == "AverageValue" and float(rate["pods"]["target"]["averageValue"]) > 0
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    # Utilization is of the CPU request: without one the autoscaler has nothing to divide by.
    assert _container(_all(), "serving")["resources"]["requests"]["cpu"]
    assert not any(r["name"] == "triton" for r in _kustomization(GPU)["replicas"])


def test_training_replicas_share_their_job_volume_across_nodes() -> None:
    patches = _yaml_docs(GPU / "training-replicas.yaml")
    claim = next(d for d in patches if d["kind"] == "PersistentVolumeClaim")
    base_claim = _named(_base_docs(), "PersistentVolumeClaim")[claim["metadata"]["name"]]
    pod = _named(_base_docs(), "Deployment")["training"]["spec"]["template"]["spec"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": base_claim["metadata"]["name"]}} in pod["volumes"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    deployment = next(d for d in patches if d["kind"] == "Deployment")
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_each_replica_advertises_its_own_pod_address_to_the_others(service: str) -> None:
    """Followers forward to their leader at the address it advertises: the Service's would reach any replica."""
    env = _container(_all(), service)["env"]
    names = [var["name"] for var in env]
    pod_ip = env[names.index("POD_IP")]
    assert pod_ip["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    advertised = env[names.index("AIDC_ADVERTISE_ADDR")]
    # $(POD_IP) expands only when POD_IP is defined earlier in the list.
    assert names.index("POD_IP") < names.index("AIDC_ADVERTISE_ADDR")
    assert advertised["value"] == f"$(POD_IP):{_default_port(service)}"


# kubectl with its built-in kustomize v3.7+ (the overlay uses `components`): the machines this project runs on ship
# kubectl 1.32 (kustomize v5.5). Debian's kubernetes-client is 1.20 (kustomize v2.0.3, "unknown field components"), too
# old to stand in. Under CI=true a missing kubectl fails this test (tests/conftest.py) rather than skipping it.
_NO_KUBECTL = shutil.which("kubectl") is None
_NO_KUBECTL_REASON = "kubectl (with kustomize v3.7 or later) is not installed"


@functools.cache
def _built(directory: Path) -> list[dict[str, Any]]:
    """What the real kustomize builds of a kustomization."""
    run = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"kubectl kustomize failed (a kustomize older than v3.7?): {run.stderr}"
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc is not None]


@pytest.mark.skipif(_NO_KUBECTL, reason=_NO_KUBECTL_REASON)
def test_kustomize_builds_the_gpu_overlay_as_the_static_checks_assume() -> None:
    """The real kustomize: generated ConfigMaps are referenced by their hashed names, patches land, images move
    to the registry, every namespaced object is in aidc."""
    docs = _built(GPU)
    assert {doc["metadata"].get("namespace") for doc in docs if doc["kind"] != "Namespace"} == {"aidc"}
    config = next(name for name in _named(docs, "ConfigMap") if name.startswith("aidc-config-"))
    image = next(i for i in _kustomization(GPU)["images"] if i["name"] == "aidc")
    assert _named(docs, "ConfigMap")[config]["data"] == _config()
    for service in SERVICE_NAMES:
        container = _container(docs, service)
        assert container["envFrom"] == [{"configMapRef": {"name": config}}]
        assert container["image"] == f"{image['newName']}:{image['newTag']}"
    triton = _container(docs, "triton")
    assert triton["args"] == _container(_yaml_docs(GPU / "triton-gpu.yaml"), "triton")["args"]
    assert triton["resources"]["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": 1}
    ray = _ray_cluster(docs)
    groups = {g["groupName"]: g["template"]["spec"]["containers"][0] for g in ray["spec"]["workerGroupSpecs"]}
    assert groups.keys() == {"cpu", "gpu"} and groups["gpu"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    for container in [*groups.values(), ray["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]]:
        assert container["image"] == f"{image['newName']}:{image['newTag']}"
    assert "nvidia.com/gpu" not in _container(docs, "training")["resources"]["limits"]
    [sidecar] = _named(docs, "Deployment")["scheduler"]["spec"]["template"]["spec"]["initContainers"]
    assert sidecar["envFrom"] == [{"configMapRef": {"name": config}}]
    deployments = _named(docs, "Deployment")
    assert {name: deployments[name]["spec"]["replicas"] for name in SERVICE_NAMES} == dict.fromkeys(SERVICE_NAMES, 2)
    assert deployments["training"]["spec"]["strategy"] == {"type": "RollingUpdate"}
    assert _named(docs, "PersistentVolumeClaim")["training-data"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert _named(docs, "PodDisruptionBudget").keys() == set(SERVICE_NAMES)
    assert _named(docs, "HorizontalPodAutoscaler").keys() == {"serving"}


@pytest.mark.skipif(_NO_KUBECTL, reason=_NO_KUBECTL_REASON)
def test_the_pods_sharing_the_job_volume_can_all_mount_it() -> None:
    """Training, the scheduler (its Ray drivers) and the Ray workers mount the job volume. In the base it is
    ReadWriteOnce, mountable on one node only: every other pod mounting it must be placed on the training pod's node
    (else it waits forever for the volume). The gpu overlay's volume is ReadWriteMany: none is tied to a node."""
    for directory, shared in ((BASE, False), (GPU, True)):
        docs = _built(directory)
        modes = _named(docs, "PersistentVolumeClaim")["training-data"]["spec"]["accessModes"]
        assert modes == (["ReadWriteMany"] if shared else ["ReadWriteOnce"])
        mounting = {
            name: pod
            for name, pod in _pod_specs(docs)
            if any(v.get("persistentVolumeClaim", {}).get("claimName") == "training-data" for v in pod["volumes"])
        }
        assert {"Deployment/training", "Deployment/scheduler", "RayCluster/aidc-ray/cpu"} <= mounting.keys()
        for name, pod in mounting.items():
            terms = pod.get("affinity", {}).get("podAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
            if shared or name == "Deployment/training":
                assert terms is None, name
            else:
                beside_training = {
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "training"}},
                    "topologyKey": "kubernetes.io/hostname",
                }
                assert terms == [beside_training], name


# -- the image ----------------------------------------------------------------------------------------------------


def test_dockerfile_pins_torch_and_the_database_driver_like_pyproject() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    project = _pyproject()["project"]
    torch = _requirement(project["dependencies"], "torch")
    assert torch.startswith("torch==")
    assert f"ARG TORCH_VERSION={torch.removeprefix('torch==')}\n" in dockerfile
    assert '"torch==${TORCH_VERSION}"' in dockerfile
    psycopg = _requirement(project["optional-dependencies"]["dev"], "psycopg")
    assert f'ARG PSYCOPG_REQUIREMENT="{psycopg}"' in dockerfile
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.M)
    assert f"USER {IMAGE_UID}:{IMAGE_UID}" in dockerfile


def test_image_entrypoint_starts_every_service() -> None:
    entrypoint = (DOCKER / "entrypoint.sh").read_text(encoding="utf-8")
    case = re.search(r"^\s*(auth \|.*)\)$", entrypoint, re.M)
    assert case is not None
    assert {name.strip() for name in case.group(1).split("|")} == set(SERVICE_NAMES)


def test_build_context_admits_what_the_dockerfile_copies_and_nothing_secret() -> None:
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "*", "an allowlist: everything is excluded first"
    admitted = {line[1:] for line in ignore if line.startswith("!")}
    dockerfile = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    for line in re.findall(r"^COPY (.+)$", dockerfile, re.M):
        sources = [word for word in line.split()[:-1] if not word.startswith("--")]
        assert all(source == "." or source in admitted for source in sources), line
    assert not admitted & {".aidc", ".venv", ".runtime", ".git"}


# -- the health check, for real ----------------------------------------------------------------------------------


def _load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("aidc_healthcheck", DOCKER / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def mtls_health_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[health.HealthServicer]:
    """A real gRPC server requiring client certificates from the mesh CA, with the stock health servicer; the
    environment is the pod's: the certificates directory and the service's address."""
    certs = tmp_path / "certs"
    init_certificates(certs, ["auth", "storage"])
    port = free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [((certs / "auth-key.pem").read_bytes(), (certs / "auth.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    server.add_secure_port(f"127.0.0.1:{port}", credentials)
    server.start()
    monkeypatch.setenv("AIDC_CERTS_DIR", str(certs))
    monkeypatch.setenv("AIDC_AUTH_ADDR", f"auth.aidc.svc:{port}")
    monkeypatch.setenv("AIDC_STORAGE_ADDR", f"storage.aidc.svc:{free_port()}")
    monkeypatch.setenv("AIDC_SERVICE", "auth")
    try:
        yield servicer
    finally:
        server.stop(None)


def test_health_check_passes_mutual_tls_with_the_pods_own_certificate(
    mtls_health_server: health.HealthServicer,
) -> None:
    healthcheck = _load_healthcheck()
    mtls_health_server.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main([]) == 1, "not ready while NOT_SERVING"
    assert healthcheck.main(["--live"]) == 0, "but alive: a service waiting for its dependencies is not restarted"
    mtls_health_server.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main([]) == 0
    assert healthcheck.main(["storage"]) == 1, "nothing listens on storage's port"


def test_health_check_fails_without_readable_certificates(
    mtls_health_server: health.HealthServicer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    healthcheck = _load_healthcheck()
    mtls_health_server.set("", health_pb2.HealthCheckResponse.SERVING)
    monkeypatch.setenv("AIDC_CERTS_DIR", str(tmp_path / "missing"))
    assert healthcheck.main([]) == 1
    monkeypatch.delenv("AIDC_SERVICE")
    assert healthcheck.main([]) == 2
