"""Deployment files keep their promises without a cluster: every Kubernetes manifest parses and has probes,
a non-root security context, resource requests and secrets from a Secret; the image, compose and the
manifests agree on the stop grace; installs are pinned by requirements.lock."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from bot.settings import SECRET_SETTINGS

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"


def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict) and doc.get("kind"), path
            doc["_file"] = path.name
            docs.append(doc)
    return docs


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in manifests() if doc["kind"] == kind]


def deployments() -> dict[str, dict[str, Any]]:
    """KIMIBOT_ROLE -> its Deployment."""
    found = {}
    for deployment in of_kind("Deployment"):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        role = next(e["value"] for e in container["env"] if e["name"] == "KIMIBOT_ROLE")
        found[role] = deployment
    return found


def stop_grace_of_image() -> int:
    match = re.search(r'org\.kimibot\.stop-grace-seconds="(\d+)"', (ROOT / "Dockerfile").read_text())
    assert match, "the Dockerfile documents its stop grace in a label"
    return int(match.group(1))


def test_every_manifest_parses_and_kustomization_lists_them_all() -> None:
    docs = manifests()
    assert all(doc.get("apiVersion") for doc in docs)
    assert all(doc["metadata"].get("name") for doc in docs if doc["kind"] != "Kustomization")
    listed = set(next(d for d in docs if d["kind"] == "Kustomization")["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files


def test_there_is_a_receiver_and_a_worker_deployment() -> None:
    assert set(deployments()) == {"receiver", "worker"}


@pytest.mark.parametrize("role", ["receiver", "worker"])
def test_each_deployment_has_probes_a_non_root_context_and_resource_requests(role: str) -> None:
    pod = deployments()[role]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ports
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    requests = container["resources"]["requests"]
    assert requests.get("cpu") and requests.get("memory")


@pytest.mark.parametrize("role", ["receiver", "worker"])
def test_secrets_come_from_a_secret_never_from_literal_values(role: str) -> None:
    pod = deployments()[role]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    secret_volumes = {v["name"] for v in pod["volumes"] if "secret" in v}
    mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in secret_volumes]
    for name in SECRET_SETTINGS:
        assert "value" not in env.get(name, {}), f"{name} is written into the manifest"
    for name in ("SLACK_BOT_TOKEN", "MOONSHOT_API_KEY", "REDIS_URL"):  # what every role needs
        assert f"{name}_FILE" in env or "secretKeyRef" in env.get(name, {}).get("valueFrom", {}), name
    for name, entry in env.items():
        if name.endswith("_FILE"):
            assert any(entry["value"].startswith(m.rstrip("/") + "/") for m in mounts), name
    config = of_kind("ConfigMap")[0]["data"]
    assert not set(config) & set(SECRET_SETTINGS)  # Redis is an external URL, from the Secret


def test_the_service_and_ingress_reach_the_receivers_over_https() -> None:
    receiver = deployments()["receiver"]["spec"]["template"]
    service = of_kind("Service")[0]
    labels = receiver["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    port_names = {p["name"] for p in receiver["spec"]["containers"][0]["ports"]}
    assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])
    ingress = of_kind("Ingress")[0]["spec"]
    assert ingress["tls"]
    paths = [p for rule in ingress["rules"] for p in rule["http"]["paths"]]
    assert any(
        p["path"] == "/slack/events" and p["backend"]["service"]["name"] == service["metadata"]["name"]
        for p in paths
    )


def test_the_stop_grace_agrees_everywhere_and_exceeds_the_shutdown_grace() -> None:
    grace = stop_grace_of_image()
    shutdown = float(of_kind("ConfigMap")[0]["data"]["SHUTDOWN_GRACE_SECONDS"])
    assert grace >= shutdown + 5
    for deployment in deployments().values():
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == grace
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in ("kimibot", "worker"):
        assert compose["services"][name]["stop_grace_period"] == f"{grace}s"


def test_compose_rotates_every_services_logs() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        options = service["logging"]["options"]
        assert options.get("max-size") and options.get("max-file"), name


def test_the_image_is_pinned_and_installs_from_the_lock() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert bases and all(re.fullmatch(r"python:3\.11(\.\d+)?-slim-bookworm", base) for base in bases), bases
    assert "-c requirements.lock" in dockerfile
    assert "requirements.lock" in (ROOT / "scripts" / "test").read_text()


def test_the_lock_pins_every_dependency_within_pyprojects_ranges() -> None:
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        requirement = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{name} is not pinned"
        assert requirement.specifier.contains(pins[name]), (name, pins[name], str(requirement.specifier))
