//! Starts the real `tern demo` process and checks what it serves from the outside:
//! HLS read by the real ffprobe, playlists that advance, WHEP error answers, health, metrics,
//! and a clean exit on SIGINT.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{request, text, Tern};

/// (media sequence, [(duration, uri)]) of a media playlist.
fn parse_media(pl: &str) -> (u64, Vec<(f64, String)>) {
    let mut seq = None;
    let mut segs = Vec::new();
    let mut dur = None;
    for line in pl.lines() {
        if let Some(v) = line.strip_prefix("#EXT-X-MEDIA-SEQUENCE:") {
            seq = Some(v.trim().parse().unwrap());
        } else if let Some(v) = line.strip_prefix("#EXTINF:") {
            dur = Some(
                v.trim_end_matches(',')
                    .split(',')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap(),
            );
        } else if !line.starts_with('#') && !line.is_empty() {
            segs.push((dur.take().expect("EXTINF before URI"), line.to_owned()));
        }
    }
    // Absent means 0 (RFC 8216 §4.3.3.2).
    (seq.unwrap_or(0), segs)
}

/// ffprobe on init + segment: (codec, profile, sample rate, summed packet bytes, duration).
fn probe(init: &[u8], seg: &[u8]) -> (String, String, u32, u64, f64) {
    let dir = std::env::temp_dir().join(format!("tern-probe-{}-{}", std::process::id(), seg.len()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("x.mp4");
    let mut all = init.to_vec();
    all.extend_from_slice(seg);
    std::fs::write(&file, all).unwrap();
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "a:0", "-show_entries"])
        .arg("stream=codec_name,profile,sample_rate:packet=size,duration_time")
        .args(["-of", "compact=p=0:nk=0"])
        .arg(&file)
        .output()
        .expect("ffprobe is installed");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "ffprobe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let (mut codec, mut profile, mut rate) = (String::new(), String::new(), 0);
    let (mut bytes, mut packets) = (0u64, 0u64);
    for line in stdout.lines() {
        let kv: Vec<(&str, &str)> = line.split('|').filter_map(|p| p.split_once('=')).collect();
        let get = |k: &str| kv.iter().find(|(a, _)| *a == k).map(|(_, v)| *v);
        if let Some(c) = get("codec_name") {
            codec = c.into();
            profile = get("profile").unwrap_or("").into();
            rate = get("sample_rate").unwrap_or("0").parse().unwrap();
        } else if let Some(s) = get("size") {
            bytes += s.parse::<u64>().unwrap();
            packets += 1;
        }
    }
    // AAC frames are 1024 samples; ffprobe reports no duration for the first packet of a
    // fragment, so the count is the reliable measure.
    let duration = packets as f64 * 1024.0 / f64::from(rate.max(1));
    (codec, profile, rate, bytes, duration)
}

