//! The origin link over real QUIC on loopback: subscribe, receive in order, unknown
//! broadcasts, and a hostile peer that must not disturb a well-behaved one.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tern_origin_link::tls::{self, Identity};
use tern_origin_link::wire::{self, Frame, Message};
use tern_origin_link::{BroadcastId, Error, NodeId, Origin, Registry, Upstream, MAX_HOPS};

fn frame(seq: u64) -> Frame {
    Frame {
        seq,
        timestamp: seq * 960,
        capture_time_us: 1_000 + seq,
        payload: Bytes::from(vec![seq as u8; 100]),
    }
}

struct Setup {
    addr: std::net::SocketAddr,
    cert: rustls::pki_types::CertificateDer<'static>,
    registry: Registry,
    node: NodeId,
    stop: tokio::sync::oneshot::Sender<()>,
}

async fn start() -> Setup {
    let id = Identity::self_signed(&["localhost"]).unwrap();
    let cert = id.chain[0].clone();
    let registry = Registry::new();
    let origin = Origin::bind("127.0.0.1:0".parse().unwrap(), id, registry.clone()).unwrap();
    let addr = origin.local_addr().unwrap();
    let node = origin.node_id();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    tokio::spawn(origin.run(async move {
        let _ = stopped.await;
    }));
    Setup {
        addr,
        cert,
        registry,
        node,
        stop,
    }
}

#[tokio::test]
async fn a_path_through_the_server_itself_or_too_long_is_refused() {
    let s = start().await;
    let demo: BroadcastId = "demo".parse().unwrap();
    let _publisher = s.registry.publish(demo.clone(), 1);
    let roots = std::slice::from_ref(&s.cert);

    // A subscriber whose path already holds the server: a loop.
    let looped = Upstream::new(s.addr, "localhost", roots)
        .unwrap()
        .with_node_id(s.node);
    match looped.subscribe(&demo).await {
        Err(Error::Loop(reason)) => assert!(reason.contains("loop"), "{reason}"),
        other => panic!("expected a loop refusal, got {:?}", other.map(|_| ())),
    }

    // A path of MAX_HOPS nodes before the server is one hop too many.
    let up = Upstream::new(s.addr, "localhost", roots).unwrap();
    let long: Vec<NodeId> = (0..MAX_HOPS as u64 - 1).map(NodeId::from_wire).collect();
    assert!(matches!(
        up.subscribe_via(&demo, &long).await,
        Err(Error::Loop(_))
    ));
    // One fewer is fine, on the same connection.
    let ok = up.subscribe_via(&demo, &long[1..]).await.unwrap();
    assert_eq!(ok.channels, 1);
    let _ = s.stop.send(());
}

#[tokio::test]
async fn frames_arrive_in_order_and_unknown_broadcasts_are_refused() {
    let s = start().await;
    let demo: BroadcastId = "demo".parse().unwrap();
    let publisher = s.registry.publish(demo.clone(), 2);
    let up = Upstream::new(s.addr, "localhost", std::slice::from_ref(&s.cert)).unwrap();

    let mut sub = up.subscribe(&demo).await.unwrap();
    assert_eq!(sub.channels, 2);
    // Rounds within the origin's backlog: every frame arrives, in order, unchanged.
    for round in 0..4 {
        for i in round * 50..(round + 1) * 50 {
            publisher.send(frame(i));
        }
        for i in round * 50..(round + 1) * 50 {
            let f = tokio::time::timeout(Duration::from_secs(5), sub.next_frame())
                .await
                .expect("frame in time")
                .unwrap()
                .unwrap();
            assert_eq!(f, frame(i));
        }
    }

    let nope: BroadcastId = "nope".parse().unwrap();
    assert!(matches!(up.subscribe(&nope).await, Err(Error::NotFound(_))));
    // The refusal did not break the connection: the first subscription still flows.
    publisher.send(frame(200));
    assert_eq!(sub.next_frame().await.unwrap().unwrap(), frame(200));

    // The broadcast ending ends the subscription cleanly.
    drop(publisher);
    assert_eq!(sub.next_frame().await.unwrap(), None);
    let _ = s.stop.send(());
}

#[tokio::test]
async fn a_relay_with_the_wrong_certificate_is_refused() {
    let s = start().await;
    let other = Identity::self_signed(&["localhost"]).unwrap();
    let up = Upstream::new(s.addr, "localhost", &[other.chain[0].clone()]).unwrap();
    let demo: BroadcastId = "demo".parse().unwrap();
    let _p = s.registry.publish(demo.clone(), 2);
    assert!(matches!(
        up.subscribe(&demo).await,
        Err(Error::Connect { .. })
    ));
}

