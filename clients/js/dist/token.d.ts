/** The claims of a JWT that the client reads; it never verifies tokens. */
export interface TokenClaims {
    exp?: number;
    iat?: number;
    sub?: string;
}
/** Decodes a JWT's payload without verifying it; `null` if it is not a JWT. */
export declare function decodeToken(token: string): TokenClaims | null;
/**
 * When, on the local clock, a token received at `now` stops being valid; 0
 * when unknown (an opaque token, or a JWT without `exp`).
 *
 * With `iat`, the token's lifetime `exp - iat` is added to the moment it was
 * received, so a client clock that is off by minutes does not matter. Without
 * it, `exp` is read against the local clock.
 */
export declare function tokenDeadline(token: string, now: number): number;
/**
 * When to refresh a token that stops being valid at `deadline`: 20% of its
 * remaining life early, at least 1 s and at most 60 s early, and never sooner
 * than 1 s from `now`.
 */
export declare function refreshTime(deadline: number, now: number): number;
