"""infra/ holds together: the compose file, the Kubernetes manifests, the Dockerfile and the example
settings agree with each other and keep credentials out. Structure only: nothing here builds an
image, starts a container or talks to a cluster."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"

SERVER_API_URL = "http://prefect-server:4200/api"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|AUTH_STRING|TOKEN|ROOT_USER")
"""Variable names that hold credentials."""
COMPOSE_VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")
"""A compose interpolation ``${NAME...}``; ``$${NAME}`` is an escaped ``$`` for the container."""
K8S_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
"""A Kubernetes dependent-variable reference ``$(NAME)`` in an env value, command or args."""


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a dotenv file, comments and blank lines skipped."""
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            pairs[key.strip()] = value.strip()
    return pairs


# --- compose ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whichever form the file uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def option(cmd: list[str], name: str) -> str | None:
    """The value after ``name`` in a command line, or None."""
    return cmd[cmd.index(name) + 1] if name in cmd else None


def stitchtime_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services that run the image built from infra/Dockerfile."""
    return {name: s for name, s in services.items() if s.get("build", {}).get("dockerfile") == "infra/Dockerfile"}


def gpu_workers(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if name.startswith("gpu-worker-")}


def test_compose_has_every_service(services: dict[str, dict[str, Any]]) -> None:
    expected = {"postgres", "prefect-server", "minio", "minio-init", "work-pools", "cpu-worker",
                "gpu-worker-0", "gpu-worker-1"}
    assert expected <= set(services)


def test_prefect_server_runs_on_postgres(services: dict[str, dict[str, Any]]) -> None:
    server = services["prefect-server"]
    url = environment(server)["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://")
    assert "@postgres:5432/" in url
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert command(server)[:3] == ["prefect", "server", "start"]
    assert option(command(server), "--host") == "0.0.0.0"


def test_services_wait_on_health_or_completion(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if service.get("restart"):  # long-running
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on without conditions"
        for dependency, spec in depends_on.items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert services[dependency].get("healthcheck"), f"{name} waits on {dependency}, which has no healthcheck"
            else:
                assert condition == "service_completed_successfully", f"{name} -> {dependency}: {condition}"
                assert not services[dependency].get("restart"), f"{dependency} is waited on to finish but restarts"


def test_bucket_is_created_at_startup(services: dict[str, dict[str, Any]]) -> None:
    init = services["minio-init"]
    script = "\n".join(command(init))
    assert "mc mb --ignore-existing" in script
    assert "$$STITCHTIME_BUCKET" in script
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    for worker in ("cpu-worker", *gpu_workers(services)):
        assert services[worker]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


def test_work_pools_are_created_as_process_pools(services: dict[str, dict[str, Any]]) -> None:
    script = "\n".join(command(services["work-pools"]))
    assert "for pool in cpu gpu" in script
    assert 'prefect work-pool create "$$pool" --type process' in script


@pytest.mark.parametrize("name, pool", [("cpu-worker", "cpu"), ("gpu-worker-0", "gpu"), ("gpu-worker-1", "gpu")])
def test_workers_poll_their_pool_on_the_server(services: dict[str, dict[str, Any]], name: str, pool: str) -> None:
    worker = services[name]
    cmd = command(worker)
    assert cmd[:3] == ["prefect", "worker", "start"]
    assert option(cmd, "--pool") == pool
    assert option(cmd, "--type") == "process"
    assert option(cmd, "--name") == name
    assert "--with-healthcheck" in cmd
    env = environment(worker)
    assert env["PREFECT_API_URL"] == SERVER_API_URL
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"].startswith("/data/")
    assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"


def test_each_gpu_worker_owns_one_distinct_gpu(services: dict[str, dict[str, Any]]) -> None:
    defaults = read_env_file(INFRA / ".env.example")
    workers = gpu_workers(services)
    assert len(workers) >= 2
    owned = []
    for name, worker in workers.items():
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        (device,) = devices
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert len(device["device_ids"]) == 1, f"{name} must own exactly one GPU"
        (device_id,) = device["device_ids"]
        variable = COMPOSE_VAR.search(device_id)
        owned.append(defaults[variable.group(1)] if variable else device_id)
        # Docker shows the container only its reserved GPU, which is therefore CUDA device 0 inside.
        assert environment(worker)["CUDA_VISIBLE_DEVICES"] == "0", name
        assert option(command(worker), "--limit") == "1", name
    assert len(set(owned)) == len(owned), f"GPU workers share a GPU: {owned}"
    assert "deploy" not in services["cpu-worker"]


def test_telemetry_is_off_in_every_stitchtime_container(services: dict[str, dict[str, Any]]) -> None:
    ours = stitchtime_services(services)
    assert {"prefect-server", "cpu-worker", "gpu-worker-0", "work-pools"} <= set(ours)
    for name, service in ours.items():
        env = environment(service)
        assert env.get("PREFECT_SERVER_ANALYTICS_ENABLED") == "false", name
        assert env.get("DO_NOT_TRACK") == "1", name


def credential_problems(key: str, value: str, reference: re.Pattern[str]) -> list[str]:
    """Why an environment entry would hold a literal credential (empty when it holds none)."""
    problems = []
    if SECRET_NAME.search(key) and not reference.fullmatch(value):
        problems.append(f"{key}={value!r} is not a reference")
    userinfo = re.search(r"://([^@/]*)@", value)
    if userinfo and reference.sub("", userinfo.group(1)).strip(":"):
        problems.append(f"{key}: the URL's user and password are not references")
    return problems


def test_compose_holds_no_credentials(services: dict[str, dict[str, Any]]) -> None:
    reference = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:\?[^}]*)?\}")
    problems = [f"{name}: {p}" for name, service in services.items()
                for key, value in environment(service).items()
                for p in credential_problems(key, value, reference)]
    assert problems == []
    text = (INFRA / "compose.yaml").read_text()
    assert "env_file" not in text, "containers get only the variables they need, not the whole .env"
    for key, value in read_env_file(INFRA / ".env.example").items():
        if SECRET_NAME.search(key):
            assert value not in text, f"the example value of {key} is written into compose.yaml"


def strings(node: Any) -> Iterator[str]:
    """Every string value in a parsed YAML tree (where compose interpolates; comments are gone)."""
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


def test_env_example_covers_every_compose_variable(compose: dict[str, Any]) -> None:
    used = {name for text in strings(compose) for name in COMPOSE_VAR.findall(text)}
    assert {"POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY", "GPU_WORKER_1_DEVICE"} <= used
    example = read_env_file(INFRA / ".env.example")
    assert used - set(example) == set()
    for key, value in example.items():
        if SECRET_NAME.search(key) and key != "MINIO_ROOT_USER":
            assert "CHANGE-ME" in value, f"{key} in .env.example must be an obviously fake value"
    ignored = (INFRA / ".gitignore").read_text().split()
    assert ".env" in ignored and "k8s/secrets.env" in ignored


# --- Dockerfile ---------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in (INFRA / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_installs_ffmpeg_and_the_package() -> None:
    instructions = dockerfile_instructions()
    runs = " && ".join(args for op, args in instructions if op == "RUN")
    assert re.search(r"apt-get install [^&]*\bffmpeg\b", runs)
    assert re.search(r"pip install (--no-deps )?\.( |$)", runs)
    assert instructions[0][0] in {"ARG", "FROM"}
    assert any(op == "FROM" and "python:" in args for op, args in instructions)
    for op, args in instructions:
        if op == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert source == "." or (ROOT / source).exists(), f"COPY {source}: no such file"
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1] not in {"root", "0"}


def test_dockerfile_points_the_deployments_at_its_checkout() -> None:
    instructions = dockerfile_instructions()
    (workdir,) = [args for op, args in instructions if op == "WORKDIR"]
    env = " ".join(args for op, args in instructions if op == "ENV")
    # deployments/prefect.yaml's pull step moves each flow run to $STITCHTIME_ROOT.
    assert "{{ $STITCHTIME_ROOT }}" in (ROOT / "deployments" / "prefect.yaml").read_text()
    assert f"STITCHTIME_ROOT={workdir}" in env.split()


def test_dockerfile_turns_telemetry_off_and_keeps_results_under_data() -> None:
    env = " ".join(args for op, args in dockerfile_instructions() if op == "ENV")
    settings = dict(pair.split("=", 1) for pair in env.split() if "=" in pair)
    assert settings["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert settings["DO_NOT_TRACK"] == "1"
    assert settings["PREFECT_RESULTS_LOCAL_STORAGE_PATH"].startswith("/data/")


def test_build_context_leaves_out_environments_data_and_secrets() -> None:
    ignored = set((INFRA / "Dockerfile.dockerignore").read_text().split())
    assert {".venv", "stitchtime-data", "models", "infra/.env", "infra/k8s/secrets.env"} <= ignored


# --- Kubernetes ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def objects(kustomization: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of the manifests kustomization.yaml lists, by (kind, name)."""
    found = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / resource).read_text()):
            if doc is None:
                continue
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{resource}: incomplete object"
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = doc
    return found


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] in {"Deployment", "StatefulSet", "Job"}:
        return obj["spec"]["template"]["spec"]
    raise ValueError(obj["kind"])


