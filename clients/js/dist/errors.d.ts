/**
 * An error reported by herald or by the client. `code` is stable and meant
 * for programs: one of the protocol's error codes (`forbidden`,
 * `invalid_channel`, `too_large`, `rate_limited`, `broker_unavailable`,
 * `not_supported`, `invalid_token`, ...), a close reason (`forbidden`,
 * `protocol_error`, ...), or one of the client's own: `timeout`,
 * `disconnected`, `revoked`, `unauthorized`, `token`.
 */
export declare class HeraldError extends Error {
    /** The stable, machine-readable code. */
    code: string;
    /** The channel the error is about, when there is one. */
    channel?: string;
    constructor(code: string, message?: string, channel?: string);
}
/**
 * Throw this from `getToken` when the user is not allowed to connect at all
 * (for example, logged out). The client then stops instead of retrying, and
 * reports it as an `error` event with code `unauthorized`.
 */
export declare class UnauthorizedError extends HeraldError {
    constructor(message?: string);
}
