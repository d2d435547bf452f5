// End to end: the listener page plays the demo broadcast over WebRTC (WHEP) from `tern demo`.
// Run with tests/browser/run.sh (loopback-only network namespace) or `node --test tests/browser/`.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { health, launchBrowser, listenerCount, sleep, startTern, waitFor } from "./harness.mjs";

const BROADCAST = "demo";
let tern;
let browser;
let page;

const stats = () => page.evaluate(() => window.tern.stats());

/** Diagnostics appended to assertion messages. */
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

test("page connects over WebRTC and receives Opus audio", { timeout: 60_000 }, async (t) => {
  await page.goto(`${tern.base}/`);
  await page.getByRole("button", { name: "Listen (WebRTC)", exact: true }).click();

  try {
    await page.waitForFunction(
      () => ["connected", "failed"].includes(document.getElementById("status").dataset.state),
      null,
      { timeout: 20_000 },
    );
  } catch (err) {
    assert.fail(`no connection within 20 s: ${await page.textContent("#status")}${context()}`);
  }
  const state = await page.getAttribute("#status", "data-state");
  assert.equal(state, "connected", `status: ${await page.textContent("#status")}${context()}`);
  // The page asked the router (the demo routes to its own relay) before listening.
  const route = await page.evaluate(() => window.tern.route);
  assert.equal(route && route.tier, "webrtc", `route: ${JSON.stringify(route)}`);
  assert.equal(route.relay_id, "local", `route: ${JSON.stringify(route)}`);

  // First packet, then sample for 3 s.
  await waitFor(async () => (await stats()).packetsReceived > 0, {
    timeoutMs: 10_000,
    what: "the first RTP packet",
  });
  const first = await stats();
  const samples = [first];
  const t0 = Date.now();
  while (Date.now() - t0 < 3_000) {
    await sleep(250);
    samples.push(await stats());
  }
  const last = samples.at(-1);
  const received = last.packetsReceived - first.packetsReceived;
  const maxLevel = Math.max(...samples.map((s) => s.audioLevel));
  const summary = JSON.stringify({ first, last, maxLevel });
  t.diagnostic(`3 s of WebRTC: ${received} packets, ${summary}`);

  assert.ok(received >= 100, `only ${received} packets in 3 s (expected >= 100 at 50 pkt/s): ${summary}`);
  assert.equal(last.packetsLost, 0, `packets lost: ${summary}`);
  // Digital silence still reads ~3e-5 (one LSB), so "> 0" alone would pass on silence:
  // require something above -60 dBFS, which any test tone clears.
  assert.ok(maxLevel > 0.001, `audio level stayed at silence (max ${maxLevel}): ${summary}`);
  assert.equal(String(last.codec).toLowerCase(), "audio/opus", `codec: ${summary}`);
});

test("RTCP flows both ways: sender reports reach the browser, its reports reach the relay", {
  timeout: 40_000,
}, async () => {
  // The relay writes its own sender reports (it seals media itself); the browser shows them
  // as remote-outbound-rtp, with the packet count the relay sent.
  let sr = null;
  try {
    await waitFor(async () => {
      sr = await page.evaluate(async () => {
        let out = null;
        (await window.tern.pc.getStats()).forEach((s) => {
          if (s.type === "remote-outbound-rtp") {
            out = { packetsSent: s.packetsSent, bytesSent: s.bytesSent, reportsSent: s.reportsSent };
          }
        });
        return out;
      });
      return sr !== null && sr.packetsSent > 0;
    }, { timeoutMs: 15_000, what: "a sender report (remote-outbound-rtp) in the browser" });
  } catch (err) {
    assert.fail(`${err.message}: ${JSON.stringify(sr)}${context()}`);
  }
  // The browser's receiver reports, decrypted and read by the relay, feed the loss metric.
  let count = 0;
  try {
    await waitFor(async () => {
      const text = await (await fetch(`${tern.base}/metrics`)).text();
      const m = text.match(/^tern_relay_listener_loss_ratio_count (\d+)/m);
      count = m ? Number(m[1]) : 0;
      return count > 0;
    }, { timeoutMs: 15_000, what: "a receiver report counted in /metrics" });
  } catch (err) {
    assert.fail(`${err.message}${context()}`);
  }
});

