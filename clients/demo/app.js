// The herald demo page: a stock board, notifications with recovery across
// reloads, a chat room and a shared counter, all on one Herald client.
// Served by herald itself (GET /, /app.js, /style.css, /herald.min.js), so
// it needs no build step and loads nothing from elsewhere.

import { Herald, UnauthorizedError } from "/herald.min.js";

// The channels, in one place.
const PRICE_PATTERN = "prices.*";
const SYMBOLS = ["AAPL", "MSFT", "GOOG", "AMZN"];
const NOTIFY = "notify.demo";
const CHAT = "chat.lobby";
const COUNTER = "counter.demo";

/** Error codes that mean "this server does not offer that": hide the section. */
const UNAVAILABLE = new Set(["forbidden", "not_supported", "unknown_op"]);

const storage = {
  user: "herald-demo:user",
  position: `herald-demo:position:${NOTIFY}`,
  notifications: `herald-demo:notifications:${NOTIFY}`,
};

const $ = (selector) => document.querySelector(selector);
const pageParams = new URLSearchParams(location.search);

function load(key) {
  try {
    return JSON.parse(sessionStorage.getItem(key) || "null");
  } catch {
    return null;
  }
}

function save(key, value) {
  try {
    sessionStorage.setItem(key, JSON.stringify(value));
  } catch {
    // Storage full or disabled: the demo still works, without recovery.
  }
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function time(date = new Date()) {
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

/** Adds a line to the "Client events" panel. */
function log(text, kind = "") {
  const item = element("li", kind);
  item.append(element("time", "", time()), element("span", "", text));
  const list = $("#log");
  list.prepend(item);
  while (list.children.length > 12) list.lastChild.remove();
}

// --- Token and client ------------------------------------------------------

/**
 * GET /demo/token: `{"token": "<jwt>", "user": "guest-…", "url": "ws://…/ws"}`.
 * The user name is kept for the tab, so refreshed tokens keep the same `sub`.
 */
async function fetchToken() {
  const query = new URLSearchParams();
  const user = load(storage.user);
  if (user) query.set("user", user);
  if (pageParams.get("ttl")) query.set("ttl", pageParams.get("ttl"));
  const response = await fetch(`/demo/token?${query}`, { cache: "no-store" });
  if (response.status === 403 || response.status === 404) {
    throw new UnauthorizedError(`GET /demo/token answered ${response.status}: the demo is off`);
  }
  if (!response.ok) throw new Error(`GET /demo/token answered ${response.status}`);
  const body = await response.json();
  if (body.user) save(storage.user, body.user);
  return body;
}

const sameOriginUrl = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;

let first;
try {
  first = await fetchToken();
} catch (error) {
  first = {};
  log(`Could not get a demo token: ${error.message}`, "warn");
}

const herald = new Herald(first.url || sameOriginUrl, {
  token: first.token,
  getToken: async () => (await fetchToken()).token,
});
window.herald = herald; // for the console and for browser tests

// --- Connection status -------------------------------------------------------

let reconnects = 0;
let gaps = 0;

herald.on("state", (state) => {
  const badge = $("#state");
  badge.textContent = state;
  badge.dataset.state = state;
});

herald.on("connected", (ctx) => {
  $("#user").textContent = ctx.user;
  if (ctx.reconnected) $("#reconnects").textContent = String(++reconnects);
  log(`Connected as ${ctx.user} to node ${ctx.node}`, "ok");
});

herald.on("disconnected", ({ code, reason, reconnect }) => {
  log(`Disconnected: ${code}${reason ? ` ${reason}` : ""}${reconnect ? ", reconnecting" : ""}`, "warn");
});

herald.on("error", (error) => log(`Error: ${error.code}: ${error.message}`, "warn"));

function countGap(channel, reason) {
  $("#gaps").textContent = String(++gaps);
  log(`Gap on ${channel} (${reason}): refetch its state`, "warn");
}

/** A subscription's error: hide the section if the server does not offer it, else log it. */
function subscriptionFailed(selector, channel, error) {
  if (!UNAVAILABLE.has(error.code)) return log(`${channel}: ${error.code}: ${error.message}`, "warn");
  const section = $(selector);
  if (section.hidden) return;
  section.hidden = true;
  log(`${channel}: ${error.code}, so this server does not offer it; section hidden`);
}

// --- Stock board ------------------------------------------------------------

const rows = new Map();

function priceRow(symbol) {
  let row = rows.get(symbol);
  if (!row) {
    row = element("tr");
    row.dataset.symbol = symbol;
    row.append(element("td", "symbol", symbol), element("td", "price num", "—"), element("td", "change num", ""));
    $("#prices tbody").append(row);
    rows.set(symbol, row);
  }
  return row;
}

function onPrice(data, ctx) {
  const symbol = (data && data.symbol) || ctx.channel.slice("prices.".length);
  const price = Number(data && data.price);
  if (!symbol || !Number.isFinite(price)) return;
  const row = priceRow(symbol);
  const last = Number(row.dataset.price);
  const open = Number(row.dataset.open || price);
  row.dataset.open = String(open);
  row.dataset.price = String(price);
  row.querySelector(".price").textContent = price.toFixed(2);
  const change = price - open;
  const changeCell = row.querySelector(".change");
  changeCell.textContent = `${change >= 0 ? "+" : "−"}${Math.abs(change).toFixed(2)} (${((change / open) * 100).toFixed(2)}%)`;
  changeCell.dataset.sign = change > 0 ? "up" : change < 0 ? "down" : "flat";
  if (Number.isFinite(last) && last !== price) {
    row.dataset.tick = price > last ? "up" : "down";
    row.classList.remove("flash");
    void row.offsetWidth; // restart the animation
    row.classList.add("flash");
  }
}

SYMBOLS.forEach(priceRow);

function subscribePrices() {
  // Prices need no refetch after a gap: the next tick replaces the value.
  const wildcard = herald.subscribe(PRICE_PATTERN, { onMessage: onPrice });
  wildcard.on("error", (error) => {
    // broker_unavailable is retried by the client; any other refusal ends
    // the subscription (the error is reported just before it ends).
    if (error.code === "broker_unavailable") return;
    // Servers without wildcard subscriptions (or Redis Cluster) refuse the
    // pattern: subscribe to each symbol instead.
    log(`${PRICE_PATTERN}: ${error.code}; subscribing to each symbol instead`);
    for (const symbol of SYMBOLS) {
      const channel = `prices.${symbol}`;
      const sub = herald.subscribe(channel, { onMessage: onPrice });
      sub.on("error", (error) => subscriptionFailed("#stocks", channel, error));
    }
  });
}

// --- Notifications (history and recovery) ----------------------------------

const notifications = load(storage.notifications) || [];
let recoveredUntil = 0;

function notice(text, kind) {
  const node = $("#notify-notice");
  node.textContent = text;
  node.className = `notice ${kind}`;
  node.hidden = false;
}

function renderNotification(item) {
  const li = element("li", item.recovered ? "recovered" : "");
  li.dataset.offset = String(item.offset ?? "");
  li.append(element("time", "", item.time), element("span", "text", item.text));
  if (item.recovered) li.append(element("span", "badge", "recovered"));
  $("#notifications").prepend(li);
  while ($("#notifications").children.length > 20) $("#notifications").lastChild.remove();
}

function onNotification(data, ctx) {
  const text = typeof data === "string" ? data : data && typeof data.text === "string" ? data.text : JSON.stringify(data);
  const item = { text, time: time(), offset: ctx.offset, recovered: ctx.offset !== undefined && ctx.offset <= recoveredUntil };
  notifications.push(item);
  if (notifications.length > 20) notifications.shift();
  save(storage.notifications, notifications);
  save(storage.position, ctx.subscription.position);
  renderNotification(item);
}

function subscribeNotifications() {
  notifications.forEach((item) => renderNotification({ ...item, recovered: false }));
  const sub = herald.subscribe(NOTIFY, { since: load(storage.position), onMessage: onNotification });
  sub.on("subscribed", ({ position }) => save(storage.position, position));
  sub.on("recovered", ({ recovered, count, position }) => {
    if (!recovered) return; // a gap event follows
    recoveredUntil = position.offset + count;
    if (!count) return log(`${NOTIFY}: resumed, nothing was missed`, "ok");
    notice(`Recovered ${count} missed message${count === 1 ? "" : "s"}`, "ok");
    log(`${NOTIFY}: recovered ${count} missed message${count === 1 ? "" : "s"}`, "ok");
  });
  sub.on("gap", ({ reason }) => {
    notice(`Gap (${reason}): messages may be missing; refetch from your backend`, "warn");
    countGap(NOTIFY, reason);
  });
  sub.on("error", (error) => subscriptionFailed("#notify", NOTIFY, error));
}

const curl = [
  `curl -sS ${location.origin}/api/publish \\`,
  `  -H "Authorization: Bearer $HERALD_API_KEY" \\`,
  `  -H 'Content-Type: application/json' \\`,
  `  -d '{"channel":"${NOTIFY}","data":{"text":"Hello from curl"}}'`,
].join("\n");
$("#curl").textContent = curl;

$("#copy-curl").addEventListener("click", async (event) => {
  const button = event.currentTarget;
  try {
    await navigator.clipboard.writeText(curl);
  } catch {
    const range = document.createRange();
    range.selectNodeContents($("#curl"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    document.execCommand("copy");
  }
  button.textContent = "Copied";
  setTimeout(() => (button.textContent = "Copy"), 1500);
});

// --- Chat room (client publish and presence) --------------------------------

let onlineTimer = 0;

function chatLine(kind, who, text) {
  const li = element("li", kind);
  li.append(element("time", "", time()));
  if (who) li.append(element("b", "who", who));
  li.append(element("span", "text", text));
  const list = $("#chat-log");
  list.append(li);
  while (list.children.length > 100) list.firstChild.remove();
  list.scrollTop = list.scrollHeight;
}

/** Asks for the online count, coalescing bursts of joins and leaves. */
function refreshOnline() {
  clearTimeout(onlineTimer);
  onlineTimer = setTimeout(() => {
    herald.presenceCount(CHAT).then(
      (count) => ($("#online-count").textContent = String(count.users)),
      (error) => {
        // unknown_op: a server without presence predates client publish too,
        // so the room could not work; hide it. Otherwise only the count.
        if (error.code === "unknown_op") subscriptionFailed("#chat", CHAT, error);
        else if (UNAVAILABLE.has(error.code)) $("#online-count").parentElement.hidden = true;
      },
    );
  }, 150);
}

function subscribeChat() {
  const sub = herald.subscribe(CHAT, {
    onMessage: (data, ctx) => {
      const text = data && typeof data.text === "string" ? data.text : JSON.stringify(data);
      chatLine("message", ctx.from || "anonymous", text);
    },
  });
  sub.on("subscribed", refreshOnline);
  sub.on("join", ({ user }) => {
    chatLine("presence", "", `${user} joined`);
    refreshOnline();
  });
  sub.on("leave", ({ user }) => {
    chatLine("presence", "", `${user} left`);
    refreshOnline();
  });
  sub.on("gap", ({ reason }) => {
    countGap(CHAT, reason);
    chatLine("presence", "", "Messages sent while you were away are not shown.");
  });
  sub.on("error", (error) => subscriptionFailed("#chat", CHAT, error));

  $("#chat-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = $("#chat-input");
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    $("#chat-error").hidden = true;
    try {
      await herald.publish(CHAT, { text });
    } catch (error) {
      if (UNAVAILABLE.has(error.code)) return subscriptionFailed("#chat", CHAT, error);
      input.value = text;
      $("#chat-error").textContent = `Not sent: ${error.code}`;
      $("#chat-error").hidden = false;
    }
  });
}

// --- Shared counter -----------------------------------------------------------
//
// Pages publish the new absolute value ({"value": n}). A page that opens asks
// the others for the current value ({"sync": id}); one page answers after a
// random delay, and the others stay quiet when they see its answer.

const pageId = Math.random().toString(36).slice(2, 10);
let counterValue = 0;
let counterKnown = false;
let answerTimer = 0;

function renderCounter() {
  $("#counter-value").textContent = String(counterValue);
}

function counterFailed(error) {
  subscriptionFailed("#counter", COUNTER, error);
}

function askForCounter() {
  herald.publish(COUNTER, { sync: pageId }).catch(counterFailed);
  setTimeout(() => (counterKnown = true), 1500); // nobody answered: ours is the value
}

function subscribeCounter() {
  const sub = herald.subscribe(COUNTER, {
    onMessage: (data) => {
      if (data && typeof data.value === "number") {
        counterValue = data.value;
        counterKnown = true;
        clearTimeout(answerTimer);
        renderCounter();
      } else if (data && data.sync && data.sync !== pageId && counterKnown) {
        clearTimeout(answerTimer);
        answerTimer = setTimeout(
          () => herald.publish(COUNTER, { value: counterValue }).catch(counterFailed),
          100 + Math.random() * 400,
        );
      }
    },
  });
  sub.on("subscribed", ({ resubscribed }) => resubscribed || askForCounter());
  sub.on("gap", ({ reason }) => {
    countGap(COUNTER, reason);
    askForCounter();
  });
  sub.on("error", counterFailed);
  for (const [selector, delta] of [
    ["#counter-inc", 1],
    ["#counter-dec", -1],
  ]) {
    $(selector).addEventListener("click", () => {
      herald.publish(COUNTER, { value: counterValue + delta }).catch(counterFailed);
    });
  }
}

subscribePrices();
subscribeNotifications();
subscribeChat();
subscribeCounter();
