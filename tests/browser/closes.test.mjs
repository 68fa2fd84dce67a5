// What the client does when the server closes: a node restart (reconnect
// with jitter, a gap on a plain channel; recovery of a history channel from
// Redis), a slow-consumer close (reconnect) and a forbidden close (stop).
// The demo page, served by a real node, in Chromium.

import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";

import {
  HeraldNode,
  counter,
  eventLog,
  eventually,
  launchBrowser,
  notifications,
  openDemo,
  receivedFrames,
  removeDir,
  sleep,
  startRedis,
  tempDir,
  waitForNotification,
  waitForState,
} from "./harness.mjs";

let browser;
before(async () => (browser = await launchBrowser()));
after(() => browser?.close());

test("after a node restart, pages reconnect with jitter and report a gap on a plain channel", async (t) => {
  let node = await HeraldNode.serve();
  t.after(() => node.stop("SIGKILL"));
  const context = await browser.newContext();
  t.after(() => context.close());
  const pages = [];
  for (let i = 0; i < 4; i++) pages.push(await openDemo(context, `${node.base}/`));

  // SIGTERM: every page gets 1001 "shutdown"; start a new node on the same port at once.
  await node.stop("SIGTERM");
  node = await HeraldNode.serve({ port: node.port });
  for (const page of pages) {
    await page.waitForFunction(() => document.querySelector("#reconnects").textContent == "1", null, { timeout: 15_000 });
    await waitForState(page, "connected");
  }

  // The client waits a random time within [0.5 s, 1 s] before its first
  // retry after a 1001 (full jitter above the floor), so pages closed
  // together do not come back together.
  const firstRetry = pages.map((page) => {
    const [first, second] = page.sockets;
    assert.ok(first.closed != null && second, "the page closed its socket and opened another");
    return second.opened - first.closed;
  });
  for (const delay of firstRetry) {
    assert.ok(delay >= 450 && delay <= 1200, `first retry after ${delay.toFixed(0)} ms, expected 500 to 1000 ms`);
  }
  const spread = Math.max(...firstRetry) - Math.min(...firstRetry);
  assert.ok(spread > 5, `first retries ${firstRetry.map((d) => d.toFixed(1))} ms: no jitter`);

  // notify.demo has no history: after the reconnect the client cannot know
  // what it missed, and says so with a gap.
  for (const page of pages) {
    assert.ok((await counter(page, "gaps")) >= 1, "a gap was counted");
    const notice = await page.textContent("#notify-notice");
    assert.match(notice, /Gap \(reconnect\)/);
    assert.ok((await eventLog(page)).some((line) => /Disconnected: 1001 shutdown, reconnecting/.test(line)));
  }

  // And the pages receive again.
  await node.publish("notify.demo", { text: "after the restart" });
  for (const page of pages) await waitForNotification(page, "after the restart");
  for (const page of pages) assert.deepEqual(page.errors, []);
});

test("after a node restart, a page recovers from Redis exactly what a history channel missed", async (t) => {
  // Two nodes on one redis-server, notify.* with history (in Redis Streams):
  // the page's node restarts while the other publishes through its API.
  const redis = await startRedis();
  t.after(() => redis.stop("SIGKILL"));
  const dir = tempDir("history");
  t.after(() => removeDir(dir));
  const config = path.join(dir, "herald.toml");
  writeFileSync(config, '[[channels]]\npattern = "notify.*"\nhistory_size = 100\nhistory_ttl = "1h"\n');
  const options = { env: { HERALD_BROKER__KIND: "redis", HERALD_BROKER__URL: redis.url }, args: ["--config", config] };
  let [one, two] = await Promise.all([HeraldNode.serve(options), HeraldNode.serve(options)]);
  t.after(() => Promise.all([one.stop("SIGKILL"), two.stop("SIGKILL")]));
  const context = await browser.newContext();
  t.after(() => context.close());
  const page = await openDemo(context, `${one.base}/`);

  await two.publish("notify.demo", { text: "before the restart" });
  await waitForNotification(page, "before the restart");
  const [before] = receivedFrames(page, "notify.demo");
  assert.equal(before.offset, 1);

  await one.stop("SIGTERM");
  const away = ["away 1", "away 2", "away 3"];
  for (const text of away) await two.publish("notify.demo", { text });
  one = await HeraldNode.serve({ ...options, port: one.port });
  await page.waitForFunction(() => document.querySelector("#reconnects").textContent == "1", null, { timeout: 15_000 });
  await waitForState(page, "connected");
  await two.publish("notify.demo", { text: "after the restart" });
  await waitForNotification(page, "after the restart");

  // The resubscription carried the page's position, and the node answered
  // recovered: true with the history's top.
  const socket = page.sockets.at(-1);
  const subscribe = socket.sent.map((text) => JSON.parse(text)).find((frame) => frame.op == "subscribe");
  assert.deepEqual(subscribe.since, { "notify.demo": { offset: 1, epoch: before.epoch } });
  const reply = socket.received.map((text) => JSON.parse(text)).find((frame) => frame.id == subscribe.id);
  assert.deepEqual(reply.positions["notify.demo"], { offset: 4, epoch: before.epoch, recovered: true });

  // Every message once, in order, across both connections.
  const frames = receivedFrames(page, "notify.demo");
  assert.deepEqual(frames.map((frame) => [frame.offset, frame.data.text]), [
    [1, "before the restart"], [2, "away 1"], [3, "away 2"], [4, "away 3"], [5, "after the restart"],
  ]);
  assert.ok(frames.every((frame) => frame.epoch == before.epoch));
  assert.deepEqual(await notifications(page), ["after the restart", ...[...away].reverse(), "before the restart"]);
  const badges = await page.$$eval("#notifications li", (items) => items.map((item) => item.classList.contains("recovered")));
  assert.deepEqual(badges, [false, true, true, true, false]);
  assert.equal(await page.textContent("#notify-notice"), "Recovered 3 missed messages");
  assert.ok(!(await eventLog(page)).some((line) => line.includes("Gap on notify.demo")), "no gap on the history channel");
  assert.deepEqual(page.errors, []);
});

