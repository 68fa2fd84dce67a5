// src/backoff.ts
function backoff(attempt, min, max, random) {
  const cap = Math.max(min, Math.min(max, min * 2 ** (attempt + 1)));
  return min + random() * (cap - min);
}

// src/closecodes.ts
var CLOSE_CODES = {
  1e3: ["normal", "reconnect"],
  1001: ["shutdown", "reconnect"],
  1002: ["protocol_error", "stop"],
  1007: ["invalid_payload", "stop"],
  1009: ["message_too_big", "stop"],
  4001: ["token_expired", "token"],
  4002: ["slow_consumer", "reconnect"],
  4003: ["ping_timeout", "reconnect"],
  4004: ["forbidden", "stop"],
  4005: ["policy_violation", "backoff"],
  4006: ["frame_timeout", "backoff"]
};
function closeAction(code) {
  const entry = CLOSE_CODES[code];
  return entry ? entry[1] : "reconnect";
}

// src/emitter.ts
var Emitter = class {
  constructor() {
    this._listeners = {};
  }
  /** Adds a listener; returns a function that removes it again. */
  on(event, listener) {
    var _a;
    ((_a = this._listeners)[event] || (_a[event] = [])).push(listener);
    return () => this.off(event, listener);
  }
  /** Removes a listener added with `on`. */
  off(event, listener) {
    const list = this._listeners[event];
    const index = list ? list.indexOf(listener) : -1;
    if (index >= 0) list.splice(index, 1);
  }
  /**
   * Calls every listener of `event`. A listener that throws does not stop the
   * others or the client: its exception is rethrown from a fresh task, so it
   * reaches the console and `window.onerror` like any uncaught error.
   * @internal
   */
  _emit(event, ...args) {
    for (const listener of (this._listeners[event] || []).slice()) {
      try {
        listener(...args);
      } catch (error) {
        setTimeout(() => {
          throw error;
        });
      }
    }
  }
};

// src/errors.ts
var HeraldError = class extends Error {
  constructor(code, message, channel) {
    super(message || code);
    this.name = "HeraldError";
    this.code = code;
    if (channel) this.channel = channel;
  }
};
var UnauthorizedError = class extends HeraldError {
  constructor(message) {
    super("unauthorized", message);
    this.name = "UnauthorizedError";
  }
};

// src/subscription.ts
var Subscription = class extends Emitter {
  /** @internal Use `herald.subscribe`. */
  constructor(herald, channel, since) {
    super();
    this.state = "subscribing";
    /** @internal The number of the connection that last confirmed it; 0 if none has. */
    this._connection = 0;
    this._herald = herald;
    this.channel = channel;
    this.position = since && typeof since.offset == "number" && typeof since.epoch == "string" ? { offset: since.offset, epoch: since.epoch } : null;
    this._pattern = channel.includes("*") ? new RegExp("^" + channel.replace(/\./g, "\\.").replace(/\*/g, ".*") + "$") : null;
  }
  /** Leaves the channel. The subscription is finished; subscribe again for a new one. */
  unsubscribe() {
    this._herald._unsubscribe(this);
  }
  /** @internal Whether a frame about `channel` is for this subscription. */
  _matches(channel) {
    return channel == this.channel || !!this._pattern && this._pattern.test(channel);
  }
  /** @internal Delivers a `message` frame: advance the position, drop duplicates, then emit. */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  _message(frame) {
    const { offset, epoch } = frame;
    if (!this._pattern && typeof offset == "number" && epoch) {
      const position = this.position;
      if (position && position.epoch == epoch && offset <= position.offset) return;
      this.position = { offset, epoch };
    }
    this._emit("message", frame.data, {
      channel: frame.channel,
      offset,
      epoch,
      from: frame.from,
      encoding: frame.encoding,
      subscription: this
    });
  }
  /**
   * @internal The server confirmed the subscription on connection number
   * `connection`. `reply` is the channel's entry in the reply's `positions`,
   * `since` the position the request carried.
   */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  _confirmed(reply, since, connection) {
    const resubscribed = this._connection > 0 && this._connection != connection;
    let recovery;
    this._connection = connection;
    this.state = "subscribed";
    if (reply) {
      if (since && reply.recovered != null) {
        recovery = reply.recovered ? { recovered: true, count: Math.max(0, reply.offset - since.offset), position: null } : { recovered: false, reason: reply.reason, count: 0, position: null };
      }
      if (!recovery || !recovery.recovered) this._advance({ offset: reply.offset, epoch: reply.epoch });
    }
    this._emit("subscribed", { channel: this.channel, position: this.position, resubscribed });
    if (recovery) {
      recovery.position = this.position;
      this._emit("recovered", recovery);
      if (!recovery.recovered) this._emit("gap", { reason: recovery.reason || "unknown" });
    } else if (!reply && resubscribed) {
      this._emit("gap", { reason: "reconnect" });
    }
  }
  /** Moves the position to `top` unless it already is at or past it. */
  _advance(top) {
    const position = this.position;
    if (typeof top.offset != "number" || typeof top.epoch != "string") return;
    if (!top.epoch) {
      if (!position) this.position = { offset: top.offset, epoch: "" };
      return;
    }
    if (!position || position.epoch != top.epoch || top.offset > position.offset) this.position = top;
  }
};

