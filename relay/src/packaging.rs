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
use tern_packager::{DirectorySink, OpusFrame, PackagerConfig, Rendition};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::PackagerSection;

/// Frames buffered between the network and the encoder thread (512 × 20 ms ≈ 10 s).
const QUEUE_FRAMES: usize = 512;

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
    }
}

/// Starts packaging `broadcast` into `dir` until `shutdown` flips to true; the playlist then
/// gets its end marker.
pub fn spawn(
    broadcast: BroadcastId,
    upstream: Arc<Upstream>,
    config: PackagerConfig,
    dir: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (tx, rx) = mpsc::sync_channel::<OpusFrame>(QUEUE_FRAMES);
        let name = broadcast.to_string();
        let worker = std::thread::Builder::new()
            .name(format!("packager-{name}"))
            .spawn(move || encode_loop(config, rx, dir));
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
    })
}

fn encode_loop(config: PackagerConfig, rx: mpsc::Receiver<OpusFrame>, dir: PathBuf) {
    let mut sink = match DirectorySink::new(&dir) {
        Ok(s) => s,
        Err(e) => {
            error!(dir = %dir.display(), "HLS output unusable: {e}");
            return;
        }
    };
    if let Err(e) = tern_packager::run(config, rx, &mut sink) {
        error!(dir = %dir.display(), "packager stopped: {e}");
    }
}
