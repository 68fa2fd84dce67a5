// The demo's apps in `herald dev` (memory broker), as a person tries them:
// reload the page while a notification is published and see it recovered;
// two pages in the chat room (join, online count, a message stamped with
// its author, leave); two pages on the shared counter.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import {
  HeraldNode,
  eventually,
  launchBrowser,
  notifications,
  openDemo,
  receivedFrames,
  waitForNotification,
  waitForState,
} from "./harness.mjs";

let browser;
let node;
before(async () => {
  browser = await launchBrowser();
  node = await HeraldNode.dev(["--no-feed"]);
});
after(async () => {
  await node?.stop("SIGKILL");
  await browser?.close();
});

/** The subscribe request the page's `index`th socket sent, and the reply's position for `channel`. */
function subscription(page, index, channel) {
  const socket = page.sockets[index];
  const request = socket.sent.map((text) => JSON.parse(text)).find((frame) => frame.op == "subscribe");
  const reply = request && socket.received.map((text) => JSON.parse(text)).find((frame) => frame.id == request.id);
  return { since: request?.since?.[channel], position: reply?.positions?.[channel] };
}

test("a notification published while the page reloads is recovered on the page", async (t) => {
  const context = await browser.newContext();
  t.after(() => context.close());
  const page = await openDemo(context, `${node.base}/`);
  await eventually(() => subscription(page, 0, "notify.demo").position, { message: "the subscribe reply" });

  // Reloads the page, holding app.js back until `text` has been published
  // while the page had no connection.
  const reloadMissing = async (text) => {
    const sockets = page.sockets.length;
    const disconnects = await node.metric("herald_disconnects_total");
    let release;
    const held = new Promise((resolve) => (release = resolve));
    await page.route("**/app.js", async (route) => {
      await held;
      await route.continue();
    });
    await page.reload({ waitUntil: "commit" });
    // (Playwright reports no close for a socket its page navigated away from.)
    await eventually(async () => (await node.metric("herald_disconnects_total")) > disconnects, {
      message: "the node's end of the old connection",
    });
    await node.publish("notify.demo", { text });
    release();
    await waitForState(page, "connected");
    await page.unroute("**/app.js");
    await waitForNotification(page, text);
    assert.equal(page.sockets.length, sockets + 1);
    return sockets;
  };

  // The first notification ever, published during the first reload: the page
  // subscribed while notify.demo had no history yet.
  let socket = await reloadMissing("missed during the first reload");
  const first = subscription(page, socket, "notify.demo");
  assert.ok(first.since, "the page resubscribed with the position it saved");
  assert.equal(first.position.recovered, true);
  assert.equal(first.position.offset, 1);

  // One live, then one missed during a second reload: only the missed one is
  // replayed, and nothing shows twice.
  await node.publish("notify.demo", { text: "live" });
  await waitForNotification(page, "live");
  socket = await reloadMissing("missed during the second reload");
  const second = subscription(page, socket, "notify.demo");
  assert.deepEqual(second.since, { offset: 2, epoch: second.position.epoch });
  assert.deepEqual(second.position, { offset: 3, epoch: second.position.epoch, recovered: true });
  assert.deepEqual(
    receivedFrames(page, "notify.demo").map((frame) => [frame.offset, frame.data.text]),
    [[1, "missed during the first reload"], [2, "live"], [3, "missed during the second reload"]],
  );
  assert.deepEqual(await notifications(page), ["missed during the second reload", "live", "missed during the first reload"]);
  const badges = await page.$$eval("#notifications li", (items) => items.map((item) => item.classList.contains("recovered")));
  assert.deepEqual(badges, [true, false, false]);
  assert.equal(await page.textContent("#notify-notice"), "Recovered 1 missed message");
  assert.deepEqual(page.errors, []);
});

/** The chat lines a page shows: `[who, text]`, `who` empty for join and leave notices. */
function chatLines(page) {
  return page.$$eval("#chat-log li", (items) =>
    items.map((item) => [item.querySelector(".who")?.textContent ?? "", item.querySelector(".text").textContent]),
  );
}