test("relay and browser agree on the SRTP profile the handshake chose", { timeout: 15_000 }, async (t) => {
  const cipher = await page.evaluate(async () => {
    let out = null;
    (await window.tern.pc.getStats()).forEach((s) => {
      if (s.type === "transport" && s.srtpCipher) out = s.srtpCipher;
    });
    return out;
  });
  const text = await (await fetch(`${tern.base}/metrics`)).text();
  const sessions = [...text.matchAll(/^tern_relay_srtp_sessions_total\{profile="([^"]+)"\} (\d+)/gm)]
    .map((m) => [m[1], Number(m[2])]);
  t.diagnostic(`browser srtpCipher ${cipher}; relay ${JSON.stringify(sessions)}`);
  assert.ok(cipher, "the browser reports its SRTP cipher");
  // Chromium names profiles as BoringSSL does (SRTP_AES128_CM_SHA1_80), the relay as IANA's
  // registry does (SRTP_AES128_CM_HMAC_SHA1_80); the GCM names are the same in both.
  const same = (name) => name.replace("_HMAC_", "_");
  // One listener so far: exactly one session, under the profile the browser names.
  assert.deepEqual(sessions.map(([p, n]) => [same(p), n]), [[same(cipher), 1]],
    `relay: ${JSON.stringify(sessions)}${context()}`);
});

test("after the relay frees its WebRTC state, its consent answers keep the browser connected", {
  timeout: 40_000,
}, async () => {
  const metric = async (name) => {
    const text = await (await fetch(`${tern.base}/metrics`)).text();
    const m = text.match(new RegExp(`^${name} (\\d+)`, "m"));
    return m ? Number(m[1]) : 0;
  };
  // The browser's first receiver report proves its handshake finished: the relay hands the
  // listener off from str0m and answers its STUN consent checks itself.
  await waitFor(async () => (await metric("tern_relay_handoffs_total")) >= 1, {
    timeoutMs: 20_000,
    what: "the listener handed off",
  });
  const pair = () => page.evaluate(async () => {
    let out = null;
    (await window.tern.pc.getStats()).forEach((s) => {
      if (s.type === "candidate-pair" && s.nominated) {
        out = { responsesReceived: s.responsesReceived, requestsSent: s.requestsSent, state: s.state };
      }
    });
    return out;
  });
  const before = await pair();
  const answered = await metric("tern_relay_consent_answers_total");
  // The browser only counts responses whose MESSAGE-INTEGRITY and FINGERPRINT verify.
  let now = before;
  try {
    await waitFor(async () => {
      now = await pair();
      return now && now.responsesReceived >= before.responsesReceived + 2;
    }, { timeoutMs: 20_000, what: "two more verified consent responses in the browser" });
  } catch (err) {
    assert.fail(`${err.message}: before ${JSON.stringify(before)}, now ${JSON.stringify(now)}${context()}`);
  }
  assert.ok((await metric("tern_relay_consent_answers_total")) > answered, "answers came from the core");
  assert.equal(now.state, "succeeded");
  const a = await stats();
  await sleep(1_000);
  const b = await stats();
  assert.ok(b.packetsReceived - a.packetsReceived >= 40, "media still flows");
});

test("/health counts the connected listener", { timeout: 15_000 }, async () => {
  let last;
  try {
    await waitFor(async () => {
      last = await health(tern.base);
      return (listenerCount(last, BROADCAST) ?? 0) >= 1;
    }, { timeoutMs: 5_000, what: "listeners >= 1 in /health" });
  } catch (err) {
    assert.fail(`${err.message}; /health: ${JSON.stringify(last)}`);
  }
});

test("bad WHEP requests are refused without disturbing the listener", { timeout: 30_000 }, async () => {
  // Not SDP at all.
  const bad = await fetch(`${tern.base}/whep/${BROADCAST}`, {
    method: "POST",
    headers: { "Content-Type": "application/sdp" },
    body: "hello",
  });
  const badReason = (await bad.text()).trim();
  assert.equal(bad.status, 400, `non-SDP offer: HTTP ${bad.status} ${badReason}`);
  assert.ok(badReason.length > 0, "400 must carry a reason in the body");

  // A real browser offer, for a broadcast that does not exist.
  const offer = await page.evaluate(async () => {
    const pc = new RTCPeerConnection();
    pc.addTransceiver("audio", { direction: "recvonly" });
    await pc.setLocalDescription(await pc.createOffer());
    const sdp = pc.localDescription.sdp;
    pc.close();
    return sdp;
  });
  const missing = await fetch(`${tern.base}/whep/nope`, {
    method: "POST",
    headers: { "Content-Type": "application/sdp" },
    body: offer,
  });
  const missingBody = await missing.text();
  assert.equal(missing.status, 404, `unknown broadcast: HTTP ${missing.status} ${missingBody}`);

  // The connected listener keeps receiving.
  const before = await stats();
  await sleep(1_500);
  const afterwards = await stats();
  const delta = afterwards.packetsReceived - before.packetsReceived;
  assert.ok(delta >= 40, `listener stalled after bad requests: ${delta} packets in 1.5 s${context()}`);
  assert.equal(await page.getAttribute("#status", "data-state"), "connected");
});

test("Stop ends the WHEP session", { timeout: 20_000 }, async () => {
  const session = await page.evaluate(() => window.tern.session);
  assert.ok(session && new URL(session).pathname.startsWith(`/whep/${BROADCAST}/`),
    `Location of the session: ${session}`);
  await page.getByRole("button", { name: "Stop", exact: true }).click();
  // The page closes the connection once the relay has answered the DELETE (see teardown in
  // web/index.html), so not necessarily by the time the click returns: a loaded machine
  // made an immediate check fail.
  await waitFor(() => page.evaluate(() => window.tern.pc.connectionState === "closed"), {
    timeoutMs: 3_000,
    what: "the peer connection to close after Stop",
  });

  let last;
  try {
    await waitFor(async () => {
      last = await health(tern.base);
      return listenerCount(last, BROADCAST) === 0;
    }, { timeoutMs: 5_000, what: "0 listeners in /health" });
  } catch (err) {
    assert.fail(`${err.message}; /health: ${JSON.stringify(last)}`);
  }
  // And the session URL is gone.
  const again = await fetch(session, { method: "DELETE" });
  await again.arrayBuffer();
  assert.ok(again.status >= 400 && again.status < 500, `DELETE of an ended session: HTTP ${again.status}`);
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
