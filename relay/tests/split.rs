//! Origin, relay and packager as three separate `tern` processes, as on three machines: the
//! relay and the packager trust the origin through the certificate file it wrote. A str0m
//! client over a real UDP socket listens through the relay (ICE, DTLS-SRTP, Opus).

mod common;

use std::time::Duration;

use common::{free_udp, request, text, Tern};

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
    let frames = common::listen_for(relay.addr, Duration::from_secs(4));
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
