// The demo page over https:// and wss:// with a self-signed certificate:
// subscribe, receive, refresh the token in-band before it expires without a
// disconnect; and certificate rotation, where a new connection sees the new
// certificate while an open one stays open.

import assert from "node:assert/strict";
import { readFileSync, renameSync } from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";

import {
  HeraldNode,
  eventually,
  launchBrowser,
  openDemo,
  removeDir,
  selfSignedCertificate,
  sleep,
  tempDir,
  waitForNotification,
} from "./harness.mjs";

let browser;
before(async () => (browser = await launchBrowser()));
after(() => browser?.close());

/** A node serving TLS with a fresh self-signed certificate named `name`, from `dir/tls.crt` and `dir/tls.key`. */
async function tlsNode(t, name, env = {}) {
  const dir = tempDir("tls");
  t.after(() => removeDir(dir));
  const { cert, key } = selfSignedCertificate(dir, name);
  const files = { cert: path.join(dir, "tls.crt"), key: path.join(dir, "tls.key") };
  renameSync(cert, files.cert);
  renameSync(key, files.key);
  const node = await HeraldNode.serve({
    ca: readFileSync(files.cert),
    env: { HERALD_SERVER__TLS__CERT_FILE: files.cert, HERALD_SERVER__TLS__KEY_FILE: files.key, ...env },
  });
  t.after(() => node.stop("SIGKILL"));
  return { node, dir, files };
}

/** The JSON frames a recorded socket received. */
const received = (socket) => socket.received.map((text) => JSON.parse(text));

test("wss:// with a self-signed certificate: subscribe, receive, refresh the token without a disconnect", async (t) => {
  const { node } = await tlsNode(t, "herald-wss", { HERALD_AUTH__LEEWAY: "1s" });
  assert.match(node.base, /^https:/);
  const context = await browser.newContext();
  t.after(() => context.close());
  // 5-second tokens: without a refresh the node would close the connection
  // with 4001 after 6 s (exp plus the 1 s leeway).
  const opened = Date.now();
  const page = await openDemo(context, `${node.base}/?ttl=5`);
  const [socket] = page.sockets;
  assert.match(socket.url, /^wss:\/\/127\.0\.0\.1:\d+\/ws$/);
  const welcome = received(socket).find((frame) => frame.type == "welcome");
  assert.ok(welcome.expires_at - Date.now() / 1000 <= 6.5, "a short-lived token");

  await node.publish("notify.demo", { text: "over wss" });
  await waitForNotification(page, "over wss");

  // The client refreshes in-band, about a second before the token expires.
  const refreshed = await eventually(
    () => received(socket).find((frame) => frame.type == "reply" && typeof frame.expires_at == "number"),
    { message: "a refresh reply" },
  );
  assert.ok(refreshed.expires_at > welcome.expires_at, "the refresh moved the expiry");
  assert.deepEqual(refreshed.revoked, []);
  assert.ok(socket.sent.some((text) => JSON.parse(text).op == "refresh"));

  // Well past the first token's end, the same connection still delivers.
  await sleep(Math.max(0, opened + 7500 - Date.now()));
  await node.publish("notify.demo", { text: "after the refresh" });
  await waitForNotification(page, "after the refresh");
  assert.equal(page.sockets.length, 1, "no reconnect");
  assert.equal(socket.closed, null);
  assert.equal(await page.textContent("#reconnects"), "0");
  assert.equal(await node.metric("herald_disconnects_total", 'reason="token_expired"'), 0);
  assert.deepEqual(page.errors, []);
});

test("certificate rotation: a new connection sees the new certificate, an open one stays open", async (t) => {
  const { node, dir, files } = await tlsNode(t, "herald-old", { HERALD_SERVER__TLS__RELOAD_INTERVAL: "200ms" });
  const before = await browser.newContext();
  t.after(() => before.close());
  const old = await openDemo(before, `${node.base}/`);
  assert.equal((await old.response.securityDetails()).subjectName, "herald-old");

  // Replace the files, each by a rename, as a deployment tool would.
  const next = selfSignedCertificate(dir, "herald-new");
  node.ca = [readFileSync(files.cert), readFileSync(next.cert)];
  renameSync(next.key, files.key);
  renameSync(next.cert, files.cert);
  await eventually(async () => (await node.metric("herald_tls_reloads_total", 'result="ok"')) >= 1, {
    message: "the node to load the new certificate",
  });

  // A fresh browser context shares no connection or TLS session with the first.
  const after = await browser.newContext();
  t.after(() => after.close());
  const fresh = await openDemo(after, `${node.base}/`);
  assert.equal((await fresh.response.securityDetails()).subjectName, "herald-new");

  // The old page kept its connection, and both receive.
  await node.publish("notify.demo", { text: "after the rotation" });
  await waitForNotification(old, "after the rotation");
  await waitForNotification(fresh, "after the rotation");
  assert.equal(old.sockets.length, 1);
  assert.equal(old.sockets[0].closed, null);
  assert.equal(await old.getAttribute("#state", "data-state"), "connected");
  assert.deepEqual([...old.errors, ...fresh.errors], []);
});
