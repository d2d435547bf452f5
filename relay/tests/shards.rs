//! A relay with several fan-out shards on one WebRTC socket: listeners spread over the
//! shards, every one completes ICE and DTLS (whichever shard reads its datagrams) and hears
//! the broadcast, capacity counts across shards, and sessions end through any of them.

mod common;

use std::time::Duration;

use common::{request, text, Listener, Tern};

#[test]
fn listeners_on_every_shard_hear_the_broadcast_and_capacity_is_shared() {
    let demo = Tern::start(
        "demo",
        &[
            ("TERN_RELAY__FANOUT_THREADS", "3".into()),
            ("TERN_RELAY__MAX_LISTENERS", "7".into()),
        ],
    );
    let listeners: Vec<Listener> = (0..7)
        .map(|i| Listener::start(demo.addr, "demo", None).unwrap_or_else(|e| panic!("{i}: {e:?}")))
        .collect();
    for l in &listeners {
        l.wait_frames(50, Duration::from_secs(10));
    }
    // Sessions name their shard: all three are in use.
    let mut shards: Vec<&str> = listeners
        .iter()
        .map(|l| &l.location[l.location.len() - 32..][..2])
        .collect();
    shards.sort();
    shards.dedup();
    assert_eq!(
        shards,
        ["00", "01", "02"],
        "{:?}",
        listeners.iter().map(|l| &l.location).collect::<Vec<_>>()
    );

    // Seven across three shards is the node's whole capacity.
    match Listener::start(demo.addr, "demo", None) {
        Err((503, _)) => {}
        other => panic!(
            "expected 503 when full, got {:?}",
            other.map(|l| l.location.clone())
        ),
    }
    let h: serde_json::Value = serde_json::from_slice(&demo.get("/health").1).unwrap();
    assert_eq!(h["listeners"]["total"], 7, "{h}");
    assert_eq!(h["listeners"]["per_broadcast"]["demo"], 7, "{h}");

    // Ending a session goes to its shard; a made-up one on a real shard is not found.
    let first = &listeners[0];
    assert_eq!(
        request(demo.addr, "DELETE", &first.location, None, b"").0,
        200
    );
    let fake = format!(
        "{}{}",
        &first.location[..first.location.len() - 30],
        "0".repeat(30)
    );
    assert_eq!(request(demo.addr, "DELETE", &fake, None, b"").0, 404);
    let again = Listener::start(demo.addr, "demo", None).expect("room again after a DELETE");
    again.wait_frames(25, Duration::from_secs(10));
    for l in &listeners[1..] {
        let n = l.count();
        l.wait_frames(n + 25, Duration::from_secs(5));
    }
    let metrics = text(demo.get("/metrics").1);
    assert!(metrics.contains("tern_relay_listeners 7"), "{metrics}");
    drop(listeners);
    drop(again);
    demo.stop();
}
