//! Origin, relay and packager as three separate `tern` processes, as on three machines: the
//! relay and the packager trust the origin through the certificate file it wrote. A str0m
//! client over a real UDP socket listens through the relay (ICE, DTLS-SRTP, Opus).

mod common;

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_udp, request, text, Tern};
use str0m::change::SdpAnswer;
use str0m::media::{Direction, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};

/// Frames received by a WebRTC client listening for `listen_for`: (RTP time, payload size).
fn listen(relay: &Tern, listen_for: Duration) -> Vec<(u64, usize)> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let local = socket.local_addr().unwrap();
    let mut rtc = Rtc::builder()
        .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
        .build(Instant::now());
    rtc.add_local_candidate(Candidate::host(local, "udp").unwrap());
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
    let (offer, pending) = api.apply().unwrap();

    let (status, body) = request(
        relay.addr,
        "POST",
        "/whep/demo",
        Some("application/sdp"),
        offer.to_sdp_string().as_bytes(),
    );
    assert_eq!(status, 201, "{}", text(body));
    let answer = text(body);
    assert!(answer.contains("a=ice-lite"), "the relay is ICE-lite");
    let answer = SdpAnswer::from_sdp_string(&answer).unwrap();
    rtc.sdp_api().accept_answer(pending, answer).unwrap();

    let mut frames = Vec::new();
    let mut buf = vec![0u8; 2000];
    let end = Instant::now() + listen_for;
    while Instant::now() < end {
        let timeout = match rtc.poll_output().unwrap() {
            Output::Timeout(t) => t,
            Output::Transmit(t) => {
                socket.send_to(&t.contents, t.destination).unwrap();
                continue;
            }
            Output::Event(Event::MediaData(d)) => {
                frames.push((d.time.numer(), d.data.len()));
                continue;
            }
            Output::Event(_) => continue,
        };
        let wait = timeout
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), Duration::from_millis(50));
        socket.set_read_timeout(Some(wait)).unwrap();
        let input = match socket.recv_from(&mut buf) {
            Ok((n, source)) => Input::Receive(
                Instant::now(),
                Receive {
                    proto: Protocol::Udp,
                    source,
                    destination: local,
                    contents: buf[..n].try_into().unwrap(),
                },
            ),
            Err(_) => Input::Timeout(Instant::now()),
        };
        rtc.handle_input(input).unwrap();
    }
    frames
}

