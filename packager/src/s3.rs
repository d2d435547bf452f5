//! HLS to S3 (or an S3-compatible store) for a CDN, through an on-disk spool.
//!
//! ```text
//! packager thread ──Sink::apply──▶ Spool (files on disk) ──wake (bounded channel)──▶ uploader task ──▶ S3
//! ```
//!
//! - [`S3Sink`] is the packager's [`Sink`]: it appends each command to the [`Spool`] on the
//!   packager's own thread (a small file write) and wakes the uploader with a `try_send` on a
//!   bounded channel of one slot. It never waits on the network, so an S3 stall never slows
//!   encoding, and everything produced is on disk before the packager moves on.
//! - [`Uploader::run`] is a tokio task that uploads spool entries, up to
//!   [`S3Settings::upload_concurrency`] at once, as the spool's ordering rules let them out
//!   (segment before the playlist naming it, the newest playlist only and one write per object
//!   at a time, deletes after the playlist that dropped the segment): segments of different
//!   renditions go in parallel, and a playlist waits only for its own rendition. Each upload is
//!   retried with exponential backoff and jitter (backon) until it succeeds or the task is told
//!   to stop. What is left when it stops stays in the spool for the next run.
//! - Segments and init segments are written with `If-None-Match: *`; 412 Precondition Failed
//!   means another packager stored the same object first (names follow media time, so it holds
//!   the same media), and counts as success. Playlists are overwritten.
//! - Every object carries its Content-Type and the configured Cache-Control.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation};
use aws_sdk_s3::primitives::ByteStream;
use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;

use crate::spool::{Entry, Op, Spool};
use crate::{Command, Error, ObjectKind, Sink};

/// Where and how objects are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    /// AWS region (S3-compatible stores accept any, e.g. `us-east-1`).
    pub region: String,
    /// Endpoint URL of an S3-compatible store; `None` for AWS S3.
    pub endpoint: Option<String>,
    pub bucket: String,
    /// Key prefix, e.g. `live`: objects go to `{prefix}/{broadcast}/{path}`.
    pub prefix: String,
    /// Path-style URLs (`endpoint/bucket/key`), needed by most local S3-compatible servers.
    pub path_style: bool,
    /// Cache-Control of segments and init segments.
    pub segment_cache_control: String,
    /// Cache-Control of live media playlists.
    pub playlist_cache_control: String,
    /// Cache-Control of the master playlist and of ended (VOD) playlists.
    pub master_cache_control: String,
    /// Longest wait for one request (connect + send + answer) before it is retried.
    pub attempt_timeout: Duration,
    /// Backoff between retries: from `retry_min` doubling up to `retry_max`, with jitter.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Uploads in flight at once per broadcast (at least 1). Two renditions produce two
    /// segments and two playlists every segment duration; more helps catching up after an
    /// outage.
    pub upload_concurrency: usize,
}

impl Default for S3Settings {
    fn default() -> Self {
        Self {
            region: "us-east-1".into(),
            endpoint: None,
            bucket: String::new(),
            prefix: String::new(),
            path_style: false,
            segment_cache_control: "max-age=31536000, immutable".into(),
            playlist_cache_control: "max-age=1".into(),
            master_cache_control: "max-age=60".into(),
            attempt_timeout: Duration::from_secs(10),
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(5),
            upload_concurrency: 4,
        }
    }
}

impl S3Settings {
    /// The object key of `path` of `broadcast`.
    pub fn key(&self, broadcast: &str, path: &str) -> String {
        let prefix = self.prefix.trim_matches('/');
        if prefix.is_empty() {
            format!("{broadcast}/{path}")
        } else {
            format!("{prefix}/{broadcast}/{path}")
        }
    }

