"""Properties of the rendered chart: security, rollout and termination timing,
PDB and HPA rules, secrets handling, the checksum annotation, the values
schema, networking objects, and agreement with docs/configuration.md."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import helm_python
import pytest

import support
from support import CHART, CI_IDS, CI_VALUES, Rendered

ALL_CI = [support.load_yaml(path) for path in CI_VALUES]


def ci(name: str) -> dict[str, Any]:
    return support.ci_values(name)


def with_values(base: str, **overrides: Any) -> dict[str, Any]:
    return support.deep_merge(ci(base), overrides)


def pod_specs(out: Rendered) -> list[dict[str, Any]]:
    specs = [out.pod_spec]
    specs += [pod["spec"] for pod in out.kinds("Pod")]
    return specs


def seconds(duration: str) -> float:
    """The humantime strings the chart renders ("20s")."""
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, f"expected whole seconds, got {duration!r}"
    return float(match.group(1))


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises((helm_python.HelmRenderError, helm_python.HelmValuesError)) as error:
        support.render(values)
    return str(error.value)


# ---- security ---------------------------------------------------------------


@pytest.mark.parametrize("values", ALL_CI, ids=CI_IDS)
def test_restricted_pod_security(values: dict[str, Any]) -> None:
    out = support.rendered(values)
    for spec in pod_specs(out):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True
        assert pod["runAsUser"] > 0
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(forbidden)
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume
        for container in spec["containers"] + spec.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True
            assert sc.get("runAsUser", pod["runAsUser"]) > 0
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert not sc.get("privileged")
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert not sc["capabilities"].get("add")
            # No shell in the image: exec form, the binary itself.
            assert container["command"] == ["/usr/local/bin/herald"]
    service_accounts = out.kinds("ServiceAccount")
    if values.get("serviceAccount", {}).get("create", True):
        assert service_accounts, "the chart creates a ServiceAccount by default"
    assert all(sa["automountServiceAccountToken"] is False for sa in service_accounts)


def test_restricted_settings_cannot_be_switched_off() -> None:
    for override in (
        {"securityContext": {"privileged": True}},
        {"securityContext": {"readOnlyRootFilesystem": False}},
        {"securityContext": {"allowPrivilegeEscalation": True}},
        {"podSecurityContext": {"runAsUser": 0, "runAsGroup": 0, "fsGroup": 0}},
        {"podSecurityContext": {"runAsNonRoot": False, "runAsUser": 1, "runAsGroup": 1, "fsGroup": 1}},
    ):
        with pytest.raises(helm_python.HelmValuesError):
            support.render(support.deep_merge(ci("default"), override))


def test_container_runs_serve_with_the_rendered_config() -> None:
    out = support.rendered(ci("default"))
    container = out.container
    assert container["args"] == ["serve", "--config", "/etc/herald/herald.toml"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/herald"]["readOnly"] is True
    volume = next(v for v in out.pod_spec["volumes"] if v["name"] == mounts["/etc/herald"]["name"])
    sources = volume["projected"]["sources"]
    assert sources[0]["configMap"]["items"] == [{"key": "herald.toml", "path": "herald.toml"}]
    assert out.herald_toml["server"]["listen"] == "0.0.0.0:8080"
    assert container["ports"][0]["containerPort"] == 8080


def test_image_reference() -> None:
    app_version = support.load_yaml(CHART / "Chart.yaml")["appVersion"]
    assert support.rendered(ci("default")).container["image"] == f"herald:{app_version}"
    digest = "sha256:" + "ab" * 32
    out = support.rendered(with_values("default", image={"repository": "registry.example/herald", "tag": "1.2.3", "digest": digest}))
    assert out.container["image"] == f"registry.example/herald@{digest}"


# ---- probes, rollout, termination ---------------------------------------------


@pytest.mark.parametrize("values", ALL_CI, ids=CI_IDS)
def test_probes(values: dict[str, Any]) -> None:
    out = support.rendered(values)
    container = out.container
    port_name = container["ports"][0]["name"]
    scheme = "HTTPS" if values.get("tls", {}).get("enabled") else "HTTP"
    liveness, readiness = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
    assert (liveness["path"], liveness["port"], liveness["scheme"]) == ("/healthz", port_name, scheme)
    assert (readiness["path"], readiness["port"], readiness["scheme"]) == ("/readyz", port_name, scheme)


@pytest.mark.parametrize("values", ALL_CI, ids=CI_IDS)
def test_rolling_update_one_pod_at_a_time(values: dict[str, Any]) -> None:
    spec = support.rendered(values).deployment["spec"]
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert spec["minReadySeconds"] > 0


def test_rollout_drains_one_pod_at_a_time_by_default() -> None:
    """The next old pod goes only after the previous one had time to drain."""
    values = support.load_yaml(CHART / "values.yaml")
    shutdown = values["shutdown"]
    assert values["rollout"]["minReadySeconds"] >= shutdown["preStopSleepSeconds"] + shutdown["drainPeriodSeconds"]
    assert "WARNING" not in support.rendered(ci("default")).notes
    hurried = support.rendered(with_values("default", rollout={"minReadySeconds": 5}))
    assert "WARNING: rollout.minReadySeconds (5)" in hurried.notes


@pytest.mark.parametrize("values", ALL_CI, ids=CI_IDS)
def test_grace_period_covers_prestop_and_drain(values: dict[str, Any]) -> None:
    out = support.rendered(values)
    pre_stop = out.container["lifecycle"]["preStop"]
    assert set(pre_stop) == {"sleep"}, "the image has no shell: only the native sleep action works"
    sleep = pre_stop["sleep"]["seconds"]
    shutdown = out.herald_toml["shutdown"]
    drain, timeout = seconds(shutdown["drain_period"]), seconds(shutdown["timeout"])
    grace = out.pod_spec["terminationGracePeriodSeconds"]
    assert sleep > 0
    assert drain + 5 <= timeout, "herald refuses a shutdown.timeout that does not cover the drain"
    assert sleep + drain < grace
    assert sleep + timeout < grace, "the kubelet would SIGKILL herald before its own deadline"


def test_grace_period_is_computed_from_the_values() -> None:
    out = support.rendered(with_values("default", shutdown={
        "preStopSleepSeconds": 7, "drainPeriodSeconds": 40, "timeoutSeconds": 50, "terminationMarginSeconds": 3,
    }))
    assert out.pod_spec["terminationGracePeriodSeconds"] == 60
    assert out.container["lifecycle"]["preStop"]["sleep"]["seconds"] == 7
    assert out.herald_toml["shutdown"] == {"drain_period": "40s", "timeout": "50s"}
    explicit = support.rendered(with_values("default", shutdown={"terminationGracePeriodSeconds": 120}))
    assert explicit.pod_spec["terminationGracePeriodSeconds"] == 120


@pytest.mark.parametrize(
    "shutdown, expected",
    [
        ({"terminationGracePeriodSeconds": 30}, "shutdown.terminationGracePeriodSeconds (30) is too short"),
        ({"preStopSleepSeconds": 30, "terminationGracePeriodSeconds": 60}, "is too short"),
        ({"drainPeriodSeconds": 30, "timeoutSeconds": 30}, "shutdown.timeoutSeconds (30) must be at least shutdown.drainPeriodSeconds (30) + 5"),
        ({"drainPeriodSeconds": 26}, "shutdown.timeoutSeconds (30) must be at least shutdown.drainPeriodSeconds (26) + 5"),
        ({"drainPeriodSeconds": 60}, "must be at least shutdown.drainPeriodSeconds (60) + 5"),
    ],
    ids=["grace-below-timeout", "grace-below-prestop-plus-timeout", "timeout-equals-drain",
         "no-room-for-close-handshakes", "drain-above-timeout"],
)
def test_bad_shutdown_timing_fails_to_render(shutdown: dict[str, int], expected: str) -> None:
    assert expected in render_error(with_values("default", shutdown=shutdown))


def test_topology_spread_by_default() -> None:
    out = support.rendered(ci("ha-hpa"))
    constraints = out.pod_spec["topologySpreadConstraints"]
    selector = out.deployment["spec"]["selector"]["matchLabels"]
    keys = {c["topologyKey"] for c in constraints}
    assert "kubernetes.io/hostname" in keys
    for constraint in constraints:
        assert constraint["labelSelector"]["matchLabels"] == selector
        assert constraint["matchLabelKeys"] == ["pod-template-hash"]
    custom = support.rendered(with_values("ha-hpa", topologySpreadConstraints=[
        {"maxSkew": 2, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"},
    ]))
    [only] = custom.pod_spec["topologySpreadConstraints"]
    assert only["maxSkew"] == 2 and only["labelSelector"]["matchLabels"] == selector


# ---- replicas, PDB, HPA ------------------------------------------------------


def test_no_pdb_at_one_replica() -> None:
    out = support.rendered(ci("default"))
    assert out.deployment["spec"]["replicas"] == 1
    assert out.kinds("PodDisruptionBudget") == []


def test_no_pdb_when_the_hpa_may_go_down_to_one() -> None:
    out = support.rendered(with_values("ha-hpa", autoscaling={"minReplicas": 1}))
    assert out.kinds("HorizontalPodAutoscaler")
    assert out.kinds("PodDisruptionBudget") == []


def test_pdb_with_several_replicas() -> None:
    out = support.rendered(ci("ingress"))
    assert out.deployment["spec"]["replicas"] == 2
    pdb = out.one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == out.deployment["spec"]["selector"]["matchLabels"]


def test_pdb_with_hpa_minimum_above_one() -> None:
    out = support.rendered(ci("ha-hpa"))
    assert "replicas" not in out.deployment["spec"], "the HPA owns the replica count"
    assert out.one("HorizontalPodAutoscaler")["spec"]["minReplicas"] == 3
    assert out.one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_hpa_scales_on_cpu_and_connections_and_scales_in_slowly() -> None:
    hpa = support.rendered(ci("ha-hpa")).one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "herald"}
    by_type = {m["type"]: m for m in hpa["metrics"]}
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    pods = by_type["Pods"]["pods"]
    assert pods["metric"]["name"] == "herald_connections_open"
    assert pods["target"] == {"type": "AverageValue", "averageValue": "15000"}
    down = hpa["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"])
    without_pods_metric = support.rendered(with_values("ha-hpa", autoscaling={"targetConnectionsPerPod": 0}))
    metrics = without_pods_metric.one("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Resource"]


def test_memory_broker_refuses_several_pods() -> None:
    assert "memory" in render_error(with_values("default", replicaCount=2))
    assert "memory" in render_error(with_values("default", autoscaling={"enabled": True}))


# ---- secrets ---------------------------------------------------------------------

SENTINELS = {
    "hmacSecret": "SENTINEL-hmac-7f3a9c2e-0000-4000-8000-aaaaaaaaaaaa",
    "apiKey": "SENTINEL-apikey-5b1d-4000-8000-bbbbbbbbbbbb",
    "brokerUrl": "redis://:SENTINEL-redispw-9e8d@redis.example:6379/0",
    "brokerClusterUrls": "redis://:SENTINEL-clusterpw-4c4c@redis-cluster.example:6379",
    "brokerPassword": "SENTINEL-brokerpw-1a2b3c",
    "sentinelPassword": "SENTINEL-sentinelpw-4d5e6f",
    "jwtPublicKey": "-----BEGIN PUBLIC KEY-----\nSENTINELpublickeyMIIBIjANBgkqhki\n-----END PUBLIC KEY-----\n",
}


def secret_fragments(value: str) -> list[str]:
    """A secret's recognisable forms: the distinctive part, and the base64 of
    the whole value."""
    distinctive = re.search(r"SENTINEL[-A-Za-z0-9]*", value).group(0)
    return [distinctive, base64.b64encode(value.encode()).decode()]


@pytest.mark.parametrize("kind", ["redis", "redis-cluster", "redis-sentinel"])
def test_no_secret_material_with_existing_secret(kind: str) -> None:
    broker: dict[str, Any] = {"kind": kind}
    if kind == "redis-sentinel":
        broker.update(sentinels=["sentinel.example:26379"], master_name="mymaster")
    values = with_values(
        "existing-secret",
        secrets={"existingSecret": "herald-secrets", **SENTINELS},
        config={"auth": {"algorithms": ["HS256", "RS256"]}, "broker": broker},
    )
    out = support.rendered(values)
    assert out.kinds("Secret") == [], "the chart must not create a Secret next to an existing one"
    for name, value in SENTINELS.items():
        for fragment in secret_fragments(value):
            assert fragment not in out.text, f"secrets.{name} leaked into the output"
    refs = [
        e["valueFrom"]["secretKeyRef"] for e in out.container["env"]
        if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
    ]
    assert refs and all(ref["name"] == "herald-secrets" for ref in refs)
    annotations = out.deployment["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/secret" not in annotations


def test_chart_secret_holds_the_values_and_nothing_else_shows_them() -> None:
    values = with_values("ha-hpa", secrets={k: SENTINELS[k] for k in ("hmacSecret", "apiKey", "brokerUrl")})
    out = support.rendered(values)
    secret = out.one("Secret")
    data = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    assert data == {
        "hmac-secret": SENTINELS["hmacSecret"],
        "api-key": SENTINELS["apiKey"],
        "broker-url": SENTINELS["brokerUrl"],
    }
    secret_file = out.files["herald/templates/secret.yaml"]
    for path, text in out.files.items():
        if path == "herald/templates/secret.yaml":
            continue
        for value in data.values():
            for fragment in secret_fragments(value):
                assert fragment not in text, f"secret material in {path}"
    # Not even in comments of the Secret itself: only in the data values.
    for value in data.values():
        for fragment in secret_fragments(value)[:1]:
            assert fragment not in secret_file


def test_no_generated_secrets() -> None:
    """Rendering twice gives the same output: nothing random, ever."""
    assert support.render(ci("ha-hpa")) == support.render(ci("ha-hpa"))
    templates = "\n".join(p.read_text() for p in (CHART / "templates").rglob("*") if p.is_file())
    assert not re.search(r"\b(rand\w*|uuidv4|genPrivateKey|genCA|genSelfSignedCert\w*|derivePassword)\b", templates)


@pytest.mark.parametrize(
    "values, expected",
    [
        ({}, "secrets.hmacSecret"),
        ({"config": {"auth": {"algorithms": ["ES256"]}}}, "secrets.jwtPublicKey"),
        ({"config": {"broker": {"kind": "redis"}}}, "secrets.brokerUrl"),
        ({"secrets": {"hmacSecret": "x" * 32}, "config": {"broker": {"kind": "redis-cluster"}}}, "secrets.brokerClusterUrls"),
        ({"secrets": {"hmacSecret": "x" * 32}, "config": {"broker": {"kind": "redis-sentinel"}}}, "config.broker.sentinels"),
    ],
    ids=["no-hmac-secret", "no-public-key", "no-redis-url", "no-cluster-urls", "no-sentinels"],
)
def test_missing_secrets_fail_to_render(values: dict[str, Any], expected: str) -> None:
    if values.get("config", {}).get("broker", {}).get("kind") == "redis":
        values = support.deep_merge(values, {"secrets": {"hmacSecret": "x" * 32}})
    assert expected in render_error(values)


def test_public_key_is_mounted_and_configured() -> None:
    out = support.rendered(ci("existing-secret"))
    assert out.herald_toml["auth"]["public_key_file"] == "/etc/herald/jwt/public-key.pem"
    volume = out.pod_spec["volumes"][0]["projected"]
    secret_sources = [s["secret"] for s in volume["sources"] if "secret" in s]
    assert {"name": "herald-secrets", "items": [{"key": "jwt-public-key.pem", "path": "jwt/public-key.pem"}]} in secret_sources
    names = [e["name"] for e in out.container["env"]]
    assert "HERALD_AUTH__HMAC_SECRET" not in names, "RS256 only: no HMAC secret wanted"
    assert "HERALD_BROKER__CLUSTER_URLS" in names


def test_jwks_replaces_the_public_key_and_mounts_its_ca() -> None:
    values = {
        "secrets": {"existingSecret": "herald-secrets"},
        "config": {"auth": {"algorithms": ["RS256", "ES256"], "jwks_url": "https://idp.example/jwks.json"}},
        "jwksCa": {"configMap": "idp-ca"},
    }
    out = support.rendered(values)
    auth = out.herald_toml["auth"]
    assert auth["jwks_url"] == "https://idp.example/jwks.json"
    assert auth["jwks_ca_file"] == "/etc/herald/jwks/ca.pem"
    assert auth["jwks_refresh_interval"] == "5m"
    assert "public_key_file" not in auth
    sources = out.pod_spec["volumes"][0]["projected"]["sources"]
    assert {"name": "idp-ca", "items": [{"key": "ca.crt", "path": "jwks/ca.pem"}]} in [s["configMap"] for s in sources if "configMap" in s]
    assert not any("jwt/public-key.pem" in str(s) for s in sources)
    # Without a JWKS no jwks key is rendered, and a CA alone is a mistake.
    plain = support.rendered(ci("existing-secret")).herald_toml["auth"]
    assert not [key for key in plain if key.startswith("jwks")]
    assert "jwksCa.configMap" in render_error({"jwksCa": {"configMap": "idp-ca"}, "secrets": {"hmacSecret": "x" * 32}})


@pytest.mark.parametrize("values", ALL_CI, ids=CI_IDS)
def test_env_vars_name_real_configuration_keys(values: dict[str, Any]) -> None:
    known = set(support.documented_keys()) | support.PENDING_KEYS
    for env in support.rendered(values).container.get("env", []):
        if env["name"].startswith("HERALD_"):
            assert support.env_var_key(env["name"]) in known, env["name"]


# ---- checksum ----------------------------------------------------------------------


def checksums(values: dict[str, Any]) -> dict[str, str]:
    annotations = support.rendered(values).deployment["spec"]["template"]["metadata"]["annotations"]
    return {k: v for k, v in annotations.items() if k.startswith("checksum/")}


def test_config_checksum_follows_the_config() -> None:
    base = checksums(ci("default"))
    assert re.fullmatch(r"[0-9a-f]{64}", base["checksum/config"])
    assert checksums(ci("default")) == base
    changed = checksums(with_values("default", config={"ping": {"interval": "20s"}}))
    assert changed["checksum/config"] != base["checksum/config"]
    drained = checksums(with_values("default", shutdown={"drainPeriodSeconds": 25}))
    assert drained["checksum/config"] != base["checksum/config"]
    unrelated = checksums(with_values("default", podAnnotations={"team": "push"}))
    assert unrelated["checksum/config"] == base["checksum/config"]


def test_secret_checksum_follows_the_chart_secret() -> None:
    base = checksums(ci("default"))["checksum/secret"]
    rotated = checksums(with_values("default", secrets={"hmacSecret": "y" * 40}))["checksum/secret"]
    assert rotated != base


# ---- the values schema ---------------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        {"replicaCont": 2},
        {"image": {"tagg": "1.0"}},
        {"autoscaling": {"enabled": True, "minReplica": 2}},
        {"secrets": {"existingSecrett": "herald"}},
        {"config": {"ping": {"intervall": "5s"}}},
        {"config": {"brokr": {"kind": "redis"}}},
        {"config": {"broker": {"url": "redis://:pw@redis:6379"}}},
        {"config": {"shutdown": {"timeout": "30s"}}},
        {"config": {"channels": [{"pattern": "a.*", "polcy": "conflate"}]}},
        {"ingress": {"enabled": True, "hosts": [{"host": "x", "paths": [{"path": "/", "pathType": "Prefix", "servicePort": 80}]}]}},
    ],
    ids=lambda o: json.dumps(o, separators=(",", ":"))[:60],
)
def test_misspelled_or_chart_managed_keys_are_rejected(override: dict[str, Any]) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        support.render(support.deep_merge(ci("default"), override))


@pytest.mark.parametrize(
    "override",
    [
        {"secrets": {"hmacSecret": "too-short"}},
        {"secrets": {"apiKey": "short"}},
        {"secrets": {"brokerUrl": "http://redis:6379"}},
        {"config": {"ping": {"interval": "25"}}},
        {"config": {"broker": {"kind": "redis-sentinal"}}},
        {"config": {"auth": {"algorithms": ["none"]}}},
        {"config": {"limits": {"max_connections": 0}}},
        {"config": {"limits": {"queue_bytes": "1MiB"}}},
        {"config": {"log": {"format": "yaml"}}},
        {"shutdown": {"preStopSleepSeconds": 0}},
        {"replicaCount": "3"},
    ],
    ids=lambda o: json.dumps(o, separators=(",", ":"))[:60],
)
def test_invalid_values_are_rejected(override: dict[str, Any]) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        support.render(support.deep_merge(ci("default"), override))


def test_schema_is_closed_at_the_root_and_below() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    values = support.load_yaml(CHART / "values.yaml")
    assert set(values) <= set(schema["properties"])
    for key in ("image", "serviceAccount", "service", "ingress", "autoscaling", "secrets", "config", "shutdown"):
        assert schema["properties"][key]["additionalProperties"] is False, key
    for section in schema["properties"]["config"]["properties"].values():
        if section.get("type") == "object":
            assert section["additionalProperties"] is False


def test_helm_create_conventions() -> None:
    values = support.load_yaml(CHART / "values.yaml")
    for key in ("replicaCount", "image", "imagePullSecrets", "resources", "nodeSelector", "tolerations",
                "affinity", "podAnnotations", "serviceAccount", "service", "ingress", "autoscaling"):
        assert key in values, key
    assert {"repository", "tag", "pullPolicy"} <= set(values["image"])


# ---- herald's configuration keys ---------------------------------------------------------


def schema_config_keys() -> set[str]:
    schema = json.loads((CHART / "values.schema.json").read_text())
    keys = set()
    for section, spec in schema["properties"]["config"]["properties"].items():
        if section == "channels":
            continue
        for key, value in spec["properties"].items():
            # One level of nested tables, such as server.tls.
            nested = value.get("properties") if value.get("type") == "object" else None
            if nested:
                keys |= {f"{section}.{key}.{inner}" for inner in nested}
            else:
                keys.add(f"{section}.{key}")
    return keys


# Keys the chart sets itself instead of taking them from `config`.
CHART_MANAGED = {
    "node.id", "server.listen", "server.tls.cert_file", "server.tls.key_file", "server.tls.client_ca_file",
    "auth.hmac_secret", "auth.public_key_file", "auth.jwks_ca_file", "api.key", "broker.url", "broker.cluster_urls",
    "broker.password", "broker.sentinel_password", "shutdown.timeout", "shutdown.drain_period",
}


def test_every_documented_key_is_reachable_through_the_chart() -> None:
    documented = set(support.documented_keys())
    assert len(documented) > 40, "docs/configuration.md key tables not found"
    missing = documented - schema_config_keys() - CHART_MANAGED
    assert not missing, f"documented keys the chart cannot set: {sorted(missing)}"


def test_chart_only_uses_documented_keys() -> None:
    documented = set(support.documented_keys())
    unknown = (schema_config_keys() | CHART_MANAGED) - documented - support.PENDING_KEYS
    assert not unknown, f"keys neither documented nor pending: {sorted(unknown)}"


@pytest.mark.parametrize("values", ALL_CI, ids=CI_IDS)
def test_rendered_toml_uses_only_known_keys(values: dict[str, Any]) -> None:
    toml = support.rendered(values).herald_toml
    known = set(support.documented_keys()) | support.PENDING_KEYS
    channels = toml.pop("channels", [])
    flat = support.flatten(toml)
    assert set(flat) <= known, sorted(set(flat) - known)
    for rule in channels:
        assert set(rule) <= {"pattern", "policy", "max_rate_hz"}


def normalise_default(text: str) -> Any:
    text = text.strip().strip("`")
    if text in ("unset", "") or " " in text and not text.startswith("["):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def test_values_defaults_match_documented_defaults() -> None:
    """values.yaml spells out herald's defaults; they must be herald's."""
    documented = support.documented_keys()
    config = support.load_yaml(CHART / "values.yaml")["config"]
    chart_choices = {"log.format": "json"}  # JSON logs for collectors
    for key, value in support.flatten({k: v for k, v in config.items() if k != "channels"}).items():
        if key not in documented:
            assert key in support.PENDING_KEYS, key
            continue
        expected = normalise_default(documented[key]["default"])
        if key in chart_choices:
            assert value == chart_choices[key]
        elif expected is None:
            assert value in ("", [], None), f"{key}: unset in herald, {value!r} in values.yaml"
        else:
            assert value == expected, f"{key}: {expected!r} in docs/configuration.md, {value!r} in values.yaml"


# ---- TLS ------------------------------------------------------------------------------------


def test_tls_secret_is_a_directory_mount() -> None:
    out = support.rendered(ci("tls"))
    for spec in pod_specs(out):
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert "subPath" not in mount and "subPathExpr" not in mount
    sources = out.pod_spec["volumes"][0]["projected"]["sources"]
    tls = next(s["secret"] for s in sources if s.get("secret", {}).get("name") == "herald-tls")
    assert {item["path"] for item in tls["items"]} == {"tls/tls.crt", "tls/tls.key", "tls/ca.crt"}
    assert out.herald_toml["server"]["tls"] == {
        "cert_file": "/etc/herald/tls/tls.crt",
        "key_file": "/etc/herald/tls/tls.key",
        "client_ca_file": "/etc/herald/tls/ca.crt",
        "handshake_timeout": "10s",
        "max_handshakes": 1024,
        "reload_interval": "10s",
    }
    assert out.one("ServiceMonitor")["spec"]["endpoints"][0]["scheme"] == "https"
    assert "tls" not in support.rendered(ci("default")).herald_toml["server"]
    assert "needs tls.secretName" in render_error(with_values("default", tls={"enabled": True}))


# ---- Service, Ingress, HTTPRoute, NetworkPolicy ---------------------------------------------------


def test_service_targets_the_herald_port() -> None:
    out = support.rendered(ci("default"))
    service = out.one("Service")["spec"]
    assert service["selector"] == out.deployment["spec"]["selector"]["matchLabels"]
    assert service["ports"][0]["targetPort"] == out.container["ports"][0]["name"]


def test_ingress_has_websocket_timeouts() -> None:
    out = support.rendered(ci("ingress"))
    ingress = out.one("Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600"
    assert annotations["cert-manager.io/cluster-issuer"] == "letsencrypt"
    assert "nginx.ingress.kubernetes.io/backend-protocol" not in annotations
    assert ingress["spec"]["ingressClassName"] == "nginx"
    [rule] = ingress["spec"]["rules"]
    [path] = rule["http"]["paths"]
    assert path["path"] == "/ws"
    assert path["backend"]["service"] == {"name": "herald", "port": {"name": "http"}}
    assert ingress["spec"]["tls"] == [{"hosts": ["push.example.com"], "secretName": "push-example-com-tls"}]


def test_ingress_annotations_can_be_overridden_and_follow_tls() -> None:
    values = with_values("ingress", ingress={"annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "7200"}})
    annotations = support.rendered(values).one("Ingress")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "7200"
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600"
    tls = support.deep_merge(ci("ingress"), {"tls": {"enabled": True, "secretName": "herald-tls"}})
    annotations = support.rendered(tls).one("Ingress")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"
    plain = support.rendered(with_values("ingress", ingress={"nginxWebSocketTimeoutSeconds": 0}))
    assert "nginx.ingress.kubernetes.io/proxy-read-timeout" not in plain.one("Ingress")["metadata"]["annotations"]


def test_no_ingress_or_route_by_default() -> None:
    out = support.rendered(ci("default"))
    assert out.kinds("Ingress") == [] and out.kinds("HTTPRoute") == []


def test_httproute() -> None:
    route = support.rendered(ci("ingress")).one("HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    spec = route["spec"]
    assert spec["parentRefs"] == [{"name": "public-gateway", "namespace": "gateway-system", "sectionName": "https"}]
    assert spec["hostnames"] == ["push.example.com"]
    [rule] = spec["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/ws"}}]
    assert rule["backendRefs"] == [{"name": "herald", "port": 8080}]
    assert "parentRefs" in render_error(with_values("default", httpRoute={"enabled": True}))


def egress_ports(policy: dict[str, Any]) -> list[set[tuple[int, str]]]:
    return [{(p["port"], p["protocol"]) for p in rule.get("ports", [])} for rule in policy["spec"]["egress"]]


def test_network_policy_for_redis() -> None:
    out = support.rendered(ci("ha-hpa"))
    policy = out.one("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == out.deployment["spec"]["selector"]["matchLabels"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    [ingress] = policy["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    peers = ingress["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}} in peers
    test_pod = out.one("Pod")["metadata"]["labels"]
    assert any(
        p.get("podSelector", {}).get("matchLabels", {}).items() <= test_pod.items() and "podSelector" in p
        for p in peers
    ), "the helm test pod must be let in"
    ports = egress_ports(out.one("NetworkPolicy"))
    assert {(53, "UDP"), (53, "TCP")} in ports
    assert {(6379, "TCP")} in ports
    redis_rule = policy["egress"][1]
    assert redis_rule["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "redis"}}}]


def test_network_policy_follows_the_broker() -> None:
    memory = support.rendered(ci("default")).one("NetworkPolicy")
    assert egress_ports(memory) == [{(53, "UDP"), (53, "TCP")}], "no Redis egress with the memory broker"
    assert "from" not in memory["spec"]["ingress"][0], "no peers given: open to every source"
    sentinel = support.rendered(ci("tls")).one("NetworkPolicy")
    assert {(6379, "TCP"), (26379, "TCP")} in egress_ports(sentinel)
    assert sentinel["spec"]["ingress"][0]["ports"] == [{"port": "https", "protocol": "TCP"}]
    custom = support.rendered(ci("ingress")).one("NetworkPolicy")
    assert {(6380, "TCP")} in egress_ports(custom)
    assert support.rendered(with_values("default", networkPolicy={"enabled": False})).kinds("NetworkPolicy") == []


def test_test_pod_checks_readyz_through_the_service() -> None:
    out = support.rendered(ci("default"))
    pod = out.one("Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    [container] = pod["spec"]["containers"]
    assert container["args"] == ["healthcheck", "--url", "http://herald.push.svc:8080/readyz"]
    selector = out.deployment["spec"]["selector"]["matchLabels"]
    assert not selector.items() <= pod["metadata"]["labels"].items(), \
        "the Deployment's selector (and the Service) must not match the test pod"
    tls = support.rendered(ci("tls")).one("Pod")["spec"]["containers"][0]
    assert tls["args"][2].startswith("https://")
    # Like the kubelet's HTTPS probes, the test checks readiness, not identity.
    assert tls["args"][3:] == ["--insecure"]


# ---- monitoring objects ------------------------------------------------------------------


def test_service_monitor() -> None:
    out = support.rendered(ci("ha-hpa"))
    monitor = out.one("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == out.one("Service")["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == out.one("Service")["spec"]["selector"]
    assert support.rendered(ci("default")).kinds("ServiceMonitor") == []


def normalise_expr(expr: str) -> str:
    expr = re.sub(r'(job|namespace)="[^"]*",?', "", expr)
    expr = expr.replace("{}", "").replace(",}", "}")
    return " ".join(expr.split())


def test_prometheus_rule_matches_the_deploy_alerts() -> None:
    out = support.rendered(support.deep_merge(ci("ha-hpa"), {"config": {"limits": {"max_connections": 20000}}}))
    rule = out.one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    chart_rules = {r["alert"]: r for r in support.alert_rules(rule["spec"])}
    deploy_rules = {r["alert"]: r for r in support.deploy_alert_rules()}
    assert chart_rules.keys() == deploy_rules.keys()
    for name, deploy in deploy_rules.items():
        chart_rule = chart_rules[name]
        assert normalise_expr(chart_rule["expr"]) == normalise_expr(deploy["expr"]), name
        assert chart_rule["for"] == deploy["for"], name
        assert chart_rule["labels"] == deploy["labels"], name
        assert chart_rule["annotations"]["summary"] == deploy["annotations"]["summary"], name
        selector = 'job="herald",namespace="push"'
        for metric in support.metric_names(chart_rule["expr"]):
            assert re.search(rf"{metric}\{{{re.escape(selector)}", chart_rule["expr"]), (name, metric)


def test_prometheus_rule_thresholds_come_from_values() -> None:
    values = with_values("ha-hpa", metrics={"prometheusRule": {"enabled": True, "connectionsNearMaxRatio": 0.8, "dropRatio": 0.05}})
    rules = {r["alert"]: r for r in support.alert_rules(support.rendered(values).one("PrometheusRule")["spec"])}
    assert rules["HeraldConnectionsNearMax"]["expr"].endswith("> 0.8 * 15000")
    assert rules["HeraldSustainedDrops"]["expr"].rstrip().endswith("> 0.05")
    assert "5%" in rules["HeraldSustainedDrops"]["annotations"]["summary"]


# ---- NOTES ------------------------------------------------------------------------------


@pytest.mark.parametrize("values", ALL_CI, ids=CI_IDS)
def test_notes_say_where_secrets_are_without_showing_them(values: dict[str, Any]) -> None:
    out = support.rendered(values)
    notes = out.notes
    assert "helm test" in notes
    assert f'Secret "{values["secrets"].get("existingSecret") or "herald"}"' in notes
    for name, secret in values["secrets"].items():
        if name not in ("existingSecret", "keys") and secret:
            for fragment in (secret, base64.b64encode(secret.encode()).decode()):
                assert fragment not in notes, f"secrets.{name} in NOTES.txt"
