//! Tern's relay: WebRTC (WHEP) fan-out of broadcasts pulled once from an origin, and the
//! pieces the `tern` appliance binary assembles.
//!
//! - [`fanout`]: the sans-IO fan-out core (str0m, ICE-lite, one UDP socket for all listeners).
//! - [`egress`], [`rtcp`], [`srtp`], [`dtls_keys`]: the core's own media path (SRTP packets
//!   from a header template, sender reports, NACKs) with the keys each DTLS handshake exports,
//!   and [`stun`]: consent answers once str0m's per-listener state is freed.
//! - [`node`]: its async shell (socket task, upstream subscriptions).
//! - [`http`]: listener page, WHEP, HLS files, health, metrics.
//! - [`packaging`]: runs the HLS packager beside the relay, isolated on its own thread.
//! - [`router`]: geo-routing shell: polls the fleet's health, answers `/v1/route`.
//! - [`config`]: layered configuration.
//! - [`auth`], [`limits`]: who may listen, and how often a client may start a session.
//! - [`reload`]: SIGHUP reload, the latest configuration on a watch channel.
//! - [`sdnotify`]: readiness, watchdog and stopping notifications to systemd.
//! - [`udp`]: batched datagram sends for the fan-out.

pub mod auth;
pub mod config;
pub mod dtls_keys;
pub mod egress;
pub mod fanout;
pub mod http;
pub mod limits;
pub mod node;
pub mod packaging;
pub mod reload;
pub mod router;
pub mod rtcp;
#[cfg(unix)]
pub mod sdnotify;
pub mod srtp;
pub mod stun;
pub mod udp;

use tern_origin_link::BroadcastId;

/// The one error type of this crate's library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The WHEP offer is malformed or asks for something this relay cannot serve.
    #[error("{0}")]
    BadOffer(String),
    /// The relay serves its configured maximum of listeners.
    #[error("this relay is full")]
    Full,
    /// The upstream has no such broadcast.
    #[error("no broadcast named {0}")]
    UnknownBroadcast(BroadcastId),
    /// The upstream could not be reached or refused.
    #[error("upstream unavailable: {0}")]
    Upstream(String),
    /// The relay is draining: current listeners stay, new ones go elsewhere.
    #[error("this relay is draining; try another")]
    Draining,
    /// The relay is stopping.
    #[error("the relay is shutting down")]
    ShuttingDown,
    /// The configuration is invalid; the message says which key and why.
    #[error("{0}")]
    Config(Box<figment::Error>),
    /// Socket setup failed.
    #[error("{0}")]
    Io(String),
    /// The WebRTC stack failed outside of any one listener's input.
    #[error("WebRTC: {0}")]
    WebRtc(String),
    /// A GeoIP database could not be loaded.
    #[error(transparent)]
    GeoIp(#[from] tern_geoip::Error),
}

/// Resolves once `shutdown` is true (or its sender is gone). Returns `()` so no borrow of
/// the channel is held across an await.
pub async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
