/** The claims of a JWT that the client reads; it never verifies tokens. */
export interface TokenClaims {
  exp?: number;
  iat?: number;
  sub?: string;
}

/** Decodes a JWT's payload without verifying it; `null` if it is not a JWT. */
export function decodeToken(token: string): TokenClaims | null {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(payload));
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

/**
 * When, on the local clock, a token received at `now` stops being valid; 0
 * when unknown (an opaque token, or a JWT without `exp`).
 *
 * With `iat`, the token's lifetime `exp - iat` is added to the moment it was
 * received, so a client clock that is off by minutes does not matter. Without
 * it, `exp` is read against the local clock.
 */
export function tokenDeadline(token: string, now: number): number {
  const claims = decodeToken(token);
  const exp = claims && claims.exp;
  if (typeof exp != "number") return 0;
  const iat = claims!.iat;
  return typeof iat == "number" && iat <= exp ? now + (exp - iat) * 1000 : exp * 1000;
}

/**
 * When to refresh a token that stops being valid at `deadline`: 20% of its
 * remaining life early, at least 1 s and at most 60 s early, and never sooner
 * than 1 s from `now`.
 */
export function refreshTime(deadline: number, now: number): number {
  const early = Math.min(60_000, Math.max(1000, (deadline - now) / 5));
  return Math.max(now + 1000, deadline - early);
}
