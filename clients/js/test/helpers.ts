// Test doubles: a manual clock with timers, a scriptable fake WebSocket, a
// fake page, and a `setup` that wires them into a client. No server is
// needed; each test plays the server's part through `FakeSocket`.

import type { Herald as HeraldClass, HeraldOptions } from "../src/herald.js";

/** A clock whose time moves only when a test says so. */
export class FakeClock {
  now = 1_700_000_000_000;
  private timers: { at: number; seq: number; callback: () => void }[] = [];
  private seq = 0;

  setTimeout = (callback: () => void, ms: number): unknown => {
    const seq = ++this.seq;
    this.timers.push({ at: this.now + Math.max(0, ms), seq, callback });
    return seq;
  };

  clearTimeout = (handle: unknown): void => {
    this.timers = this.timers.filter((timer) => timer.seq !== handle);
  };

  /** Moves time forward by `ms`, running every timer that falls due, in order. */
  async advance(ms: number): Promise<void> {
    const end = this.now + ms;
    for (;;) {
      await settle();
      const due = this.timers
        .filter((timer) => timer.at <= end)
        .sort((a, b) => a.at - b.at || a.seq - b.seq)[0];
      if (!due) break;
      this.timers = this.timers.filter((timer) => timer !== due);
      this.now = Math.max(this.now, due.at);
      due.callback();
    }
    this.now = end;
    await settle();
  }

  /**
   * Moves the wall clock without running timers, as when a page is frozen or
   * a hidden tab's timers are throttled: the timers that fell due meanwhile
   * run late, at the next `advance`.
   */
  jump(ms: number): void {
    this.now += ms;
  }

  /** The delays (from now) of the pending timers, sorted. */
  pending(): number[] {
    return this.timers.map((timer) => timer.at - this.now).sort((a, b) => a - b);
  }
}

/** Lets pending promise callbacks and microtasks run. */
export async function settle(): Promise<void> {
  for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve));
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type Frame = Record<string, any>;

/** One fake WebSocket. The test plays the server through its methods. */
export class FakeSocket {
  onmessage: ((event: { data: string }) => void) | null = null;
  onclose: ((event: { code: number; reason: string }) => void) | null = null;
  sent: Frame[] = [];
  closedByClient: { code?: number } | null = null;
  /** Answer every `ping` with a `pong`, as a live server does. */
  autoPong = true;

  constructor(
    readonly url: string,
    readonly protocols: string[],
  ) {}

  send(data: string): void {
    if (this.closedByClient) throw new Error("send after close");
    const frame = JSON.parse(data);
    this.sent.push(frame);
    if (frame.op === "ping" && this.autoPong) queueMicrotask(() => this.receive({ type: "pong" }));
  }

  close(code?: number): void {
    this.closedByClient = { code };
  }

  /** Delivers one server frame to the client. */
  receive(frame: Frame): void {
    this.onmessage!({ data: JSON.stringify(frame) });
  }

  welcome(extra: Frame = {}): void {
    this.receive({
      type: "welcome",
      connection_id: 1,
      node_id: "herald-0",
      user: "alice",
      protocol: "herald.v1",
      ping_interval_ms: 25000,
      ...extra,
    });
  }

  /** The server closes the connection with `code`. */
  serverClose(code: number, reason = ""): void {
    this.onclose!({ code, reason });
  }

  /** The requests the client sent with this `op`. */
  ops(op: string): Frame[] {
    return this.sent.filter((frame) => frame.op === op);
  }

  last(op: string): Frame {
    const frames = this.ops(op);
    if (!frames.length) throw new Error(`no ${op} was sent; sent: ${JSON.stringify(this.sent)}`);
    return frames[frames.length - 1];
  }

  /** Answers the last request with this `op` with a reply carrying `fields`. */
  reply(op: string, fields: Frame = {}): void {
    this.receive({ type: "reply", id: this.last(op).id, ...fields });
  }

  /** Answers the last `subscribe`: every channel succeeds unless listed in `errors`. */
  replySubscribe(fields: Frame = {}): void {
    const request = this.last("subscribe");
    const refused = new Set((fields.errors || []).map((error: Frame) => error.channel));
    this.receive({
      type: "reply",
      id: request.id,
      channels: request.channels.filter((channel: string) => !refused.has(channel)),
      errors: [],
      ...fields,
    });
  }
}

/** A page for the `window` option: an EventTarget with a `document.visibilityState`. */
export class FakePage extends EventTarget {
  document = { visibilityState: "visible" };

  fire(type: string): void {
    this.dispatchEvent(new Event(type));
  }
}

/** Builds a JWT-shaped token (unsigned; the client never verifies). */
export function makeToken(claims: Frame): string {
  const encode = (value: Frame) => Buffer.from(JSON.stringify(value)).toString("base64url");
  return `${encode({ alg: "HS256", typ: "JWT" })}.${encode(claims)}.c2lnbmF0dXJl`;
}

export interface Harness {
  herald: HeraldClass;
  clock: FakeClock;
  page: FakePage;
  sockets: FakeSocket[];
  /** The newest socket. */
  ws(): FakeSocket;
  /** Events recorded from the client, as `[name, argument]`. */
  events: [string, unknown][];
}

/**
 * A client wired to fakes, not yet connected. `Herald` may be any build of
 * the class (the compiled source or the minified bundle).
 */
export function setup(Herald: typeof HeraldClass, options: HeraldOptions = {}): Harness {
  const clock = new FakeClock();
  const page = new FakePage();
  const sockets: FakeSocket[] = [];
  const herald = new Herald("ws://herald.test/ws", {
    autoConnect: false,
    WebSocket: class extends FakeSocket {
      constructor(url: string, protocols: string[]) {
        super(url, protocols);
        sockets.push(this);
      }
    },
    now: () => clock.now,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    random: () => 0.5,
    window: page,
    token: "static-token",
    ...options,
  });
  const events: [string, unknown][] = [];
  for (const name of ["state", "connected", "disconnected", "error"] as const) {
    herald.on(name, (argument: unknown) => events.push([name, argument]));
  }
  return {
    herald,
    clock,
    page,
    sockets,
    events,
    ws() {
      if (!sockets.length) throw new Error("no socket was opened");
      return sockets[sockets.length - 1];
    },
  };
}

/** Connects and completes the welcome; returns the socket. */
export async function connected(harness: Harness, welcome: Frame = {}): Promise<FakeSocket> {
  if (harness.herald.state === "disconnected") harness.herald.connect();
  await settle();
  const ws = harness.ws();
  ws.welcome(welcome);
  await settle();
  return ws;
}
