"""What ships under deploy/: Kubernetes manifests valid against the schemas, the systemd unit
verified, alert rules unit-tested by promtool, and every metric they and the dashboard name
exported by a running server; and `serve --embedded never` refusing to start without a URL."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import reinitd_process, server_process

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
RULES = DEPLOY / "prometheus" / "reinitd-alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "reinitd-dashboard.json"
# Versions the manifests are checked against: the first with preStop's native sleep, and the
# newest the validator knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.33.0")
# Series named by the rules that reinitd does not export itself.
EXTERNAL_SERIES = {"up", "kube_pod_container_status_ready"}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is missing (Debian: apt-get install prometheus)")
    return found


def _manifests() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def _kind(kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in _manifests() if doc["kind"] == kind]
    return found


def test_manifests_are_valid_against_the_kubernetes_schemas() -> None:
    """Every manifest passes strict validation (unknown fields rejected) for each version."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for document in _manifests():
        if document["kind"] == "Kustomization":
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(document, version, strict=True)
    broken = _kind("Deployment")
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_kustomization_applies_every_manifest_but_the_secret_example() -> None:
    """kustomization.yaml lists each manifest file except the example Secret."""
    listed = set(yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())["resources"])
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files - {"secret.example.yaml"}


def test_deployment_probes_grace_and_sandbox_fit_the_server() -> None:
    """Probes hit /healthz and /readyz, the grace exceeds preStop plus the drain, the pod runs
    as the image's user with a read-only root, and DATABASE_URL comes from a Secret."""
    spec = _kind("Deployment")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {item["name"]: item for item in container["env"]}
    assert "secretKeyRef" in env["DATABASE_URL"]["valueFrom"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(env["REINITD_SHUTDOWN_TIMEOUT"]["value"])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + drain + 10
    containerfile = (ROOT / "Containerfile").read_text()
    user = re.search(r"^USER (\d+):(\d+)$", containerfile, re.MULTILINE)
    assert user is not None
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == int(user.group(1))
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}  # noqa: S108 -- in the pod
    job = _kind("Job")["spec"]["template"]["spec"]
    assert job["containers"][0]["args"] == ["migrate"]
    service = _kind("Service")["spec"]
    assert service["selector"] == _kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` passes the unit with ExecStart at this checkout's reinitd (the
    shipped path, /opt/reinitd/bin/reinitd, does not exist here)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (Debian: apt-get install systemd)")
    unit = (DEPLOY / "systemd" / "reinitd.service").read_text()
    assert "ExecStart=/opt/reinitd/bin/reinitd serve\n" in unit
    for setting in ("DynamicUser=yes", "NoNewPrivileges=yes", "KillSignal=SIGTERM"):
        assert f"\n{setting}\n" in unit
    here = Path(sys.executable).parent / "reinitd"
    assert here.exists()
    copy = tmp_path / "reinitd.service"
    copy.write_text(unit.replace("/opt/reinitd/bin/reinitd", str(here)))
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    """promtool accepts the rules and their unit tests pass (each alert fires, and not early)."""
    promtool = _promtool()
    for command in (["check", "rules", RULES.name], ["test", "rules", "reinitd-alerts.test.yaml"]):
        result = subprocess.run(
            [promtool, *command],
            cwd=RULES.parent,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    tested = set(
        re.findall(r"alertname: (\w+)", (RULES.parent / "reinitd-alerts.test.yaml").read_text())
    )
    defined = {rule["alert"] for rule in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]}
    assert tested == defined


def _series_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers not followed by `(`, minus keywords,
    label names inside braces and range/grouping clauses."""
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    words = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr))
    return {word for word in words if word not in {"and", "or", "unless", "le", "e"}}


def _rule_and_dashboard_series() -> set[str]:
    names: set[str] = set()
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            names |= _series_names(rule["expr"])
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names |= _series_names(target["expr"].replace("$__rate_interval", "5m"))
    return names


async def test_rules_and_dashboard_name_only_metrics_the_server_exports(
    database_url: str, tmp_path: Path
) -> None:
    """Every series the alert rules and the dashboard query is in a real server's /metrics."""
    wanted = _rule_and_dashboard_series()
    assert {"reinitd_listener_connected", "reinitd_gc_pause_seconds_bucket"} <= wanted
    async with (
        server_process(database_url, tmp_path) as server,
        aiohttp.ClientSession() as http,
        http.get(f"{server.url}/metrics") as response,
    ):
        text = await response.text()
    exported = {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }
    assert wanted - EXTERNAL_SERIES - exported == set()


async def test_serve_under_embedded_never_without_a_url_exits_2_naming_it(tmp_path: Path) -> None:
    """REINITD_EMBEDDED=never and no DATABASE_URL: exit 2 with one line naming the variable,
    and no embedded cluster made."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    process = await reinitd_process(
        "serve",
        env=env | {"REINITD_EMBEDDED": "never"},
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    assert stderr.decode().splitlines() == [
        "reinitd serve: --database-url (or DATABASE_URL) is required: the embedded PostgreSQL "
        "is off (--embedded never, or REINITD_EMBEDDED=never)"
    ]
    assert stdout == b""
    assert await asyncio.to_thread(os.listdir, tmp_path) == []
