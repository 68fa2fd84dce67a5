// The client's behaviour, through its public API only, against fake sockets
// and a fake clock. `defineClientTests` runs for the compiled source
// (client.test.ts) and again for the minified bundle in dist (dist.test.ts),
// so that minification and property mangling are covered too.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import type { Herald as HeraldClass, HeraldError as HeraldErrorClass } from "../src/herald.js";
import { connected, type Frame, makeToken, settle, setup } from "./helpers.js";

interface Build {
  Herald: typeof HeraldClass;
  UnauthorizedError: new (message?: string) => HeraldErrorClass;
}

/** A promise with its settle functions, for getToken calls a test controls. */
function deferred<T>() {
  let resolve!: (value: T) => void;
  let reject!: (error: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/** A getToken whose calls are counted and answered by the test. */
function controlledGetToken() {
  const calls: ReturnType<typeof deferred<string>>[] = [];
  return {
    calls,
    getToken: () => {
      const call = deferred<string>();
      calls.push(call);
      return call.promise;
    },
  };
}

export function defineClientTests(name: string, build: Build): void {
  const { Herald, UnauthorizedError } = build;

  describe(`${name}: connecting`, () => {
    test("offers herald.v1 and the token as subprotocols, then reports connected", async () => {
      const h = setup(Herald);
      h.herald.connect();
      assert.equal(h.herald.state, "connecting");
      await settle();
      assert.deepEqual(h.ws().protocols, ["herald.v1", "herald.auth.static-token"]);
      assert.equal(h.ws().url, "ws://herald.test/ws");
      h.ws().welcome({ user: "alice" });
      assert.equal(h.herald.state, "connected");
      assert.equal(h.herald.user, "alice");
      assert.deepEqual(
        h.events.filter(([event]) => event === "state").map(([, state]) => state),
        ["connecting", "connected"],
      );
      const connectedEvent = h.events.find(([event]) => event === "connected")![1] as Frame;
      assert.equal(connectedEvent.reconnected, false);
      assert.equal(connectedEvent.node, "herald-0");
    });

    test("auto-connects in a microtask, so subscriptions made at once share one request", async () => {
      const h = setup(Herald, { autoConnect: true });
      h.herald.subscribe("a");
      h.herald.subscribe("b");
      await settle();
      h.ws().welcome();
      assert.deepEqual(h.ws().ops("subscribe"), [{ op: "subscribe", id: 1, channels: ["a", "b"] }]);
    });

    test("disconnect() stops, and connect() resumes with the same subscriptions", async () => {
      const h = setup(Herald);
      h.herald.subscribe("news");
      const first = await connected(h);
      first.replySubscribe();
      h.herald.disconnect();
      assert.equal(h.herald.state, "disconnected");
      assert.equal(first.closedByClient?.code, 1000);
      await h.clock.advance(60_000);
      assert.equal(h.sockets.length, 1, "no reconnect after disconnect()");
      const second = await connected(h);
      assert.deepEqual(second.last("subscribe").channels, ["news"]);
    });

    test("gives up on a connection that sends no welcome within the timeout", async () => {
      const h = setup(Herald, { timeout: 5000 });
      h.herald.connect();
      await settle();
      await h.clock.advance(5001);
      assert.ok(h.sockets[0].closedByClient, "the silent socket is closed");
      await h.clock.advance(1000);
      assert.equal(h.sockets.length, 2);
    });
  });

  describe(`${name}: reconnecting`, () => {
    test("reconnects after a lost connection within the backoff bounds, growing", async () => {
      const h = setup(Herald, { random: () => 0.999 });
      await connected(h);
      h.ws().serverClose(1006);
      assert.equal(h.herald.state, "connecting");
      const bounds = [1000, 2000, 4000, 8000, 16000, 20000, 20000];
      for (const [attempt, bound] of bounds.entries()) {
        const before = h.sockets.length;
        await h.clock.advance(499);
        assert.equal(h.sockets.length, before, `attempt ${attempt}: not before the 500 ms floor`);
        await h.clock.advance(bound - 499);
        assert.equal(h.sockets.length, before + 1, `attempt ${attempt}: by ${bound} ms`);
        h.ws().serverClose(1006); // the handshake fails again
      }
    });

    test("1001 shutdown reconnects after a jittered delay, not at once", async () => {
      for (const [random, expected] of [
        [0, 500],
        [0.5, 750],
        [0.999, 999.5],
      ]) {
        const h = setup(Herald, { random: () => random });
        await connected(h);
        h.ws().serverClose(1001, "shutdown");
        await h.clock.advance(expected - 1);
        assert.equal(h.sockets.length, 1, `random ${random}: too early`);
        await h.clock.advance(1);
        assert.equal(h.sockets.length, 2, `random ${random}: reconnected at ${expected} ms`);
      }
    });

    test("a welcome resets the backoff", async () => {
      const h = setup(Herald, { random: () => 0.999, timeout: 60_000 });
      await connected(h);
      for (let i = 0; i < 4; i++) {
        h.ws().serverClose(1006);
        await h.clock.advance(20_000);
      }
      h.ws().welcome();
      h.ws().serverClose(1006);
      const before = h.sockets.length;
      await h.clock.advance(1000);
      assert.equal(h.sockets.length, before + 1);
    });

    test("4005 policy violation waits longer before reconnecting", async () => {
      const h = setup(Herald, { random: () => 0.999 });
      await connected(h);
      h.ws().serverClose(4005, "policy_violation");
      await h.clock.advance(4000);
      assert.equal(h.sockets.length, 1);
      await h.clock.advance(4000);
      assert.equal(h.sockets.length, 2);
    });

    for (const [code, reason] of [
      [4004, "forbidden"],
      [1002, "protocol_error"],
      [1007, "invalid_payload"],
      [1009, "message_too_big"],
    ] as const) {
      test(`${code} ${reason} stops and reports`, async () => {
        const h = setup(Herald);
        await connected(h);
        h.ws().serverClose(code, reason);
        assert.equal(h.herald.state, "disconnected");
        const error = h.events.find(([event]) => event === "error")?.[1] as HeraldErrorClass;
        assert.equal(error.code, reason);
        const disconnected = h.events.find(([event]) => event === "disconnected")?.[1] as Frame;
        assert.deepEqual(disconnected, { code, reason, reconnect: false });
        await h.clock.advance(120_000);
        assert.equal(h.sockets.length, 1);
      });
    }

    for (const code of [1000, 4002, 4003]) {
      test(`${code} reconnects`, async () => {
        const h = setup(Herald);
        await connected(h);
        h.ws().serverClose(code);
        await h.clock.advance(1000);
        assert.equal(h.sockets.length, 2);
        assert.equal(h.herald.state, "connecting");
      });
    }

    test("4001 token expired gets a new token, then reconnects", async () => {
      const tokens = controlledGetToken();
      const h = setup(Herald, { token: undefined, getToken: tokens.getToken });
      h.herald.connect();
      await settle();
      tokens.calls[0].resolve(makeToken({ sub: "alice", iat: 1, exp: 3601 }));
      await settle();
      h.ws().welcome();
      h.ws().serverClose(4001, "token_expired");
      await h.clock.advance(1000);
      assert.equal(tokens.calls.length, 2, "a second getToken call");
      assert.equal(h.sockets.length, 1, "no socket before the token");
      const fresh = makeToken({ sub: "alice", iat: 2, exp: 3602 });
      tokens.calls[1].resolve(fresh);
      await settle();
      assert.deepEqual(h.ws().protocols, ["herald.v1", "herald.auth." + fresh]);
    });

    test("a still-valid token is reused after an ordinary reconnect", async () => {
      let calls = 0;
      const h = setup(Herald, {
        token: undefined,
        getToken: () => (++calls, makeToken({ sub: "alice", iat: 1, exp: 3601 })),
      });
      await connected(h);
      h.ws().serverClose(1001);
      await h.clock.advance(1000);
      assert.equal(h.sockets.length, 2);
      assert.equal(calls, 1);
    });

    test("a connection refused before its welcome gets a fresh token next time", async () => {
      let calls = 0;
      const h = setup(Herald, {
        token: undefined,
        getToken: () => `opaque-${++calls}`,
      });
      h.herald.connect();
      await settle();
      h.ws().serverClose(1006); // e.g. 401 bad_signature after a server restart
      await h.clock.advance(1000);
      assert.deepEqual(h.ws().protocols, ["herald.v1", "herald.auth.opaque-2"]);
    });

    test("getToken is single-flight: a reconnect shares the refresh's pending call", async () => {
      const tokens = controlledGetToken();
      const h = setup(Herald, { token: undefined, getToken: tokens.getToken });
      h.herald.connect();
      await settle();
      tokens.calls[0].resolve(makeToken({ sub: "alice", iat: 0, exp: 60 }));
      await settle();
      h.ws().welcome();
      await h.clock.advance(48_000); // 20% before expiry: the refresh asks for a token
      assert.equal(tokens.calls.length, 2);
      h.ws().serverClose(4001, "token_expired"); // and the reconnect needs one too
      await h.clock.advance(5000);
      assert.equal(tokens.calls.length, 2, "the reconnect waits for the same call");
      const fresh = makeToken({ sub: "alice", iat: 48, exp: 108 });
      tokens.calls[1].resolve(fresh);
      await settle();
      assert.equal(h.sockets.length, 2);
      assert.deepEqual(h.ws().protocols, ["herald.v1", "herald.auth." + fresh]);
      assert.equal(h.sockets[0].ops("refresh").length, 0, "the old connection is not refreshed");
    });

    test("getToken throwing UnauthorizedError stops the client", async () => {
      const h = setup(Herald, {
        token: undefined,
        getToken: () => {
          throw new UnauthorizedError("logged out");
        },
      });
      h.herald.connect();
      await settle();
      assert.equal(h.herald.state, "disconnected");
      assert.equal(h.sockets.length, 0);
      const error = h.events.find(([event]) => event === "error")?.[1] as HeraldErrorClass;
      assert.equal(error.code, "unauthorized");
      await h.clock.advance(60_000);
      assert.equal(h.sockets.length, 0);
    });

    test("other getToken failures are reported and retried with backoff", async () => {
      let calls = 0;
      const h = setup(Herald, {
        token: undefined,
        getToken: () => {
          if (++calls < 3) throw new Error("503 from the token endpoint");
          return "opaque";
        },
      });
      h.herald.connect();
      await settle();
      assert.equal(h.herald.state, "connecting");
      await h.clock.advance(5000);
      assert.equal(calls, 3);
      assert.equal(h.sockets.length, 1);
      const errors = h.events.filter(([event]) => event === "error").map(([, error]) => error as HeraldErrorClass);
      assert.deepEqual(
        errors.map((error) => error.code),
        ["token", "token"],
      );
    });
  });

  describe(`${name}: subscriptions and positions`, () => {
    test("positions advance before handlers run", async () => {
      const h = setup(Herald);
      const seen: [number | undefined, number | undefined][] = [];
      const sub = h.herald.subscribe("notify.alice", {
        onMessage: (_data, ctx) => seen.push([ctx.offset, sub.position?.offset]),
      });
      const ws = await connected(h);
      ws.replySubscribe({ positions: { "notify.alice": { offset: 4, epoch: "E" } } });
      assert.deepEqual(sub.position, { offset: 4, epoch: "E" });
      ws.receive({ type: "message", channel: "notify.alice", data: 1, offset: 5, epoch: "E" });
      ws.receive({ type: "message", channel: "notify.alice", data: 2, offset: 6, epoch: "E" });
      assert.deepEqual(seen, [
        [5, 5],
        [6, 6],
      ]);
    });

    test("a throwing handler does not stop the position or other handlers", async () => {
      const h = setup(Herald);
      const sub = h.herald.subscribe("notify.alice");
      let second = 0;
      sub.on("message", () => {
        throw new Error("app bug");
      });
      sub.on("message", () => second++);
      const ws = await connected(h);
      ws.replySubscribe({ positions: { "notify.alice": { offset: 0, epoch: "E" } } });
      // The handler's exception is rethrown from a fresh task; catch that task.
      const tasks: (() => void)[] = [];
      const realSetTimeout = globalThis.setTimeout;
      globalThis.setTimeout = ((task: () => void) => tasks.push(task)) as unknown as typeof setTimeout;
      try {
        ws.receive({ type: "message", channel: "notify.alice", data: 1, offset: 1, epoch: "E" });
      } finally {
        globalThis.setTimeout = realSetTimeout;
      }
      assert.equal(second, 1);
      assert.deepEqual(sub.position, { offset: 1, epoch: "E" });
      assert.equal(tasks.length, 1);
      assert.throws(tasks[0], /app bug/);
    });

    test("messages are de-duplicated by offset within an epoch", async () => {
      const h = setup(Herald);
      const got: unknown[] = [];
      h.herald.subscribe("notify.alice", { onMessage: (data) => got.push(data) });
      const ws = await connected(h);
      ws.replySubscribe({ positions: { "notify.alice": { offset: 0, epoch: "E" } } });
      for (const [offset, epoch] of [
        [1, "E"],
        [2, "E"],
        [2, "E"],
        [1, "E"],
        [3, "E"],
        [5, "E"], // a hole (conflate, drop_oldest) is fine
        [4, "E"],
        [1, "F"], // a new epoch starts again from 1
        [1, "F"],
        [2, "F"],
      ] as const) {
        ws.receive({ type: "message", channel: "notify.alice", data: `${epoch}${offset}`, offset, epoch });
      }
      assert.deepEqual(got, ["E1", "E2", "E3", "E5", "F1", "F2"]);
    });

    test("channels without history deliver everything and have no position", async () => {
      const h = setup(Herald);
      const got: unknown[] = [];
      const sub = h.herald.subscribe("prices.AAPL", { onMessage: (data) => got.push(data) });
      const ws = await connected(h);
      ws.receive({ type: "message", channel: "prices.AAPL", data: { price: 1 } }); // before the reply
      ws.replySubscribe();
      ws.receive({ type: "message", channel: "prices.AAPL", data: { price: 1 } });
      assert.equal(got.length, 2);
      assert.equal(sub.position, null);
      assert.equal(sub.state, "subscribed");
    });

    test("a history channel subscribed before its first message recovers from that message", async () => {
      const h = setup(Herald);
      const notify = h.herald.subscribe("notify.alice");
      const recovered: unknown[] = [];
      notify.on("recovered", (ctx) => recovered.push([ctx.recovered, ctx.count]));
      const first = await connected(h);
      // What the server answers while the channel has no history yet.
      first.replySubscribe({ positions: { "notify.alice": { offset: 0, epoch: "" } } });
      assert.deepEqual(notify.position, { offset: 0, epoch: "" });
      first.serverClose(1001, "shutdown");
      await h.clock.advance(1000);
      const second = await connected(h);
      assert.deepEqual(second.last("subscribe").since, { "notify.alice": { offset: 0, epoch: "" } });
      second.replySubscribe({ positions: { "notify.alice": { offset: 2, epoch: "Kx", recovered: true } } });
      const got: number[] = [];
      notify.on("message", (_data, ctx) => got.push(ctx.offset!));
      for (const offset of [1, 2]) {
        second.receive({ type: "message", channel: "notify.alice", data: offset, offset, epoch: "Kx" });
      }
      assert.deepEqual(got, [1, 2]);
      assert.deepEqual(recovered, [[true, 2]]);
      assert.deepEqual(notify.position, { offset: 2, epoch: "Kx" });
    });

    test("resubscribes everything after a reconnect, with since for history channels", async () => {
      const h = setup(Herald);
      const notify = h.herald.subscribe("notify.alice");
      const prices = h.herald.subscribe("prices.AAPL");
      const events: string[] = [];
      notify.on("recovered", (ctx) => events.push(`notify recovered ${ctx.recovered} ${ctx.count}`));
      notify.on("gap", (ctx) => events.push(`notify gap ${ctx.reason}`));
      prices.on("gap", (ctx) => events.push(`prices gap ${ctx.reason}`));
      prices.on("subscribed", (ctx) => events.push(`prices subscribed ${ctx.resubscribed}`));
      const first = await connected(h);
      first.replySubscribe({ positions: { "notify.alice": { offset: 41, epoch: "Kx" } } });
      first.receive({ type: "message", channel: "notify.alice", data: "a", offset: 42, epoch: "Kx" });
      first.serverClose(1001, "shutdown");
      assert.equal(notify.state, "subscribing");
      await h.clock.advance(1000);
      const second = await connected(h);
      const request = second.last("subscribe");
      assert.deepEqual(request.channels, ["notify.alice", "prices.AAPL"]);
      assert.deepEqual(request.since, { "notify.alice": { offset: 42, epoch: "Kx" } });
      second.replySubscribe({
        positions: { "notify.alice": { offset: 45, epoch: "Kx", recovered: true } },
      });
      const got: number[] = [];
      notify.on("message", (_data, ctx) => got.push(ctx.offset!));
      for (const offset of [43, 44, 45]) {
        second.receive({ type: "message", channel: "notify.alice", data: offset, offset, epoch: "Kx" });
      }
      assert.deepEqual(got, [43, 44, 45]);
      assert.deepEqual(notify.position, { offset: 45, epoch: "Kx" });
      assert.deepEqual(events, ["prices subscribed false", "notify recovered true 3", "prices subscribed true", "prices gap reconnect"]);
    });

    test("a failed recovery reports recovered: false with its reason, a gap, and the new position", async () => {
      const h = setup(Herald);
      const sub = h.herald.subscribe("notify.alice", { since: { offset: 7, epoch: "old" } });
      const recovered: Frame[] = [];
      const gaps: string[] = [];
      sub.on("recovered", (ctx) => recovered.push(ctx as unknown as Frame));
      sub.on("gap", (ctx) => gaps.push(ctx.reason));
      const ws = await connected(h);
      assert.deepEqual(ws.last("subscribe").since, { "notify.alice": { offset: 7, epoch: "old" } });
      ws.replySubscribe({
        positions: { "notify.alice": { offset: 3, epoch: "new", recovered: false, reason: "epoch_changed" } },
      });
      assert.deepEqual(recovered, [
        { recovered: false, reason: "epoch_changed", count: 0, position: { offset: 3, epoch: "new" } },
      ]);
      assert.deepEqual(gaps, ["epoch_changed"]);
      assert.deepEqual(sub.position, { offset: 3, epoch: "new" });
    });

    test("sub.position can be set, and the next subscribe resumes from it", async () => {
      const h = setup(Herald);
      const sub = h.herald.subscribe("notify.alice");
      sub.position = { offset: 10, epoch: "E" };
      const ws = await connected(h);
      assert.deepEqual(ws.last("subscribe").since, { "notify.alice": { offset: 10, epoch: "E" } });
    });

    test("a gap frame reaches the subscriptions it names", async () => {
      const h = setup(Herald);
      const gaps: string[] = [];
      for (const channel of ["a", "b", "c.*"]) h.herald.subscribe(channel).on("gap", (ctx) => gaps.push(`${channel}:${ctx.reason}`));
      const ws = await connected(h);
      ws.replySubscribe();
      ws.receive({ type: "gap", channels: ["a", "c.*"] });
      assert.deepEqual(gaps, ["a:gap", "c.*:gap"]);
    });

    test("refused channels report an error and end; broker_unavailable is retried", async () => {
      const h = setup(Herald);
      const secret = h.herald.subscribe("secret");
      const busy = h.herald.subscribe("busy");
      const errors: string[] = [];
      secret.on("error", (error) => errors.push(`${error.channel}:${error.code}`));
      busy.on("error", (error) => errors.push(`${error.channel}:${error.code}`));
      const ws = await connected(h);
      ws.replySubscribe({
        errors: [
          { channel: "secret", code: "forbidden", message: "no" },
          { channel: "busy", code: "broker_unavailable", message: "later" },
        ],
      });
      assert.deepEqual(errors, ["secret:forbidden", "busy:broker_unavailable"]);
      assert.equal(secret.state, "unsubscribed");
      assert.equal(h.herald.getSubscription("secret"), undefined);
      assert.equal(busy.state, "subscribing");
      await h.clock.advance(4000);
      assert.deepEqual(ws.last("subscribe").channels, ["busy"]);
    });

    test("unsubscribe sends unsubscribe and stops delivery", async () => {
      const h = setup(Herald);
      let count = 0;
      const sub = h.herald.subscribe("news", { onMessage: () => count++ });
      const ws = await connected(h);
      ws.replySubscribe();
      sub.unsubscribe();
      assert.deepEqual(ws.last("unsubscribe").channels, ["news"]);
      ws.receive({ type: "message", channel: "news", data: 1 });
      assert.equal(count, 0);
      assert.equal(sub.state, "unsubscribed");
    });

    test("subscribing twice returns the same subscription", () => {
      const h = setup(Herald);
      assert.equal(h.herald.subscribe("news"), h.herald.subscribe("news"));
    });

    test("wildcard subscriptions deliver the concrete channel, and join/leave frames", async () => {
      const h = setup(Herald);
      const got: string[] = [];
      const sub = h.herald.subscribe("prices.*", { onMessage: (data, ctx) => got.push(`${ctx.channel}=${data.price}`) });
      const chat = h.herald.subscribe("chat.lobby");
      const presence: string[] = [];
      chat.on("join", (event) => presence.push(`+${event.user}@${event.channel}`));
      chat.on("leave", (event) => presence.push(`-${event.user}@${event.channel}`));
      const ws = await connected(h);
      ws.replySubscribe();
      ws.receive({ type: "message", channel: "prices.AAPL", data: { price: 1 } });
      ws.receive({ type: "message", channel: "prices.us.MSFT", data: { price: 2 } });
      ws.receive({ type: "message", channel: "pricesXAAPL", data: { price: 3 } });
      ws.receive({ type: "message", channel: "notify.x", data: { price: 4 }, offset: 1, epoch: "E" });
      ws.receive({ type: "join", channel: "chat.lobby", user: "bob" });
      ws.receive({ type: "leave", channel: "chat.lobby", user: "bob" });
      assert.deepEqual(got, ["prices.AAPL=1", "prices.us.MSFT=2"]);
      assert.deepEqual(presence, ["+bob@chat.lobby", "-bob@chat.lobby"]);
      assert.equal(sub.position, null, "wildcards keep no position");
    });

    test("the message context carries from and encoding", async () => {
      const h = setup(Herald);
      const contexts: Frame[] = [];
      h.herald.subscribe("chat.lobby", { onMessage: (_data, ctx) => contexts.push({ from: ctx.from, encoding: ctx.encoding }) });
      const ws = await connected(h);
      ws.receive({ type: "message", channel: "chat.lobby", data: { text: "hi" }, from: "bob" });
      ws.receive({ type: "message", channel: "chat.lobby", data: "/wAB", encoding: "base64" });
      assert.deepEqual(contexts, [
        { from: "bob", encoding: undefined },
        { from: undefined, encoding: "base64" },
      ]);
    });

    test("unknown frame types and fields are ignored", async () => {
      const h = setup(Herald);
      let count = 0;
      h.herald.subscribe("news", { onMessage: () => count++ });
      const ws = await connected(h);
      ws.receive({ type: "brand_new_frame", channel: "news" });
      ws.onmessage!({ data: "not json" });
      ws.receive({ type: "message", channel: "news", data: 1, shiny: true });
      assert.equal(count, 1);
      assert.equal(h.herald.state, "connected");
    });
  });

  describe(`${name}: requests`, () => {
    test("publish resolves on the reply", async () => {
      const h = setup(Herald);
      const ws = await connected(h);
      const done = h.herald.publish("chat.lobby", { text: "hi" });
      assert.deepEqual(ws.last("publish"), { op: "publish", channel: "chat.lobby", data: { text: "hi" }, id: 1 });
      ws.reply("publish");
      assert.equal(await done, undefined);
    });

    test("publish rejects with the error code, in either error form", async () => {
      const h = setup(Herald);
      const ws = await connected(h);
      const forbidden = h.herald.publish("chat.lobby", 1);
      ws.receive({ type: "reply", id: ws.last("publish").id, error: { code: "forbidden", message: "no grant" } });
      await assert.rejects(forbidden, (error: HeraldErrorClass) => error.code === "forbidden" && error.message === "no grant");
      const unknown = h.herald.publish("chat.lobby", 1);
      ws.receive({ type: "error", id: ws.last("publish").id, code: "unknown_op", message: "unknown op" });
      await assert.rejects(unknown, (error: HeraldErrorClass) => error.code === "unknown_op");
    });

    test("a request made while connecting waits for the connection", async () => {
      const h = setup(Herald);
      h.herald.connect();
      const done = h.herald.publish("counter.demo", { value: 1 });
      await settle();
      assert.equal(h.ws().ops("publish").length, 0);
      h.ws().welcome();
      h.ws().reply("publish");
      await done;
    });

    test("requests time out, fail on disconnect, and fail when stopped", async () => {
      const h = setup(Herald, { timeout: 3000 });
      const ws = await connected(h);
      const slow = assert.rejects(h.herald.publish("a", 1), (error: HeraldErrorClass) => error.code === "timeout");
      await h.clock.advance(3001);
      await slow;
      const cut = h.herald.publish("a", 1);
      ws.serverClose(1006);
      await assert.rejects(cut, (error: HeraldErrorClass) => error.code === "disconnected");
      h.herald.disconnect();
      await assert.rejects(h.herald.publish("a", 1), (error: HeraldErrorClass) => error.code === "disconnected");
    });

    test("presence and presenceCount resolve with the reply's fields", async () => {
      const h = setup(Herald);
      const ws = await connected(h);
      const presence = h.herald.presence("chat.lobby");
      assert.deepEqual(ws.last("presence"), { op: "presence", channel: "chat.lobby", id: 1 });
      ws.reply("presence", { presence: [{ user: "alice", connections: 2 }] });
      assert.deepEqual(await presence, { presence: [{ user: "alice", connections: 2 }] });
      const count = h.herald.presenceCount("chat.lobby");
      assert.deepEqual(ws.last("presence_count"), { op: "presence_count", channel: "chat.lobby", id: 2 });
      ws.reply("presence_count", { users: 1, connections: 2 });
      assert.deepEqual(await count, { users: 1, connections: 2 });
    });

    test("an error frame without a request is reported on the client", async () => {
      const h = setup(Herald);
      const ws = await connected(h);
      ws.receive({ type: "error", code: "invalid_json", message: "bad" });
      const error = h.events.find(([event]) => event === "error")?.[1] as HeraldErrorClass;
      assert.equal(error.code, "invalid_json");
    });
  });

  describe(`${name}: token refresh`, () => {
    test("refreshes in-band before expiry, without reconnecting", async () => {
      let issued = 0;
      const clockStart = 1_700_000_000; // FakeClock's start, in seconds
      const h = setup(Herald, {
        token: undefined,
        getToken: () => {
          const iat = clockStart + issued++ * 48;
          return makeToken({ sub: "alice", iat, exp: iat + 60 });
        },
      });
      const ws = await connected(h, { expires_at: clockStart + 65 });
      await h.clock.advance(47_000);
      assert.equal(ws.ops("refresh").length, 0);
      await h.clock.advance(2000);
      const refresh = ws.last("refresh");
      assert.equal(issued, 2);
      assert.match(refresh.token, /^ey/);
      ws.reply("refresh", { revoked: [], expires_at: clockStart + 48 + 65 });
      await h.clock.advance(48_000);
      assert.equal(ws.ops("refresh").length, 2, "the next refresh follows the new token");
      assert.equal(h.sockets.length, 1);
      assert.ok(!h.events.some(([event]) => event === "disconnected"));
    });

    test("uses the welcome's expires_at for opaque tokens", async () => {
      const h = setup(Herald, { token: undefined, getToken: () => "opaque" });
      const ws = await connected(h, { expires_at: Math.floor(h.clock.now / 1000) + 100 });
      await h.clock.advance(79_000);
      assert.equal(ws.ops("refresh").length, 0);
      await h.clock.advance(2000);
      assert.equal(ws.ops("refresh").length, 1);
    });

    test("a refused refresh is reported and retried; revoked channels end", async () => {
      const h = setup(Herald, {
        token: undefined,
        getToken: () => makeToken({ sub: "alice", iat: 0, exp: 60 }),
      });
      const sub = h.herald.subscribe("prices.AAPL");
      const subErrors: string[] = [];
      sub.on("error", (error) => subErrors.push(error.code));
      const ws = await connected(h);
      ws.replySubscribe();
      await h.clock.advance(48_000);
      ws.receive({ type: "reply", id: ws.last("refresh").id, error: { code: "invalid_token", message: "(bad_signature)" } });
      await settle();
      const error = h.events.find(([event]) => event === "error")?.[1] as HeraldErrorClass;
      assert.equal(error.code, "invalid_token");
      await h.clock.advance(8000);
      assert.equal(ws.ops("refresh").length, 2, "retried");
      ws.reply("refresh", { revoked: ["prices.AAPL"], expires_at: 1 });
      await settle();
      assert.deepEqual(subErrors, ["revoked"]);
      assert.equal(sub.state, "unsubscribed");
    });

    test("no refresh without getToken", async () => {
      const h = setup(Herald, { token: makeToken({ sub: "alice", iat: 0, exp: 60 }) });
      const ws = await connected(h);
      await h.clock.advance(120_000);
      assert.equal(ws.ops("refresh").length, 0);
    });
  });

  describe(`${name}: liveness`, () => {
    test("pings after ping interval + margin of silence, and keeps a connection that answers", async () => {
      const h = setup(Herald);
      const ws = await connected(h, { ping_interval_ms: 20_000 });
      ws.autoPong = false;
      await h.clock.advance(24_000);
      assert.equal(ws.ops("ping").length, 0);
      await h.clock.advance(2000);
      assert.deepEqual(ws.ops("ping"), [{ op: "ping" }]);
      ws.receive({ type: "pong" });
      await h.clock.advance(20_000);
      assert.equal(h.sockets.length, 1);
      assert.equal(h.herald.state, "connected");
    });

    test("any frame counts as a sign of life", async () => {
      const h = setup(Herald);
      const ws = await connected(h);
      for (let i = 0; i < 10; i++) {
        await h.clock.advance(20_000);
        ws.receive({ type: "message", channel: "nobody", data: i });
      }
      assert.equal(ws.ops("ping").length, 0);
    });

    test("reconnects when no pong arrives within pongTimeout", async () => {
      const h = setup(Herald, { pongTimeout: 4000 });
      const ws = await connected(h);
      ws.autoPong = false;
      await h.clock.advance(31_000);
      assert.equal(ws.ops("ping").length, 1);
      await h.clock.advance(3000);
      assert.ok(!ws.closedByClient, "not before pongTimeout");
      await h.clock.advance(2000);
      assert.ok(ws.closedByClient, "the dead socket is closed");
      const disconnected = h.events.find(([event]) => event === "disconnected")?.[1] as Frame;
      assert.deepEqual(disconnected, { code: 1006, reason: "no_pong", reconnect: true });
      await h.clock.advance(1000);
      assert.equal(h.sockets.length, 2);
    });

    test("a frozen or throttled page never causes a false disconnect", async () => {
      const h = setup(Herald, { pongTimeout: 4000 });
      const ws = await connected(h);
      ws.autoPong = false;
      await h.clock.advance(31_000);
      assert.equal(ws.ops("ping").length, 1);
      // The tab is frozen for five minutes right after the ping; the pong is
      // queued behind the first late timer.
      h.clock.jump(300_000);
      await h.clock.advance(0);
      assert.equal(ws.ops("ping").length, 2, "a late tick sends a fresh ping instead of giving up");
      ws.receive({ type: "pong" });
      await h.clock.advance(10_000);
      assert.equal(h.sockets.length, 1);
      assert.ok(!ws.closedByClient);
      // Throttled to one tick a minute while idle: still no false disconnect.
      for (let i = 0; i < 5; i++) {
        h.clock.jump(60_000);
        await h.clock.advance(0);
      }
      assert.equal(h.sockets.length, 1);
      assert.ok(!ws.closedByClient);
    });

    test("becoming visible, online or shown checks liveness at once", async () => {
      const h = setup(Herald, { pongTimeout: 4000 });
      const ws = await connected(h);
      ws.autoPong = false;
      await h.clock.advance(5000);
      h.page.document.visibilityState = "hidden";
      h.page.fire("visibilitychange");
      assert.equal(ws.ops("ping").length, 0, "hiding does not ping");
      h.page.document.visibilityState = "visible";
      h.page.fire("visibilitychange");
      assert.equal(ws.ops("ping").length, 1);
      await h.clock.advance(5001);
      assert.ok(ws.closedByClient, "no answer: reconnect");
    });

    test("online or pageshow while waiting to reconnect reconnects at once", async () => {
      const h = setup(Herald, { random: () => 0.999, timeout: 60_000 });
      await connected(h);
      for (let i = 0; i < 5; i++) {
        h.ws().serverClose(1006);
        await h.clock.advance(20_000);
      }
      h.ws().serverClose(1006);
      const before = h.sockets.length;
      h.page.fire("online");
      await settle();
      assert.equal(h.sockets.length, before + 1);
      h.ws().serverClose(1006);
      h.page.fire("pageshow");
      await settle();
      assert.equal(h.sockets.length, before + 2);
      h.ws().serverClose(1006);
      h.page.document.visibilityState = "hidden";
      h.page.fire("visibilitychange");
      await settle();
      assert.equal(h.sockets.length, before + 2, "hiding the tab does not hurry a reconnect");
      h.page.document.visibilityState = "visible";
      h.page.fire("visibilitychange");
      await settle();
      assert.equal(h.sockets.length, before + 3);
    });

    test("page listeners are removed on disconnect", async () => {
      const h = setup(Herald);
      await connected(h);
      h.herald.disconnect();
      h.page.fire("online");
      await settle();
      assert.equal(h.sockets.length, 1);
    });

    test("works without a page (node, workers)", async () => {
      const h = setup(Herald, { window: null });
      const ws = await connected(h);
      assert.equal(h.herald.state, "connected");
      ws.serverClose(1006);
      await h.clock.advance(1000);
      assert.equal(h.sockets.length, 2);
    });
  });
}
