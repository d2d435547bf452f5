//! Geo-routing end to end: one origin, three relays in three "regions" (real `tern relay`
//! processes on loopback), and a standalone `tern router` with MaxMind's GeoIP2 City test
//! database. Clients are simulated with X-Forwarded-For from the trusted proxy 127.0.0.1.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_udp, Tern};
use serde_json::Value;
use str0m::media::{Direction, MediaKind};
use str0m::{Candidate, Rtc};

const POLL_MS: u64 = 300;

struct Resp {
    status: u16,
    location: Option<String>,
    link: Option<String>,
    body: String,
}

/// One HTTP/1.1 request with `X-Forwarded-For: client`.
fn http(addr: SocketAddr, method: &str, path: &str, client: &str, body: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nX-Forwarded-For: {client}\r\n\
         Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            })
            .map(|(_, v)| v.trim().to_owned())
    };
    Resp {
        status: head[9..12].parse().unwrap(),
        location: header("location"),
        link: header("link"),
        body: body.to_owned(),
    }
}

fn route(router: &Tern, client: &str, query: &str) -> Value {
    let r = http(
        router.addr,
        "GET",
        &format!("/v1/route/demo{query}"),
        client,
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

fn relay_of(v: &Value) -> &str {
    v["relay_id"].as_str().unwrap_or("-")
}

/// Asks until `want(decision)` holds; returns how long that took.
fn route_until(
    router: &Tern,
    client: &str,
    within: Duration,
    want: impl Fn(&Value) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let v = route(router, client, "");
        if want(&v) {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "still {v} after {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sdp_offer() -> String {
    let mut rtc = Rtc::builder()
        .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
        .build(Instant::now());
    rtc.add_local_candidate(Candidate::host(free_udp(), "udp").unwrap());
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
    let (offer, _pending) = api.apply().unwrap();
    offer.to_sdp_string()
}

/// WHEP through the router: 307 to the relay, then the same POST there. Returns the relay.
fn listen_via_router(router: &Tern, relays: &[(&str, SocketAddr)], client: &str) -> String {
    let offer = sdp_offer();
    let r = http(router.addr, "POST", "/whep/demo", client, offer.as_bytes());
    assert_eq!(r.status, 307, "{}", r.body);
    let loc = r.location.unwrap();
    let (id, relay) = relays
        .iter()
        .find(|(_, a)| loc == format!("http://{a}/whep/demo"))
        .unwrap_or_else(|| panic!("307 to an unknown place: {loc}"));
    let r = http(*relay, "POST", "/whep/demo", client, offer.as_bytes());
    assert_eq!(r.status, 201, "{}", r.body);
    id.to_string()
}

#[test]
fn listeners_land_on_the_nearest_relay_with_room_or_on_the_cdn() {
    let dir = std::env::temp_dir().join(format!("tern-geo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = dir.join("origin.pem");
    let origin_addr = free_udp();
    let _origin = Tern::start(
        "origin",
        &[
            ("TERN_ORIGIN__LISTEN", origin_addr.to_string()),
            ("TERN_ORIGIN__CERT_OUT", cert.display().to_string()),
        ],
    );
    let upstream = [
        ("TERN_UPSTREAM__ADDR", origin_addr.to_string()),
        ("TERN_UPSTREAM__CA", cert.display().to_string()),
    ];
    let eu = Tern::start("relay", &upstream);
    let us = Tern::start("relay", &upstream);
    let mut ap = Tern::start("relay", &upstream);

    let mmdb =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../geoip/tests/data/GeoIP2-City-Test.mmdb");
    let config = dir.join("router.toml");
    // London, Seattle, Tokyo. eu takes one listener; a broadcast goes to the CDN at two.
    std::fs::write(
        &config,
        format!(
            r#"[router]
default_region = "us"
poll_interval_ms = {POLL_MS}
trusted_proxies = ["127.0.0.1"]
relay_activation_threshold = 0
cdn_switch_threshold = 2
load_threshold = 1.0
cdn_hls_url = "https://cdn.example.net/hls/{{broadcast}}/master.m3u8"
mmdb = {{ city = "{}" }}
fleet = [
  {{ id = "eu-1", region = "eu", url = "http://{}", latitude = 51.5, longitude = -0.1, capacity = 1 }},
  {{ id = "us-1", region = "us", url = "http://{}", latitude = 47.6, longitude = -122.3, capacity = 100 }},
  {{ id = "ap-1", region = "ap", url = "http://{}", latitude = 35.7, longitude = 139.7, capacity = 100 }},
]
"#,
            mmdb.display(),
            eu.addr,
            us.addr,
            ap.addr
        ),
    )
    .unwrap();
    let router = Tern::start_with_args("router", &["--config", config.to_str().unwrap()], &[]);
    let relays = [("eu-1", eu.addr), ("us-1", us.addr), ("ap-1", ap.addr)];

    // Each client lands on the nearest relay; unknown addresses on the default region.
    for (client, want, reason) in [
        ("81.2.69.142", "eu-1", "nearest"),     // London
        ("89.160.20.129", "eu-1", "nearest"),   // Linköping
        ("216.160.83.56", "us-1", "nearest"),   // Milton, WA
        ("2001:218::1", "ap-1", "nearest"),     // Tokyo, over IPv6
        ("175.16.199.1", "ap-1", "nearest"),    // Changchun
        ("10.1.2.3", "us-1", "default_region"), // not in the database
    ] {
        let v = route(&router, client, "");
        assert_eq!(
            (v["tier"].as_str(), relay_of(&v), v["reason"].as_str()),
            (Some("webrtc"), want, Some(reason)),
            "{client}: {v}"
        );
        let (id, a) = relays.iter().find(|(id, _)| *id == want).unwrap();
        assert_eq!(v["url"], format!("http://{a}/whep/demo"), "{id}");
        assert_eq!(v["region"], &want[..2]);
    }
    let v = route(&router, "81.2.69.142", "?passive=1");
    assert_eq!(
        (v["tier"].as_str(), v["reason"].as_str()),
        (Some("hls"), Some("passive"))
    );
    assert_eq!(v["url"], "https://cdn.example.net/hls/demo/master.m3u8");

    // A relay killed is avoided from the next poll on: Tokyo moves to Seattle.
    ap.child.kill().unwrap();
    let _ = ap.child.wait();
    let took = route_until(&router, "2001:218::1", Duration::from_secs(5), |v| {
        relay_of(v) == "us-1"
    });
    eprintln!("geo: rerouted {took:?} after the kill (poll interval {POLL_MS} ms)");
    assert!(
        took <= Duration::from_millis(POLL_MS + 250),
        "rerouted after {took:?}"
    );
    let (_, h) = router.get("/health");
    let h: Value = serde_json::from_slice(&h).unwrap();
    assert_eq!(h["router"]["relays"][2]["healthy"], false, "{h}");

    // WHEP through the router: 307 to the nearest relay, which takes the offer. eu-1 is then
    // full (capacity 1), so London goes to the next nearest within a poll.
    assert_eq!(listen_via_router(&router, &relays, "81.2.69.142"), "eu-1");
    route_until(&router, "81.2.69.142", Duration::from_secs(3), |v| {
        relay_of(v) == "us-1"
    });
    // A second WebRTC listener of the broadcast reaches the CDN switch threshold: HLS.
    assert_eq!(listen_via_router(&router, &relays, "81.2.69.142"), "us-1");
    route_until(&router, "216.160.83.56", Duration::from_secs(3), |v| {
        v["tier"] == "hls" && v["reason"] == "cdn_switch_threshold"
    });
    // A WHEP client cannot play HLS: it gets 503 and a Link to it.
    let r = http(
        router.addr,
        "POST",
        "/whep/demo",
        "216.160.83.56",
        sdp_offer().as_bytes(),
    );
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r
        .link
        .unwrap()
        .contains("https://cdn.example.net/hls/demo/master.m3u8"));

    // SIGHUP reloads the databases; the router keeps answering (the default action would
    // have ended the process).
    let pid = router.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(Duration::from_millis(200));
    let v = route(&router, "81.2.69.142", "?passive=1");
    assert_eq!(v["tier"], "hls");

    router.stop();
    let _ = std::fs::remove_dir_all(dir);
}

/// A stand-in relay that answers `GET /health` with whatever `body` holds now.
fn fake_relay(body: Arc<std::sync::Mutex<String>>) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let b = body.lock().unwrap().clone();
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                b.len()
            );
        }
    });
    addr
}

