//! Segment upload latency: time from a segment's last sample to its object existing in S3,
//! with the real packager, spool and uploader against a real S3 server (moto, started here
//! from `target/venv`, or any S3-compatible endpoint given with `--endpoint`).
//!
//! The input is played in real time: frame `k` (20 ms) is handed to the packager when its last
//! sample would have been captured live (start + (k + 1) × 20 ms), stamped with the capture time
//! of its first sample (start + k × 20 ms), as the origin stamps frames. The packager derives
//! each segment's end capture time from those stamps; the uploader records the time from there
//! until S3 answered the segment's PUT (the object exists from then on). That includes the
//! wait for the AAC encoder's look-ahead (the segment closes when the next frame's packet comes
//! out), the spool write, the queue behind other uploads, and the PUT itself.
//!
//! Each `--concurrency` value gets its own pipeline (packager, spool, uploader, key prefix),
//! all fed the same frames at the same time, so they are compared side by side under the same
//! machine load and against the same server.
//!
//! ```sh
//! bench/s3-latency                      # 60 s, moto from target/venv, concurrency 1 and 4
//! bench/s3-latency --seconds 10 --concurrency 4
//! ```
//!
//! Usage: `s3_latency INPUT.opus [--seconds N] [--concurrency 1,4] [--endpoint URL --bucket
//! NAME]`. With
//! `--endpoint`, credentials come from the standard AWS chain (e.g. `AWS_ACCESS_KEY_ID`) and the
//! bucket must exist.

