import { Emitter } from "./emitter.js";
import { HeraldError } from "./errors.js";
import { Subscription, SubscriptionOptions } from "./subscription.js";
export { backoff } from "./backoff.js";
export { CLOSE_CODES, closeAction } from "./closecodes.js";
export type { CloseAction } from "./closecodes.js";
export { Emitter } from "./emitter.js";
export { HeraldError, UnauthorizedError } from "./errors.js";
export { Subscription } from "./subscription.js";
export type { GapContext, MessageContext, Position, PresenceEvent, RecoveredContext, SubscribedContext, SubscriptionEvents, SubscriptionOptions, SubscriptionState, } from "./subscription.js";
/** The client's connection state. */
export type State = "connecting" | "connected" | "disconnected";
/** The part of the browser's `WebSocket` that the client uses. */
export interface WebSocketLike {
    /** 1 when open. Frames are only sent then, so a closing socket is left alone. */
    readonly readyState?: number;
    onmessage: ((event: {
        data: any;
    }) => void) | null;
    onclose: ((event: {
        code: number;
        reason: string;
    }) => void) | null;
    send(data: string): void;
    close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string, protocols: string[]) => WebSocketLike;
/** The part of `window` that the client listens to for page-life events. */
export interface PageLike {
    addEventListener(type: string, listener: (event: {
        type: string;
    }) => void): void;
    removeEventListener(type: string, listener: (event: {
        type: string;
    }) => void): void;
    document?: {
        visibilityState?: string;
    };
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
/**
 * A herald client: one WebSocket, reconnected with jittered backoff, that
 * carries any number of subscriptions.
 *
 * ```ts
 * const herald = new Herald("wss://push.example.com/ws", { getToken: () => fetchToken() });
 * herald.subscribe("prices.AAPL", { onMessage: (data, ctx) => render(data) });
 * ```
 */
export declare class Herald extends Emitter<HeraldEvents> {
    readonly url: string;
    state: State;
    /** The token's `sub`, from the last `welcome`. */
    user?: string;
    private _options;
    private _ws;
    /** Bumped whenever a socket is abandoned, so its late events are ignored. */
    private _generation;
    /** Counts `welcome` frames: the number of the current (or last) connection. */
    private _connection;
    private _welcomed;
    /** Set by `disconnect()`, so that auto-connect does not undo it. */
    private _off;
    private _attempt;
    private _retryTimer;
    private _token?;
    /** When the token stops being valid, on the local clock; 0 when unknown. */
    private _tokenDeadline;
    private _tokenPromise;
    /** When to refresh the token in-band; 0 for never. */
    private _refreshAt;
    private _interval;
    private _lastReceived;
    private _lastTick;
    /** When the outstanding `ping` was sent; 0 when none is. */
    private _pingAt;
    private _nextId;
    private _requests;
    private _subs;
    /** Subscriptions to send in the next `subscribe` request. */
    private _pendingSubs;
    private _flushQueued;
    constructor(url: string, options?: HeraldOptions);
    /** Starts connecting, unless already connecting or connected. */
    connect(): void;
    /** Closes the connection and stops reconnecting. Subscriptions are kept for the next `connect()`. */
    disconnect(): void;
    /**
     * Subscribes to a channel, or to a wildcard pattern such as `prices.*`.
     * Returns the existing subscription if there is one (adding `onMessage`).
     */
    subscribe<T = any>(channel: string, options?: SubscriptionOptions<T>): Subscription<T>;
    /** The subscription to `channel`, if any. */
    getSubscription(channel: string): Subscription | undefined;
    /**
     * Publishes `data` (any JSON value) on a channel the token grants
     * publishing on. Resolves when the server accepted it; rejects with a
     * `HeraldError` whose code is `forbidden`, `invalid_channel`, `too_large`,
     * `rate_limited`, `broker_unavailable`, `timeout` or `disconnected`.
     * While the client is connecting, the request waits (up to `timeout`).
     */
    publish(channel: string, data: unknown): Promise<void>;
    /** The users subscribed to a presence channel, with their connection counts. */
    presence(channel: string): Promise<PresenceResult>;
    /** The number of users and connections subscribed to a presence channel. */
    presenceCount(channel: string): Promise<PresenceCountResult>;
    private _setState;
    private _listen;
    /**
     * A page-life event: the network came back, the tab became visible, or the
     * page was restored. Reconnect at once if waiting to, or check liveness now.
     */
    private _wake;
    private _setToken;
    /** The token to connect or refresh with: the cached one while valid, else a fresh one. */
    private _getToken;
    private _open;
    /** Gives up on the current socket (no welcome, or no pong) and reconnects. */
    private _abandon;
    /** Ends the current attempt (its late events and timers are ignored) and schedules the next. */
    private _retry;
    private _closed;
    private _stop;
    private _receive;
    private _welcome;
    /** Schedules the next in-band refresh from the token's `exp`, else from the server's `expires_at`. */
    private _scheduleRefresh;
    /**
     * Runs every second while connected. Only wall-clock differences decide:
     * a tick that comes late (a hidden tab's throttled timers, a frozen page,
     * a sleeping laptop) never counts as a missing pong; it sends a new ping.
     */
    private _tick;
    /** Sends an application-level ping; any frame that arrives afterwards proves liveness. */
    private _ping;
    private _refresh;
    /** Sends every queued subscription in one `subscribe` request, with `since` positions. */
    private _flushSubscribes;
    /** The server refused a subscription: retry later if it may pass then, else end it. */
    private _refused;
    private _finish;
    /** Routes a `message`, `join`, `leave` or `gap` frame to the subscriptions it concerns. */
    private _route;
    private _request;
    /**
     * Sends a request now, or when connected, and calls back with its reply or
     * error. The callbacks run synchronously with the frame that settles them,
     * so a subscribe reply is applied before the messages that follow it.
     */
    private _call;
    private _transmit;
    private _settle;
    private _send;
}
