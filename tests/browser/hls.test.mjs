// End to end: the listener page plays the demo broadcast's HLS ladder (hls.js from /vendor).
// Run with tests/browser/run.sh (loopback-only network namespace) or `node --test tests/browser/`.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { launchBrowser, sleep, startTern, waitFor } from "./harness.mjs";

const BROADCAST = "demo";
let tern;
let browser;
let page;

const context = () =>
  `\n--- page console ---\n${browser ? browser.console() : ""}\n--- tern log ---\n${tern ? tern.log() : ""}`;

before(async () => {
  tern = await startTern();
  browser = await launchBrowser();
  page = browser.page;
});

after(async () => {
  if (browser) await browser.close();
  if (tern) await tern.stop();
});

test("hls.js is served from /vendor", { timeout: 10_000 }, async () => {
  const r = await fetch(`${tern.base}/vendor/hls.min.js`);
  const body = await r.text();
  assert.equal(r.status, 200);
  assert.match(r.headers.get("content-type") || "", /javascript/);
  assert.ok(body.length > 100_000 && body.includes("Hls"), `unexpected hls.min.js (${body.length} bytes)`);
});

test("master playlist appears", { timeout: 30_000 }, async () => {
  let last = "";
  try {
    await waitFor(async () => {
      const r = await fetch(`${tern.base}/hls/${BROADCAST}/master.m3u8`, { signal: AbortSignal.timeout(2000) });
      last = `HTTP ${r.status}: ${(await r.text()).slice(0, 300)}`;
      return r.status === 200;
    }, { timeoutMs: 20_000, intervalMs: 500, what: "GET master.m3u8 -> 200" });
  } catch (err) {
    assert.fail(`${err.message}; last answer ${last}${context()}`);
  }
  assert.match(last, /#EXTM3U/);
});

test("Play HLS plays the 64k/128k ladder with hls.js", { timeout: 45_000 }, async () => {
  await page.goto(`${tern.base}/`);
  await page.getByRole("button", { name: "Play HLS", exact: true }).click();

  const snapshot = () => page.evaluate(() => {
    const a = document.getElementById("hls-audio");
    const h = window.tern.hls;
    return {
      currentTime: a.currentTime,
      paused: a.paused,
      status: document.getElementById("hls-status").textContent,
      hasHls: !!h,
      levels: h ? h.levels.map((l) => ({ bitrate: l.bitrate, url: String(l.url) })) : [],
      fatal: window.tern.hlsErrors.filter((e) => e.fatal),
    };
  });

  // Playback started: time is moving and nothing fatal happened.
  let s;
  const deadline = Date.now() + 20_000;
  let start = null;
  for (;;) {
    s = await snapshot();
    assert.deepEqual(s.fatal, [], `fatal hls.js error: ${JSON.stringify(s)}${context()}`);
    if (start === null && !s.paused && s.currentTime > 0) start = s.currentTime;
    if (start !== null && s.currentTime - start >= 2) break;
    if (Date.now() > deadline) {
      assert.fail(`currentTime did not advance by 2 s within 20 s (start ${start}): ${JSON.stringify(s)}${context()}`);
    }
    await sleep(250);
  }

  assert.ok(s.hasHls, "hls.js was not used (window.tern.hls missing)");
  assert.equal(s.levels.length, 2, `levels: ${JSON.stringify(s.levels)}`);
  const urls = s.levels.map((l) => new URL(l.url, tern.base).pathname).sort();
  assert.deepEqual(urls, [`/hls/${BROADCAST}/128k/index.m3u8`, `/hls/${BROADCAST}/64k/index.m3u8`],
    `level playlists: ${JSON.stringify(s.levels)}`);
});

test("tern exits 0 on SIGINT", { timeout: 15_000 }, async () => {
  await browser.close();
  browser = null;
  const r = await tern.stop();
  const log = tern.log();
  tern = null;
  assert.equal(r.timedOut, false, `tern did not exit within 5 s of SIGINT:\n${log}`);
  assert.deepEqual({ code: r.code, signal: r.signal }, { code: 0, signal: null }, `exit status:\n${log}`);
});
