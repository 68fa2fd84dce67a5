import { Emitter } from "./emitter.js";
import type { HeraldError } from "./errors.js";
/**
 * Where a subscription stands in a history channel: the last offset it has
 * seen and the channel's epoch. Save it (for example in `sessionStorage`) and
 * pass it back as the `since` option to resume exactly there.
 */
export interface Position {
    offset: number;
    epoch: string;
}
/** `subscribing` until the server confirms, and again while reconnecting. */
export type SubscriptionState = "subscribing" | "subscribed" | "unsubscribed";
/** Everything about a message except its data. */
export interface MessageContext<T = unknown> {
    /** The concrete channel, also for a wildcard subscription such as `prices.*`. */
    channel: string;
    /** The message's offset, on history channels. */
    offset?: number;
    /** The channel's epoch, on history channels. */
    epoch?: string;
    /** The publisher's `sub`, stamped by the server on channels that enable it. */
    from?: string;
    /** `"base64"` when the payload was not UTF-8 and `data` holds its base64 text. */
    encoding?: string;
    subscription: Subscription<T>;
}
export interface SubscribedContext {
    channel: string;
    /** The position after the server's reply; `null` on channels without history. */
    position: Position | null;
    /** True when this confirms a subscription again after a reconnect. */
    resubscribed: boolean;
}
export interface RecoveredContext {
    /**
     * True when every message after the `since` position follows, in order;
     * false when recovery was impossible (then a `gap` event follows too).
     */
    recovered: boolean;
    /** Why recovery failed: `epoch_changed`, `trimmed`, `too_many` or `unknown_channel`. */
    reason?: string;
    /** How many messages the server replays (0 when `recovered` is false). */
    count: number;
    /** The position after the reply. */
    position: Position | null;
}
export interface GapContext {
    /**
     * Why messages may be missing: `gap` (the server lost its broker link),
     * `reconnect` (a channel without history after a reconnect), or a
     * recovery failure reason (`epoch_changed`, `trimmed`, `too_many`,
     * `unknown_channel`). Refetch the state derived from the channel.
     */
    reason: string;
}
export interface PresenceEvent {
    channel: string;
    user: string;
}
export type SubscriptionEvents<T = any> = {
    message: [data: T, ctx: MessageContext<T>];
    subscribed: [ctx: SubscribedContext];
    recovered: [ctx: RecoveredContext];
    gap: [ctx: GapContext];
    join: [event: PresenceEvent];
    leave: [event: PresenceEvent];
    error: [error: HeraldError];
    unsubscribed: [];
};
export interface SubscriptionOptions<T = any> {
    /** Shorthand for `sub.on("message", onMessage)`. */
    onMessage?: (data: T, ctx: MessageContext<T>) => void;
    /** Resume a history channel from a saved position. */
    since?: Position | null;
}
/**
 * One channel (or wildcard pattern) of a `Herald` client. Created by
 * `herald.subscribe`; it stays subscribed across reconnects until
 * `unsubscribe()` or until the server refuses it.
 */
export declare class Subscription<T = any> extends Emitter<SubscriptionEvents<T>> {
    /** The channel name or pattern, as given to `subscribe`. */
    readonly channel: string;
    state: SubscriptionState;
    /**
     * The last position seen on a history channel, `null` before the first
     * reply or on other channels. It advances before `message` handlers run.
     * Setting it changes where the next (re)subscribe resumes from.
     */
    position: Position | null;
    /** Leaves the channel. The subscription is finished; subscribe again for a new one. */
    unsubscribe(): void;
    /** Moves the position to `top` unless it already is at or past it. */
    private _advance;
}
