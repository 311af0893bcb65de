"""The Kubernetes manifests of deploy/kubernetes/: valid against the Kubernetes schemas
(kubernetes-validate, offline), and consistent with each other, with the agent's
configuration and with the container image.

The Prometheus Operator's custom resources have no schema in kubernetes-validate; they are
checked for what matters instead: the ServiceMonitor finds the Service's `metrics` port,
and the PrometheusRule carries exactly the tested rule files.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from scripted import ROOT, require_module

from agent.config import Config, load, parse_listen
from agent.workloads.podresources import DEFAULT_SOCKET

yaml = require_module("yaml")
kubernetes_validate = require_module("kubernetes_validate")

KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.29.0"
"""The oldest Kubernetes release still commonly run (EKS, GKE, AKS extended support in
2025) whose schema kubernetes-validate ships; everything used is older than that."""
CUSTOM_KINDS = frozenset({"ServiceMonitor", "PrometheusRule"})
CLUSTER_KINDS = frozenset({"Namespace", "ClusterRole", "ClusterRoleBinding"})
"""Objects of no namespace."""


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization() -> dict[str, Any]:
    (document,) = documents(KUBERNETES / "kustomization.yaml")
    return document


def resources() -> dict[str, dict[str, Any]]:
    """Every object the kustomization lists, by kind."""
    objects = [doc for name in kustomization()["resources"]
               for doc in documents(KUBERNETES / name)]
    kinds = [doc["kind"] for doc in objects]
    assert len(kinds) == len(set(kinds)), kinds
    return {doc["kind"]: doc for doc in objects}


def container(daemonset: dict[str, Any]) -> dict[str, Any]:
    (agent,) = daemonset["spec"]["template"]["spec"]["containers"]
    return agent


def agent_config() -> Config:
    (generated,) = kustomization()["configMapGenerator"]
    (filename,) = generated["files"]
    return load(KUBERNETES / filename, environ={})


def test_every_manifest_is_listed_and_valid_against_the_kubernetes_schema() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    validated = 0
    for kind, document in resources().items():
        if kind in CUSTOM_KINDS:
            assert document["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        validated += 1
    assert validated >= 5


def test_the_configmap_the_kustomization_generates_is_valid() -> None:
    (generated,) = kustomization()["configMapGenerator"]
    data = {name: (KUBERNETES / name).read_text() for name in generated["files"]}
    configmap = {"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": generated["name"]}, "data": data}
    kubernetes_validate.validate(configmap, KUBERNETES_VERSION, strict=True)
    config = agent_config()
    assert not config.agent.simulate


def test_the_daemonset_serves_probes_and_metrics_on_the_agents_port() -> None:
    objects = resources()
    daemonset = objects["DaemonSet"]
    agent = container(daemonset)
    (port,) = agent["ports"]
    assert port["name"] == "metrics"
    assert port["containerPort"] == parse_listen(agent_config().agent.listen)[1]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert agent[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe

    service = objects["Service"]
    (service_port,) = service["spec"]["ports"]
    assert service_port["name"] == "metrics" and service_port["targetPort"] == "metrics"
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    monitor = objects["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    # The alerts expect job="jouleprobe": the Operator names the job after the Service.
    assert service["metadata"]["name"] == "jouleprobe" and "jobLabel" not in monitor["spec"]
    assert "release" in monitor["metadata"]["labels"]
    assert "release" in objects["PrometheusRule"]["metadata"]["labels"]


def test_the_daemonset_runs_on_gpu_nodes_as_root_without_capabilities() -> None:
    pod = resources()["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["hostPID"] is True  # gpus = "auto"
    agent = container(resources()["DaemonSet"])
    env = {item["name"]: item.get("value", item.get("valueFrom")) for item in agent["env"]}
    assert env == {"NVIDIA_VISIBLE_DEVICES": "all", "NVIDIA_DRIVER_CAPABILITIES": "utility",
                   "NODE_NAME": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
    assert "nvidia.com/gpu" not in agent["resources"].get("limits", {})
    assert {"requests", "limits"} <= set(agent["resources"])

    # Root for the kubelet's root-only pod-resources socket, with no capability at all.
    context = agent["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"], context["runAsNonRoot"]) == (0, 0, False)
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert agent["securityContext"]["readOnlyRootFilesystem"] is True
    assert agent["securityContext"]["allowPrivilegeEscalation"] is False


def test_records_and_config_are_where_the_agent_looks() -> None:
    pod = resources()["DaemonSet"]["spec"]["template"]["spec"]
    agent = container(resources()["DaemonSet"])
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config = agent_config()
    assert volumes["records"]["hostPath"]["type"] == "DirectoryOrCreate"
    assert Path(config.records.path).parent == Path(mounts["records"])
    (generated,) = kustomization()["configMapGenerator"]
    assert volumes["config"]["configMap"]["name"] == generated["name"]
    assert agent["args"] == ["run", "--config", f"{mounts['config']}/{generated['files'][0]}"]
    assert "initContainers" not in pod  # root owns the records' directory, as created


def test_the_agent_may_only_read_pods_and_mounts_the_token_for_it() -> None:
    objects = resources()
    role, binding = objects["ClusterRole"], objects["ClusterRoleBinding"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": role["metadata"]["name"]}
    account = objects["ServiceAccount"]
    assert binding["subjects"] == [{"kind": "ServiceAccount",
                                    "name": account["metadata"]["name"],
                                    "namespace": objects["Namespace"]["metadata"]["name"]}]
    pod = objects["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is True
    assert account.get("automountServiceAccountToken") is False  # this pod only
    # Nothing else grants anything to the account.
    assert not {"Role", "RoleBinding"} & set(objects)


def test_the_pod_resources_socket_is_mounted_read_only() -> None:
    pod = resources()["DaemonSet"]["spec"]["template"]["spec"]
    agent = container(resources()["DaemonSet"])
    (mount,) = (m for m in agent["volumeMounts"] if m["name"] == "pod-resources")
    assert mount == {"name": "pod-resources", "mountPath": "/var/lib/kubelet/pod-resources",
                     "readOnly": True}
    (volume,) = (v for v in pod["volumes"] if v["name"] == "pod-resources")
    assert volume["hostPath"] == {"path": "/var/lib/kubelet/pod-resources",
                                  "type": "DirectoryOrCreate"}
    # The client's default socket is in it.
    assert Path(DEFAULT_SOCKET).parent == Path(mount["mountPath"])
    # The other mounts are as they were: only the records and /tmp are writable.
    writable = {m["name"] for m in agent["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"records", "tmp"}


def test_the_prometheus_rule_carries_the_tested_rule_files() -> None:
    spec = resources()["PrometheusRule"]["spec"]
    prometheus = ROOT / "deploy" / "prometheus"
    expected = [group for name in ("rules.yml", "recording.yml")
                for group in documents(prometheus / name)[0]["groups"]]
    assert spec["groups"] == expected
    generator = _script(KUBERNETES / "generate.py")
    assert generator.render() == (KUBERNETES / "prometheusrule.yaml").read_text(), (
        "run python deploy/kubernetes/generate.py")


def test_the_dashboards_configmap_carries_the_dashboards() -> None:
    configmap = resources()["ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    grafana = ROOT / "deploy" / "grafana"
    assert {name: json.loads(text) for name, text in configmap["data"].items()} == {
        path.name: json.loads(path.read_text()) for path in grafana.glob("*.json")}


def test_kustomize_builds_valid_objects(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the files themselves are checked above")
    result = subprocess.run([kubectl, "kustomize", str(KUBERNETES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert {doc["metadata"].get("namespace") for doc in built
            if doc["kind"] not in CLUSTER_KINDS} == {"jouleprobe"}
    assert all("namespace" not in doc["metadata"] for doc in built
               if doc["kind"] in CLUSTER_KINDS)
    (binding,) = (doc for doc in built if doc["kind"] == "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "jouleprobe", "namespace": "jouleprobe"}]
    for document in built:
        if document["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    (daemonset,) = (doc for doc in built if doc["kind"] == "DaemonSet")
    (config_name,) = (volume["configMap"]["name"]
                      for volume in daemonset["spec"]["template"]["spec"]["volumes"]
                      if volume["name"] == "config")
    assert config_name in {doc["metadata"]["name"] for doc in built if doc["kind"] == "ConfigMap"}


def _script(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"jouleprobe_{path.parent.name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
