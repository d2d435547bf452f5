// Shared helpers for the browser end-to-end tests: start/stop `tern demo`, launch headless
// Chromium through playwright-core, small HTTP helpers. Not a test file itself (the node:test
// runner only picks up *.test.mjs here).
import { spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));

/** The tern binary: $TERN_BIN, else target/debug/tern of this checkout. */
export const TERN_BIN = process.env.TERN_BIN
  ? resolve(process.env.TERN_BIN)
  : resolve(here, "../../target/debug/tern");

/** The browser: $CHROMIUM, else the system Chromium. Never downloaded. */
export const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

/** Flags from docs (PEERS.md): headless, no extras, loopback ICE allowed, no QUIC. */
export const CHROMIUM_FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--autoplay-policy=no-user-gesture-required",
  "--allow-loopback-in-peer-connection",
  "--disable-quic",
];

export { sleep };

/** Poll `fn` until it returns a truthy value or `timeoutMs` passes; returns that value. */
export async function waitFor(fn, { timeoutMs = 10_000, intervalMs = 200, what = "condition" } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
      last = v;
    } catch (err) {
      last = err;
    }
    if (Date.now() >= deadline) {
      const detail = last instanceof Error ? last.message : JSON.stringify(last);
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${detail})`);
    }
    await sleep(intervalMs);
  }
}

/** A TCP port that was free a moment ago on 127.0.0.1. */
export function freePort() {
  return new Promise((res, rej) => {
    const srv = createServer();
    srv.unref();
    srv.on("error", rej);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => res(port));
    });
  });
}

/**
 * Start `tern demo --http 127.0.0.1:PORT` (or `tern ARGS... --http ...` with `args`, and
 * extra environment `env`) and wait until GET /health answers 200.
 * Returns { base, port, log(), stop() }; stop() sends SIGINT and resolves to
 * { code, signal, timedOut } (SIGKILL after `graceMs`).
 * Set TERN_TEST_LOG=1 to see tern's output live.
 */
export async function startTern({ readyTimeoutMs = 30_000, args = ["demo"], env = {} } = {}) {
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  const lines = [];
  const child = spawn(TERN_BIN, [...args, "--http", `127.0.0.1:${port}`], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, RUST_BACKTRACE: process.env.RUST_BACKTRACE || "1", ...env },
  });
  const keep = (chunk) => {
    const text = chunk.toString();
    if (process.env.TERN_TEST_LOG) process.stderr.write(text);
    lines.push(...text.split("\n").filter(Boolean));
    if (lines.length > 400) lines.splice(0, lines.length - 400);
  };
  child.stdout.on("data", keep);
  child.stderr.on("data", keep);
  // Once tern is gone, drop its pipes too: a stray grandchild holding them open must not keep
  // this test process alive.
  const release = () => { child.stdout.destroy(); child.stderr.destroy(); };
  const exited = new Promise((res) => child.once("exit", (code, signal) => {
    setTimeout(release, 200).unref();
    res({ code, signal });
  }));
  let spawnError = null;
  child.once("error", (err) => { spawnError = err; });
  const log = () => lines.slice(-60).join("\n");

  const deadline = Date.now() + readyTimeoutMs;
  for (;;) {
    if (spawnError) {
      release();
      throw new Error(`cannot start ${TERN_BIN}: ${spawnError.message}`);
    }
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`tern exited early (code ${child.exitCode}, signal ${child.signalCode}):\n${log()}`);
    }
    try {
      const r = await fetch(`${base}/health`, { signal: AbortSignal.timeout(1000) });
      if (r.ok) { await r.arrayBuffer(); break; }
    } catch { /* not up yet */ }
    if (Date.now() > deadline) {
      child.kill("SIGKILL");
      release();
      throw new Error(`tern did not answer GET /health within ${readyTimeoutMs} ms:\n${log()}`);
    }
    await sleep(100);
  }

  let stopped = null;
  const stop = ({ graceMs = 5_000 } = {}) => {
    if (stopped) return stopped;
    stopped = (async () => {
      if (child.exitCode !== null || child.signalCode !== null) {
        return { ...(await exited), timedOut: false, alreadyExited: true };
      }
      child.kill("SIGINT");
      const timer = sleep(graceMs).then(() => null);
      const result = await Promise.race([exited, timer]);
      if (result) return { ...result, timedOut: false };
      child.kill("SIGKILL");
      return { ...(await exited), timedOut: true };
    })();
    return stopped;
  };
  return { base, port, child, log, stop };
}

/**
 * Launch headless Chromium with a fresh profile directory (removed by close()).
 * Returns { context, page, close() }.
 */
export async function launchBrowser() {
  const userDataDir = await mkdtemp(join(tmpdir(), "tern-chromium-"));
  let context;
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM,
      headless: true,
      args: CHROMIUM_FLAGS,
      // Chromium only enumerates every interface (loopback included, with
      // --allow-loopback-in-peer-connection) for origins with media permission. Without it, it
      // gathers on the default route only, and a loopback-only namespace has none: no ICE
      // candidates at all. The page never calls getUserMedia; the grant only unlocks gathering.
      permissions: ["microphone"],
      viewport: { width: 900, height: 900 },
    });
  } catch (err) {
    await rm(userDataDir, { recursive: true, force: true });
    throw err;
  }
  const page = context.pages()[0] || (await context.newPage());
  const consoleLines = [];
  page.on("console", (m) => consoleLines.push(`[${m.type()}] ${m.text()}`));
  page.on("pageerror", (e) => consoleLines.push(`[pageerror] ${e.message}`));
  const close = async () => {
    try { await context.close(); } catch { /* already gone */ }
    await rm(userDataDir, { recursive: true, force: true });
  };
  return { context, page, close, console: () => consoleLines.slice(-40).join("\n") };
}

/** GET /health as JSON. */
export async function health(base) {
  const r = await fetch(`${base}/health`, { signal: AbortSignal.timeout(3000) });
  if (!r.ok) throw new Error(`GET /health -> ${r.status}`);
  return r.json();
}

/**
 * Listener count from /health, tolerant about its shape. Prefers
 * listeners.per_broadcast[broadcast], then listeners.total, then a bare numeric `listeners`.
 * Returns null when no such field exists.
 */
export function listenerCount(h, broadcast) {
  const l = h && h.listeners;
  if (typeof l === "number") return l;
  if (l && typeof l === "object") {
    if (broadcast && l.per_broadcast && typeof l.per_broadcast[broadcast] === "number") {
      return l.per_broadcast[broadcast];
    }
    if (typeof l.total === "number") return l.total;
  }
  return null;
}
