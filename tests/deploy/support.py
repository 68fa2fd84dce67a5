"""Shared helpers for the deployment tests: paths, chart rendering, the
documented configuration keys, PromQL metric extraction, and a herald node
started on a free loopback port."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import socket
import subprocess
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import helm_python
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "herald"
DEPLOY = REPO / "deploy"
DOCS_CONFIGURATION = REPO / "docs" / "configuration.md"

CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
CI_IDS = [path.stem.removesuffix("-values") for path in CI_VALUES]

RELEASE = "herald"
NAMESPACE = "push"

# Kinds whose schemas are CRDs, unknown to kubernetes-validate (it only warns).
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "HTTPRoute"}

# Configuration keys the chart renders that herald gains with issue 12 and
# that docs/configuration.md does not list yet. Once documented, they are
# checked like every other key; drop them from here then.
PENDING_KEYS: set[str] = set()


def load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def ci_values(name: str) -> dict[str, Any]:
    return load_yaml(CHART / "ci" / f"{name}-values.yaml")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A copy of base with override merged in, like helm's -f layering."""
    merged = json.loads(json.dumps(base))
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


_chart: helm_python.Chart | None = None


def chart() -> helm_python.Chart:
    global _chart
    if _chart is None:
        _chart = helm_python.Chart.load(str(CHART))
    return _chart


def render(values: dict[str, Any] | None) -> dict[str, str]:
    """Renders the chart as `helm install` would: {template path: text}."""
    return chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


@dataclass
class Rendered:
    files: dict[str, str]

    @property
    def documents(self) -> list[dict[str, Any]]:
        docs = []
        for path, text in sorted(self.files.items()):
            if path.endswith(".yaml") or path.endswith(".yml"):
                docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
        return docs

    @property
    def notes(self) -> str:
        return next((t for p, t in self.files.items() if p.endswith("NOTES.txt")), "")

    @property
    def text(self) -> str:
        return "\n".join(self.files.values())

    def manifests_yaml(self) -> str:
        """Every manifest as one multi-document YAML stream (no NOTES)."""
        return "\n---\n".join(
            text for path, text in sorted(self.files.items())
            if not path.endswith("NOTES.txt") and text.strip()
        )

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.documents if doc.get("kind") == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.kinds(kind)
        assert len(found) == 1, f"expected one {kind}, found {len(found)}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def pod_spec(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def container(self) -> dict[str, Any]:
        containers = self.pod_spec["containers"]
        return next(c for c in containers if c["name"] == "herald")

    @property
    def herald_toml(self) -> dict[str, Any]:
        return tomllib.loads(self.herald_toml_text)

    @property
    def herald_toml_text(self) -> str:
        return self.one("ConfigMap")["data"]["herald.toml"]


def rendered(values: dict[str, Any] | None) -> Rendered:
    return Rendered(render(values))


def documented_keys() -> dict[str, dict[str, str]]:
    """The key tables of docs/configuration.md: {key: {type, default, env}}."""
    keys = {}
    row = re.compile(r"^\| `([a-z_]+\.[a-z_.]+)` \| ([^|]*) \| ([^|]*) \| ([^|]*) \|")
    for line in DOCS_CONFIGURATION.read_text(encoding="utf-8").splitlines():
        match = row.match(line)
        if match:
            key, kind, default, env = (group.strip() for group in match.groups())
            # Only the key tables: other tables (limits) also start with a key.
            if env.startswith("`HERALD_"):
                keys[key] = {"type": kind, "default": default, "env": env}
    return keys


def env_var_key(name: str) -> str:
    """HERALD_BROKER__CLUSTER_URLS -> broker.cluster_urls."""
    assert name.startswith("HERALD_"), name
    return name.removeprefix("HERALD_").lower().replace("__", ".")


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"server": {"tls": {"cert_file": x}}} -> {"server.tls.cert_file": x}.
    Arrays of tables (channels) are kept whole."""
    flat = {}
    for key, value in table.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


# ---- PromQL ---------------------------------------------------------------

# Series Prometheus makes itself rather than scraping them from herald.
PROMETHEUS_BUILTINS = {"up"}
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_PROMQL_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: every herald_* identifier, plus
    Prometheus' own series. Label values (quoted strings) are ignored."""
    unquoted = _PROMQL_STRING.sub('""', expr)
    names = set(re.findall(r"\bherald_[a-zA-Z0-9_]+", unquoted))
    names |= {name for name in PROMETHEUS_BUILTINS if re.search(rf"\b{name}\s*\{{", unquoted)}
    return names


def label_matchers(expr: str) -> set[tuple[str, str, str]]:
    """(label, operator, value) for each matcher inside {...} selectors."""
    found = set()
    for selector in re.findall(r"\{([^{}]*)\}", expr):
        for label, op, value in re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', selector):
            found.add((label, op, value))
    return found


