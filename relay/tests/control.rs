//! The relay's control surface, on a real `tern demo` process with real WebRTC listeners:
//! token auth, per-client rate limits, drain, trickle-ICE PATCH and the admin listener.

mod common;

use std::time::{Duration, Instant};

use common::{free_tcp, request, request_full, text, Listener, Tern};
use jsonwebtoken::{encode, EncodingKey, Header};

const SECRET: &str = "a-test-secret-of-enough-length";

fn token(broadcast: &str, valid_for: i64) -> String {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        broadcast: &'a str,
        exp: i64,
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    encode(
        &Header::default(),
        &Claims {
            broadcast,
            exp: now + valid_for,
        },
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[test]
fn jwt_mode_admits_only_valid_tokens_for_the_broadcast() {
    let demo = Tern::start(
        "demo",
        &[
            ("TERN_RELAY__AUTH__MODE", "jwt".into()),
            ("TERN_RELAY__AUTH__HS256_SECRET", SECRET.into()),
        ],
    );
    for (tok, why) in [
        (None, "a bearer token is required"),
        (Some(token("other", 600)), "does not grant this broadcast"),
        (Some(token("demo", -600)), "invalid token"),
        (Some("garbage".to_owned()), "invalid token"),
    ] {
        match Listener::start(demo.addr, "demo", tok.as_deref()) {
            Err((401, body)) => assert!(body.contains(why), "{body}"),
            Err(other) => panic!("expected 401, got {other:?}"),
            Ok(_) => panic!("admitted with {tok:?}"),
        }
    }
    let listener = Listener::start(demo.addr, "demo", Some(&token("demo", 600)))
        .expect("valid token admitted");
    listener.wait_frames(50, Duration::from_secs(10));
    let wildcard = Listener::start(demo.addr, "demo", Some(&token("*", 600)))
        .expect("wildcard token admitted");
    wildcard.wait_frames(10, Duration::from_secs(10));
    let (_, metrics) = demo.get("/metrics");
    assert!(text(metrics).contains("tern_relay_sessions_unauthorized_total 4"));
    drop((listener, wildcard));
    demo.stop();
}

#[test]
fn new_sessions_are_rate_limited_per_client() {
    let demo = Tern::start(
        "demo",
        &[
            ("TERN_RELAY__SESSIONS_PER_MINUTE", "6".into()),
            ("TERN_RELAY__SESSION_BURST", "2".into()),
        ],
    );
    let offer = b"v=0\r\n";
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let (s, _) = request(
            demo.addr,
            "POST",
            "/whep/demo",
            Some("application/sdp"),
            offer,
        );
        statuses.push(s);
    }
    // The first two are judged on their content (a bad offer), the rest never get that far.
    assert_eq!(statuses, [400, 400, 429, 429]);
    let (s, _, _) = request_full(
        demo.addr,
        "POST",
        "/whep/demo",
        Some("application/sdp"),
        offer,
        None,
    );
    assert_eq!(s, 429);
    // Other endpoints are not limited.
    assert_eq!(demo.get("/health").0, 200);
    demo.stop();
}

#[test]
fn drain_keeps_listeners_refuses_new_ones_and_exits_when_empty() {
    let demo = Tern::start("demo", &[]);
    let listener = Listener::start(demo.addr, "demo", None).expect("admitted");
    listener.wait_frames(25, Duration::from_secs(10));

    let (s, _) = request(demo.addr, "POST", "/admin/drain", None, b"");
    assert_eq!(s, 202);
    let (_, health) = demo.get("/health");
    let health = text(health);
    assert!(
        health.contains("\"draining\":true") && health.contains("\"status\":\"draining\""),
        "{health}"
    );
    match Listener::start(demo.addr, "demo", None) {
        Err((503, body)) => assert!(body.contains("draining"), "{body}"),
        other => panic!("expected 503 while draining, got {:?}", other.map(|_| ())),
    }
    // The current listener keeps receiving audio while draining.
    let before = listener.count();
    listener.wait_frames(before + 50, Duration::from_secs(5));

    // When it leaves, the process exits by itself, successfully.
    let (s, _) = request(demo.addr, "DELETE", &listener.location, None, b"");
    assert_eq!(s, 200);
    let status = demo.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status}");
}

