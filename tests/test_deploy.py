"""Static checks of the deployment files: docker-compose.yml, the Dockerfile and deploy/k8s.

Nothing here starts a container or talks to a cluster. The files are parsed, every
``LOOMIS_*`` name they use is checked against ``shared.settings.Settings`` (a typo there is
a setting silently left at its default), the values are loaded into ``Settings`` the way a
service would, and the built-in Kubernetes kinds are validated against the official schemas
(strict: unknown fields fail).
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError  # type: ignore[import-untyped]
from pydantic import BaseModel

from services.gateway.trainings.service import OPTIONAL_OPTIMIZERS
from shared.queue import GENERATOR_QUEUE, TAGGER_QUEUE, TRAINER_QUEUE
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
K8S_DIR = ROOT / "deploy" / "k8s"
KUSTOMIZATION = K8S_DIR / "kustomization.yaml"

# The schemas ship with kubernetes-validate (1.25 to 1.37 in 1.37.0). validate() falls back to
# the newest schema not newer than this, so the tests also check which one was used.
K8S_VERSION = "1.30.0"
NAMESPACE = "loomis"
CRD_API_GROUPS = {"keda.sh"}  # custom resources: no upstream schema, checked by hand below

APP_SERVICES = {"gateway", "generator", "tagger", "trainer"}
EXPECTED_SERVICES = APP_SERVICES | {"redis", "minio", "postgres"}
# The arq workers (compose service, Deployment loomis-<name>): their command and queue.
WORKER_COMMANDS = {
    "generator": ["python", "-m", "services.generator"],
    "tagger": ["python", "-m", "services.tagger"],
    "trainer": ["python", "-m", "services.trainer"],
}
WORKER_QUEUES = {"generator": GENERATOR_QUEUE, "tagger": TAGGER_QUEUE, "trainer": TRAINER_QUEUE}
WORKERS = sorted(WORKER_COMMANDS)
# Workers that let the running job finish on SIGTERM (job_completion_wait = the job timeout):
# a stop must give them minutes. The trainer's jobs run for hours and resume from their last
# checkpoint, so it stops the job after a short wait and hands it back to the queue instead.
FINISHES_ITS_JOB_ON_STOP = {"generator", "tagger"}
TRAINER_GRACE_S = (120, 600)  # room to hand the job back; not room to finish it
MODEL_CACHE_VOLUME = "model-cache"  # compose
MODEL_CACHE_CLAIM = "loomis-model-cache"  # Kubernetes
LOOMIS_NAME = re.compile(r"LOOMIS_[A-Z0-9_]+")
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}
COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
COMPOSE_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
DURATION_UNITS_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


# --- helpers ------------------------------------------------------------------------------


def _model_class(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *typing.get_args(annotation)]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def settings_env_names(model: type[BaseModel] = Settings, prefix: str = "LOOMIS_") -> set[str]:
    """Every leaf setting as its environment variable, e.g. LOOMIS_REDIS__URL."""
    names: set[str] = set()
    for field_name, field in model.model_fields.items():
        name = prefix + field_name.upper()
        nested = _model_class(field.annotation)
        if nested is None:
            names.add(name)
        else:
            names |= settings_env_names(nested, name + "__")
    return names


VALID_ENV_NAMES = settings_env_names()


def walk_strings(node: Any) -> Iterator[str]:
    """Every string in a parsed YAML tree, mapping keys included."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from walk_strings(key)
            yield from walk_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_strings(item)


def loomis_names_in(node: Any) -> set[str]:
    return {match for text in walk_strings(node) for match in LOOMIS_NAME.findall(text)}


def resolve_compose_value(value: Any) -> str:
    """Compose interpolation as `docker compose` would do it with an empty shell: defaults
    are used, required variables get a stand-in."""

    def substitute(match: re.Match[str]) -> str:
        _, operator, argument = match.groups()
        if operator in (":-", "-"):
            return str(argument)
        return f"test-value-for-{match.group(1).lower()}"

    return COMPOSE_VAR.sub(substitute, str(value))