test("a slow-consumer close (4002) makes the client reconnect", async (t) => {
  // A short queue, so that a page that stops reading is closed quickly.
  const node = await HeraldNode.serve({ env: { HERALD_LIMITS__QUEUE_MESSAGES: "8" } });
  t.after(() => node.stop("SIGKILL"));
  const context = await browser.newContext();
  t.after(() => context.close());
  const page = await openDemo(context, `${node.base}/`);

  // Freeze the page, as Chromium freezes background tabs: it stops reading
  // its socket (a busy main thread would not do: Chromium keeps reading into
  // memory). The kernel's buffers fill up, then the node's queue overflows.
  const cdp = await context.newCDPSession(page);
  await cdp.send("Page.setWebLifecycleState", { state: "frozen" });
  const text = "x".repeat(4000);
  let published = 0;
  while ((await node.metric("herald_disconnects_total", 'reason="slow_consumer"')) == 0) {
    assert.ok(published < 20_000, "the node never found the page slow");
    await Promise.all(Array.from({ length: 50 }, () => node.publish("notify.demo", { text })));
    published += 50;
  }
  await cdp.send("Page.setWebLifecycleState", { state: "active" });

  await page.waitForFunction(() => document.querySelector("#reconnects").textContent == "1", null, { timeout: 15_000 });
  await waitForState(page, "connected");
  assert.ok(
    (await eventLog(page)).some((line) => /Disconnected: 4002 slow_consumer, reconnecting/.test(line)),
    "the page saw the 4002 close",
  );
  // At least the closed socket and its replacement; a burst still queued
  // when the page wakes may close the replacement too, and the client then
  // reconnects again, which is also the behaviour under test.
  assert.ok(page.sockets.length >= 2, `${page.sockets.length} sockets`);
  await node.publish("notify.demo", { text: "caught up" });
  await waitForNotification(page, "caught up");
  assert.deepEqual(page.errors, []);
});

test("a forbidden close (4004) stops the client", async (t) => {
  const node = await HeraldNode.serve({ env: { HERALD_AUTH__LEEWAY: "1s" } });
  t.after(() => node.stop("SIGKILL"));
  const context = await browser.newContext();
  t.after(() => context.close());
  // A 5-second token: the client refreshes it in-band after 4 s.
  const page = await openDemo(context, `${node.base}/?ttl=5`);
  const user = await page.textContent("#user");
  // The page asks /demo/token for the user it keeps in sessionStorage: make
  // the refresh bring another user's token. The node closes with 4004.
  await page.evaluate(() => sessionStorage.setItem("herald-demo:user", JSON.stringify("mallory")));
  await waitForState(page, "disconnected", 15_000);
  const log = await eventLog(page);
  assert.ok(log.some((line) => /Disconnected: 4004 forbidden$/.test(line)), log.join("\n"));
  assert.ok(log.some((line) => /Error: forbidden:/.test(line)), log.join("\n"));
  assert.equal(await page.textContent("#user"), user);
  // Stopped: no new connection, however long we wait.
  await sleep(2500);
  assert.equal(page.sockets.length, 1);
  assert.equal(await page.getAttribute("#state", "data-state"), "disconnected");
  assert.equal(await node.metric("herald_disconnects_total", 'reason="forbidden"'), 1);
  assert.deepEqual(page.errors, []);
});
