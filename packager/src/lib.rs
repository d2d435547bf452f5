//! Tern's HLS packager: one live Opus broadcast in, AAC-LC HLS (fMP4/CMAF segments) out.
//!
//! # Shape
//!
//! [`Packager`] is a sans-IO core: it takes [`OpusFrame`]s with [`Packager::push`] and produces
//! storage [`Command`]s (put this object, delete that one) that the caller pulls with
//! [`Packager::poll_command`] and hands to a [`Sink`] ([`DirectorySink`], [`MemorySink`], or an
//! S3 sink elsewhere). It never reads a clock, opens a socket or touches the file system: media
//! time and wall-clock time both come from the frames. Transcoding runs inline (FFmpeg: Opus
//! decoded once, one AAC-LC encoder per [`Rendition`]), so `push` is CPU-bound but never waits on
//! I/O; run it on its own OS thread ([`run`] is that loop, fed by a channel).
//!
//! # Run contract
//!
//! 1. [`Packager::new`] queues the init segments and the master playlist.
//! 2. After every [`Packager::push`] (and after [`Packager::new`] and [`Packager::finish`]),
//!    drain [`Packager::poll_command`] until it returns `None` and apply the commands **in
//!    order**: the order is what makes the output valid at every instant (init and master
//!    first; a segment is stored before the playlist that names it; a segment is deleted only
//!    after it left the playlist window plus a grace of one more window).
//! 3. [`Packager::finish`] flushes the last (possibly short) segment and writes every media
//!    playlist with `EXT-X-ENDLIST`. Segments still in the window and grace stay stored.
//!
//! # Output
//!
//! Paths are relative to the broadcast's folder: `master.m3u8`, `{rendition}/index.m3u8`,
//! `{rendition}/init.mp4`, `{rendition}/{index}.m4s`.
//!
//! # Invariants and choices
//!
//! - **Segment names follow media time**: segment `i` holds the AAC frames whose time `t`
//!   (48 kHz samples) has `floor(t / segment_samples) == i`, so two packagers fed the same
//!   broadcast name their segments the same and can write to one bucket with conditional puts.
//!   Segments are 93 or 94 AAC frames for 2 s (AAC frames are 1024 samples).
//! - **The first segment is not published**: the packager usually joins mid-segment, so its
//!   first segment is short; publishing it would put a truncated object under a name that a
//!   packager running since earlier publishes in full. Only a start exactly on a boundary (the
//!   broadcast's own start, media time 0) publishes its first segment.
//! - **Media sequence = segment index** of the first segment in the window, so indices are kept
//!   contiguous (see gaps below); EXT-X-PROGRAM-DATE-TIME is the origin's capture time of the
//!   segment's first sample.
//! - **Gaps**: a frame whose timestamp jumps forward (lost frames, DTX) by at most
//!   [`MAX_GAP_FILL`] is preceded by silence, so segments stay regular and names stay on media
//!   time. A frame that arrives up to [`LATE_TOLERANCE`] behind the expected time (duplicate
//!   or late, e.g. after a resumed subscription) is dropped and counted.
//! - **Restarts**: a forward jump beyond [`MAX_GAP_FILL`], or a backward jump beyond
//!   [`LATE_TOLERANCE`] (origin restart), ends the current epoch: the open segment is flushed
//!   (published with its real, shorter duration), the decoder and encoders start afresh, and the
//!   new epoch starts at the next segment boundary with `EXT-X-DISCONTINUITY`. To keep indices
//!   and media sequence numbers contiguous, the output timeline then runs at an offset from the
//!   input timestamps; a packager that joins after such a restart would name segments
//!   differently (a known limit of redundant packagers across origin restarts).
//! - **Malformed Opus packets** never fail [`Packager::push`]: they are counted
//!   ([`Stats::malformed_frames`]) and replaced by silence (the next frame's gap fill).
//! - **Bandwidth** in the master playlist is declared up front (it is written first):
//!   AVERAGE-BANDWIDTH is the target bitrate plus the fMP4 overhead of a full segment, BANDWIDTH
//!   adds [`PEAK_HEADROOM_PERCENT`] for the encoder's segment-to-segment variation. The measured
//!   peak is in [`Stats`], and a warning is logged if a segment exceeds the declaration.

mod fmp4;
mod packager;
mod playlist;
#[cfg(feature = "s3")]
pub mod s3;
mod segment;
mod sink;
pub mod spool;
mod transcode;

use std::path::PathBuf;
use std::time::Duration;

pub use packager::{run, Packager, RenditionStats, Stats};
pub use sink::{DirectorySink, MemorySink, Sink, TeeSink};

/// Longest forward jump of the frame timestamps that is filled with silence (10 s).
pub const MAX_GAP_FILL: Duration = Duration::from_secs(10);
/// How far behind the expected time a frame may arrive and be dropped as late or duplicate
/// rather than treated as a timeline restart (1 s).
pub const LATE_TOLERANCE: Duration = Duration::from_secs(1);
/// Highest AAC-LC bitrate per channel at 48 kHz (FFmpeg's encoder caps there: 6144 bits per
/// 1024-sample frame).
pub const MAX_BITRATE_PER_CHANNEL: u32 = 288_000;
/// Lowest bitrate per channel accepted: below it AAC-LC at 48 kHz is unusable.
pub const MIN_BITRATE_PER_CHANNEL: u32 = 8_000;
/// BANDWIDTH = AVERAGE-BANDWIDTH + this percentage of the target bitrate.
pub const PEAK_HEADROOM_PERCENT: u64 = 25;

