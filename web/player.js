// Tern's listener player, served at /player.js. Plain script, no build step: it defines
// window.TernPlayer, the pieces a listener page needs to
//   1. ask the router where to listen (GET /v1/route/{broadcast}),
//   2. listen over WHEP at the relay it names (a POST that may be 307-redirected),
//   3. notice when that relay drains or dies (ICE disconnected/failed, or the audio packets
//      stop) and route again,
//   4. play HLS when told to (passive listening, relays full) or when WebRTC fails.
// The demo page (/) uses it; any page can: see docs/routing.md.
"use strict";
(() => {
  // Re-route this long after ICE reports trouble: long enough to let a closing page's own
  // teardown win, short enough that a listener hears a gap of about a second.
  const REROUTE_MS = 250;
  // More re-routes than this within REROUTE_WINDOW_MS: stop trying WebRTC, play HLS.
  const MAX_REROUTES = 3;
  const REROUTE_WINDOW_MS = 30_000;
  // No audio packet for this long (after the first) counts as losing the relay. Opus DTX
  // sends a packet every 400 ms even in silence, so 700 ms without one is not a quiet
  // speaker; with a ~100 ms re-route the listener hears about a second of silence.
  const STALL_MS = 700;

  /**
   * Where to listen: { tier: "webrtc"|"hls", url, relay_id, region, reason }.
   * A server without a router (404) or a router that does not answer means "this server":
   * its own WHEP endpoint, or its own HLS when passive.
   */
  async function route(broadcast, { passive = false, base = "" } = {}) {
    const enc = encodeURIComponent(broadcast);
    try {
      const r = await fetch(`${base}/v1/route/${enc}${passive ? "?passive=1" : ""}`, {
        cache: "no-store",
        signal: AbortSignal.timeout(3000),
      });
      if (r.ok) return await r.json();
    } catch { /* fall through to this server */ }
    return passive
      ? { tier: "hls", url: `${base}/hls/${enc}/master.m3u8`, relay_id: null, region: null, reason: "no_router" }
      : { tier: "webrtc", url: `${base}/whep/${enc}`, relay_id: null, region: null, reason: "no_router" };
  }

  /**
   * POSTs the offer of `pc` (already set as local description) to a WHEP URL. fetch follows
   * a router's 307 and repeats the POST with the same body. Resolves to
   * { session: absolute URL or null, answer: SDP }; rejects with an Error carrying .status
   * (and .hls, the Link rel=alternate HLS URL, when a router has no relay to offer).
   */
  async function whep(pc, url) {
    const res = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/sdp" },
      body: pc.localDescription.sdp,
    });
    const body = await res.text();
    if (res.status !== 201) {
      const why = body.trim() || res.statusText || "no reason given";
      const err = new Error(`Server answered ${res.status}: ${why}`);
      err.status = res.status;
      const link = res.headers.get("Link");
      const m = link && link.match(/<([^>]+)>/);
      if (m) err.hls = m[1];
      throw err;
    }
    const loc = res.headers.get("Location");
    // res.url is the relay's URL after a redirect: the session lives there.
    return { session: loc ? new URL(loc, res.url).href : null, answer: body };
  }

  /** Counts re-routes; says when there have been too many to keep trying WebRTC. */
  function rerouteBudget() {
    let times = [];
    return {
      take() {
        const now = Date.now();
        times = times.filter((t) => now - t < REROUTE_WINDOW_MS);
        times.push(now);
        return times.length <= MAX_REROUTES;
      },
      reset() { times = []; },
    };
  }

  /**
   * Calls onLost(state) once when `pc` reports ICE "disconnected" or "failed" (the relay
   * drained, died or became unreachable), or the connection "failed".
   */
  function watch(pc, onLost) {
    let fired = false;
    const check = () => {
      if (fired) return;
      const ice = pc.iceConnectionState, conn = pc.connectionState;
      if (ice === "disconnected" || ice === "failed" || conn === "failed") {
        fired = true;
        setTimeout(() => onLost(ice === "disconnected" ? "disconnected" : "failed"), REROUTE_MS);
      }
    };
    pc.addEventListener("iceconnectionstatechange", check);
    pc.addEventListener("connectionstatechange", check);
  }

  /**
   * Calls onStall() once when audio packets stop arriving for STALL_MS after they had
   * started. A relay killed outright is only reported by ICE after its consent checks time
   * out (about 6 s in Chromium); the packet flow says so sooner. Returns a function that
   * stops watching.
   */
  function watchFlow(pc, onStall, { stallMs = STALL_MS, everyMs = 100 } = {}) {
    let last = -1, since = Date.now(), done = false;
    const timer = setInterval(async () => {
      if (done || pc.connectionState === "closed") { clearInterval(timer); return; }
      let received = 0;
      try {
        const report = await pc.getStats();
        report.forEach((s) => {
          if (s.type === "inbound-rtp" && (s.kind === "audio" || s.mediaType === "audio")) {
            received += s.packetsReceived || 0;
          }
        });
      } catch { return; }
      const now = Date.now();
      if (received !== last) { last = received; since = now; return; }
      if (received > 0 && now - since >= stallMs) {
        done = true;
        clearInterval(timer);
        onStall();
      }
    }, everyMs);
    return () => { done = true; clearInterval(timer); };
  }

  window.TernPlayer = { route, whep, watch, watchFlow, rerouteBudget, REROUTE_MS, STALL_MS };
})();
