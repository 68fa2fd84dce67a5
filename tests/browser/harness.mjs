// The browser tests' harness: real herald processes (the built binary) on
// free ports, real redis-server processes, self-signed certificates from
// openssl, and Chromium from Debian driven by playwright-core.

import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import http from "node:http";
import https from "node:https";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
export const HERALD_BIN = process.env.HERALD_BIN
  ? path.resolve(process.env.HERALD_BIN)
  : path.join(ROOT, "target/debug/herald");
export const CHROMIUM = process.env.HERALD_CHROMIUM || "/usr/bin/chromium";

export const SECRET = "browser-test-secret-0123456789abcdef0123";
export const API_KEY = "browser-test-api-key-0123";

/** How long to wait for something that should happen promptly. */
export const PATIENCE = 10_000;

/** Chromium as TESTING.md says: headless, no sandbox (root), self-signed certificates accepted. */
export function launchBrowser() {
  return chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors", "--disable-background-networking"],
  });
}

/** A port that was free a moment ago: bound on 127.0.0.1:0, then released. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

export function tempDir(prefix) {
  return mkdtempSync(path.join(os.tmpdir(), `herald-browser-${prefix}-`));
}

export function removeDir(dir) {
  rmSync(dir, { recursive: true, force: true });
}

/** Resolves when `check()` returns a truthy value (which it resolves to); rejects after `timeout` ms. */
export async function eventually(check, { timeout = PATIENCE, interval = 50, message = "condition" } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeout} ms waiting for ${message}${last ? `: ${last.message}` : ""}`);
    }
    await sleep(interval);
  }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** The environment for a child process: ours without any HERALD_* variable, plus `extra`. */
function cleanEnv(extra) {
  const env = {};
  for (const [key, value] of Object.entries(process.env)) if (!key.startsWith("HERALD_")) env[key] = value;
  return { ...env, ...extra };
}

/** Every process this test file started, killed on exit whatever happens. */
const children = new Set();
process.on("exit", () => {
  for (const child of children) child.kill("SIGKILL");
});

/** A child process whose output is kept, for waiting on it and for failure messages. */
class Child {
  constructor(command, args, env) {
    this.output = "";
    this.process = spawn(command, args, { env: cleanEnv(env), stdio: ["ignore", "pipe", "pipe"] });
    children.add(this.process);
    this.exited = new Promise((resolve) => {
      this.process.on("exit", (code, signal) => {
        children.delete(this.process);
        resolve({ code, signal });
      });
    });
    for (const stream of [this.process.stdout, this.process.stderr]) {
      stream.setEncoding("utf8");
      stream.on("data", (text) => (this.output += text));
    }
  }

  get running() {
    return this.process.exitCode === null && this.process.signalCode === null;
  }

  /** Sends `signal` and waits for the exit. */
  async stop(signal = "SIGTERM") {
    if (this.running) this.process.kill(signal);
    return this.exited;
  }
}

/**
 * A herald node. `serve` runs `herald serve` on a port of its own with the
 * test secrets; `dev` runs `herald dev` on port 0 and reads where it listens
 * from its banner, as a person would.
 */
export class HeraldNode extends Child {
  /**
   * `herald serve ARGS` on 127.0.0.1:`port` (a free one by default); `env`
   * adds or overrides settings, `args` (e.g. `--config FILE`) go after `serve`.
   */
  static async serve({ port, env = {}, ca, args = [] } = {}) {
    port ??= await freePort();
    const tls = Boolean(env.HERALD_SERVER__TLS__CERT_FILE);
    const node = new HeraldNode(HERALD_BIN, ["serve", ...args], {
      HERALD_SERVER__LISTEN: `127.0.0.1:${port}`,
      HERALD_AUTH__HMAC_SECRET: SECRET,
      HERALD_API__KEY: API_KEY,
      HERALD_NODE__ID: `browser-${port}`,
      HERALD_SHUTDOWN__DRAIN_PERIOD: "0s",
      HERALD_SHUTDOWN__TIMEOUT: "5s",
      HERALD_LIMITS__CONNECTION_RATE_PER_IP: "0",
      HERALD_SERVER__DEMO: "true",
      ...env,
    });
    node.port = port;
    node.base = `${tls ? "https" : "http"}://127.0.0.1:${port}`;
    node.apiKey = env.HERALD_API__KEY ?? API_KEY;
    node.ca = ca;
    await eventually(
      async () => {
        if (!node.running) throw new Error(`herald exited:\n${node.output}`);
        return (await node.get("/healthz")).status == 200;
      },
      { message: `herald serve on port ${port}` },
    );
    return node;
  }

  /** `herald dev ARGS` on 127.0.0.1:0, its URL and API key read from the banner. */
  static async dev(args = [], env = {}) {
    const node = new HeraldNode(HERALD_BIN, ["dev", ...args], { HERALD_SERVER__LISTEN: "127.0.0.1:0", ...env });
    const banner = await eventually(
      () => {
        if (!node.running) throw new Error(`herald dev exited:\n${node.output}`);
        return /herald dev node on (\S+)/.test(node.output) && /More tokens:.*\n/.test(node.output) && node.output;
      },
      { message: "the herald dev banner" },
    );
    node.banner = banner;
    node.base = banner.match(/herald dev node on (\S+)/)[1];
    node.port = Number(new URL(node.base).port);
    const key = banner.match(/export HERALD_API_KEY=(\S+)/);
    node.apiKey = key && key[1];
    return node;
  }

  /** A request to this node: `{status, headers, body}`. */
  request(pathAndQuery, options = {}) {
    return request(`${this.base}${pathAndQuery}`, { ca: this.ca, ...options });
  }

  get(pathAndQuery) {
    return this.request(pathAndQuery);
  }

  /** `POST /api/publish` of `data` on `channel`; fails the test unless the node accepts it. */
  async publish(channel, data) {
    const response = await this.request("/api/publish", {
      method: "POST",
      headers: { authorization: `Bearer ${this.apiKey}`, "content-type": "application/json" },
      body: JSON.stringify({ channel, data }),
    });
    if (response.status != 200) throw new Error(`publish answered ${response.status}: ${response.body}`);
  }

  /** The sum of a metric's series whose labels include `labels` (e.g. `reason="slow_consumer"`). */
  async metric(name, labels = "") {
    const { body } = await this.get("/metrics");
    let sum = 0;
    for (const line of body.split("\n")) {
      if (line.startsWith("#") || !line.startsWith(name)) continue;
      const [series, value] = [line.slice(0, line.lastIndexOf(" ")), line.slice(line.lastIndexOf(" ") + 1)];
      if (series.split("{")[0] == name && labels.split(",").every((label) => series.includes(label))) {
        sum += Number(value);
      }
    }
    return sum;
  }
}

