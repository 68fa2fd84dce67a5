export * from "./herald.js";