use std::path::PathBuf;
use std::process::{Child, Command as Process, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opus_input::read_opus;
use tern_packager::s3::{S3Settings, S3Sink, UploadStats, Uploader};
use tern_packager::spool::Spool;
use tern_packager::{OpusFrame, Packager, PackagerConfig, Sink};
use tokio::sync::watch;

mod opus_input;

/// A moto server on a free loopback port, stopped on drop.
struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_moto() -> (Moto, String) {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/venv/bin/moto_server");
    assert!(
        bin.exists(),
        "{} is missing: run scripts/setup (it installs moto into target/venv)",
        bin.display()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Process::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server starts");
    let moto = Moto(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    (moto, format!("http://127.0.0.1:{port}"))
}

/// One packager writing one broadcast to S3 through its own spool and uploader.
struct Pipeline {
    label: String,
    packager: Packager,
    sink: S3Sink,
    spool: Arc<Spool>,
    stats: Arc<UploadStats>,
    stop: watch::Sender<bool>,
    uploader: tokio::task::JoinHandle<()>,
    spool_dir: PathBuf,
}

impl Pipeline {
    fn start(
        rt: &tokio::runtime::Runtime,
        client: aws_sdk_s3::Client,
        settings: S3Settings,
        label: String,
    ) -> Self {
        let spool_dir =
            std::env::temp_dir().join(format!("tern-s3-latency-{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&spool_dir);
        let spool = Arc::new(Spool::open(&spool_dir, 1 << 30).expect("spool opens"));
        let (wake_tx, wake_rx) = tern_packager::s3::wake_channel();
        let (stop, stop_rx) = watch::channel(false);
        let stats = Arc::new(UploadStats::default());
        let up = Uploader {
            client,
            settings,
            broadcast: "bench".into(),
            spool: spool.clone(),
            stats: stats.clone(),
        };
        let uploader = rt.spawn(up.run(wake_rx, stop_rx, Duration::from_secs(30)));
        let mut p = Self {
            label,
            packager: Packager::new(PackagerConfig::default()).expect("packager starts"),
            sink: S3Sink::new(spool.clone(), wake_tx, "bench"),
            spool,
            stats,
            stop,
            uploader,
            spool_dir,
        };
        p.drain();
        p
    }

    fn drain(&mut self) {
        while let Some(c) = self.packager.poll_command() {
            self.sink.apply(&c).expect("spool write");
        }
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut input = None;
    let mut seconds = 60u64;
    let mut endpoint = None;
    let mut bucket = "tern-bench".to_owned();
    let mut concurrency = vec![1usize, 4];
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--seconds N")
            }
            "--endpoint" => endpoint = Some(args.next().expect("--endpoint URL")),
            "--bucket" => bucket = args.next().expect("--bucket NAME"),
            "--concurrency" => {
                concurrency = args
                    .next()
                    .map(|v| v.split(',').map(|n| n.parse().expect("a number")).collect())
                    .expect("--concurrency N[,N...]")
            }
            _ => input = Some(PathBuf::from(a)),
        }
    }
    let input = input.expect("usage: s3_latency INPUT.opus [--seconds N] [--endpoint URL]");
    let frames: Vec<OpusFrame> = read_opus(&input);
    let wanted = usize::try_from(seconds * 50).expect("seconds fits");
    assert!(
        frames.len() >= wanted,
        "the input has {} frames, {seconds} s needs {wanted}",
        frames.len()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (_moto, endpoint, own_server) = match endpoint {
        Some(e) => (None, e, false),
        None => {
            // moto accepts any credentials.
            std::env::set_var("AWS_ACCESS_KEY_ID", "bench");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", "bench");
            std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
            let (m, url) = start_moto();
            (Some(m), url, true)
        }
    };
    let settings = S3Settings {
        endpoint: Some(endpoint.clone()),
        bucket: bucket.clone(),
        path_style: true,
        ..S3Settings::default()
    };
    let client = rt.block_on(tern_packager::s3::client(&settings));
    if own_server {
        rt.block_on(client.create_bucket().bucket(&bucket).send())
            .expect("bucket created");
    }
    let mut pipelines: Vec<Pipeline> = concurrency
        .iter()
        .map(|&n| {
            let label = format!("concurrency {n}");
            let s = S3Settings {
                prefix: format!("c{n}"),
                upload_concurrency: n,
                ..settings.clone()
            };
            Pipeline::start(&rt, client.clone(), s, label)
        })
        .collect();
    println!(
        "server: {} ({endpoint}); {seconds} s of {} in real time; {} pipeline(s) side by side",
        if own_server { "moto" } else { "given endpoint" },
        input.display(),
        pipelines.len()
    );

    // Real time: frame k is due when its last sample is captured.
    let start = Instant::now();
    let epoch_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64;
    for (k, f) in frames.iter().take(wanted).enumerate() {
        let due = Duration::from_millis(20 * (k as u64 + 1));
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let frame = OpusFrame {
            capture_time_us: epoch_us + 20_000 * k as u64,
            ..f.clone()
        };
        for p in &mut pipelines {
            p.packager.push(frame.clone()).expect("push");
            p.drain();
        }
    }
    let behind = start.elapsed().saturating_sub(Duration::from_secs(seconds));
    for p in &mut pipelines {
        p.packager.finish().expect("finish");
        p.drain();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while pipelines.iter().any(|p| !p.spool.is_empty()) {
        assert!(Instant::now() < deadline, "uploads did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("feeding ended {} after real time", ms(behind));
    println!("| uploads | rendition | segments | p50 | p99 | max |");
    println!("|---|---|---|---|---|---|");
    for p in pipelines {
        let _ = p.stop.send(true);
        rt.block_on(p.uploader).expect("uploader ends");
        let all = p.stats.segment_latencies();
        assert!(
            p.stats.retries.load(std::sync::atomic::Ordering::Relaxed) == 0,
            "{}: uploads were retried; the figures would measure failures",
            p.label
        );
        // The last segment is flushed at the end of the broadcast, padded past the last
        // frame fed: its end lies after the feeding stopped, so it is left out.
        let index = |path: &str| -> u64 {
            let name = path.rsplit('/').next().unwrap_or_default();
            name.trim_end_matches(".m4s").parse().unwrap_or(0)
        };
        let last = all.iter().map(|(path, _)| index(path)).max().unwrap_or(0);
        for rendition in ["64k", "128k", "both"] {
            let mut l: Vec<Duration> = all
                .iter()
                .filter(|(path, _)| index(path) < last)
                .filter(|(path, _)| {
                    rendition == "both" || path.starts_with(&format!("{rendition}/"))
                })
                .map(|(_, d)| *d)
                .collect();
            assert!(
                !l.is_empty(),
                "{}: no {rendition} segment uploaded",
                p.label
            );
            l.sort();
            println!(
                "| {} | {rendition} | {} | {} | {} | {} |",
                p.label,
                l.len(),
                ms(percentile(&l, 50.0)),
                ms(percentile(&l, 99.0)),
                ms(l[l.len() - 1])
            );
        }
        let _ = std::fs::remove_dir_all(&p.spool_dir);
    }
}
