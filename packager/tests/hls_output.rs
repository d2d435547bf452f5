//! End to end: real Opus frames (libopus, 64 kbps, 20 ms) of a 440 Hz tone with a click every
//! second → `Packager` → `DirectorySink` → checked with the real `ffprobe` / `ffmpeg` CLIs.

use std::collections::BTreeMap;
use std::f32::consts::TAU;
use std::path::{Path, PathBuf};
use std::process::Command as Process;

use bytes::Bytes;
use ffmpeg::format::sample::{Sample, Type as SampleType};
use ffmpeg_next as ffmpeg;
use m3u8_rs::Playlist;
use tern_packager::{DirectorySink, OpusFrame, Packager, PackagerConfig, Sink};

const RATE: u32 = 48_000;
/// The packager joins the broadcast 3.3 s in, mid-segment, like a real late joiner.
const JOIN_AT: u64 = 158_400;
const SECONDS: u64 = 9;
/// Wall clock at media time 0 (2023-11-14T22:13:20Z).
const EPOCH_US: u64 = 1_700_000_000_000_000;

/// The origin's test signal: a 440 Hz tone at -6 dBFS with a 5 ms noise click at every whole
/// second of media time.
fn signal(t: u64) -> f32 {
    let secs = t as f32 / RATE as f32;
    let tone = 0.5 * (TAU * 440.0 * secs).sin();
    let in_second = t % u64::from(RATE);
    if in_second < 240 {
        // Deterministic pseudo-noise (an LCG), decaying over the click.
        let x = (t
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407)
            >> 40) as f32
            / (1u64 << 24) as f32;
        tone + (x * 2.0 - 1.0) * 0.8 * (1.0 - in_second as f32 / 240.0)
    } else {
        tone
    }
}

/// Encodes `SECONDS` of the signal from media time `JOIN_AT` into 20 ms Opus packets, with
/// RTP-style timestamps (960 per packet).
fn opus_frames() -> Vec<OpusFrame> {
    ffmpeg::init().expect("FFmpeg initialises");
    let codec = ffmpeg::encoder::find_by_name("libopus").expect("Debian's FFmpeg has libopus");
    let ctx = ffmpeg::codec::Context::new_with_codec(codec);
    let mut enc = ctx.encoder().audio().expect("audio encoder context");
    enc.set_rate(RATE as i32);
    enc.set_channel_layout(ffmpeg::ChannelLayout::STEREO);
    enc.set_channels(2);
    enc.set_format(Sample::F32(SampleType::Packed));
    enc.set_bit_rate(64_000);
    enc.set_time_base((1, RATE as i32));
    let mut enc = enc.open_as(codec).expect("libopus opens");
    let frame_size = enc.frame_size() as usize;
    assert_eq!(frame_size, 960, "libopus defaults to 20 ms frames");

    let mut packets = Vec::new();
    let receive = |enc: &mut ffmpeg::encoder::Audio, packets: &mut Vec<Bytes>| {
        let mut p = ffmpeg::Packet::empty();
        while enc.receive_packet(&mut p).is_ok() {
            packets.push(Bytes::copy_from_slice(
                p.data().expect("encoded packets have data"),
            ));
        }
    };
    let total = (SECONDS * u64::from(RATE)) as usize;
    let mut frame = ffmpeg::frame::Audio::new(
        Sample::F32(SampleType::Packed),
        frame_size,
        ffmpeg::ChannelLayout::STEREO,
    );
    frame.set_channels(2);
    frame.set_rate(RATE);
    for (k, start) in (0..total).step_by(frame_size).enumerate() {
        let data = frame.plane_mut::<f32>(0);
        for i in 0..frame_size {
            let v = signal(JOIN_AT + (start + i) as u64);
            data[2 * i] = v;
            data[2 * i + 1] = v;
        }
        frame.set_pts(Some((k * frame_size) as i64));
        enc.send_frame(&frame).expect("libopus takes the frame");
        receive(&mut enc, &mut packets);
    }
    enc.send_eof().expect("flush libopus");
    receive(&mut enc, &mut packets);
    packets
        .into_iter()
        .enumerate()
        .map(|(k, payload)| {
            let timestamp = JOIN_AT + k as u64 * 960;
            OpusFrame {
                timestamp,
                capture_time_us: EPOCH_US + timestamp * 1_000_000 / u64::from(RATE),
                payload,
            }
        })
        .collect()
}

fn temp_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    std::env::temp_dir().join(format!("tern-packager-it-{}-{nanos}", std::process::id()))
}

fn run(cmd: &mut Process) -> Vec<u8> {
    let out = cmd.output().expect("ffprobe/ffmpeg CLI installed");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `key=value` lines of `ffprobe -show_entries stream=... -of default=nw=1`.
fn probe_stream(file: &Path) -> BTreeMap<String, String> {
    let out = run(Process::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "a:0",
            "-show_entries",
            "stream=codec_name,profile,sample_rate,channels",
            "-of",
            "default=nw=1",
        ])
        .arg(file));
    String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

