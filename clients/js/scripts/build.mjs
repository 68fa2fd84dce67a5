// Builds dist/: herald.js (ESM, readable), herald.min.js (ESM, minified, the
// file the herald binary embeds and serves at /herald.min.js) and the .d.ts
// declarations. `node scripts/build.mjs [OUTDIR]`; OUTDIR defaults to dist.
//
// The output depends only on src/ and the pinned tool versions, so a unit
// test rebuilds into a temporary directory and compares it with dist/.
import { execFileSync } from "node:child_process";
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const root = fileURLToPath(new URL("..", import.meta.url));
const require = createRequire(import.meta.url);

export async function build(outdir = join(root, "dist")) {
  outdir = resolve(root, outdir);
  rmSync(outdir, { recursive: true, force: true });
  mkdirSync(outdir, { recursive: true });
  const common = {
    absWorkingDir: root,
    entryPoints: ["src/herald.ts"],
    bundle: true,
    format: "esm",
    target: "es2020",
    platform: "neutral",
    charset: "utf8",
    legalComments: "none",
    logLevel: "warning",
  };
  await esbuild.build({ ...common, outfile: join(outdir, "herald.js") });
  await esbuild.build({
    ...common,
    outfile: join(outdir, "herald.min.js"),
    minify: true,
    // Internal members all start with "_"; none is part of the wire protocol.
    mangleProps: /^_/,
  });
  execFileSync(
    process.execPath,
    [require.resolve("typescript/bin/tsc"), "-p", "tsconfig.json", "--emitDeclarationOnly", "--outDir", outdir],
    { cwd: root, stdio: "inherit" },
  );
  writeFileSync(join(outdir, "herald.min.d.ts"), 'export * from "./herald.js";\n');
  return outdir;
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const outdir = await build(process.argv[2]);
  console.log(`built ${outdir}`);
}
