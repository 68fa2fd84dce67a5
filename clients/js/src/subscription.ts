import { Emitter } from "./emitter.js";
import type { HeraldError } from "./errors.js";
import type { Herald } from "./herald.js";

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

// eslint-disable-next-line @typescript-eslint/no-explicit-any
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

// eslint-disable-next-line @typescript-eslint/no-explicit-any
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
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export class Subscription<T = any> extends Emitter<SubscriptionEvents<T>> {
  /** The channel name or pattern, as given to `subscribe`. */
  readonly channel: string;
  state: SubscriptionState = "subscribing";
  /**
   * The last position seen on a history channel, `null` before the first
   * reply or on other channels. It advances before `message` handlers run.
   * Setting it changes where the next (re)subscribe resumes from.
   */
  position: Position | null;
  /** @internal A matcher for wildcard subscriptions, `null` for plain channels. */
  _pattern: RegExp | null;
  /** @internal The number of the connection that last confirmed it; 0 if none has. */
  _connection = 0;
  /** @internal */
  _herald: Herald;

  /** @internal Use `herald.subscribe`. */
  constructor(herald: Herald, channel: string, since?: Position | null) {
    super();
    this._herald = herald;
    this.channel = channel;
    this.position =
      since && typeof since.offset == "number" && typeof since.epoch == "string"
        ? { offset: since.offset, epoch: since.epoch }
        : null;
    this._pattern = channel.includes("*")
      ? new RegExp("^" + channel.replace(/\./g, "\\.").replace(/\*/g, ".*") + "$")
      : null;
  }

  /** Leaves the channel. The subscription is finished; subscribe again for a new one. */
  unsubscribe(): void {
    this._herald._unsubscribe(this);
  }

  /** @internal Whether a frame about `channel` is for this subscription. */
  _matches(channel: string): boolean {
    return channel == this.channel || (!!this._pattern && this._pattern.test(channel));
  }

  /** @internal Delivers a `message` frame: advance the position, drop duplicates, then emit. */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  _message(frame: any): void {
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
      subscription: this,
    });
  }

  /**
   * @internal The server confirmed the subscription on connection number
   * `connection`. `reply` is the channel's entry in the reply's `positions`,
   * `since` the position the request carried.
   */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  _confirmed(reply: any, since: Position | undefined, connection: number): void {
    const resubscribed = this._connection > 0 && this._connection != connection;
    let recovery: RecoveredContext | undefined;
    this._connection = connection;
    this.state = "subscribed";
    if (reply) {
      if (since && reply.recovered != null) {
        recovery = reply.recovered
          ? { recovered: true, count: Math.max(0, reply.offset - since.offset), position: null }
          : { recovered: false, reason: reply.reason, count: 0, position: null };
      }
      // After a successful recovery the replayed messages advance the position.
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
  private _advance(top: Position): void {
    const position = this.position;
    if (typeof top.offset != "number" || typeof top.epoch != "string") return;
    // A history channel without messages yet is at {offset: 0, epoch: ""}:
    // keep that, so that a resubscription recovers from its first message.
    if (!top.epoch) {
      if (!position) this.position = { offset: top.offset, epoch: "" };
      return;
    }
    if (!position || position.epoch != top.epoch || top.offset > position.offset) this.position = top;
  }
}