/// (pts seconds, duration seconds, size bytes) of every packet.
fn probe_packets(file: &Path) -> Vec<(f64, f64, u64)> {
    let out = run(Process::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "a:0",
            "-show_entries",
            "packet=pts_time,duration_time,size",
            "-of",
            "csv=p=0",
        ])
        .arg(file));
    let mut packets: Vec<(f64, f64, u64)> = String::from_utf8_lossy(&out)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), 3, "unexpected ffprobe line {l:?}");
            (
                f[0].parse().expect("pts_time"),
                f[1].parse().unwrap_or(f64::NAN),
                f[2].parse().expect("size"),
            )
        })
        .collect();
    // ffprobe's mov demuxer reports N/A as the first packet's duration in a fragmented file
    // (ffmpeg's own HLS fMP4 output shows the same): derive it from the next packet's pts.
    for i in 0..packets.len().saturating_sub(1) {
        if packets[i].1.is_nan() {
            packets[i].1 = packets[i + 1].0 - packets[i].0;
        }
    }
    assert!(
        packets.iter().all(|p| p.1.is_finite()),
        "durations known: {packets:?}"
    );
    packets
}

fn media_playlist(path: &Path) -> m3u8_rs::MediaPlaylist {
    let bytes = std::fs::read(path).expect("playlist written");
    match m3u8_rs::parse_playlist_res(&bytes) {
        Ok(Playlist::MediaPlaylist(p)) => p,
        other => panic!("{path:?} is not a media playlist: {other:?}"),
    }
}

