//! Tern's origin link: how a broadcast travels from the origin to the regional relays.
//!
//! - [`wire`]: the message codec, pure and sans-IO (docs/origin-link.md describes it).
//! - [`origin`]: the origin's QUIC server; broadcasts are published into a [`Registry`]
//!   (by the built-in [`testsrc`] today, by RTP ingest later) and served to subscribers.
//! - [`ingest`]: RTP ingest endpoints (UDP sockets) feeding the registry.
//! - [`rtp`]: RTP/Opus ingest as an SFU sends it (pure depacketizer and reorder buffer).
//! - [`subscriber`]: the relay side; one QUIC connection per upstream, a control stream per
//!   subscribed broadcast, its frames in groups on unidirectional streams, put back in order
//!   by a sans-IO reorder window (`reorder.rs`).
//! - [`tls`]: certificates and rustls configs (TLS 1.3 only, ALPN [`ALPN`]).
//!
//! Every frame carries its capture time at the origin, so each hop can measure latency.
//!
//! Features: `net` (default) is everything with sockets, QUIC and TLS; without it the crate
//! is the pure codecs, `wire` and `rtp`. `fuzzing` adds the `fuzzing` module: the bodies of
//! the fuzz targets in `origin-link/fuzz`.

use std::fmt;
use std::str::FromStr;

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
#[cfg(feature = "net")]
pub mod ingest;
#[cfg(feature = "net")]
pub mod origin;
mod reorder;
pub mod rtp;
#[cfg(feature = "net")]
pub mod subscriber;
#[cfg(feature = "testsrc")]
pub mod testsrc;
#[cfg(feature = "net")]
pub mod tls;
pub mod wire;

#[cfg(feature = "net")]
pub use origin::{Feed, Origin, Registry, Source};
#[cfg(feature = "net")]
pub use subscriber::{Subscription, Upstream};
pub use wire::{Frame, Message};

/// ALPN of the origin link. The version lives here: a relay and an origin that speak
/// different versions fail the TLS handshake instead of misreading each other.
pub const ALPN: &[u8] = b"tern-link/1";

/// Opus RTP clock rate; every media timestamp in Tern counts these.
pub const SAMPLE_RATE: u32 = 48_000;

/// Samples in one 20 ms Opus frame.
pub const FRAME_SAMPLES: u64 = 960;

/// The one error type of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The peer sent something this protocol version does not allow.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A broadcast id that is not `[A-Za-z0-9_-]{1,64}`.
    #[error("invalid broadcast id {0:?}: use 1 to 64 of A-Z a-z 0-9 _ -")]
    InvalidBroadcastId(String),
    /// The origin has no such broadcast.
    #[error("broadcast {0} not found at the origin")]
    NotFound(BroadcastId),
    /// The origin refused the subscription.
    #[error("subscription refused: {0}")]
    Refused(String),
    /// QUIC connection setup failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The upstream address.
        addr: std::net::SocketAddr,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The QUIC connection was lost.
    #[cfg(feature = "net")]
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A stream write failed.
    #[cfg(feature = "net")]
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    /// A stream read failed.
    #[cfg(feature = "net")]
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadError),
    /// Certificates or keys could not be made or loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// Socket setup failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The media encoder of the test source failed.
    #[error("test source: {0}")]
    TestSource(String),
    /// The subscription would loop back through a node already on its path, or the path is
    /// longer than [`MAX_HOPS`].
    #[error("subscription refused: {0}")]
    Loop(String),
}

/// Most links a subscription may pass through (origin → hub → edge → packager is 3). A
/// longer path is refused, so a loop that somehow avoids detection still ends.
pub const MAX_HOPS: usize = 8;

/// The identity of one link node (an origin or a relay serving the link), carried in
/// [`Message::Subscribe`] so that a subscription that comes back to a node is refused.
///
/// Random per process start: loop detection needs uniqueness, not a name an operator picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId(u64);

impl NodeId {
    /// A fresh random id.
    #[cfg(feature = "net")]
    pub fn random() -> Self {
        // 62 bits: every id fits a one-value QUIC varint.
        Self(rand::random::<u64>() & wire::VARINT_MAX)
    }

    /// The id as carried on the wire.
    pub fn get(self) -> u64 {
        self.0
    }

    /// An id read from the wire.
    pub fn from_wire(v: u64) -> Self {
        Self(v & wire::VARINT_MAX)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The id of a broadcast: 1 to 64 characters of `[A-Za-z0-9_-]`.
///
/// Ids appear in URLs, object keys and file paths, so the character set is closed: an id can
/// never contain a path separator or `..`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
// Shared, not owned: ids are cloned per frame on the way to listeners, so a clone is a
// reference count, not an allocation.
pub struct BroadcastId(std::sync::Arc<str>);

impl BroadcastId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for BroadcastId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(s.into()))
        } else {
            Err(Error::InvalidBroadcastId(s.chars().take(80).collect()))
        }
    }
}

impl fmt::Display for BroadcastId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Wall-clock time now, microseconds since the Unix epoch (0 if the clock is before 1970).
pub fn unix_micros_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_ids() {
        for ok in ["demo", "a", "Talk_Show-42", &"x".repeat(64)] {
            assert!(ok.parse::<BroadcastId>().is_ok(), "{ok}");
        }
        for bad in ["", "..", "a/b", "a b", "é", &"x".repeat(65), "a%2f"] {
            assert!(bad.parse::<BroadcastId>().is_err(), "{bad}");
        }
    }
}
