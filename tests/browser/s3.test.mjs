// End to end through S3: `tern demo` pushes its HLS to moto (a real S3 API server, from
// scripts/setup's target/venv), and hls.js in headless Chromium plays both renditions straight
// from the bucket's path-style URLs (cross-origin, so CORS matters), as it would from a CDN.
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { freePort, launchBrowser, sleep, startTern, waitFor } from "./harness.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const MOTO = resolve(here, "../../target/venv/bin/moto_server");
const BUCKET = "tern-hls";
let moto;
let motoBase;
let tern;
let browser;
let spool;

before(async () => {
  assert.ok(existsSync(MOTO), `${MOTO} is missing: run scripts/setup`);
  const port = await freePort();
  motoBase = `http://127.0.0.1:${port}`;
  moto = spawn(MOTO, ["-H", "127.0.0.1", "-p", String(port)], { stdio: "ignore" });
  await waitFor(async () => {
    try { return (await fetch(`${motoBase}/`, { signal: AbortSignal.timeout(1000) })).status < 500; } catch { return false; }
  }, { timeoutMs: 30_000, intervalMs: 200, what: "moto up" });
  // The bucket, readable anonymously (moto enforces bucket policies for unsigned GETs) as
  // CloudFront would read it. moto's server answers every Origin with CORS headers (as the
  // response headers policy of cdn/cloudformation.yaml does).
  const py = spawnSync(resolve(here, "../../target/venv/bin/python"), ["-c", `
import boto3, json
s3 = boto3.client("s3", endpoint_url="${motoBase}", aws_access_key_id="test",
                  aws_secret_access_key="test", region_name="us-east-1")
s3.create_bucket(Bucket="${BUCKET}")
s3.put_bucket_policy(Bucket="${BUCKET}", Policy=json.dumps({"Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
                   "Resource": "arn:aws:s3:::${BUCKET}/*"}]}))
`], { encoding: "utf8" });
  assert.equal(py.status, 0, py.stderr);

  spool = mkdtempSync(join(tmpdir(), "tern-s3-browser-"));
  Object.assign(process.env, {
    TERN_PACKAGER__S3__BUCKET: BUCKET,
    TERN_PACKAGER__S3__ENDPOINT: motoBase,
    TERN_PACKAGER__S3__PATH_STYLE: "true",
    TERN_PACKAGER__S3__PREFIX: "live",
    TERN_PACKAGER__S3__SPOOL_DIR: spool,
    AWS_ACCESS_KEY_ID: "test",
    AWS_SECRET_ACCESS_KEY: "test",
    AWS_EC2_METADATA_DISABLED: "true",
  });
  tern = await startTern();
  browser = await launchBrowser();
});

after(async () => {
  if (browser) await browser.close();
  if (tern) await tern.stop({ graceMs: 10_000 });
  if (moto) moto.kill("SIGKILL");
  if (spool) rmSync(spool, { recursive: true, force: true });
});

test("hls.js plays the S3-served ladder", { timeout: 60_000 }, async () => {
  const master = `${motoBase}/${BUCKET}/live/demo/master.m3u8`;
  await waitFor(async () => {
    const r = await fetch(master);
    if (r.status !== 200) return false;
    const pl = await fetch(`${motoBase}/${BUCKET}/live/demo/128k/index.m3u8`);
    return pl.status === 200 && (await pl.text()).includes(".m4s");
  }, { timeoutMs: 20_000, intervalMs: 500, what: "S3 playlists" });
  const head = await fetch(master, { headers: { Origin: "http://elsewhere.example" } });
  assert.equal(head.headers.get("content-type"), "application/vnd.apple.mpegurl");
  assert.equal(head.headers.get("cache-control"), "max-age=60");
  assert.ok(head.headers.get("access-control-allow-origin"), "CORS header present");

  const page = browser.page;
  // The listener page only for its copy of hls.js; the source is the bucket.
  await page.goto(`${tern.base}/`);
  await page.evaluate(() => new Promise((res, rej) => {
    if (window.Hls) return res();
    const s = document.createElement("script");
    s.src = "/vendor/hls.min.js";
    s.onload = res;
    s.onerror = rej;
    document.head.appendChild(s);
  }));
  await page.evaluate((src) => {
    const a = document.createElement("audio");
    a.id = "s3-audio";
    document.body.appendChild(a);
    const h = new window.Hls();
    window.s3 = { hls: h, errors: [] };
    h.on(window.Hls.Events.ERROR, (_, d) => window.s3.errors.push({ type: d.type, details: d.details, fatal: d.fatal }));
    h.loadSource(src);
    h.attachMedia(a);
    h.on(window.Hls.Events.MANIFEST_PARSED, () => a.play());
  }, master);

  const snapshot = () => page.evaluate(() => {
    const a = document.getElementById("s3-audio");
    return {
      currentTime: a.currentTime,
      paused: a.paused,
      levels: window.s3.hls.levels.map((l) => String(l.url)),
      fatal: window.s3.errors.filter((e) => e.fatal),
    };
  });
  let s;
  let start = null;
  const deadline = Date.now() + 30_000;
  for (;;) {
    s = await snapshot();
    assert.deepEqual(s.fatal, [], `fatal hls.js error: ${JSON.stringify(s)}\n${tern.log()}`);
    if (start === null && !s.paused && s.currentTime > 0) start = s.currentTime;
    if (start !== null && s.currentTime - start >= 3) break;
    assert.ok(Date.now() < deadline, `no playback from S3: ${JSON.stringify(s)}\n${tern.log()}`);
    await sleep(250);
  }
  const paths = s.levels.map((u) => new URL(u).pathname).sort();
  assert.deepEqual(paths, [`/${BUCKET}/live/demo/128k/index.m3u8`, `/${BUCKET}/live/demo/64k/index.m3u8`]);
  // Both renditions are decodable: switch to the other level and keep playing.
  const first = await page.evaluate(() => window.s3.hls.currentLevel);
  await page.evaluate((l) => { window.s3.hls.currentLevel = l; }, first === 0 ? 1 : 0);
  const t0 = (await snapshot()).currentTime;
  await waitFor(async () => (await snapshot()).currentTime - t0 >= 3, { timeoutMs: 20_000, what: "playback after level switch" });
  s = await snapshot();
  assert.deepEqual(s.fatal, []);
});