/// One Opus packet of the broadcast.
#[derive(Debug, Clone)]
pub struct OpusFrame {
    /// Media time in 48 kHz samples since the broadcast started (RTP-like timestamp, but
    /// 64-bit, never wraps).
    pub timestamp: u64,
    /// Wall-clock capture time at the origin, microseconds since the Unix epoch.
    pub capture_time_us: u64,
    pub payload: bytes::Bytes,
}

/// One output bitrate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendition {
    /// Folder name and variant name, e.g. `"64k"`: ASCII letters, digits, `-` and `_`.
    pub name: String,
    /// AAC target bitrate, bits/s.
    pub bitrate: u32,
}

impl Rendition {
    pub fn new(name: impl Into<String>, bitrate: u32) -> Self {
        Self {
            name: name.into(),
            bitrate,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackagerConfig {
    /// Default: `64k` (64 000 bits/s) and `128k` (128 000 bits/s).
    pub renditions: Vec<Rendition>,
    /// Output channels, 1 or 2 (default 2); the Opus stream may be mono or stereo either way.
    pub channels: u16,
    /// Nominal segment duration (default 2 s); must be a whole number of 48 kHz samples.
    pub segment_duration: Duration,
    /// Segments in the live playlist (default 3).
    pub window: usize,
    /// Recording (default false): keep every segment and leave a playlist of the whole
    /// broadcast (EXT-X-PLAYLIST-TYPE:EVENT while live, VOD with EXT-X-ENDLIST at the end)
    /// instead of a sliding window; no segment is ever deleted. `window` is then unused.
    pub record: bool,
    /// FFmpeg AAC coder (default [`AacCoder::TwoLoop`], FFmpeg's own default).
    pub aac_coder: AacCoder,
}

/// FFmpeg's AAC-LC quantisation search (`aac_coder`): a speed/quality trade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AacCoder {
    /// `twoloop`: FFmpeg's default, best quality of its coders.
    #[default]
    TwoLoop,
    /// `fast`: about twice as fast; audibly weaker at low bitrates on dense material.
    Fast,
}

impl AacCoder {
    pub fn ffmpeg_name(self) -> &'static str {
        match self {
            Self::TwoLoop => "twoloop",
            Self::Fast => "fast",
        }
    }
}

impl Default for PackagerConfig {
    fn default() -> Self {
        Self {
            renditions: vec![
                Rendition::new("64k", 64_000),
                Rendition::new("128k", 128_000),
            ],
            channels: 2,
            segment_duration: Duration::from_secs(2),
            window: 3,
            record: false,
            aac_coder: AacCoder::TwoLoop,
        }
    }
}

/// A storage operation, to be applied in the order produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Put {
        path: String,
        body: bytes::Bytes,
        kind: ObjectKind,
        /// Segments only: the origin's capture time (µs since the Unix epoch) of the end of the
        /// segment's last sample, the instant from which its upload latency is measured.
        captured_us: Option<u64>,
    },
    Delete {
        path: String,
    },
}

impl Command {
    pub fn path(&self) -> &str {
        match self {
            Self::Put { path, .. } | Self::Delete { path } => path,
        }
    }
}

/// What an object is; content type and cache policy derive from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    MasterPlaylist,
    MediaPlaylist,
    InitSegment,
    Segment,
}

impl ObjectKind {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::MasterPlaylist | Self::MediaPlaylist => "application/vnd.apple.mpegurl",
            Self::InitSegment | Self::Segment => "audio/mp4",
        }
    }

    /// A `Cache-Control` value: segments and init segments never change once written (names
    /// follow media time); the live playlist changes every segment, so it may be cached for at
    /// most about half a segment; the master playlist is fixed for the broadcast.
    pub fn cache_control(self) -> &'static str {
        match self {
            Self::MasterPlaylist => "public, max-age=60",
            Self::MediaPlaylist => "public, max-age=1",
            Self::InitSegment | Self::Segment => "public, max-age=31536000, immutable",
        }
    }

    /// Objects that never change once written: the same name always holds the same bytes, so
    /// redundant packagers write them with `If-None-Match: *` and the first one wins.
    pub fn immutable(self) -> bool {
        matches!(self, Self::InitSegment | Self::Segment)
    }

    /// Short tag used in spool entries.
    pub fn tag(self) -> &'static str {
        match self {
            Self::MasterPlaylist => "master",
            Self::MediaPlaylist => "media",
            Self::InitSegment => "init",
            Self::Segment => "segment",
        }
    }

    pub fn from_tag(tag: &str) -> Option<Self> {
        Some(match tag {
            "master" => Self::MasterPlaylist,
            "media" => Self::MediaPlaylist,
            "init" => Self::InitSegment,
            "segment" => Self::Segment,
            _ => return None,
        })
    }
}

/// The crate's one error type.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid packager configuration: {0}")]
    InvalidConfig(String),
    #[error("FFmpeg lacks the {0}")]
    CodecMissing(&'static str),
    #[error("{what}: {source}")]
    Codec {
        what: &'static str,
        #[source]
        source: ffmpeg_next::Error,
    },
    #[error("decoder produced unsupported sample format {0}")]
    UnsupportedSampleFormat(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing object path {0:?}: must be relative and stay inside the broadcast folder")]
    InvalidPath(String),
    #[error("the broadcast is finished; no more frames are accepted")]
    Finished,
    #[error("spool {path} is full ({bytes} bytes of at most {max}); object {object} dropped")]
    SpoolFull {
        path: PathBuf,
        object: String,
        bytes: u64,
        max: u64,
    },
    #[error("S3 configuration: {0}")]
    S3Config(String),
}
