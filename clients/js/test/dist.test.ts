// The committed dist/: the size budget, freshness against src/, and the
// client's behaviour once more, through the minified bundle that the herald
// binary embeds and serves at /herald.min.js.

import assert from "node:assert/strict";
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";

import type * as HeraldModule from "../src/herald.js";
import { defineClientTests } from "./scenarios.js";

const packageRoot = fileURLToPath(new URL("../../", import.meta.url));
const dist = join(packageRoot, "dist");
const SIZE_BUDGET = 6 * 1024;

describe("dist", () => {
  test(`herald.min.js is at most ${SIZE_BUDGET} bytes gzipped`, () => {
    const minified = readFileSync(join(dist, "herald.min.js"));
    const gzipped = gzipSync(minified, { level: 9 }).length;
    assert.ok(gzipped <= SIZE_BUDGET, `herald.min.js is ${gzipped} bytes gzipped, over the ${SIZE_BUDGET}-byte budget`);
  });

  test("dist/ is up to date with src/ (run `npm run build` and commit dist/)", async () => {
    const scratch = mkdtempSync(join(tmpdir(), "herald-dist-"));
    try {
      const buildScript = new URL("../../scripts/build.mjs", import.meta.url).href;
      const { build } = await import(buildScript);
      await build(scratch);
      const expected = readdirSync(scratch).sort();
      assert.deepEqual(readdirSync(dist).sort(), expected, "dist/ has different files than a fresh build");
      for (const file of expected) {
        const fresh = readFileSync(join(scratch, file), "utf8");
        const committed = readFileSync(join(dist, file), "utf8");
        assert.ok(committed === fresh, `dist/${file} differs from a fresh build of src/`);
      }
    } finally {
      rmSync(scratch, { recursive: true, force: true });
    }
  });

  test("the minified bundle exports the public API", async () => {
    const bundle: typeof HeraldModule = await import(new URL("../../dist/herald.min.js", import.meta.url).href);
    for (const name of ["Herald", "Subscription", "HeraldError", "UnauthorizedError", "CLOSE_CODES", "closeAction", "backoff"]) {
      assert.ok(name in bundle, `herald.min.js does not export ${name}`);
    }
  });
});

const bundle: typeof HeraldModule = await import(new URL("../../dist/herald.min.js", import.meta.url).href);
defineClientTests("herald.min.js", { Herald: bundle.Herald, UnauthorizedError: bundle.UnauthorizedError });
