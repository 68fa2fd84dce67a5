/**
 * What the client does after the node closes the connection:
 * - `reconnect`: reconnect after a jittered backoff delay;
 * - `backoff`: the same, but starting from a longer delay (the client broke
 *   a rate limit);
 * - `token`: get a new token (calling `getToken`), then reconnect;
 * - `stop`: do not reconnect; report an `error` and go `disconnected`.
 *
 * After any reconnect, subscriptions are re-sent: history channels recover
 * from their positions and other channels report a `gap`.
 */
export type CloseAction = "reconnect" | "backoff" | "token" | "stop";
/**
 * The close codes of docs/PROTOCOL.md section 8.1, as `[reason text, action]`.
 * A unit test checks this table against the document. Codes not listed here,
 * such as 1006 (the connection was lost without a close frame), reconnect.
 */
export declare const CLOSE_CODES: {
    readonly [code: number]: readonly [reason: string, action: CloseAction];
};
/** The action for a close code (see `CLOSE_CODES`). */
export declare function closeAction(code: number): CloseAction;