#[test]
fn packages_real_opus_into_valid_hls() {
    let frames = opus_frames();
    assert!(frames.len() as u64 >= SECONDS * 50);
    let dir = temp_dir();
    let mut sink = DirectorySink::new(&dir).expect("temp dir");
    let mut packager = Packager::new(PackagerConfig::default()).expect("default config is valid");
    let mut apply = |p: &mut Packager| {
        while let Some(c) = p.poll_command() {
            sink.apply(&c).expect("local writes succeed");
        }
    };
    apply(&mut packager);
    let mut window_before_finish = None;
    let started = std::time::Instant::now();
    for f in frames {
        packager.push(f).expect("valid frames package");
        apply(&mut packager);
    }
    let elapsed = started.elapsed();
    // The live playlist (before finish) holds exactly `window` full segments.
    for r in ["64k", "128k"] {
        let pl = media_playlist(&dir.join(r).join("index.m3u8"));
        assert!(!pl.end_list);
        assert_eq!(pl.segments.len(), 3, "window of 3 segments in {r}");
        for s in &pl.segments {
            assert!((s.duration - 2.0).abs() <= 0.1, "{r} EXTINF {}", s.duration);
        }
        window_before_finish = Some(pl.media_sequence);
    }
    packager.finish().expect("finish");
    apply(&mut packager);
    let stats = packager.stats();
    eprintln!("packaged {SECONDS} s in {elapsed:?}; stats: {stats:#?}");
    assert_eq!(stats.malformed_frames, 0);
    assert_eq!(stats.restarts, 0);
    for r in &stats.renditions {
        assert_eq!(
            r.partial_segments_dropped, 1,
            "the join-time segment is partial"
        );
    }

    // Master playlist: both renditions, CODECS and bandwidths.
    let master =
        match m3u8_rs::parse_playlist_res(&std::fs::read(dir.join("master.m3u8")).expect("master"))
        {
            Ok(Playlist::MasterPlaylist(m)) => m,
            other => panic!("master.m3u8: {other:?}"),
        };
    assert_eq!(master.variants.len(), 2);

    // First complete segment: the one after the join-time segment.
    let first_index = JOIN_AT / 96_000 + 1;
    let last_index = (JOIN_AT + SECONDS * u64::from(RATE) - 1) / 96_000;
    assert_eq!(
        window_before_finish,
        Some(last_index - 3),
        "media sequence = first index in window"
    );

    for (name, target) in [("64k", 64_000.0), ("128k", 128_000.0)] {
        let variant = master
            .variants
            .iter()
            .find(|v| v.uri == format!("{name}/index.m3u8"))
            .expect("variant");
        assert_eq!(variant.codecs.as_deref(), Some("mp4a.40.2"));
        let average = variant.average_bandwidth.expect("AVERAGE-BANDWIDTH");
        assert!(variant.bandwidth >= average && average as f64 >= target);

        let rdir = dir.join(name);
        let pl = media_playlist(&rdir.join("index.m3u8"));
        assert!(pl.end_list);
        assert_eq!(pl.segments.len(), 3);
        assert_eq!(pl.media_sequence, last_index - 2);

        let init = std::fs::read(rdir.join("init.mp4")).expect("init.mp4");
        let mut whole = init.clone();
        let (mut payload_bytes, mut media_secs, mut file_bytes) = (0u64, 0.0f64, 0u64);
        let mut peak = 0.0f64;
        for index in first_index..=last_index {
            let seg_path = rdir.join(format!("{index}.m4s"));
            let seg = std::fs::read(&seg_path).unwrap_or_else(|e| panic!("{seg_path:?}: {e}"));
            whole.extend_from_slice(&seg);
            let probe_path = dir.join(format!("{name}-{index}.mp4"));
            std::fs::write(&probe_path, [init.as_slice(), seg.as_slice()].concat())
                .expect("write probe file");
            let stream = probe_stream(&probe_path);
            assert_eq!(
                stream.get("codec_name").map(String::as_str),
                Some("aac"),
                "{stream:?}"
            );
            assert_eq!(
                stream.get("profile").map(String::as_str),
                Some("LC"),
                "{stream:?}"
            );
            assert_eq!(
                stream.get("sample_rate").map(String::as_str),
                Some("48000"),
                "{stream:?}"
            );
            assert_eq!(
                stream.get("channels").map(String::as_str),
                Some("2"),
                "{stream:?}"
            );
            let packets = probe_packets(&probe_path);
            let duration: f64 = packets.iter().map(|p| p.1).sum();
            let bytes: u64 = packets.iter().map(|p| p.2).sum();
            // tfdt puts the segment on the media-time grid: its first frame starts within one
            // AAC frame after index × 2 s.
            let start = packets[0].0;
            let boundary = index as f64 * 2.0;
            assert!(
                start >= boundary - 1e-6 && start < boundary + 1024.0 / 48_000.0,
                "{name}/{index}: starts {start}"
            );
            let is_last = index == last_index;
            if is_last {
                // Flushed by finish: what is left of the broadcast (plus padding to a frame).
                let left = (JOIN_AT + SECONDS * 48_000) as f64 / 48_000.0 - boundary;
                assert!(
                    duration > 0.0 && duration <= left + 2.0 * 1024.0 / 48_000.0 + 1e-6,
                    "{duration} vs {left}"
                );
            } else {
                assert!(
                    (duration - 2.0).abs() <= 0.1,
                    "{name}/{index}: duration {duration}"
                );
                let bps = bytes as f64 * 8.0 / duration;
                let file_bps = seg.len() as f64 * 8.0 / duration;
                eprintln!("{name}/{index}.m4s: {duration:.4} s, payload {bps:.0} bit/s, file {file_bps:.0} bit/s");
                peak = peak.max(file_bps);
                payload_bytes += bytes;
                media_secs += duration;
                file_bytes += seg.len() as u64;
            }
        }
        let payload_bps = payload_bytes as f64 * 8.0 / media_secs;
        let file_bps = file_bytes as f64 * 8.0 / media_secs;
        eprintln!("{name}: payload {payload_bps:.0} bit/s, with boxes {file_bps:.0} bit/s, peak segment {peak:.0} bit/s; declared BANDWIDTH {} AVERAGE-BANDWIDTH {average}", variant.bandwidth);
        assert!(
            (payload_bps / target - 1.0).abs() <= 0.15,
            "{name}: AAC payload bitrate {payload_bps:.0} not within 15% of {target}"
        );
        assert!(
            peak <= variant.bandwidth as f64,
            "{name}: peak {peak:.0} above BANDWIDTH {}",
            variant.bandwidth
        );

        // The audio survived: decode the whole rendition and count zero crossings away from the
        // clicks (which sit at whole seconds of media time); 440 Hz crosses 880 times a second.
        let whole_path = dir.join(format!("{name}-whole.mp4"));
        std::fs::write(&whole_path, &whole).expect("write whole");
        let pcm = run(Process::new("ffmpeg")
            .args(["-v", "error", "-i"])
            .arg(&whole_path)
            .args(["-f", "f32le", "-"]));
        // Left channel of the interleaved stereo output (a downmix would rescale the level).
        let samples: Vec<f32> = pcm
            .chunks_exact(8)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let seconds_decoded = samples.len() / 48_000;
        assert!(seconds_decoded >= 6, "decoded {} samples", samples.len());
        for s in 0..seconds_decoded {
            let window = &samples[s * 48_000 + 12_000..s * 48_000 + 36_000];
            let crossings = window
                .windows(2)
                .filter(|w| (w[0] < 0.0) != (w[1] < 0.0))
                .count();
            let rms = (window.iter().map(|v| v * v).sum::<f32>() / window.len() as f32).sqrt();
            assert!(
                (430..=450).contains(&crossings),
                "{name} second {s}: {crossings} crossings in 0.5 s"
            );
            assert!((0.3..0.42).contains(&rms), "{name} second {s}: rms {rms}");
        }
    }
    // FFmpeg's own HLS demuxer reads each rendition's playlist, init segment and window.
    for name in ["64k", "128k"] {
        let playlist = dir.join(name).join("index.m3u8");
        let stream = probe_stream(&playlist);
        assert_eq!(
            stream.get("codec_name").map(String::as_str),
            Some("aac"),
            "{name} via HLS: {stream:?}"
        );
        let packets = probe_packets(&playlist);
        let seconds: f64 = packets.iter().map(|p| p.1).sum();
        let listed: f64 = media_playlist(&playlist)
            .segments
            .iter()
            .map(|s| f64::from(s.duration))
            .sum();
        assert!(
            (seconds - listed).abs() < 0.05,
            "{name}: HLS demuxer read {seconds} s, playlist lists {listed} s"
        );
    }
    std::fs::remove_dir_all(&dir).expect("clean up temp dir");
}