#[tokio::test]
async fn a_hostile_peer_is_cut_off_and_others_keep_receiving() {
    let s = start().await;
    let demo: BroadcastId = "demo".parse().unwrap();
    let publisher = s.registry.publish(demo.clone(), 1);
    let good = Upstream::new(s.addr, "localhost", std::slice::from_ref(&s.cert)).unwrap();
    let mut sub = good.subscribe(&demo).await.unwrap();

    // A raw QUIC client that speaks garbage on a stream.
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(tls::client_config(std::slice::from_ref(&s.cert)).unwrap());
    let conn = ep.connect(s.addr, "localhost").unwrap().await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let mut junk = BytesMut::new();
    junk.put_u8(0x3f); // unknown message type
    junk.put_u8(4);
    junk.put_slice(b"evil");
    send.write_all(&junk).await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("the origin closes the hostile connection");
    assert!(
        matches!(reason, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == 1u32.into()),
        "{reason:?}"
    );

    // A frame that is valid but far too large is refused the same way.
    let conn2 = ep.connect(s.addr, "localhost").unwrap().await.unwrap();
    let (mut send2, _r2) = conn2.open_bi().await.unwrap();
    let mut big = BytesMut::new();
    wire::encode(
        &Message::Subscribe {
            subscription: 0,
            broadcast: demo.clone(),
            via: vec![],
        },
        &mut big,
    );
    send2.write_all(&big).await.unwrap();
    let mut huge = BytesMut::new();
    huge.put_u8(0x10);
    huge.put_u32(0x8000_0000 | 1_000_000);
    let _ = send2.write_all(&huge).await;

    for i in 0..50 {
        publisher.send(frame(i));
    }
    for i in 0..50 {
        let f = tokio::time::timeout(Duration::from_secs(5), sub.next_frame())
            .await
            .expect("the good subscriber keeps receiving")
            .unwrap()
            .unwrap();
        assert_eq!(f.seq, i);
    }
    let _ = s.stop.send(());
}

#[tokio::test]
async fn a_subscriber_that_falls_behind_skips_ahead_instead_of_queueing() {
    let s = start().await;
    let demo: BroadcastId = "demo".parse().unwrap();
    let publisher = s.registry.publish(demo.clone(), 2);
    let up = Upstream::new(s.addr, "localhost", std::slice::from_ref(&s.cert)).unwrap();
    let mut sub = up.subscribe(&demo).await.unwrap();
    let burst = 10 * tern_origin_link::origin::BACKLOG_FRAMES as u64;
    for i in 0..burst {
        publisher.send(frame(i));
    }
    drop(publisher);
    let mut got = Vec::new();
    while let Some(f) = sub.next_frame().await.unwrap() {
        got.push(f.seq);
    }
    assert!(got.windows(2).all(|w| w[0] < w[1]), "still in order");
    assert_eq!(got.last(), Some(&(burst - 1)), "the newest frame arrives");
    // What was held for this subscriber never exceeded the backlog (plus what QUIC had
    // already taken in flight before the burst outran it).
    assert!(
        (got.len() as u64) < burst / 2,
        "{} of {burst} frames were queued for a slow subscriber",
        got.len()
    );
    let _ = s.stop.send(());
}

/// The bound that one ordered stream per subscription lacked: a subscriber that stops reading
/// for seconds does not come back to seconds of backlog. The origin resets the groups the
/// subscriber did not take in time, and the subscriber keeps only what is recent.
#[tokio::test]
async fn a_subscriber_that_stops_reading_resumes_with_fresh_frames() {
    let s = start().await;
    let demo: BroadcastId = "demo".parse().unwrap();
    let publisher = s.registry.publish(demo.clone(), 2);
    let up = Upstream::new(s.addr, "localhost", std::slice::from_ref(&s.cert)).unwrap();
    let mut sub = up.subscribe(&demo).await.unwrap();

    let source = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for seq in 0.. {
            tick.tick().await;
            publisher.send(Frame {
                capture_time_us: tern_origin_link::unix_micros_now(),
                ..frame(seq)
            });
        }
    });
    let age = |f: &Frame| {
        Duration::from_micros(tern_origin_link::unix_micros_now().saturating_sub(f.capture_time_us))
    };
    // Live first: frames arrive fresh.
    let mut last = next(&mut sub).await.seq;
    for _ in 0..25 {
        last = next(&mut sub).await.seq;
    }

    // Three seconds without reading, as a relay stuck behind something else would.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let first = next(&mut sub).await;
    assert!(first.seq > last, "still in order");
    // ~150 frames were produced meanwhile; only about a budget's worth may be left.
    assert!(
        first.seq >= last + 100,
        "resumed at {} after {last}: a backlog was kept",
        first.seq
    );
    // The budget is 300 ms; the rest is margin for a loaded machine.
    assert!(
        age(&first) < Duration::from_millis(800),
        "first frame {:?} old",
        age(&first)
    );
    let mut prev = first.seq;
    for _ in 0..50 {
        let f = next(&mut sub).await;
        assert!(f.seq > prev, "in order");
        prev = f.seq;
        assert!(
            age(&f) < Duration::from_millis(800),
            "frame {} {:?} old",
            f.seq,
            age(&f)
        );
    }
    source.abort();
    let _ = s.stop.send(());
}