#[test]
fn a_draining_relay_takes_no_new_listeners_but_its_listeners_still_count() {
    let ok = |n: usize| {
        format!(
            r#"{{"status":"ok","listeners":{{"total":{n},"per_broadcast":{{"demo":{n}}},"capacity":100}}}}"#
        )
    };
    let near = Arc::new(std::sync::Mutex::new(ok(1)));
    let far = Arc::new(std::sync::Mutex::new(ok(0)));
    let (near_addr, far_addr) = (fake_relay(near.clone()), fake_relay(far.clone()));
    let dir = std::env::temp_dir().join(format!("tern-geo-drain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("router.toml");
    std::fs::write(
        &config,
        format!(
            r#"[router]
default_region = "eu"
poll_interval_ms = {POLL_MS}
trusted_proxies = ["127.0.0.1"]
relay_activation_threshold = 0
cdn_switch_threshold = 3
fleet = [
  {{ id = "near", region = "eu", url = "http://{near_addr}", latitude = 51.5, longitude = -0.1, capacity = 100 }},
  {{ id = "far", region = "us", url = "http://{far_addr}", latitude = 47.6, longitude = -122.3, capacity = 100 }},
]
"#
        ),
    )
    .unwrap();
    let router = Tern::start_with_args("router", &["--config", config.to_str().unwrap()], &[]);
    assert_eq!(relay_of(&route(&router, "10.0.0.1", "")), "near");

    // The relay starts draining: new listeners go elsewhere from the next poll on.
    *near.lock().unwrap() = r#"{"status":"draining","draining":true,"listeners":{"total":2,"per_broadcast":{"demo":2},"capacity":100}}"#.to_string();
    let took = route_until(&router, "10.0.0.1", Duration::from_secs(3), |v| {
        relay_of(v) == "far"
    });
    assert!(
        took <= Duration::from_millis(POLL_MS + 250),
        "drain seen after {took:?}"
    );
    // Its two listeners still count toward the CDN switch (3): one more WebRTC listener
    // elsewhere reaches it.
    *far.lock().unwrap() = ok(1);
    route_until(&router, "10.0.0.1", Duration::from_secs(3), |v| {
        v["reason"] == "cdn_switch_threshold"
    });

    router.stop();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sighup_reloads_the_fleet_without_a_restart() {
    let ok = r#"{"status":"ok","listeners":{"total":0,"per_broadcast":{},"capacity":100}}"#;
    let a = fake_relay(Arc::new(std::sync::Mutex::new(ok.to_string())));
    let b = fake_relay(Arc::new(std::sync::Mutex::new(ok.to_string())));
    let dir = std::env::temp_dir().join(format!("tern-geo-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("router.toml");
    let write = |id: &str, addr: SocketAddr| {
        std::fs::write(
            &config,
            format!(
                r#"[router]
default_region = "eu"
poll_interval_ms = {POLL_MS}
trusted_proxies = ["127.0.0.1"]
fleet = [
  {{ id = "{id}", region = "eu", url = "http://{addr}", latitude = 51.5, longitude = -0.1, capacity = 100 }},
]
"#
            ),
        )
        .unwrap();
    };
    write("relay-a", a);
    let router = Tern::start_with_args("router", &["--config", config.to_str().unwrap()], &[]);
    assert_eq!(relay_of(&route(&router, "10.0.0.1", "")), "relay-a");

    // Relay a is replaced by relay b in the file; the router follows on SIGHUP.
    write("relay-b", b);
    router.signal("HUP");
    route_until(&router, "10.0.0.1", Duration::from_secs(5), |v| {
        relay_of(v) == "relay-b"
    });

    // A broken file keeps the fleet in force.
    std::fs::write(&config, "[router]\nfleet = 7\n").unwrap();
    router.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(relay_of(&route(&router, "10.0.0.1", "")), "relay-b");
    router.stop();
    let _ = std::fs::remove_dir_all(dir);
}
