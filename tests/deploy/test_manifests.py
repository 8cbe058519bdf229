"""deploy/: the Kubernetes manifests validate against the Kubernetes schemas (kubernetes-validate), and
manifests, compose file and Dockerfile agree with each other and with the commands' real flags."""
from __future__ import annotations

import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from fedcmp.client.cli import parse_args as client_args
from fedcmp.common.datagen import _data_parser
from fedcmp.server.cli import parse_args as server_args
from fedcmp.server.service import SERVICE_NAME

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes the manifests promise (gRPC probes are GA since 1.27)
PARSERS = {"fedcmp-server": server_args, "fedcmp-client": client_args,
           "fedcmp-data": lambda argv: _data_parser().parse_args(argv)}


def kubernetes_documents() -> list[dict]:
    documents = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def by_kind(kind: str) -> list[dict]:
    return [doc for doc in kubernetes_documents() if doc["kind"] == kind]


def parse_command(command: list[str], substitutions: dict[str, str] | None = None):
    """The command's flags parsed by the real fedcmp parser (argparse exits on an unknown flag)."""
    argv = [re.sub(r"\$\((\w+)\)", lambda match: (substitutions or {})[match.group(1)], part) for part in command]
    return argv[0], PARSERS[argv[0]](argv[1:])


@pytest.mark.parametrize("document", [doc for doc in kubernetes_documents() if doc["kind"] != "Kustomization"],
                         ids=lambda doc: f"{doc['kind']}/{doc['metadata']['name']}")
def test_manifests_validate_against_the_kubernetes_schemas(document) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    manifests = {path.name for path in (DEPLOY / "kubernetes").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_coordinator_ports_probes_volumes_and_flags_agree() -> None:
    (statefulset,), (service,) = by_kind("StatefulSet"), by_kind("Service")
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    _, args = parse_command(container["command"])
    assert ports == {"grpc": args.port, "metrics": args.metrics_port} and args.host == "0.0.0.0"
    assert args.start_or_resume and args.log_format == "json"
    assert container["readinessProbe"]["grpc"] == {"port": args.port, "service": SERVICE_NAME}
    assert container["livenessProbe"]["grpc"] == {"port": args.port}  # "" = the server as a whole
    assert {port["targetPort"] for port in service["spec"]["ports"]} == set(ports)
    assert service["spec"]["selector"] == statefulset["spec"]["template"]["metadata"]["labels"]
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    (mount,) = container["volumeMounts"]
    claims = {claim["metadata"]["name"] for claim in statefulset["spec"]["volumeClaimTemplates"]}
    assert mount["name"] in claims and Path(args.state_dir).is_relative_to(mount["mountPath"])
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["fsGroup"]


def test_clients_reach_the_coordinator_service_and_read_the_data_the_init_container_writes() -> None:
    (job,), (service,) = by_kind("Job"), by_kind("Service")
    pod = job["spec"]["template"]["spec"]
    volumes = {volume["name"] for volume in pod["volumes"]}
    (init,), (container,) = pod["initContainers"], pod["containers"]
    _, data = parse_command(init["command"])
    assert data.clients == job["spec"]["completions"]
    for index in range(job["spec"]["completions"]):
        _, args = parse_command(container["command"], {"JOB_COMPLETION_INDEX": str(index)})
        host, port = args.server.split(":")
        assert host == service["metadata"]["name"]
        assert int(port) in {port["port"] for port in service["spec"]["ports"] if port["name"] == "grpc"}
        assert args.data == data.out / f"client_{index}" and args.client_id == f"site-{index}"
        assert {port["containerPort"] for port in container["ports"]} == {args.metrics_port}
    for each in (init, container):
        assert {mount["name"] for mount in each["volumeMounts"]} <= volumes
    assert job["spec"]["completionMode"] == "Indexed" and pod["restartPolicy"] == "OnFailure"


def test_compose_runs_a_coordinator_and_two_clients_with_real_flags() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    _, server = parse_command(services["coordinator"]["command"])
    assert f"{server.port}:{server.port}" in services["coordinator"]["ports"]
    _, data = parse_command(services["data"]["command"])
    clients = [name for name in services if name.startswith("client-")]
    assert len(clients) == 2 == data.clients
    for name in clients:
        _, args = parse_command(services[name]["command"])
        assert args.server == f"coordinator:{server.port}"
        assert args.data.parent == data.out
        assert services[name]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    status = services["coordinator"]["healthcheck"]["test"]
    assert status[1] == "fedcmp-status" and status[status.index("--server") + 1] == f"127.0.0.1:{server.port}"
    assert set(compose["volumes"]) == {"state", "data"}
    assert Path(server.state_dir).is_relative_to("/var/lib/fedcmp")


def test_the_image_runs_as_non_root_with_the_state_dir_a_volume_and_a_valid_default_command() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    lines = re.sub(r"\\\n\s*", " ", dockerfile).splitlines()
    instructions = [line for line in lines if line and not line.startswith("#")]
    user = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert user and user[-1] != "root"
    (volume,) = [json.loads(line.removeprefix("VOLUME ")) for line in instructions if line.startswith("VOLUME ")]
    (cmd,) = [json.loads(line.removeprefix("CMD ")) for line in instructions if line.startswith("CMD ")]
    _, args = parse_command(cmd)
    assert Path(args.state_dir).is_relative_to(volume[0]) and args.host == "0.0.0.0"
    copied = {line.split()[1] for line in instructions if line.startswith("COPY ")}
    assert set(_package_dirs()) <= copied  # every package folder the wheel maps is in the image


def _package_dirs() -> list[str]:
    pyproject = (DEPLOY.parent / "pyproject.toml").read_text()
    section = pyproject.split("[tool.setuptools.package-dir]")[1].split("\n[")[0]
    return sorted(set(re.findall(r'=\s*"([^"]+)"', section)))