def family(name: str, known: set[str]) -> str:
    """The metric family of a series name: histogram parts map to their base."""
    for suffix in _HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in known:
            return name.removesuffix(suffix)
    return name


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "herald.json").read_text(encoding="utf-8"))
    exprs = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and query:
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", query))
    return exprs


def alert_rules(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def deploy_alert_rules() -> list[dict[str, Any]]:
    return alert_rules(load_yaml(DEPLOY / "prometheus" / "alerts.yaml"))


# ---- metrics text format ---------------------------------------------------


def parse_metrics(text: str) -> tuple[set[str], set[str]]:
    """(families named by # HELP/# TYPE lines, names of samples)."""
    families, samples = set(), set()
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            families.add(line.split()[2])
        elif line and not line.startswith("#"):
            samples.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return families, samples


# ---- a live herald node ------------------------------------------------------


def herald_bin() -> Path:
    path = Path(os.environ.get("HERALD_BIN", "target/debug/herald"))
    if not path.is_absolute():
        path = REPO / path
    return path


def require_herald_bin() -> Path:
    path = herald_bin()
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise AssertionError(
            f"herald binary not found at {path}. Build it first (cargo build), or point "
            "HERALD_BIN at one. The live checks compare the dashboard, the alerts and the "
            "chart's configuration against a real node, so they fail rather than skip."
        )
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class HeraldNode:
    """`herald dev` on 127.0.0.1:<free port>, stopped with SIGTERM."""

    HMAC_SECRET = "deploy-tests-hmac-secret-0123456789abcdef"
    API_KEY = "deploy-tests-api-key-0123"

    def __init__(self, config_toml: str = "") -> None:
        self.binary = require_herald_bin()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.dir = tempfile.TemporaryDirectory(prefix="herald-deploy-tests-")
        self.config = Path(self.dir.name) / "herald.toml"
        self.config.write_text(config_toml, encoding="utf-8")
        self.log = open(Path(self.dir.name) / "herald.log", "w+b")
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> HeraldNode:
        env = {key: value for key, value in os.environ.items() if not key.startswith("HERALD_")}
        env.update({
            "HERALD_SERVER__LISTEN": f"127.0.0.1:{self.port}",
            "HERALD_AUTH__HMAC_SECRET": self.HMAC_SECRET,
            "HERALD_API__KEY": self.API_KEY,
        })
        self.process = subprocess.Popen(
            [str(self.binary), "dev", "--config", str(self.config)],
            env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"herald exited with {self.process.returncode}:\n{self.output()}")
            try:
                if http("GET", f"{self.base}/healthz", timeout=1)[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"herald did not answer /healthz within 30 s:\n{self.output()}")
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        self.dir.cleanup()

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def metrics(self) -> str:
        status, body = http("GET", f"{self.base}/metrics")
        assert status == 200, status
        return body.decode()

    def token(self, sub: str, channels: list[str], ttl: int = 600) -> str:
        return hs256_token(self.HMAC_SECRET, {"sub": sub, "channels": channels, "exp": int(time.time()) + ttl})

    def publish(self, channel: str, data: Any) -> int:
        body = json.dumps({"channel": channel, "data": data}).encode()
        status, _ = http("POST", f"{self.base}/api/publish", body,
                         {"Authorization": f"Bearer {self.API_KEY}", "Content-Type": "application/json"})
        return status


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_token(secret: str, claims: dict[str, Any]) -> str:
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64url(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


class WebSocket:
    """A minimal RFC 6455 client over a plain socket: enough to open a
    session, exchange text frames and close."""

    def __init__(self, port: int, path: str, headers: dict[str, str] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1]) if head else 0

    def send_text(self, text: str) -> None:
        self._send(0x1, text.encode())

    def close(self) -> None:
        try:
            self._send(0x8, (1000).to_bytes(2, "big"))
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                opcode, _ = self.recv_frame()
                if opcode in (0x8, None):
                    break
        finally:
            self.sock.close()

    def recv_frame(self) -> tuple[int | None, bytes]:
        header = self._read(2)
        if header is None:
            return None, b""
        opcode, length = header[0] & 0x0F, header[1] & 0x7F
        if length == 126:
            length = int.from_bytes(self._read(2) or b"", "big")
        elif length == 127:
            length = int.from_bytes(self._read(8) or b"", "big")
        return opcode, self._read(length) or b""

    def recv_json(self) -> dict[str, Any]:
        while True:
            opcode, payload = self.recv_frame()
            if opcode is None:
                raise AssertionError("connection closed while waiting for a frame")
            if opcode == 0x1:
                return json.loads(payload)

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        else:
            header += bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _read(self, n: int) -> bytes | None:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data


def raw_request(port: int, data: bytes) -> bytes:
    """Sends bytes on a fresh connection and returns what comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
        return b"".join(chunks)


def iter_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from iter_strings(item)
