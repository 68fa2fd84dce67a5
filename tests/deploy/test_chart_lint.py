"""The chart lints strictly and renders manifests that validate against the
Kubernetes 1.30 and 1.34 schemas, for every values file under ci/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import helm_python
import pytest

import support
from support import CHART, CI_IDS, CI_VALUES, CRD_KINDS

KUBE_VERSIONS = ["1.30.0", "1.34.0"]

# Lint findings of severity >= 2 (warning, error) that are accepted, with the
# reason. Severity 1 (info, such as "icon is recommended") is always accepted.
ACCEPTED_LINT_MESSAGES: dict[str, str] = {}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values_file", CI_VALUES, ids=CI_IDS)
def test_lint_strict(values_file: Path, kube_version: str) -> None:
    report = helm_python.lint(
        str(CHART), support.load_yaml(values_file), strict=True, kube_version=f"v{kube_version}"
    )
    assert report["total_charts_linted"] == 1
    assert not report["errors"], report["errors"]
    serious = [
        m for m in report["messages"]
        if m["severity"] >= 2 and m["error"] not in ACCEPTED_LINT_MESSAGES
    ]
    assert not serious, serious


def test_ci_values_cover_the_required_scenarios() -> None:
    assert {"default", "ha-hpa", "tls", "existing-secret", "ingress"} <= set(CI_IDS)


@pytest.mark.parametrize("values_file", CI_VALUES, ids=CI_IDS)
def test_rendered_manifests_validate_strictly(values_file: Path, tmp_path: Path) -> None:
    """kubernetes-validate --strict, against each Kubernetes version. It only
    warns on CRDs (no schema); those kinds are checked by the policy tests."""
    out = support.rendered(support.load_yaml(values_file))
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(out.manifests_yaml(), encoding="utf-8")
    command = [sys.executable, "-m", "kubernetes_validate", "--strict"]
    for version in KUBE_VERSIONS:
        command += ["-k", version]
    result = subprocess.run(command + [str(manifest)], capture_output=True, text=True, check=False)
    lines = (result.stdout + result.stderr).splitlines()

    errors = [line for line in lines if line.startswith(("ERROR", "FATAL"))]
    assert not errors, "\n".join(errors)
    warnings = [line for line in lines if line.startswith("WARN")]
    unexpected = [w for w in warnings if not any(f"schema for kind {kind} with" in w for kind in CRD_KINDS)]
    assert not unexpected, "\n".join(unexpected)
    assert result.returncode == 0, "\n".join(lines)

    # Every resource with a built-in schema passed against every version.
    documents = out.documents
    builtin = [doc for doc in documents if doc["kind"] not in CRD_KINDS]
    passed = [line for line in lines if line.startswith("INFO") and " passed " in line]
    assert len(passed) == len(builtin) * len(KUBE_VERSIONS), "\n".join(lines)
    crds = [doc for doc in documents if doc["kind"] in CRD_KINDS]
    assert len(warnings) == len(crds) * len(KUBE_VERSIONS), "\n".join(lines)


def test_prestop_sleep_needs_kubernetes_1_30(tmp_path: Path) -> None:
    """The preStop sleep action is why the chart needs 1.30, as Chart.yaml's
    kubeVersion says: 1.28 does not know it, and 1.29 has it only behind an
    alpha feature gate (the schema cannot show that)."""
    out = support.rendered(support.ci_values("default"))
    manifest = tmp_path / "deployment.yaml"
    manifest.write_text(out.files["herald/templates/deployment.yaml"], encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", "1.28.0", str(manifest)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode != 0 and "sleep" in result.stdout, result.stdout
    assert support.load_yaml(CHART / "Chart.yaml")["kubeVersion"] == ">=1.30.0-0"


@pytest.mark.parametrize("values_file", CI_VALUES, ids=CI_IDS)
def test_rendered_manifests_pass_yamllint(values_file: Path, tmp_path: Path) -> None:
    """Duplicate keys are the classic template bug; YAML parsers keep the last
    one silently."""
    out = support.rendered(support.load_yaml(values_file))
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(out.manifests_yaml(), encoding="utf-8")
    config = (
        "{extends: default, rules: {line-length: disable, document-start: disable, "
        "indentation: disable, empty-lines: disable, comments: disable, "
        "comments-indentation: disable, octal-values: disable}}"
    )
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "-f", "parsable", "-d", config, str(manifest)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_values_files_pass_yamllint() -> None:
    files = [CHART / "values.yaml", CHART / "Chart.yaml", *CI_VALUES]
    config = "{extends: default, rules: {line-length: {max: 120}, document-start: disable}}"
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "-s", "-f", "parsable", "-d", config, *map(str, files)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
