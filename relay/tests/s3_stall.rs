//! A stalled S3 never disturbs WebRTC listeners: `tern demo` pushes HLS to an "S3" that accepts
//! connections and never answers (the worst kind of outage: every request waits for its
//! timeout). A str0m client listening through the relay meanwhile receives every frame, the
//! local HLS keeps advancing, the metrics show the spool growing and retries counting, and the
//! process still stops promptly on SIGINT (what was not uploaded stays in the spool).

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{request, text, Tern};

/// A TCP server that accepts every connection and never answers.
fn hanging_server() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            // Read nothing back, answer nothing, close nothing.
            held.push(s);
        }
    });
    addr
}

fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn hung_s3_does_not_disturb_webrtc_listeners() {
    let s3 = hanging_server();
    let spool = std::env::temp_dir().join(format!("tern-stall-spool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&spool);
    let demo = Tern::start(
        "demo",
        &[
            ("TERN_PACKAGER__S3__BUCKET", "hls".into()),
            ("TERN_PACKAGER__S3__ENDPOINT", format!("http://{s3}")),
            ("TERN_PACKAGER__S3__PATH_STYLE", "true".into()),
            ("TERN_PACKAGER__S3__REQUEST_TIMEOUT_SECONDS", "1".into()),
            ("TERN_PACKAGER__S3__SPOOL_DIR", spool.display().to_string()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ],
    );
    // Let the uploader get stuck first.
    std::thread::sleep(Duration::from_secs(3));
    let frames = common::listen_for(demo.addr, Duration::from_secs(8));
    // 8 s of 20 ms frames; a little slack for ICE/DTLS set-up at the start.
    assert!(frames.len() >= 370, "only {} frames in 8 s", frames.len());
    assert!(
        frames.windows(2).all(|w| w[1].0 == w[0].0 + 960),
        "no frame lost: RTP time steps by one 20 ms frame"
    );
    // The local HLS copy keeps going.
    let pl = text(demo.wait_for("/hls/demo/128k/index.m3u8", Duration::from_secs(5)));
    assert!(pl.contains(".m4s"), "{pl}");
    let (_, m) = demo.get("/metrics");
    let m = text(m);
    assert!(
        metric(&m, "tern_packager_upload_retries_total") >= 2.0,
        "{m}"
    );
    assert!(metric(&m, "tern_packager_spool_bytes") > 10_000.0, "{m}");
    assert!(metric(&m, "tern_packager_upload_lag_seconds") >= 5.0, "{m}");
    assert_eq!(metric(&m, "tern_packager_frames_dropped_total"), 0.0, "{m}");
    let started = Instant::now();
    demo.stop();
    assert!(started.elapsed() < Duration::from_secs(12));
    // What could not be uploaded is on disk for the next run.
    let left = std::fs::read_dir(spool.join("demo")).unwrap().count();
    assert!(left > 10, "{left} spool entries");
    let _ = std::fs::remove_dir_all(&spool);
}

/// A moto S3 server from scripts/setup's venv, killed on drop.
struct Moto(std::process::Child, std::net::SocketAddr);

impl Moto {
    fn start() -> Self {
        let bin = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/venv/bin/moto_server");
        assert!(
            bin.exists(),
            "{} is missing: run scripts/setup",
            bin.display()
        );
        let addr = common::free_tcp();
        let child = std::process::Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &addr.port().to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        // Create the bucket (moto accepts unsigned requests).
        let (status, body) = request(addr, "PUT", "/tern-hls", None, b"");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        Self(child, addr)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tern package` as its own process pushing to S3, killed with SIGKILL mid-broadcast: a
/// WebRTC listener on the separate relay keeps receiving every frame, and a restarted packager
/// picks up the spool the dead one left.
#[test]
fn kill_9_of_the_packager_leaves_the_relay_alone_and_its_spool_is_resumed() {
    let dir = std::env::temp_dir().join(format!("tern-kill9-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cert = dir.join("origin.pem");
    let origin_addr = common::free_udp();
    let moto = Moto::start();
    let origin = Tern::start(
        "origin",
        &[
            ("TERN_ORIGIN__LISTEN", origin_addr.to_string()),
            ("TERN_ORIGIN__CERT_OUT", cert.display().to_string()),
        ],
    );
    let upstream = vec![
        ("TERN_UPSTREAM__ADDR", origin_addr.to_string()),
        ("TERN_UPSTREAM__CA", cert.display().to_string()),
    ];
    let relay = Tern::start("relay", &upstream);
    let mut pkg_env = upstream.clone();
    pkg_env.extend([
        ("TERN_PACKAGER__S3__BUCKET", "tern-hls".to_owned()),
        ("TERN_PACKAGER__S3__ENDPOINT", format!("http://{}", moto.1)),
        ("TERN_PACKAGER__S3__PATH_STYLE", "true".into()),
        (
            "TERN_PACKAGER__S3__SPOOL_DIR",
            dir.join("spool").display().to_string(),
        ),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ]);
    let mut packager = Tern::start("package", &pkg_env);

    let relay_addr = relay.addr;
    let listener =
        std::thread::spawn(move || common::listen_for(relay_addr, Duration::from_secs(8)));
    std::thread::sleep(Duration::from_secs(4));
    packager.child.kill().unwrap(); // SIGKILL
    let status = packager.child.wait().unwrap();
    assert!(!status.success());
    let frames = listener.join().unwrap();
    assert!(frames.len() >= 370, "only {} frames in 8 s", frames.len());
    assert!(
        frames.windows(2).all(|w| w[1].0 == w[0].0 + 960),
        "no frame lost while the packager died"
    );
    let (_, health) = relay.get("/health");
    assert!(text(health).contains("\"demo\":\"live\""));

    // A new packager on the same spool resumes whatever the dead one left, and goes on
    // uploading.
    let spooled = std::fs::read_dir(dir.join("spool/demo")).unwrap().count();
    let packager = Tern::start("package", &pkg_env);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, m) = packager.get("/metrics");
        let m = text(m);
        if metric(&m, "tern_packager_segments_uploaded_total") >= 4.0
            && metric(&m, "tern_packager_upload_lag_seconds") < 3.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no uploads after restart ({spooled} were spooled): {m}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    packager.stop();
    relay.stop();
    origin.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
