import { backoff } from "./backoff.js";
import { CLOSE_CODES, closeAction } from "./closecodes.js";
import { Emitter } from "./emitter.js";
import { HeraldError, UnauthorizedError } from "./errors.js";
import { Position, Subscription, SubscriptionOptions } from "./subscription.js";
import { refreshTime, tokenDeadline } from "./token.js";

export { backoff } from "./backoff.js";
export { CLOSE_CODES, closeAction } from "./closecodes.js";
export type { CloseAction } from "./closecodes.js";
export { Emitter } from "./emitter.js";
export { HeraldError, UnauthorizedError } from "./errors.js";
export { Subscription } from "./subscription.js";
export type {
  GapContext,
  MessageContext,
  Position,
  PresenceEvent,
  RecoveredContext,
  SubscribedContext,
  SubscriptionEvents,
  SubscriptionOptions,
  SubscriptionState,
} from "./subscription.js";

/** The client's connection state. */
export type State = "connecting" | "connected" | "disconnected";

/** The part of the browser's `WebSocket` that the client uses. */
export interface WebSocketLike {
  /** 1 when open. Frames are only sent then, so a closing socket is left alone. */
  readonly readyState?: number;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  onmessage: ((event: { data: any }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketConstructor = new (url: string, protocols: string[]) => WebSocketLike;

/** The part of `window` that the client listens to for page-life events. */
export interface PageLike {
  addEventListener(type: string, listener: (event: { type: string }) => void): void;
  removeEventListener(type: string, listener: (event: { type: string }) => void): void;
  document?: { visibilityState?: string };
}

export interface HeraldOptions {
  /**
   * Returns a token (a JWT) for the connection. Called before the first
   * connect, before the token expires (to `refresh` it in-band), and after
   * a connection attempt failed. Concurrent needs share one call. Throw
   * `UnauthorizedError` to stop the client.
   */
  getToken?: () => string | Promise<string>;
  /** A token to use first (or the only token, without `getToken`). */
  token?: string;
  /** The smallest reconnect delay, in ms. Default 500. */
  minReconnectDelay?: number;
  /** The largest reconnect delay, in ms. Default 20000. */
  maxReconnectDelay?: number;
  /** The server's ping interval in ms, until the `welcome` frame says. Default 25000. */
  pingInterval?: number;
  /** After ping interval + this margin (ms) without a frame, send a `ping`. Default 5000. */
  pingMargin?: number;
  /** Reconnect when nothing arrives within this many ms after a `ping`. Default 10000. */
  pongTimeout?: number;
  /** The time limit for a request's reply and for a connection's `welcome`, in ms. Default 10000. */
  timeout?: number;
  /** Connect on creation (in a microtask). Default true; otherwise call `connect()`. */
  autoConnect?: boolean;
  /** The WebSocket constructor. Default `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /** The wall clock in ms. Default `Date.now`. */
  now?: () => number;
  setTimeout?: (callback: () => void, ms: number) => unknown;
  clearTimeout?: (handle: unknown) => void;
  /** A random number in [0, 1) for jitter. Default `Math.random`. */
  random?: () => number;
  /** Where `online`, `offline`, `visibilitychange` and `pageshow` are heard. Default `window`, if any. */
  window?: PageLike | null;
}

export interface ConnectedContext {
  /** The token's `sub`. */
  user: string;
  /** The node's id, useful in bug reports. */
  node: string;
  connectionId: number;
  /** False for the client's first connection, true afterwards. */
  reconnected: boolean;
}

export interface DisconnectedContext {
  /** The close code, 1006 when the connection was lost or abandoned. */
  code: number;
  reason: string;
  /** Whether the client will reconnect by itself. */
  reconnect: boolean;
}

export type HeraldEvents = {
  state: [state: State];
  connected: [ctx: ConnectedContext];
  disconnected: [ctx: DisconnectedContext];
  error: [error: HeraldError];
};

export interface PresenceUser {
  user: string;
  connections: number;
}

/** The reply to `presence`: the reply frame without `type` and `id`. */
export interface PresenceResult {
  presence: PresenceUser[];
  [field: string]: unknown;
}

/** The reply to `presence_count`: the reply frame without `type` and `id`. */
export interface PresenceCountResult {
  users: number;
  connections: number;
  [field: string]: unknown;
}

/** A request waiting for its reply (and, before it is sent, for a connection). */
interface PendingRequest {
  frame: Record<string, unknown>;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  resolve: (reply: any) => void;
  reject: (error: HeraldError) => void;
  timer: unknown;
  sent: boolean;
}

/** How often, in ms, a connected client checks liveness and token expiry. */
const TICK = 1000;
const PAGE_EVENTS = ["online", "offline", "visibilitychange", "pageshow"];

/**
 * A herald client: one WebSocket, reconnected with jittered backoff, that
 * carries any number of subscriptions.
 *
 * ```ts
 * const herald = new Herald("wss://push.example.com/ws", { getToken: () => fetchToken() });
 * herald.subscribe("prices.AAPL", { onMessage: (data, ctx) => render(data) });
 * ```
 */
export class Herald extends Emitter<HeraldEvents> {
  readonly url: string;
  state: State = "disconnected";
  /** The token's `sub`, from the last `welcome`. */
  user?: string;
  private _options: Required<Omit<HeraldOptions, "getToken" | "token">> & HeraldOptions;
  private _ws: WebSocketLike | null = null;
  /** Bumped whenever a socket is abandoned, so its late events are ignored. */
  private _generation = 0;
  /** Counts `welcome` frames: the number of the current (or last) connection. */
  private _connection = 0;
  private _welcomed = false;
  /** Set by `disconnect()`, so that auto-connect does not undo it. */
  private _off = false;
  private _attempt = 0;
  private _retryTimer: unknown = null;
  private _token?: string;
  /** When the token stops being valid, on the local clock; 0 when unknown. */
  private _tokenDeadline = 0;
  private _tokenPromise: Promise<string | undefined> | null = null;
  /** When to refresh the token in-band; 0 for never. */
  private _refreshAt = 0;
  private _interval = 0;
  private _lastReceived = 0;
  private _lastTick = 0;
  /** When the outstanding `ping` was sent; 0 when none is. */
  private _pingAt = 0;
  private _nextId = 0;
  private _requests = new Map<number, PendingRequest>();
  private _subs = new Map<string, Subscription>();
  /** Subscriptions to send in the next `subscribe` request. */
  private _pendingSubs = new Set<Subscription>();
  private _flushQueued = false;

  constructor(url: string, options: HeraldOptions = {}) {
    super();
    this.url = url;
    const defaults = {
      minReconnectDelay: 500,
      maxReconnectDelay: 20000,
      pingInterval: 25000,
      pingMargin: 5000,
      pongTimeout: 10000,
      timeout: 10000,
      autoConnect: true,
      WebSocket: (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket!,
      now: Date.now,
      setTimeout: (callback: () => void, ms: number): unknown => setTimeout(callback, ms),
      clearTimeout: (handle: unknown) => clearTimeout(handle as number),
      random: Math.random,
      window: typeof window != "undefined" ? (window as unknown as PageLike) : null,
    };
    for (const key in options) {
      const value = options[key as keyof HeraldOptions];
      // eslint-disable-next-line @typescript-eslint/no-explicit-any
      if (value !== undefined) (defaults as any)[key] = value;
    }
    this._options = defaults;
    if (options.token) this._setToken(options.token);
    if (defaults.autoConnect) queueMicrotask(() => this._off || this.connect());
  }

  /** Starts connecting, unless already connecting or connected. */
  connect(): void {
    this._off = false;
    if (this.state != "disconnected") return;
    this._attempt = 0;
    this._setState("connecting");
    this._listen(true);
    this._open();
  }

  /** Closes the connection and stops reconnecting. Subscriptions are kept for the next `connect()`. */
  disconnect(): void {
    this._off = true;
    if (this.state != "disconnected") this._stop();
  }

  /**
   * Subscribes to a channel, or to a wildcard pattern such as `prices.*`.
   * Returns the existing subscription if there is one (adding `onMessage`).
   */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  subscribe<T = any>(channel: string, options: SubscriptionOptions<T> = {}): Subscription<T> {
    let sub = this._subs.get(channel);
    if (!sub) {
      this._subs.set(channel, (sub = new Subscription(this, channel, options.since)));
      this._queueSubscribe(sub);
    }
    if (options.onMessage) sub.on("message", options.onMessage);
    return sub;
  }

  /** The subscription to `channel`, if any. */
  getSubscription(channel: string): Subscription | undefined {
    return this._subs.get(channel);
  }

  /**
   * Publishes `data` (any JSON value) on a channel the token grants
   * publishing on. Resolves when the server accepted it; rejects with a
   * `HeraldError` whose code is `forbidden`, `invalid_channel`, `too_large`,
   * `rate_limited`, `broker_unavailable`, `timeout` or `disconnected`.
   * While the client is connecting, the request waits (up to `timeout`).
   */
  publish(channel: string, data: unknown): Promise<void> {
    return this._request({ op: "publish", channel, data }).then(() => undefined);
  }

  /** The users subscribed to a presence channel, with their connection counts. */
  presence(channel: string): Promise<PresenceResult> {
    return this._request({ op: "presence", channel }).then(withoutEnvelope);
  }

  /** The number of users and connections subscribed to a presence channel. */
  presenceCount(channel: string): Promise<PresenceCountResult> {
    return this._request({ op: "presence_count", channel }).then(withoutEnvelope);
  }

  /** @internal Called by `Subscription.unsubscribe`. */
  _unsubscribe(sub: Subscription): void {
    if (this._subs.get(sub.channel) != sub) return;
    if (this._welcomed) this._request({ op: "unsubscribe", channels: [sub.channel] }).catch(ignore);
    this._finish(sub);
  }

  /** @internal Puts a subscription into the next `subscribe` request. */
  _queueSubscribe(sub: Subscription): void {
    this._pendingSubs.add(sub);
    if (this._welcomed && !this._flushQueued) {
      this._flushQueued = true;
      queueMicrotask(() => this._flushSubscribes());
    }
  }

  private _setState(state: State): void {
    if (state != this.state) {
      this.state = state;
      this._emit("state", state);
    }
  }

  private _listen(on: boolean): void {
    const page = this._options.window;
    if (page) for (const type of PAGE_EVENTS) page[on ? "addEventListener" : "removeEventListener"](type, this._wake);
  }

  /**
   * A page-life event: the network came back, the tab became visible, or the
   * page was restored. Reconnect at once if waiting to, or check liveness now.
   */
  private _wake = (event: { type: string }): void => {
    const page = this._options.window;
    if (event.type == "visibilitychange" && page && page.document && page.document.visibilityState == "hidden") return;
    if (this._retryTimer) {
      this._options.clearTimeout(this._retryTimer);
      this._open();
    } else if (this._welcomed && !this._pingAt) {
      this._ping(this._options.now());
    }
  };

  private _setToken(token: string): void {
    this._token = token;
    this._tokenDeadline = tokenDeadline(token, this._options.now());
  }

  /** The token to connect or refresh with: the cached one while valid, else a fresh one. */
  private _getToken(fresh: boolean): Promise<string | undefined> {
    const { getToken, now } = this._options;
    const token = this._token;
    if (!getToken || (!fresh && token && (!this._tokenDeadline || now() < this._tokenDeadline - 2000))) {
      return Promise.resolve(token);
    }
    return (this._tokenPromise ||= Promise.resolve()
      .then(getToken)
      .then(
        (token) => {
          this._setToken(token);
          return token;
        },
        (error) => {
          throw isUnauthorized(error) ? error : asHeraldError(error, "token");
        },
      )
      .finally(() => {
        this._tokenPromise = null;
      }));
  }

  private async _open(): Promise<void> {
    const generation = ++this._generation;
    const options = this._options;
    this._retryTimer = null;
    options.setTimeout(() => {
      if (generation == this._generation && !this._welcomed) this._abandon("timeout");
    }, options.timeout);
    let ws: WebSocketLike;
    try {
      const token = await this._getToken(false);
      if (generation != this._generation) return;
      ws = this._ws = new options.WebSocket(this.url, token ? ["herald.v1", "herald.auth." + token] : ["herald.v1"]);
    } catch (error) {
      if (generation != this._generation) return;
      if (isUnauthorized(error)) return this._stop(error as HeraldError);
      this._emit("error", asHeraldError(error, "connect"));
      return this._retry();
    }
    ws.onmessage = (event) => generation == this._generation && this._receive(event.data);
    ws.onclose = (event) => generation == this._generation && this._closed(event.code, event.reason);
  }

  /** Gives up on the current socket (no welcome, or no pong) and reconnects. */
  private _abandon(reason: string): void {
    const ws = this._ws;
    this._generation++;
    try {
      if (ws) ws.close();
    } catch {
      // Already closed.
    }
    this._closed(1006, reason);
  }

  /** Ends the current attempt (its late events and timers are ignored) and schedules the next. */
  private _retry(): void {
    const options = this._options;
    this._generation++;
    this._setState("connecting");
    this._retryTimer = options.setTimeout(
      () => this._open(),
      backoff(this._attempt++, options.minReconnectDelay, options.maxReconnectDelay, options.random),
    );
  }

  private _closed(code: number, reason: string): void {
    const welcomed = this._welcomed;
    this._ws = null;
    this._welcomed = false;
    this._pingAt = this._refreshAt = 0;
    this._pendingSubs.clear();
    this._requests.forEach((request, id) => {
      if (request.sent) this._settle(id, request, new HeraldError("disconnected", "the connection closed"));
    });
    this._subs.forEach((sub) => (sub.state = "subscribing"));
    const action = closeAction(code);
    this._emit("disconnected", { code, reason, reconnect: action != "stop" });
    if (this.state == "disconnected") return; // A handler called disconnect().
    if (action == "stop") {
      return this._stop(new HeraldError(CLOSE_CODES[code][0], `the server closed the connection: ${code} ${reason}`));
    }
    // A refused handshake looks like any lost connection to a browser, and
    // the token is the likeliest cause: the next attempt gets a fresh one.
    if ((action == "token" || !welcomed) && this._options.getToken) this._token = undefined;
    if (action == "backoff") this._attempt = Math.max(this._attempt, 3);
    this._retry();
  }

  private _stop(error?: HeraldError): void {
    const ws = this._ws;
    this._generation++;
    this._ws = null;
    this._welcomed = false;
    this._options.clearTimeout(this._retryTimer);
    this._retryTimer = null;
    try {
      if (ws) ws.close(1000);
    } catch {
      // Already closed.
    }
    this._requests.forEach((request, id) => this._settle(id, request, new HeraldError("disconnected", "disconnected")));
    this._listen(false);
    this._setState("disconnected");
    if (error) this._emit("error", error);
  }

  private _receive(text: unknown): void {
    this._lastReceived = this._options.now();
    this._pingAt = 0;
    // eslint-disable-next-line @typescript-eslint/no-explicit-any
    let frame: any;
    try {
      frame = JSON.parse(text as string);
    } catch {
      return;
    }
    switch (frame && frame.type) {
      case "welcome":
        return this._welcome(frame);
      case "message":
      case "join":
      case "leave":
      case "gap":
        return this._route(frame);
      case "reply":
      case "pong":
      case "error": {
        const request = frame.id != null && this._requests.get(frame.id);
        if (request) {
          const error = frame.type == "error" ? frame : frame.error;
          this._settle(frame.id, request, error && new HeraldError(error.code, error.message), frame);
        } else if (frame.type == "error") {
          this._emit("error", new HeraldError(frame.code, frame.message));
        }
      }
    }
  }

  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  private _welcome(frame: any): void {
    const options = this._options;
    const now = options.now();
    const connection = ++this._connection;
    this._welcomed = true;
    this._attempt = 0;
    this.user = frame.user;
    this._interval = frame.ping_interval_ms || options.pingInterval;
    this._lastTick = now;
    this._scheduleRefresh(frame.expires_at, now);
    options.setTimeout(() => this._tick(connection), TICK);
    this._subs.forEach((sub) => this._pendingSubs.add(sub));
    this._flushSubscribes();
    this._requests.forEach((request) => {
      if (!request.sent) this._transmit(request);
    });
    this._setState("connected");
    this._emit("connected", {
      user: frame.user,
      node: frame.node_id,
      connectionId: frame.connection_id,
      reconnected: connection > 1,
    });
  }

  /** Schedules the next in-band refresh from the token's `exp`, else from the server's `expires_at`. */
  private _scheduleRefresh(expiresAt: unknown, now: number): void {
    if (!this._tokenDeadline && typeof expiresAt == "number") this._tokenDeadline = expiresAt * 1000;
    this._refreshAt = this._options.getToken && this._tokenDeadline ? refreshTime(this._tokenDeadline, now) : 0;
  }

  /**
   * Runs every second while connected. Only wall-clock differences decide:
   * a tick that comes late (a hidden tab's throttled timers, a frozen page,
   * a sleeping laptop) never counts as a missing pong; it sends a new ping.
   */
  private _tick(connection: number): void {
    if (connection != this._connection || !this._welcomed) return;
    const options = this._options;
    const now = options.now();
    const late = now - this._lastTick > 3 * TICK;
    this._lastTick = now;
    options.setTimeout(() => this._tick(connection), TICK);
    if (this._refreshAt && now >= this._refreshAt) {
      this._refreshAt = 0;
      this._refresh(connection);
    }
    if (!this._pingAt) {
      if (now - this._lastReceived > this._interval + options.pingMargin) this._ping(now);
    } else if (late) {
      this._ping(now);
    } else if (now - this._pingAt > options.pongTimeout) {
      this._abandon("no_pong");
    }
  }

  /** Sends an application-level ping; any frame that arrives afterwards proves liveness. */
  private _ping(now: number): void {
    this._pingAt = now;
    this._send({ op: "ping" });
  }

  private async _refresh(connection: number): Promise<void> {
    const options = this._options;
    try {
      const token = await this._getToken(true);
      if (connection != this._connection || !this._welcomed) return;
      const reply = await this._request({ op: "refresh", token });
      this._scheduleRefresh(reply.expires_at, options.now());
      for (const channel of reply.revoked || []) {
        const sub = this._subs.get(channel);
        if (sub) this._refused(sub, "revoked", "the new token does not grant this channel");
      }
    } catch (error) {
      if (isUnauthorized(error)) return this._stop(error as HeraldError);
      this._emit("error", error as HeraldError);
      if (connection == this._connection && this._welcomed) {
        this._refreshAt =
          options.now() + backoff(3, options.minReconnectDelay, options.maxReconnectDelay, options.random);
      }
    }
  }

  /** Sends every queued subscription in one `subscribe` request, with `since` positions. */
  private _flushSubscribes(): void {
    this._flushQueued = false;
    const subs = [...this._pendingSubs];
    this._pendingSubs.clear();
    if (!this._welcomed || !subs.length) return;
    const connection = this._connection;
    const since: { [channel: string]: Position } = {};
    const frame: Record<string, unknown> = { op: "subscribe", channels: subs.map((sub) => sub.channel) };
    const resuming = subs.filter((sub) => sub.position && !sub._pattern);
    for (const sub of resuming) since[sub.channel] = sub.position!;
    if (resuming.length) frame.since = since;
    this._call(
      frame,
      (reply) => {
        const errors: { [channel: string]: { code: string; message: string } } = {};
        for (const error of reply.errors || []) errors[error.channel] = error;
        for (const sub of subs) {
          const error = errors[sub.channel];
          if (this._subs.get(sub.channel) != sub) continue;
          if (error) this._refused(sub, error.code, error.message);
          else if ((reply.channels || []).includes(sub.channel)) {
            sub._confirmed((reply.positions || {})[sub.channel], since[sub.channel], connection);
          }
        }
      },
      (error: HeraldError) => {
        if (error.code != "disconnected") for (const sub of subs) sub._emit("error", error);
      },
    );
  }

  /** The server refused a subscription: retry later if it may pass then, else end it. */
  private _refused(sub: Subscription, code: string, message: string): void {
    const options = this._options;
    if (code == "broker_unavailable") {
      options.setTimeout(
        () => this._subs.get(sub.channel) == sub && this._queueSubscribe(sub),
        backoff(2, options.minReconnectDelay, options.maxReconnectDelay, options.random),
      );
    }
    sub._emit("error", new HeraldError(code, message, sub.channel));
    if (code != "broker_unavailable") this._finish(sub);
  }

  private _finish(sub: Subscription): void {
    this._subs.delete(sub.channel);
    this._pendingSubs.delete(sub);
    sub.state = "unsubscribed";
    sub._emit("unsubscribed");
  }

  /** Routes a `message`, `join`, `leave` or `gap` frame to the subscriptions it concerns. */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  private _route(frame: any): void {
    const type = frame.type;
    for (const sub of [...this._subs.values()]) {
      if (type == "gap") {
        if ((frame.channels || []).some((channel: string) => sub._matches(channel))) sub._emit("gap", { reason: "gap" });
      } else if (sub._matches(frame.channel)) {
        if (type == "message") sub._message(frame);
        else sub._emit(type, { channel: frame.channel, user: frame.user });
      }
    }
  }

  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  private _request(frame: Record<string, unknown>): Promise<any> {
    return new Promise((resolve, reject) => this._call(frame, resolve, reject));
  }

  /**
   * Sends a request now, or when connected, and calls back with its reply or
   * error. The callbacks run synchronously with the frame that settles them,
   * so a subscribe reply is applied before the messages that follow it.
   */
  private _call(
    frame: Record<string, unknown>,
    // eslint-disable-next-line @typescript-eslint/no-explicit-any
    resolve: (reply: any) => void,
    reject: (error: HeraldError) => void,
  ): void {
    if (this.state == "disconnected") return reject(new HeraldError("disconnected", "the client is disconnected"));
    const id = ++this._nextId;
    const request: PendingRequest = {
      frame: { ...frame, id },
      resolve,
      reject,
      sent: false,
      timer: this._options.setTimeout(
        () => this._settle(id, request, new HeraldError("timeout", "no reply from the server")),
        this._options.timeout,
      ),
    };
    this._requests.set(id, request);
    if (this._welcomed) this._transmit(request);
  }

  private _transmit(request: PendingRequest): void {
    request.sent = true;
    this._send(request.frame);
  }

  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  private _settle(id: number, request: PendingRequest, error?: HeraldError, reply?: any): void {
    this._requests.delete(id);
    this._options.clearTimeout(request.timer);
    if (error) request.reject(error);
    else request.resolve(reply);
  }

  private _send(frame: Record<string, unknown>): void {
    const ws = this._ws;
    // A closing socket's close event follows, and fails what was not answered.
    if (ws && (ws.readyState === undefined || ws.readyState == 1)) ws.send(JSON.stringify(frame));
  }
}

function ignore(): void {}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
function withoutEnvelope({ type, id, ...rest }: any): any {
  return rest;
}

function isUnauthorized(error: unknown): boolean {
  return error instanceof UnauthorizedError || (!!error && (error as Error).name == "UnauthorizedError");
}

function asHeraldError(error: unknown, code: string): HeraldError {
  return error instanceof HeraldError ? error : new HeraldError(code, String((error as Error)?.message || error));
}
