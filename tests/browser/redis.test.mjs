// Two tabs on two nodes that share a real redis-server: a message published
// through one node's API, or by a backend straight into Redis, reaches both.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { HeraldNode, eventLog, launchBrowser, openDemo, redisCommand, startRedis, waitForNotification } from "./harness.mjs";

let browser;
before(async () => (browser = await launchBrowser()));
after(() => browser?.close());

test("two tabs on two nodes over Redis both receive", async (t) => {
  const redis = await startRedis();
  t.after(() => redis.stop("SIGKILL"));
  const env = { HERALD_BROKER__KIND: "redis", HERALD_BROKER__URL: redis.url };
  const [one, two] = await Promise.all([HeraldNode.serve({ env }), HeraldNode.serve({ env })]);
  t.after(() => Promise.all([one.stop("SIGKILL"), two.stop("SIGKILL")]));

  const context = await browser.newContext();
  t.after(() => context.close());
  const first = await openDemo(context, `${one.base}/`);
  const second = await openDemo(context, `${two.base}/`);
  const nodeOf = async (page) => (await eventLog(page)).find((line) => line.startsWith("Connected as"));
  assert.match(await nodeOf(first), new RegExp(`to node browser-${one.port}$`));
  assert.match(await nodeOf(second), new RegExp(`to node browser-${two.port}$`));

  // The pages say "connected" before their subscribe replies arrive: wait
  // until both nodes hold notify.demo (and Redis confirmed it), or a publish
  // could come first and be missed, as at-most-once delivery allows.
  const deadline = Date.now() + 10_000;
  for (const node of [one, two]) {
    while ((await node.metric("herald_subscriptions")) < 4) {
      assert.ok(Date.now() < deadline, "the pages never subscribed");
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }

  // Through the first node's API: Redis carries it to the second.
  await one.publish("notify.demo", { text: "via node one" });
  await waitForNotification(first, "via node one");
  await waitForNotification(second, "via node one");

  // A backend publishing straight into Redis reaches both nodes' pages.
  const receivers = await redisCommand(redis.port, ["PUBLISH", "notify.demo", JSON.stringify({ text: "via redis" })]);
  assert.equal(receivers, ":2", "both nodes subscribe in Redis");
  await waitForNotification(first, "via redis");
  await waitForNotification(second, "via redis");

  // Prices too, on the per-symbol channels the page falls back to.
  await redisCommand(redis.port, ["PUBLISH", "prices.MSFT", JSON.stringify({ symbol: "MSFT", price: 401.5 })]);
  for (const page of [first, second]) {
    await page.waitForFunction(() => document.querySelector('#prices tr[data-symbol="MSFT"] .price').textContent == "401.50");
  }
  assert.deepEqual([...first.errors, ...second.errors], []);
});