def compose_duration_s(value: str) -> float:
    """A compose duration such as 10m, 1m30s or 90s, in seconds."""
    parts = COMPOSE_DURATION_PART.findall(value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(float(number) * DURATION_UNITS_S[unit] for number, unit in parts)


def assert_stop_grace(worker: str, seconds: float) -> None:
    """How long a stopping worker gets before SIGKILL, for what it does with its job."""
    if worker in FINISHES_ITS_JOB_ON_STOP:
        assert seconds >= 600, f"{worker}: room for a running job to finish"
    else:
        low, high = TRAINER_GRACE_S
        assert low <= seconds <= high, f"{worker}: {seconds}s is not in {TRAINER_GRACE_S}"


def load_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings exactly as a service with this environment would read them."""
    for name in list(os.environ):
        if name.upper().startswith("LOOMIS_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(key): resolve_compose_value(value) for key, value in env.items()}


def as_list(command: Any) -> list[str]:
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def k8s_files() -> list[Path]:
    return sorted(path for path in K8S_DIR.glob("*.y*ml") if path != KUSTOMIZATION)


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in k8s_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def k8s_find(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in k8s_docs()
             if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def is_crd(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"].split("/")[0] in CRD_API_GROUPS


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    spec = deployment["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def only_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(deployment)["containers"]
    assert len(containers) == 1
    container = containers[0]
    assert isinstance(container, dict)
    return container


def k8s_config_env() -> dict[str, str]:
    """What envFrom of loomis-config + loomis-secrets puts into a container."""
    config = k8s_find("ConfigMap", "loomis-config")["data"]
    secret = k8s_find("Secret", "loomis-secrets")["stringData"]
    return {**config, **secret}


def container_env(deployment: dict[str, Any]) -> dict[str, str]:
    """The effective environment of a Deployment's container (explicit env wins)."""
    container = only_container(deployment)
    sources = {
        ("configMapRef", "loomis-config"): k8s_find("ConfigMap", "loomis-config")["data"],
        ("secretRef", "loomis-secrets"): k8s_find("Secret", "loomis-secrets")["stringData"],
    }
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ((ref_kind, ref),) = source.items()
        env.update(sources[(ref_kind, ref["name"])])
    for item in container.get("env", []):
        env[item["name"]] = item["value"]
    return env


# --- settings names -----------------------------------------------------------------------


def test_settings_env_names_walk_nested_models() -> None:
    assert {"LOOMIS_ENV", "LOOMIS_REDIS__URL", "LOOMIS_DB__URL", "LOOMIS_STORAGE__BACKEND",
            "LOOMIS_GATEWAY__SIGNING_SECRET", "LOOMIS_MODELS__CACHE_DIR"} <= VALID_ENV_NAMES
    # Only leaves, and only with the double-underscore delimiter.
    assert "LOOMIS_REDIS" not in VALID_ENV_NAMES
    assert "LOOMIS_REDIS_URL" not in VALID_ENV_NAMES
    assert loomis_names_in({"LOOMIS_REDIS_URL": "${X}", "k": ["LOOMIS_DB__URL=x"]}) == {
        "LOOMIS_REDIS_URL", "LOOMIS_DB__URL"}


# --- Dockerfile ---------------------------------------------------------------------------


def _dockerfile_stages() -> dict[str, str]:
    """Instructions per build stage, comments left out."""
    stages: dict[str, str] = {}
    current = None
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line.strip(), re.IGNORECASE)
        if match:
            current = match.group(2)
            stages[current] = line + "\n"
        elif current is not None:
            stages[current] += line + "\n"
    return stages


