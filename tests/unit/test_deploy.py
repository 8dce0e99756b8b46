"""The Kubernetes files in deploy/ parse and hang together: required fields, probes on the paths
and the port the process serves, the image and the flags of the real `fuse` command, and value
names of the official NATS Helm chart."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from newfuse.cli._read_models import ALL_NAMES as BUILTIN_NAMES
from newfuse.cli.main import build_parser
from newfuse.config import Settings, split_address

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# Value paths of the nats-io/k8s `nats` chart 2.x that deploy/nats-values.yaml may set (a
# misspelt key is silently ignored by Helm, so it is checked here).
CHART_VALUES = {
    "config.cluster.enabled",
    "config.cluster.replicas",
    "config.cluster.port",
    "config.jetstream.enabled",
    "config.jetstream.fileStore.enabled",
    "config.jetstream.fileStore.dir",
    "config.jetstream.fileStore.maxSize",
    "config.jetstream.fileStore.pvc.enabled",
    "config.jetstream.fileStore.pvc.size",
    "config.jetstream.fileStore.pvc.storageClassName",
    "config.jetstream.memoryStore.enabled",
    "config.jetstream.memoryStore.maxSize",
    "config.monitor.enabled",
    "config.monitor.port",
    "podTemplate.topologySpreadConstraints",
    "podDisruptionBudget.enabled",
    "natsBox.enabled",
}


def documents() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert isinstance(document, dict), f"{path.name}: a document that is not a mapping"
            found.append((path, document))
    return found


def workloads() -> list[tuple[str, dict[str, Any]]]:
    return [
        (doc["metadata"]["name"], doc)
        for _, doc in documents()
        if doc["kind"] in ("Deployment", "StatefulSet")
    ]


def fuse_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [
        (name, workload, container)
        for name, workload in workloads()
        for container in workload["spec"]["template"]["spec"]["containers"]
        if container.get("command", [None])[0] == "fuse"
    ]


def flags_of(*command: str) -> set[str]:
    """The long options `fuse <command> --help` lists (the real CLI, in a subprocess)."""
    result = subprocess.run(
        [sys.executable, "-m", "newfuse", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", result.stdout))


def test_every_manifest_has_the_fields_kubernetes_requires() -> None:
    kinds = set()
    for path, doc in documents():
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path.name
        assert doc["metadata"].get("name"), path.name
        kinds.add(doc["kind"])
        if doc["kind"] in ("Deployment", "StatefulSet"):
            spec = doc["spec"]
            assert doc["apiVersion"] == "apps/v1"
            labels = spec["template"]["metadata"]["labels"]
            assert spec["selector"]["matchLabels"].items() <= labels.items(), path.name
            for container in spec["template"]["spec"]["containers"]:
                assert container["name"] and container["image"], path.name
    assert {"ConfigMap", "Deployment", "StatefulSet", "Service"} <= kinds


def test_services_select_pods_and_name_ports_they_have() -> None:
    pods = [
        (doc["spec"]["template"]["metadata"]["labels"], doc["spec"]["template"]["spec"])
        for _, doc in workloads()
    ]
    services = [doc for _, doc in documents() if doc["kind"] == "Service"]
    assert services
    for service in services:
        selected = [
            spec for labels, spec in pods if service["spec"]["selector"].items() <= labels.items()
        ]
        assert selected, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            for spec in selected:
                names = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
                assert port["targetPort"] in names, service["metadata"]["name"]


def test_volumes_and_config_maps_referenced_exist() -> None:
    claims = {d["metadata"]["name"] for _, d in documents() if d["kind"] == "PersistentVolumeClaim"}
    maps = {d["metadata"]["name"] for _, d in documents() if d["kind"] == "ConfigMap"}
    for name, workload in workloads():
        spec = workload["spec"]["template"]["spec"]
        claim_templates = workload["spec"].get("volumeClaimTemplates", [])
        volumes = {v["name"] for v in spec.get("volumes", [])}
        volumes |= {template["metadata"]["name"] for template in claim_templates}
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, name
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in maps, name


def test_the_config_map_holds_settings_newfuse_reads_with_values_it_accepts() -> None:
    [data] = [d["data"] for _, d in documents() if d["kind"] == "ConfigMap"]
    known = {f"FUSE_{field.upper()}" for field in Settings.__struct_fields__}
    assert set(data) <= known
    settings = Settings.from_env(data)
    assert settings.nats_url == "nats://nats:4222"  # the NATS chart's Service, release `nats`
    valkey = next(doc for name, doc in workloads() if name == "valkey")
    assert settings.redis_url == f"redis://{valkey['spec']['serviceName']}:6379/0"


def test_runners_probe_the_paths_and_port_their_health_server_listens_on() -> None:
    runners = fuse_containers()
    assert len(runners) == 2
    for name, _, container in runners:
        command = container["command"]
        _, port = split_address(command[command.index("--health") + 1])
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path, f"{name} {probe}"
            assert ports.get(get["port"], get["port"]) == port, f"{name} {probe}"


def test_runner_commands_use_the_real_flags_image_and_projection_names() -> None:
    global_flags = flags_of()
    run_flags = flags_of("projections", "run")
    assert "--health" in run_flags
    parser = build_parser()
    seen = set()
    for name, workload, container in fuse_containers():
        command = container["command"]
        assert container["image"] == f"{PROJECT['name']}:{PROJECT['version']}", name
        run = command.index("run")
        assert command[run - 1] == "projections"
        assert {a for a in command[:run] if a.startswith("--")} <= global_flags, name
        assert {a for a in command[run:] if a.startswith("--")} <= run_flags, name
        args = parser.parse_args(command[1:])
        assert set(args.names) <= set(BUILTIN_NAMES), name
        seen.update(args.names)
        # one runner per projection: its checkpoint has one writer (deploy/README.md)
        assert workload["spec"]["replicas"] == 1, name
        assert workload["spec"]["strategy"]["type"] == "Recreate", name
    assert seen == set(BUILTIN_NAMES)


def test_the_image_runs_the_fuse_entry_point_of_this_project() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "fuse" in PROJECT["scripts"]
    assert 'ENTRYPOINT ["fuse"]' in dockerfile
    assert f"-t {PROJECT['name']}:{PROJECT['version']}" in dockerfile
    joined = dockerfile.replace("\\\n", " ")  # continuation lines make one instruction
    install = re.search(r"^RUN pip install .* \.( |$).*", joined, re.MULTILINE)
    assert install, "the image installs this project"
    assert "-c constraints.txt --build-constraint constraints.txt ." in install[0]


def paths(values: dict[str, Any], prefix: str = "") -> set[str]:
    found = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in CHART_VALUES:
            found |= paths(value, path + ".")
        else:
            found.add(path)
    return found


def test_nats_values_ask_the_chart_for_a_3_node_jetstream_cluster_on_files() -> None:
    values = yaml.safe_load((DEPLOY / "nats-values.yaml").read_text())
    assert paths(values) <= CHART_VALUES
    config = values["config"]
    assert config["cluster"] == {"enabled": True, "replicas": 3}
    jetstream = config["jetstream"]
    assert jetstream["enabled"] is True
    assert jetstream["fileStore"]["enabled"] is True
    assert jetstream["fileStore"]["pvc"]["enabled"] is True
    assert jetstream["memoryStore"]["enabled"] is False


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.y*ml")), ids=lambda p: p.name)
def test_every_yaml_file_parses(path: Path) -> None:
    assert all(doc is not None for doc in yaml.safe_load_all(path.read_text()))
