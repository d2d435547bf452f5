//! Relays cascade: origin → hub relay → edge relay, with a packager pulling from the hub;
//! the hub pulls each broadcast once however many nodes hang below it, a restarted hub is
//! rejoined without the edge's listeners noticing more than a gap, and a loop between two
//! relays is refused with a reason instead of spinning.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{certs, free_udp, text, Listener, Tern};

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Environment for `tern relay` pulling from `upstream` and, with `link`, serving the link
/// there under the certificate `name`.
fn relay_env(
    dir: &Path,
    upstream: SocketAddr,
    link: Option<(SocketAddr, &str)>,
) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("TERN_UPSTREAM__ADDR", upstream.to_string()),
        ("TERN_UPSTREAM__CA", path(&dir.join("ca.pem"))),
        // Short, so the hub's own upstream subscription would visibly lapse if downstream
        // subscribers did not hold it.
        ("TERN_RELAY__UNSUBSCRIBE_GRACE_SECONDS", "1".into()),
    ];
    if let Some((addr, name)) = link {
        env.extend([
            ("TERN_RELAY__LINK__LISTEN", addr.to_string()),
            (
                "TERN_RELAY__LINK__CERT",
                path(&dir.join(format!("{name}.pem"))),
            ),
            (
                "TERN_RELAY__LINK__KEY",
                path(&dir.join(format!("{name}-key.pem"))),
            ),
        ]);
    }
    env
}

fn health(node: &Tern) -> serde_json::Value {
    serde_json::from_slice(&node.get("/health").1).unwrap()
}

/// Polls `/health` until `check` holds.
fn wait_health(node: &Tern, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = health(node);
        if check(&h) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {h}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_hop_cascade_serves_listeners_and_a_packager() {
    let dir = std::env::temp_dir().join(format!("tern-cascade-{}", std::process::id()));
    certs(&dir, "origin", &["localhost", "127.0.0.1"]);
    certs(&dir, "hub", &["localhost", "127.0.0.1"]);
    let origin_addr = free_udp();
    let origin = Tern::start(
        "origin",
        &[
            ("TERN_ORIGIN__LISTEN", origin_addr.to_string()),
            ("TERN_ORIGIN__CERT", path(&dir.join("origin.pem"))),
            ("TERN_ORIGIN__KEY", path(&dir.join("origin-key.pem"))),
        ],
    );
    let hub_link = free_udp();
    let hub_env = relay_env(&dir, origin_addr, Some((hub_link, "hub")));
    let hub = Tern::start("relay", &hub_env);
    let edge = Tern::start("relay", &relay_env(&dir, hub_link, None));

    let listener = Listener::start(edge.addr, "demo", None).expect("admitted at the edge");
    listener.wait_frames(50, Duration::from_secs(10));
    // The hub has no listener of its own: the edge's link subscription is what holds its
    // upstream subscription, past the 1 s grace.
    std::thread::sleep(Duration::from_secs(3));
    let h = health(&hub);
    assert_eq!(h["listeners"]["total"], 0, "{h}");
    assert_eq!(h["listeners"]["link_subscribers"], 1, "{h}");
    assert_eq!(h["upstream"]["demo"], "live", "{h}");
    let before = listener.count();
    listener.wait_frames(before + 50, Duration::from_secs(5));

    // A packager pulls the same broadcast from the hub.
    let hls = dir.join("hls");
    let packager = Tern::start(
        "package",
        &[
            ("TERN_UPSTREAM__ADDR", hub_link.to_string()),
            ("TERN_UPSTREAM__CA", path(&dir.join("ca.pem"))),
            ("TERN_PACKAGER__BROADCASTS", "[\"demo\"]".into()),
            ("TERN_PACKAGER__OUT_DIR", path(&hls)),
        ],
    );
    let playlist = text(packager.wait_for("/hls/demo/64k/index.m3u8", Duration::from_secs(20)));
    assert!(playlist.contains(".m4s"), "{playlist}");
    wait_health(&hub, "hub serves two downstream nodes", |h| {
        h["listeners"]["link_subscribers"] == 2
    });

    // The hub dies and comes back on the same address: the edge resubscribes and its
    // listener's session carries on, with RTP time still moving forward.
    drop(hub);
    std::thread::sleep(Duration::from_millis(500));
    let before = listener.count();
    let t0 = Instant::now();
    let hub = Tern::start("relay", &hub_env);
    while listener.count() <= before {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "audio did not come back through the restarted hub"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "audio resumed {:?} after the hub was started again",
        t0.elapsed()
    );
    listener.wait_frames(listener.count() + 25, Duration::from_secs(5));
    let frames = listener.frames.lock().unwrap().clone();
    assert!(
        frames.windows(2).all(|w| w[1].0 > w[0].0),
        "RTP time ran backwards at the edge"
    );

    drop(listener);
    packager.stop();
    edge.stop();
    hub.stop();
    origin.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_loop_between_relays_is_refused() {
    let dir = std::env::temp_dir().join(format!("tern-loop-{}", std::process::id()));
    certs(&dir, "a", &["localhost", "127.0.0.1"]);
    certs(&dir, "b", &["localhost", "127.0.0.1"]);
    let (a_link, b_link) = (free_udp(), free_udp());
    // Misconfigured: each relay's upstream is the other.
    let a = Tern::start("relay", &relay_env(&dir, b_link, Some((a_link, "a"))));
    let b = Tern::start("relay", &relay_env(&dir, a_link, Some((b_link, "b"))));

    for _ in 0..2 {
        let (status, body) = match Listener::start(a.addr, "demo", None) {
            Ok(_) => panic!("a listener was admitted to a looping broadcast"),
            Err(e) => e,
        };
        assert_eq!(status, 502, "{body}");
        assert!(body.contains("loop"), "{body}");
    }
    // A saw its own request come back through B and refused it; both stay up and hold no
    // subscription.
    let metrics = text(a.get("/metrics").1);
    assert!(
        metrics.contains("tern_origin_link_loops_refused_total 2"),
        "{metrics}"
    );
    for node in [&a, &b] {
        let h = health(node);
        assert_eq!(h["status"], "ok", "{h}");
        assert_eq!(h["upstream"], serde_json::json!({}), "{h}");
    }
    a.stop();
    b.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