def test_dockerfile_has_gateway_and_worker_targets() -> None:
    stages = _dockerfile_stages()
    assert set(stages) == {"gateway", "worker"}
    gateway, worker = stages["gateway"], stages["worker"]
    assert gateway.startswith("FROM python:3.11-slim")
    assert "pip install -c requirements/cuda.txt ." in gateway, "the gateway installs the locked versions"
    assert "torch" not in gateway and "[worker]" not in gateway
    assert "services.gateway.app:create_app" in gateway and "--factory" in gateway
    assert re.search(r"FROM\s+(nvidia/cuda|pytorch/pytorch)\S*", worker)
    # The locked CUDA environment, then Loomis itself without a second resolve.
    assert "pip install -r requirements/cuda.txt" in worker
    assert 'pip install --no-deps ".[worker]"' in worker
    assert worker.index("requirements/cuda.txt") < worker.index(".[worker]")
    assert '"services.generator"' in worker


def test_compose_builds_existing_dockerfile_targets() -> None:
    stages = set(_dockerfile_stages())
    services = load_compose()["services"]
    targets = {name: services[name]["build"]["target"] for name in APP_SERVICES}
    assert targets == {"gateway": "gateway", "generator": "worker", "tagger": "worker",
                       "trainer": "worker"}
    assert set(targets.values()) <= stages


# --- docker compose -----------------------------------------------------------------------


def test_compose_has_expected_services() -> None:
    services = load_compose()["services"]
    assert set(services) == EXPECTED_SERVICES


def test_compose_gateway_command_port_and_dependencies() -> None:
    gateway = load_compose()["services"]["gateway"]
    command = as_list(gateway["command"])
    assert command[:3] == ["uvicorn", "services.gateway.app:create_app", "--factory"]
    assert command[command.index("--port") + 1] == "8000"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert any(str(port).endswith(":8000") for port in gateway["ports"])
    assert gateway["depends_on"] == {
        name: {"condition": "service_healthy"} for name in ("redis", "postgres", "minio")}
    assert any("/readyz" in part or "/healthz" in part
               for part in as_list(gateway["healthcheck"]["test"]))