#[test]
fn origin_relay_and_packager_run_as_separate_processes() {
    let dir = std::env::temp_dir().join(format!("tern-split-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = dir.join("origin.pem");
    let origin_addr = free_udp();

    let origin = Tern::start(
        "origin",
        &[
            ("TERN_ORIGIN__LISTEN", origin_addr.to_string()),
            ("TERN_ORIGIN__CERT_OUT", cert.display().to_string()),
        ],
    );
    assert!(cert.exists(), "the origin wrote its certificate");
    let upstream = [
        ("TERN_UPSTREAM__ADDR", origin_addr.to_string()),
        ("TERN_UPSTREAM__CA", cert.display().to_string()),
    ];
    let relay = Tern::start("relay", &upstream);
    let mut pkg_env = upstream.to_vec();
    pkg_env.push((
        "TERN_PACKAGER__OUT_DIR",
        dir.join("hls").display().to_string(),
    ));
    let packager = Tern::start("package", &pkg_env);

    // WebRTC through the relay: Opus frames 20 ms apart, in order, for the whole window.
    let frames = listen(&relay, Duration::from_secs(4));
    assert!(frames.len() >= 100, "only {} frames in 4 s", frames.len());
    assert!(
        frames.windows(2).all(|w| w[1].0 == w[0].0 + 960),
        "RTP time steps by one 20 ms frame"
    );
    assert!(frames.iter().all(|(_, n)| *n > 10));

    let (_, health) = relay.get("/health");
    assert!(
        text(health).contains("\"demo\":\"live\""),
        "upstream state is reported"
    );

    // HLS from the separate packager.
    let pl = text(packager.wait_for("/hls/demo/128k/index.m3u8", Duration::from_secs(15)));
    assert!(pl.contains(".m4s"), "{pl}");
    assert!(dir.join("hls/demo/master.m3u8").exists());

    // A relay that does not trust the origin's certificate cannot subscribe.
    let other = dir.join("other.pem");
    std::fs::write(
        &other,
        tern_origin_link::tls::Identity::self_signed(&["localhost"])
            .unwrap()
            .cert_pem(),
    )
    .unwrap();
    let untrusting = Tern::start(
        "relay",
        &[
            ("TERN_UPSTREAM__ADDR", origin_addr.to_string()),
            ("TERN_UPSTREAM__CA", other.display().to_string()),
        ],
    );
    let offer = b"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n";
    let (status, _) = request(
        untrusting.addr,
        "POST",
        "/whep/demo",
        Some("application/sdp"),
        offer,
    );
    assert_eq!(
        status, 502,
        "an unreachable or untrusted upstream is a bad gateway"
    );

    untrusting.stop();
    packager.stop();
    relay.stop();
    origin.stop();
    // The packager wrote its end marker when it stopped.
    let last = std::fs::read_to_string(dir.join("hls/demo/64k/index.m3u8")).unwrap();
    assert!(last.contains("#EXT-X-ENDLIST"), "{last}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_sfu_feeds_the_origin_over_rtp_and_listeners_hear_it_through_a_relay() {
    let dir = std::env::temp_dir().join(format!("tern-ingest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = dir.join("origin.pem");
    let origin_addr = free_udp();
    let origin = Tern::start(
        "origin",
        &[
            ("TERN_ORIGIN__LISTEN", origin_addr.to_string()),
            ("TERN_ORIGIN__CERT_OUT", cert.display().to_string()),
            ("TERN_ORIGIN__TEST_BROADCASTS", "[]".into()),
        ],
    );

    // The SFU asks for a plain-RTP endpoint, as it would for a plain transport.
    let api = |method: &str, path: &str, body: &str| {
        let (s, b) = request(
            origin.addr,
            method,
            path,
            Some("application/json"),
            body.as_bytes(),
        );
        (s, text(b))
    };
    let (s, created) = api("POST", "/v1/ingest", r#"{"broadcast":"talk"}"#);
    assert_eq!(s, 201, "{created}");
    let port: u16 = created
        .split("\"port\":")
        .nth(1)
        .and_then(|r| r.split(&[',', '}'][..]).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{created}"));
    assert_eq!(
        api("POST", "/v1/ingest", r#"{"broadcast":"talk"}"#).0,
        409,
        "no duplicates"
    );
    assert_eq!(api("POST", "/v1/ingest", r#"{"broadcast":"../x"}"#).0, 400);
    assert_eq!(api("POST", "/v1/ingest", "not json").0, 400);
    assert!(api("GET", "/v1/ingest", "").1.contains("\"talk\""));

    let mut ffmpeg = std::process::Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-re",
            "-f",
            "lavfi",
            "-i",
            "sine=f=330:d=8",
        ])
        .args([
            "-c:a",
            "libopus",
            "-b:a",
            "48k",
            "-payload_type",
            "111",
            "-f",
            "rtp",
        ])
        .arg(format!("rtp://127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ffmpeg is installed");

    let relay = Tern::start(
        "relay",
        &[
            ("TERN_UPSTREAM__ADDR", origin_addr.to_string()),
            ("TERN_UPSTREAM__CA", cert.display().to_string()),
        ],
    );
    // The broadcast exists from the moment its endpoint does.
    let listener = common::Listener::start(relay.addr, "talk", None).expect("admitted");
    listener.wait_frames(100, Duration::from_secs(6));
    let frames = listener.frames.lock().unwrap().clone();
    assert!(
        frames.windows(2).all(|w| w[1].0 == w[0].0 + 960),
        "continuous 20 ms frames"
    );

    assert_eq!(api("DELETE", "/v1/ingest/talk", "").0, 204);
    assert_eq!(api("DELETE", "/v1/ingest/talk", "").0, 404);
    let _ = ffmpeg.kill();
    let _ = ffmpeg.wait();
    drop(listener);
    relay.stop();
    origin.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
