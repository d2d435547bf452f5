//! The S3 output against a real S3-compatible server (moto, from `scripts/setup`'s venv in
//! `target/venv`): content types and cache control, two redundant packagers writing one
//! bucket with conditional puts, an outage (a TCP proxy between the uploader and moto that
//! is cut and restored) that loses no segment, and ffprobe playing what S3 serves.
//!
//! The outage lasts `TERN_OUTAGE_SECONDS` (default 20); the 120 s run of docs/cdn.md is
//! `TERN_OUTAGE_SECONDS=120 cargo nextest run -p tern-packager --test s3_moto outage`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command as Process, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_packager::s3::{S3Settings, S3Sink, UploadStats, Uploader};
use tern_packager::spool::Spool;
use tern_packager::{Command, OpusFrame, Packager, PackagerConfig, Sink};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const BUCKET: &str = "tern-hls";

/// A moto server on a free port, stopped on drop.
struct Moto {
    child: Child,
    addr: SocketAddr,
}

impl Moto {
    fn start() -> Self {
        let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/venv/bin/moto_server");
        assert!(
            bin.exists(),
            "{} is missing: run scripts/setup (it installs moto into target/venv)",
            bin.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Process::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { child, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn credentials() {
    // moto accepts any credentials; the SDK's standard chain reads these. Each test runs in its
    // own process under nextest, and these are set before any thread reads the environment.
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
}

fn settings(endpoint: String, prefix: &str) -> S3Settings {
    S3Settings {
        endpoint: Some(endpoint),
        bucket: BUCKET.into(),
        prefix: prefix.into(),
        path_style: true,
        attempt_timeout: Duration::from_secs(2),
        retry_min: Duration::from_millis(100),
        retry_max: Duration::from_secs(2),
        ..S3Settings::default()
    }
}

/// The bucket, readable without signatures (moto enforces bucket policies for anonymous
/// requests), as CloudFront reads it in production: for ffprobe and plain GETs.
async fn create_bucket(client: &aws_sdk_s3::Client) {
    client.create_bucket().bucket(BUCKET).send().await.unwrap();
    let policy = format!(
        r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Principal":"*","Action":"s3:GetObject","Resource":"arn:aws:s3:::{BUCKET}/*"}}]}}"#
    );
    client
        .put_bucket_policy()
        .bucket(BUCKET)
        .policy(policy)
        .send()
        .await
        .unwrap();
}

/// A valid CELT-only Opus packet (20 ms) that decodes to near-silence.
fn frame(ts: u64) -> OpusFrame {
    OpusFrame {
        timestamp: ts,
        capture_time_us: 1_700_000_000_000_000 + ts * 1_000_000 / 48_000,
        payload: Bytes::from_static(&[0xf8, 0xff, 0xfe]),
    }
}

fn temp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tern-s3-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// One packager writing to S3 through its own spool and uploader.
struct Pipeline {
    packager: Packager,
    sink: S3Sink,
    spool: Arc<Spool>,
    stats: Arc<UploadStats>,
    uploader: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
    produced: Vec<Command>,
}

impl Pipeline {
    fn start(
        rt: &tokio::runtime::Runtime,
        client: aws_sdk_s3::Client,
        settings: S3Settings,
        config: PackagerConfig,
        spool_dir: PathBuf,
    ) -> Self {
        let spool = Arc::new(Spool::open(spool_dir, 64 << 20).unwrap());
        let (wake_tx, wake_rx) = tern_packager::s3::wake_channel();
        let (stop, stop_rx) = watch::channel(false);
        let stats = Arc::new(UploadStats::default());
        let up = Uploader {
            client,
            settings,
            broadcast: "demo".into(),
            spool: spool.clone(),
            stats: stats.clone(),
        };
        let uploader = rt.spawn(up.run(wake_rx, stop_rx, Duration::from_secs(30)));
        let mut p = Self {
            packager: Packager::new(config).unwrap(),
            sink: S3Sink::new(spool.clone(), wake_tx, "demo"),
            spool,
            stats,
            uploader,
            stop,
            produced: Vec::new(),
        };
        p.drain();
        p
    }

    fn drain(&mut self) {
        while let Some(c) = self.packager.poll_command() {
            self.sink.apply(&c).unwrap();
            self.produced.push(c);
        }
    }

    fn push(&mut self, f: OpusFrame) {
        self.packager.push(f).unwrap();
        self.drain();
    }

    fn finish(&mut self) {
        self.packager.finish().unwrap();
        self.drain();
    }

    /// Waits until everything spooled is uploaded.
    fn wait_uploaded(&self, within: Duration) -> Duration {
        let start = Instant::now();
        while !self.spool.is_empty() {
            assert!(
                start.elapsed() < within,
                "spool not empty after {within:?}: {} entries",
                self.spool.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        start.elapsed()
    }

    fn stop(self, rt: &tokio::runtime::Runtime) {
        let _ = self.stop.send(true);
        rt.block_on(self.uploader).unwrap();
    }

    fn segments_produced(&self) -> BTreeSet<String> {
        self.produced
            .iter()
            .filter_map(|c| match c {
                Command::Put {
                    path,
                    kind: tern_packager::ObjectKind::Segment,
                    ..
                } => Some(path.clone()),
                _ => None,
            })
            .collect()
    }
}

/// Every key under `prefix`.
async fn list(client: &aws_sdk_s3::Client, prefix: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut token = None;
    loop {
        let out = client
            .list_objects_v2()
            .bucket(BUCKET)
            .prefix(prefix)
            .set_continuation_token(token)
            .send()
            .await
            .unwrap();
        keys.extend(
            out.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned)),
        );
        if out.is_truncated() != Some(true) {
            return keys;
        }
        token = out.next_continuation_token().map(str::to_owned);
    }
}

/// A plain HTTP GET (moto serves objects without signatures): status and body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = raw[end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = unchunk(&body);
    }
    (status, body)
}

fn unchunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

fn media_playlist(body: &[u8]) -> m3u8_rs::MediaPlaylist {
    match m3u8_rs::parse_playlist_res(body) {
        Ok(m3u8_rs::Playlist::MediaPlaylist(p)) => p,
        other => panic!("not a media playlist: {other:?}"),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn moto_honours_conditional_puts() {
    credentials();
    let moto = Moto::start();
    let rt = runtime();
    rt.block_on(async {
        let client = tern_packager::s3::client(&settings(moto.url(), "")).await;
        create_bucket(&client).await;
        let put = || {
            client
                .put_object()
                .bucket(BUCKET)
                .key("x")
                .if_none_match("*")
                .body(Bytes::from_static(b"1").into())
                .send()
        };
        put().await.unwrap();
        let err = put().await.unwrap_err();
        assert_eq!(err.raw_response().unwrap().status().as_u16(), 412);
    });
}

/// Two packagers fed the same broadcast, one joining 5 s late, write one bucket at once:
/// every object has the right Content-Type and Cache-Control, both playlists stay valid with
/// every named segment present, duplicates are 412s counted as success, expired segments are
/// deleted, and ffprobe plays both renditions from S3.
#[test]
fn redundant_packagers_share_a_bucket_and_ffprobe_plays_it() {
    credentials();
    let moto = Moto::start();
    let rt = runtime();
    let s = settings(moto.url(), "live");
    let client = rt.block_on(tern_packager::s3::client(&s));
    rt.block_on(create_bucket(&client));
    let mut a = Pipeline::start(
        &rt,
        client.clone(),
        s.clone(),
        PackagerConfig::default(),
        temp("red-a"),
    );
    let mut b: Option<Pipeline> = None;
    // 30 s of broadcast, paced 10× real time so both uploaders interleave with the packagers.
    for k in 0..1500u64 {
        a.push(frame(k * 960));
        if k == 250 {
            b = Some(Pipeline::start(
                &rt,
                client.clone(),
                s.clone(),
                PackagerConfig::default(),
                temp("red-b"),
            ));
        }
        if let Some(b) = b.as_mut() {
            b.push(frame(k * 960));
        }
        if k % 10 == 0 {
            std::thread::sleep(Duration::from_millis(20));
            // Whatever S3 serves now is consistent: every named segment exists.
            if k % 100 == 0 {
                let (status, body) =
                    http_get(moto.addr, &format!("/{BUCKET}/live/demo/64k/index.m3u8"));
                if k >= 300 {
                    assert_eq!(status, 200, "the playlist is served by now");
                }
                if status == 200 {
                    let keys = rt.block_on(list(&client, "live/demo/64k/"));
                    for seg in media_playlist(&body).segments {
                        assert!(
                            keys.contains(&format!("live/demo/64k/{}", seg.uri)),
                            "playlist names {} which is not stored",
                            seg.uri
                        );
                    }
                }
            }
        }
    }
    let mut b = b.unwrap();
    a.wait_uploaded(Duration::from_secs(30));
    b.wait_uploaded(Duration::from_secs(30));
    let a_stats = (
        a.stats.segments_stored.load(Ordering::Relaxed),
        a.stats.segments_already_stored.load(Ordering::Relaxed),
    );
    let b_stats = (
        b.stats.segments_stored.load(Ordering::Relaxed),
        b.stats.segments_already_stored.load(Ordering::Relaxed),
    );
    // Both published segments 3..=14 of each rendition; each was stored once.
    assert!(
        a_stats.1 + b_stats.1 >= 20,
        "the redundant writer's puts were 412s: a {a_stats:?} b {b_stats:?}"
    );
    assert_eq!(
        a_stats.0 + b_stats.0,
        a.segments_produced().union(&b.segments_produced()).count() as u64,
        "every distinct segment stored exactly once"
    );

    rt.block_on(async {
        let keys = list(&client, "live/demo/").await;
        for r in ["64k", "128k"] {
            let pl = client
                .get_object()
                .bucket(BUCKET)
                .key(format!("live/demo/{r}/index.m3u8"))
                .send()
                .await
                .unwrap();
            assert_eq!(pl.content_type(), Some("application/vnd.apple.mpegurl"));
            assert_eq!(pl.cache_control(), Some("max-age=1"));
            let body = pl.body.collect().await.unwrap().into_bytes();
            let pl = media_playlist(&body);
            for seg in &pl.segments {
                assert!(keys.contains(&format!("live/demo/{r}/{}", seg.uri)));
            }
            // Window 3 + grace 3: older segments were deleted.
            let stored = keys
                .iter()
                .filter(|k| k.starts_with(&format!("live/demo/{r}/")) && k.ends_with(".m4s"))
                .count();
            assert!(stored <= 7, "{r}: {stored} segments left: {keys:?}");
            let seg = client
                .head_object()
                .bucket(BUCKET)
                .key(format!("live/demo/{r}/{}", pl.segments[0].uri))
                .send()
                .await
                .unwrap();
            assert_eq!(seg.content_type(), Some("audio/mp4"));
            assert_eq!(seg.cache_control(), Some("max-age=31536000, immutable"));
            let init = client
                .head_object()
                .bucket(BUCKET)
                .key(format!("live/demo/{r}/init.mp4"))
                .send()
                .await
                .unwrap();
            assert_eq!(init.content_type(), Some("audio/mp4"));
        }
        let master = client
            .head_object()
            .bucket(BUCKET)
            .key("live/demo/master.m3u8")
            .send()
            .await
            .unwrap();
        assert_eq!(master.content_type(), Some("application/vnd.apple.mpegurl"));
        assert_eq!(master.cache_control(), Some("max-age=60"));
    });

    // End the broadcast (ENDLIST, so ffmpeg stops at the end instead of following the live
    // playlist), then ffprobe reads the master playlist straight from S3 (path-style URL):
    // both renditions, AAC-LC stereo 48 kHz, and ffmpeg decodes each without an error.
    a.finish();
    b.finish();
    a.wait_uploaded(Duration::from_secs(30));
    b.wait_uploaded(Duration::from_secs(30));
    let url = format!("{}/{BUCKET}/live/demo/master.m3u8", moto.url());
    let out = Process::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "stream=codec_name,profile,sample_rate,channels:format=nb_streams",
            "-of",
            "compact",
            &url,
        ])
        .output()
        .expect("ffprobe runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let streams = text
        .lines()
        .filter(|l| *l == "stream|codec_name=aac|profile=LC|sample_rate=48000|channels=2")
        .count();
    assert_eq!(streams, 2, "two AAC-LC renditions: {text:?}");
    assert!(text.contains("format|nb_streams=2"), "{text:?}");
    for r in ["64k", "128k"] {
        let url = format!("{}/{BUCKET}/live/demo/{r}/index.m3u8", moto.url());
        let out = Process::new("ffmpeg")
            .args(["-v", "error", "-i", &url, "-t", "30", "-f", "null", "-"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{r}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "{r}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    a.stop(&rt);
    b.stop(&rt);
}

/// How the proxy treats connections.
const UP: u8 = 0;
/// Accepts connections and never answers (a hung S3): tests the per-attempt timeout.
const BLACKHOLE: u8 = 1;
/// Closes connections at once (S3 unreachable).
const REFUSE: u8 = 2;

/// A TCP proxy in front of moto that can be cut. Cutting also kills open (pooled) connections.
struct Proxy {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    generation: watch::Sender<u64>,
}

impl Proxy {
    fn start(rt: &tokio::runtime::Runtime, upstream: SocketAddr) -> Self {
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(UP));
        let (generation, gen_rx) = watch::channel(0u64);
        let m = mode.clone();
        rt.spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let mut killed = gen_rx.clone();
                killed.mark_unchanged();
                match m.load(Ordering::SeqCst) {
                    UP => {
                        tokio::spawn(async move {
                            let Ok(mut out) = TcpStream::connect(upstream).await else {
                                return;
                            };
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
                                _ = killed.changed() => {}
                            }
                        });
                    }
                    BLACKHOLE => {
                        tokio::spawn(async move {
                            let _ = killed.changed().await;
                            drop(inbound);
                        });
                    }
                    _ => {
                        let _ = inbound.shutdown().await;
                    }
                }
            }
        });
        Self {
            addr,
            mode,
            generation,
        }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }
}

/// S3 goes away for `TERN_OUTAGE_SECONDS` (default 20; half hung, half refusing) while a
/// recording packager runs in real time. Nothing is lost: after S3 returns the spool drains
/// within 30 s, the final VOD playlist names every segment produced, and all are stored. While
/// it runs, the playlist S3 serves never names a segment that is not there.
#[test]
fn outage_loses_no_segment_and_catches_up() {
    credentials();
    let outage = Duration::from_secs(
        std::env::var("TERN_OUTAGE_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    );
    let moto = Moto::start();
    let rt = runtime();
    let proxy = Proxy::start(&rt, moto.addr);
    let direct = rt.block_on(tern_packager::s3::client(&settings(moto.url(), "")));
    rt.block_on(create_bucket(&direct));
    let s = settings(format!("http://{}", proxy.addr), "rec");
    let client = rt.block_on(tern_packager::s3::client(&s));
    let config = PackagerConfig {
        record: true,
        ..PackagerConfig::default()
    };
    let mut p = Pipeline::start(&rt, client, s, config, temp("outage"));

    // A watcher that checks, every 250 ms, that the stored playlist only names stored segments.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        let moto_addr = moto.addr;
        let direct = direct.clone();
        let handle = rt.handle().clone();
        std::thread::spawn(move || {
            let mut checks = 0;
            while !done.load(Ordering::Relaxed) {
                let (status, body) =
                    http_get(moto_addr, &format!("/{BUCKET}/rec/demo/128k/index.m3u8"));
                if status == 200 {
                    let keys = handle.block_on(list(&direct, "rec/demo/128k/"));
                    for seg in media_playlist(&body).segments {
                        assert!(
                            keys.contains(&format!("rec/demo/128k/{}", seg.uri)),
                            "playlist names {} which is not stored",
                            seg.uri
                        );
                    }
                    checks += 1;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            checks
        })
    };

    let before = Duration::from_secs(6);
    let after = Duration::from_secs(6);
    let total = before + outage + after;
    let start = Instant::now();
    let mut k = 0u64;
    let mut cut = false;
    let mut restored_at = None;
    let mut lag_at_restore = Duration::ZERO;
    let mut caught_up: Option<Duration> = None;
    while start.elapsed() < total {
        // Real time: one 20 ms frame per 20 ms.
        while Duration::from_millis(20 * k) <= start.elapsed() {
            p.push(frame(k * 960));
            k += 1;
        }
        let t = start.elapsed();
        if !cut && t >= before {
            proxy.set(BLACKHOLE);
            cut = true;
        }
        if cut && restored_at.is_none() && t >= before + outage / 2 {
            proxy.set(REFUSE);
        }
        if restored_at.is_none() && t >= before + outage {
            lag_at_restore = p.spool.lag();
            proxy.set(UP);
            restored_at = Some(Instant::now());
        }
        // Catch-up: from the moment S3 came back until the spool first emptied.
        if let (Some(at), None) = (restored_at, caught_up) {
            if p.spool.is_empty() {
                caught_up = Some(at.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let restored_at = restored_at.unwrap();
    while caught_up.is_none() && !p.spool.is_empty() {
        assert!(
            restored_at.elapsed() < Duration::from_secs(30),
            "no catch-up within 30 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let catch_up = caught_up.unwrap_or_else(|| restored_at.elapsed());
    assert!(
        catch_up < Duration::from_secs(30),
        "catch-up took {catch_up:?}"
    );
    p.finish();
    p.wait_uploaded(Duration::from_secs(30));
    done.store(true, Ordering::Relaxed);
    let checks = watcher
        .join()
        .expect("the stored playlist was always consistent");
    let retries = p.stats.retries.load(Ordering::Relaxed);
    eprintln!(
        "outage {outage:?}: lag at restore {lag_at_restore:?}, caught up in {catch_up:?} \
         (first empty spool after S3 returned), {retries} retried attempts, {checks} playlist checks"
    );
    assert!(retries > 0, "the outage was seen");
    assert!(
        checks > 10,
        "the watcher saw the stored playlist {checks} times"
    );
    assert!(
        lag_at_restore >= outage - Duration::from_secs(3),
        "{lag_at_restore:?}"
    );

    let produced = p.segments_produced();
    assert!(produced.len() as u64 >= 2 * (total.as_secs() / 2 - 2));
    let keys = rt.block_on(list(&direct, "rec/demo/"));
    for seg in &produced {
        assert!(keys.contains(&format!("rec/demo/{seg}")), "{seg} lost");
    }
    for r in ["64k", "128k"] {
        let (status, body) = http_get(moto.addr, &format!("/{BUCKET}/rec/demo/{r}/index.m3u8"));
        assert_eq!(status, 200);
        let text = String::from_utf8_lossy(&body).to_string();
        assert!(text.contains("#EXT-X-PLAYLIST-TYPE:VOD"), "{text}");
        assert!(text.contains("#EXT-X-ENDLIST"));
        let pl = media_playlist(&body);
        let named: BTreeSet<String> = pl
            .segments
            .iter()
            .map(|s| format!("{r}/{}", s.uri))
            .collect();
        let mine: BTreeSet<String> = produced
            .iter()
            .filter(|s| s.starts_with(&format!("{r}/")))
            .cloned()
            .collect();
        assert_eq!(
            named, mine,
            "the VOD playlist names every segment of the broadcast"
        );
    }
    assert_eq!(p.spool.dropped(), 0);
    p.stop(&rt);
}

/// A crash (here: the uploader never ran) leaves the spool on disk; the next run uploads it in
/// order.
#[test]
fn spool_left_by_a_crash_is_uploaded_by_the_next_run() {
    credentials();
    let moto = Moto::start();
    let rt = runtime();
    let s = settings(moto.url(), "crash");
    let client = rt.block_on(tern_packager::s3::client(&s));
    rt.block_on(create_bucket(&client));
    let dir = temp("crash");
    let produced = {
        let spool = Arc::new(Spool::open(&dir, 64 << 20).unwrap());
        let (wake_tx, _wake_rx) = tern_packager::s3::wake_channel();
        let mut sink = S3Sink::new(spool, wake_tx, "demo");
        let mut packager = Packager::new(PackagerConfig::default()).unwrap();
        let mut n = 0;
        for k in 0..400u64 {
            packager.push(frame(k * 960)).unwrap();
            while let Some(c) = packager.poll_command() {
                sink.apply(&c).unwrap();
                n += 1;
            }
        }
        n
    };
    assert!(std::fs::read_dir(&dir).unwrap().count() > 0);
    let p = Pipeline::start(&rt, client.clone(), s, PackagerConfig::default(), dir);
    let _ = produced;
    p.wait_uploaded(Duration::from_secs(20));
    let keys = rt.block_on(list(&client, "crash/demo/"));
    assert!(keys.contains("crash/demo/64k/2.m4s"), "{keys:?}");
    assert!(keys.contains("crash/demo/master.m3u8"));
    p.stop(&rt);
}

/// What the ordering proxy saw: objects S3 has acknowledged, and every broken ordering rule.
#[derive(Default)]
struct OrderLog {
    /// Keys whose PUT S3 has answered (200, or 412 for an immutable object), minus deletes.
    stored: BTreeSet<String>,
    /// Per folder, the segments named by the newest playlist S3 has acknowledged.
    named: std::collections::HashMap<String, BTreeSet<String>>,
    /// PUTs sent to S3 and not yet answered, per key.
    pending_puts: std::collections::HashMap<String, usize>,
    /// Requests sent and not yet answered, and the most seen at once.
    in_flight: usize,
    max_in_flight: usize,
    playlists_checked: usize,
    deletes_checked: usize,
    violations: Vec<String>,
}

/// One request as the proxy parsed it.
struct Request {
    method: String,
    key: String,
}

fn folder_of(key: &str) -> &str {
    key.rsplit_once('/').map_or("", |(f, _)| f)
}

impl OrderLog {
    /// Checks a request as it leaves for S3 against what S3 has acknowledged so far.
    fn sending(&mut self, req: &Request, body: &[u8]) {
        let folder = folder_of(&req.key).to_owned();
        if req.method == "PUT" && req.key.ends_with("/index.m3u8") {
            self.playlists_checked += 1;
            if self.pending_puts.get(&req.key).copied().unwrap_or(0) > 0 {
                self.violations
                    .push(format!("{} sent while an older one is unanswered", req.key));
            }
            let named: BTreeSet<String> = media_playlist(body)
                .segments
                .iter()
                .map(|s| format!("{folder}/{}", s.uri))
                .chain(std::iter::once(format!("{folder}/init.mp4")))
                .collect();
            for key in &named {
                if !self.stored.contains(key) {
                    self.violations
                        .push(format!("{} names {key} before S3 stored it", req.key));
                }
            }
        }
        if req.method == "DELETE" {
            self.deletes_checked += 1;
            match self.named.get(&folder) {
                Some(named) if !named.contains(&req.key) => {}
                _ => self.violations.push(format!(
                    "{} deleted before a stored playlist dropped it",
                    req.key
                )),
            }
        }
        if req.method == "PUT" {
            *self.pending_puts.entry(req.key.clone()).or_default() += 1;
        }
        self.in_flight += 1;
        self.max_in_flight = self.max_in_flight.max(self.in_flight);
    }

    /// S3 answered `req` with `status`; `body` is what was sent.
    fn answered(&mut self, req: &Request, body: &[u8], status: u16) {
        self.in_flight -= 1;
        if req.method == "PUT" {
            if let Some(n) = self.pending_puts.get_mut(&req.key) {
                *n -= 1;
            }
            if status == 200 || (status == 412 && !req.key.ends_with(".m3u8")) {
                self.stored.insert(req.key.clone());
                if req.key.ends_with("/index.m3u8") {
                    let folder = folder_of(&req.key).to_owned();
                    let named = media_playlist(body)
                        .segments
                        .iter()
                        .map(|s| format!("{folder}/{}", s.uri))
                        .collect();
                    self.named.insert(folder, named);
                }
            }
        }
        if req.method == "DELETE" && status / 100 == 2 {
            self.stored.remove(&req.key);
        }
    }
}

/// A TCP proxy in front of moto that parses each HTTP/1.1 request, holds every PUT back for a
/// pseudo-random 0–150 ms (so a playlist or delete sent too early would reach S3 first),
/// and checks every request against the responses S3 has already sent: a playlist names only
/// acknowledged objects, one write per playlist at a time, a delete only after an acknowledged
/// playlist dropped the segment.
fn start_order_proxy(
    rt: &tokio::runtime::Runtime,
    upstream: SocketAddr,
) -> (SocketAddr, Arc<std::sync::Mutex<OrderLog>>) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(std::sync::Mutex::new(OrderLog::default()));
    let shared = log.clone();
    rt.spawn(async move {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        loop {
            let Ok((inbound, _)) = listener.accept().await else {
                return;
            };
            let Ok(outbound) = TcpStream::connect(upstream).await else {
                return;
            };
            let log = shared.clone();
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let mut rng = seed;
            tokio::spawn(async move {
                let (client_read, mut client_write) = inbound.into_split();
                let (mut server_read, mut server_write) = outbound.into_split();
                // The request S3 is answering now (HTTP/1.1: one at a time per connection).
                let current = Arc::new(std::sync::Mutex::new(None::<(Request, Vec<u8>)>));
                let answers = {
                    let current = current.clone();
                    let log = log.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let Ok(n) = server_read.read(&mut buf).await else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            let chunk = &buf[..n];
                            // The first bytes of an answer carry its status line (skip a
                            // `100 Continue` interim answer).
                            let mut head = chunk;
                            if head.starts_with(b"HTTP/1.1 100") {
                                head = head
                                    .windows(4)
                                    .position(|w| w == b"\r\n\r\n")
                                    .map_or(&[][..], |i| &head[i + 4..]);
                            }
                            if head.starts_with(b"HTTP/") {
                                let status = std::str::from_utf8(&head[..head.len().min(12)])
                                    .ok()
                                    .and_then(|l| l.get(9..12))
                                    .and_then(|c| c.parse().ok())
                                    .unwrap_or(0);
                                if let Some((req, body)) = current.lock().unwrap().take() {
                                    log.lock().unwrap().answered(&req, &body, status);
                                }
                            }
                            if client_write.write_all(chunk).await.is_err() {
                                return;
                            }
                        }
                    })
                };
                let mut reader = BufReader::new(client_read);
                loop {
                    let mut head = Vec::new();
                    loop {
                        let before = head.len();
                        match reader.read_until(b'\n', &mut head).await {
                            Ok(0) | Err(_) => {
                                answers.abort();
                                return;
                            }
                            Ok(_) => {}
                        }
                        if &head[before..] == b"\r\n" {
                            break;
                        }
                    }
                    let text = String::from_utf8_lossy(&head).to_string();
                    let mut words = text.split_whitespace();
                    let method = words.next().unwrap_or_default().to_owned();
                    let target = words.next().unwrap_or_default();
                    let key = target
                        .split('?')
                        .next()
                        .unwrap_or_default()
                        .trim_start_matches(&format!("/{BUCKET}/"))
                        .to_owned();
                    let length: usize = text
                        .lines()
                        .find_map(|l| {
                            let (name, value) = l.split_once(':')?;
                            name.eq_ignore_ascii_case("content-length")
                                .then(|| value.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    let mut body = vec![0u8; length];
                    if reader.read_exact(&mut body).await.is_err() {
                        answers.abort();
                        return;
                    }
                    if method == "PUT" {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        tokio::time::sleep(Duration::from_millis(rng % 150)).await;
                    }
                    let req = Request { method, key };
                    log.lock().unwrap().sending(&req, &body);
                    *current.lock().unwrap() = Some((req, body.clone()));
                    if server_write.write_all(&head).await.is_err()
                        || server_write.write_all(&body).await.is_err()
                    {
                        answers.abort();
                        return;
                    }
                }
            });
        }
    });
    (addr, log)
}

/// Uploads several at a time (both renditions, PUTs held back at random by the proxy) and
/// still: every playlist S3 receives names only objects S3 has acknowledged, writes of one
/// playlist never overlap, and deletes follow an acknowledged playlist that dropped the
/// segment. Fails if the spool let a playlist or a delete out too early.
#[test]
fn concurrent_uploads_keep_the_ordering_guarantees() {
    credentials();
    let moto = Moto::start();
    let rt = runtime();
    let direct = rt.block_on(tern_packager::s3::client(&settings(moto.url(), "")));
    rt.block_on(create_bucket(&direct));
    let (proxy, log) = start_order_proxy(&rt, moto.addr);
    let s = S3Settings {
        upload_concurrency: 4,
        ..settings(format!("http://{proxy}"), "par")
    };
    let client = rt.block_on(tern_packager::s3::client(&s));
    let mut p = Pipeline::start(&rt, client, s, PackagerConfig::default(), temp("par"));
    // 40 s of broadcast at about 20× real time: segments and playlists pile up faster than the
    // proxy lets them through.
    for k in 0..2000u64 {
        p.push(frame(k * 960));
        if k % 20 == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    p.finish();
    p.wait_uploaded(Duration::from_secs(60));
    let produced = p.segments_produced();
    p.stop(&rt);
    let log = log.lock().unwrap();
    assert!(log.violations.is_empty(), "{:#?}", log.violations);
    assert!(
        log.max_in_flight >= 2,
        "uploads ran one at a time ({}): the test proves nothing",
        log.max_in_flight
    );
    assert!(log.playlists_checked >= 10, "{}", log.playlists_checked);
    assert!(log.deletes_checked >= 10, "{}", log.deletes_checked);
    // What S3 holds at the end agrees: the final playlists name only stored segments.
    let keys = rt.block_on(list(&direct, "par/demo/"));
    for r in ["64k", "128k"] {
        let (status, body) = http_get(moto.addr, &format!("/{BUCKET}/par/demo/{r}/index.m3u8"));
        assert_eq!(status, 200);
        for seg in media_playlist(&body).segments {
            assert!(keys.contains(&format!("par/demo/{r}/{}", seg.uri)));
        }
    }
    assert!(produced.len() >= 36, "{}", produced.len());
    eprintln!(
        "{} playlists and {} deletes checked, up to {} requests in flight",
        log.playlists_checked, log.deletes_checked, log.max_in_flight
    );
}
