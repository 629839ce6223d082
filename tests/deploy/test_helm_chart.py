"""The Helm chart, rendered by Helm's own engine (helm-python-sdk: Helm v4's Go SDK, no binary,
no cluster), linted by Helm, each object validated against Kubernetes' schemas
(kubernetes-validate) and the whole checked by checkov's Kubernetes policies."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway.sglang_launch import launch_command
from tests.procs import ROOT

CHART = ROOT / "deploy" / "helm" / "korean-token-limiter"
KUBERNETES = "1.33"
RELEASE = "ktl"
FULL = f"{RELEASE}-korean-token-limiter"
PRODUCTION: dict[str, Any] = {
    "sglang": {"enabled": True, "gpus": 2},
    "serviceMonitor": {"enabled": True},
    "existingSecret": "ktl-env",
    "ingress": {"enabled": True, "tlsSecretName": "ktl-tls"},
    "gateway": {"spool": {"hostPath": "/var/lib/korean-token-limiter/ledger-spool"}},
}
# Policies left to the operator, for every object (checkov --skip-check). Resource-specific
# exceptions are annotated on the resource itself (checkov.io/skipN) with their reason.
CHECKOV_SKIPPED = {
    "CKV_K8S_43": "image digests: the operator pins them in values (image.tag may be a digest)",
    "CKV_K8S_15": "pull policy Always: tags are versioned; IfNotPresent avoids a registry outage",
    "CKV_K8S_35": "settings are environment variables by design (limiter_site/settings.py)",
}
# ServiceMonitor is a CRD (Prometheus Operator), absent from Kubernetes' schemas: the fields the
# chart sets, checked against the shape the operator's CRD gives them.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port", "path"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "authorization": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "type": {"type": "string"},
                                    "credentials": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["name", "key"],
                                        "properties": {
                                            "name": {"type": "string", "minLength": 1},
                                            "key": {"type": "string", "minLength": 1},
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name=RELEASE, namespace="limiter")
    return [
        document
        for path, text in sorted(manifests.items())
        if path.endswith(".yaml")
        for document in yaml.safe_load_all(text)
        if document
    ]


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def containers(
    objects: list[dict[str, Any]],
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(the Deployment or Job, one of its containers)."""
    for o in objects:
        if o["kind"] in ("Deployment", "Job"):
            for container in o["spec"]["template"]["spec"]["containers"]:
                yield o, container


@pytest.fixture(scope="module")
def default() -> list[dict[str, Any]]:
    return render({})


@pytest.fixture(scope="module")
def production() -> list[dict[str, Any]]:
    return render(PRODUCTION)


def test_helm_lints_the_chart_and_its_schema_refuses_bad_values() -> None:
    report = helm.lint(str(CHART))
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] > 1] == []  # info only
    with helm.Chart.load(str(CHART)) as chart:
        bad: dict[str, Any]
        for bad in ({"gateway": {"replicas": -1}}, {"gateway": {"replicas": "2"}},
                    {"gatway": {}}, {"sglang": {"gpus": "2"}},
                    {"image": {"pullPolicy": "Sometimes"}}):  # fmt: skip
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema(bad)
        chart.validate_schema(PRODUCTION)


def test_every_object_is_valid_kubernetes(
    default: list[dict[str, Any]], production: list[dict[str, Any]]
) -> None:
    for o in default + production:
        if o["kind"] == "ServiceMonitor":  # a CRD: not in Kubernetes' own schemas
            jsonschema.validate(o, SERVICE_MONITOR_SCHEMA)
            continue
        kubernetes_validate.validate(o, KUBERNETES, strict=True)
        assert o["metadata"]["namespace"] == "limiter", o["metadata"]["name"]