// src/token.ts
function decodeToken(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(payload));
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}
function tokenDeadline(token, now) {
  const claims = decodeToken(token);
  const exp = claims && claims.exp;
  if (typeof exp != "number") return 0;
  const iat = claims.iat;
  return typeof iat == "number" && iat <= exp ? now + (exp - iat) * 1e3 : exp * 1e3;
}
function refreshTime(deadline, now) {
  const early = Math.min(6e4, Math.max(1e3, (deadline - now) / 5));
  return Math.max(now + 1e3, deadline - early);
}

// src/herald.ts
var TICK = 1e3;
var PAGE_EVENTS = ["online", "offline", "visibilitychange", "pageshow"];
var Herald = class extends Emitter {
  constructor(url, options = {}) {
    super();
    this.state = "disconnected";
    this._ws = null;
    /** Bumped whenever a socket is abandoned, so its late events are ignored. */
    this._generation = 0;
    /** Counts `welcome` frames: the number of the current (or last) connection. */
    this._connection = 0;
    this._welcomed = false;
    /** Set by `disconnect()`, so that auto-connect does not undo it. */
    this._off = false;
    this._attempt = 0;
    this._retryTimer = null;
    /** When the token stops being valid, on the local clock; 0 when unknown. */
    this._tokenDeadline = 0;
    this._tokenPromise = null;
    /** When to refresh the token in-band; 0 for never. */
    this._refreshAt = 0;
    this._interval = 0;
    this._lastReceived = 0;
    this._lastTick = 0;
    /** When the outstanding `ping` was sent; 0 when none is. */
    this._pingAt = 0;
    this._nextId = 0;
    this._requests = /* @__PURE__ */ new Map();
    this._subs = /* @__PURE__ */ new Map();
    /** Subscriptions to send in the next `subscribe` request. */
    this._pendingSubs = /* @__PURE__ */ new Set();
    this._flushQueued = false;
    /**
     * A page-life event: the network came back, the tab became visible, or the
     * page was restored. Reconnect at once if waiting to, or check liveness now.
     */
    this._wake = (event) => {
      const page = this._options.window;
      if (event.type == "visibilitychange" && page && page.document && page.document.visibilityState == "hidden") return;
      if (this._retryTimer) {
        this._options.clearTimeout(this._retryTimer);
        this._open();
      } else if (this._welcomed && !this._pingAt) {
        this._ping(this._options.now());
      }
    };
    this.url = url;
    const defaults = {
      minReconnectDelay: 500,
      maxReconnectDelay: 2e4,
      pingInterval: 25e3,
      pingMargin: 5e3,
      pongTimeout: 1e4,
      timeout: 1e4,
      autoConnect: true,
      WebSocket: globalThis.WebSocket,
      now: Date.now,
      setTimeout: (callback, ms) => setTimeout(callback, ms),
      clearTimeout: (handle) => clearTimeout(handle),
      random: Math.random,
      window: typeof window != "undefined" ? window : null
    };
    for (const key in options) {
      const value = options[key];
      if (value !== void 0) defaults[key] = value;
    }
    this._options = defaults;
    if (options.token) this._setToken(options.token);
    if (defaults.autoConnect) queueMicrotask(() => this._off || this.connect());
  }
  /** Starts connecting, unless already connecting or connected. */
  connect() {
    this._off = false;
    if (this.state != "disconnected") return;
    this._attempt = 0;
    this._setState("connecting");
    this._listen(true);
    this._open();
  }
  /** Closes the connection and stops reconnecting. Subscriptions are kept for the next `connect()`. */
  disconnect() {
    this._off = true;
    if (this.state != "disconnected") this._stop();
  }
  /**
   * Subscribes to a channel, or to a wildcard pattern such as `prices.*`.
   * Returns the existing subscription if there is one (adding `onMessage`).
   */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  subscribe(channel, options = {}) {
    let sub = this._subs.get(channel);
    if (!sub) {
      this._subs.set(channel, sub = new Subscription(this, channel, options.since));
      this._queueSubscribe(sub);
    }
    if (options.onMessage) sub.on("message", options.onMessage);
    return sub;
  }
  /** The subscription to `channel`, if any. */
  getSubscription(channel) {
    return this._subs.get(channel);
  }
  /**
   * Publishes `data` (any JSON value) on a channel the token grants
   * publishing on. Resolves when the server accepted it; rejects with a
   * `HeraldError` whose code is `forbidden`, `invalid_channel`, `too_large`,
   * `rate_limited`, `broker_unavailable`, `timeout` or `disconnected`.
   * While the client is connecting, the request waits (up to `timeout`).
   */
  publish(channel, data) {
    return this._request({ op: "publish", channel, data }).then(() => void 0);
  }
  /** The users subscribed to a presence channel, with their connection counts. */
  presence(channel) {
    return this._request({ op: "presence", channel }).then(withoutEnvelope);
  }
  /** The number of users and connections subscribed to a presence channel. */
  presenceCount(channel) {
    return this._request({ op: "presence_count", channel }).then(withoutEnvelope);
  }
  /** @internal Called by `Subscription.unsubscribe`. */
  _unsubscribe(sub) {
    if (this._subs.get(sub.channel) != sub) return;
    if (this._welcomed) this._request({ op: "unsubscribe", channels: [sub.channel] }).catch(ignore);
    this._finish(sub);
  }
  /** @internal Puts a subscription into the next `subscribe` request. */
  _queueSubscribe(sub) {
    this._pendingSubs.add(sub);
    if (this._welcomed && !this._flushQueued) {
      this._flushQueued = true;
      queueMicrotask(() => this._flushSubscribes());
    }
  }
  _setState(state) {
    if (state != this.state) {
      this.state = state;
      this._emit("state", state);
    }
  }
  _listen(on) {
    const page = this._options.window;
    if (page) for (const type of PAGE_EVENTS) page[on ? "addEventListener" : "removeEventListener"](type, this._wake);
  }
  _setToken(token) {
    this._token = token;
    this._tokenDeadline = tokenDeadline(token, this._options.now());
  }
  /** The token to connect or refresh with: the cached one while valid, else a fresh one. */
  _getToken(fresh) {
    const { getToken, now } = this._options;
    const token = this._token;
    if (!getToken || !fresh && token && (!this._tokenDeadline || now() < this._tokenDeadline - 2e3)) {
      return Promise.resolve(token);
    }
    return this._tokenPromise || (this._tokenPromise = Promise.resolve().then(getToken).then(
      (token2) => {
        this._setToken(token2);
        return token2;
      },
      (error) => {
        throw isUnauthorized(error) ? error : asHeraldError(error, "token");
      }
    ).finally(() => {
      this._tokenPromise = null;
    }));
  }
  async _open() {
    const generation = ++this._generation;
    const options = this._options;
    this._retryTimer = null;
    options.setTimeout(() => {
      if (generation == this._generation && !this._welcomed) this._abandon("timeout");
    }, options.timeout);
    let ws;
    try {
      const token = await this._getToken(false);
      if (generation != this._generation) return;
      ws = this._ws = new options.WebSocket(this.url, token ? ["herald.v1", "herald.auth." + token] : ["herald.v1"]);
    } catch (error) {
      if (generation != this._generation) return;
      if (isUnauthorized(error)) return this._stop(error);
      this._emit("error", asHeraldError(error, "connect"));
      return this._retry();
    }
    ws.onmessage = (event) => generation == this._generation && this._receive(event.data);
    ws.onclose = (event) => generation == this._generation && this._closed(event.code, event.reason);
  }
  /** Gives up on the current socket (no welcome, or no pong) and reconnects. */
  _abandon(reason) {
    const ws = this._ws;
    this._generation++;
    try {
      if (ws) ws.close();
    } catch {
    }
    this._closed(1006, reason);
  }
  /** Ends the current attempt (its late events and timers are ignored) and schedules the next. */
  _retry() {
    const options = this._options;
    this._generation++;
    this._setState("connecting");
    this._retryTimer = options.setTimeout(
      () => this._open(),
      backoff(this._attempt++, options.minReconnectDelay, options.maxReconnectDelay, options.random)
    );
  }
  _closed(code, reason) {
    const welcomed = this._welcomed;
    this._ws = null;
    this._welcomed = false;
    this._pingAt = this._refreshAt = 0;
    this._pendingSubs.clear();
    this._requests.forEach((request, id) => {
      if (request.sent) this._settle(id, request, new HeraldError("disconnected", "the connection closed"));
    });
    this._subs.forEach((sub) => sub.state = "subscribing");
    const action = closeAction(code);
    this._emit("disconnected", { code, reason, reconnect: action != "stop" });
    if (this.state == "disconnected") return;
    if (action == "stop") {
      return this._stop(new HeraldError(CLOSE_CODES[code][0], `the server closed the connection: ${code} ${reason}`));
    }
    if ((action == "token" || !welcomed) && this._options.getToken) this._token = void 0;
    if (action == "backoff") this._attempt = Math.max(this._attempt, 3);
    this._retry();
  }
  _stop(error) {
    const ws = this._ws;
    this._generation++;
    this._ws = null;
    this._welcomed = false;
    this._options.clearTimeout(this._retryTimer);
    this._retryTimer = null;
    try {
      if (ws) ws.close(1e3);
    } catch {
    }
    this._requests.forEach((request, id) => this._settle(id, request, new HeraldError("disconnected", "disconnected")));
    this._listen(false);
    this._setState("disconnected");
    if (error) this._emit("error", error);
  }
  _receive(text) {
    this._lastReceived = this._options.now();
    this._pingAt = 0;
    let frame;
    try {
      frame = JSON.parse(text);
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
  _welcome(frame) {
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
      reconnected: connection > 1
    });
  }
  /** Schedules the next in-band refresh from the token's `exp`, else from the server's `expires_at`. */
  _scheduleRefresh(expiresAt, now) {
    if (!this._tokenDeadline && typeof expiresAt == "number") this._tokenDeadline = expiresAt * 1e3;
    this._refreshAt = this._options.getToken && this._tokenDeadline ? refreshTime(this._tokenDeadline, now) : 0;
  }
  /**
   * Runs every second while connected. Only wall-clock differences decide:
   * a tick that comes late (a hidden tab's throttled timers, a frozen page,
   * a sleeping laptop) never counts as a missing pong; it sends a new ping.
   */
  _tick(connection) {
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
  _ping(now) {
    this._pingAt = now;
    this._send({ op: "ping" });
  }
  async _refresh(connection) {
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
      if (isUnauthorized(error)) return this._stop(error);
      this._emit("error", error);
      if (connection == this._connection && this._welcomed) {
        this._refreshAt = options.now() + backoff(3, options.minReconnectDelay, options.maxReconnectDelay, options.random);
      }
    }
  }
  /** Sends every queued subscription in one `subscribe` request, with `since` positions. */
  _flushSubscribes() {
    this._flushQueued = false;
    const subs = [...this._pendingSubs];
    this._pendingSubs.clear();
    if (!this._welcomed || !subs.length) return;
    const connection = this._connection;
    const since = {};
    const frame = { op: "subscribe", channels: subs.map((sub) => sub.channel) };
    const resuming = subs.filter((sub) => sub.position && !sub._pattern);
    for (const sub of resuming) since[sub.channel] = sub.position;
    if (resuming.length) frame.since = since;
    this._call(
      frame,
      (reply) => {
        const errors = {};
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
      (error) => {
        if (error.code != "disconnected") for (const sub of subs) sub._emit("error", error);
      }
    );
  }
  /** The server refused a subscription: retry later if it may pass then, else end it. */
  _refused(sub, code, message) {
    const options = this._options;
    if (code == "broker_unavailable") {
      options.setTimeout(
        () => this._subs.get(sub.channel) == sub && this._queueSubscribe(sub),
        backoff(2, options.minReconnectDelay, options.maxReconnectDelay, options.random)
      );
    }
    sub._emit("error", new HeraldError(code, message, sub.channel));
    if (code != "broker_unavailable") this._finish(sub);
  }
  _finish(sub) {
    this._subs.delete(sub.channel);
    this._pendingSubs.delete(sub);
    sub.state = "unsubscribed";
    sub._emit("unsubscribed");
  }
  /** Routes a `message`, `join`, `leave` or `gap` frame to the subscriptions it concerns. */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  _route(frame) {
    const type = frame.type;
    for (const sub of [...this._subs.values()]) {
      if (type == "gap") {
        if ((frame.channels || []).some((channel) => sub._matches(channel))) sub._emit("gap", { reason: "gap" });
      } else if (sub._matches(frame.channel)) {
        if (type == "message") sub._message(frame);
        else sub._emit(type, { channel: frame.channel, user: frame.user });
      }
    }
  }
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  _request(frame) {
    return new Promise((resolve, reject) => this._call(frame, resolve, reject));
  }
  /**
   * Sends a request now, or when connected, and calls back with its reply or
   * error. The callbacks run synchronously with the frame that settles them,
   * so a subscribe reply is applied before the messages that follow it.
   */
  _call(frame, resolve, reject) {
    if (this.state == "disconnected") return reject(new HeraldError("disconnected", "the client is disconnected"));
    const id = ++this._nextId;
    const request = {
      frame: { ...frame, id },
      resolve,
      reject,
      sent: false,
      timer: this._options.setTimeout(
        () => this._settle(id, request, new HeraldError("timeout", "no reply from the server")),
        this._options.timeout
      )
    };
    this._requests.set(id, request);
    if (this._welcomed) this._transmit(request);
  }
  _transmit(request) {
    request.sent = true;
    this._send(request.frame);
  }
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  _settle(id, request, error, reply) {
    this._requests.delete(id);
    this._options.clearTimeout(request.timer);
    if (error) request.reject(error);
    else request.resolve(reply);
  }
  _send(frame) {
    const ws = this._ws;
    if (ws && (ws.readyState === void 0 || ws.readyState == 1)) ws.send(JSON.stringify(frame));
  }
};
function ignore() {
}
function withoutEnvelope({ type, id, ...rest }) {
  return rest;
}
function isUnauthorized(error) {
  return error instanceof UnauthorizedError || !!error && error.name == "UnauthorizedError";
}
function asHeraldError(error, code) {
  return error instanceof HeraldError ? error : new HeraldError(code, String(error?.message || error));
}
export {
  CLOSE_CODES,
  Emitter,
  Herald,
  HeraldError,
  Subscription,
  UnauthorizedError,
  backoff,
  closeAction
};