async fn next(sub: &mut tern_origin_link::Subscription) -> Frame {
    tokio::time::timeout(Duration::from_secs(5), sub.next_frame())
        .await
        .expect("a frame in time")
        .unwrap()
        .expect("the broadcast goes on")
}

/// A stand-in upstream over raw QUIC that answers one `Subscribe` and then writes group
/// streams as given; returns its address, certificate and the connection once subscribed.
async fn raw_upstream() -> (
    std::net::SocketAddr,
    rustls::pki_types::CertificateDer<'static>,
    tokio::sync::oneshot::Receiver<(quinn::Connection, u64, quinn::SendStream)>,
) {
    let id = Identity::self_signed(&["localhost"]).unwrap();
    let cert = id.chain[0].clone();
    let ep = quinn::Endpoint::server(
        tls::server_config(id).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = ep.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let conn = ep.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let mut buf = BytesMut::new();
        let subscription = loop {
            let chunk = recv.read_chunk(1024, true).await.unwrap().unwrap();
            buf.extend_from_slice(&chunk.bytes);
            if let Some(Message::Subscribe { subscription, .. }) = wire::decode(&mut buf).unwrap() {
                break subscription;
            }
        };
        buf.clear();
        wire::encode(
            &Message::SubscribeOk {
                codec: wire::Codec::Opus,
                channels: 1,
            },
            &mut buf,
        );
        send.write_all(&buf).await.unwrap();
        let _ = tx.send((conn, subscription, send));
        // Keeps the endpoint until the test is done with it.
        std::future::pending::<()>().await;
    });
    (addr, cert, rx)
}

async fn write_uni(conn: &quinn::Connection, msgs: &[Message]) -> quinn::SendStream {
    let mut buf = BytesMut::new();
    for m in msgs {
        wire::encode(m, &mut buf);
    }
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(&buf).await.unwrap();
    s
}

#[tokio::test]
async fn groups_for_unknown_subscriptions_and_reset_groups_are_ignored_but_garbage_closes() {
    let (addr, cert, ready) = raw_upstream().await;
    let up = Upstream::new(addr, "localhost", &[cert]).unwrap();
    let mut sub = up.subscribe(&"demo".parse().unwrap()).await.unwrap();
    let (conn, id, _control) = ready.await.unwrap();
    let group = |frames: std::ops::Range<u64>, subscription| {
        std::iter::once(Message::Group { subscription })
            .chain(frames.map(|s| Message::Frame(frame(s))))
            .collect::<Vec<_>>()
    };

    // A group for a subscription that does not exist (it may just have ended) is ignored.
    let _ = write_uni(&conn, &group(0..5, id + 1)).await.finish();
    // A group reset midway is not an error: what arrived of it counts, the rest is a gap.
    let mut reset = write_uni(&conn, &group(0..3, id)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    reset.reset(0u32.into()).unwrap();
    let _ = write_uni(&conn, &group(5..10, id)).await.finish();
    let mut got = Vec::new();
    while got.last() != Some(&9) {
        let f = tokio::time::timeout(Duration::from_secs(5), sub.next_frame())
            .await
            .expect("frames in time")
            .unwrap()
            .unwrap();
        got.push(f.seq);
    }
    assert_eq!(got, vec![0, 1, 2, 5, 6, 7, 8, 9]);

    // A group stream that does not start with Group closes the connection with code 1.
    let _ = write_uni(&conn, &[Message::Frame(frame(10))])
        .await
        .finish();
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("the subscriber closes the connection");
    assert!(
        matches!(reason, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == 1u32.into()),
        "{reason:?}"
    );
    assert!(sub.next_frame().await.is_err());
}
