//! Real RTP from the ffmpeg CLI (libopus, `-f rtp`, as an SFU's plain transport sends it)
//! into an ingest endpoint, out over QUIC to a subscriber.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tern_origin_link::ingest::IngestManager;
use tern_origin_link::tls::Identity;
use tern_origin_link::{BroadcastId, Origin, Registry, Upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_rtp_reaches_a_subscriber_as_regular_frames() {
    let id = Identity::self_signed(&["localhost"]).unwrap();
    let cert = id.chain[0].clone();
    let registry = Registry::new();
    let origin = Origin::bind("127.0.0.1:0".parse().unwrap(), id, registry.clone()).unwrap();
    let origin_addr = origin.local_addr().unwrap();
    tokio::spawn(origin.run(std::future::pending()));

    let ingest = IngestManager::new(registry.clone(), 2);
    let talk: BroadcastId = "talk".parse().unwrap();
    let ep = ingest
        .create(talk.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(ingest.list(), vec![ep.clone()]);
    assert!(
        ingest
            .create(talk.clone(), "127.0.0.1:0".parse().unwrap())
            .await
            .is_err(),
        "no duplicates"
    );

    let mut ffmpeg = Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-re",
            "-f",
            "lavfi",
            "-i",
            "sine=f=440:d=4",
        ])
        .args([
            "-c:a",
            "libopus",
            "-b:a",
            "64k",
            "-payload_type",
            "111",
            "-f",
            "rtp",
        ])
        .arg(format!("rtp://{}", ep.addr))
        .stdout(Stdio::null())
        .spawn()
        .expect("ffmpeg is installed");

    let up = Upstream::new(origin_addr, "localhost", std::slice::from_ref(&cert)).unwrap();
    let mut sub = up.subscribe(&talk).await.unwrap();
    let mut frames = Vec::new();
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        match tokio::time::timeout(Duration::from_millis(500), sub.next_frame()).await {
            Ok(Ok(Some(f))) => frames.push(f),
            Ok(other) => panic!("subscription ended: {other:?}"),
            Err(_) => {}
        }
    }
    let _ = ffmpeg.kill();
    let _ = ffmpeg.wait();
    assert!(frames.len() >= 120, "{} frames in 3 s", frames.len());
    assert!(
        frames
            .windows(2)
            .all(|w| w[1].timestamp == w[0].timestamp + 960 && w[1].seq == w[0].seq + 1),
        "20 ms Opus frames, in order, none missing"
    );
    assert!(frames
        .iter()
        .all(|f| !f.payload.is_empty() && f.payload.len() < 1275));
    let now = tern_origin_link::unix_micros_now();
    assert!(
        now - frames.last().unwrap().capture_time_us < 1_000_000,
        "capture times are wall clock"
    );

    assert!(ingest.delete(&talk));
    assert!(!ingest.delete(&talk));
    // Deleting the endpoint ends the broadcast for its subscribers.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match sub.next_frame().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the subscription ends");
    assert!(matches!(ended, Ok(None)), "{ended:?}");
}