#[test]
fn sigterm_drains_until_the_timeout_then_exits() {
    let demo = Tern::start("demo", &[("TERN_RELAY__DRAIN_TIMEOUT_SECONDS", "2".into())]);
    let listener = Listener::start(demo.addr, "demo", None).expect("admitted");
    listener.wait_frames(25, Duration::from_secs(10));
    let t0 = Instant::now();
    demo.signal("TERM");
    std::thread::sleep(Duration::from_millis(500));
    let before = listener.count();
    listener.wait_frames(before + 10, Duration::from_secs(2));
    let status = demo.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status}");
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "the listener was given the drain time"
    );
}

#[test]
fn patch_and_admin_listener() {
    let admin = free_tcp();
    let demo = Tern::start("demo", &[("TERN_HTTP__ADMIN_LISTEN", admin.to_string())]);
    let listener = Listener::start(demo.addr, "demo", None).expect("admitted");
    let frag = b"a=ice-ufrag:abcd\r\na=ice-pwd:0123456789abcdefghijkl\r\na=candidate:1 1 udp 1 198.51.100.1 9 typ host\r\n";
    let patch = |path: &str, ct: &str| request(demo.addr, "PATCH", path, Some(ct), frag).0;
    assert_eq!(
        patch(&listener.location, "application/trickle-ice-sdpfrag"),
        204
    );
    assert_eq!(patch(&listener.location, "application/sdp"), 415);
    assert_eq!(
        patch(
            "/whep/demo/0123456789abcdef0123456789abcdef",
            "application/trickle-ice-sdpfrag"
        ),
        404
    );

    // Metrics and admin live on the admin listener only.
    assert_eq!(demo.get("/metrics").0, 404);
    assert_eq!(request(demo.addr, "POST", "/admin/drain", None, b"").0, 404);
    assert_eq!(request(admin, "GET", "/metrics", None, b"").0, 200);
    assert_eq!(request(admin, "GET", "/", None, b"").0, 404);
    assert_eq!(request(admin, "GET", "/health", None, b"").0, 200);
    drop(listener);
    demo.stop();
}

#[test]
fn sighup_rotates_token_keys_without_a_restart() {
    let dir = std::env::temp_dir().join(format!("tern-rotate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("tern.toml");
    let write = |secret: &str, previous: Option<&str>| {
        let previous = previous
            .map(|p| format!("previous_hs256_secret = \"{p}\"\n"))
            .unwrap_or_default();
        std::fs::write(
            &conf,
            format!("[relay.auth]\nmode = \"jwt\"\nhs256_secret = \"{secret}\"\n{previous}"),
        )
        .unwrap();
    };
    write(SECRET, None);
    let demo = Tern::start_with_args("demo", &["--config", conf.to_str().unwrap()], &[]);
    let old = token("demo", 600);
    let first = Listener::start(demo.addr, "demo", Some(&old)).expect("old key admitted");
    first.wait_frames(10, Duration::from_secs(10));

    // Rotation: the new key and, for a while, the old one beside it.
    let new_secret = "a-rotated-secret-also-long-enough";
    write(new_secret, Some(SECRET));
    demo.signal("HUP");
    let new = encode(
        &Header::default(),
        &serde_json::json!({"broadcast": "demo", "exp": 4_000_000_000u64}),
        &EncodingKey::from_secret(new_secret.as_bytes()),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Listener::start(demo.addr, "demo", Some(&new)) {
            Ok(l) => {
                l.wait_frames(10, Duration::from_secs(10));
                break;
            }
            Err((401, _)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("new key refused: {e:?}"),
        }
    }
    let overlap = Listener::start(demo.addr, "demo", Some(&old)).expect("old key still admitted");
    overlap.wait_frames(10, Duration::from_secs(10));
    drop(overlap);
    // The old key is dropped.
    write(new_secret, None);
    demo.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Listener::start(demo.addr, "demo", Some(&old)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "old key still admitted after it was dropped"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        matches!(
            Listener::start(demo.addr, "demo", Some(&old)),
            Err((401, _))
        ),
        "old key refused after rotation"
    );
    // The listener admitted under the old key was not cut off.
    let before = first.count();
    first.wait_frames(before + 25, Duration::from_secs(5));
    drop(first);
    demo.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
