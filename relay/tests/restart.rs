//! Listeners keep their WebRTC sessions through an origin restart and a 10 s link cut:
//! audio resumes promptly once the origin is back, and RTP time never runs backwards.

mod common;

use std::time::{Duration, Instant};

use common::{certs, free_udp, CutProxy, Listener, Tern};

fn pki(dir: &std::path::Path) {
    certs(dir, "origin", &["localhost", "127.0.0.1"]);
}

fn origin_env(dir: &std::path::Path, addr: std::net::SocketAddr) -> Vec<(&'static str, String)> {
    vec![
        ("TERN_ORIGIN__LISTEN", addr.to_string()),
        (
            "TERN_ORIGIN__CERT",
            dir.join("origin.pem").display().to_string(),
        ),
        (
            "TERN_ORIGIN__KEY",
            dir.join("origin-key.pem").display().to_string(),
        ),
    ]
}

/// Waits until the listener's frame count grows past `n`; returns the time since `t0`.
fn resumed_after(l: &Listener, n: usize, t0: Instant, limit: Duration) -> Duration {
    while l.count() <= n {
        assert!(
            t0.elapsed() < limit,
            "audio did not resume within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

fn assert_monotonic(l: &Listener) {
    let frames = l.frames.lock().unwrap();
    assert!(
        frames.windows(2).all(|w| w[1].0 > w[0].0),
        "RTP time ran backwards"
    );
}

#[test]
fn listeners_survive_an_origin_restart() {
    let dir = std::env::temp_dir().join(format!("tern-restart-{}", std::process::id()));
    pki(&dir);
    let origin_addr = free_udp();
    let origin = Tern::start("origin", &origin_env(&dir, origin_addr));
    let relay = Tern::start(
        "relay",
        &[
            ("TERN_UPSTREAM__ADDR", origin_addr.to_string()),
            (
                "TERN_UPSTREAM__CA",
                dir.join("ca.pem").display().to_string(),
            ),
        ],
    );
    let listener = Listener::start(relay.addr, "demo", None).expect("admitted");
    listener.wait_frames(50, Duration::from_secs(10));

    // The origin dies without a goodbye, and comes back on the same address.
    drop(origin);
    std::thread::sleep(Duration::from_secs(1));
    let before = listener.count();
    let t0 = Instant::now();
    let back = Tern::start("origin", &origin_env(&dir, origin_addr));
    let took = resumed_after(&listener, before, t0, Duration::from_secs(5));
    eprintln!("audio resumed {took:?} after the origin process was started again");
    assert!(
        took <= Duration::from_secs(2),
        "resumed only after {took:?}"
    );
    listener.wait_frames(before + 50, Duration::from_secs(5));
    assert_monotonic(&listener);

    drop(listener);
    relay.stop();
    back.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn listeners_survive_a_ten_second_link_cut() {
    let dir = std::env::temp_dir().join(format!("tern-cut-{}", std::process::id()));
    pki(&dir);
    let origin_addr = free_udp();
    let origin = Tern::start("origin", &origin_env(&dir, origin_addr));
    let proxy = CutProxy::start(origin_addr);
    let relay = Tern::start(
        "relay",
        &[
            ("TERN_UPSTREAM__ADDR", proxy.addr.to_string()),
            (
                "TERN_UPSTREAM__CA",
                dir.join("ca.pem").display().to_string(),
            ),
        ],
    );
    let listener = Listener::start(relay.addr, "demo", None).expect("admitted");
    listener.wait_frames(50, Duration::from_secs(10));

    proxy.set_cut(true);
    std::thread::sleep(Duration::from_secs(8));
    // The relay has noticed (idle timeout 5 s) and says so where the alerts look.
    let metrics = common::text(relay.get("/metrics").1);
    assert!(metrics.contains("tern_relay_upstream_up 0"), "{metrics}");
    assert!(
        metrics.contains("tern_relay_upstream_reconnecting 1"),
        "{metrics}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let before = listener.count();
    proxy.set_cut(false);
    let took = resumed_after(&listener, before, Instant::now(), Duration::from_secs(6));
    eprintln!("audio resumed {took:?} after the link returned");
    assert!(
        took <= Duration::from_secs(2),
        "resumed only after {took:?}"
    );
    listener.wait_frames(before + 50, Duration::from_secs(5));
    assert_monotonic(&listener);
    let metrics = common::text(relay.get("/metrics").1);
    assert!(metrics.contains("tern_relay_upstream_up 1"), "{metrics}");
    // Latency as histogram buckets, which the alert rules and dashboards aggregate.
    assert!(
        metrics.contains("tern_relay_upstream_latency_seconds_bucket{le=\"0.3\"}"),
        "{metrics}"
    );

    drop(listener);
    relay.stop();
    origin.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_origin_refuses_relays_without_a_fleet_certificate() {
    let dir = std::env::temp_dir().join(format!("tern-mtls-{}", std::process::id()));
    pki(&dir);
    certs(&dir, "relay-1", &["relay-1.example.net"]);
    let origin_addr = free_udp();
    let mut env = origin_env(&dir, origin_addr);
    env.push((
        "TERN_ORIGIN__CLIENT_CA",
        dir.join("ca.pem").display().to_string(),
    ));
    let origin = Tern::start("origin", &env);
    let ca = (
        "TERN_UPSTREAM__CA",
        dir.join("ca.pem").display().to_string(),
    );

    let anonymous = Tern::start(
        "relay",
        &[("TERN_UPSTREAM__ADDR", origin_addr.to_string()), ca.clone()],
    );
    match Listener::start(anonymous.addr, "demo", None) {
        Err((502, body)) => assert!(!body.is_empty()),
        other => panic!(
            "expected 502 from a relay the origin refuses, got {:?}",
            other.map(|_| ())
        ),
    }
    let (_, metrics) = origin.get("/metrics");
    assert!(
        common::text(metrics).contains("tern_origin_link_refused_total"),
        "the refusal is counted"
    );

    let member = Tern::start(
        "relay",
        &[
            ("TERN_UPSTREAM__ADDR", origin_addr.to_string()),
            ca,
            (
                "TERN_UPSTREAM__CERT",
                dir.join("relay-1.pem").display().to_string(),
            ),
            (
                "TERN_UPSTREAM__KEY",
                dir.join("relay-1-key.pem").display().to_string(),
            ),
        ],
    );
    let listener = Listener::start(member.addr, "demo", None).expect("a fleet relay is served");
    listener.wait_frames(50, Duration::from_secs(10));
    drop(listener);
    member.stop();
    anonymous.stop();
    origin.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