@pytest.mark.parametrize("worker", WORKERS)
def test_compose_worker_reserves_a_gpu_and_mounts_the_model_cache(worker: str) -> None:
    compose = load_compose()
    service = compose["services"][worker]
    assert as_list(service["command"]) == WORKER_COMMANDS[worker]
    assert service["image"] == compose["services"]["generator"]["image"]  # one worker image
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    cache = compose_env(service)["LOOMIS_MODELS__CACHE_DIR"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    assert cache in mounts, f"model cache {cache} is not on a volume"
    assert mounts[cache] in compose["volumes"], "model cache should be a named volume"
    assert mounts[cache] == MODEL_CACHE_VOLUME, "the workers share one model cache"


@pytest.mark.parametrize("worker", WORKERS)
def test_compose_worker_waits_for_the_gateway_and_for_its_job(worker: str) -> None:
    service = load_compose()["services"][worker]
    # The gateway creates the bucket and runs the migrations before any worker starts.
    assert service["depends_on"] == {
        name: {"condition": "service_healthy"} for name in ("redis", "minio", "gateway")}
    assert_stop_grace(worker, compose_duration_s(service["stop_grace_period"]))
    assert service["restart"] == "unless-stopped"


def test_compose_duration_parsing() -> None:
    assert compose_duration_s("10m") == 600
    assert compose_duration_s("1m30s") == 90
    assert compose_duration_s("1h") == 3600
    with pytest.raises(AssertionError):
        compose_duration_s("10 minutes")


def test_compose_redis_uses_append_only_file() -> None:
    redis = load_compose()["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    command = as_list(redis["command"])
    assert command[command.index("--appendonly") + 1] == "yes"


def test_compose_infrastructure_has_healthchecks() -> None:
    services = load_compose()["services"]
    for name in ("redis", "minio", "postgres", "gateway"):
        assert services[name]["healthcheck"]["test"], name
    assert services["postgres"]["image"] == "postgres:16"
    minio = as_list(services["minio"]["command"])
    assert minio[:2] == ["server", "/data"] and "--console-address" in minio


def test_compose_named_volumes_are_declared() -> None:
    compose = load_compose()
    used = {
        volume.split(":")[0]
        for service in compose["services"].values()
        for volume in service.get("volumes", [])
        if not volume.startswith((".", "/"))
    }
    assert used, "expected named volumes"
    assert used <= set(compose["volumes"])
    assert {"model-cache", "redis-data", "postgres-data", "minio-data"} <= used


def test_compose_app_services_share_the_env_anchor() -> None:
    compose = load_compose()
    shared = {key: resolve_compose_value(value) for key, value in compose["x-loomis-env"].items()}
    for name in APP_SERVICES:
        env = compose_env(compose["services"][name])
        assert {key: env[key] for key in shared} == shared, name


def test_compose_uses_only_real_setting_names() -> None:
    names = loomis_names_in(load_compose())
    assert "LOOMIS_REDIS__URL" in names  # the scan found something
    assert names - VALID_ENV_NAMES == set()


@pytest.mark.parametrize("service", sorted(APP_SERVICES))
def test_compose_env_loads_into_settings(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = compose_env(load_compose()["services"][service])
    settings = load_settings(env, monkeypatch)
    assert settings.env == "production"
    assert settings.db.url == "postgresql+asyncpg://loomis:loomis@postgres:5432/loomis"
    assert settings.redis.url == "redis://redis:6379/0"
    assert settings.storage.backend == "s3"
    assert settings.storage.endpoint_url == "http://minio:9000"
    assert settings.storage.access_key_id is not None
    assert settings.db.auto_migrate is True
    assert str(settings.model_cache) == "/models"


def _is_model_source(value: str) -> bool:
    """builtin:<name> or a hub id (owner/name); directories are site-specific."""
    return bool(re.fullmatch(r"builtin:[a-z0-9-]+|[\w.-]+/[\w.-]+", value))


def test_compose_and_k8s_configure_the_same_tagger(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = load_settings(compose_env(load_compose()["services"]["tagger"]), monkeypatch)
    k8s = load_settings(container_env(k8s_find("Deployment", "loomis-tagger")), monkeypatch)
    assert compose.tagger.captioner == k8s.tagger.captioner
    assert compose.tagger.tagger == k8s.tagger.tagger
    for settings in (compose, k8s):
        assert _is_model_source(settings.tagger.captioner), settings.tagger.captioner
        assert _is_model_source(settings.tagger.tagger), settings.tagger.tagger
        assert settings.tagger.device in ("auto", "cpu", "cuda")
        assert settings.tagger.job_timeout_s > 0


def test_compose_and_k8s_configure_the_same_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    compose_services = load_compose()["services"]
    compose = load_settings(compose_env(compose_services["trainer"]), monkeypatch)
    k8s = load_settings(container_env(k8s_find("Deployment", "loomis-trainer")), monkeypatch)
    assert compose.trainer.extra_optimizers == k8s.trainer.extra_optimizers
    assert compose.trainer.job_timeout_s == k8s.trainer.job_timeout_s
    for settings in (compose, k8s):
        assert settings.trainer.device in ("auto", "cuda"), "real training needs the GPU"
        assert settings.trainer.job_timeout_s >= 3600, "trainings run for hours"
        assert settings.trainer.max_tries >= 2, "a stopped training must be able to resume"
        assert set(settings.trainer.extra_optimizers) <= set(OPTIONAL_OPTIMIZERS)
    # The gateway refuses optimizers the trainer lacks, from the same setting: both must see
    # the same list, or it accepts jobs the trainer fails (or refuses ones it could run).
    gateways = (
        load_settings(compose_env(compose_services["gateway"]), monkeypatch),
        load_settings(container_env(k8s_find("Deployment", "loomis-gateway")), monkeypatch),
    )
    for gateway, trainer in zip(gateways, (compose, k8s), strict=True):
        assert gateway.trainer.extra_optimizers == trainer.trainer.extra_optimizers


def test_compose_storage_keys_match_minio_credentials() -> None:
    compose = load_compose()
    minio = compose_env(compose["services"]["minio"])
    gateway = compose_env(compose["services"]["gateway"])
    assert gateway["LOOMIS_STORAGE__ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert gateway["LOOMIS_STORAGE__SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    postgres = compose["services"]["postgres"]["environment"]
    db = urlsplit(gateway["LOOMIS_DB__URL"])
    assert (db.username, db.password, db.path.lstrip("/")) == (
        postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"])


# --- Kubernetes ---------------------------------------------------------------------------


def test_k8s_schema_version_is_shipped() -> None:
    shipped = set(kubernetes_validate.utils.all_versions())
    assert K8S_VERSION in shipped, f"kubernetes-validate ships {sorted(shipped)}"


def test_k8s_strict_validation_rejects_unknown_fields() -> None:
    bogus = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"},
             "data": {"A": "b"}, "dta": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bogus, K8S_VERSION, strict=True)


def test_k8s_has_the_expected_resources() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in k8s_docs()}
    assert kinds == {
        ("Namespace", NAMESPACE),
        ("ConfigMap", "loomis-config"),
        ("Secret", "loomis-secrets"),
        ("Deployment", "loomis-gateway"),
        ("Service", "loomis-gateway"),
        ("PodDisruptionBudget", "loomis-gateway"),
        ("Deployment", "loomis-generator"),
        ("PodDisruptionBudget", "loomis-generator"),
        ("PersistentVolumeClaim", MODEL_CACHE_CLAIM),
        ("ScaledObject", "loomis-generator"),
        ("Deployment", "loomis-tagger"),
        ("PodDisruptionBudget", "loomis-tagger"),
        ("ScaledObject", "loomis-tagger"),
        ("Deployment", "loomis-trainer"),
        ("PodDisruptionBudget", "loomis-trainer"),
        ("ScaledObject", "loomis-trainer"),
    }


@pytest.mark.parametrize(
    "path, doc",
    k8s_docs(),
    ids=[f"{p.name}:{d['kind']}/{d['metadata']['name']}" for p, d in k8s_docs()],
)
def test_k8s_manifest_is_valid(path: Path, doc: dict[str, Any]) -> None:
    if is_crd(doc):
        # No upstream schema; make sure it is one we know and check it in its own test.
        assert (doc["apiVersion"], doc["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
        with pytest.raises(SchemaNotFoundError):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        return
    used = kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert used == "1.30", f"validated against {used}, not {K8S_VERSION}"
    if doc["kind"] != "Namespace":
        assert doc["metadata"].get("namespace") == NAMESPACE


def test_k8s_uses_only_real_setting_names() -> None:
    docs = [doc for _, doc in k8s_docs()]
    names = loomis_names_in(docs)
    assert {"LOOMIS_REDIS__URL", "LOOMIS_GATEWAY__SIGNING_SECRET", "LOOMIS_ENV"} <= names
    assert names - VALID_ENV_NAMES == set()
    # ConfigMap and Secret must not both set a name: which one wins depends on envFrom order.
    config = set(k8s_find("ConfigMap", "loomis-config")["data"])
    secret = set(k8s_find("Secret", "loomis-secrets")["stringData"])
    assert config & secret == set()
    assert {"LOOMIS_DB__URL", "LOOMIS_STORAGE__ACCESS_KEY_ID", "LOOMIS_STORAGE__SECRET_ACCESS_KEY",
            "LOOMIS_GATEWAY__SIGNING_SECRET"} <= secret


@pytest.mark.parametrize(
    "deployment", ["loomis-gateway", *(f"loomis-{worker}" for worker in WORKERS)])
def test_k8s_env_loads_into_settings(deployment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = container_env(k8s_find("Deployment", deployment))
    settings = load_settings(env, monkeypatch)
    assert settings.env == "production"
    assert settings.db.url.startswith("postgresql+asyncpg://")
    assert settings.storage.backend == "s3"
    assert settings.redis.url.startswith("redis://")
    assert str(settings.models.cache_dir) == "/models"


def test_k8s_gateway_deployment() -> None:
    deployment = k8s_find("Deployment", "loomis-gateway")
    assert deployment["spec"]["replicas"] == 2
    container = only_container(deployment)
    assert as_list(container["command"])[:3] == [
        "uvicorn", "services.gateway.app:create_app", "--factory"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", 8000)
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert {next(iter(ref.values()))["name"] for ref in container["envFrom"]} == {
        "loomis-config", "loomis-secrets"}
    assert container_env(deployment)["LOOMIS_ENV"] == "production"


def test_k8s_gateway_service_and_pdb_select_gateway_pods() -> None:
    deployment = k8s_find("Deployment", "loomis-gateway")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = k8s_find("Service", "loomis-gateway")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in ("http", 8000)
    pdb = k8s_find("PodDisruptionBudget", "loomis-gateway")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert deployment["spec"]["replicas"] > pdb["spec"]["minAvailable"]


@pytest.mark.parametrize("worker", WORKERS)
def test_k8s_worker_deployment_gets_a_gpu(worker: str) -> None:
    deployment = k8s_find("Deployment", f"loomis-{worker}")
    spec = pod_spec(deployment)
    container = only_container(deployment)
    assert as_list(container["command"]) == WORKER_COMMANDS[worker]
    assert container["image"].split(":")[0] == "ghcr.io/example/loomis-worker"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert int(container["resources"]["requests"]["nvidia.com/gpu"]) == 1
    assert spec["nodeSelector"], "GPU pods need a node selector"
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    # Every GPU worker lands on the same kind of node as the generator.
    generator = pod_spec(k8s_find("Deployment", "loomis-generator"))
    assert spec["nodeSelector"] == generator["nodeSelector"]
    assert spec["tolerations"] == generator["tolerations"]
    assert_stop_grace(worker, spec["terminationGracePeriodSeconds"])
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0  # no spare GPU
    assert "ports" not in container and "readinessProbe" not in container


@pytest.mark.parametrize("worker", WORKERS)
def test_k8s_worker_mounts_the_model_cache_claim(worker: str) -> None:
    deployment = k8s_find("Deployment", f"loomis-{worker}")
    claim = k8s_find("PersistentVolumeClaim", MODEL_CACHE_CLAIM)
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    mounts = {m["mountPath"]: m for m in only_container(deployment)["volumeMounts"]}
    cache = container_env(deployment)["LOOMIS_MODELS__CACHE_DIR"]
    assert cache in mounts
    volume = volumes[mounts[cache]["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # builtin:tiny-* models are built into the cache on first use: it must be writable.
    assert not mounts[cache].get("readOnly", False)
    assert not volume["persistentVolumeClaim"].get("readOnly", False)


def test_k8s_model_cache_claim_is_shared_across_nodes() -> None:
    # Generator, tagger and trainer pods mount it, on whatever GPU nodes KEDA puts them.
    claim = k8s_find("PersistentVolumeClaim", MODEL_CACHE_CLAIM)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    users = {
        doc["metadata"]["name"]
        for _, doc in k8s_docs()
        if doc["kind"] == "Deployment"
        and any(volume.get("persistentVolumeClaim", {}).get("claimName") == MODEL_CACHE_CLAIM
                for volume in pod_spec(doc)["volumes"])
    }
    assert users == {f"loomis-{worker}" for worker in WORKERS}


@pytest.mark.parametrize("worker", WORKERS)
def test_k8s_worker_pdb(worker: str) -> None:
    deployment = k8s_find("Deployment", f"loomis-{worker}")
    pdb = k8s_find("PodDisruptionBudget", f"loomis-{worker}")
    assert pdb["spec"]["maxUnavailable"] == 1
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


@pytest.mark.parametrize(
    "worker, min_replicas",
    [
        ("generator", 1),  # keeps a model loaded
        ("tagger", 0),  # bursty: gives its GPU back when the queue is empty
        ("trainer", 0),  # rare bursts of hours-long jobs
    ],
)
def test_k8s_scaledobject_scales_the_worker_on_its_queue(worker: str, min_replicas: int) -> None:
    scaled = k8s_find("ScaledObject", f"loomis-{worker}")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    assert target["name"] == k8s_find("Deployment", f"loomis-{worker}")["metadata"]["name"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert scaled["spec"]["minReplicaCount"] == min_replicas
    assert min_replicas < scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    metadata = trigger["metadata"]
    assert metadata["listName"] == WORKER_QUEUES[worker] == f"loomis:queue:{worker}"
    assert int(metadata["listLength"]) >= 1
    if min_replicas == 0:
        # From zero, KEDA activates above this: one queued job must wake a pod.
        assert metadata["activationListLength"] == "0"
    # The scaler must watch the Redis the workers use.
    redis_url = urlsplit(k8s_config_env()["LOOMIS_REDIS__URL"])
    host, port = metadata["address"].rsplit(":", 1)
    assert host.split(".")[0] == redis_url.hostname
    assert int(port) == (redis_url.port or 6379)
    assert metadata.get("databaseIndex", "0") == (redis_url.path.lstrip("/") or "0")


def test_trainer_stop_grace_covers_handing_the_job_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After SIGTERM the trainer waits job_completion_wait, then cancels the training, and
    arq puts the job back on the queue for another pod to resume. A kill before that leaves
    the job "in progress" only until its lease runs out: seconds, not the job timeout."""
    from services.trainer.worker import build_worker  # imports torch: only here

    deployment = k8s_find("Deployment", "loomis-trainer")
    settings = load_settings(container_env(deployment), monkeypatch)
    worker = build_worker(settings)
    assert worker.queue_name == TRAINER_QUEUE
    wait_s = worker._job_completion_wait  # arq keeps it private
    assert 0 < wait_s < settings.trainer.job_timeout_s, "the trainer must not wait for a training"
    k8s_grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    compose_grace = compose_duration_s(load_compose()["services"]["trainer"]["stop_grace_period"])
    for grace in (k8s_grace, compose_grace):
        # The wait, then the current training step and arq's bookkeeping.
        assert grace >= wait_s + 60
    assert k8s_grace == compose_grace
    # What a hard kill costs the job: a lease, not the hours of its timeout.
    assert worker.in_progress_timeout_s == settings.worker.lease_s <= 30


def test_k8s_trainer_scales_to_zero_slowly_and_stays_small() -> None:
    trainer = k8s_find("ScaledObject", "loomis-trainer")["spec"]
    tagger = k8s_find("ScaledObject", "loomis-tagger")["spec"]
    # Rare bursts: keep the last pod a good while after the queue empties (KEDA's default
    # cooldown is 300 s), longer than the tagger does.
    assert trainer["cooldownPeriod"] >= 1800
    assert trainer["cooldownPeriod"] >= tagger["cooldownPeriod"]
    assert trainer["maxReplicaCount"] <= 2, "training must not take every GPU"
    (trigger,) = trainer["triggers"]
    assert trigger["metadata"]["listName"] == TRAINER_QUEUE
    # An hours-long job should not wait behind another: one pod per queued or running job.
    assert trigger["metadata"]["listLength"] == "1"
    scale_down = trainer["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    # N -> N-1 may stop a busy pod (its training resumes elsewhere): make it rare.
    assert scale_down["stabilizationWindowSeconds"] >= 1800
    assert all(policy["type"] == "Pods" and policy["value"] == 1
               for policy in scale_down["policies"])


def test_k8s_trainer_has_scratch_space_for_its_states() -> None:
    deployment = k8s_find("Deployment", "loomis-trainer")
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in only_container(deployment)["volumeMounts"]}
    # tempfile's working folder: resumed and saved states before they go to S3.
    scratch = volumes[mounts["/tmp"]]
    assert "medium" not in scratch["emptyDir"], "on disk, not in the pod's memory"
    assert scratch["emptyDir"]["sizeLimit"]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == NAMESPACE
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    assert set(resources) == {path.name for path in k8s_files()}
    images = {image["name"] for image in kustomization.get("images", [])}
    used = {only_container(doc)["image"].split(":")[0]
            for _, doc in k8s_docs() if doc["kind"] == "Deployment"}
    assert images == used