/** An HTTP(S) request with Node's own client; `ca` is the PEM to trust for https. */
export function request(url, { method = "GET", headers = {}, body, ca } = {}) {
  const target = new URL(url);
  const client = target.protocol == "https:" ? https : http;
  return new Promise((resolve, reject) => {
    const req = client.request(target, { method, headers, ca, agent: false, timeout: PATIENCE }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (chunk) => (text += chunk));
      res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: text }));
    });
    req.on("timeout", () => req.destroy(new Error(`${method} ${url}: no answer`)));
    req.on("error", reject);
    req.end(body);
  });
}

/** A redis-server on a free port, without persistence; `stop()` ends it. */
export async function startRedis() {
  const port = await freePort();
  const dir = tempDir("redis");
  const redis = new Child("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir]);
  redis.port = port;
  redis.url = `redis://127.0.0.1:${port}`;
  await eventually(
    async () => {
      if (!redis.running) throw new Error(`redis-server exited:\n${redis.output}`);
      return (await redisCommand(port, ["PING"])) == "+PONG";
    },
    { message: `redis-server on port ${port}` },
  );
  redis.exited.then(() => removeDir(dir));
  return redis;
}

/** Sends one command in RESP and resolves with the first line of the answer. */
export function redisCommand(port, args) {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, "127.0.0.1");
    let answer = "";
    socket.setEncoding("utf8");
    socket.on("error", reject);
    socket.on("data", (text) => {
      answer += text;
      if (answer.includes("\r\n")) {
        socket.destroy();
        resolve(answer.split("\r\n")[0]);
      }
    });
    const parts = args.map((arg) => `$${Buffer.byteLength(arg)}\r\n${arg}\r\n`);
    socket.write(`*${args.length}\r\n${parts.join("")}`);
  });
}

/**
 * A self-signed certificate and key for 127.0.0.1 and localhost with
 * subject CN=`name`, written to `dir` as `NAME.crt` and `NAME.key`.
 */
export function selfSignedCertificate(dir, name) {
  const cert = path.join(dir, `${name}.crt`);
  const key = path.join(dir, `${name}.key`);
  execFileSync(
    "openssl",
    ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
     "-subj", `/CN=${name}`, "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", key, "-out", cert],
    { stdio: "ignore" },
  );
  return { cert, key };
}

// --- The demo page -------------------------------------------------------------

/**
 * Opens the demo page at `url` in a new page of `context` and waits until
 * its client is connected. Uncaught page errors fail the test: they are
 * collected in `page.errors`. Every WebSocket the page opens is recorded in
 * `page.sockets` with the test's clock: `{opened, closed, frames}`.
 */
export async function openDemo(context, url) {
  const page = await context.newPage();
  page.errors = [];
  page.sockets = [];
  page.on("pageerror", (error) => page.errors.push(error));
  page.on("websocket", (ws) => {
    const socket = { url: ws.url(), opened: performance.now(), closed: null, sent: [], received: [] };
    page.sockets.push(socket);
    ws.on("framesent", ({ payload }) => socket.sent.push(String(payload)));
    ws.on("framereceived", ({ payload }) => socket.received.push(String(payload)));
    ws.on("close", () => (socket.closed = performance.now()));
  });
  page.response = await page.goto(url);
  await waitForState(page, "connected");
  return page;
}

/** Waits until the page's connection badge shows `state`. */
export function waitForState(page, state, timeout = PATIENCE) {
  return page.waitForFunction((state) => document.querySelector("#state").dataset.state == state, state, { timeout });
}

/** The texts of the notifications panel, newest first. */
export function notifications(page) {
  return page.$$eval("#notifications li .text", (items) => items.map((item) => item.textContent));
}

/** Waits until the notifications panel shows `text`. */
export function waitForNotification(page, text, timeout = PATIENCE) {
  return page.waitForFunction(
    (text) => [...document.querySelectorAll("#notifications li .text")].some((item) => item.textContent == text),
    text,
    { timeout },
  );
}

/** The page's "Client events" lines, newest first. */
export function eventLog(page) {
  return page.$$eval("#log li span", (items) => items.map((item) => item.textContent));
}

/**
 * The frames the page's sockets received, parsed, oldest first; with
 * `channel`, only the `message` frames of that channel.
 */
export function receivedFrames(page, channel) {
  const frames = page.sockets.flatMap((socket) => socket.received.map((text) => JSON.parse(text)));
  return channel ? frames.filter((frame) => frame.type == "message" && frame.channel == channel) : frames;
}

/** A number shown in the page's header: `reconnects` or `gaps`. */
export async function counter(page, name) {
  return Number(await page.textContent(`#${name}`));
}