def test_the_default_install_is_the_topology_on_the_simulator(
    default: list[dict[str, Any]],
) -> None:
    deployments = by_kind(default, "Deployment")
    assert set(deployments) == {f"{FULL}-{c}" for c in
                                ("gateway", "worker", "beat", "simulator")}  # fmt: skip
    config = by_kind(default, "ConfigMap")[f"{FULL}-config"]["data"]
    assert config["SGLANG_URL"] == f"http://{FULL}-simulator:8000"
    beat = deployments[f"{FULL}-beat"]["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"
    gateway = deployments[f"{FULL}-gateway"]["spec"]
    assert "replicas" not in gateway  # the autoscaler owns the count
    assert gateway["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpa = by_kind(default, "HorizontalPodAutoscaler")[f"{FULL}-gateway"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": f"{FULL}-gateway"}  # fmt: skip
    assert hpa["minReplicas"] >= 2
    assert not by_kind(default, "ServiceMonitor")


def test_selectors_match_their_pods(production: list[dict[str, Any]]) -> None:
    pods = {
        name: o["spec"]["template"]["metadata"]["labels"]
        for name, o in by_kind(production, "Deployment").items()
    }

    def selects(selector: dict[str, str]) -> set[str]:
        return {n for n, labels in pods.items() if selector.items() <= labels.items()}

    for service in by_kind(production, "Service").values():
        assert selects(service["spec"]["selector"]) == {service["metadata"]["name"]}
    for name, o in by_kind(production, "Deployment").items():
        assert selects(o["spec"]["selector"]["matchLabels"]) == {name}
    pdb = by_kind(production, "PodDisruptionBudget")[f"{FULL}-gateway"]["spec"]
    assert selects(pdb["selector"]["matchLabels"]) == {f"{FULL}-gateway"}
    for monitor in by_kind(production, "ServiceMonitor").values():
        services = [s for s in by_kind(production, "Service").values()
                    if monitor["spec"]["selector"]["matchLabels"].items()
                    <= s["metadata"]["labels"].items()]  # fmt: skip
        assert len(services) == 1


def test_production_values_run_sglang_on_gpus(production: list[dict[str, Any]]) -> None:
    deployments = by_kind(production, "Deployment")
    assert f"{FULL}-simulator" not in deployments
    sglang = deployments[f"{FULL}-sglang"]
    assert sglang["spec"]["strategy"]["type"] == "Recreate"
    (container,) = sglang["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["args"] == ["launch-sglang"]
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"][
        "periodSeconds"] >= 600  # fmt: skip
    volumes = {v["name"]: v for v in sglang["spec"]["template"]["spec"]["volumes"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    config = by_kind(production, "ConfigMap")[f"{FULL}-config"]["data"]
    assert config["SGLANG_URL"] == f"http://{FULL}-sglang:30000"
    # The official image instead, with the launcher's arguments as `launch_sglang --json`
    # prints them (README: helm --set-json sglang.args="$(manage.py launch_sglang --json …)").
    config = yaml.safe_load((ROOT / "config" / "sglang_korean.yaml").read_text())
    args = launch_command(config["sglang_server"], host="0.0.0.0", port=30000).args[1:]
    official = render(PRODUCTION | {"sglang": {"enabled": True, "args": args}})
    (container,) = by_kind(official, "Deployment")[f"{FULL}-sglang"]["spec"]["template"]["spec"][
        "containers"]  # fmt: skip
    assert container["command"] == ["python3"] and container["args"] == args


def test_migrations_run_as_a_hook_before_install_and_upgrade(
    default: list[dict[str, Any]], production: list[dict[str, Any]]
) -> None:
    for objects, secret in ((default, f"{FULL}-migrate"), (production, "ktl-env")):
        job = by_kind(objects, "Job")[f"{FULL}-migrate"]
        annotations = job["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
        spec = job["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert container["args"] == ["migrate"]
        # What exists before the release: its own hook Secret, or the operator's.
        assert container["envFrom"] == [{"secretRef": {"name": secret}}]
        assert "serviceAccountName" not in spec
        env = {e["name"]: e["value"] for e in container["env"]}
        assert "korean_users" not in env["LIMITER_IMPORT_CONFIG"]
    hook_secret = by_kind(default, "Secret")[f"{FULL}-migrate"]["metadata"]["annotations"]
    assert int(hook_secret["helm.sh/hook-weight"]) < 0  # before the Job
    assert not by_kind(production, "Secret")  # existingSecret: nothing rendered


def test_probes_security_and_secrets(
    default: list[dict[str, Any]], production: list[dict[str, Any]]
) -> None:
    gateway = by_kind(default, "Deployment")[f"{FULL}-gateway"]["spec"]["template"]["spec"]
    (container,) = gateway["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["exec"]["command"] == [
        "/app/deploy/docker/probe.sh", "ready"]  # fmt: skip
    assert gateway["terminationGracePeriodSeconds"] > int(
        {e["name"]: e["value"] for e in container["env"]}["GATEWAY_GRACEFUL_SECONDS"]
    )
    for objects in (default, production):
        for owner, c in containers(objects):
            name = owner["metadata"]["name"]
            if name.endswith("-sglang"):
                continue  # SGLang's own image (annotated exceptions)
            pod_security = owner["spec"]["template"]["spec"]["securityContext"]
            assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] == 10001
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
    # Secret values given inline land in Secrets only: never in a ConfigMap, nor in a pod
    # spec's plain `env` (which anyone allowed to read Deployments sees).
    secrets = {key: f"sentinel-{key.lower()}-0123456789" for key in (
        "SECRET_KEY", "DATABASE_URL", "REDIS_URL", "GATEWAY_MONITORING_TOKEN",
        "EMAIL_HOST_PASSWORD")}  # fmt: skip
    inline = render({"secrets": secrets})
    readable = [o for o in inline if o["kind"] != "Secret"]
    for o in readable:
        text = yaml.safe_dump(o)
        leaked = [key for key, value in secrets.items() if value in text]
        assert not leaked, f"{o['kind']} {o['metadata']['name']} holds {leaked}"
    for config_map in by_kind(inline, "ConfigMap").values():
        assert not set(secrets) & set(config_map["data"])
    assert set(secrets) <= set(by_kind(inline, "Secret")[f"{FULL}-secrets"]["stringData"])
    spool = next(
        v for v in by_kind(production, "Deployment")[f"{FULL}-gateway"]["spec"]["template"]["spec"]
        ["volumes"] if v["name"] == "spool"
    )  # fmt: skip
    assert spool["hostPath"]["type"] == "DirectoryOrCreate"


def checkov() -> str:
    found = ROOT / ".venv-checkov" / "bin" / "checkov"
    if not found.exists():
        pytest.fail("checkov is missing: bash deploy/test.sh installs it in .venv-checkov/")
    return str(found)


def test_checkov_finds_no_policy_violation(tmp_path: Path) -> None:
    for label, values in (("default", {}), ("production", PRODUCTION)):
        folder = tmp_path / label
        folder.mkdir()
        for index, o in enumerate(render(values)):
            (folder / f"{index:02d}-{o['kind']}.yaml").write_text(yaml.safe_dump(o))
    result = subprocess.run(
        [checkov(), "-d", str(tmp_path), "--framework", "kubernetes", "--quiet", "--compact",
         "--skip-download", "-o", "json",
         "--skip-check", ",".join(CHECKOV_SKIPPED)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov gave no JSON report: {result.stdout[-2000:]}{result.stderr[-2000:]}")
    # One framework: one report (a dict); several: a list of them.
    reports = report if isinstance(report, list) else [report]
    summary = [r["summary"] for r in reports]
    assert sum(s["passed"] for s in summary) > 50, summary  # it did look at the objects
    failed = sorted(
        f"{check['check_id']} {check['resource']} ({check['file_path']}): {check['check_name']}"
        for r in reports
        for check in r["results"]["failed_checks"]
    )
    assert not failed, "checkov found policy violations:\n" + "\n".join(failed)
    assert result.returncode == 0, result.stderr[-2000:]
