//! Runs a packager for one broadcast beside the relay, isolated from it.
//!
//! The packager pulls the broadcast over its own origin-link subscription (exactly as a
//! separate `tern package` process would) and transcodes on its own OS thread, fed through a
//! bounded channel with `try_send`: if encoding or storage stalls, frames for the packager are
//! dropped and counted, and nothing upstream of the channel waits. WebRTC listeners share
//! nothing with this path but the process.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use tern_origin_link::{BroadcastId, Upstream};
use tern_packager::s3::{S3Settings, S3Sink, Uploader};
use tern_packager::spool::Spool;
use tern_packager::{AacCoder, DirectorySink, OpusFrame, PackagerConfig, Rendition, Sink, TeeSink};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::PackagerSection;

/// Frames buffered between the network and the encoder thread (512 × 20 ms ≈ 10 s).
const QUEUE_FRAMES: usize = 512;
/// After a stop, how long the uploader keeps uploading what is spooled (the rest waits in the
/// spool for the next start).
const UPLOAD_DRAIN: Duration = Duration::from_secs(5);

/// Where one broadcast's HLS goes: a local folder, S3, or both.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub dir: Option<PathBuf>,
    pub s3: Option<S3Output>,
}

/// S3 output shared by every broadcast of the process.
#[derive(Debug, Clone)]
pub struct S3Output {
    pub client: aws_sdk_s3::Client,
    pub settings: S3Settings,
    /// Each broadcast spools under `spool_dir/{broadcast}`.
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
}

/// The packager settings from the `[packager]` section.
pub fn settings(s: &PackagerSection) -> PackagerConfig {
    PackagerConfig {
        renditions: s
            .renditions
            .iter()
            .map(|r| Rendition {
                name: r.name.clone(),
                bitrate: r.bitrate,
            })
            .collect(),
        channels: s.channels,
        segment_duration: s.segment_duration(),
        window: s.window,
        record: s.record,
        aac_coder: if s.aac_coder == "fast" {
            AacCoder::Fast
        } else {
            AacCoder::TwoLoop
        },
    }
}

/// Starts packaging `broadcast` into `output` until `shutdown` flips to true; the playlist
/// then gets its end marker.
pub fn spawn(
    broadcast: BroadcastId,
    upstream: Arc<Upstream>,
    config: PackagerConfig,
    output: Output,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (tx, rx) = mpsc::sync_channel::<OpusFrame>(QUEUE_FRAMES);
        let name = broadcast.to_string();
        let mut s3_sink = None;
        let mut uploader = None;
        if let Some(s3) = &output.s3 {
            let dir = s3.spool_dir.join(&name);
            let spool = match Spool::open(&dir, s3.spool_max_bytes) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    error!(broadcast = %name, "S3 spool unusable, not packaging: {e}");
                    return;
                }
            };
            let (wake_tx, wake_rx) = tern_packager::s3::wake_channel();
            s3_sink = Some(S3Sink::new(spool.clone(), wake_tx, name.clone()));
            let up = Uploader {
                client: s3.client.clone(),
                settings: s3.settings.clone(),
                broadcast: name.clone(),
                spool,
                stats: Arc::default(),
            };
            uploader = Some(tokio::spawn(up.run(
                wake_rx,
                shutdown.clone(),
                UPLOAD_DRAIN,
            )));
        }
        let dir = output.dir.clone();
        let worker = std::thread::Builder::new()
            .name(format!("packager-{name}"))
            .spawn(move || encode_loop(config, rx, dir, s3_sink));
        let worker = match worker {
            Ok(w) => w,
            Err(e) => {
                error!(broadcast = %name, "cannot start the packager thread: {e}");
                return;
            }
        };
        let mut delay = Duration::from_millis(100);
        'outer: loop {
            let mut sub = tokio::select! {
                r = upstream.subscribe(&broadcast) => match r {
                    Ok(s) => { delay = Duration::from_millis(100); s }
                    Err(e) => {
                        warn!(%broadcast, "packager subscription failed: {e}; retrying in {delay:?}");
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            () = crate::stopped(&mut shutdown) => break 'outer,
                        }
                        delay = (delay * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
                () = crate::stopped(&mut shutdown) => break 'outer,
            };
            info!(%broadcast, "packager subscribed");
            loop {
                tokio::select! {
                    f = sub.next_frame() => match f {
                        Ok(Some(f)) => {
                            let frame = OpusFrame {
                                timestamp: f.timestamp,
                                capture_time_us: f.capture_time_us,
                                payload: f.payload,
                            };
                            match tx.try_send(frame) {
                                Ok(()) => {}
                                Err(mpsc::TrySendError::Full(_)) => {
                                    metrics::counter!("tern_packager_frames_dropped_total").increment(1);
                                }
                                Err(mpsc::TrySendError::Disconnected(_)) => {
                                    error!(%broadcast, "packager thread is gone; packaging stops");
                                    break 'outer;
                                }
                            }
                        }
                        Ok(None) => { info!(%broadcast, "broadcast ended upstream"); break; }
                        Err(e) => { warn!(%broadcast, "packager subscription lost: {e}"); break; }
                    },
                    () = crate::stopped(&mut shutdown) => break 'outer,
                }
            }
        }
        drop(tx);
        // The worker finishes the playlist and returns once the channel is closed.
        let joined = tokio::task::spawn_blocking(move || worker.join()).await;
        if !matches!(joined, Ok(Ok(()))) {
            error!(broadcast = %name, "packager thread panicked");
        }
        // The uploader saw the stop too; it drains the spool for a moment, then returns.
        if let Some(u) = uploader {
            let _ = u.await;
        }
    })
}

/// No output configured (never the case from the config loader, but harmless).
struct Discard;

impl Sink for Discard {
    fn apply(&mut self, _: &tern_packager::Command) -> Result<(), tern_packager::Error> {
        Ok(())
    }
}

fn encode_loop(
    config: PackagerConfig,
    rx: mpsc::Receiver<OpusFrame>,
    dir: Option<PathBuf>,
    s3: Option<S3Sink>,
) {
    let dir_sink = match dir.as_ref().map(DirectorySink::new).transpose() {
        Ok(s) => s,
        Err(e) => {
            error!("HLS output folder unusable: {e}");
            return;
        }
    };
    let result = match (dir_sink, s3) {
        (Some(d), Some(s)) => tern_packager::run(config, rx, &mut TeeSink(d, s)),
        (Some(mut d), None) => tern_packager::run(config, rx, &mut d),
        (None, Some(mut s)) => tern_packager::run(config, rx, &mut s),
        (None, None) => tern_packager::run(config, rx, &mut Discard),
    };
    if let Err(e) = result {
        error!("packager stopped: {e}");
    }
}