function hasLine(page, who, text) {
  return eventually(async () => (await chatLines(page)).some(([w, t]) => w == who && t == text), {
    message: `the chat line ${JSON.stringify([who, text])}`,
  });
}

/**
 * Waits until `selector` shows `text`. Polled from here: a page in the
 * background gets no animation frames and timers at most once a second.
 */
function waitForText(page, selector, text) {
  return eventually(async () => (await page.textContent(selector)) == text, { message: `${selector} showing ${text}` });
}

test("two pages in the chat room: join, online count, a message stamped with its author, leave", async (t) => {
  // Two tabs of one browser: each keeps its own guest user in sessionStorage.
  const context = await browser.newContext();
  t.after(() => context.close());
  const a = await openDemo(context, `${node.base}/`);
  const userA = await a.textContent("#user");
  await waitForText(a, "#online-count", "1");

  const b = await openDemo(context, `${node.base}/`);
  const userB = await b.textContent("#user");
  assert.notEqual(userA, userB);
  await hasLine(a, "", `${userB} joined`);
  await waitForText(a, "#online-count", "2");
  await waitForText(b, "#online-count", "2");

  await b.fill("#chat-input", "hello from B");
  await b.click("#chat-send");
  await hasLine(a, userB, "hello from B");
  await hasLine(b, userB, "hello from B");
  // The name is the server's stamp: B sent only the text.
  const sent = b.sockets[0].sent.map((text) => JSON.parse(text)).find((frame) => frame.op == "publish" && frame.channel == "chat.lobby");
  assert.deepEqual(sent.data, { text: "hello from B" });
  const delivered = receivedFrames(a, "chat.lobby").find((frame) => frame.data.text == "hello from B");
  assert.equal(delivered.from, userB);
  assert.equal(await b.isVisible("#chat-error"), false);

  await b.close();
  await hasLine(a, "", `${userB} left`);
  await waitForText(a, "#online-count", "1");
  assert.deepEqual(
    (await chatLines(a)).filter(([who]) => who == userA),
    [],
    "A wrote nothing",
  );
  assert.deepEqual([...a.errors, ...b.errors], []);
});

/** Clicks `selector` as a person would: in the tab in front (Playwright's checks wait for frames a background tab lacks). */
async function clickInFront(page, selector) {
  await page.bringToFront();
  await page.click(selector);
}

test("two pages share the counter", async (t) => {
  const context = await browser.newContext();
  t.after(() => context.close());
  const a = await openDemo(context, `${node.base}/`);
  // Another test may have left counter.demo anywhere: start from what A shows.
  const start = Number(await a.textContent("#counter-value"));
  for (let i = 1; i <= 3; i++) {
    await clickInFront(a, "#counter-inc");
    await waitForText(a, "#counter-value", String(start + i));
  }

  // A page that opens later asks the others, and A answers with its value.
  const b = await openDemo(context, `${node.base}/`);
  await waitForText(b, "#counter-value", String(start + 3));

  await clickInFront(b, "#counter-inc");
  for (const page of [a, b]) await waitForText(page, "#counter-value", String(start + 4));
  await clickInFront(a, "#counter-dec");
  for (const page of [a, b]) await waitForText(page, "#counter-value", String(start + 3));

  // Clicks in both at once: whatever wins, both end on the same value.
  const click = (page, selector) => page.$eval(selector, (button) => button.click());
  await Promise.all([click(a, "#counter-inc"), click(b, "#counter-inc"), click(a, "#counter-inc"), click(b, "#counter-dec")]);
  await eventually(
    async () => {
      const [x, y] = [await a.textContent("#counter-value"), await b.textContent("#counter-value")];
      const frames = receivedFrames(a, "counter.demo").filter((frame) => typeof frame.data.value == "number");
      return x == y && frames.length >= 10 && x == String(frames.at(-1).data.value);
    },
    { message: "both pages on the last published value" },
  );
  assert.deepEqual([...a.errors, ...b.errors], []);
});
