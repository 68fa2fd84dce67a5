// README's one-minute walkthrough, as a new user follows it: `herald dev`
// starts and prints its banner, the page it names loads in Chromium, the demo
// feed moves the stock board, the banner's curl command makes a notification
// appear, and its console snippet works from that page. Takes README's
// screenshot on the way.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync } from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";

import { HeraldNode, ROOT, eventually, launchBrowser, openDemo, waitForNotification } from "./harness.mjs";

/** Where the screenshot goes: docs/demo.png with HERALD_UPDATE_SCREENSHOT=1, else target/browser/. */
const SCREENSHOT = process.env.HERALD_UPDATE_SCREENSHOT
  ? path.join(ROOT, "docs/demo.png")
  : path.join(ROOT, "target/browser/demo.png");

let browser;
before(async () => (browser = await launchBrowser()));
after(() => browser?.close());

/** The banner's line that starts with `prefix`, trimmed. */
function bannerLine(banner, prefix) {
  const line = banner.split("\n").find((line) => line.trim().startsWith(prefix));
  assert.ok(line, `the banner has a line starting with ${prefix}:\n${banner}`);
  return line.trim();
}

/** Runs shell lines from the banner in bash, as a person would paste them. */
function paste(...lines) {
  return execFileSync("bash", ["-c", lines.join("\n")], { encoding: "utf8" });
}

test("the walkthrough: herald dev, the page, the demo feed, a curl publish, the console snippet", async (t) => {
  const node = await HeraldNode.dev();
  t.after(() => node.stop("SIGKILL"));
  const banner = node.banner;
  assert.match(banner, /Open the live demo:\s+http:\/\/127\.0\.0\.1:\d+\/\n/);
  assert.equal(bannerLine(banner, "http://"), `${node.base}/`);

  const context = await browser.newContext({ viewport: { width: 1200, height: 780 } });
  t.after(() => context.close());
  const foreign = [];
  context.on("request", (request) => {
    const url = request.url();
    if (!url.startsWith(`${node.base}/`) && !url.startsWith("ws://127.0.0.1:") && !url.startsWith("data:")) foreign.push(url);
  });
  const page = await openDemo(context, bannerLine(banner, "http://"));
  const headers = page.response.headers();
  assert.match(headers["content-security-policy"], /script-src 'self'/);
  assert.equal(headers["content-type"], "text/html; charset=utf-8");

  // The demo feed moves every symbol of the stock board, with no backend.
  const prices = () =>
    page.$$eval("#prices tbody tr", (rows) => Object.fromEntries(rows.map((row) => [row.dataset.symbol, row.dataset.price])));
  const first = await eventually(async () => {
    const now = await prices();
    return Object.values(now).every((price) => price) && now;
  }, { message: "a price for every symbol" });
  assert.deepEqual(Object.keys(first).sort(), ["AAPL", "AMZN", "GOOG", "MSFT"]);
  await eventually(async () => {
    const now = await prices();
    return Object.keys(first).every((symbol) => now[symbol] != first[symbol]);
  }, { message: "every price to move" });

  // The curl command the banner prints, after its export line.
  const published = paste(bannerLine(banner, "export HERALD_API_KEY="), bannerLine(banner, "curl") /* notify.demo */);
  // notify.* keeps history in herald dev: the answer names the message's position.
  const answer = JSON.parse(published);
  assert.deepEqual(answer, { ok: true, offset: 1, epoch: answer.epoch });
  assert.match(answer.epoch, /^\S+$/);
  await waitForNotification(page, "Hello from curl");
  // The page shows the same command, ready to copy.
  assert.match(await page.textContent("#curl"), /"channel":"notify\.demo"/);

  await page.screenshot({ path: SCREENSHOT });

  // The console snippet, pasted into this page's console.
  const logged = [];
  page.on("console", async (message) => {
    if (message.type() == "log" && message.args().length) logged.push(await message.args()[0].jsonValue());
  });
  const snippet = ["const ws = new WebSocket(", "ws.onmessage = ", "ws.onopen = "].map((start) => bannerLine(banner, start));
  await page.evaluate(snippet.join("\n"));
  await eventually(() => logged.some((frame) => frame.type == "reply" && frame.id == 1 && frame.channels[0] == "news"), {
    message: "the snippet's subscribe reply",
  });
  assert.equal(logged[0].type, "welcome");
  assert.equal(logged[0].user, "dev-user");
  const newsCurl = banner
    .split("\n")
    .map((line) => line.trim())
    .find((line) => line.startsWith("curl") && line.includes('"channel":"news"'));
  paste(bannerLine(banner, "export HERALD_API_KEY="), newsCurl);
  await eventually(
    () => logged.some((frame) => frame.type == "message" && frame.channel == "news" && frame.data.hello == "world"),
    { message: "the news message in the console" },
  );

  assert.deepEqual(foreign, [], "the page loads nothing from elsewhere");
  assert.deepEqual(page.errors, []);
});

test("herald dev --no-feed leaves the stock board still", async (t) => {
  const node = await HeraldNode.dev(["--no-feed"]);
  t.after(() => node.stop("SIGKILL"));
  assert.doesNotMatch(node.banner, /demo feed/);
  const context = await browser.newContext();
  t.after(() => context.close());
  const page = await openDemo(context, `${node.base}/`);
  // The feed would have moved every symbol several times by now.
  await page.waitForTimeout(1500);
  assert.deepEqual(await page.$$eval("#prices tbody tr .price", (cells) => cells.map((cell) => cell.textContent)), ["—", "—", "—", "—"]);
  // Prices published by a backend still show.
  await node.publish("prices.AAPL", { symbol: "AAPL", price: 123.45 });
  await page.waitForFunction(() => document.querySelector('#prices tr[data-symbol="AAPL"] .price').textContent == "123.45");
  assert.deepEqual(page.errors, []);
});

mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
