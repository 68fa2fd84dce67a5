/**
 * The delay before reconnect attempt number `attempt` (0 for the first):
 * full jitter above a floor, uniformly random in
 * `[min, min(max, min * 2^(attempt + 1))]`. The first retry waits between
 * `min` and `2 * min`, so clients dropped together never return together.
 */
export declare function backoff(attempt: number, min: number, max: number, random: () => number): number;
