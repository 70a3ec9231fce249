"""The shipped deployment files, checked without a cluster or Docker: the Kubernetes manifests against the
Kubernetes API schemas (kubernetes-validate, offline), their cross-references and security settings;
docker-compose.cluster.yml parsed and checked against the HAProxy configuration it mounts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
KUBERNETES_VERSION = "1.30"


def _objects() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") != "Kustomization"]
    return docs


def _one(kind: str) -> dict[str, Any]:
    found = [d for d in _objects() if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


@pytest.mark.parametrize("obj", _objects(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_is_valid_against_the_kubernetes_schema(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)  # raises on any violation


def test_the_validator_can_fail() -> None:
    broken = _one("Deployment")
    broken = {**broken, "spec": {**broken["spec"], "replicas": "three"}}
    with pytest.raises(kubernetes_validate.ValidationError, match="three"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    pdb = _one("PodDisruptionBudget")
    typo = {**pdb, "spec": {**pdb["spec"], "minAvailabel": 2}}  # strict: unknown fields are errors
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_deployment_runs_locked_down_with_probes_drain_and_resources() -> None:
    deployment = _one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the Docker image's user
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > 10  # longer than the preStop drain
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "/tmp" in mounts  # the only writable paths of a read-only root


def test_objects_refer_to_each_other_by_the_right_names() -> None:
    deployment = _one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in (d for d in _objects() if d["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
    assert _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert _one("PodDisruptionBudget")["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    target = _one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    sources = {next(iter(s)): next(iter(s.values()))["name"] for s in container["envFrom"]}
    assert sources["configMapRef"] == _one("ConfigMap")["metadata"]["name"]
    assert sources["secretRef"] == _one("Secret")["metadata"]["name"]
    assert {"MD_ADMIN_TOKEN", "MD_INFERENCE_TOKEN"} <= set(_one("Secret")["stringData"])
    assert not any("TOKEN" in k for k in _one("ConfigMap")["data"])  # tokens live in the Secret only


# -- docker-compose.cluster.yml ------------------------------------------------------------------------
def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.cluster.yml").read_text())


def _required_haproxy_variables() -> set[str]:
    """Environment variables the HAProxy configuration uses without a default."""
    return set(re.findall(r"\$\{(\w+)\}", HAPROXY_CFG.read_text()))


def test_compose_cluster_has_s3_three_replicas_and_the_balancer() -> None:
    services = _compose()["services"]
    assert set(services) == {"seaweedfs", "replica1", "replica2", "replica3", "haproxy"}
    for name in ("replica1", "replica2", "replica3"):
        replica = services[name]
        assert replica["environment"]["MD_STORE_URL"].startswith("s3://")
        assert replica["environment"]["AWS_ENDPOINT_URL"] == "http://seaweedfs:8333"
        assert replica["read_only"] is True and replica["cap_drop"] == ["ALL"]
        assert "ports" not in replica  # reachable through the balancer only
        assert replica["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
    lb = services["haproxy"]
    env = lb["environment"]
    # The balancer's servers are the three replicas, on the port the image listens on.
    assert [env[f"MD_REPLICA_{i}"] for i in (1, 2, 3)] == [f"replica{i}:8000" for i in (1, 2, 3)]
    assert _required_haproxy_variables() <= set(env)
    mounted = lb["volumes"][0].split(":")
    assert (ROOT / mounted[0]).resolve() == HAPROXY_CFG and mounted[1] in lb["command"]
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published)  # loopback only
    # Every port the balancer listens on (HTTP, HTTPS, stats) is the one it publishes.
    targets = {p.rsplit(":", 1)[1] for p in lb["ports"]}
    assert targets == {env["MD_LB_PORT"], env["MD_LB_TLS_PORT"], env["MD_LB_STATS_PORT"]}
    # The replicas believe X-Forwarded-For from the balancer's fixed address, and from no one else.
    lb_address = lb["networks"]["cluster"]["ipv4_address"]
    for name in ("replica1", "replica2", "replica3"):
        assert services[name]["environment"]["MD_TRUSTED_PROXIES"] == lb_address


def test_loopback_launcher_sets_what_the_haproxy_configuration_requires(tmp_path: Path) -> None:
    from deploy.cluster import Cluster, ClusterConfig

    cluster = Cluster(ClusterConfig(store=tmp_path / "store", work_dir=tmp_path))
    cluster.certificate = tmp_path / "lb.pem"
    env = cluster.haproxy_environment()
    assert _required_haproxy_variables() <= set(env)
    assert all(env[f"MD_REPLICA_{i + 1}"] == f"127.0.0.1:{p}" for i, p in enumerate(cluster.replica_ports))
    assert env["MD_LB_HOST"] == "127.0.0.1"
    # The balancer connects from its own loopback address, the one proxy the replicas trust.
    assert env["MD_LB_SOURCE"] == "127.0.0.9" != env["MD_LB_HOST"]
    assert cluster.replica_environment(0)["MD_TRUSTED_PROXIES"] == env["MD_LB_SOURCE"]
