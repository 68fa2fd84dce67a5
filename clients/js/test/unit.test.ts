// Pure pieces: backoff bounds, token decoding and refresh timing, and the
// close-code table checked against docs/PROTOCOL.md.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, test } from "node:test";

import { backoff } from "../src/backoff.js";
import { CLOSE_CODES, closeAction, type CloseAction } from "../src/closecodes.js";
import { decodeToken, refreshTime, tokenDeadline } from "../src/token.js";
import { makeToken } from "./helpers.js";

describe("backoff", () => {
  test("stays within [min, min(max, min * 2^(attempt+1))] for every attempt", () => {
    const min = 500;
    const max = 20000;
    for (let attempt = 0; attempt < 40; attempt++) {
      const cap = Math.min(max, min * 2 ** (attempt + 1));
      for (const r of [0, 0.001, 0.25, 0.5, 0.75, 0.999999]) {
        const delay = backoff(attempt, min, max, () => r);
        assert.ok(delay >= min, `attempt ${attempt}, random ${r}: ${delay} < ${min}`);
        assert.ok(delay <= cap, `attempt ${attempt}, random ${r}: ${delay} > ${cap}`);
      }
    }
  });

  test("uses the full jitter range", () => {
    assert.equal(backoff(0, 500, 20000, () => 0), 500);
    assert.equal(backoff(0, 500, 20000, () => 1), 1000);
    assert.equal(backoff(2, 500, 20000, () => 1), 4000);
    assert.equal(backoff(10, 500, 20000, () => 1), 20000);
    assert.equal(backoff(1000, 500, 20000, () => 1), 20000, "no overflow for huge attempts");
  });

  test("spreads clients dropped together", () => {
    const delays = new Set<number>();
    for (let i = 0; i < 100; i++) delays.add(Math.round(backoff(0, 500, 20000, Math.random)));
    assert.ok(delays.size > 50, `only ${delays.size} distinct delays`);
  });

  test("honours configured bounds, even max < min", () => {
    assert.equal(backoff(5, 100, 1000, () => 1), 1000);
    assert.equal(backoff(5, 800, 300, () => 1), 800);
  });
});

describe("tokens", () => {
  test("decodeToken reads a JWT payload and rejects other strings", () => {
    const token = makeToken({ sub: "alice", exp: 2000, iat: 1000 });
    assert.deepEqual(decodeToken(token), { sub: "alice", exp: 2000, iat: 1000 });
    assert.equal(decodeToken("opaque"), null);
    assert.equal(decodeToken("a.!!!.c"), null);
    assert.equal(decodeToken(""), null);
  });

  test("decodeToken handles base64url without padding", () => {
    for (const sub of ["a", "ab", "abc", "ü?>>~~"]) {
      const claims = decodeToken(makeToken({ sub, exp: 1 }));
      assert.equal(claims?.exp, 1, sub);
    }
  });

  test("tokenDeadline uses the lifetime exp - iat from the moment of receipt", () => {
    // The local clock is an hour off: only exp - iat matters.
    const now = 5_000_000_000_000;
    assert.equal(tokenDeadline(makeToken({ iat: 1000, exp: 1600 }), now), now + 600_000);
  });

  test("tokenDeadline falls back to exp on the local clock, or 0", () => {
    assert.equal(tokenDeadline(makeToken({ exp: 1600 }), 0), 1_600_000);
    assert.equal(tokenDeadline(makeToken({ sub: "x" }), 0), 0);
    assert.equal(tokenDeadline("opaque", 0), 0);
  });

  test("refreshTime is 20% early, between 1 s and 60 s, never in the past", () => {
    assert.equal(refreshTime(60_000, 0), 48_000);
    assert.equal(refreshTime(3_600_000, 0), 3_540_000);
    assert.equal(refreshTime(3000, 0), 2000);
    assert.equal(refreshTime(500, 0), 1000);
    assert.equal(refreshTime(0, 10_000), 11_000);
  });
});

/** The close-code table of docs/PROTOCOL.md section "Close codes". */
function documentedCloseCodes(): { [code: number]: [string, CloseAction] } {
  const protocol = readFileSync(new URL("../../../../docs/PROTOCOL.md", import.meta.url), "utf8");
  const heading = /^#{2,4} [\d.]*\s*Close codes\s*$/m.exec(protocol);
  assert.ok(heading, "docs/PROTOCOL.md has no 'Close codes' section");
  const section = protocol.slice(heading.index + heading[0].length).split(/^#{2,4} /m)[0];
  const rows = section
    .split("\n")
    .filter((line) => line.startsWith("|"))
    .map((line) => line.split("|").slice(1, -1).map((cell) => cell.trim()));
  const header = rows[0];
  const codeColumn = header.indexOf("Code");
  const reasonColumn = header.findIndex((cell) => /^Reason/.test(cell));
  const adviceColumn = header.findIndex((cell) => /^Reconnect/.test(cell));
  assert.ok(codeColumn >= 0 && reasonColumn >= 0 && adviceColumn >= 0, `unexpected header ${header.join(" | ")}`);
  const table: { [code: number]: [string, CloseAction] } = {};
  for (const row of rows.slice(1)) {
    if (!/^\d+$/.test(row[codeColumn])) continue;
    const advice = row[adviceColumn];
    const action: CloseAction = /^No\b/.test(advice)
      ? "stop"
      : /new token/i.test(advice)
        ? "token"
        : /backoff/i.test(advice)
          ? "backoff"
          : "reconnect";
    assert.match(advice, /^(Yes|No)\b/, `code ${row[codeColumn]}: advice "${advice}"`);
    table[Number(row[codeColumn])] = [row[reasonColumn].replace(/`/g, ""), action];
  }
  return table;
}

describe("close codes", () => {
  test("CLOSE_CODES matches the table in docs/PROTOCOL.md", () => {
    const documented = documentedCloseCodes();
    assert.ok(Object.keys(documented).length >= 10, "the table was not parsed");
    const client = Object.fromEntries(Object.entries(CLOSE_CODES).map(([code, entry]) => [code, [...entry]]));
    assert.deepEqual(client, documented);
  });

  test("the decisions the issue names", () => {
    const check = (code: number, expected: CloseAction) => assert.equal(closeAction(code), expected, String(code));
    check(4001, "token"); // token expired: new token, then reconnect
    check(4004, "stop"); // forbidden: stop and report
    check(1001, "reconnect"); // shutdown: reconnect after a jittered delay
    check(4002, "reconnect"); // slow consumer: reconnect, then resync
    check(4003, "reconnect");
    check(4005, "backoff");
    check(4006, "backoff");
    check(1002, "stop");
    check(1007, "stop");
    check(1009, "stop");
    check(1006, "reconnect"); // lost without a close frame
    check(4999, "reconnect"); // unknown codes reconnect
  });
});
