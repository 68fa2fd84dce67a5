// The client's behaviour, run against the compiled TypeScript source.
import { Herald, UnauthorizedError } from "../src/herald.js";
import { defineClientTests } from "./scenarios.js";

defineClientTests("source", { Herald, UnauthorizedError });
