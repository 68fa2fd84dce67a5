// Removes the directories named on the command line (relative to the package).
// Used by `npm test` so that compiled tests never include stale files.
import { rmSync } from "node:fs";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("..", import.meta.url));
for (const dir of process.argv.slice(2)) {
  rmSync(new URL(dir, `file://${root}`), { recursive: true, force: true });
}