#[test]
fn demo_serves_advancing_hls_that_ffprobe_reads_as_the_aac_ladder() {
    let demo = Tern::start("demo", &[]);
    let master = text(demo.wait_for("/hls/demo/master.m3u8", Duration::from_secs(20)));
    for (name, bw) in [("64k", 64_000.0), ("128k", 128_000.0)] {
        let stream_inf = master
            .lines()
            .zip(master.lines().skip(1))
            .find(|(_, uri)| *uri == format!("{name}/index.m3u8"))
            .map(|(inf, _)| inf)
            .unwrap_or_else(|| panic!("master names {name}: {master}"));
        assert!(stream_inf.contains("CODECS=\"mp4a.40.2\""), "{stream_inf}");
        let declared: f64 = stream_inf
            .split(&[':', ','][..])
            .find_map(|kv| kv.strip_prefix("BANDWIDTH="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            declared >= bw && declared < bw * 1.5,
            "{name} BANDWIDTH {declared}"
        );
    }

    // Wait until the window is full, then watch it slide.
    let path = |r: &str| format!("/hls/demo/{r}/index.m3u8");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (first_seq, first) = loop {
        let (seq, segs) = parse_media(&text(demo.wait_for(&path("64k"), Duration::from_secs(10))));
        if segs.len() == 3 {
            break (seq, segs);
        }
        assert!(Instant::now() < deadline, "window never filled");
        std::thread::sleep(Duration::from_millis(500));
    };
    std::thread::sleep(Duration::from_millis(4500));
    let (later_seq, later) = parse_media(&text(demo.get(&path("64k")).1));
    assert!(
        later_seq >= first_seq + 2,
        "media sequence {first_seq} -> {later_seq}"
    );
    assert_eq!(later.len(), 3, "window stays 3");
    assert_ne!(first.last().unwrap().1, later.last().unwrap().1);

    for (name, target) in [("64k", 64_000.0), ("128k", 128_000.0)] {
        let (_, segs) = parse_media(&text(demo.get(&path(name)).1));
        assert_eq!(segs.len(), 3);
        let (status, init) = demo.get(&format!("/hls/demo/{name}/init.mp4"));
        assert_eq!(status, 200);
        let mut total_bytes = 0;
        let mut total_secs = 0.0;
        for (extinf, uri) in &segs {
            assert!((extinf - 2.0).abs() <= 0.1, "{name}/{uri} EXTINF {extinf}");
            let (status, seg) = demo.get(&format!("/hls/demo/{name}/{uri}"));
            assert_eq!(status, 200, "{name}/{uri}");
            let (codec, profile, rate, bytes, secs) = probe(&init, &seg);
            assert_eq!(codec, "aac");
            assert_eq!(profile, "LC");
            assert_eq!(rate, 48_000);
            assert!((secs - 2.0).abs() <= 0.1, "{name}/{uri} lasts {secs} s");
            assert!(
                (secs - extinf).abs() < 0.03,
                "EXTINF {extinf} vs media {secs}"
            );
            total_bytes += bytes;
            total_secs += secs;
        }
        let kbps = total_bytes as f64 * 8.0 / total_secs;
        assert!(
            (kbps - target).abs() <= target * 0.15,
            "{name}: {kbps:.0} bit/s is not within 15% of {target}"
        );
    }
    demo.stop();
}

#[test]
fn bad_whep_requests_get_clear_errors_and_the_node_keeps_serving() {
    let demo = Tern::start("demo", &[]);
    let a = demo.addr;

    let (s, body) = request(a, "POST", "/whep/demo", Some("application/sdp"), b"hello");
    assert_eq!(s, 400);
    assert!(text(body).contains("not an SDP offer"));

    let video_only = b"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\n";
    let (s, body) = request(a, "POST", "/whep/demo", Some("application/sdp"), video_only);
    assert_eq!(s, 400);
    assert!(text(body).contains("no audio"));

    let offer = b"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n";
    let (s, body) = request(a, "POST", "/whep/nope", Some("application/sdp"), offer);
    assert_eq!(s, 404, "{}", text(body));
    let (s, _) = request(
        a,
        "POST",
        "/whep/..%2f..%2fetc",
        Some("application/sdp"),
        offer,
    );
    assert_eq!(s, 404);

    let (s, _) = request(a, "POST", "/whep/demo", Some("text/plain"), offer);
    assert_eq!(s, 415);
    let (s, _) = request(
        a,
        "POST",
        "/whep/demo",
        Some("application/sdp"),
        &vec![b'v'; 200_000],
    );
    assert_eq!(s, 413);
    let (s, _) = request(a, "PUT", "/whep/demo", Some("application/sdp"), offer);
    assert_eq!(s, 405);
    let (s, _) = request(
        a,
        "DELETE",
        "/whep/demo/00000000000000000000000000000000",
        None,
        b"",
    );
    assert_eq!(s, 404);
    let (s, _) = demo.get("/hls/demo/../../etc/passwd");
    assert_eq!(s, 404);

    // Still healthy and counting.
    let (s, body) = demo.get("/health");
    assert_eq!(s, 200);
    let health = text(body);
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    let (s, body) = demo.get("/metrics");
    assert_eq!(s, 200);
    let metrics = text(body);
    assert!(
        metrics.contains("tern_relay_sessions_failed_total"),
        "failed sessions are counted: {metrics}"
    );
    // What the upstream alert rule reads (ops/prometheus): nothing is down.
    assert!(metrics.contains("tern_relay_upstream_up 1"), "{metrics}");
    demo.stop();
}