    fn cache_control(&self, kind: ObjectKind, body: &[u8]) -> &str {
        match kind {
            ObjectKind::InitSegment | ObjectKind::Segment => &self.segment_cache_control,
            ObjectKind::MasterPlaylist => &self.master_cache_control,
            // A finished playlist no longer changes: cache it like the master.
            ObjectKind::MediaPlaylist if contains(body, b"#EXT-X-ENDLIST") => {
                &self.master_cache_control
            }
            ObjectKind::MediaPlaylist => &self.playlist_cache_control,
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Builds an S3 client: the standard AWS credential chain (environment, profile, web
/// identity, ECS, IMDS), our own retries instead of the SDK's, a per-attempt timeout so a
/// hanging server cannot stall uploads forever, and no request checksums unless required
/// (some S3-compatible stores reject them).
pub async fn client(settings: &S3Settings) -> aws_sdk_s3::Client {
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(Region::new(settings.region.clone()))
        .load()
        .await;
    let mut b = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(settings.path_style)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(settings.attempt_timeout.min(Duration::from_secs(3)))
                .operation_attempt_timeout(settings.attempt_timeout)
                .build(),
        );
    if let Some(endpoint) = &settings.endpoint {
        b = b.endpoint_url(endpoint);
    }
    aws_sdk_s3::Client::from_conf(b.build())
}

/// The packager-side end: spools commands and wakes the uploader.
#[derive(Debug)]
pub struct S3Sink {
    spool: Arc<Spool>,
    wake: mpsc::Sender<()>,
    broadcast: String,
}

impl S3Sink {
    pub fn new(spool: Arc<Spool>, wake: mpsc::Sender<()>, broadcast: impl Into<String>) -> Self {
        Self {
            spool,
            wake,
            broadcast: broadcast.into(),
        }
    }
}

impl Sink for S3Sink {
    fn apply(&mut self, command: &Command) -> Result<(), Error> {
        match self.spool.append(command) {
            Ok(()) => {}
            // A full spool loses that one segment, not the broadcast: keep packaging.
            Err(e @ Error::SpoolFull { .. }) => {
                tracing::error!(broadcast = %self.broadcast, "{e}");
            }
            Err(e) => return Err(e),
        }
        metrics::gauge!("tern_packager_spool_bytes", "broadcast" => self.broadcast.clone())
            .set(self.spool.bytes() as f64);
        // Full means a wake-up is already pending; closed means the uploader stopped, and the
        // spool keeps the entry for the next run.
        let _ = self.wake.try_send(());
        Ok(())
    }
}

/// A wake channel for [`S3Sink`] and [`Uploader::run`].
pub fn wake_channel() -> (mpsc::Sender<()>, mpsc::Receiver<()>) {
    mpsc::channel(1)
}

/// Outcome of one attempt.
enum Attempt {
    Done,
    /// Another writer stored the immutable object first.
    AlreadyThere,
}

/// How many segment upload latencies [`UploadStats`] keeps (the newest; about 2 h of one
/// broadcast with two renditions).
pub const RECENT_LATENCIES: usize = 4096;

/// What an uploader did (the same figures go to the metrics).
#[derive(Debug, Default)]
pub struct UploadStats {
    /// Segments stored by this uploader.
    pub segments_stored: AtomicU64,
    /// Segments another writer had stored first (412 on `If-None-Match: *`).
    pub segments_already_stored: AtomicU64,
    /// Objects (any kind) put or deleted.
    pub requests_done: AtomicU64,
    /// Failed attempts that were retried.
    pub retries: AtomicU64,
    /// Upload latency of the newest segments (path, latency): see
    /// [`UploadStats::segment_latencies`].
    latencies: Mutex<VecDeque<(String, Duration)>>,
}

impl UploadStats {
    /// Time from each recent segment's last sample (its capture time at the origin) until
    /// S3 answered its PUT (stored, or 412: already stored), oldest first, at most
    /// [`RECENT_LATENCIES`]. Measured on this host's clock against the origin's: clock offset
    /// between the two hosts is part of it.
    pub fn segment_latencies(&self) -> Vec<(String, Duration)> {
        self.latencies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    fn record_latency(&self, path: &str, latency: Duration) {
        let mut l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        if l.len() == RECENT_LATENCIES {
            l.pop_front();
        }
        l.push_back((path.to_owned(), latency));
    }
}

/// Uploads one broadcast's spool.
#[derive(Debug, Clone)]
pub struct Uploader {
    pub client: aws_sdk_s3::Client,
    pub settings: S3Settings,
    pub broadcast: String,
    pub spool: Arc<Spool>,
    pub stats: Arc<UploadStats>,
}

impl Uploader {
    /// Uploads until `stop` turns true and, after that, until the spool is empty or `drain`
    /// has passed (whatever is left is uploaded by the next run).
    pub async fn run(
        self,
        mut wake: mpsc::Receiver<()>,
        mut stop: watch::Receiver<bool>,
        drain: Duration,
    ) {
        let limit = self.settings.upload_concurrency.max(1);
        let this = Arc::new(self);
        let mut uploads = JoinSet::new();
        // Rung by any upload that succeeds after failing: S3 is back, so the others waiting in
        // their backoff retry now instead of each sleeping out its own delay.
        let recovered = Arc::new(Notify::new());
        // Spool sequence number of each upload task, to release it if the task fails.
        let mut in_flight = HashMap::new();
        // A dropped stop sender counts as a stop; a dropped wake sender (the packager ended)
        // leaves the periodic re-check.
        let mut stopping = false;
        let mut wake_open = true;
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            this.update_gauges();
            if deadline.is_none() && (stopping || *stop.borrow()) {
                deadline = Some(tokio::time::Instant::now() + drain);
            }
            while uploads.len() < limit {
                let Some(entry) = this.spool.next_ready() else {
                    break;
                };
                let seq = entry.seq;
                let me = this.clone();
                let recovered = recovered.clone();
                let task =
                    uploads.spawn(async move { me.upload_with_retries(&entry, &recovered).await });
                in_flight.insert(task.id(), seq);
            }
            if uploads.is_empty() {
                if deadline.is_some() {
                    return; // drained
                }
                // Idle: wait for the packager, a stop, or a periodic re-check.
                tokio::select! {
                    r = wake.recv(), if wake_open => wake_open = r.is_some(),
                    r = stop.changed(), if !stopping => stopping |= r.is_err(),
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            let until = deadline.unwrap_or_else(|| {
                tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
            });
            tokio::select! {
                done = uploads.join_next_with_id() => {
                    match done {
                        Some(Ok((id, ()))) => {
                            if let Some(seq) = in_flight.remove(&id) {
                                this.spool.complete(seq);
                            }
                        }
                        Some(Err(e)) => {
                            // A panicked upload: leave its entry queued for another try.
                            tracing::error!(broadcast = %this.broadcast, "upload task failed: {e}");
                            if let Some(seq) = in_flight.remove(&e.id()) {
                                this.spool.release(seq);
                            }
                        }
                        None => {}
                    }
                }
                // New entries may be ready to go beside those in flight.
                r = wake.recv(), if wake_open => wake_open = r.is_some(),
                r = stop.changed(), if !stopping => stopping |= r.is_err(),
                () = tokio::time::sleep_until(until) => {
                    uploads.abort_all();
                    for seq in in_flight.values() {
                        this.spool.release(*seq);
                    }
                    tracing::warn!(broadcast = %this.broadcast, left = this.spool.len(),
                        "uploader stopping with entries spooled; the next run uploads them");
                    return;
                }
            }
        }
    }

    fn update_gauges(&self) {
        let b = self.broadcast.clone();
        metrics::gauge!("tern_packager_spool_bytes", "broadcast" => b.clone())
            .set(self.spool.bytes() as f64);
        metrics::gauge!("tern_packager_upload_lag_seconds", "broadcast" => b)
            .set(self.spool.lag().as_secs_f64());
    }

    /// Retries one entry until it is stored (or found unreadable, then skipped).
    async fn upload_with_retries(&self, entry: &Entry, recovered: &Notify) {
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(self.settings.retry_min)
            .with_max_delay(self.settings.retry_max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build();
        let mut failures = 0u32;
        loop {
            match self.attempt(entry).await {
                Ok(outcome) => {
                    if failures > 0 {
                        recovered.notify_waiters();
                        tracing::info!(broadcast = %self.broadcast, path = %entry.path, failures,
                            "upload succeeded after retries");
                    }
                    self.count_success(entry, outcome);
                    return;
                }
                Err(UploadError::Body(e)) => {
                    // The entry's file is gone or unreadable: nothing can be uploaded for it.
                    tracing::error!(broadcast = %self.broadcast, path = %entry.path,
                        "spool entry unreadable, skipped: {e}");
                    return;
                }
                Err(UploadError::Store(msg)) => {
                    failures += 1;
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("tern_packager_upload_retries_total",
                        "broadcast" => self.broadcast.clone())
                    .increment(1);
                    let delay = delays.next().unwrap_or(self.settings.retry_max);
                    // Loud on the first failure, then every ~20th, so an outage is visible
                    // without flooding the log.
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(broadcast = %self.broadcast, path = %entry.path, failures,
                            "upload failed, retrying in {delay:?}: {msg}");
                    }
                    self.update_gauges();
                    // Registered before the sleep, so a recovery during it is not missed.
                    let woken = recovered.notified();
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = woken => {}
                    }
                }
            }
        }
    }

    fn count_success(&self, entry: &Entry, outcome: Attempt) {
        self.stats.requests_done.fetch_add(1, Ordering::Relaxed);
        if entry.op == Op::Put(ObjectKind::Segment) {
            let outcome = match outcome {
                Attempt::Done => {
                    self.stats.segments_stored.fetch_add(1, Ordering::Relaxed);
                    "stored"
                }
                Attempt::AlreadyThere => {
                    self.stats
                        .segments_already_stored
                        .fetch_add(1, Ordering::Relaxed);
                    "already_stored"
                }
            };
            metrics::counter!("tern_packager_segments_uploaded_total",
                "broadcast" => self.broadcast.clone(), "outcome" => outcome)
            .increment(1);
            // From the segment's last sample to S3's answer. A clock behind the origin's
            // (negative latency) records nothing rather than a made-up zero.
            let latency = entry.captured_us.and_then(|us| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH + Duration::from_micros(us))
                    .ok()
            });
            if let Some(latency) = latency {
                self.stats.record_latency(&entry.path, latency);
                metrics::histogram!("tern_packager_segment_upload_latency_seconds",
                    "broadcast" => self.broadcast.clone())
                .record(latency.as_secs_f64());
            }
        }
    }

    async fn attempt(&self, entry: &Entry) -> Result<Attempt, UploadError> {
        let key = self.settings.key(&self.broadcast, &entry.path);
        match entry.op {
            Op::Delete { .. } => {
                self.client
                    .delete_object()
                    .bucket(&self.settings.bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|e| UploadError::Store(describe(&e)))?;
                Ok(Attempt::Done)
            }
            Op::Put(kind) => {
                let body = self.spool.body(entry).map_err(UploadError::Body)?;
                let mut put = self
                    .client
                    .put_object()
                    .bucket(&self.settings.bucket)
                    .key(key)
                    .content_type(kind.content_type())
                    .cache_control(self.settings.cache_control(kind, &body))
                    .content_length(body.len() as i64);
                if kind.immutable() {
                    put = put.if_none_match("*");
                }
                match put.body(ByteStream::from(body)).send().await {
                    Ok(_) => Ok(Attempt::Done),
                    Err(e) if kind.immutable() && status(&e) == Some(412) => {
                        Ok(Attempt::AlreadyThere)
                    }
                    Err(e) => Err(UploadError::Store(describe(&e))),
                }
            }
        }
    }
}

enum UploadError {
    Body(Error),
    Store(String),
}

type SdkError<E> = aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>;

fn status<E>(e: &SdkError<E>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

fn describe<E: std::error::Error + 'static>(e: &SdkError<E>) -> String {
    use std::fmt::Write;
    let mut s = match status(e) {
        Some(code) => format!("HTTP {code}: "),
        None => String::new(),
    };
    // The SDK's Display is terse ("dispatch failure"); the sources say why.
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    let mut first = true;
    while let Some(err) = cur {
        if !first {
            s.push_str(": ");
        }
        let _ = write!(s, "{err}");
        first = false;
        cur = err.source();
    }
    s
}

/// An S3 lifecycle configuration (the JSON `aws s3api put-bucket-lifecycle-configuration`
/// takes) that expires objects under `{prefix}/` after `days`: an alternative or a safety net
/// to the packager's own deletes of expired segments (e.g. after a packager crash). Do not use
/// it on recordings you want to keep.
pub fn lifecycle_rule(prefix: &str, days: u32) -> String {
    let prefix = prefix.trim_matches('/');
    let filter = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    format!(
        r#"{{
  "Rules": [
    {{
      "ID": "tern-expire-live-hls",
      "Status": "Enabled",
      "Filter": {{ "Prefix": "{filter}" }},
      "Expiration": {{ "Days": {days} }},
      "AbortIncompleteMultipartUpload": {{ "DaysAfterInitiation": 1 }}
    }}
  ]
}}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_cache_control() {
        let mut s = S3Settings::default();
        assert_eq!(s.key("demo", "64k/1.m4s"), "demo/64k/1.m4s");
        s.prefix = "/live/".into();
        assert_eq!(s.key("demo", "master.m3u8"), "live/demo/master.m3u8");
        assert_eq!(
            s.cache_control(ObjectKind::Segment, b""),
            "max-age=31536000, immutable"
        );
        assert_eq!(
            s.cache_control(ObjectKind::MediaPlaylist, b"#EXTM3U\n"),
            "max-age=1"
        );
        assert_eq!(
            s.cache_control(ObjectKind::MediaPlaylist, b"#EXTM3U\n#EXT-X-ENDLIST\n"),
            "max-age=60"
        );
    }

    #[test]
    fn lifecycle_rule_is_json_with_the_prefix() {
        let r = lifecycle_rule("/live/", 2);
        assert!(r.contains(r#""Prefix": "live/""#), "{r}");
        assert!(r.contains(r#""Days": 2"#));
    }
}
