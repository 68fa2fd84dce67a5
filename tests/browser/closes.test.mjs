// What the client does when the server closes: a node restart (reconnect
// with jitter, a gap on a plain channel), a slow-consumer close (reconnect)
// and a forbidden close (stop). The demo page, served by a real node, in
// Chromium. (Recovery of a history channel across a restart joins these
// once channels can keep history.)

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import {
  HeraldNode,
  counter,
  eventLog,
  eventually,
  launchBrowser,
  openDemo,
  sleep,
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
  assert.equal(page.sockets.length, 2);
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