def containers(objects: dict[tuple[str, str], dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(object name, container) for every container and init container of every workload."""
    for (kind, name), obj in objects.items():
        if kind in {"Deployment", "StatefulSet", "Job"}:
            spec = pod_spec(obj)
            for container in spec.get("initContainers", []) + spec["containers"]:
                yield name, container


def test_every_manifest_parses_and_is_listed(kustomization: dict[str, Any]) -> None:
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests
    for path in K8S.glob("*.yaml"):
        assert [doc for doc in yaml.safe_load_all(path.read_text()) if doc], f"{path.name} is empty"
    assert kustomization["namespace"] == "stitchtime"


def test_kubernetes_has_every_piece(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    expected = {
        ("Namespace", "stitchtime"), ("ConfigMap", "stitchtime-config"),
        ("StatefulSet", "postgres"), ("Service", "postgres"),
        ("StatefulSet", "minio"), ("Service", "minio"), ("Job", "minio-init"),
        ("Deployment", "prefect-server"), ("Service", "prefect-server"), ("Job", "work-pools"),
        ("Deployment", "cpu-worker"), ("Deployment", "gpu-worker"),
    }
    assert expected <= set(objects)
    server = objects[("Deployment", "prefect-server")]
    assert server["spec"]["replicas"] == 1
    (port,) = objects[("Service", "prefect-server")]["spec"]["ports"]
    assert port["port"] == 4200
    for (kind, name), obj in objects.items():
        if kind == "Service":
            selector = obj["spec"]["selector"]
            assert (("StatefulSet", name) in objects or ("Deployment", name) in objects), name
            target = objects.get(("StatefulSet", name)) or objects[("Deployment", name)]
            assert target["spec"]["template"]["metadata"]["labels"].items() >= selector.items(), name


def worker_container(objects: dict[tuple[str, str], dict[str, Any]], name: str) -> dict[str, Any]:
    (container,) = [c for c in pod_spec(objects[("Deployment", name)])["containers"] if c["name"] == "worker"]
    return container


@pytest.mark.parametrize("name, pool", [("cpu-worker", "cpu"), ("gpu-worker", "gpu")])
def test_kubernetes_workers_poll_their_pool_on_the_server(objects: dict[tuple[str, str], dict[str, Any]],
                                                          name: str, pool: str) -> None:
    container = worker_container(objects, name)
    cmd = container["command"]
    assert cmd[:3] == ["prefect", "worker", "start"]
    assert option(cmd, "--pool") == pool and option(cmd, "--type") == "process"
    config = objects[("ConfigMap", "stitchtime-config")]["data"]
    assert {"configMapRef": {"name": "stitchtime-config"}} in container["envFrom"]
    assert config["PREFECT_API_URL"] == SERVER_API_URL
    assert config["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert config["PREFECT_RESULTS_LOCAL_STORAGE_PATH"].startswith("/data/")


def test_gpu_worker_pods_each_request_one_gpu(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    gpu = worker_container(objects, "gpu-worker")
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert option(gpu["command"], "--limit") == "1"
    # The device plugin chooses the pod's GPU; a CUDA_VISIBLE_DEVICES here would fight it.
    assert "CUDA_VISIBLE_DEVICES" not in {e["name"] for e in gpu.get("env", [])}
    cpu = worker_container(objects, "cpu-worker")
    assert "nvidia.com/gpu" not in cpu.get("resources", {}).get("limits", {})


def test_kubernetes_telemetry_is_off_in_every_stitchtime_container(
        objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    config = objects[("ConfigMap", "stitchtime-config")]["data"]
    ours = [(name, c) for name, c in containers(objects) if c["image"] == "stitchtime"]
    assert len(ours) >= 5
    for name, container in ours:
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if {"configMapRef": {"name": "stitchtime-config"}} in container.get("envFrom", []):
            env = {**config, **env}
        assert env.get("PREFECT_SERVER_ANALYTICS_ENABLED") == "false", f"{name}/{container['name']}"
        assert env.get("DO_NOT_TRACK") == "1", f"{name}/{container['name']}"


def test_kubernetes_manifests_hold_no_credentials(objects: dict[tuple[str, str], dict[str, Any]],
                                                  kustomization: dict[str, Any]) -> None:
    assert not [key for key in objects if key[0] == "Secret"], "Secrets come from secrets.env, not from manifests"
    (generator,) = kustomization["secretGenerator"]
    assert generator["name"] == "stitchtime-secrets" and generator["envs"] == ["secrets.env"]
    example = read_env_file(K8S / "secrets.env.example")
    reference = re.compile(r"\$\([A-Za-z_][A-Za-z0-9_]*\)")
    problems, used_keys = [], set()
    for name, container in containers(objects):
        for entry in container.get("env", []):
            secret_ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if secret_ref:
                assert secret_ref["name"] == "stitchtime-secrets"
                used_keys.add(secret_ref["key"])
            elif "value" in entry:
                problems += [f"{name}/{container['name']}: {p}"
                             for p in credential_problems(entry["name"], str(entry["value"]), reference)]
    assert problems == []
    assert used_keys <= set(example), f"keys missing from secrets.env.example: {used_keys - set(example)}"
    for key, value in example.items():
        if SECRET_NAME.search(key) and key != "MINIO_ROOT_USER":
            assert "CHANGE-ME" in value, f"{key} in secrets.env.example must be an obviously fake value"
    config = objects[("ConfigMap", "stitchtime-config")]["data"]
    assert not [key for key in config if SECRET_NAME.search(key)]


def test_kubernetes_references_resolve(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    config = objects[("ConfigMap", "stitchtime-config")]["data"]
    for name, container in containers(objects):
        where = f"{name}/{container['name']}"
        defined: set[str] = set()
        for entry in container.get("env", []):
            # Kubernetes expands $(VAR) only from variables defined earlier in the list.
            for variable in K8S_VAR.findall(str(entry.get("value", ""))):
                assert variable in defined, f"{where}: {entry['name']} uses $({variable}) before it is set"
            config_ref = entry.get("valueFrom", {}).get("configMapKeyRef")
            if config_ref:
                assert config_ref["name"] == "stitchtime-config" and config_ref["key"] in config, where
            defined.add(entry["name"])
        for part in container.get("command", []) + container.get("args", []):
            for variable in K8S_VAR.findall(part):
                assert variable in defined, f"{where}: the command uses $({variable}), which is not set"
